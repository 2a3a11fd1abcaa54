//! The token and its metadata.

use std::{fmt, sync::Arc, time::Duration};

use tokio::time::Instant;

/// The longest lifetime a token is taken to have. Larger `expires_in` values are clamped to
/// it, so that no arithmetic on expiry can overflow (R2).
pub const MAX_LIFETIME: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// An access token, with what is known about it.
///
/// The secret is reachable only through [`Token::expose_secret`], and the refresh token only
/// through [`Token::expose_refresh_token`], so that neither is printed by accident: `Debug`
/// shows neither.
///
/// Expiry is an [`Instant`] of tokio's clock (monotonic, and paused in tests with
/// `tokio::time::pause`), never a wall-clock time. Cloning is cheap.
///
/// ```
/// use std::time::Duration;
/// use tower_token_refresh::Token;
///
/// let token = Token::new("s3cr3t")
///     .with_expires_in(Duration::from_secs(3600))
///     .with_scopes(["read", "write"]);
///
/// assert_eq!(token.expose_secret(), "s3cr3t");
/// assert!(!format!("{token:?}").contains("s3cr3t"));
/// ```
#[derive(Clone)]
pub struct Token {
    secret: Arc<str>,
    token_type: Option<Arc<str>>,
    expires_at: Option<Instant>,
    refresh_at: Option<Instant>,
    refresh_token: Option<Arc<str>>,
    scopes: Arc<[String]>,
    extra: Option<Arc<serde_json::Map<String, serde_json::Value>>>,
}

impl Token {
    /// A token with the given secret, of type `Bearer`, whose expiry is unknown.
    ///
    /// A token of unknown expiry is never refreshed ahead of time; it is refreshed when a
    /// server rejects it.
    pub fn new(secret: impl Into<String>) -> Self {
        Self {
            secret: Arc::from(secret.into()),
            token_type: None,
            expires_at: None,
            refresh_at: None,
            refresh_token: None,
            scopes: Arc::new([]),
            extra: None,
        }
    }

    /// Sets the expiry to `lifetime` from now, clamped to [`MAX_LIFETIME`].
    ///
    /// Token sources that ask a server for a token should prefer
    /// [`Token::with_expires_at`], counting from the moment the request was sent.
    #[must_use]
    pub fn with_expires_in(self, lifetime: Duration) -> Self {
        self.with_lifetime_from(Instant::now(), lifetime)
    }

    /// Sets the expiry to `lifetime` after `issued`, clamped to [`MAX_LIFETIME`].
    #[must_use]
    pub fn with_lifetime_from(self, issued: Instant, lifetime: Duration) -> Self {
        let lifetime = lifetime.min(MAX_LIFETIME);
        let expires_at = issued.checked_add(lifetime).unwrap_or(issued);
        self.with_expires_at(expires_at)
    }

    /// Sets the moment the token expires.
    #[must_use]
    pub fn with_expires_at(mut self, expires_at: Instant) -> Self {
        self.expires_at = Some(expires_at);
        self
    }

    /// Asks the layer to replace the token in the background from `refresh_at` on, even if it
    /// expires later or its expiry is unknown. The token stays in service meanwhile.
    ///
    /// Sources whose tokens can change without notice use it to be asked again: a token file
    /// that a sidecar rewrites, say.
    #[must_use]
    pub fn with_refresh_at(mut self, refresh_at: Instant) -> Self {
        self.refresh_at = Some(refresh_at);
        self
    }

    /// Sets the refresh token that came with this token.
    #[must_use]
    pub fn with_refresh_token(mut self, refresh_token: impl Into<String>) -> Self {
        self.refresh_token = Some(Arc::from(refresh_token.into()));
        self
    }

    /// Sets the scopes the token was granted.
    #[must_use]
    pub fn with_scopes<I, T>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.scopes = scopes.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the token type, as the token endpoint named it (`Bearer`, `DPoP`, ...).
    #[must_use]
    pub fn with_token_type(mut self, token_type: impl Into<String>) -> Self {
        self.token_type = Some(Arc::from(token_type.into()));
        self
    }

    /// Sets the fields of the token endpoint's answer that the source did not read itself,
    /// such as an OpenID Connect `id_token` or a vendor's extension.
    #[must_use]
    pub fn with_extra_fields(mut self, fields: serde_json::Map<String, serde_json::Value>) -> Self {
        self.extra = (!fields.is_empty()).then(|| Arc::new(fields));
        self
    }

    /// The fields of the token endpoint's answer that the source did not read itself; `None`
    /// when there were none. Handle with care: they may hold credentials (an `id_token`), and
    /// `Debug` shows only their names.
    pub fn extra_fields(&self) -> Option<&serde_json::Map<String, serde_json::Value>> {
        self.extra.as_deref()
    }

    /// The secret. Handle with care: whatever you print it to can leak it.
    pub fn expose_secret(&self) -> &str {
        &self.secret
    }

    /// The refresh token, if the token endpoint sent one. Handle with care.
    pub fn expose_refresh_token(&self) -> Option<&str> {
        self.refresh_token.as_deref()
    }

    /// Returns true when a refresh token came with this token.
    pub fn has_refresh_token(&self) -> bool {
        self.refresh_token.is_some()
    }

    /// The token type, as the token endpoint named it; `None` when it named none.
    pub fn token_type(&self) -> Option<&str> {
        self.token_type.as_deref()
    }

    /// The moment the token expires, when known.
    pub fn expires_at(&self) -> Option<Instant> {
        self.expires_at
    }

    /// The moment from which the source asked to be asked again, if it did; see
    /// [`Token::with_refresh_at`].
    pub fn refresh_at(&self) -> Option<Instant> {
        self.refresh_at
    }

    /// The time left until expiry: `Some(Duration::ZERO)` for an expired token, `None` when
    /// the expiry is unknown.
    pub fn expires_in(&self) -> Option<Duration> {
        self.expires_at
            .map(|at| at.saturating_duration_since(Instant::now()))
    }

    /// The scopes the token was granted.
    pub fn scopes(&self) -> &[String] {
        &self.scopes
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("secret", &"[redacted]")
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in())
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "[redacted]"),
            )
            .field("scopes", &self.scopes)
            .field(
                "extra_fields",
                &self.extra.as_ref().map(|m| m.keys().collect::<Vec<_>>()),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_secrets() {
        let mut extra = serde_json::Map::new();
        extra.insert("id_token".into(), "id-secret".into());
        let token = Token::new("access-secret")
            .with_refresh_token("refresh-secret")
            .with_token_type("Bearer")
            .with_extra_fields(extra);

        let debug = format!("{token:?}");

        assert!(!debug.contains("access-secret"), "{debug}");
        assert!(!debug.contains("refresh-secret"), "{debug}");
        assert!(!debug.contains("id-secret"), "{debug}");
        assert!(debug.contains("id_token"), "{debug}");
        assert!(debug.contains("[redacted]"));
    }

    #[tokio::test(start_paused = true)]
    async fn absurd_lifetimes_are_clamped_not_overflowed() {
        let token = Token::new("t").with_expires_in(Duration::MAX);

        assert_eq!(token.expires_in(), Some(MAX_LIFETIME));
    }
}
