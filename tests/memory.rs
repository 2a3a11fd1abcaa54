//! R8: the copy kept of a streaming request body is bounded by the replay limit, whatever the
//! size of the body. Measured with a counting allocator: the peak of live bytes while a
//! 100 MB body streams through the layer.
#![allow(unsafe_code)]

mod common;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    pin::Pin,
    sync::atomic::{AtomicUsize, Ordering},
    task::{Context, Poll},
    time::Duration,
};

use axum::{extract::Request as AxumRequest, Router};
use bytes::Bytes;
use common::Counting;
use http::Request;
use http_body::Frame;
use http_body_util::{combinators::BoxBody, BodyExt};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tower::{ServiceBuilder, ServiceExt};
use tower_token_refresh::{BoxError, RefreshLayer};

/// The system allocator, counting the bytes that are live and their peak.
struct Counted;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counted {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: the caller's guarantees for `layout` are passed on as they are.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by `System` with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counted = Counted;

/// A body of `chunks` chunks of `size` freshly allocated bytes each.
struct Generated {
    chunks: usize,
    size: usize,
}

impl http_body::Body for Generated {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.chunks == 0 {
            return Poll::Ready(None);
        }
        self.chunks -= 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; self.size])))))
    }
}

/// Uploads 100 MiB through a layer with `limit` as its replay limit, to a loopback server that
/// reads it all; returns the peak of live bytes beyond what was live before.
async fn peak_of_an_upload(limit: usize) -> usize {
    let app = Router::new().fallback(|request: AxumRequest| async move {
        let mut body = request.into_body();
        let mut total = 0usize;
        while let Some(frame) = body.frame().await {
            total += frame.unwrap().into_data().map_or(0, |data| data.len());
        }
        total.to_string()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let tokens = Counting::new();
    let client: Client<_, BoxBody<Bytes, BoxError>> =
        Client::builder(TokioExecutor::new()).build_http();
    let service = ServiceBuilder::new()
        .layer(RefreshLayer::new(tokens.source(None, Duration::ZERO)).replay_limit(limit))
        .service(client);
    let warm_up = Request::post(format!("http://{addr}/"))
        .body(
            Generated {
                chunks: 4,
                size: 64 * 1024,
            }
            .boxed(),
        )
        .unwrap();
    service.clone().oneshot(warm_up).await.unwrap();
    let baseline = LIVE.load(Ordering::Relaxed);
    PEAK.store(baseline, Ordering::Relaxed);

    let upload = Request::post(format!("http://{addr}/"))
        .body(
            Generated {
                chunks: 1600,
                size: 64 * 1024,
            }
            .boxed(),
        )
        .unwrap();
    let response = service.oneshot(upload).await.unwrap();
    let received = response.into_body().collect().await.unwrap().to_bytes();
    let peak = PEAK.load(Ordering::Relaxed) - baseline;
    server.abort();

    assert_eq!(
        received,
        (1600 * 64 * 1024).to_string(),
        "all 100 MiB arrived"
    );
    peak
}

#[tokio::test]
async fn r8_a_100_mb_upload_keeps_no_more_than_the_replay_limit() {
    let limit = 1024 * 1024;

    let without_copy = peak_of_an_upload(0).await;
    let with_copy = peak_of_an_upload(limit).await;

    // The copy shares the chunks the transport sent, so it keeps at most `limit` bytes
    // alive beyond what the transport itself holds at its peak, plus its own bookkeeping.
    assert!(
        with_copy <= without_copy + limit + 256 * 1024,
        "{with_copy} bytes live at the peak with a {limit}-byte limit, \
         {without_copy} without a copy"
    );
}
