//! [`RefreshLayer`] and its options.

use std::{fmt, sync::Arc, time::Duration};

use http::{header::AUTHORIZATION, HeaderMap, HeaderName, StatusCode, Uri};
use tower::Layer;

use crate::{
    body::ReplayBodies, classify::Classifier, handle::RefreshHandle, service::Refresh,
    state::TokenState, Error, TokenSource,
};

/// Applies [`Refresh`] to a service: every request gets the current token, and a request whose
/// token is rejected is retried once with a new one.
///
/// Clones of a layer share one token state (R3): however many services are built from it,
/// at most one refresh runs at a time. Options that concern the token state (timing, header
/// scheme) apply to every clone; the others apply to the layer they are set on and the services
/// built from it afterwards.
///
/// ```no_run
/// use std::time::Duration;
/// use tower::ServiceBuilder;
/// use tower_token_refresh::{source::oauth2::ClientCredentials, RefreshLayer};
///
/// # fn main() -> Result<(), tower_token_refresh::Error> {
/// // An `https` token endpoint needs the `rustls` feature; without it, `build` says so.
/// let source = ClientCredentials::builder(
///     "https://auth.example.com/oauth/token",
///     "my-client",
///     "my-secret",
/// )
/// .scope("orders:read")
/// .build()?;
///
/// let layer = RefreshLayer::new(source).refresh_timeout(Duration::from_secs(5));
/// let handle = layer.handle();
/// # let _ = handle;
/// # Ok(()) }
/// ```
///
/// # Where to place it
///
/// Put it *inside* (after, in `ServiceBuilder` order) retry and redirect layers: a generic
/// retry layer then retries with a fresh token, and a redirect layer sends each hop through
/// this layer, so [`RefreshLayer::only_for_origins`] can keep the token from being forwarded
/// to another host. Put timeouts outside it when a caller's deadline should include the wait
/// for a token, and concurrency limits inside it when a request waiting for a token should
/// not hold a permit.
pub struct RefreshLayer<R = ReplayBodies> {
    pub(crate) common: Arc<Common>,
    pub(crate) replay: R,
}

/// What every service built from one layer shares.
#[derive(Clone)]
pub(crate) struct Common {
    pub(crate) state: Arc<TokenState>,
    pub(crate) header_name: HeaderName,
    pub(crate) retry: bool,
    pub(crate) replace_existing: bool,
    pub(crate) origins: Option<Arc<[Origin]>>,
    pub(crate) classifier: Classifier,
    pub(crate) replay_limit: usize,
}

/// How much of a streaming request body is kept for a retry, unless configured.
const DEFAULT_REPLAY_LIMIT: usize = 64 * 1024;

impl RefreshLayer {
    /// A layer that takes its tokens from `source`.
    ///
    /// Defaults: `Authorization: Bearer <token>`, retry once on rejection, requests that
    /// already carry the header pass through untouched, tokens go to every origin.
    pub fn new<T: TokenSource>(source: T) -> Self {
        Self {
            common: Arc::new(Common {
                state: Arc::new(TokenState::new(Arc::new(source))),
                header_name: AUTHORIZATION,
                retry: true,
                replace_existing: false,
                origins: None,
                classifier: Classifier::default(),
                replay_limit: DEFAULT_REPLAY_LIMIT,
            }),
            replay: ReplayBodies,
        }
    }
}

impl<R> RefreshLayer<R> {
    fn with_common(mut self, f: impl FnOnce(&mut Common)) -> Self {
        f(Arc::make_mut(&mut self.common));
        self
    }

    /// A handle to the shared token state: counters, token metadata, invalidation,
    /// subscription to new tokens (R11, R12).
    pub fn handle(&self) -> RefreshHandle {
        RefreshHandle::new(Arc::clone(&self.common.state))
    }

    /// Whether a request whose token was rejected is retried once with a new token.
    ///
    /// Default: `true`. When `false`, a rejection is returned to the caller, and the token is
    /// still refreshed for the next call.
    #[must_use]
    pub fn retry(self, retry: bool) -> Self {
        self.with_common(|c| c.retry = retry)
    }

    /// Whether the layer replaces a token header that the caller set itself.
    ///
    /// Default: `false`: such a request passes through untouched, and is never refreshed or
    /// retried for.
    #[must_use]
    pub fn replace_existing(self, replace: bool) -> Self {
        self.with_common(|c| c.replace_existing = replace)
    }

    /// Sends the token in the header `name` instead of `Authorization`, e.g. `x-api-key`.
    #[must_use]
    pub fn header_name(self, name: HeaderName) -> Self {
        self.with_common(|c| c.header_name = name)
    }

    /// The scheme written before the token, `Bearer` by default; `None` sends the token
    /// alone. Shared by every clone of this layer; applies to tokens installed afterwards.
    #[must_use]
    pub fn scheme(self, scheme: Option<&str>) -> Self {
        let scheme = scheme.map(str::to_owned);
        self.common
            .state
            .update_settings(|s| s.scheme = scheme.clone());
        self
    }

    /// Sends the token only to these origins (`scheme://host[:port]`); requests to other
    /// origins, and requests whose URI has no origin, pass through without a token.
    ///
    /// Default: every origin.
    ///
    /// # Errors
    ///
    /// When no origin is given, or an origin is not a URI with a scheme and a host, or has a
    /// path other than `/`, a query or a fragment: an origin covers the whole host, and a path
    /// would suggest a restriction that is not made.
    pub fn only_for_origins<I, T>(self, origins: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        let origins = origins
            .into_iter()
            .map(|origin| Origin::parse(origin.as_ref()))
            .collect::<Result<Arc<[_]>, _>>()?;
        if origins.is_empty() {
            return Err(Error::config(
                "no origin given: the token would never be sent",
            ));
        }
        Ok(self.with_common(|c| c.origins = Some(origins)))
    }

    /// Whether `403 Forbidden` counts as a rejection of the token.
    ///
    /// Default: `false`: a 403 says the token is valid but not allowed, and a new token would
    /// not change that.
    #[must_use]
    pub fn refresh_on_forbidden(self, forbidden: bool) -> Self {
        self.with_common(|c| c.classifier.forbidden = forbidden)
    }

    /// Replaces the rule for what counts as a rejection of the token.
    ///
    /// Default: 401 unless the Bearer challenge says `insufficient_scope`, and `grpc-status: 16`
    /// in the response headers.
    #[must_use]
    pub fn rejection_predicate<F>(self, predicate: F) -> Self
    where
        F: Fn(StatusCode, &HeaderMap) -> bool + Send + Sync + 'static,
    {
        let predicate = Arc::new(predicate);
        self.with_common(|c| c.classifier.predicate = Some(predicate))
    }

    /// How long before expiry a token counts as stale: still used, while one background
    /// refresh replaces it. Clamped to half the token's lifetime.
    ///
    /// Default: 120 seconds. Shared by every clone of this layer.
    #[must_use]
    pub fn refresh_ahead(self, ahead: Duration) -> Self {
        self.common
            .state
            .update_settings(|s| s.refresh_ahead = ahead);
        self
    }

    /// Starts each background refresh up to this much earlier than the refresh window says, at
    /// random, so that many processes started together do not all refresh at the same moment.
    /// Kept within the first half of what is left of a token's lifetime.
    ///
    /// Default: zero. Shared by every clone of this layer.
    #[must_use]
    pub fn refresh_jitter(self, jitter: Duration) -> Self {
        self.common
            .state
            .update_settings(|s| s.refresh_jitter = jitter);
        self
    }

    /// How long before expiry a token is no longer sent, to allow for the time a request
    /// takes to arrive and for a server clock that runs ahead. Clamped to a quarter of the
    /// token's lifetime.
    ///
    /// Default: 30 seconds. Shared by every clone of this layer.
    #[must_use]
    pub fn expiry_margin(self, margin: Duration) -> Self {
        self.common
            .state
            .update_settings(|s| s.expiry_margin = margin);
        self
    }

    /// How long one refresh may take; no caller waits longer for a token (R4).
    ///
    /// Default: 10 seconds. Shared by every clone of this layer.
    #[must_use]
    pub fn refresh_timeout(self, timeout: Duration) -> Self {
        self.common
            .state
            .update_settings(|s| s.refresh_timeout = timeout);
        self
    }

    /// After a failed refresh, callers get the same error without a new attempt for this
    /// long, doubled for each failure in a row up to 30 seconds (or `backoff`, if that is
    /// longer), and scaled by a random factor between 0.5 and 1 (R9). A token endpoint's
    /// `Retry-After` lengthens the wait, up to that same longest back-off.
    ///
    /// Default: 1 second. Shared by every clone of this layer.
    #[must_use]
    pub fn failure_backoff(self, backoff: Duration) -> Self {
        self.common.state.update_settings(|s| {
            s.failure_backoff = backoff;
            s.max_failure_backoff = backoff.max(Duration::from_secs(30));
        });
        self
    }

    /// How many bytes of a streaming request body (one that cannot be copied up front, such as
    /// a boxed body) are kept while it is sent, so that a rejected request can be replayed
    /// byte for byte. A body that is longer, or not finished when the rejection arrives, is
    /// not retried: the caller gets the rejection, and the next call gets a new token. `0`
    /// keeps nothing.
    ///
    /// Default: 64 KiB per request in flight, released as soon as the call is decided.
    #[must_use]
    pub fn replay_limit(self, bytes: usize) -> Self {
        self.with_common(|c| c.replay_limit = bytes)
    }

    /// Copies request bodies for retries with `replay` instead of [`ReplayBody`].
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower_token_refresh::{source::Static, RefreshLayer};
    ///
    /// let layer = RefreshLayer::new(Static::new("key"))
    ///     .replay_with(|body: &Full<Bytes>| Some(body.clone()));
    /// # let _ = layer;
    /// ```
    ///
    /// [`ReplayBody`]: crate::ReplayBody
    pub fn replay_with<P>(self, replay: P) -> RefreshLayer<P> {
        RefreshLayer {
            common: self.common,
            replay,
        }
    }
}

impl<R: Clone> Clone for RefreshLayer<R> {
    fn clone(&self) -> Self {
        Self {
            common: Arc::clone(&self.common),
            replay: self.replay.clone(),
        }
    }
}

impl<R> fmt::Debug for RefreshLayer<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshLayer")
            .field("state", &self.common.state)
            .field("header_name", &self.common.header_name)
            .field("retry", &self.common.retry)
            .finish_non_exhaustive()
    }
}

impl<S, R: Clone> Layer<S> for RefreshLayer<R> {
    type Service = Refresh<S, R>;

    fn layer(&self, inner: S) -> Self::Service {
        Refresh::from_parts(inner, (*self.common).clone(), self.replay.clone())
    }
}

/// An origin a token may be sent to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origin {
    fn parse(text: &str) -> Result<Self, Error> {
        let uri: Uri = text
            .parse()
            .map_err(|_| Error::config("origin is not a valid URI"))?;
        let path_and_query = uri.path_and_query().map_or("", |p| p.as_str());
        if !matches!(path_and_query, "" | "/") || text.contains('#') {
            return Err(Error::config(
                "origin has a path or query; tokens are restricted by scheme, host and port only",
            ));
        }
        Self::of(&uri).ok_or(Error::config("origin needs a scheme and a host"))
    }

    /// The origin of a request URI, when it names one.
    fn of(uri: &Uri) -> Option<Self> {
        let scheme = uri.scheme_str()?.to_ascii_lowercase();
        let host = uri.host()?.to_ascii_lowercase();
        let port = uri.port_u16().or(match scheme.as_str() {
            "http" | "ws" => Some(80),
            "https" | "wss" => Some(443),
            _ => None,
        })?;
        Some(Self { scheme, host, port })
    }

    /// Returns true when the request URI belongs to one of `origins`.
    pub(crate) fn allows(origins: &[Origin], uri: &Uri) -> bool {
        Self::of(uri).is_some_and(|origin| origins.contains(&origin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_compare_scheme_host_and_effective_port() {
        let origins = [Origin::parse("https://API.example.com").unwrap()];

        let allowed = |uri: &str| Origin::allows(&origins, &uri.parse().unwrap());

        assert!(allowed("https://api.example.com/v1/orders"));
        assert!(allowed("https://api.example.com:443/"));
        assert!(!allowed("http://api.example.com/"));
        assert!(!allowed("https://api.example.com:8443/"));
        assert!(!allowed("https://api.example.com.evil.test/"));
        assert!(!allowed("/relative/only"));
    }

    #[test]
    fn bad_origins_are_refused() {
        assert!(Origin::parse("not a uri").unwrap_err().is_config());
        assert!(Origin::parse("/path").unwrap_err().is_config());
        assert!(Origin::parse("https://api.example.com/v1?x=1")
            .unwrap_err()
            .is_config());
        assert!(Origin::parse("https://api.example.com/").is_ok());
        let empty: [&str; 0] = [];
        let layer = RefreshLayer::new(crate::source::Static::new("t"));
        assert!(layer.only_for_origins(empty).unwrap_err().is_config());
    }
}
