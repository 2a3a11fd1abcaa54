//! Where tokens come from.
//!
//! A [`TokenSource`] produces a new token when the layer asks for one. It is handed the
//! previous token, so that a refresh-token grant can use (and rotate) the refresh token that
//! came with it. The layer calls it on a task of its own, at most once at a time per token
//! state (R3, R4): a source needs no locking of its own against concurrent refreshes.
//!
//! Shipped sources:
//!
//! - [`from_fn`]: any async closure, for tokens from a cloud SDK, a vault, a test.
//! - [`Static`]: a fixed token, such as an API key.
//! - [`oauth2::ClientCredentials`]: the OAuth2 client credentials grant (RFC 6749 §4.4).
//! - [`oauth2::RefreshTokenGrant`]: the OAuth2 refresh-token grant (RFC 6749 §6), rotating
//!   refresh tokens.
//! - [`TokenFile`]: a token that another process keeps in a file (Kubernetes projected service
//!   account tokens, sidecars), read again when it changes or is rejected.

use std::{future::Future, pin::Pin, sync::Arc};

use crate::{BoxError, Error, Token};

mod file;
pub mod oauth2;

pub use file::TokenFile;

/// Something that can produce a new token.
///
/// ```
/// use std::time::Duration;
/// use tower_token_refresh::{Error, Token, TokenSource};
///
/// struct Vault;
///
/// impl TokenSource for Vault {
///     async fn fetch(&self, _previous: Option<&Token>) -> Result<Token, Error> {
///         let secret = String::from("from the vault");
///         Ok(Token::new(secret).with_expires_in(Duration::from_secs(300)))
///     }
/// }
/// ```
pub trait TokenSource: Send + Sync + 'static {
    /// Produces a new token. `previous` is the token in service, if there is one; a source
    /// that rotates refresh tokens takes its refresh token from it.
    ///
    /// # Errors
    ///
    /// Return [`Error::terminal`] when trying again cannot help (revoked credentials) and
    /// [`Error::transient`] otherwise. The error reaches every caller waiting for this refresh.
    fn fetch(&self, previous: Option<&Token>) -> impl Future<Output = Result<Token, Error>> + Send;

    /// Returns true when a fetch may use up a credential that only its answer replaces, as a
    /// rotating refresh token does.
    ///
    /// The layer then lets a fetch that outlives the refresh timeout go on, for up to a minute
    /// (or six refresh timeouts, if longer) more: its waiters get the timeout error, no other
    /// refresh starts meanwhile, and a late token is installed, so that the rotated credential
    /// is not lost (R4). Otherwise a fetch is cancelled at the refresh timeout.
    ///
    /// Default: `false`.
    fn rotates_credentials(&self) -> bool {
        false
    }
}

/// A boxed future of a fetch, owned by the refresh task.
pub(crate) type FetchFuture = Pin<Box<dyn Future<Output = Result<Token, Error>> + Send>>;

/// A [`TokenSource`] with its type erased, so that the layer is not generic over it.
pub(crate) trait DynSource: Send + Sync + 'static {
    fn fetch_owned(self: Arc<Self>, previous: Option<Token>) -> FetchFuture;
    fn rotates_credentials(&self) -> bool;
}

impl<T: TokenSource> DynSource for T {
    fn fetch_owned(self: Arc<Self>, previous: Option<Token>) -> FetchFuture {
        Box::pin(async move { self.fetch(previous.as_ref()).await })
    }

    fn rotates_credentials(&self) -> bool {
        <T as TokenSource>::rotates_credentials(self)
    }
}

/// Makes a token source of an async closure, which gets an owned copy of the previous token.
///
/// Errors of any type are accepted; an error that is not an [`Error`] is taken as
/// transient. Return [`Error::terminal`] to say otherwise.
///
/// ```
/// use std::time::Duration;
/// use tower_token_refresh::{source, Token};
///
/// let source = source::from_fn(|_previous: Option<Token>| async {
///     let secret = std::env::var("API_TOKEN")?;
///     Ok::<_, std::env::VarError>(Token::new(secret).with_expires_in(Duration::from_secs(60)))
/// });
/// # let _ = source;
/// ```
pub fn from_fn<F, Fut, E>(f: F) -> FromFn<F>
where
    F: Fn(Option<Token>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Token, E>> + Send + 'static,
    E: Into<BoxError>,
{
    FromFn { f, rotates: false }
}

/// A token source made of a closure; see [`from_fn`].
#[derive(Clone)]
pub struct FromFn<F> {
    f: F,
    rotates: bool,
}

impl<F> FromFn<F> {
    /// Says that a fetch may use up a credential only its answer replaces, such as a rotating
    /// refresh token, so that a fetch outliving the refresh timeout may finish; see
    /// [`TokenSource::rotates_credentials`]. Default: `false`.
    #[must_use]
    pub fn rotates_credentials(mut self, rotates: bool) -> Self {
        self.rotates = rotates;
        self
    }
}

impl<F> std::fmt::Debug for FromFn<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FromFn")
            .field("rotates", &self.rotates)
            .finish_non_exhaustive()
    }
}

impl<F, Fut, E> TokenSource for FromFn<F>
where
    F: Fn(Option<Token>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Token, E>> + Send + 'static,
    E: Into<BoxError>,
{
    fn fetch(&self, previous: Option<&Token>) -> impl Future<Output = Result<Token, Error>> + Send {
        let fut = (self.f)(previous.cloned());
        async move {
            fut.await
                .map_err(|err| Error::from_boxed(err.into(), false))
        }
    }

    fn rotates_credentials(&self) -> bool {
        self.rotates
    }
}

/// A token that never changes, such as an API key.
///
/// A rejection of a static token cannot be repaired by refreshing it: the layer asks again,
/// gets the same token, and the retry is rejected too. Switch retries off
/// ([`RefreshLayer::retry`](crate::RefreshLayer::retry)) when you use one.
///
/// ```
/// use tower_token_refresh::{source::Static, RefreshLayer};
///
/// let layer = RefreshLayer::new(Static::new("my-api-key")).retry(false);
/// # let _ = layer;
/// ```
#[derive(Clone, Debug)]
pub struct Static {
    token: Token,
}

impl Static {
    /// A source that always hands out a token with this secret and no expiry.
    pub fn new(secret: impl Into<String>) -> Self {
        Self::from_token(Token::new(secret))
    }

    /// A source that always hands out this token.
    pub fn from_token(token: Token) -> Self {
        Self { token }
    }
}

impl TokenSource for Static {
    async fn fetch(&self, _previous: Option<&Token>) -> Result<Token, Error> {
        Ok(self.token.clone())
    }
}
