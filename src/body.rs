//! Request bodies that can be sent a second time (R8).
//!
//! A retry must carry the same bytes as the first attempt, but the first attempt consumes the
//! body. So before the first attempt the layer asks its replay policy for a copy:
//!
//! - Bodies whose type says they are cheap to copy implement [`ReplayBody`]: `Full`, `Empty`,
//!   `String`, and `Either` of two such bodies.
//! - Boxed bodies (`BoxBody`, `UnsyncBoxBody`) that are known to be empty, as a body-less
//!   `GET` is, are rebuilt for free.
//! - Other boxed bodies stream through as they are produced, while the layer keeps a copy of
//!   what was sent, up to [`RefreshLayer::replay_limit`] bytes (64 KiB by default). When a
//!   rejection arrives and the whole body, trailers included, was captured within the limit,
//!   the retry replays it byte for byte. A server may answer before the transport has sent
//!   the body's end (a gRPC server refusing a token does): the layer then waits, up to a
//!   second, for the transport to finish or drop the body, and keeps what the body still
//!   yields at once when it is dropped. When the limit was passed or the body was not
//!   finished, the caller gets the rejection as it is, and the token is still refreshed for
//!   the next call. The copy is dropped as soon as the call is decided.
//! - Any other body type can be replayed by implementing [`ReplayBody`] for it, or by giving
//!   the layer a clone function with [`RefreshLayer::replay_with`].
//!
//! [`RefreshLayer::replay_with`]: crate::RefreshLayer::replay_with
//! [`RefreshLayer::replay_limit`]: crate::RefreshLayer::replay_limit

use std::{
    collections::VecDeque,
    convert::Infallible,
    fmt,
    pin::{pin, Pin},
    sync::{Arc, Mutex, PoisonError},
    task::{ready, Context, Poll, Waker},
};

use bytes::{Buf, Bytes};
use http::{HeaderMap, Request};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{
    combinators::BoxBody, combinators::UnsyncBoxBody, BodyExt, Either, Empty, Full,
};
use pin_project_lite::pin_project;
use tokio::sync::Notify;

use crate::{classify::is_grpc_unauthenticated, state::TokenState};

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

    /// Wraps this body, when no copy could be made, so that `capture` keeps what it yields
    /// while it streams. Only body types that can hold a body of another type can: boxed
    /// bodies. Default: `Err(self)`, the body is sent once.
    fn capture(self, capture: &BodyCapture) -> Result<Self, Self> {
        let _ = capture;
        Err(self)
    }

    /// A body that yields what was captured, for the retry. Default: `None`.
    fn from_captured(captured: CapturedBody) -> Option<Self> {
        let _ = captured;
        None
    }
}

/// Rebuilds a body of type `B` from what was captured of it.
pub type Rebuild<B> = fn(CapturedBody) -> Option<B>;

/// Decides how a request body is copied for a retry.
///
/// The default policy, [`ReplayBodies`], asks the body through [`ReplayBody`]. A closure
/// `Fn(&B) -> Option<B>` is a policy too; see
/// [`RefreshLayer::replay_with`](crate::RefreshLayer::replay_with).
pub trait ReplayPolicy<B> {
    /// Returns a copy of `body` for a retry, or `None` when the request cannot be retried.
    fn replay(&self, body: &B) -> Option<B>;

    /// Wraps a body that could not be copied so that `capture` keeps what it yields, and says
    /// how to rebuild the body from the capture. Default: `Err(body)`, the body is sent once.
    fn capture(&self, body: B, capture: &BodyCapture) -> Result<(B, Rebuild<B>), B> {
        let _ = capture;
        Err(body)
    }
}

/// The default [`ReplayPolicy`]: bodies that implement [`ReplayBody`] say for themselves.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReplayBodies;

impl<B: ReplayBody> ReplayPolicy<B> for ReplayBodies {
    fn replay(&self, body: &B) -> Option<B> {
        body.try_clone()
    }

    fn capture(&self, body: B, capture: &BodyCapture) -> Result<(B, Rebuild<B>), B> {
        body.capture(capture)
            .map(|body| (body, B::from_captured as Rebuild<B>))
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

impl<E> ReplayBody for BoxBody<Bytes, E>
where
    E: 'static,
{
    fn try_clone(&self) -> Option<Self> {
        self.is_end_stream().then(BoxBody::default)
    }

    fn capture(self, capture: &BodyCapture) -> Result<Self, Self> {
        Ok(capture.wrap(self).boxed())
    }

    fn from_captured(captured: CapturedBody) -> Option<Self> {
        Some(captured.map_err(|never| match never {}).boxed())
    }
}

impl<E> ReplayBody for UnsyncBoxBody<Bytes, E>
where
    E: 'static,
{
    fn try_clone(&self) -> Option<Self> {
        self.is_end_stream().then(UnsyncBoxBody::default)
    }

    fn capture(self, capture: &BodyCapture) -> Result<Self, Self> {
        Ok(capture.wrap(self).boxed_unsync())
    }

    fn from_captured(captured: CapturedBody) -> Option<Self> {
        Some(captured.map_err(|never| match never {}).boxed_unsync())
    }
}

/// A copy of a streaming request body, kept while the body is sent, up to a byte limit.
///
/// Made by the layer for a body that cannot be copied up front; [`ReplayBody::capture`] wraps
/// the body with [`BodyCapture::wrap`]. Cloning shares the copy.
#[derive(Clone)]
pub struct BodyCapture {
    shared: Arc<CaptureShared>,
}

struct CaptureShared {
    capture: Mutex<Capture>,
    /// Woken when the capture is decided: complete, or dropped.
    decided: Notify,
}

/// How many frames a dropped body is still asked for, at most, when it is dropped before its
/// end; the byte limit applies as well.
const SALVAGE_FRAMES: usize = 1024;

struct Capture {
    limit: usize,
    len: usize,
    chunks: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    status: CaptureStatus,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CaptureStatus {
    /// Frames are being captured.
    Open,
    /// The whole body was captured.
    Complete,
    /// The body passed the limit, failed, or the call was decided: nothing is kept.
    Dropped,
}

impl BodyCapture {
    /// A capture that keeps at most `limit` bytes of data.
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            shared: Arc::new(CaptureShared {
                capture: Mutex::new(Capture {
                    limit,
                    len: 0,
                    chunks: VecDeque::new(),
                    trailers: None,
                    status: CaptureStatus::Open,
                }),
                decided: Notify::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Capture> {
        self.shared
            .capture
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the capture, and wakes whoever waits for it to be decided if it now is.
    fn update<T>(&self, change: impl FnOnce(&mut Capture) -> T) -> T {
        let (out, decided) = {
            let mut capture = self.lock();
            let was_open = capture.status == CaptureStatus::Open;
            let out = change(&mut capture);
            (out, was_open && capture.status != CaptureStatus::Open)
        };
        if decided {
            self.shared.decided.notify_waiters();
        }
        out
    }

    /// Returns true while frames are still being captured.
    pub(crate) fn is_open(&self) -> bool {
        self.lock().status == CaptureStatus::Open
    }

    /// Completes once the capture is decided: the body ended, failed, passed the limit, or
    /// was dropped.
    pub(crate) async fn decided(self) {
        loop {
            let mut notified = pin!(self.shared.decided.notified());
            notified.as_mut().enable();
            if !self.is_open() {
                return;
            }
            notified.await;
        }
    }

    /// Keeps what a body that the transport drops before its end still yields at once. A
    /// server may answer before the transport has asked for the body's end, as a gRPC server
    /// refusing a token does with a unary call's single message; the body then usually has
    /// nothing more than its end to give. A body that cannot finish at once leaves the
    /// capture incomplete.
    fn salvage<B>(&self, mut body: Pin<&mut B>)
    where
        B: Body<Data = Bytes>,
    {
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..SALVAGE_FRAMES {
            if !self.is_open() {
                return;
            }
            // NOTE: no user code runs while the thread unwinds.
            if std::thread::panicking() {
                break;
            }
            match body.as_mut().poll_frame(&mut cx) {
                Poll::Ready(frame) => self.update(|capture| capture.observe(&frame)),
                Poll::Pending => break,
            }
        }
        self.update(Capture::abandon);
    }

    /// Wraps `body` so that what it yields is kept, as long as it stays within the limit.
    /// The frames pass through unchanged and at once.
    pub fn wrap<B>(&self, body: B) -> CapturingBody<B>
    where
        B: Body<Data = Bytes>,
    {
        if body.is_end_stream() {
            self.update(Capture::finish);
        }
        CapturingBody {
            inner: body,
            capture: self.clone(),
        }
    }

    /// Takes what was captured, if the whole body was; the capture keeps nothing afterwards.
    pub(crate) fn take(&self) -> Option<CapturedBody> {
        self.update(|capture| {
            let complete = capture.status == CaptureStatus::Complete;
            let captured = CapturedBody {
                chunks: std::mem::take(&mut capture.chunks),
                trailers: capture.trailers.take(),
            };
            capture.drop_all();
            complete.then_some(captured)
        })
    }

    /// Drops what was captured and stops capturing: the call is decided.
    pub(crate) fn release(&self) {
        self.update(Capture::drop_all);
    }
}

impl Capture {
    /// Keeps what one poll of the body gave: a frame, its end, or an error.
    fn observe<E>(&mut self, polled: &Option<Result<Frame<Bytes>, E>>) {
        match polled {
            Some(Ok(frame)) => self.record(frame),
            Some(Err(_)) => self.drop_all(),
            None => self.finish(),
        }
    }

    fn record(&mut self, frame: &Frame<Bytes>) {
        if self.status != CaptureStatus::Open {
            return;
        }
        if let Some(chunk) = frame.data_ref() {
            self.len = self.len.saturating_add(chunk.len());
            if self.len > self.limit {
                tracing::trace!(limit = self.limit, "request body passed the replay limit");
                self.drop_all();
                return;
            }
            // NOTE: `Bytes` clones share the buffer: the copy costs no bytes of its own.
            self.chunks.push_back(chunk.clone());
        } else if let Some(trailers) = frame.trailers_ref() {
            // NOTE: trailers are the last frame; a client may not ask for more.
            self.trailers = Some(trailers.clone());
            self.finish();
        }
    }

    fn finish(&mut self) {
        if self.status == CaptureStatus::Open {
            self.status = CaptureStatus::Complete;
        }
    }

    /// An open capture whose body can give no more: what it kept is incomplete.
    fn abandon(&mut self) {
        if self.status == CaptureStatus::Open {
            self.drop_all();
        }
    }

    fn drop_all(&mut self) {
        self.status = CaptureStatus::Dropped;
        self.chunks = VecDeque::new();
        self.trailers = None;
    }
}

impl fmt::Debug for BodyCapture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let capture = self.lock();
        f.debug_struct("BodyCapture")
            .field("limit", &capture.limit)
            .field("len", &capture.len)
            .field("status", &capture.status)
            .finish()
    }
}

pin_project! {
    /// A body that passes its frames through while a [`BodyCapture`] keeps a copy.
    ///
    /// When it is dropped before its end while the copy may still be needed, it keeps what
    /// the body yields at once.
    pub struct CapturingBody<B>
    where
        B: Body<Data = Bytes>,
    {
        #[pin]
        inner: B,
        capture: BodyCapture,
    }

    impl<B> PinnedDrop for CapturingBody<B>
    where
        B: Body<Data = Bytes>,
    {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            this.capture.salvage(this.inner);
        }
    }
}

impl<B> Body for CapturingBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));

        this.capture.update(|capture| capture.observe(&frame));
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            // NOTE: a client may stop polling once the body says it has ended.
            self.capture.update(Capture::finish);
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Body<Data = Bytes>> fmt::Debug for CapturingBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CapturingBody")
            .field("capture", &self.capture)
            .finish_non_exhaustive()
    }
}

pin_project! {
    /// The response body of [`Refresh`](crate::Refresh): the inner service's body, passed
    /// through unchanged.
    ///
    /// For a gRPC response, its trailers are watched: a `grpc-status: 16` (UNAUTHENTICATED)
    /// after a streamed response cannot be retried, since the call already ran, but it marks
    /// the token the call was sent with, so that the next call refreshes first (R7).
    pub struct ResponseBody<B> {
        #[pin]
        inner: B,
        watch: Option<Watch>,
    }
}

/// The token a watched response was answered for.
struct Watch {
    state: Arc<TokenState>,
    generation: u64,
}

impl<B> ResponseBody<B> {
    pub(crate) fn plain(inner: B) -> Self {
        Self { inner, watch: None }
    }

    pub(crate) fn watched(inner: B, state: Arc<TokenState>, generation: u64) -> Self {
        Self {
            inner,
            watch: Some(Watch { state, generation }),
        }
    }

    /// The inner service's body.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: Body> Body for ResponseBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));

        if let Some(Ok(frame)) = &frame {
            if let Some(trailers) = frame.trailers_ref() {
                if let Some(watch) = this.watch.take() {
                    if is_grpc_unauthenticated(trailers) {
                        watch.state.suspect(watch.generation);
                    }
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("watched", &self.watch.is_some())
            .finish_non_exhaustive()
    }
}

/// What a request keeps for its retry: a copy made up front, or a capture of its body.
pub(crate) enum Replay<B> {
    Copy(Request<B>),
    Capture {
        head: Request<()>,
        capture: Held,
        rebuild: Rebuild<B>,
    },
}

/// A capture that is dropped, with what it holds, as soon as the call no longer needs it.
pub(crate) struct Held(BodyCapture);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.release();
    }
}

impl<B> Replay<B> {
    /// A copy of `request` for a retry, when the policy can copy its body up front.
    ///
    /// NOTE: the request is only borrowed, so that the common case moves no request around.
    pub(crate) fn copy<P>(request: &Request<B>, policy: &P) -> Option<Self>
    where
        P: ReplayPolicy<B>,
    {
        let body = policy.replay(request.body())?;
        Some(Replay::Copy(head_of(request).map(|()| body)))
    }

    /// Wraps the body of a request that [`Replay::copy`] could not copy, so that at most
    /// `limit` bytes of it are kept for a retry; nothing is kept when the policy cannot
    /// capture the body.
    pub(crate) fn capture<P>(
        request: Request<B>,
        policy: &P,
        limit: usize,
    ) -> (Request<B>, Option<Self>)
    where
        P: ReplayPolicy<B>,
    {
        if limit == 0 {
            return (request, None);
        }

        let (parts, body) = request.into_parts();
        let capture = BodyCapture::new(limit);
        match policy.capture(body, &capture) {
            Ok((body, rebuild)) => {
                let request = Request::from_parts(parts, body);
                let head = head_of(&request);
                let replay = Replay::Capture {
                    head,
                    capture: Held(capture),
                    rebuild,
                };
                (request, Some(replay))
            }
            Err(body) => (Request::from_parts(parts, body), None),
        }
    }

    /// The capture of a body that the transport may still be sending, or may not have told
    /// its end yet.
    pub(crate) fn undecided(&self) -> Option<BodyCapture> {
        match self {
            Replay::Capture { capture, .. } if capture.0.is_open() => Some(capture.0.clone()),
            _ => None,
        }
    }

    /// The request to send again: the copy, or the captured body if it was captured whole.
    pub(crate) fn into_request(self) -> Option<Request<B>> {
        match self {
            Replay::Copy(request) => Some(request),
            Replay::Capture {
                head,
                capture,
                rebuild,
            } => {
                let body = rebuild(capture.0.take()?)?;
                Some(head.map(|()| body))
            }
        }
    }
}

/// A copy of everything of `request` but its body.
fn head_of<B>(request: &Request<B>) -> Request<()> {
    let mut head = Request::new(());
    *head.method_mut() = request.method().clone();
    *head.uri_mut() = request.uri().clone();
    *head.version_mut() = request.version();
    // NOTE: most requests reach the layer without headers or extensions (the token is added
    // after this copy): the empty ones of `Request::new` are kept rather than cloned.
    if !request.headers().is_empty() {
        *head.headers_mut() = request.headers().clone();
    }
    if !request.extensions().is_empty() {
        *head.extensions_mut() = request.extensions().clone();
    }
    head
}

/// What was captured of a request body: its data and trailers, to be sent again.
pub struct CapturedBody {
    chunks: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for CapturedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(chunk) = self.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        Poll::Ready(
            self.trailers
                .take()
                .map(|trailers| Ok(Frame::trailers(trailers))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let len = self.chunks.iter().map(|chunk| chunk.len() as u64).sum();
        SizeHint::with_exact(len)
    }
}

impl fmt::Debug for CapturedBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CapturedBody")
            .field("chunks", &self.chunks.len())
            .field("trailers", &self.trailers.is_some())
            .finish()
    }
}

#[cfg(feature = "hyper-client")]
impl ReplayBody for hyper::body::Incoming {
    /// A body received from a peer streams once; it is never replayed.
    fn try_clone(&self) -> Option<Self> {
        None
    }
}

/// tonic's request body, as its generated clients send it through a `Channel`: a body that
/// has already ended is rebuilt for free; any other (an encoded unary message, a client
/// stream) streams through while it is captured within
/// [`RefreshLayer::replay_limit`](crate::RefreshLayer::replay_limit), so a call rejected with
/// a trailers-only `grpc-status: 16` is replayed byte for byte.
#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
impl ReplayBody for tonic::body::Body {
    fn try_clone(&self) -> Option<Self> {
        self.is_end_stream().then(tonic::body::Body::empty)
    }

    fn capture(self, capture: &BodyCapture) -> Result<Self, Self> {
        Ok(tonic::body::Body::new(capture.wrap(self)))
    }

    fn from_captured(captured: CapturedBody) -> Option<Self> {
        Some(tonic::body::Body::new(captured))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;

    /// A body of one-byte chunks, every one ready at once, that tells its end only when
    /// polled after the last.
    struct OneByteChunks(usize);

    impl Body for OneByteChunks {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            if self.0 == 0 {
                return Poll::Ready(None);
            }
            self.0 -= 1;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
        }
    }

    #[test]
    fn a_body_dropped_early_is_read_to_its_end_within_the_frame_bound() {
        // 1,023 chunks and their end: 1,024 polls, the bound.
        let capture = BodyCapture::new(64 * 1024);
        drop(capture.wrap(OneByteChunks(SALVAGE_FRAMES - 1)));
        let captured = capture.take().expect("captured whole");
        assert_eq!(captured.chunks.len(), SALVAGE_FRAMES - 1);

        // One chunk more, and the end is past the bound: nothing is kept.
        let capture = BodyCapture::new(64 * 1024);
        drop(capture.wrap(OneByteChunks(SALVAGE_FRAMES)));
        assert!(capture.take().is_none());
    }

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
