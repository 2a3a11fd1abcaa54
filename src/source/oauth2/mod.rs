//! OAuth2 token sources (RFC 6749).
//!
//! [`ClientCredentials`] asks a token endpoint for tokens with the client credentials grant
//! (§4.4): a service proves who it is with its client id and secret, and gets a token in its
//! own name.
//!
//! ```
//! use std::convert::Infallible;
//!
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use tower_token_refresh::{source::oauth2::ClientCredentials, TokenSource};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! // Stands in for a real HTTPS client, such as hyper-util's client with a TLS connector.
//! let https_client = tower::service_fn(|_request: http::Request<Full<Bytes>>| async {
//!     let body = r#"{"access_token":"eyJhbGciOi","token_type":"Bearer","expires_in":3600}"#;
//!     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body))))
//! });
//!
//! let source = ClientCredentials::builder(
//!     "https://auth.example.com/oauth/token",
//!     "reporting-service",
//!     "s3cr3t",
//! )
//! .scope("reports:read")
//! .audience("https://api.example.com")
//! .transport(https_client)
//! .build()?;
//!
//! let token = source.fetch(None).await?;
//!
//! assert_eq!(token.expose_secret(), "eyJhbGciOi");
//! assert_eq!(token.scopes(), ["reports:read"]);
//! # Ok(())
//! # }
//! ```
//!
//! # The request
//!
//! A `POST` to the token URL with `content-type: application/x-www-form-urlencoded`,
//! `accept: application/json` and the form body
//! `grant_type=client_credentials&scope=...&<extra parameters>`, encoded per RFC 6749
//! Appendix B. `scope` is sent only when scopes were asked for, space-joined. The client
//! authenticates with [`ClientAuth::Basic`] (the default: `authorization: Basic
//! base64(urlencode(id) ":" urlencode(secret))`, marked sensitive) or
//! [`ClientAuth::RequestBody`] (`client_id` and `client_secret` last in the form).
//!
//! Expiry counts from the moment the request is sent, not from when the answer arrives, so
//! that a slow token endpoint cannot make a token look younger than it is.
//!
//! # Reading the answer
//!
//! At most 64 KiB of the answer are read; a longer one is an error without an excerpt. The
//! body is parsed as JSON whatever its `content-type`.
//!
//! A success status (2xx) with a JSON object (RFC 6749 §5.1):
//!
//! | field | accepted | otherwise |
//! |---|---|---|
//! | `access_token` | a non-empty string | invalid response naming the field |
//! | `token_type` | `Bearer` in any case; missing or `null` is taken as Bearer | any other type (`mac`, `DPoP`, `""`): [`Error::is_invalid_token`](crate::Error::is_invalid_token), terminal; not a string: invalid response |
//! | `expires_in` | see below | invalid response naming the field, without an excerpt |
//! | `scope` | a space-separated string (`""` means none granted), or a list of strings; missing or `null`: the scopes asked for | invalid response naming the field |
//! | `refresh_token` | kept when a non-empty string | ignored |
//!
//! Unknown fields are ignored. A success status whose object has no `access_token` but an
//! `error` code, as some servers send, is read as an error response.
//!
//! `expires_in` (field cases F01 to F03):
//!
//! - a JSON number, integer or not: its whole seconds (`3600.9` is 3600 s, `1e3` is 1000 s);
//! - a string holding a plain decimal number, `-?[0-9]+(\.[0-9]+)?` after trimming ASCII
//!   whitespace: read the same way (`"3600"`, `" 3600 "` and `"3600.0"` are all 3600 s);
//!   `""`, `"1e3"`, `"+3600"`, `"3600."`, `"NaN"`, `"inf"` and anything else are refused, since
//!   no server is known to send them and guessing could turn garbage into a lifetime;
//! - missing or `null`: expiry unknown, the token is replaced when a server rejects it;
//! - zero, negative, or under one second: expired on arrival (it still serves the call that
//!   fetched it; the layer does not loop on it);
//! - huge: clamped to [`MAX_LIFETIME`](crate::MAX_LIFETIME);
//! - `true`, objects, lists: refused.
//!
//! An error status with a JSON object holding a string `error` (RFC 6749 §5.2) gives an
//! [`Error::is_endpoint`](crate::Error::is_endpoint) error with the code, `error_description`
//! and `error_uri`; `invalid_grant`, `invalid_client` and their kin are terminal (F18). Any
//! other error answer, such as a proxy's HTML page, gives the status and a short excerpt of
//! the body (F19); a success status with a body that is not a JSON object gives an invalid
//! response error with an excerpt.
//!
//! # Secrets
//!
//! No error, log line or `Debug` output holds the client secret or a token (R10):
//!
//! - an excerpt is added only when the body contains none of the words `token`, `secret` or
//!   `bearer` in any case, none of the forms of the client secret that were sent, and has a
//!   space near its start (a single unbroken word may be a bare token);
//! - `error`, `error_description` and `error_uri` are dropped when they echo the client
//!   secret;
//! - errors about a field of a success answer never carry an excerpt;
//! - a plain `http://` token URL is refused unless its host is a loopback address or
//!   [`allow_insecure_http`](ClientCredentialsBuilder::allow_insecure_http) says otherwise;
//! - redirects are not followed (the default transport follows none; a custom one should
//!   not either, lest it forward the credentials).
//!
//! # Transport, timeouts and retries
//!
//! Requests go through any tower HTTP service given to
//! [`transport`](ClientCredentialsBuilder::transport), so TLS, proxies and timeouts are the
//! transport's business. The default, with the `hyper-client` feature (on by default), is
//! hyper-util's HTTP/1 client without TLS: it can only serve a token endpoint on a loopback
//! address, and [`build`](ClientCredentialsBuilder::build) refuses an `https` URL without a
//! transport rather than fail at the first fetch.
//!
//! A connection failure is an [`Error::is_transport`](crate::Error::is_transport) error. The
//! source has no timeout of its own unless one is set with
//! [`timeout`](ClientCredentialsBuilder::timeout): the layer's refresh timeout bounds every
//! fetch. It does not retry by itself.
//!
//! # Logging
//!
//! Each token request ends with one `DEBUG` event carrying the token URL's host, the grant
//! type, the time taken and the outcome (for a failure: status, whether it is terminal, and
//! the error). Bodies and secrets are never logged.

mod client_credentials;
mod request;
mod response;
mod transport;

#[cfg(test)]
mod tests;

pub use client_credentials::{ClientCredentials, ClientCredentialsBuilder};
pub use request::ClientAuth;
