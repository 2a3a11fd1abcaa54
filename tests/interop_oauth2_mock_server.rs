//! Interop with a real third-party OAuth2 server: oauth2-mock-server (Node.js), run by
//! `tests/interop/server.js`, issues RS256 JWTs that live 2 seconds, and a protected API on
//! loopback verifies every bearer token against the server's JWKS, `exp` included.
//!
//! The client credentials grant and the refresh-token grant are both exercised. For the
//! latter, server.js makes oauth2-mock-server rotate refresh tokens (each works once), which
//! it does not do by itself; the first refresh token comes from a password grant, as an
//! application would have it from its login.
//!
//! Needs Node.js (`node` and `npm` on `PATH`). The npm packages of `tests/interop` are
//! installed on first use, so a plain `cargo test` works on a fresh machine.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use axum::{extract::State, response::IntoResponse, routing::get, Router};
use bytes::Bytes;
use http::{header, HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use jsonwebtoken::{jwk::JwkSet, Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, ChildStdin},
};
use tower::{ServiceBuilder, ServiceExt};
use tower_token_refresh::{
    source::oauth2::{ClientAuth, ClientCredentials, RefreshTokenGrant},
    BoxError, RefreshLayer, Token, TokenSource,
};

/// The lifetime of every token the server issues, in `expires_in` and in the JWT's `exp`.
const TOKEN_LIFETIME: Duration = Duration::from_secs(2);

/// How long the expiry tests keep calling: long enough to cross two token expiries.
const DRIVE_FOR: Duration = Duration::from_secs(5);

/// Concurrent callers in the expiry tests.
const WORKERS: usize = 20;

/// The pause between two calls of one worker, so 20 workers do not saturate two cores.
const PACING: Duration = Duration::from_millis(10);

/// Characters that RFC 6749 §2.3.1 form-encodes before HTTP Basic: a `:` in the client id
/// splits it wrongly unless encoded.
const CLIENT_ID: &str = "interop:client 1";
const CLIENT_SECRET: &str = "s3cr3t:with spaces&plus+percent%";
const SCOPE: &str = "interop:read";

type HttpClient = Client<HttpConnector, Full<Bytes>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_basic_auth_keeps_every_call_authorized_across_token_expiries() {
    keeps_every_call_authorized_across_token_expiries(ClientAuth::Basic, "basic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_request_body_auth_keeps_every_call_authorized_across_token_expiries() {
    keeps_every_call_authorized_across_token_expiries(ClientAuth::RequestBody, "request_body")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r5_revoked_token_is_refreshed_once_and_every_rejected_call_retried() {
    let token_server = TokenServer::start(Duration::from_secs(60)).await;
    let api = ProtectedApi::start(&token_server).await;
    let layer = RefreshLayer::new(client_credentials(&token_server, ClientAuth::Basic));
    let handle = layer.handle();
    let service = ServiceBuilder::new().layer(layer).service(http_client());
    let first = call(&service, &api.url()).await;
    assert_eq!(first, Ok(StatusCode::OK));

    api.revoke_next_token();
    let outcomes = run_concurrently(WORKERS, || {
        let service = service.clone();
        let url = api.url();
        async move { call(&service, &url).await }
    })
    .await;

    for outcome in &outcomes {
        assert_eq!(outcome, &Ok(StatusCode::OK));
    }
    let record = token_server.token_requests().await;
    assert_eq!(
        record["total"], 2,
        "one token at first use and one after the revocation, however many calls were \
         rejected: {record}"
    );
    let rejected = api.rejected.load(Ordering::SeqCst);
    let stats = handle.stats();
    assert!(rejected >= 1, "the revoked token was sent at least once");
    assert_eq!(stats.refreshes, 2, "{stats:?}");
    assert_eq!(stats.rejections, rejected, "{stats:?}");
    assert_eq!(
        stats.retries, rejected,
        "each rejected call is retried: {stats:?}"
    );
    assert_eq!(stats.passed_through, 0, "{stats:?}");
    assert_eq!(stats.failures, 0, "{stats:?}");
    assert_eq!(api.accepted.load(Ordering::SeqCst), 1 + WORKERS as u64);
}

#[tokio::test]
async fn the_protected_api_refuses_a_token_whose_signature_was_tampered_with() {
    let token_server = TokenServer::start(Duration::from_secs(60)).await;
    let api = ProtectedApi::start(&token_server).await;
    let layer = RefreshLayer::new(client_credentials(&token_server, ClientAuth::Basic));
    let handle = layer.handle();
    let service = ServiceBuilder::new().layer(layer).service(http_client());
    assert_eq!(call(&service, &api.url()).await, Ok(StatusCode::OK));
    let token = handle.current_token().unwrap().expose_secret().to_owned();
    let (signed, signature) = token.rsplit_once('.').unwrap();
    let flipped = if signature.starts_with('A') { 'B' } else { 'A' };
    let tampered = format!("{signed}.{flipped}{}", &signature[1..]);

    let genuine = call_with(&api.url(), &token).await;
    let forged = call_with(&api.url(), &tampered).await;

    assert_eq!(
        genuine,
        StatusCode::OK,
        "the fixture accepts the server's own tokens"
    );
    assert_eq!(
        forged,
        StatusCode::UNAUTHORIZED,
        "and checks their signature"
    );
}

/// Drives `WORKERS` concurrent callers for `DRIVE_FOR` through a layer whose source
/// authenticates with `auth`, then checks the calls, the token requests, and the client
/// authentication that the server received (`method`, as server.js names it).
async fn keeps_every_call_authorized_across_token_expiries(auth: ClientAuth, method: &str) {
    let token_server = TokenServer::start(TOKEN_LIFETIME).await;
    let api = ProtectedApi::start(&token_server).await;
    // Both are the most the layer allows for a 2-second token: a token is replaced in the
    // background once it is 1 s old, and never sent once it is 1.5 s old.
    let layer = RefreshLayer::new(client_credentials(&token_server, auth))
        .refresh_ahead(Duration::from_secs(1))
        .expiry_margin(Duration::from_millis(500))
        .refresh_timeout(Duration::from_secs(5));
    let handle = layer.handle();
    let service = ServiceBuilder::new().layer(layer).service(http_client());

    let (outcomes, elapsed) = drive(&service, &api).await;

    assert_all_succeeded(&outcomes, &api);

    let record = token_server.token_requests().await;
    let total = record["total"].as_u64().unwrap();
    // A token serves less than its lifetime, so `elapsed` needs at least this many; being
    // replaced when 1 s old, they come about once a second.
    let at_least = (elapsed / TOKEN_LIFETIME.as_secs_f64()).ceil() as u64;
    let at_most = elapsed.floor() as u64 + 2;
    assert!(
        (at_least..=at_most).contains(&total),
        "{total} token requests in {elapsed:.1} s, expected {at_least}..={at_most}: {record}"
    );
    assert_eq!(record["by_method"][method], total, "{record}");
    assert_eq!(
        record["credentials"],
        serde_json::json!([format!("{method} {CLIENT_ID} {CLIENT_SECRET}")]),
        "the server decoded exactly our client id and secret"
    );
    assert_eq!(
        record["grant_types"],
        serde_json::json!(["client_credentials"])
    );
    assert_eq!(record["scopes"], serde_json::json!([SCOPE]));

    let distinct = api.distinct_tokens();
    assert!(
        (at_least..=total).contains(&distinct),
        "{distinct} distinct tokens reached the API, {total} were issued"
    );
    // A rejection here would mean that a token reached the API after its `exp`: the layer
    // stops sending a token 1.5 s into its 2 s life, and the JWT lives at least 2 s.
    assert_eq!(api.rejected.load(Ordering::SeqCst), 0);

    let stats = handle.stats();
    assert_eq!(stats.refreshes, total, "{stats:?}");
    assert_eq!(stats.failures, 0, "{stats:?}");
    assert_eq!(stats.rejections, 0, "{stats:?}");
    assert_eq!(stats.retries, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r12_refresh_token_grant_rotates_through_every_token_expiry_and_hands_each_pair_on() {
    let token_server = TokenServer::start(TOKEN_LIFETIME).await;
    let api = ProtectedApi::start(&token_server).await;
    let login = token_server.password_grant().await;
    let source = RefreshTokenGrant::builder(
        format!("{}/token", token_server.url),
        CLIENT_ID,
        login.refresh_token.clone(),
    )
    .client_secret(CLIENT_SECRET)
    .scope(SCOPE)
    .access_token(Token::new(login.access_token.clone()).with_expires_in(TOKEN_LIFETIME))
    .build()
    .expect("a loopback token URL is accepted");
    // The same settings as the client credentials tests, for the same 2-second tokens.
    let layer = RefreshLayer::new(source)
        .refresh_ahead(Duration::from_secs(1))
        .expiry_margin(Duration::from_millis(500))
        .refresh_timeout(Duration::from_secs(5));
    let handle = layer.handle();
    let mut updates = handle.subscribe();
    let service = ServiceBuilder::new().layer(layer).service(http_client());

    let (outcomes, elapsed) = drive(&service, &api).await;

    assert_all_succeeded(&outcomes, &api);
    let record = token_server.token_requests().await;
    assert_eq!(
        record["refresh"]["refused"], 0,
        "no refresh token used twice: {record}"
    );
    let chain = record["refresh"]["chain"].as_array().unwrap().clone();
    let refreshes = chain.len() as u64;
    // The saved token serves first; then one refresh about every second.
    let at_least = (elapsed / TOKEN_LIFETIME.as_secs_f64()).ceil() as u64 - 1;
    let at_most = elapsed.floor() as u64 + 1;
    assert!(
        (at_least..=at_most).contains(&refreshes),
        "{refreshes} refreshes in {elapsed:.1} s, expected {at_least}..={at_most}: {record}"
    );
    assert_eq!(record["by_method"]["basic"], refreshes, "{record}");
    assert_eq!(
        record["credentials"],
        serde_json::json!([format!("basic {CLIENT_ID} {CLIENT_SECRET}")])
    );
    assert_eq!(
        record["grant_types"],
        serde_json::json!(["password", "refresh_token"])
    );
    assert_eq!(record["scopes"], serde_json::json!([SCOPE]));

    let mut installed = Vec::new();
    while let Ok(Some(token)) =
        tokio::time::timeout(Duration::from_millis(100), updates.next()).await
    {
        installed.push(token);
    }
    assert_eq!(
        installed.len() as u64,
        refreshes + 1,
        "the saved pair, then each rotation"
    );
    assert_eq!(installed[0].expose_secret(), login.access_token);
    assert_eq!(
        installed[0].expose_refresh_token(),
        Some(login.refresh_token.as_str())
    );
    for (link, (before, after)) in chain.iter().zip(installed.iter().zip(&installed[1..])) {
        assert_eq!(
            before.expose_refresh_token(),
            link["presented"].as_str(),
            "each refresh presents the newest refresh token"
        );
        assert_eq!(
            after.expose_refresh_token(),
            link["issued"].as_str(),
            "and the token it installs carries the one issued in exchange"
        );
        assert_eq!(after.scopes(), [SCOPE]);
    }
    assert_eq!(api.rejected.load(Ordering::SeqCst), 0);
    let stats = handle.stats();
    assert_eq!(stats.refreshes, refreshes + 1, "{stats:?}");
    assert_eq!(stats.failures, 0, "{stats:?}");
}

#[tokio::test]
async fn f18_a_public_client_gets_a_terminal_invalid_grant_for_a_reused_refresh_token() {
    let token_server = TokenServer::start(Duration::from_secs(60)).await;
    let login = token_server.password_grant().await;
    // Two processes started from the same saved pair: the second presents a spent token.
    let started_from_saved = || {
        RefreshTokenGrant::builder(
            format!("{}/token", token_server.url),
            "interop public app",
            login.refresh_token.clone(),
        )
        .build()
        .expect("a loopback token URL is accepted")
    };
    let saved = Token::new(login.access_token.clone())
        .with_refresh_token(login.refresh_token.clone())
        .with_scopes([SCOPE]);

    let rotated = started_from_saved()
        .fetch(Some(&saved))
        .await
        .expect("a rotated pair");
    let reused = started_from_saved()
        .fetch(Some(&saved))
        .await
        .expect_err("a refusal");

    assert_ne!(
        rotated.expose_refresh_token(),
        Some(login.refresh_token.as_str())
    );
    // NOTE: oauth2-mock-server names the scope "dummy" when a refresh asks for none; a scope
    // in the answer wins over the one the previous token had.
    assert_eq!(rotated.scopes(), ["dummy"]);
    assert!(reused.is_terminal() && reused.is_endpoint(), "{reused:?}");
    assert_eq!(reused.oauth_error(), Some("invalid_grant"));
    assert_eq!(
        reused.error_description(),
        Some("refresh token unknown or already used")
    );
    assert!(!reused.to_string().contains(&login.refresh_token));
    let record = token_server.token_requests().await;
    assert_eq!(record["by_method"]["public"], 2, "{record}");
    assert_eq!(
        record["credentials"],
        serde_json::json!(["public interop public app"])
    );
    assert_eq!(record["refresh"]["refused"], 1, "{record}");
}

/// Drives `WORKERS` concurrent callers through `service` for `DRIVE_FOR`; returns every
/// outcome and the seconds it took.
async fn drive<S>(service: &S, api: &ProtectedApi) -> (Vec<Result<StatusCode, String>>, f64)
where
    S: tower::Service<
            Request<Full<Bytes>>,
            Response = http::Response<tower_token_refresh::ResponseBody<hyper::body::Incoming>>,
            Error = BoxError,
        > + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
{
    let started = Instant::now();
    let deadline = started + DRIVE_FOR;
    let per_worker = run_concurrently(WORKERS, || {
        let service = service.clone();
        let url = api.url();
        async move {
            let mut outcomes = Vec::new();
            while Instant::now() < deadline {
                outcomes.push(call(&service, &url).await);
                tokio::time::sleep(PACING).await;
            }
            outcomes
        }
    })
    .await;
    let elapsed = started.elapsed().as_secs_f64();

    (per_worker.into_iter().flatten().collect(), elapsed)
}

/// Every call was answered 200, and the API accepted each.
fn assert_all_succeeded(outcomes: &[Result<StatusCode, String>], api: &ProtectedApi) {
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|o| **o != Ok(StatusCode::OK))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} calls failed, first: {:?}",
        failed.len(),
        outcomes.len(),
        failed.first()
    );
    assert_eq!(api.accepted.load(Ordering::SeqCst), outcomes.len() as u64);
}

fn client_credentials(token_server: &TokenServer, auth: ClientAuth) -> ClientCredentials {
    ClientCredentials::builder(
        format!("{}/token", token_server.url),
        CLIENT_ID,
        CLIENT_SECRET,
    )
    .client_auth(auth)
    .scope(SCOPE)
    .build()
    .expect("a loopback token URL is accepted")
}

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// One `GET` through `service`; the status, or the error as text.
async fn call<S>(service: &S, url: &str) -> Result<StatusCode, String>
where
    S: tower::Service<
            Request<Full<Bytes>>,
            Response = http::Response<tower_token_refresh::ResponseBody<hyper::body::Incoming>>,
            Error = BoxError,
        > + Clone,
{
    let request = Request::get(url).body(Full::new(Bytes::new())).unwrap();
    let response = service
        .clone()
        .oneshot(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(status)
}

/// One `GET` with `token` as bearer token, without the layer.
async fn call_with(url: &str, token: &str) -> StatusCode {
    let request = Request::get(url)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    http_client().request(request).await.unwrap().status()
}

/// Spawns `count` tasks made by `task`, all at once, and collects their outputs; a panicked
/// task fails the test.
async fn run_concurrently<F, Fut>(count: usize, task: F) -> Vec<Fut::Output>
where
    F: Fn() -> Fut,
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    let tasks: Vec<_> = (0..count).map(|_| tokio::spawn(task())).collect();

    let mut outputs = Vec::with_capacity(count);
    for task in tasks {
        outputs.push(task.await.expect("task panicked"));
    }
    outputs
}

/// `tests/interop/server.js`, running until dropped.
struct TokenServer {
    /// Where to connect: `http://127.0.0.1:PORT`.
    url: String,
    /// The `iss` claim of its tokens.
    issuer: String,
    client: HttpClient,
    // NOTE: dropping stdin makes server.js exit; `kill_on_drop` covers a server that hangs.
    _stdin: ChildStdin,
    _child: Child,
}

impl TokenServer {
    async fn start(token_lifetime: Duration) -> Self {
        let dir = interop_dir();
        install_npm_packages();

        let mut child = tokio::process::Command::new("node")
            .arg("server.js")
            .arg(token_lifetime.as_secs().to_string())
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{}", node_missing(&e)));
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();

        let line = tokio::time::timeout(Duration::from_secs(20), stdout.next_line())
            .await
            .expect("server.js printed its URL within 20 s")
            .expect("server.js stdout is readable")
            .expect("server.js printed its URL before exiting (see its stderr above)");
        let started: Value = serde_json::from_str(&line).expect("server.js printed JSON");

        Self {
            url: started["url"].as_str().unwrap().to_owned(),
            issuer: started["issuer"].as_str().unwrap().to_owned(),
            client: http_client(),
            _stdin: stdin,
            _child: child,
        }
    }

    async fn get_json(&self, path: &str) -> Value {
        let request = Request::get(format!("{}{path}", self.url))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = self.client.request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&body).unwrap()
    }

    /// What server.js recorded about the token requests it answered.
    async fn token_requests(&self) -> Value {
        self.get_json("/interop/token-requests").await
    }

    /// Logs in with the resource owner password grant, which oauth2-mock-server answers with
    /// an access token and a refresh token, as an application's login would.
    async fn password_grant(&self) -> Login {
        let request = Request::post(format!("{}/token", self.url))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(format!(
                "grant_type=password&username=alice&password=wonderland&scope={}",
                SCOPE.replace(':', "%3A")
            ))))
            .unwrap();
        let response = self.client.request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "password grant");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: Value = serde_json::from_slice(&body).unwrap();
        Login {
            access_token: json["access_token"].as_str().unwrap().to_owned(),
            refresh_token: json["refresh_token"].as_str().unwrap().to_owned(),
        }
    }
}

/// The tokens of a login.
struct Login {
    access_token: String,
    refresh_token: String,
}

/// The directory of server.js and its npm packages.
fn interop_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

/// Runs `npm install` in tests/interop once per test binary, when oauth2-mock-server is not
/// there yet. Every test of this binary waits for the one install.
fn install_npm_packages() {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();

    let outcome = INSTALLED.get_or_init(|| {
        let dir = interop_dir();
        if dir
            .join("node_modules/oauth2-mock-server/package.json")
            .exists()
        {
            return Ok(());
        }
        let output = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .output()
            .map_err(|e| node_missing(&e))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "`npm install` in {} failed ({}):\n{}",
                dir.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    });
    if let Err(message) = outcome {
        panic!("{message}");
    }
}

fn node_missing(error: &std::io::Error) -> String {
    format!(
        "these tests run oauth2-mock-server and need Node.js 20 or later with npm on PATH \
         ({error}); install Node.js, or run the other test files with `cargo test --test NAME`"
    )
}

/// An API on 127.0.0.1 that accepts only bearer JWTs signed by the token server, unexpired
/// and not revoked.
struct ProtectedApi {
    addr: SocketAddr,
    state: Arc<ApiState>,
}

struct ApiState {
    keys: JwkSet,
    validation: Validation,
    accepted: AtomicU64,
    rejected: AtomicU64,
    revoke_next: AtomicBool,
    revoked: Mutex<HashSet<String>>,
    /// Tokens whose signature and issuer were verified, with their `exp`.
    verified: Mutex<HashMap<String, f64>>,
}

impl std::ops::Deref for ProtectedApi {
    type Target = ApiState;

    fn deref(&self) -> &ApiState {
        &self.state
    }
}

impl ProtectedApi {
    async fn start(token_server: &TokenServer) -> Self {
        let keys: JwkSet =
            serde_json::from_value(token_server.get_json("/jwks").await).expect("the JWKS parses");
        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = 0;
        validation.validate_aud = false;
        validation.set_issuer(&[&token_server.issuer]);
        validation.set_required_spec_claims(&["exp", "iss"]);
        let state = Arc::new(ApiState {
            keys,
            validation,
            accepted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            revoke_next: AtomicBool::new(false),
            revoked: Mutex::new(HashSet::new()),
            verified: Mutex::new(HashMap::new()),
        });

        let app = Router::new()
            .route("/orders", get(orders))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        Self { addr, state }
    }

    fn url(&self) -> String {
        format!("http://{}/orders", self.addr)
    }

    /// The next valid token to arrive is revoked: that call and every later one with the
    /// same token get 401.
    fn revoke_next_token(&self) {
        self.revoke_next.store(true, Ordering::SeqCst);
    }

    /// How many different tokens passed verification.
    fn distinct_tokens(&self) -> u64 {
        self.verified.lock().unwrap().len() as u64
    }
}

async fn orders(State(api): State<Arc<ApiState>>, headers: HeaderMap) -> impl IntoResponse {
    match api.verify(&headers) {
        Ok(()) => {
            api.accepted.fetch_add(1, Ordering::SeqCst);
            (StatusCode::OK, HeaderMap::new(), "orders")
        }
        Err(reason) => {
            api.rejected.fetch_add(1, Ordering::SeqCst);
            let mut challenge = HeaderMap::new();
            challenge.insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static(r#"Bearer error="invalid_token""#),
            );
            (StatusCode::UNAUTHORIZED, challenge, reason)
        }
    }
}

impl ApiState {
    fn verify(&self, headers: &HeaderMap) -> Result<(), &'static str> {
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return Err("exactly one authorization header");
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or("not a bearer token")?;

        let cached = self.verified.lock().unwrap().get(token).copied();
        let exp = match cached {
            Some(exp) => exp,
            None => self.verify_signature(token)?,
        };

        // NOTE: `exp` is in whole seconds, and jsonwebtoken compares it with the current whole
        // second, accepting a token for up to a second past `exp`. Reject it at `exp` exactly,
        // on every call, cached or not.
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        if now.as_secs_f64() >= exp {
            return Err("expired");
        }

        if self.revoked.lock().unwrap().contains(token) {
            return Err("revoked");
        }
        if self.revoke_next.swap(false, Ordering::SeqCst) {
            self.revoked.lock().unwrap().insert(token.to_owned());
            return Err("revoked");
        }
        Ok(())
    }

    /// Checks signature, issuer and `exp` (zero leeway) of a token seen for the first time,
    /// and remembers it, as a resource server's cache would; an RSA verification on every
    /// call would make this API the bottleneck of the test.
    fn verify_signature(&self, token: &str) -> Result<f64, &'static str> {
        let kid = jsonwebtoken::decode_header(token)
            .map_err(|_| "malformed JWT")?
            .kid
            .ok_or("no kid")?;
        let jwk = self.keys.find(&kid).ok_or("unknown kid")?;
        let key = DecodingKey::from_jwk(jwk).map_err(|_| "unusable JWK")?;
        let claims = jsonwebtoken::decode::<Value>(token, &key, &self.validation)
            .map_err(|_| "signature, issuer or exp rejected")?
            .claims;
        let exp = claims["exp"].as_f64().ok_or("exp is not a number")?;

        self.verified.lock().unwrap().insert(token.to_owned(), exp);
        Ok(exp)
    }
}
