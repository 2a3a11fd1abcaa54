//! The refresh-token grant (RFC 6749 §6): trade a refresh token for a new access token, and
//! usually a new refresh token.

use std::{
    fmt,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, Uri};
use http_body::Body;
use http_body_util::Full;
use tower::Service;

use super::{
    config::{EndpointConfig, Grant},
    endpoint::{Endpoint, Exchange},
    request::{form_urlencode, ClientAuth},
    transport,
};
use crate::{BoxError, Error, Token, TokenSource};

/// The grant: the refresh token is sent on each fetch.
const GRANT: Grant = Grant {
    grant_type: "refresh_token",
    per_fetch_params: &["refresh_token"],
    // NOTE: a refresh token may be spent by a request whose answer never arrived; presenting
    // it again would only earn `invalid_grant` and end the chain.
    retry_unanswered: false,
};

/// A token source for the OAuth2 refresh-token grant (RFC 6749 §6).
///
/// It starts from a refresh token (and, if you have one, an access token), and on every
/// fetch presents the refresh token of the token it replaces. A new refresh token in the
/// answer replaces the old one in the same [`Token`]; an answer without one keeps the old
/// one. Subscribe to the layer's tokens ([`RefreshHandle::subscribe`]) to persist each
/// rotated pair.
///
/// Built with [`RefreshTokenGrant::builder`]; see the [module docs](super) for the request
/// it sends, how it reads the answer and when it retries. Cloning is cheap and clones share
/// the transport. `Debug` shows neither the client secret nor a token.
///
/// # One token state per refresh token
///
/// The source keeps no refresh token of its own between fetches: it takes the one of the
/// token that the layer hands it. Give a source to one [`RefreshLayer`](crate::RefreshLayer)
/// and clone the layer; two layers built from one source would each rotate the same refresh
/// token, and a server that allows each refresh token once refuses the second.
///
/// [`RefreshHandle::subscribe`]: crate::RefreshHandle::subscribe
#[derive(Clone)]
pub struct RefreshTokenGrant {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: Endpoint,
    /// The refresh token the source was built with.
    refresh_token: String,
    /// The access token the source was built with, until the first fetch takes it.
    access_token: Mutex<Option<Token>>,
    /// The scopes of that access token, for an answer that names none.
    access_token_scopes: Vec<String>,
    /// The newest refresh token the token endpoint handed out, even in an answer that was
    /// unusable otherwise: the one to present next.
    rotated: Mutex<Option<String>>,
}

impl RefreshTokenGrant {
    /// Starts building a source that trades `refresh_token` at the token endpoint at
    /// `token_url` for tokens, as the client `client_id`.
    ///
    /// Without [`client_secret`](RefreshTokenGrantBuilder::client_secret) the client is a
    /// public one (a mobile, desktop or command-line app). The URL is checked by
    /// [`RefreshTokenGrantBuilder::build`].
    pub fn builder<U>(
        token_url: U,
        client_id: impl Into<String>,
        refresh_token: impl Into<String>,
    ) -> RefreshTokenGrantBuilder
    where
        U: TryInto<Uri>,
        U::Error: Into<BoxError>,
    {
        RefreshTokenGrantBuilder {
            config: EndpointConfig::new(token_url, client_id.into(), None),
            refresh_token: refresh_token.into(),
            access_token: None,
        }
    }

    /// The token endpoint's URL.
    pub fn token_url(&self) -> &Uri {
        self.inner.endpoint.token_url()
    }

    /// The client id.
    pub fn client_id(&self) -> &str {
        &self.inner.endpoint.client_id
    }

    /// The scopes asked for, in the order they are sent; empty when the source asks for none
    /// and so keeps the scopes of the original grant.
    pub fn scopes(&self) -> &[String] {
        &self.inner.endpoint.scopes
    }

    /// Returns true when the source has no client secret and identifies itself by its
    /// `client_id` alone.
    pub fn is_public_client(&self) -> bool {
        !self.inner.endpoint.has_client_secret
    }
}

impl Inner {
    /// The access token the source was built with, once, and only while it has not expired.
    fn take_access_token(&self) -> Option<Token> {
        let token = self
            .access_token
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()?;
        // NOTE: an expired token would only be sent to be rejected; refresh at once instead.
        if token.expires_in() == Some(Duration::ZERO) {
            tracing::debug!("initial access token has expired, refreshing");
            return None;
        }
        Some(token)
    }
}

impl TokenSource for RefreshTokenGrant {
    async fn fetch(&self, previous: Option<&Token>) -> Result<Token, Error> {
        let inner = &*self.inner;
        let rotated = inner.rotated();
        let (presented, previous_scopes) = match previous {
            Some(previous) => (
                rotated
                    .or_else(|| previous.expose_refresh_token().map(str::to_owned))
                    .unwrap_or_else(|| inner.refresh_token.clone()),
                previous.scopes(),
            ),
            None => {
                if let Some(token) = inner.take_access_token() {
                    return Ok(token);
                }
                (
                    rotated.unwrap_or_else(|| inner.refresh_token.clone()),
                    inner.access_token_scopes.as_slice(),
                )
            }
        };
        let refresh_token = presented.as_str();

        let endpoint = &inner.endpoint;
        // NOTE: RFC 6749 §5.1: an answer without `scope` grants what was asked for; a refresh
        // that asks for nothing keeps the scopes of the original grant (§6).
        let scopes_if_omitted = if endpoint.scopes.is_empty() {
            previous_scopes
        } else {
            &endpoint.scopes
        };
        let guard = endpoint
            .guard
            .extended([refresh_token.to_owned(), form_urlencode(refresh_token)]);
        let token = endpoint
            .fetch(Exchange {
                params: &[("refresh_token", refresh_token)],
                guard: &guard,
                scopes_if_omitted,
                rotated: Some(&inner.rotated),
            })
            .await?;

        // NOTE: the rotated pair travels in one token, so that the layer installs both at
        // once and a subscriber sees them together.
        Ok(if token.has_refresh_token() {
            token
        } else {
            token.with_refresh_token(refresh_token)
        })
    }

    fn rotates_credentials(&self) -> bool {
        true
    }
}

impl Inner {
    /// The refresh token the token endpoint handed out last, if it handed one out.
    fn rotated(&self) -> Option<String> {
        self.rotated
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl fmt::Debug for RefreshTokenGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &*self.inner;
        let mut d = f.debug_struct("RefreshTokenGrant");
        inner.endpoint.debug_fields(&mut d);
        d.field("refresh_token", &"[redacted]")
            .finish_non_exhaustive()
    }
}

/// Configures a [`RefreshTokenGrant`] source; made by [`RefreshTokenGrant::builder`].
///
/// ```
/// use std::time::Duration;
/// use tower_token_refresh::{source::oauth2::RefreshTokenGrant, Token};
///
/// // What the application saved from its last run.
/// let (access_token, refresh_token) = ("eyJhbGciOi", "8xLOxBtZp8");
/// let expires_in = Duration::from_secs(600);
///
/// let builder = RefreshTokenGrant::builder(
///     "https://auth.example.com/oauth/token",
///     "desktop-app",
///     refresh_token,
/// )
/// .access_token(Token::new(access_token).with_expires_in(expires_in))
/// .timeout(Duration::from_secs(3));
/// # let _ = builder;
/// ```
#[must_use = "a builder does nothing until `build` is called"]
pub struct RefreshTokenGrantBuilder {
    config: EndpointConfig,
    refresh_token: String,
    access_token: Option<Token>,
}

impl RefreshTokenGrantBuilder {
    /// Authenticates the client with this secret, as a confidential client must (RFC 6749
    /// §6). Default: none, a public client, which sends `client_id` as a form parameter and
    /// no credentials.
    pub fn client_secret(mut self, client_secret: impl Into<String>) -> Self {
        self.config.set_client_secret(client_secret.into());
        self
    }

    /// How the client authenticates itself with its secret; without a
    /// [`client_secret`](Self::client_secret) it has no effect. Default: [`ClientAuth::Basic`].
    pub fn client_auth(mut self, client_auth: ClientAuth) -> Self {
        self.config.set_client_auth(client_auth);
        self
    }

    /// Hands out this access token at the first fetch, without asking the token endpoint, so
    /// that an application that saved its tokens starts where it left off.
    ///
    /// The token's refresh token, if it has one, is replaced by the one given to
    /// [`RefreshTokenGrant::builder`]. An access token that has expired by the first fetch is
    /// skipped, and the first fetch refreshes. Its scopes are the token's scopes until an
    /// answer names others. Default: none; the first fetch refreshes.
    pub fn access_token(mut self, access_token: Token) -> Self {
        self.access_token = Some(access_token);
        self
    }

    /// Asks for a scope; each call adds to the scopes asked for, and a string holding spaces
    /// adds each of its words. RFC 6749 §6 lets a refresh narrow the scopes of the original
    /// grant, not widen them. Default: no `scope` parameter, and the new token keeps the
    /// scopes of the one it replaces.
    ///
    /// A token whose response names no scopes is taken to have the ones asked for.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.config.add_scope(&scope.into());
        self
    }

    /// Asks for several scopes; the same as calling [`scope`](Self::scope) for each.
    /// Default: none.
    pub fn scopes<I>(self, scopes: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        scopes.into_iter().fold(self, Self::scope)
    }

    /// Adds an `audience` parameter, as Auth0 and RFC 8693 servers expect it. Each call adds
    /// one. Default: none.
    pub fn audience(self, audience: impl Into<String>) -> Self {
        self.param("audience", audience)
    }

    /// Adds a `resource` parameter, the resource indicator of RFC 8707. Each call adds one.
    /// Default: none.
    pub fn resource(self, resource: impl Into<String>) -> Self {
        self.param("resource", resource)
    }

    /// Adds any form parameter to the token request, after the ones the source sends itself.
    /// Each call adds one. Default: none.
    ///
    /// [`build`](Self::build) refuses a parameter that would repeat one the source sends:
    /// `grant_type`, `refresh_token` and `client_secret` always, `client_id` for a public
    /// client or with [`ClientAuth::RequestBody`], and `scope` when scopes were asked for.
    pub fn param(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.add_param(name.into(), value.into());
        self
    }

    /// Adds a header to every token request. It replaces a header of the same name that the
    /// request would otherwise carry (`accept`, `content-type`, and with a client secret and
    /// [`ClientAuth::Basic`] `authorization`); several calls with one name send every value.
    /// Default: none.
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.config.add_header(name, value);
        self
    }

    /// Sends token requests through this HTTP client: any tower service from
    /// `http::Request<Full<Bytes>>` to `http::Response` of any body, such as a hyper-util
    /// client with a TLS connector, wrapped in proxies, timeouts or tracing.
    ///
    /// Default: with the `hyper-client` feature, hyper-util's HTTP/1 client, which speaks
    /// plain HTTP only and therefore suits only a token endpoint on a loopback address.
    /// Without the feature, a transport must be given.
    pub fn transport<S, B>(mut self, transport: S) -> Self
    where
        S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        self.config.set_transport(transport::erase(transport));
        self
    }

    /// Gives up on one attempt of a token request after this long, sending and reading the
    /// answer included, with an error for which [`Error::is_timeout`] is true. Default: no
    /// limit of its own.
    ///
    /// Prefer the layer's refresh timeout: the server may already have spent the refresh
    /// token when an attempt is given up, and the answer carrying its successor is then lost.
    /// So an attempt that got no answer is never tried again by this source (it would only
    /// earn `invalid_grant`), while the layer lets a fetch of this source that outlives its
    /// refresh timeout finish and installs its token (see
    /// [`TokenSource::rotates_credentials`](crate::TokenSource::rotates_credentials)).
    ///
    /// See [the module docs](super#transport-timeouts-and-retries) for how this, the retry
    /// budget and the layer's refresh timeout fit together.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config.set_timeout(timeout);
        self
    }

    /// How many attempts one fetch makes at most, the first included, when the token
    /// endpoint fails in a way that may mend itself (connection errors, timeouts, 5xx, 408,
    /// 429). `1` switches retries off. Default: 3.
    ///
    /// Every attempt of a fetch presents the same refresh token. [`build`](Self::build)
    /// refuses `0`.
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.config.set_max_attempts(max_attempts);
        self
    }

    /// A retry starts only if it can start within this long after the fetch began; a
    /// `Retry-After` that asks for a longer wait ends the fetch with the error at once.
    /// Default: 5 seconds, half the layer's default refresh timeout.
    ///
    /// Keep it below the layer's [`refresh_timeout`](crate::RefreshLayer::refresh_timeout),
    /// which ends the whole fetch, retries included, with a plain timeout error.
    pub fn retry_budget(mut self, budget: Duration) -> Self {
        self.config.set_retry_budget(budget);
        self
    }

    /// Allows a plain `http://` token URL to a host that is not a loopback address, which
    /// sends the refresh token, and the client secret if there is one, unencrypted (R10).
    /// Default: `false`.
    ///
    /// A loopback host (`localhost`, `127.0.0.0/8`, `[::1]`) is always allowed.
    pub fn allow_insecure_http(mut self, allow: bool) -> Self {
        self.config.set_allow_insecure_http(allow);
        self
    }

    /// Checks the configuration and builds the source.
    ///
    /// # Errors
    ///
    /// An error for which [`Error::is_config`] is true when the refresh token or the client
    /// id is empty; when the token URL is not an absolute `https` or `http` URL, holds user
    /// info, or is plain `http` to a host that is not a loopback address without
    /// [`allow_insecure_http`](Self::allow_insecure_http); when an extra parameter repeats one
    /// the source sends; when [`max_attempts`](Self::max_attempts) is 0; and when no
    /// transport is given and the default one cannot reach the URL (it speaks no TLS without the `rustls` feature) or is
    /// not compiled in (the `hyper-client` feature is off).
    pub fn build(self) -> Result<RefreshTokenGrant, Error> {
        if self.refresh_token.is_empty() {
            return Err(Error::config("refresh token is empty"));
        }
        let endpoint = self.config.build(&GRANT)?;

        let access_token = self
            .access_token
            .map(|token| token.with_refresh_token(self.refresh_token.clone()));
        let access_token_scopes = access_token
            .as_ref()
            .map(|token| token.scopes().to_vec())
            .unwrap_or_default();

        Ok(RefreshTokenGrant {
            inner: Arc::new(Inner {
                endpoint,
                refresh_token: self.refresh_token,
                access_token: Mutex::new(access_token),
                access_token_scopes,
                rotated: Mutex::new(None),
            }),
        })
    }
}

impl fmt::Debug for RefreshTokenGrantBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("RefreshTokenGrantBuilder");
        self.config.debug_fields(&mut d);
        d.field("refresh_token", &"[redacted]")
            .field(
                "access_token",
                &self.access_token.as_ref().map(|_| "[redacted]"),
            )
            .finish()
    }
}
