//! An axum gateway whose handlers call an upstream API through one shared `RefreshLayer`
//! client held in `State`, as `examples/axum_gateway.rs` builds it: what the upstream sees,
//! and how often the token endpoint is asked.

mod common;

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use axum::{
    body::Bytes,
    extract::{DefaultBodyLimit, Path, State},
    http::{header::CONTENT_TYPE, HeaderMap, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use common::{client, respond, unauthorized, Recorded, TestServer};
use http::{header::AUTHORIZATION, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use tokio::{sync::Notify, task::JoinSet};
use tower::{ServiceBuilder, ServiceExt};
use tower_token_refresh::{
    source::oauth2::ClientCredentials, BoxError, Refresh, RefreshHandle, RefreshLayer,
};

const MAX_BODY: usize = 16 * 1024;

/// How many requests meet the first token at once.
const REQUESTS: usize = 30;

// ---------------------------------------------------------------------------------------------
// The gateway, as the example builds it
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Gateway {
    client: Refresh<Client<HttpConnector, Full<Bytes>>>,
    upstream: Arc<str>,
}

fn gateway_router(gateway: Gateway) -> Router {
    Router::new()
        .route(
            "/api/orders",
            get(list_orders)
                .post(create_order)
                .layer(DefaultBodyLimit::max(MAX_BODY)),
        )
        .route("/api/orders/{id}", get(read_order))
        .with_state(gateway)
}

async fn list_orders(State(gateway): State<Gateway>) -> Response {
    let request = gateway.upstream(Method::GET, "/orders");
    gateway.forward(request, Full::default()).await
}

async fn read_order(State(gateway): State<Gateway>, Path(id): Path<u64>) -> Response {
    let request = gateway.upstream(Method::GET, &format!("/orders/{id}"));
    gateway.forward(request, Full::default()).await
}

/// Collects the body (within the limit) so that the layer can send it again.
async fn create_order(State(gateway): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let mut request = gateway.upstream(Method::POST, "/orders");
    if let Some(content_type) = headers.get(CONTENT_TYPE) {
        request = request.header(CONTENT_TYPE, content_type);
    }
    gateway.forward(request, Full::new(body)).await
}

impl Gateway {
    fn upstream(&self, method: Method, path: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.upstream))
    }

    async fn forward(self, request: http::request::Builder, body: Full<Bytes>) -> Response {
        let request = request.body(body).expect("a valid upstream request");

        match self.client.oneshot(request).await {
            Ok(response) => relay(response),
            Err(err) => (StatusCode::BAD_GATEWAY, err.to_string()).into_response(),
        }
    }
}

fn relay<B>(response: http::Response<B>) -> Response
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (parts, body) = response.into_parts();

    let mut relayed = Response::new(axum::body::Body::new(body));
    *relayed.status_mut() = parts.status;
    if let Some(content_type) = parts.headers.get(CONTENT_TYPE) {
        relayed
            .headers_mut()
            .insert(CONTENT_TYPE, content_type.clone());
    }
    relayed
}

// ---------------------------------------------------------------------------------------------
// The peers: a token endpoint and an upstream API on 127.0.0.1, and a caller
// ---------------------------------------------------------------------------------------------

/// The tokens the token endpoint issued and the upstream accepts.
#[derive(Default)]
struct Tokens {
    issued: AtomicUsize,
    valid: Mutex<HashSet<String>>,
}

impl Tokens {
    fn issue(&self) -> String {
        let token = format!("token-{}", self.issued.fetch_add(1, Ordering::SeqCst) + 1);
        self.valid.lock().unwrap().insert(token.clone());
        token
    }

    fn accepts(&self, token: &str) -> bool {
        self.valid.lock().unwrap().contains(token)
    }

    fn revoke_all(&self) {
        self.valid.lock().unwrap().clear();
    }
}

struct Harness {
    tokens: Arc<Tokens>,
    token_endpoint: TestServer,
    upstream: TestServer,
    handle: RefreshHandle,
    gateway: SocketAddr,
    caller: Client<HttpConnector, Full<Bytes>>,
}

impl Harness {
    /// The peers and the gateway; with `hold`, the token endpoint answers each token request
    /// only once `hold` is notified.
    async fn start(hold: Option<Arc<Notify>>) -> Self {
        let tokens = Arc::new(Tokens::default());
        let token_endpoint = TestServer::start({
            let tokens = Arc::clone(&tokens);
            move |_request| {
                let tokens = Arc::clone(&tokens);
                let hold = hold.clone();
                async move {
                    if let Some(hold) = hold {
                        hold.notified().await;
                    }
                    let body = serde_json::json!({
                        "access_token": tokens.issue(),
                        "token_type": "Bearer",
                        "expires_in": 3600,
                    });
                    let content_type = [("content-type", "application/json")];
                    respond(StatusCode::OK, &content_type, &body.to_string())
                }
            }
        })
        .await;
        let upstream = TestServer::start({
            let tokens = Arc::clone(&tokens);
            move |request| {
                let tokens = Arc::clone(&tokens);
                async move { upstream_answer(&tokens, request) }
            }
        })
        .await;

        let source = ClientCredentials::builder(token_endpoint.url("/token"), "gateway", "secret")
            .build()
            .expect("a loopback token URL");
        let layer = RefreshLayer::new(source);
        let handle = layer.handle();
        let gateway = Gateway {
            client: ServiceBuilder::new().layer(layer).service(client()),
            upstream: upstream.url("").into(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, gateway_router(gateway)).await });

        Self {
            tokens,
            token_endpoint,
            upstream,
            handle,
            gateway: address,
            caller: client(),
        }
    }

    /// Sends a request to the gateway's `path`: a POST when `body` is given, else a GET.
    async fn call(&self, path: &str, body: Option<&[u8]>) -> (StatusCode, Bytes) {
        call(&self.caller, self.request(path, body)).await
    }

    fn request(&self, path: &str, body: Option<&[u8]>) -> Request<Full<Bytes>> {
        let url = format!("http://{}{path}", self.gateway);
        match body {
            Some(body) => Request::post(url)
                .header(CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::copy_from_slice(body))),
            None => Request::get(url).body(Full::default()),
        }
        .unwrap()
    }

    fn current_token(&self) -> String {
        let token = self.handle.current_token().expect("a token in service");
        token.expose_secret().to_owned()
    }
}

/// Answers requests with a valid bearer token: GETs with their method and path, POSTs with
/// their body.
fn upstream_answer(tokens: &Tokens, request: Recorded) -> http::Response<Full<Bytes>> {
    if !request.bearer().is_some_and(|token| tokens.accepts(&token)) {
        return unauthorized("invalid_token");
    }
    if request.method == Method::POST {
        let mut response = http::Response::new(Full::new(request.body));
        let json = http::HeaderValue::from_static("application/json");
        response.headers_mut().insert(CONTENT_TYPE, json);
        return response;
    }
    respond(
        StatusCode::OK,
        &[],
        &format!("{} {}", request.method, request.uri),
    )
}

async fn call(
    caller: &Client<HttpConnector, Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> (StatusCode, Bytes) {
    let response = caller.request(request).await.expect("the gateway answers");
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, body)
}

/// The route a request number `n` takes, and what the upstream answers when it arrives.
fn route(n: usize) -> (String, Option<Vec<u8>>, String) {
    match n % 3 {
        0 => ("/api/orders".into(), None, "GET /orders".into()),
        1 => (format!("/api/orders/{n}"), None, format!("GET /orders/{n}")),
        _ => {
            let order = format!(r#"{{"n": {n}, "item": "crème brûlée"}}"#);
            (
                "/api/orders".into(),
                Some(order.clone().into_bytes()),
                order,
            )
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The behaviour
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn r3_concurrent_first_requests_on_every_route_share_one_token_request() {
    let hold = Arc::new(Notify::new());
    let harness = Arc::new(Harness::start(Some(Arc::clone(&hold))).await);

    let mut calls = JoinSet::new();
    for n in 0..REQUESTS {
        let harness = Arc::clone(&harness);
        calls.spawn(async move {
            let (path, body, expected) = route(n);
            let (status, answer) = harness.call(&path, body.as_deref()).await;
            (status, answer, expected)
        });
    }
    // Every request waits on the one refresh before the token endpoint may answer.
    let stats = || harness.handle.stats();
    tokio::time::timeout(Duration::from_secs(2), async {
        while stats().refreshes < 1 || stats().coalesced < REQUESTS as u64 - 1 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("every request joins the first refresh");
    hold.notify_one();
    let answers = calls.join_all().await;

    for (status, answer, expected) in answers {
        assert_eq!(status, StatusCode::OK, "{expected}");
        assert_eq!(answer, expected.as_bytes());
    }
    assert_eq!(harness.token_endpoint.hits(), 1);
    assert_eq!(stats().refreshes, 1);
    let bearer = format!("Bearer {}", harness.current_token());
    let upstream = harness.upstream.recorded();
    assert_eq!(upstream.len(), REQUESTS);
    for request in upstream {
        assert_eq!(
            request.authorizations(),
            [bearer.as_str()],
            "{}",
            request.uri
        );
    }
}

#[tokio::test]
async fn r3_handlers_on_different_routes_share_one_token() {
    let harness = Harness::start(None).await;

    let list = harness.call("/api/orders", None).await;
    let read = harness.call("/api/orders/7", None).await;
    let create = harness
        .call("/api/orders", Some(br#"{"item":"tea"}"#))
        .await;

    assert_eq!(list, (StatusCode::OK, Bytes::from("GET /orders")));
    assert_eq!(read, (StatusCode::OK, Bytes::from("GET /orders/7")));
    assert_eq!(create, (StatusCode::OK, Bytes::from(r#"{"item":"tea"}"#)));
    assert_eq!(harness.token_endpoint.hits(), 1);
    let tokens: Vec<_> = harness
        .upstream
        .recorded()
        .iter()
        .map(Recorded::bearer)
        .collect();
    assert_eq!(tokens, vec![Some(harness.current_token()); 3]);
}

#[tokio::test]
async fn r1_the_callers_authorization_header_does_not_reach_the_upstream() {
    let harness = Harness::start(None).await;
    let mut request = harness.request("/api/orders", Some(br#"{"item":"tea"}"#));
    let callers = http::HeaderValue::from_static("Bearer the-callers-own");
    request.headers_mut().insert(AUTHORIZATION, callers);

    let (status, _) = call(&harness.caller, request).await;

    assert_eq!(status, StatusCode::OK);
    let upstream = harness.upstream.recorded();
    let bearer = format!("Bearer {}", harness.current_token());
    assert_eq!(upstream[0].authorizations(), [bearer.as_str()]);
}

#[tokio::test]
async fn r8_post_body_reaches_the_upstream_byte_identical_on_a_retry() {
    let harness = Harness::start(None).await;
    let (status, _) = harness.call("/api/orders", None).await;
    assert_eq!(status, StatusCode::OK);
    // Spacing, a line break and non-ASCII text: a body rebuilt rather than replayed would show.
    let order = "{ \"item\": \"crème brûlée\",\n  \"quantity\": 2 }".as_bytes();

    harness.tokens.revoke_all();
    let (status, answer) = harness.call("/api/orders", Some(order)).await;

    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer, order);
    let posts: Vec<_> = harness
        .upstream
        .recorded()
        .into_iter()
        .filter(|request| request.method == Method::POST)
        .collect();
    assert_eq!(posts.len(), 2, "the rejected attempt and its retry");
    assert_eq!(posts[0].authorizations(), ["Bearer token-1"]);
    assert_eq!(posts[1].authorizations(), ["Bearer token-2"]);
    assert_eq!(posts[0].body, order);
    assert_eq!(posts[1].body, order);
    assert_eq!(harness.token_endpoint.hits(), 2);
    let counters = harness.handle.stats();
    assert_eq!((counters.rejections, counters.retries), (1, 1));
    assert_eq!(counters.passed_through, 0);
}

#[tokio::test]
async fn post_bodies_over_the_limit_are_refused_before_a_token_is_fetched() {
    let harness = Harness::start(None).await;
    let at_limit = vec![b'x'; MAX_BODY];
    let over_limit = vec![b'x'; MAX_BODY + 1];

    let (refused, _) = harness.call("/api/orders", Some(&over_limit)).await;
    let hits_before = (harness.token_endpoint.hits(), harness.upstream.hits());
    let (forwarded, answer) = harness.call("/api/orders", Some(&at_limit)).await;

    assert_eq!(refused, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(hits_before, (0, 0));
    assert_eq!(forwarded, StatusCode::OK);
    assert_eq!(answer.len(), MAX_BODY);
}
