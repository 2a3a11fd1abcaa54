//! The services every benchmark compares: the bare inner service and the ways a user could put
//! a token on its requests.
#![allow(dead_code, unreachable_pub)]

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{ready, Context, Poll},
    time::Duration,
};

use arc_swap::ArcSwap;

use bytes::Bytes;
use http::{header::AUTHORIZATION, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{
    filter::{AsyncFilter, AsyncFilterLayer},
    BoxError, Layer, Service,
};
use tower_http::set_header::SetRequestHeaderLayer;
use tower_token_refresh::{source, Error, RefreshLayer, Token};

pub type Body = Full<Bytes>;

/// A realistic bearer token: a short JWT.
pub const SECRET: &str =
    "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJiZW5jaCJ9.c2lnbmF0dXJlLW9mLWEtcmVhbGlzdGljLWxlbmd0aA";

pub fn bearer() -> HeaderValue {
    HeaderValue::from_str(&format!("Bearer {SECRET}")).unwrap()
}

pub fn request() -> Request<Body> {
    Request::get("http://api.example.test/v1/orders")
        .body(Body::default())
        .unwrap()
}

/// One request through `service`, start to finish, without a runtime: `poll_ready`, `call`
/// and the response future, with a no-op waker. The inner service must answer at once.
pub fn drive<S, B>(service: &mut S, request: Request<Body>) -> Response<B>
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match service.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        _ => panic!("inner service not ready"),
    }
    let future = std::pin::pin!(service.call(request));
    match future.poll(&mut cx) {
        Poll::Ready(Ok(response)) => response,
        _ => panic!("response not ready at once"),
    }
}

/// A layer that clones one shared `Arc` per call and inserts a fixed header: the floor for any
/// layer with shared state.
#[derive(Clone)]
pub struct ArcFloor<S> {
    inner: S,
    shared: Arc<HeaderValue>,
}

impl<S> Service<Request<Body>> for ArcFloor<S>
where
    S: Service<Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> S::Future {
        let shared = Arc::clone(&self.shared);
        request
            .headers_mut()
            .insert(AUTHORIZATION, (*shared).clone());
        self.inner.call(request)
    }
}

/// The least that any layer which keeps to the contract does per call, written by hand: one
/// lock-free load of the token, one clock read against its expiry, the header, one shared
/// `Arc` for the response future so that it can report a rejection, and a look at the
/// response's status. With `copy`, it also keeps a copy of the request for a retry, as R8
/// needs. It refreshes nothing, waits for nothing and retries nothing.
#[derive(Clone)]
pub struct LockFreeFloor<S> {
    inner: S,
    shared: Arc<FloorShared>,
    copy: bool,
}

pub struct FloorShared {
    token: ArcSwap<(HeaderValue, Instant)>,
    rejected: AtomicBool,
}

impl<S> Service<Request<Body>> for LockFreeFloor<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = FloorFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let token = self.shared.token.load();
        // A layer would wait for a new token here; the bench never gets there.
        assert!(Instant::now() < token.1, "the bench's token expired");
        request.headers_mut().insert(AUTHORIZATION, token.0.clone());
        let copy = self.copy.then(|| copy_of(&request));
        FloorFuture {
            inner: self.inner.call(request),
            shared: Arc::clone(&self.shared),
            copy,
        }
    }
}

/// A copy of everything `request` carries, for a retry.
fn copy_of(request: &Request<Body>) -> Request<Body> {
    let mut copy = Request::new(request.body().clone());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    *copy.extensions_mut() = request.extensions().clone();
    copy
}

pin_project! {
    pub struct FloorFuture<F> {
        #[pin]
        inner: F,
        shared: Arc<FloorShared>,
        copy: Option<Request<Body>>,
    }
}

impl<F, E> Future for FloorFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        if response.status() == StatusCode::UNAUTHORIZED {
            this.shared.rejected.store(true, Ordering::Relaxed);
        }
        this.copy.take();
        Poll::Ready(Ok(response))
    }
}

pub fn lockfree_floor<S>(inner: S, copy: bool) -> LockFreeFloor<S> {
    LockFreeFloor {
        inner,
        shared: Arc::new(FloorShared {
            token: ArcSwap::from_pointee((bearer(), Instant::now() + Duration::from_secs(3600))),
            rejected: AtomicBool::new(false),
        }),
        copy,
    }
}

/// The common hand-rolled alternative: a token behind `tokio::sync::Mutex`, checked on every
/// request through `AsyncFilterLayer`.
#[derive(Clone)]
pub struct MutexCheck {
    token: Arc<tokio::sync::Mutex<(HeaderValue, Instant)>>,
}

type CheckFuture = Pin<Box<dyn Future<Output = Result<Request<Body>, BoxError>> + Send>>;

impl tower::filter::AsyncPredicate<Request<Body>> for MutexCheck {
    type Future = CheckFuture;
    type Request = Request<Body>;

    fn check(&mut self, mut request: Request<Body>) -> CheckFuture {
        let token = Arc::clone(&self.token);
        Box::pin(async move {
            let guard = token.lock().await;
            if Instant::now() >= guard.1 {
                return Err("token expired".into());
            }
            request.headers_mut().insert(AUTHORIZATION, guard.0.clone());
            Ok(request)
        })
    }
}

/// Receives the contenders of the single-request benchmarks, one by one, by name.
pub trait Contenders {
    fn contender<S, B>(&mut self, name: &str, service: S)
    where
        S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send,
        S::Error: std::fmt::Debug,
        B: Send + 'static;
}

/// Hands every contender of `overhead` and `contention` to `to`, each around
/// [`ready_service`]; `layer` is the layer under test, with a fresh token.
pub fn each_contender(layer: &RefreshLayer, to: &mut impl Contenders) {
    to.contender("bare", ready_service());
    to.contender("static_header", static_header(ready_service()));
    to.contender("arc_floor", arc_floor(ready_service()));
    to.contender("mutex_layer", mutex_layer(ready_service()));
    to.contender("lockfree_floor", lockfree_floor(ready_service(), false));
    to.contender("lockfree_floor_copy", lockfree_floor(ready_service(), true));
    to.contender("refresh_layer", layer.clone().layer(ready_service()));
    to.contender(
        "refresh_layer_no_retry",
        layer.clone().retry(false).layer(ready_service()),
    );
}

/// The layer under test, with a fresh token installed.
pub async fn refresh_layer() -> RefreshLayer {
    let layer = RefreshLayer::new(source::from_fn(|_previous| async {
        Ok::<_, Error>(Token::new(SECRET).with_expires_in(Duration::from_secs(3600)))
    }));
    layer.handle().refresh().await.unwrap();
    layer
}

pub fn static_header<S>(inner: S) -> tower_http::set_header::SetRequestHeader<S, HeaderValue> {
    SetRequestHeaderLayer::overriding(AUTHORIZATION, bearer()).layer(inner)
}

pub fn arc_floor<S>(inner: S) -> ArcFloor<S> {
    ArcFloor {
        inner,
        shared: Arc::new(bearer()),
    }
}

pub fn mutex_layer<S>(inner: S) -> AsyncFilter<S, MutexCheck> {
    let check = MutexCheck {
        token: Arc::new(tokio::sync::Mutex::new((
            bearer(),
            Instant::now() + Duration::from_secs(3600),
        ))),
    };
    AsyncFilterLayer::new(check).layer(inner)
}

/// A ready service that answers 200 at once.
pub fn ready_service() -> impl Service<
    Request<Body>,
    Response = Response<Body>,
    Error = Infallible,
    Future = std::future::Ready<Result<Response<Body>, Infallible>>,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(|_request: Request<Body>| {
        std::future::ready(Ok::<_, Infallible>(Response::new(Body::default())))
    })
}
