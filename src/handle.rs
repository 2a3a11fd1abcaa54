//! [`RefreshHandle`]: look at and steer the token state from outside the request path.

use std::{
    fmt,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use tokio::{sync::broadcast, time::Instant};

use crate::{
    state::{Installed, TokenState},
    Error, Token,
};

/// A handle to the token state that a layer and all its clones share (R11, R12).
///
/// ```
/// use tower_token_refresh::{source::Static, RefreshLayer};
///
/// let layer = RefreshLayer::new(Static::new("key"));
/// let handle = layer.handle();
///
/// let stats = handle.stats();
/// assert_eq!(stats.refreshes, 0);
/// assert!(handle.token_info().is_none(), "no token until the first request");
/// ```
#[derive(Clone)]
pub struct RefreshHandle {
    state: Arc<TokenState>,
}

/// A snapshot of the layer's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Refreshes started.
    pub refreshes: u64,
    /// Refreshes that failed.
    pub failures: u64,
    /// Callers that joined a refresh already in progress instead of starting one.
    pub coalesced: u64,
    /// Requests retried after their token was rejected.
    pub retries: u64,
    /// Responses that rejected the token.
    pub rejections: u64,
    /// Rejections returned to the caller: the retry was rejected too, or the request could
    /// not be retried.
    pub passed_through: u64,
}

/// What is known about the token in service, without its secret.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TokenInfo {
    /// Counts installed tokens: 1 for the first, one more for each refresh.
    pub generation: u64,
    /// When the token expires, if known.
    pub expires_at: Option<Instant>,
    /// The token type the token endpoint named.
    pub token_type: Option<String>,
    /// The scopes granted.
    pub scopes: Vec<String>,
    /// Whether a refresh token came with the token.
    pub has_refresh_token: bool,
    /// Whether the token was invalidated and will be replaced before its next use.
    pub invalidated: bool,
}

impl TokenInfo {
    fn of(installed: &Installed) -> Self {
        let token = &installed.token;
        Self {
            generation: installed.generation,
            expires_at: token.expires_at(),
            token_type: token.token_type().map(str::to_owned),
            scopes: token.scopes().to_vec(),
            has_refresh_token: token.has_refresh_token(),
            invalidated: installed.is_invalidated(),
        }
    }

    /// The time left until expiry, if known; zero once expired.
    pub fn expires_in(&self) -> Option<Duration> {
        self.expires_at
            .map(|at| at.saturating_duration_since(Instant::now()))
    }
}

impl RefreshHandle {
    pub(crate) fn new(state: Arc<TokenState>) -> Self {
        Self { state }
    }

    /// The counters, read without locking.
    pub fn stats(&self) -> Stats {
        let counters = &self.state.counters;
        let read = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        Stats {
            refreshes: read(&counters.refreshes),
            failures: read(&counters.failures),
            coalesced: read(&counters.coalesced),
            retries: read(&counters.retries),
            rejections: read(&counters.rejections),
            passed_through: read(&counters.passed_through),
        }
    }

    /// Metadata of the token in service; `None` before the first token.
    pub fn token_info(&self) -> Option<TokenInfo> {
        self.state
            .installed()
            .map(|installed| TokenInfo::of(&installed))
    }

    /// The token in service, secret included; `None` before the first token.
    pub fn current_token(&self) -> Option<Token> {
        self.state
            .installed()
            .map(|installed| installed.token.clone())
    }

    /// Marks the token in service as unusable: the next request waits for a new one.
    pub fn invalidate(&self) {
        self.state.invalidate();
    }

    /// Gets a new token now, joining a refresh in progress if there is one, and ignoring the
    /// back-off after a failure.
    ///
    /// # Errors
    ///
    /// The error of the refresh; a timeout error at once while a late refresh of a source
    /// that rotates credentials is still being answered (see
    /// [`TokenSource::rotates_credentials`](crate::TokenSource::rotates_credentials)).
    pub async fn refresh(&self) -> Result<TokenInfo, Error> {
        let installed = Arc::clone(&self.state).force().await?;
        Ok(TokenInfo::of(&installed))
    }

    /// A stream of the tokens installed from now on, e.g. to persist a rotated refresh token.
    pub fn subscribe(&self) -> TokenUpdates {
        TokenUpdates {
            receiver: self.state.subscribe(),
        }
    }
}

impl fmt::Debug for RefreshHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshHandle")
            .field("state", &self.state)
            .finish()
    }
}

/// Newly installed tokens, each once and in the order they were installed; see
/// [`RefreshHandle::subscribe`].
///
/// A subscriber that falls more than 64 tokens behind skips the oldest ones it missed.
pub struct TokenUpdates {
    receiver: broadcast::Receiver<Token>,
}

impl TokenUpdates {
    /// Waits for the next installed token. Returns `None` once the layer and all its
    /// services and handles are gone.
    pub async fn next(&mut self) -> Option<Token> {
        loop {
            match self.receiver.recv().await {
                Ok(token) => return Some(token),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "token subscriber fell behind, skipping tokens");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

impl fmt::Debug for TokenUpdates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenUpdates").finish_non_exhaustive()
    }
}
