//! R8: streaming request bodies pass through as they are produced, and a rejected one is
//! replayed byte for byte when it was captured whole within the replay limit.

mod common;

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use axum::{extract::Request as AxumRequest, Router};
use bytes::Bytes;
use common::{unauthorized, Counting, TestServer};
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body::Frame;
use http_body_util::{combinators::BoxBody, BodyExt};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tokio::sync::mpsc;
use tower::{ServiceBuilder, ServiceExt};
use tower_token_refresh::{BoxError, RefreshLayer};

type Streaming = BoxBody<Bytes, BoxError>;

fn streaming_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Streaming> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A body whose frames leave when the test sends them.
struct ChannelBody(mpsc::Receiver<Frame<Bytes>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|frame| frame.map(Ok))
    }
}

fn channel_body() -> (mpsc::Sender<Frame<Bytes>>, Streaming) {
    let (sender, receiver) = mpsc::channel(4);
    (sender, ChannelBody(receiver).boxed())
}

/// An API that accepts only `token-2`.
async fn api() -> TestServer {
    TestServer::start(|request| async move {
        if request.bearer().as_deref() == Some("token-2") {
            common::ok("stored")
        } else {
            unauthorized("invalid_token")
        }
    })
    .await
}

#[tokio::test]
async fn r8_a_streamed_body_is_replayed_byte_for_byte_within_the_limit() {
    let api = api().await;
    let tokens = Counting::new();
    let service = ServiceBuilder::new()
        .layer(RefreshLayer::new(tokens.source(None, Duration::ZERO)))
        .service(streaming_client());
    let (sender, body) = channel_body();
    let request = Request::post(api.url("/upload")).body(body).unwrap();

    let call = tokio::spawn(service.oneshot(request));
    for part in ["first part, ", "second part, ", "last part"] {
        sender.send(Frame::data(Bytes::from(part))).await.unwrap();
    }
    drop(sender);
    let response = call.await.unwrap().unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    let bodies: Vec<_> = api.recorded().iter().map(|r| r.body.clone()).collect();
    assert_eq!(bodies, ["first part, second part, last part"; 2]);
    assert_eq!(tokens.calls(), 2);
}

#[tokio::test]
async fn r8_the_first_byte_leaves_before_the_last_is_produced() {
    let (first_seen, mut first_arrived) = mpsc::channel::<Bytes>(1);
    let app = Router::new().fallback(move |request: AxumRequest| {
        let first_seen = first_seen.clone();
        async move {
            let mut body = request.into_body();
            let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
            first_seen.send(first).await.unwrap();
            while body.frame().await.is_some() {}
            "done"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let tokens = Counting::new();
    let service = ServiceBuilder::new()
        .layer(RefreshLayer::new(tokens.source(None, Duration::ZERO)))
        .service(streaming_client());
    let (sender, body) = channel_body();
    let request = Request::post(format!("http://{addr}/")).body(body).unwrap();

    let call = tokio::spawn(service.oneshot(request));
    sender
        .send(Frame::data(Bytes::from("early")))
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), first_arrived.recv())
        .await
        .expect("the first chunk arrived while the body was still open");
    drop(sender);
    let response = call.await.unwrap().unwrap();

    assert_eq!(first.unwrap(), "early");
    assert_eq!(response.status(), StatusCode::OK);
    server.abort();
}

#[tokio::test]
async fn r8_trailers_are_replayed_too() {
    let seen_trailers = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen_trailers);
    let app = Router::new().fallback(move |request: AxumRequest| {
        let record = Arc::clone(&record);
        async move {
            let token = request.headers().get(http::header::AUTHORIZATION).cloned();
            let collected = request.into_body().collect().await.unwrap();
            let trailers = collected.trailers().cloned();
            let body = collected.to_bytes();
            record.lock().unwrap().push((body, trailers));
            if token == Some(HeaderValue::from_static("Bearer token-2")) {
                (StatusCode::OK, "ok")
            } else {
                (StatusCode::UNAUTHORIZED, "no")
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let tokens = Counting::new();
    let client: Client<_, Streaming> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let service = ServiceBuilder::new()
        .layer(RefreshLayer::new(tokens.source(None, Duration::ZERO)))
        .service(client);
    let (sender, body) = channel_body();
    let request = Request::post(format!("http://{addr}/")).body(body).unwrap();

    let call = tokio::spawn(service.oneshot(request));
    sender
        .send(Frame::data(Bytes::from("payload")))
        .await
        .unwrap();
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from_static("abc123"));
    sender.send(Frame::trailers(trailers)).await.unwrap();
    drop(sender);
    let response = call.await.unwrap().unwrap();

    let seen = seen_trailers.lock().unwrap().clone();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(seen.len(), 2);
    for (body, trailers) in seen {
        assert_eq!(body, "payload");
        assert_eq!(trailers.unwrap()["x-checksum"], "abc123");
    }
    server.abort();
}

#[tokio::test]
async fn r8_a_body_the_server_rejects_before_reading_it_all_is_not_retried() {
    let hits = Arc::new(Mutex::new(0));
    let count = Arc::clone(&hits);
    let app = Router::new().fallback(move |_request: AxumRequest| {
        let count = Arc::clone(&count);
        async move {
            *count.lock().unwrap() += 1;
            // Answers without reading the body.
            (StatusCode::UNAUTHORIZED, "rejected at once")
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let tokens = Counting::new();
    let layer = RefreshLayer::new(tokens.source(None, Duration::ZERO));
    let handle = layer.handle();
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(streaming_client());
    let (sender, body) = channel_body();
    let request = Request::post(format!("http://{addr}/")).body(body).unwrap();

    let call = tokio::spawn(service.oneshot(request));
    sender
        .send(Frame::data(Bytes::from("start")))
        .await
        .unwrap();
    let response = call.await.unwrap().unwrap();
    drop(sender);

    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        *hits.lock().unwrap(),
        1,
        "an unfinished body is not replayed"
    );
    assert_eq!(handle.stats().passed_through, 1);
    server.abort();
}
