//! The services every benchmark compares: the bare inner service and the ways a user could put
//! a token on its requests.
#![allow(dead_code, unreachable_pub)]

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{header::AUTHORIZATION, HeaderValue, Request, Response};
use http_body_util::Full;
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
