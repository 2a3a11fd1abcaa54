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
use common::{unauthorized, Chunks, Counting, TestServer};
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

/// A channel body whose first part is ready; the rest waits for the sender.
fn channel_body_with(first: &'static str) -> (mpsc::Sender<Frame<Bytes>>, Streaming) {
    let (sender, body) = channel_body();
    sender
        .try_send(Frame::data(Bytes::from(first)))
        .expect("room for the first part");
    (sender, body)
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

/// What the transport below the layer does with the first attempt's body.
#[derive(Clone, Copy)]
enum Transport {
    /// Reads the first chunk, drops the body and answers.
    DropsAfterFirstChunk,
    /// Reads the first chunk, answers, and drops the body a little later.
    DropsLater,
    /// Reads the first chunk, answers, and keeps the body.
    KeepsTheBody,
}

/// A stand-in for a transport whose server answers 401 before the request body has ended: a
/// request with any token but `token-2` is rejected after one chunk; one with `token-2` is
/// read whole and echoed.
fn early_answering(
    transport: Transport,
) -> impl tower::Service<
    Request<Streaming>,
    Response = http::Response<http_body_util::Full<Bytes>>,
    Error = BoxError,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |request: Request<Streaming>| async move {
        let accepted = request.headers()[http::header::AUTHORIZATION] == "Bearer token-2";
        let mut body = request.into_body();
        if accepted {
            let bytes = body.collect().await?.to_bytes();
            return Ok::<_, BoxError>(http::Response::new(bytes.into()));
        }
        let _first = body.frame().await;
        match transport {
            Transport::DropsAfterFirstChunk => drop(body),
            Transport::DropsLater => {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    drop(body);
                });
            }
            Transport::KeepsTheBody => {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    drop(body);
                });
            }
        }
        let mut response = http::Response::new(Bytes::from("rejected").into());
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        Ok(response)
    })
}

async fn early_answered_call(
    transport: Transport,
    body: Streaming,
) -> (http::Response<String>, tower_token_refresh::Stats, usize) {
    let tokens = Counting::new();
    let layer = RefreshLayer::new(tokens.source(None, Duration::ZERO));
    let handle = layer.handle();
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(early_answering(transport));
    let request = Request::post("http://api.test/upload").body(body).unwrap();

    let response = service.oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let text = String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap();
    (
        http::Response::from_parts(parts, text),
        handle.stats(),
        tokens.calls(),
    )
}

#[tokio::test]
async fn r8_a_body_dropped_before_it_told_its_end_is_finished_and_replayed() {
    let body = Chunks(vec![Bytes::from("the only message")]).boxed();

    let (response, stats, token_calls) =
        early_answered_call(Transport::DropsAfterFirstChunk, body).await;

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.body(), "the only message");
    assert_eq!(stats.retries, 1);
    assert_eq!(stats.passed_through, 0);
    assert_eq!(token_calls, 2);
}

#[tokio::test(start_paused = true)]
async fn r8_a_rejection_waits_for_the_transport_to_let_go_of_the_body() {
    let body = Chunks(vec![Bytes::from("the only message")]).boxed();
    let started = tokio::time::Instant::now();

    let (response, stats, token_calls) = early_answered_call(Transport::DropsLater, body).await;

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.body(), "the only message");
    assert_eq!(stats.retries, 1);
    assert_eq!(token_calls, 2);
    assert!(started.elapsed() < Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn r8_a_body_still_held_by_the_transport_gets_the_rejection_back_after_a_second() {
    let (sender, body) = channel_body_with("first part");
    let started = tokio::time::Instant::now();

    let (response, stats, token_calls) = early_answered_call(Transport::KeepsTheBody, body).await;

    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.body(), "rejected");
    assert_eq!(stats.retries, 0);
    assert_eq!(stats.passed_through, 1);
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    // The refresh for the next call started when the rejection came.
    assert_eq!(token_calls, 2);
    drop(sender);
}

#[tokio::test(start_paused = true)]
async fn r4_a_caller_that_gives_up_while_the_body_is_decided_still_gets_the_token_renewed() {
    let tokens = Counting::new();
    let layer = RefreshLayer::new(tokens.source(None, Duration::ZERO));
    let handle = layer.handle();
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(early_answering(Transport::KeepsTheBody));
    let (sender, body) = channel_body_with("first part");
    let upload = Request::post("http://api.test/upload").body(body).unwrap();

    let gave_up =
        tokio::time::timeout(Duration::from_millis(500), service.clone().oneshot(upload)).await;
    let next = Chunks(vec![Bytes::from("next call")]).boxed();
    let next = Request::post("http://api.test/upload").body(next).unwrap();
    let response = service.oneshot(next).await.unwrap();

    assert!(gave_up.is_err(), "the caller gave up during the wait");
    assert_eq!(response.status(), StatusCode::OK, "sent with token-2");
    assert_eq!(tokens.calls(), 2);
    let stats = handle.stats();
    assert_eq!((stats.rejections, stats.retries), (1, 0));
    drop(sender);
}

#[tokio::test]
async fn r8_a_body_dropped_unfinished_is_not_replayed() {
    let (sender, body) = channel_body_with("first part");

    let (response, stats, token_calls) =
        early_answered_call(Transport::DropsAfterFirstChunk, body).await;

    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.body(), "rejected");
    assert_eq!(stats.retries, 0);
    assert_eq!(stats.passed_through, 1);
    assert_eq!(token_calls, 1);
    drop(sender);
}
