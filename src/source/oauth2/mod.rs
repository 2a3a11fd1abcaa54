//! OAuth2 token sources.
