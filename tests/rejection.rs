//! R5, R6, R7, R8: what counts as a rejection, and the one retry that follows it.

mod common;

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use common::{body_text, client, get, ok, respond, unauthorized, Counting, TestServer};
use http::{Request, StatusCode};
use http_body::Frame;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tokio::sync::Notify;
use tower::{ServiceBuilder, ServiceExt};
use tower_token_refresh::{BoxError, Challenge, Error, RefreshLayer, Token};

/// An API that accepts only `accepted` and rejects every other token with 401.
async fn api_accepting(accepted: &'static str) -> TestServer {
    TestServer::start(move |request| async move {
        if request.bearer().as_deref() == Some(accepted) {
            ok("welcome")
        } else {
            unauthorized("invalid_token")
        }
    })
    .await
}

#[tokio::test]
async fn f15_invalid_token_refreshes_even_when_locally_fresh() {
    let api = api_accepting("token-2").await;
    let tokens = Counting::new();
    let layer = RefreshLayer::new(tokens.source(Some(Duration::from_secs(3600)), Duration::ZERO));
    let handle = layer.handle();
    let service = ServiceBuilder::new().layer(layer).service(client());

    let response = service.oneshot(get(&api.url("/"))).await.unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    let bearers: Vec<_> = api.recorded().iter().map(|r| r.bearer().unwrap()).collect();
    assert_eq!(bearers, ["token-1", "token-2"], "a refresh, not a resend");
    assert_eq!(tokens.calls(), 2);
    let stats = handle.stats();
    assert_eq!(
        (stats.rejections, stats.retries, stats.refreshes),
        (1, 1, 2)
    );
}

#[tokio::test]
async fn f09_a_401_no_token_can_fix_returns_the_second_response_as_it_is() {
    let attempts = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&attempts);
    let api = TestServer::start(move |_| {
        let attempt = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            respond(
                StatusCode::UNAUTHORIZED,
                &[
                    ("www-authenticate", r#"Bearer error="invalid_token""#),
                    ("x-attempt", &attempt.to_string()),
                ],
                &format!("attempt {attempt}"),
            )
        }
    })
    .await;
    let tokens = Counting::new();
    let layer = RefreshLayer::new(tokens.source(None, Duration::ZERO));
    let handle = layer.handle();
    handle.refresh().await.unwrap();
    let service = ServiceBuilder::new().layer(layer).service(client());

    let response = service.oneshot(get(&api.url("/"))).await.unwrap();

    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.headers()["x-attempt"], "2");
    assert_eq!(
        response.extensions().get::<Challenge>().unwrap().error(),
        Some("invalid_token")
    );
    assert_eq!(body_text(response).await, "attempt 2");
    assert_eq!(tokens.calls(), 2, "one refresh after the first fetch");
    assert_eq!(api.hits(), 2, "one retry");
    assert_eq!(handle.stats().passed_through, 1);
}

#[tokio::test]
async fn f10_missing_scope_is_returned_with_its_challenge_and_no_refresh() {
    for status in [StatusCode::FORBIDDEN, StatusCode::UNAUTHORIZED] {
        let api = TestServer::start(move |_| async move {
            respond(
                status,
                &[(
                    "www-authenticate",
                    r#"Bearer error="insufficient_scope", scope="write""#,
                )],
                "need write",
            )
        })
        .await;
        let tokens = Counting::new();
        let service = ServiceBuilder::new()
            .layer(RefreshLayer::new(tokens.source(None, Duration::ZERO)))
            .service(client());

        let response = service.oneshot(get(&api.url("/"))).await.unwrap();

        assert_eq!(response.status(), status);
        let challenge = response.extensions().get::<Challenge>().unwrap();
        assert_eq!(challenge.error(), Some("insufficient_scope"));
        assert_eq!(challenge.scope(), Some("write"));
        assert_eq!(body_text(response).await, "need write");
        assert_eq!(api.hits(), 1, "no retry");
        assert_eq!(tokens.calls(), 1, "no refresh");
    }
}

#[tokio::test]
async fn r7_forbidden_refreshes_only_when_configured() {
    let api = TestServer::start(|request| async move {
        if request.bearer().as_deref() == Some("token-2") {
            ok("")
        } else {
            respond(StatusCode::FORBIDDEN, &[], "")
        }
    })
    .await;
    let tokens = Counting::new();
    let plain = ServiceBuilder::new()
        .layer(RefreshLayer::new(tokens.source(None, Duration::ZERO)))
        .service(client());
    let forbidding = ServiceBuilder::new()
        .layer(RefreshLayer::new(tokens.source(None, Duration::ZERO)).refresh_on_forbidden(true))
        .service(client());

    let by_default = plain.oneshot(get(&api.url("/"))).await.unwrap();
    let configured = forbidding.oneshot(get(&api.url("/"))).await.unwrap();

    assert_eq!(by_default.status(), StatusCode::FORBIDDEN);
    assert_eq!(configured.status(), StatusCode::OK);
}

#[tokio::test]
async fn r7_grpc_unauthenticated_in_headers_is_a_rejection() {
    let api = TestServer::start(|request| async move {
        if request.bearer().as_deref() == Some("token-2") {
            respond(StatusCode::OK, &[("grpc-status", "0")], "")
        } else {
            respond(
                StatusCode::OK,
                &[("content-type", "application/grpc"), ("grpc-status", "16")],
                "",
            )
        }
    })
    .await;
    let tokens = Counting::new();
    let service = ServiceBuilder::new()
        .layer(RefreshLayer::new(tokens.source(None, Duration::ZERO)))
        .service(client());

    let response = service.oneshot(get(&api.url("/svc/Method"))).await.unwrap();

    assert_eq!(response.headers()["grpc-status"], "0");
    assert_eq!(tokens.calls(), 2);
}

#[tokio::test]
async fn r7_a_predicate_decides_instead() {
    let api = TestServer::start(|request| async move {
        if request.bearer().as_deref() == Some("token-2") {
            ok("")
        } else {
            respond(StatusCode::from_u16(419).unwrap(), &[], "")
        }
    })
    .await;
    let tokens = Counting::new();
    let layer = RefreshLayer::new(tokens.source(None, Duration::ZERO))
        .rejection_predicate(|status, _headers| status.as_u16() == 419);
    let service = ServiceBuilder::new().layer(layer).service(client());

    let response = service.oneshot(get(&api.url("/"))).await.unwrap();

    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn f16_a_post_is_replayed_with_identical_method_uri_headers_and_body() {
    let api = api_accepting("token-2").await;
    let tokens = Counting::new();
    let service = ServiceBuilder::new()
        .layer(RefreshLayer::new(tokens.source(None, Duration::ZERO)))
        .service(client());
    let json = r#"{"order":42,"items":["a","b"],"note":"ünïcode"}"#;
    let request = Request::post(api.url("/orders?dry_run=false"))
        .header("content-type", "application/json")
        .header("x-request-id", "abc-123")
        .body(Full::new(Bytes::from_static(json.as_bytes())))
        .unwrap();

    let response = service.oneshot(request).await.unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    let [first, retry] = <[_; 2]>::try_from(api.recorded()).unwrap();
    assert_eq!(retry.method, http::Method::POST);
    assert_eq!(retry.uri, first.uri);
    assert_eq!(retry.body, Bytes::from_static(json.as_bytes()));
    assert_eq!(retry.body, first.body);
    let without_token = |mut headers: http::HeaderMap| {
        headers.remove(http::header::AUTHORIZATION);
        headers
    };
    assert_eq!(
        without_token(retry.headers.clone()),
        without_token(first.headers)
    );
    assert_eq!(retry.authorizations(), ["Bearer token-2"]);
}

#[tokio::test]
async fn f16_a_streaming_body_too_large_to_replay_gets_the_rejection_back_not_an_empty_retry() {
    let api = api_accepting("token-2").await;
    let tokens = Counting::new();
    let layer = RefreshLayer::new(tokens.source(None, Duration::ZERO)).replay_limit(8);
    let handle = layer.handle();
    let client: Client<_, BoxBody<Bytes, BoxError>> =
        Client::builder(TokioExecutor::new()).build_http();
    let service = ServiceBuilder::new().layer(layer).service(client);
    let chunks = common::Chunks(vec![
        Bytes::from_static(b"part one, "),
        Bytes::from_static(b"part two"),
    ]);
    let request = Request::post(api.url("/upload"))
        .body(chunks.boxed())
        .unwrap();

    let response = service.clone().oneshot(request).await.unwrap();

    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(api.hits(), 1, "no retry without the whole body");
    assert_eq!(api.recorded()[0].body, "part one, part two");
    assert_eq!(handle.stats().passed_through, 1);

    // The token is still refreshed for the next call.
    let next = Request::get(api.url("/")).body(BoxBody::default()).unwrap();
    let response = service.oneshot(next).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(tokens.calls(), 2);
    assert_eq!(api.recorded()[1].bearer().as_deref(), Some("token-2"));
}

#[tokio::test]
async fn f08_late_rejection_of_old_token_retries_without_refresh() {
    let release = Arc::new(Notify::new());
    let held = Arc::clone(&release);
    let api = TestServer::start(move |request| {
        let held = Arc::clone(&held);
        async move {
            if request.bearer().as_deref() == Some("token-2") {
                return ok("welcome");
            }
            if request.uri.path() == "/slow" {
                held.notified().await;
            }
            unauthorized("invalid_token")
        }
    })
    .await;
    let tokens = Counting::new();
    let layer = RefreshLayer::new(tokens.source(None, Duration::ZERO));
    let handle = layer.handle();
    handle.refresh().await.unwrap();
    let service = ServiceBuilder::new().layer(layer).service(client());

    let slow = tokio::spawn(service.clone().oneshot(get(&api.url("/slow"))));
    while api.hits() == 0 {
        tokio::task::yield_now().await;
    }
    let fast = service
        .clone()
        .oneshot(get(&api.url("/fast")))
        .await
        .unwrap();
    release.notify_one();
    let slow = slow.await.unwrap().unwrap();

    assert_eq!(fast.status(), StatusCode::OK);
    assert_eq!(slow.status(), StatusCode::OK);
    assert_eq!(tokens.calls(), 2, "one refresh for two rejections");
    let seen: Vec<_> = api
        .recorded()
        .iter()
        .map(|r| (r.uri.path().to_owned(), r.bearer().unwrap()))
        .collect();
    assert_eq!(
        seen,
        [
            ("/slow".to_owned(), "token-1".to_owned()),
            ("/fast".to_owned(), "token-1".to_owned()),
            ("/fast".to_owned(), "token-2".to_owned()),
            ("/slow".to_owned(), "token-2".to_owned()),
        ]
    );
    assert_eq!(handle.stats().retries, 2);
}

#[tokio::test]
async fn r6_retry_off_returns_the_rejection_and_refreshes_for_the_next_call() {
    let api = api_accepting("token-2").await;
    let tokens = Counting::new();
    let service = ServiceBuilder::new()
        .layer(RefreshLayer::new(tokens.source(None, Duration::ZERO)).retry(false))
        .service(client());

    let first = service.clone().oneshot(get(&api.url("/"))).await.unwrap();
    let second = service.oneshot(get(&api.url("/"))).await.unwrap();

    assert_eq!(first.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(second.status(), StatusCode::OK);
    assert_eq!(api.hits(), 2);
    assert_eq!(tokens.calls(), 2);
}

#[tokio::test]
async fn r6_a_second_layer_in_the_stack_does_not_multiply_retries() {
    let api = TestServer::start(|_| async { unauthorized("invalid_token") }).await;
    let outer_tokens = Counting::new();
    let inner_tokens = Counting::new();
    let service = ServiceBuilder::new()
        .layer(RefreshLayer::new(outer_tokens.source(None, Duration::ZERO)))
        .layer(RefreshLayer::new(inner_tokens.source(None, Duration::ZERO)).replace_existing(true))
        .service(client());

    let response = service.oneshot(get(&api.url("/"))).await.unwrap();

    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    // The inner copy retries the first attempt once and marks its answer as a retry's: the
    // outer copy returns it as it is, and refreshes nothing for it.
    assert_eq!(api.hits(), 2);
    assert_eq!(inner_tokens.calls(), 2);
    assert_eq!(outer_tokens.calls(), 1);
}

#[tokio::test]
async fn r9_a_failed_refresh_after_a_rejection_is_a_typed_error_and_nothing_is_resent() {
    let api = TestServer::start(|_| async { unauthorized("invalid_token") }).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let source = tower_token_refresh::source::from_fn(move |_previous| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                Ok(Token::new("first"))
            } else {
                Err(Error::terminal(std::io::Error::other(
                    "credentials revoked",
                )))
            }
        }
    });
    let service = ServiceBuilder::new()
        .layer(RefreshLayer::new(source))
        .service(client());

    let error = service.oneshot(get(&api.url("/"))).await.unwrap_err();

    let error = error.downcast::<Error>().unwrap();
    assert!(error.is_terminal());
    assert!(error.is_source());
    assert_eq!(
        api.hits(),
        1,
        "the request is not sent again without a new token"
    );
}

/// A gRPC response body: one message, then trailers with `status`.
struct GrpcBody {
    message: Option<Bytes>,
    status: &'static str,
    done: bool,
}

impl http_body::Body for GrpcBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(message) = self.message.take() {
            return Poll::Ready(Some(Ok(Frame::data(message))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static(self.status));
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }
}

#[tokio::test]
async fn f14_unauthenticated_in_trailers_is_not_replayed_but_the_next_call_refreshes() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let inner = tower::service_fn(move |request: Request<Full<Bytes>>| {
        let token = request.headers()[http::header::AUTHORIZATION]
            .to_str()
            .unwrap()
            .to_owned();
        record.lock().unwrap().push(token.clone());
        async move {
            let status = if token == "Bearer token-1" { "16" } else { "0" };
            let body = GrpcBody {
                message: Some(Bytes::from_static(b"\0\0\0\0\x02hi")),
                status,
                done: false,
            };
            let response = http::Response::builder()
                .header("content-type", "application/grpc")
                .body(body)
                .unwrap();
            Ok::<_, BoxError>(response)
        }
    });
    let tokens = Counting::new();
    let layer = RefreshLayer::new(tokens.source(None, Duration::ZERO));
    let handle = layer.handle();
    let service = ServiceBuilder::new().layer(layer).service(inner);

    let streamed = service
        .clone()
        .oneshot(get("http://grpc.test/svc/Stream"))
        .await
        .unwrap();
    let collected = streamed.into_body().collect().await.unwrap();
    let next = service
        .clone()
        .oneshot(get("http://grpc.test/svc/Stream"))
        .await
        .unwrap();
    let next_trailers = next.into_body().collect().await.unwrap();

    assert_eq!(
        collected.trailers().unwrap()["grpc-status"],
        "16",
        "passed on as it is"
    );
    assert_eq!(next_trailers.trailers().unwrap()["grpc-status"], "0");
    assert_eq!(
        *seen.lock().unwrap(),
        ["Bearer token-1", "Bearer token-2"],
        "not replayed; the next call refreshed first"
    );
    assert_eq!(tokens.calls(), 2);
    let stats = handle.stats();
    assert_eq!(
        (stats.rejections, stats.retries, stats.passed_through),
        (1, 0, 1)
    );
}
