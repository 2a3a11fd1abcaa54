//! The error type of the layer and of every token source.
//!
//! One opaque [`Error`] covers everything that can go wrong while getting a token. It is cheap
//! to clone, because one failed refresh is delivered to every caller that waited for it (R9),
//! and it never contains a secret: not in `Display`, not in `Debug`, not in its source chain.
//!
//! Errors of the wrapped service pass through the layer unchanged, boxed as [`BoxError`].
//! To tell the two apart, downcast:
//!
//! ```
//! use tower_token_refresh::{BoxError, Error};
//!
//! fn describe(err: &BoxError) -> &'static str {
//!     match err.downcast_ref::<Error>() {
//!         Some(err) if err.is_terminal() => "the credentials are no good, ask a human",
//!         Some(_) => "the token endpoint had a bad moment, try again later",
//!         None => "the request itself failed",
//!     }
//! }
//! # let _ = describe;
//! ```

use std::{fmt, sync::Arc, time::Duration};

use http::StatusCode;

/// A type-erased error, as used by tower for middleware errors.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The longest excerpt of a server's text that an error keeps.
pub(crate) const EXCERPT_LIMIT: usize = 120;

/// Why getting a token failed.
///
/// Use the `is_*` methods to branch; [`Error::is_terminal`] answers the question most callers
/// have: will trying again help?
#[derive(Clone)]
pub struct Error {
    inner: Arc<Inner>,
}

struct Inner {
    kind: Kind,
    terminal: bool,
    status: Option<StatusCode>,
    oauth: Option<OAuthError>,
    field: Option<&'static str>,
    excerpt: Option<String>,
    message: Option<&'static str>,
    retry_after: Option<Duration>,
    source: Option<BoxError>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// The token endpoint answered with an error status.
    Endpoint,
    /// The token endpoint answered, but its answer is not a usable token response.
    InvalidResponse,
    /// The token endpoint could not be reached.
    Transport,
    /// The refresh took longer than the refresh timeout.
    Timeout,
    /// The token cannot be used (not a valid header value, unsupported token type).
    InvalidToken,
    /// The configuration is unusable.
    Config,
    /// A token source of the user's failed.
    Source,
    /// The token file could not be read, or holds no usable token.
    File,
    /// The refresh task ended without an outcome (it panicked, or its runtime shut down).
    Aborted,
}

/// The `error`, `error_description` and `error_uri` fields of an RFC 6749 §5.2 error response.
#[derive(Clone, Debug, PartialEq, Eq)]
struct OAuthError {
    code: String,
    description: Option<String>,
    uri: Option<String>,
}

impl Error {
    fn new(kind: Kind, terminal: bool) -> Self {
        Self::from_inner(Inner {
            kind,
            terminal,
            status: None,
            oauth: None,
            field: None,
            excerpt: None,
            message: None,
            retry_after: None,
            source: None,
        })
    }

    fn from_inner(inner: Inner) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }

    fn with(self, f: impl FnOnce(&mut Inner)) -> Self {
        let mut inner = Arc::try_unwrap(self.inner).unwrap_or_else(|shared| Inner {
            kind: shared.kind,
            terminal: shared.terminal,
            status: shared.status,
            oauth: shared.oauth.clone(),
            field: shared.field,
            excerpt: shared.excerpt.clone(),
            message: shared.message,
            retry_after: shared.retry_after,
            // NOTE: a shared error is only ever extended while it is being built, before it
            // is cloned; losing the source here is not reachable in practice.
            source: None,
        });
        f(&mut inner);
        Self::from_inner(inner)
    }

    /// A failure of a token source that may go away by itself: trying again later can help.
    ///
    /// Use this in your own [`TokenSource`](crate::TokenSource) for network errors, timeouts
    /// and overloaded servers.
    pub fn transient(source: impl Into<BoxError>) -> Self {
        Self::from_boxed(source.into(), false)
    }

    /// A failure of a token source that will not go away by itself: the credentials are
    /// revoked, the client is unknown, the configuration is wrong.
    pub fn terminal(source: impl Into<BoxError>) -> Self {
        Self::from_boxed(source.into(), true)
    }

    /// Wraps an error of a user's token source, keeping it as it is when it already is an
    /// [`Error`].
    pub(crate) fn from_boxed(source: BoxError, terminal: bool) -> Self {
        match source.downcast::<Error>() {
            Ok(err) => *err,
            Err(source) => Self::new(Kind::Source, terminal).with(|e| e.source = Some(source)),
        }
    }

    /// The token endpoint answered with a non-success status.
    ///
    /// `code`, `description` and `uri` come from an RFC 6749 §5.2 error body when there was
    /// one. Whether the failure is terminal follows from the error code and the status.
    pub(crate) fn endpoint(
        status: StatusCode,
        code: Option<String>,
        description: Option<String>,
        uri: Option<String>,
    ) -> Self {
        let terminal = match code.as_deref() {
            Some(
                "invalid_grant"
                | "invalid_client"
                | "unauthorized_client"
                | "unsupported_grant_type"
                | "invalid_scope"
                | "invalid_request"
                | "access_denied",
            ) => true,
            Some("temporarily_unavailable" | "server_error" | "slow_down") => false,
            _ => is_terminal_status(status),
        };
        let oauth = code.map(|code| OAuthError {
            code: sanitize(&code),
            description: description.as_deref().map(sanitize),
            uri: uri.as_deref().map(sanitize),
        });
        Self::new(Kind::Endpoint, terminal).with(|e| {
            e.status = Some(status);
            e.oauth = oauth;
        })
    }

    /// The token endpoint's answer is not a usable token response.
    ///
    /// `field` names the offending field, if one is to blame; `message` says what is wrong
    /// in a few words. The caller must make sure that `excerpt` holds no secret.
    pub(crate) fn invalid_response(
        status: StatusCode,
        field: Option<&'static str>,
        message: &'static str,
    ) -> Self {
        Self::new(
            Kind::InvalidResponse,
            is_terminal_status(status) && !status.is_success(),
        )
        .with(|e| {
            e.status = Some(status);
            e.field = field;
            e.message = Some(message);
        })
    }

    /// Adds a short excerpt of what the server sent. The text is cut and cleaned here; the
    /// caller decides whether it may be shown at all.
    pub(crate) fn with_excerpt(self, text: &str) -> Self {
        let excerpt = sanitize(text);
        self.with(|e| e.excerpt = Some(excerpt))
    }

    /// Adds the wait the token endpoint asked for with `Retry-After`.
    pub(crate) fn with_retry_after(self, wait: Duration) -> Self {
        self.with(|e| e.retry_after = Some(wait))
    }

    /// Adds the underlying error.
    pub(crate) fn with_source(self, source: impl Into<BoxError>) -> Self {
        let source = source.into();
        self.with(|e| e.source = Some(source))
    }

    /// The token endpoint could not be reached.
    pub(crate) fn transport(source: impl Into<BoxError>) -> Self {
        Self::new(Kind::Transport, false).with_source(source)
    }

    /// The refresh did not finish within the refresh timeout.
    pub(crate) fn timeout() -> Self {
        Self::new(Kind::Timeout, false)
    }

    /// The token cannot be used; `message` says why.
    pub(crate) fn invalid_token(message: &'static str) -> Self {
        Self::new(Kind::InvalidToken, true).with(|e| e.message = Some(message))
    }

    /// The configuration is unusable; `message` says why.
    pub(crate) fn config(message: &'static str) -> Self {
        Self::new(Kind::Config, true).with(|e| e.message = Some(message))
    }

    /// The token file cannot be used; `message` says why in a few words and never quotes the
    /// file, `source` names the file.
    pub(crate) fn file(message: &'static str, terminal: bool, source: impl Into<BoxError>) -> Self {
        Self::new(Kind::File, terminal)
            .with(|e| e.message = Some(message))
            .with_source(source)
    }

    /// The refresh task ended without delivering an outcome.
    pub(crate) fn aborted() -> Self {
        Self::new(Kind::Aborted, false)
    }

    /// Returns true when trying again will not help without a change of credentials or
    /// configuration: `invalid_grant`, `invalid_client`, an unsupported token type, a refused
    /// configuration.
    pub fn is_terminal(&self) -> bool {
        self.inner.terminal
    }

    /// Returns true when trying again later may help: timeouts, connection errors, 5xx and 429
    /// answers.
    pub fn is_transient(&self) -> bool {
        !self.inner.terminal
    }

    /// Returns true when the token endpoint answered with an error status.
    pub fn is_endpoint(&self) -> bool {
        self.inner.kind == Kind::Endpoint
    }

    /// Returns true when the token endpoint's answer could not be understood.
    pub fn is_invalid_response(&self) -> bool {
        self.inner.kind == Kind::InvalidResponse
    }

    /// Returns true when the token endpoint could not be reached.
    pub fn is_transport(&self) -> bool {
        self.inner.kind == Kind::Transport
    }

    /// Returns true when the refresh did not finish within the refresh timeout.
    pub fn is_timeout(&self) -> bool {
        self.inner.kind == Kind::Timeout
    }

    /// Returns true when a token was obtained but cannot be used.
    pub fn is_invalid_token(&self) -> bool {
        self.inner.kind == Kind::InvalidToken
    }

    /// Returns true when the configuration was refused.
    pub fn is_config(&self) -> bool {
        self.inner.kind == Kind::Config
    }

    /// Returns true when a user's token source failed; [`std::error::Error::source`] has its
    /// error.
    pub fn is_source(&self) -> bool {
        self.inner.kind == Kind::Source
    }

    /// Returns true when the token file could not be read or holds no usable token;
    /// [`std::error::Error::source`] names the file.
    pub fn is_file(&self) -> bool {
        self.inner.kind == Kind::File
    }

    /// Returns true when the refresh task ended without an outcome.
    pub fn is_aborted(&self) -> bool {
        self.inner.kind == Kind::Aborted
    }

    /// The HTTP status of the token endpoint's answer, if one arrived.
    pub fn status(&self) -> Option<StatusCode> {
        self.inner.status
    }

    /// The RFC 6749 `error` code of the token endpoint's answer, such as `invalid_grant`.
    pub fn oauth_error(&self) -> Option<&str> {
        self.inner.oauth.as_ref().map(|o| o.code.as_str())
    }

    /// The `error_description` of the token endpoint's answer.
    pub fn error_description(&self) -> Option<&str> {
        self.inner.oauth.as_ref()?.description.as_deref()
    }

    /// The `error_uri` of the token endpoint's answer.
    pub fn error_uri(&self) -> Option<&str> {
        self.inner.oauth.as_ref()?.uri.as_deref()
    }

    /// How long the token endpoint asked callers to wait, with `Retry-After` on an error
    /// answer (a 429 or 503, usually). The layer waits at least this long before its next
    /// refresh, up to its longest failure back-off (30 s by default).
    pub fn retry_after(&self) -> Option<Duration> {
        self.inner.retry_after
    }

    /// The field of the token response that was missing or malformed.
    pub fn field(&self) -> Option<&str> {
        self.inner.field
    }

    /// A short, cleaned excerpt of a body that was not a token response, such as the start of
    /// an HTML error page. Never present when the body may have held a token.
    pub fn excerpt(&self) -> Option<&str> {
        self.inner.excerpt.as_deref()
    }
}

fn is_terminal_status(status: StatusCode) -> bool {
    !(status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT)
}

/// Cuts `text` to a short single line of printable characters.
fn sanitize(text: &str) -> String {
    let mut out = String::new();
    for (count, ch) in text.trim().chars().enumerate() {
        if count == EXCERPT_LIMIT {
            out.push('…');
            break;
        }
        out.push(if ch.is_control() { ' ' } else { ch });
    }
    out
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &*self.inner;
        match inner.kind {
            Kind::Endpoint => f.write_str("token endpoint refused the request")?,
            Kind::InvalidResponse => f.write_str("token endpoint sent an unusable response")?,
            Kind::Transport => f.write_str("token endpoint could not be reached")?,
            Kind::Timeout => f.write_str("token refresh timed out")?,
            Kind::InvalidToken => f.write_str("token cannot be used")?,
            Kind::Config => f.write_str("invalid configuration")?,
            Kind::Source => f.write_str("token source failed")?,
            Kind::File => f.write_str("token file cannot be used")?,
            Kind::Aborted => f.write_str("token refresh ended without a result")?,
        }
        if let Some(status) = inner.status {
            write!(f, " (status {})", status.as_u16())?;
        }
        if let Some(message) = inner.message {
            write!(f, ": {message}")?;
        }
        if let Some(field) = inner.field {
            write!(f, " (field `{field}`)")?;
        }
        if let Some(oauth) = &inner.oauth {
            write!(f, ": {}", oauth.code)?;
            if let Some(description) = &oauth.description {
                write!(f, " ({description})")?;
            }
        }
        if let Some(excerpt) = &inner.excerpt {
            write!(f, "; body starts with {excerpt:?}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &*self.inner;
        let mut d = f.debug_struct("Error");
        d.field("kind", &inner.kind)
            .field("terminal", &inner.terminal);
        if let Some(status) = inner.status {
            d.field("status", &status);
        }
        if let Some(oauth) = &inner.oauth {
            d.field("oauth", oauth);
        }
        if let Some(field) = inner.field {
            d.field("field", &field);
        }
        if let Some(message) = inner.message {
            d.field("message", &message);
        }
        if let Some(excerpt) = &inner.excerpt {
            d.field("excerpt", excerpt);
        }
        if let Some(retry_after) = inner.retry_after {
            d.field("retry_after", &retry_after);
        }
        if let Some(source) = &inner.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_ref()
            .map(|source| &**source as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_grant_is_terminal_and_keeps_its_description() {
        let err = Error::endpoint(
            StatusCode::BAD_REQUEST,
            Some("invalid_grant".into()),
            Some("refresh token expired".into()),
            None,
        );

        assert!(err.is_terminal());
        assert!(err.is_endpoint());
        assert_eq!(err.oauth_error(), Some("invalid_grant"));
        assert_eq!(err.error_description(), Some("refresh token expired"));
        assert_eq!(
            err.to_string(),
            "token endpoint refused the request (status 400): invalid_grant (refresh token expired)"
        );
    }

    #[test]
    fn server_errors_and_throttling_are_transient() {
        for status in [
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::TOO_MANY_REQUESTS,
        ] {
            let err = Error::endpoint(status, None, None, None);
            assert!(err.is_transient(), "{status}");
        }
    }

    #[test]
    fn excerpts_are_cut_and_cleaned() {
        let long = format!("<html>\n{}</html>", "x".repeat(500));

        let err =
            Error::invalid_response(StatusCode::BAD_GATEWAY, None, "not JSON").with_excerpt(&long);

        let excerpt = err.excerpt().unwrap();
        assert!(excerpt.starts_with("<html> xxx"));
        assert_eq!(excerpt.chars().count(), EXCERPT_LIMIT + 1);
        assert!(err.is_transient());
    }

    #[test]
    fn user_errors_keep_their_source_and_our_errors_stay_as_they_are() {
        let io = std::io::Error::other("disk on fire");
        let err = Error::transient(io);
        assert!(err.is_source());
        assert_eq!(
            std::error::Error::source(&err).unwrap().to_string(),
            "disk on fire"
        );

        let ours = Error::terminal(Error::timeout());
        assert!(ours.is_timeout());
        assert!(ours.is_transient());
    }
}
