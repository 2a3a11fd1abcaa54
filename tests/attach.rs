//! R1 and R13: what leaves with each request, and how the layer fits into a tower stack.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{client, get, ok, Counting, TestServer};
use http::{header::AUTHORIZATION, HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::Full;
use tower::{util::BoxCloneService, ServiceBuilder, ServiceExt};
use tower_token_refresh::{source::Static, BoxError, Refresh, RefreshLayer};

#[tokio::test]
async fn r1_every_request_leaves_with_one_bearer_header() {
    let api = TestServer::start(|_| async { ok("hello") }).await;
    let tokens = Counting::new();
    let service = ServiceBuilder::new()
        .layer(RefreshLayer::new(tokens.source(None, Duration::ZERO)))
        .service(client());

    for _ in 0..3 {
        let response = service.clone().oneshot(get(&api.url("/"))).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }

    let seen = api.recorded();
    assert_eq!(seen.len(), 3);
    for request in seen {
        assert_eq!(request.authorizations(), ["Bearer token-1"]);
    }
    assert_eq!(tokens.calls(), 1, "the token is fetched once and reused");
}

#[tokio::test]
async fn r1_the_header_value_is_marked_sensitive() {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let record = std::sync::Arc::clone(&seen);
    let inner = tower::service_fn(move |request: Request<Full<Bytes>>| {
        let value = request.headers().get(AUTHORIZATION).cloned();
        *record.lock().unwrap() = value;
        async { Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::new()))) }
    });
    let service = tower::Layer::layer(&RefreshLayer::new(Static::new("s3cr3t")), inner);

    service.oneshot(get("http://127.0.0.1/")).await.unwrap();

    let value = seen.lock().unwrap().clone().unwrap();
    assert!(value.is_sensitive());
    assert_eq!(value, "Bearer s3cr3t");
    assert!(!format!("{value:?}").contains("s3cr3t"));
}

#[tokio::test]
async fn r1_a_caller_supplied_header_passes_through_untouched() {
    let api = TestServer::start(|_| async { common::unauthorized("invalid_token") }).await;
    let tokens = Counting::new();
    let service = ServiceBuilder::new()
        .layer(RefreshLayer::new(tokens.source(None, Duration::ZERO)))
        .service(client());
    let mut request = get(&api.url("/"));
    request
        .headers_mut()
        .insert(AUTHORIZATION, HeaderValue::from_static("Bearer mine"));

    let response = service.oneshot(request).await.unwrap();

    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(api.hits(), 1, "never retried");
    assert_eq!(api.recorded()[0].authorizations(), ["Bearer mine"]);
    assert_eq!(tokens.calls(), 0, "never refreshed for");
}

#[tokio::test]
async fn r1_replace_existing_replaces_never_appends() {
    let api = TestServer::start(|_| async { ok("") }).await;
    let tokens = Counting::new();
    let service = ServiceBuilder::new()
        .layer(RefreshLayer::new(tokens.source(None, Duration::ZERO)).replace_existing(true))
        .service(client());
    let mut request = get(&api.url("/"));
    request
        .headers_mut()
        .append(AUTHORIZATION, HeaderValue::from_static("Bearer one"));
    request
        .headers_mut()
        .append(AUTHORIZATION, HeaderValue::from_static("Bearer two"));

    service.oneshot(request).await.unwrap();

    assert_eq!(api.recorded()[0].authorizations(), ["Bearer token-1"]);
}

#[tokio::test]
async fn r1_custom_header_and_no_scheme() {
    let api = TestServer::start(|_| async { ok("") }).await;
    let layer = RefreshLayer::new(Static::new("key-123"))
        .header_name(HeaderName::from_static("x-api-key"))
        .scheme(None);
    let service = ServiceBuilder::new().layer(layer).service(client());

    service.oneshot(get(&api.url("/"))).await.unwrap();

    let request = &api.recorded()[0];
    assert_eq!(request.headers["x-api-key"], "key-123");
    assert!(request.authorizations().is_empty());
}

#[tokio::test]
async fn r1_tokens_stay_with_their_origins() {
    let api = TestServer::start(|_| async { ok("") }).await;
    let other = TestServer::start(|_| async { ok("") }).await;
    let layer = RefreshLayer::new(Static::new("s3cr3t"))
        .only_for_origins([api.url("")])
        .unwrap();
    let service = ServiceBuilder::new().layer(layer).service(client());

    service.clone().oneshot(get(&api.url("/a"))).await.unwrap();
    service.oneshot(get(&other.url("/b"))).await.unwrap();

    assert_eq!(api.recorded()[0].authorizations(), ["Bearer s3cr3t"]);
    assert!(other.recorded()[0].authorizations().is_empty());
}

#[tokio::test]
async fn r13_composes_with_timeouts_limits_buffers_and_boxing() {
    let api = TestServer::start(|_| async { ok("") }).await;
    let tokens = Counting::new();
    let service = ServiceBuilder::new()
        .buffer(64)
        .timeout(Duration::from_secs(5))
        .layer(RefreshLayer::new(tokens.source(None, Duration::ZERO)))
        .concurrency_limit(4)
        .service(client());
    let service: BoxCloneService<Request<Full<Bytes>>, _, BoxError> = BoxCloneService::new(service);

    let calls = (0..32).map(|_| service.clone().oneshot(get(&api.url("/"))));
    let responses = futures_join_all(calls).await;

    assert!(responses
        .iter()
        .all(|r| r.as_ref().unwrap().status() == StatusCode::OK));
    assert_eq!(api.hits(), 32);
    assert_eq!(tokens.calls(), 1);
}

#[test]
fn r13_layer_service_and_future_are_send_and_sync_where_it_matters() {
    fn assert_send<T: Send>() {}
    fn assert_sync<T: Sync>() {}
    fn assert_clone<T: Clone>() {}

    type Client = hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >;
    assert_send::<RefreshLayer>();
    assert_sync::<RefreshLayer>();
    assert_clone::<RefreshLayer>();
    assert_send::<Refresh<Client>>();
    assert_sync::<Refresh<Client>>();
    assert_clone::<Refresh<Client>>();
    assert_send::<tower_token_refresh::future::ResponseFuture<Client, Full<Bytes>>>();
    assert_send::<tower_token_refresh::RefreshHandle>();
    assert_sync::<tower_token_refresh::RefreshHandle>();
}

/// Runs futures concurrently on the current task, without a futures dependency.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::new();
    for handle in handles {
        outputs.push(handle.await.unwrap());
    }
    outputs
}
