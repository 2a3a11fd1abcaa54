//! The fresh-token path allocates nothing of its own: counted with a counting allocator,
//! request for request, against a static header layer doing the same job without a token
//! state. With retries on, the only extra allocation is the copy of the request kept for the
//! retry.
#![allow(unsafe_code)]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    convert::Infallible,
    future::Future,
    pin::pin,
    sync::atomic::{AtomicUsize, Ordering},
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use http::{header::AUTHORIZATION, HeaderValue, Request, Response};
use http_body_util::Full;
use tower::{Layer, Service};
use tower_http::set_header::SetRequestHeaderLayer;
use tower_token_refresh::{source, Error, RefreshLayer, Token};

/// The system allocator, counting allocations.
struct Counted;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counted {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's guarantees for `layout` are passed on as they are.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counted = Counted;

type Body = Full<Bytes>;

fn inner() -> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone {
    tower::service_fn(|_request: Request<Body>| {
        std::future::ready(Ok::<_, Infallible>(Response::new(Body::default())))
    })
}

/// Allocations made by sending `requests` through `service`, request building excluded.
fn allocations_per_request<S, B>(service: &mut S, requests: usize) -> f64
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    let built: Vec<_> = (0..requests)
        .map(|_| {
            Request::get("http://api.example.test/v1/orders")
                .body(Body::default())
                .unwrap()
        })
        .collect();
    let mut cx = Context::from_waker(Waker::noop());

    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for request in built {
        assert!(matches!(service.poll_ready(&mut cx), Poll::Ready(Ok(()))));
        let future = pin!(service.call(request));
        let Poll::Ready(Ok(response)) = future.poll(&mut cx) else {
            panic!("not ready at once");
        };
        drop(response);
    }
    let after = ALLOCATIONS.load(Ordering::Relaxed);
    (after - before) as f64 / requests as f64
}

#[tokio::test]
async fn the_fresh_token_path_allocates_no_more_than_a_static_header() {
    let secret = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ0ZXN0In0.c2lnbmF0dXJl";
    let mut static_header = SetRequestHeaderLayer::overriding(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {secret}")).unwrap(),
    )
    .layer(inner());
    let layer = RefreshLayer::new(source::from_fn(move |_previous| async move {
        Ok::<_, Error>(Token::new(secret).with_expires_in(Duration::from_secs(3600)))
    }));
    layer.handle().refresh().await.unwrap();
    let mut with_retry = layer.layer(inner());
    let mut without_retry = layer.clone().retry(false).layer(inner());

    // Warm up: the first clone of a shared header value makes it shareable once.
    allocations_per_request(&mut static_header, 10);
    allocations_per_request(&mut with_retry, 10);
    allocations_per_request(&mut without_retry, 10);
    let baseline = allocations_per_request(&mut static_header, 1000);
    let no_retry = allocations_per_request(&mut without_retry, 1000);
    let retry = allocations_per_request(&mut with_retry, 1000);

    assert_eq!(no_retry, baseline, "retries off: nothing of its own");
    assert!(
        retry - baseline <= 1.0,
        "retries on: only the copy kept for the retry ({retry} vs {baseline})"
    );
}
