//! Request bodies that can be sent a second time (R8).
//!
//! A retry must carry the same bytes as the first attempt, but the first attempt consumes the
//! body. So before the first attempt the layer asks its replay policy for a copy:
//!
//! - Bodies whose type says they are cheap to copy implement [`ReplayBody`]: `Full`, `Empty`,
//!   `String`, and `Either` of two such bodies.
//! - Boxed bodies (`BoxBody`, `UnsyncBoxBody`) are replayed when they are known to be empty,
//!   as a body-less `GET` is; any other boxed or streaming body is sent once, and when it is
//!   rejected the caller gets the rejection as it is (the token is still refreshed for the
//!   next call).
//! - Any other body type can be replayed by implementing [`ReplayBody`] for it, or by giving
//!   the layer a clone function with [`RefreshLayer::replay_with`].
//!
//! [`RefreshLayer::replay_with`]: crate::RefreshLayer::replay_with

use bytes::Buf;
use http_body::Body;
use http_body_util::{combinators::BoxBody, combinators::UnsyncBoxBody, Either, Empty, Full};

/// A body that may be able to make a copy of itself for a retry.
///
/// Implement it for your own body type when copying it is cheap:
///
/// ```
/// use std::{pin::Pin, task::{Context, Poll}};
/// use bytes::Bytes;
/// use http_body::{Body, Frame};
/// use tower_token_refresh::ReplayBody;
///
/// #[derive(Clone)]
/// struct Json(Bytes);
///
/// impl Body for Json {
///     type Data = Bytes;
///     type Error = std::convert::Infallible;
///
///     fn poll_frame(
///         mut self: Pin<&mut Self>,
///         _cx: &mut Context<'_>,
///     ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
///         let data = std::mem::take(&mut self.0);
///         Poll::Ready((!data.is_empty()).then(|| Ok(Frame::data(data))))
///     }
/// }
///
/// impl ReplayBody for Json {
///     fn try_clone(&self) -> Option<Self> {
///         Some(self.clone())
///     }
/// }
/// ```
pub trait ReplayBody: Body + Sized {
    /// Returns a copy of this body that yields the same frames, or `None` when none can be
    /// made without consuming the body.
    ///
    /// It is called before the body is sent, once per request that may be retried.
    fn try_clone(&self) -> Option<Self>;
}

/// Decides how a request body is copied for a retry.
///
/// The default policy, [`ReplayBodies`], asks the body through [`ReplayBody`]. A closure
/// `Fn(&B) -> Option<B>` is a policy too; see
/// [`RefreshLayer::replay_with`](crate::RefreshLayer::replay_with).
pub trait ReplayPolicy<B> {
    /// Returns a copy of `body` for a retry, or `None` when the request cannot be retried.
    fn replay(&self, body: &B) -> Option<B>;
}

/// The default [`ReplayPolicy`]: bodies that implement [`ReplayBody`] say for themselves.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReplayBodies;

impl<B: ReplayBody> ReplayPolicy<B> for ReplayBodies {
    fn replay(&self, body: &B) -> Option<B> {
        body.try_clone()
    }
}

impl<B, F> ReplayPolicy<B> for F
where
    F: Fn(&B) -> Option<B>,
{
    fn replay(&self, body: &B) -> Option<B> {
        self(body)
    }
}

impl<D: Buf + Clone> ReplayBody for Full<D> {
    fn try_clone(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl<D: Buf> ReplayBody for Empty<D> {
    fn try_clone(&self) -> Option<Self> {
        Some(Empty::new())
    }
}

impl ReplayBody for String {
    fn try_clone(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl<L, R, D> ReplayBody for Either<L, R>
where
    L: ReplayBody<Data = D>,
    R: ReplayBody<Data = D>,
    L::Error: Into<crate::BoxError>,
    R::Error: Into<crate::BoxError>,
    D: Buf,
{
    fn try_clone(&self) -> Option<Self> {
        match self {
            Either::Left(body) => body.try_clone().map(Either::Left),
            Either::Right(body) => body.try_clone().map(Either::Right),
        }
    }
}

impl<D, E> ReplayBody for BoxBody<D, E>
where
    D: Buf + Send + Sync + 'static,
    E: 'static,
{
    fn try_clone(&self) -> Option<Self> {
        self.is_end_stream().then(BoxBody::default)
    }
}

impl<D, E> ReplayBody for UnsyncBoxBody<D, E>
where
    D: Buf + Send + 'static,
    E: 'static,
{
    fn try_clone(&self) -> Option<Self> {
        self.is_end_stream().then(UnsyncBoxBody::default)
    }
}

#[cfg(feature = "hyper-client")]
impl ReplayBody for hyper::body::Incoming {
    /// A body received from a peer streams once; it is never replayed.
    fn try_clone(&self) -> Option<Self> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn full_bodies_replay_byte_identically() {
        let body = Full::new(Bytes::from_static(b"{\"a\":1}"));

        let copy = ReplayBodies.replay(&body).unwrap();

        let original = body.collect().await.unwrap().to_bytes();
        let replayed = copy.collect().await.unwrap().to_bytes();
        assert_eq!(original, replayed);
    }

    #[test]
    fn boxed_bodies_replay_only_when_empty() {
        let empty: BoxBody<Bytes, std::convert::Infallible> = Empty::new().boxed();
        let full: BoxBody<Bytes, std::convert::Infallible> =
            Full::new(Bytes::from_static(b"x")).boxed();
        let unsync: UnsyncBoxBody<Bytes, std::convert::Infallible> =
            Full::new(Bytes::from_static(b"x")).boxed_unsync();

        assert!(ReplayBodies.replay(&empty).is_some());
        assert!(ReplayBodies.replay(&full).is_none());
        assert!(ReplayBodies.replay(&unsync).is_none());
    }

    #[test]
    fn closures_are_policies() {
        let policy = |body: &Full<Bytes>| Some(body.clone());

        assert!(policy.replay(&Full::new(Bytes::new())).is_some());
    }
}
