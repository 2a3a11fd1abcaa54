//! A small axum gateway that calls a protected upstream API through one shared
//! [`RefreshLayer`] client.
//!
//! Three servers start on 127.0.0.1, each on a port the OS picks:
//!
//! - an `OAuth2` token endpoint (client credentials) that issues tokens living 2 seconds;
//! - an upstream API that accepts only unexpired tokens it issued, answers anything else
//!   with `401` and `WWW-Authenticate: Bearer error="invalid_token"`, and once, a little over
//!   a second in, revokes every token issued so far;
//! - the gateway: an axum `Router` whose handlers share one client in `State`, built as
//!   `ServiceBuilder::new().layer(RefreshLayer::new(ClientCredentials ..)).service(hyper-util
//!   client)`. `GET /api/orders` and `GET /api/orders/{id}` proxy to the upstream;
//!   `POST /api/orders` forwards the caller's JSON body, collected so that a rejected call can
//!   be sent again (see `create_order`).
//!
//! Then concurrent callers send GETs and POSTs at the gateway for about 3 seconds, so the run
//! crosses token expiries and the revocation. The summary says what happened; the exit status
//! is 0 only if every request succeeded and the token endpoint was asked a plausible number
//! of times.
//!
//! ```text
//! cargo run --example axum_gateway
//! RUST_LOG=tower_token_refresh=debug cargo run --example axum_gateway
//! ```

use std::{
    collections::HashMap,
    io::IsTerminal,
    net::SocketAddr,
    process::ExitCode,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use axum::{
    body::Bytes,
    extract::{DefaultBodyLimit, Path, Request as AxumRequest, State},
    http::{
        header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE},
        HeaderMap, Method, StatusCode,
    },
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Form, Json, Router,
};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use serde_json::{json, Value};
use tokio::{net::TcpListener, task::JoinSet, time::Instant};
use tower::{ServiceBuilder, ServiceExt};
use tower_token_refresh::{
    source::oauth2::{ClientAuth, ClientCredentials},
    BoxError, Refresh, RefreshLayer, Stats,
};
use tracing_subscriber::EnvFilter;

const CLIENT_ID: &str = "orders-gateway";
const CLIENT_SECRET: &str = "example-secret";

/// How long the token endpoint's tokens live.
const TOKEN_LIFETIME: Duration = Duration::from_secs(2);

/// How long the layer uses a token before it replaces it in the background: its default
/// refresh-ahead (120 s) is clamped to half the lifetime of a token, so a 2-second token turns
/// stale 1 second after it was asked for.
const REPLACED_AFTER: Duration = Duration::from_secs(1);

/// When the upstream revokes every token issued so far, counted from its start.
const REVOKE_AFTER: Duration = Duration::from_millis(1200);

/// The upstream revokes only once the newest token is at least this old.
///
/// NOTE: a token issued a moment ago may still be on its way to the gateway, and a request
/// that an old token's revocation rejects is retried with the newest token the gateway holds.
/// Revoking a token the gateway could not yet know about would reject that retry too, and a
/// correct client retries once (R6): the run would report a failure that no client can avoid.
const REVOCATION_GRACE: Duration = Duration::from_millis(300);

/// The largest request body the gateway forwards.
const MAX_BODY: usize = 64 * 1024;

/// How long the callers keep the gateway busy, and how many call at once.
const RUN_FOR: Duration = Duration::from_secs(3);
const CALLERS: usize = 16;

#[tokio::main]
async fn main() -> ExitCode {
    init_tracing();

    let summary = match run().await {
        Ok(summary) => summary,
        Err(err) => {
            eprintln!("axum_gateway: failed: cannot set up: {err}");
            return ExitCode::FAILURE;
        }
    };

    summary.print();
    let reasons = summary.reasons();
    for reason in &reasons {
        eprintln!("axum_gateway: failed: {reason}");
    }
    if reasons.is_empty() {
        println!(
            "ok: every request succeeded, with as few tokens as expiries and the revocation need"
        );
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Logs go to stderr, so that the summary on stdout stays readable; `RUST_LOG` picks what.
fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

async fn run() -> Result<Summary, BoxError> {
    // The token endpoint and the upstream API, sharing the table of issued tokens.
    let tokens = Arc::new(TokenTable::new());
    let token_address = serve(token_endpoint(Arc::clone(&tokens))).await?;
    let upstream_address = serve(upstream_api(Arc::clone(&tokens))).await?;

    // The gateway's one client: built once, shared by every handler through `State`.
    let source = ClientCredentials::builder(
        format!("http://{token_address}/oauth/token"),
        CLIENT_ID,
        CLIENT_SECRET,
    )
    .client_auth(ClientAuth::RequestBody)
    .scope("orders")
    .build()?;
    let layer = RefreshLayer::new(source);
    let handle = layer.handle();
    let client = ServiceBuilder::new()
        .layer(layer)
        .service(Client::builder(TokioExecutor::new()).build_http());
    let gateway = Gateway {
        client,
        upstream: format!("http://{upstream_address}").into(),
    };
    let gateway_address = serve(gateway_router(gateway)).await?;
    println!("token endpoint: http://{token_address}/oauth/token");
    println!("upstream API:   http://{upstream_address}/orders");
    println!("gateway:        http://{gateway_address}/api/orders");

    // Callers keep the gateway busy across expiries and the revocation.
    let started = Instant::now();
    let tally = drive(gateway_address, started + RUN_FOR).await;
    let elapsed = started.elapsed();

    let revoked = tokens.lock().revoked_at.is_some();
    Ok(Summary {
        tally,
        elapsed,
        stats: handle.stats(),
        token_calls: tokens.token_calls.load(Ordering::Relaxed),
        rejected: tokens.rejected.load(Ordering::Relaxed),
        bad_headers: tokens.bad_headers.load(Ordering::Relaxed),
        revoked,
    })
}

/// Serves `router` on 127.0.0.1, on a port the OS picks.
async fn serve(router: Router) -> Result<SocketAddr, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, router).await {
            eprintln!("axum_gateway: a server stopped: {err}");
        }
    });
    Ok(address)
}

// ---------------------------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------------------------

/// What the gateway's handlers share.
///
/// `State` hands each request its own clone: cloning the client is how a tower client is
/// used, and every clone shares the layer's token state (one refresh at a time for all
/// handlers) and hyper's connection pool.
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

/// `GET /api/orders`: proxied as it is.
async fn list_orders(State(gateway): State<Gateway>) -> Response {
    let request = gateway.upstream(Method::GET, "/orders");
    gateway.forward(request, Full::default()).await
}

/// `GET /api/orders/{id}`: proxied as it is.
async fn read_order(State(gateway): State<Gateway>, Path(id): Path<u64>) -> Response {
    let request = gateway.upstream(Method::GET, &format!("/orders/{id}"));
    gateway.forward(request, Full::default()).await
}

/// `POST /api/orders`: forwards the caller's JSON body.
///
/// The `Bytes` extractor collects the body before the handler runs, and refuses one larger
/// than [`MAX_BODY`] with `413 Payload Too Large` (the route's `DefaultBodyLimit`); the limit
/// keeps one caller from making the gateway hold an unbounded body. Forwarded as a
/// `Full<Bytes>`, the body is copied by the layer for free (a reference count) before the
/// first attempt, so a call whose token the upstream rejects is always sent again with the
/// same bytes.
///
/// A streamed body (axum's `Body` boxed with `BodyExt::boxed_unsync`, say) cannot be copied
/// up front: the layer can replay it only if it kept all of it while it was sent, up to its
/// `replay_limit` (64 KiB by default), before the 401 came back. A longer body, or one the upstream rejected before it had all
/// left (an upstream that checks the token first, as this one does, may answer that early),
/// is not retried: the handler gets the 401, and only the next call gets the new token.
/// Stream only what is too large to hold, and expect its rejections to reach the caller.
async fn create_order(State(gateway): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let mut request = gateway.upstream(Method::POST, "/orders");
    if let Some(content_type) = headers.get(CONTENT_TYPE) {
        request = request.header(CONTENT_TYPE, content_type);
    }
    gateway.forward(request, Full::new(body)).await
}

impl Gateway {
    /// A request to the upstream.
    ///
    /// NOTE: it copies none of the caller's headers but those a handler adds. An
    /// `Authorization` header copied from the caller would leave with the caller's
    /// credentials: the layer lets a request that already carries one pass untouched.
    fn upstream(&self, method: Method, path: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.upstream))
    }

    /// Sends a request through the shared client and relays the upstream's answer.
    async fn forward(self, request: http::request::Builder, body: Full<Bytes>) -> Response {
        let request = match request.body(body) {
            Ok(request) => request,
            Err(err) => {
                tracing::error!(error = %err, "cannot build the upstream request");
                return StatusCode::INTERNAL_SERVER_ERROR.into_response();
            }
        };

        match self.client.oneshot(request).await {
            Ok(response) => relay(response),
            Err(err) => {
                // A failed token refresh lands here too: nothing is sent without a token.
                tracing::error!(error = %err, "upstream call failed");
                (StatusCode::BAD_GATEWAY, "upstream unavailable").into_response()
            }
        }
    }
}

/// The upstream's status, content type and body, streamed back to the caller.
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
// The token endpoint and the upstream API
// ---------------------------------------------------------------------------------------------

/// The tokens the token endpoint issued, as the upstream API checks them, and what both saw.
struct TokenTable {
    started: Instant,
    table: Mutex<Issued>,
    token_calls: AtomicU64,
    rejected: AtomicU64,
    bad_headers: AtomicU64,
}

#[derive(Default)]
struct Issued {
    /// Valid tokens and when each was issued.
    tokens: HashMap<String, Instant>,
    next: u64,
    revoked_at: Option<Instant>,
}

impl TokenTable {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            table: Mutex::new(Issued::default()),
            token_calls: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            bad_headers: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Issued> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn issue(&self) -> String {
        let mut issued = self.lock();
        issued.next += 1;
        let token = format!("orders-token-{}", issued.next);
        issued.tokens.insert(token.clone(), Instant::now());
        token
    }

    /// Whether `token` may be used now; the first call after the revocation time whose newest
    /// token has outlived the grace revokes every token first.
    fn accepts(&self, token: &str) -> bool {
        let mut issued = self.lock();
        let now = Instant::now();

        let newest_age = issued.tokens.values().map(|at| now - *at).min();
        let due = now - self.started >= REVOKE_AFTER && issued.revoked_at.is_none();
        if due && newest_age.is_some_and(|age| age >= REVOCATION_GRACE) {
            issued.tokens.clear();
            issued.revoked_at = Some(now);
        }

        issued
            .tokens
            .get(token)
            .is_some_and(|at| now - *at < TOKEN_LIFETIME)
    }
}

fn token_endpoint(tokens: Arc<TokenTable>) -> Router {
    Router::new()
        .route("/oauth/token", post(issue_token))
        .with_state(tokens)
}

/// Client credentials grant (RFC 6749 §4.4), client authentication in the form body.
async fn issue_token(
    State(tokens): State<Arc<TokenTable>>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    tokens.token_calls.fetch_add(1, Ordering::Relaxed);
    let field = |name: &str| form.get(name).map(String::as_str);

    if field("grant_type") != Some("client_credentials") {
        return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type");
    }
    if field("client_id") != Some(CLIENT_ID) || field("client_secret") != Some(CLIENT_SECRET) {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
    }

    let body = json!({
        "access_token": tokens.issue(),
        "token_type": "Bearer",
        "expires_in": TOKEN_LIFETIME.as_secs(),
        "scope": "orders",
    });
    Json(body).into_response()
}

fn oauth_error(status: StatusCode, error: &str) -> Response {
    (status, Json(json!({ "error": error }))).into_response()
}

fn upstream_api(tokens: Arc<TokenTable>) -> Router {
    Router::new()
        .route("/orders", get(upstream_list).post(upstream_create))
        .route("/orders/{id}", get(upstream_read))
        .route_layer(middleware::from_fn_with_state(tokens, require_token))
}

/// Answers only requests with exactly one `Authorization: Bearer` header holding a valid token
/// (RFC 6750 §3).
async fn require_token(
    State(tokens): State<Arc<TokenTable>>,
    request: AxumRequest,
    next: Next,
) -> Response {
    let mut values = request.headers().get_all(AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        tokens.bad_headers.fetch_add(1, Ordering::Relaxed);
        return challenge(None);
    };
    let token = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer "));

    if !token.is_some_and(|token| tokens.accepts(token)) {
        tokens.rejected.fetch_add(1, Ordering::Relaxed);
        return challenge(Some("invalid_token"));
    }
    next.run(request).await
}

fn challenge(error: Option<&str>) -> Response {
    let value = match error {
        Some(error) => format!(r#"Bearer realm="orders", error="{error}""#),
        None => r#"Bearer realm="orders""#.to_owned(),
    };
    (StatusCode::UNAUTHORIZED, [(WWW_AUTHENTICATE, value)]).into_response()
}

async fn upstream_list() -> Json<Value> {
    Json(json!({ "orders": [1, 2, 3] }))
}

async fn upstream_read(Path(id): Path<u64>) -> Json<Value> {
    Json(json!({ "id": id, "item": "widget" }))
}

/// Echoes the order it received, byte for byte, once it checked that it is JSON.
async fn upstream_create(body: Bytes) -> Response {
    if serde_json::from_slice::<Value>(&body).is_err() {
        return (StatusCode::BAD_REQUEST, "not JSON").into_response();
    }
    ([(CONTENT_TYPE, "application/json")], body).into_response()
}

// ---------------------------------------------------------------------------------------------
// The callers
// ---------------------------------------------------------------------------------------------

/// What the callers saw.
#[derive(Default)]
struct Tally {
    requests: u64,
    failures: u64,
    first_failure: Option<String>,
}

impl Tally {
    fn record(&mut self, outcome: Result<(), String>) {
        self.requests += 1;
        if let Err(failure) = outcome {
            self.failures += 1;
            self.first_failure.get_or_insert(failure);
        }
    }

    fn merge(&mut self, other: Tally) {
        self.requests += other.requests;
        self.failures += other.failures;
        if self.first_failure.is_none() {
            self.first_failure = other.first_failure;
        }
    }
}

/// [`CALLERS`] callers, each sending GETs and POSTs one after another until `until`.
async fn drive(gateway: SocketAddr, until: Instant) -> Tally {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();

    let mut callers = JoinSet::new();
    for caller in 0..CALLERS {
        callers.spawn(call_until(client.clone(), gateway, caller, until));
    }

    let mut tally = Tally::default();
    while let Some(joined) = callers.join_next().await {
        match joined {
            Ok(caller) => tally.merge(caller),
            Err(err) => tally.record(Err(format!("a caller panicked: {err}"))),
        }
    }
    tally
}

async fn call_until(
    client: Client<HttpConnector, Full<Bytes>>,
    gateway: SocketAddr,
    caller: usize,
    until: Instant,
) -> Tally {
    let mut tally = Tally::default();
    let mut n = 0_u64;
    while Instant::now() < until {
        n += 1;
        let url = format!("http://{gateway}/api/orders");
        let outcome = match n % 3 {
            0 => call(&client, Request::get(url), None).await,
            1 => call(&client, Request::get(format!("{url}/{n}")), None).await,
            _ => {
                // Spacing and non-ASCII text, so that a body rebuilt rather than replayed
                // would show.
                let order = format!(
                    "{{ \"caller\": {caller}, \"n\": {n},  \"item\": \"widget\", \"note\": \"crème brûlée\" }}"
                );
                let request = Request::post(url).header(CONTENT_TYPE, "application/json");
                call(&client, request, Some(Bytes::from(order))).await
            }
        };
        tally.record(outcome);
    }
    tally
}

/// One call through the gateway; a POST must come back with the body it sent.
async fn call(
    client: &Client<HttpConnector, Full<Bytes>>,
    request: http::request::Builder,
    order: Option<Bytes>,
) -> Result<(), String> {
    let what = format!(
        "{} {}",
        request.method_ref().unwrap_or(&Method::GET),
        request
            .uri_ref()
            .map(ToString::to_string)
            .unwrap_or_default()
    );
    let request = request
        .body(Full::new(order.clone().unwrap_or_default()))
        .map_err(|err| format!("{what}: {err}"))?;

    let response = client
        .request(request)
        .await
        .map_err(|err| format!("{what}: {err}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|err| format!("{what}: reading the answer: {err}"))?
        .to_bytes();

    if status != StatusCode::OK {
        let excerpt = String::from_utf8_lossy(&body[..body.len().min(100)]).into_owned();
        return Err(format!("{what}: {status} {excerpt}"));
    }
    if order.is_some_and(|sent| sent != body) {
        return Err(format!("{what}: the upstream received another body"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The summary
// ---------------------------------------------------------------------------------------------

struct Summary {
    tally: Tally,
    elapsed: Duration,
    stats: Stats,
    token_calls: u64,
    rejected: u64,
    bad_headers: u64,
    revoked: bool,
}

impl Summary {
    /// Token requests a correct client makes at most: the first, one after the revocation,
    /// and one each time a token has been in use for [`REPLACED_AFTER`].
    fn most_token_calls(&self) -> u64 {
        let replacements = self.elapsed.as_nanos().div_ceil(REPLACED_AFTER.as_nanos());
        u64::try_from(replacements).map_or(u64::MAX, |n| n.saturating_add(2))
    }

    fn print(&self) {
        let Self { tally, stats, .. } = self;
        println!(
            "requests: {} through the gateway in {:.2} s, {CALLERS} at a time; {} failed",
            tally.requests,
            self.elapsed.as_secs_f64(),
            tally.failures
        );
        println!(
            "token endpoint: {} calls (plausible: 2 to {}); upstream revoked every token: {}",
            self.token_calls,
            self.most_token_calls(),
            if self.revoked { "yes" } else { "no" }
        );
        println!(
            "layer: {} refreshes, {} callers joined a refresh, {} rejections, {} retries, {} \
             rejections passed through",
            stats.refreshes, stats.coalesced, stats.rejections, stats.retries, stats.passed_through
        );
        println!(
            "upstream: {} requests rejected for their token, {} without exactly one \
             Authorization header",
            self.rejected, self.bad_headers
        );
    }

    /// Why the run did not go as a correct client makes it go; empty if it did.
    fn reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        let tally = &self.tally;

        if tally.requests == 0 {
            reasons.push("no request was sent".to_owned());
        }
        if tally.failures > 0 {
            let first = tally.first_failure.as_deref().unwrap_or("unknown");
            reasons.push(format!(
                "{} of {} requests failed; the first: {first}",
                tally.failures, tally.requests
            ));
        }
        if self.bad_headers > 0 {
            reasons.push(format!(
                "{} upstream requests came without exactly one Authorization header",
                self.bad_headers
            ));
        }
        if !(2..=self.most_token_calls()).contains(&self.token_calls) {
            reasons.push(format!(
                "the token endpoint was called {} times, not 2 to {}",
                self.token_calls,
                self.most_token_calls()
            ));
        }
        if self.token_calls != self.stats.refreshes {
            reasons.push(format!(
                "{} refreshes made {} token requests",
                self.stats.refreshes, self.token_calls
            ));
        }
        if !self.revoked || self.stats.retries == 0 {
            reasons.push("the revocation did not happen, or no rejected call was retried".into());
        }
        reasons
    }
}
