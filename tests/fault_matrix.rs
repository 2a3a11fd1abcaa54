//! R3, R4 and R9 under faults of the token endpoint (F11, F18, F19).
//!
//! The matrix: a client credentials source asks a token endpoint on 127.0.0.1 that is slow,
//! hangs, resets connections or answers with errors, on behalf of one caller and of a thousand
//! concurrent callers, through the layer over hyper-util's client to an API on 127.0.0.1. Every
//! caller finishes within the refresh timeout with the token or the right typed error, the
//! token endpoint is asked by one flight only (its calls are that flight's attempts), and
//! nothing reaches the API without a token.
//!
//! Then, with tokio's paused clock and in-process peers, where timing must be exact: the call
//! rate of a token endpoint that keeps failing, and recovery; refreshes whose callers give up
//! (R4); and the number of waiters while the token endpoint is slower than the refresh timeout.

mod common;

use std::{
    convert::Infallible,
    future::Future,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use common::{client, get, ok, respond, unauthorized, Recorded, TestServer};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_token_refresh::{
    source::oauth2::{ClientCredentials, RefreshTokenGrant},
    BoxError, Error, RefreshHandle, RefreshLayer,
};

const JSON: (&str, &str) = ("content-type", "application/json");
const TOKEN: &str = r#"{"access_token":"A1","token_type":"Bearer","expires_in":3600}"#;

/// A token URL for sources whose transport is in-process: it names a loopback host so that
/// the source accepts plain HTTP, and nothing ever connects to it.
const IN_PROCESS_URL: &str = "http://127.0.0.1/token";

// ---------------------------------------------------------------------------------------------
// The matrix, on real sockets.
// ---------------------------------------------------------------------------------------------

/// The layer's refresh timeout in the matrix: short, so that a hanging endpoint costs a second.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(1);

/// The source's retry budget: room for its default three attempts, whose waits are at most
/// 200 ms and 400 ms, and their answers, inside the refresh timeout.
const RETRY_BUDGET: Duration = Duration::from_millis(800);

/// Attempts per fetch: the source's default.
const ATTEMPTS: usize = 3;

/// The layer's failure back-off in the matrix: 2.5 s at least after jitter, so that the call
/// made right after a failed run is sure to meet it.
const FAILURE_BACKOFF: Duration = Duration::from_secs(5);

/// How late past its bound a caller may finish: scheduling a thousand tasks, and their API
/// round trips on new connections, on two cores.
fn slack(callers: usize) -> Duration {
    if callers == 1 {
        Duration::from_millis(250)
    } else {
        Duration::from_millis(1500)
    }
}

/// How the token endpoint misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Answers with a token after 200 ms.
    Slow,
    /// Takes the request and never answers.
    Hangs,
    /// Accepts each connection and resets it at once.
    Resets,
    /// Answers 500, every time.
    ServerError,
    /// Answers 503 once, then with a token.
    UnavailableThenToken,
    /// Answers 429 with `Retry-After: 0` once, then with a token.
    TooManyRequestsBriefly,
    /// Answers 429 with `Retry-After: 30`, longer than the retry budget, every time.
    TooManyRequestsForLong,
    /// Answers 502 with a proxy's HTML page, every time.
    HtmlErrorPage,
    /// Answers 200 with an HTML page.
    HtmlWithSuccess,
    /// Answers 200 with a body that is not JSON.
    InvalidJson,
    /// Answers 400 `invalid_grant`.
    InvalidGrant,
}

/// What every caller of one run gets.
enum Outcome {
    /// The token: the API answers 200.
    Token,
    /// This error, as the check describes it.
    Error {
        check: fn(&Error) -> bool,
        describe: &'static str,
    },
}

struct Expected {
    /// Token endpoint calls in one run, however many callers: one flight times the attempts
    /// the source makes for this fault.
    endpoint_calls: usize,
    outcome: Outcome,
}

impl Fault {
    fn expected(self) -> Expected {
        let error = |check: fn(&Error) -> bool, describe| Outcome::Error { check, describe };
        let (endpoint_calls, outcome) = match self {
            Self::Slow => (1, Outcome::Token),
            Self::Hangs => (1, error(Error::is_timeout, "a timeout")),
            Self::Resets => (
                ATTEMPTS,
                error(
                    |e| e.is_transport() && e.is_transient(),
                    "a transient transport error",
                ),
            ),
            Self::ServerError => (
                ATTEMPTS,
                error(
                    |e| {
                        e.is_endpoint()
                            && e.is_transient()
                            && e.status() == Some(StatusCode::INTERNAL_SERVER_ERROR)
                    },
                    "a transient endpoint error with status 500",
                ),
            ),
            Self::UnavailableThenToken | Self::TooManyRequestsBriefly => (2, Outcome::Token),
            Self::TooManyRequestsForLong => (
                1,
                error(
                    |e| {
                        e.is_endpoint()
                            && e.is_transient()
                            && e.status() == Some(StatusCode::TOO_MANY_REQUESTS)
                            && e.retry_after() == Some(Duration::from_secs(30))
                    },
                    "a transient 429 that carries its Retry-After",
                ),
            ),
            Self::HtmlErrorPage => (
                ATTEMPTS,
                error(
                    |e| {
                        e.is_endpoint()
                            && e.is_transient()
                            && e.status() == Some(StatusCode::BAD_GATEWAY)
                            && e.excerpt().is_some_and(|x| x.starts_with("<html>"))
                    },
                    "a transient endpoint error with status 502 and an HTML excerpt",
                ),
            ),
            Self::HtmlWithSuccess => (
                1,
                error(
                    |e| {
                        e.is_invalid_response()
                            && e.status() == Some(StatusCode::OK)
                            && e.excerpt().is_some_and(|x| x.starts_with("<html>"))
                    },
                    "an invalid response with status 200 and an HTML excerpt",
                ),
            ),
            Self::InvalidJson => (
                1,
                error(
                    |e| e.is_invalid_response() && e.status() == Some(StatusCode::OK),
                    "an invalid response with status 200",
                ),
            ),
            Self::InvalidGrant => (
                1,
                error(
                    |e| {
                        e.is_terminal()
                            && e.is_endpoint()
                            && e.status() == Some(StatusCode::BAD_REQUEST)
                            && e.oauth_error() == Some("invalid_grant")
                            && e.error_description() == Some("client revoked")
                    },
                    "a terminal invalid_grant with its description",
                ),
            ),
        };
        Expected {
            endpoint_calls,
            outcome,
        }
    }

    /// The answer to the `n`th token request (1 for the first).
    async fn answer(self, n: usize) -> Response<Full<Bytes>> {
        let token = || respond(StatusCode::OK, &[JSON], TOKEN);
        match self {
            Self::Slow => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                token()
            }
            Self::Hangs => std::future::pending().await,
            Self::Resets => unreachable!("a resetting endpoint answers nothing"),
            Self::ServerError => respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                &[("content-type", "text/plain")],
                "internal error",
            ),
            Self::UnavailableThenToken if n == 1 => {
                respond(StatusCode::SERVICE_UNAVAILABLE, &[], "")
            }
            Self::TooManyRequestsBriefly if n == 1 => {
                respond(StatusCode::TOO_MANY_REQUESTS, &[("retry-after", "0")], "")
            }
            Self::UnavailableThenToken | Self::TooManyRequestsBriefly => token(),
            Self::TooManyRequestsForLong => {
                respond(StatusCode::TOO_MANY_REQUESTS, &[("retry-after", "30")], "")
            }
            Self::HtmlErrorPage => respond(
                StatusCode::BAD_GATEWAY,
                &[("content-type", "text/html")],
                "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
            ),
            Self::HtmlWithSuccess => respond(
                StatusCode::OK,
                &[("content-type", "text/html")],
                "<html>Maintenance in progress</html>",
            ),
            Self::InvalidJson => respond(StatusCode::OK, &[JSON], r#"{"status": "ok",,}"#),
            Self::InvalidGrant => respond(
                StatusCode::BAD_REQUEST,
                &[JSON],
                r#"{"error":"invalid_grant","error_description":"client revoked"}"#,
            ),
        }
    }
}

/// A misbehaving token endpoint on 127.0.0.1, counting the token requests that reach it (for
/// [`Fault::Resets`], the connections it resets).
struct TokenEndpoint {
    url: String,
    calls: Arc<AtomicUsize>,
    _server: Option<TestServer>,
    resetter: Option<tokio::task::JoinHandle<()>>,
}

impl TokenEndpoint {
    async fn start(fault: Fault) -> Self {
        let calls = Arc::new(AtomicUsize::new(0));

        if fault == Fault::Resets {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/token", listener.local_addr().unwrap());
            let counter = Arc::clone(&calls);
            let resetter = tokio::spawn(async move {
                loop {
                    let (socket, _) = listener.accept().await.unwrap();
                    counter.fetch_add(1, Ordering::SeqCst);
                    socket.set_zero_linger().unwrap();
                    drop(socket);
                }
            });
            return Self {
                url,
                calls,
                _server: None,
                resetter: Some(resetter),
            };
        }

        let counter = Arc::clone(&calls);
        let server = TestServer::start(move |_request: Recorded| {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            fault.answer(n)
        })
        .await;
        Self {
            url: server.url("/token"),
            calls,
            _server: Some(server),
            resetter: None,
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Drop for TokenEndpoint {
    fn drop(&mut self) {
        if let Some(resetter) = &self.resetter {
            resetter.abort();
        }
    }
}

type CallResult =
    Result<Response<tower_token_refresh::ResponseBody<hyper::body::Incoming>>, BoxError>;

/// Checks one caller's result against the expected outcome.
fn check(result: &CallResult, outcome: &Outcome, context: &str) {
    match (outcome, result) {
        (Outcome::Token, Ok(response)) => {
            assert_eq!(
                response.status(),
                StatusCode::OK,
                "{context}: the API's answer"
            );
        }
        (Outcome::Token, Err(error)) => panic!("{context}: expected the token, got {error}"),
        (Outcome::Error { describe, .. }, Ok(response)) => panic!(
            "{context}: expected {describe}, got a response with status {}",
            response.status()
        ),
        (Outcome::Error { check, describe }, Err(error)) => {
            let error = error
                .downcast_ref::<Error>()
                .unwrap_or_else(|| panic!("{context}: expected {describe}, got {error}"));
            assert!(
                check(error),
                "{context}: expected {describe}, got {error:?}"
            );
        }
    }
}

/// One run of the matrix: `callers` concurrent calls meet `fault` with no token installed,
/// then one more call follows at once.
async fn run(fault: Fault, callers: usize) {
    let context = format!("{fault:?} with {callers} caller(s)");
    let expected = fault.expected();
    let endpoint = TokenEndpoint::start(fault).await;
    let api = TestServer::start(|request: Recorded| async move {
        match request.bearer().as_deref() {
            Some("A1") => ok("served"),
            _ => unauthorized("invalid_token"),
        }
    })
    .await;
    let source = ClientCredentials::builder(endpoint.url.clone(), "client", "client-secret")
        .retry_budget(RETRY_BUDGET)
        .build()
        .unwrap();
    let layer = RefreshLayer::new(source)
        .refresh_timeout(REFRESH_TIMEOUT)
        .failure_backoff(FAILURE_BACKOFF);
    let handle = layer.handle();
    let service = ServiceBuilder::new().layer(layer).service(client());
    let url = api.url("/");

    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let call = service.clone().oneshot(get(&url));
            tokio::spawn(async move { (call.await, started.elapsed()) })
        })
        .collect();
    let mut results = Vec::with_capacity(callers);
    for task in tasks {
        results.push(task.await.expect("no caller panics"));
    }
    let calls_after_run = endpoint.calls();
    let follow_up_started = Instant::now();
    let follow_up = service.clone().oneshot(get(&url)).await;
    let follow_up_elapsed = follow_up_started.elapsed();

    assert_eq!(results.len(), callers, "{context}: every caller finished");
    for (result, elapsed) in &results {
        check(result, &expected.outcome, &context);
        assert!(
            *elapsed < REFRESH_TIMEOUT + slack(callers),
            "{context}: a caller took {elapsed:?}"
        );
        if fault == Fault::Hangs {
            assert!(
                *elapsed >= REFRESH_TIMEOUT,
                "{context}: released before the refresh timeout, after {elapsed:?}"
            );
        }
        if fault == Fault::TooManyRequestsForLong {
            assert!(
                *elapsed < REFRESH_TIMEOUT / 2,
                "{context}: a Retry-After beyond the budget is not waited out, yet a caller took {elapsed:?}"
            );
        }
    }
    check(
        &follow_up,
        &expected.outcome,
        &format!("{context}, the call after the run"),
    );
    assert!(
        follow_up_elapsed < slack(1),
        "{context}: the call after the run waited {follow_up_elapsed:?}"
    );
    // NOTE: the bound is one flight times the source's attempts for this fault, whatever the
    // number of callers; the call after the run uses the token, or meets the failure back-off
    // (or the late flight), and asks nothing.
    assert_eq!(
        calls_after_run, expected.endpoint_calls,
        "{context}: token endpoint calls: one flight, {} attempt(s)",
        expected.endpoint_calls
    );
    assert_eq!(
        endpoint.calls(),
        expected.endpoint_calls,
        "{context}: the call after the run asked the token endpoint again"
    );
    let stats = handle.stats();
    assert_eq!(stats.refreshes, 1, "{context}: one flight, {stats:?}");
    assert!(stats.coalesced < callers as u64, "{context}: {stats:?}");
    let served = match expected.outcome {
        Outcome::Token => callers + 1,
        Outcome::Error { .. } => 0,
    };
    assert_eq!(api.hits(), served, "{context}: API requests");
    assert!(
        api.recorded()
            .iter()
            .all(|r| r.bearer().as_deref() == Some("A1")),
        "{context}: a request reached the API without the token"
    );
}

/// Runs the matrix row of `fault` with one caller, then with a thousand.
async fn row(fault: Fault) {
    run(fault, 1).await;
    run(fault, 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_a_slow_token_endpoint_serves_every_caller_with_one_request() {
    row(Fault::Slow).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f11_a_hanging_token_endpoint_fails_every_caller_at_the_refresh_timeout() {
    row(Fault::Hangs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f11_connection_resets_are_a_transport_error_after_the_source_retries() {
    row(Fault::Resets).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f11_a_500_is_a_transient_endpoint_error_after_the_source_retries() {
    row(Fault::ServerError).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r9_a_503_then_a_token_is_one_flight_of_two_requests() {
    row(Fault::UnavailableThenToken).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r9_a_429_with_a_retry_after_inside_the_budget_is_waited_out() {
    row(Fault::TooManyRequestsBriefly).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r9_a_429_with_a_retry_after_beyond_the_budget_fails_at_once_and_is_held() {
    row(Fault::TooManyRequestsForLong).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f19_an_html_error_page_is_a_transient_error_with_an_excerpt() {
    row(Fault::HtmlErrorPage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f19_html_with_a_success_status_is_an_invalid_response_asked_once() {
    row(Fault::HtmlWithSuccess).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f19_invalid_json_with_a_success_status_is_an_invalid_response_asked_once() {
    row(Fault::InvalidJson).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f18_invalid_grant_is_terminal_and_asked_once() {
    row(Fault::InvalidGrant).await;
}

// ---------------------------------------------------------------------------------------------
// In-process peers, paused clock.
// ---------------------------------------------------------------------------------------------

/// What the in-process API saw.
#[derive(Default)]
struct ApiLog {
    served: AtomicUsize,
    without_token: AtomicUsize,
    tokens: Mutex<Vec<String>>,
}

impl ApiLog {
    fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }

    fn without_token(&self) -> usize {
        self.without_token.load(Ordering::SeqCst)
    }

    /// The distinct tokens the API saw, in order of first use.
    fn tokens(&self) -> Vec<String> {
        self.tokens.lock().unwrap().clone()
    }
}

/// An in-process API that answers 200 to any bearer token and logs what it saw.
fn api(
    log: Arc<ApiLog>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    service_fn(move |request: Request<Full<Bytes>>| {
        let bearer = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        match bearer {
            Some(token) => {
                log.served.fetch_add(1, Ordering::SeqCst);
                let mut tokens = log.tokens.lock().unwrap();
                if tokens.last() != Some(&token) {
                    tokens.push(token);
                }
            }
            None => {
                log.without_token.fetch_add(1, Ordering::SeqCst);
            }
        }
        async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::new()))) }
    })
}

/// The in-process transport of a client credentials source: answers `answer(n)` to the `n`th
/// token request (1 for the first) and notes when each request arrived.
fn transport<F, Fut>(
    calls: Arc<Mutex<Vec<Instant>>>,
    answer: F,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    service_fn(move |_request: Request<Full<Bytes>>| {
        let n = {
            let mut calls = calls.lock().unwrap();
            calls.push(Instant::now());
            calls.len()
        };
        let answer = answer(n);
        async move { Ok::<_, Infallible>(answer.await) }
    })
}

/// The most flights a layer with the default failure back-off can start in `elapsed` while
/// every one of them fails: the k-th failure in a row holds the next flight off for at least
/// half of 1 s doubled k - 1 times, capped at 30 s (the jitter scales by 0.5 to 1).
fn most_failing_flights(elapsed: Duration) -> u64 {
    let mut flights = 1;
    let mut held_off = Duration::ZERO;
    loop {
        let base = Duration::from_secs(1)
            .saturating_mul(1 << (flights - 1).min(16))
            .min(Duration::from_secs(30));
        held_off += base / 2;
        if held_off > elapsed {
            return flights;
        }
        flights += 1;
    }
}

/// The result of one call through an in-process layered service, when it started and how
/// long it took.
struct Call {
    result: Result<Response<tower_token_refresh::ResponseBody<Full<Bytes>>>, BoxError>,
    started: Instant,
    took: Duration,
}

/// Calls of an in-process layered service, made every `period` by `callers` tasks until
/// `until`, in the order they started.
async fn hammer<S>(service: S, callers: usize, period: Duration, until: Instant) -> Vec<Call>
where
    S: tower::Service<
            Request<Full<Bytes>>,
            Response = Response<tower_token_refresh::ResponseBody<Full<Bytes>>>,
            Error = BoxError,
        > + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let service = service.clone();
            tokio::spawn(async move {
                let mut calls = Vec::new();
                while Instant::now() < until {
                    let started = Instant::now();
                    let result = service.clone().oneshot(get("http://api.test/")).await;
                    calls.push(Call {
                        result,
                        started,
                        took: started.elapsed(),
                    });
                    tokio::time::sleep(period).await;
                }
                calls
            })
        })
        .collect();
    let mut calls = Vec::new();
    for task in tasks {
        calls.extend(task.await.unwrap());
    }
    calls.sort_by_key(|call| call.started);
    calls
}

#[tokio::test(start_paused = true)]
async fn r9_a_failing_token_endpoint_is_asked_at_a_bounded_rate_and_recovery_is_immediate() {
    let down = Arc::new(AtomicBool::new(true));
    let calls = Arc::new(Mutex::new(Vec::new()));
    let is_down = Arc::clone(&down);
    let transport = transport(Arc::clone(&calls), move |_| {
        let down = is_down.load(Ordering::SeqCst);
        async move {
            if down {
                respond(StatusCode::SERVICE_UNAVAILABLE, &[], "")
            } else {
                respond(StatusCode::OK, &[JSON], TOKEN)
            }
        }
    });
    let source = ClientCredentials::builder(IN_PROCESS_URL, "client", "secret")
        .transport(transport)
        .build()
        .unwrap();
    // Defaults: failure back-off 1 s doubling up to 30 s, jittered by 0.5 to 1.
    let layer = RefreshLayer::new(source);
    let handle = layer.handle();
    let log = Arc::new(ApiLog::default());
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(api(Arc::clone(&log)));
    let hammering = Duration::from_secs(60);

    // Eight callers, each calling every 10 ms for a minute: 48,000 calls.
    let started = Instant::now();
    let failing = hammer(
        service.clone(),
        8,
        Duration::from_millis(10),
        started + hammering,
    )
    .await;
    let elapsed = started.elapsed();
    let failing_calls = calls.lock().unwrap().len();
    let failing_flights = handle.stats().refreshes;
    let sent_while_down = log.served() + log.without_token();

    down.store(false, Ordering::SeqCst);
    let up_at = Instant::now();
    let recovering = hammer(
        service.clone(),
        8,
        Duration::from_millis(10),
        up_at + Duration::from_secs(31),
    )
    .await;

    assert!(failing.len() > 40_000, "{} calls", failing.len());
    for call in &failing {
        let error = call.result.as_ref().unwrap_err();
        let error = error.downcast_ref::<Error>().unwrap();
        assert!(
            error.is_transient() && error.status() == Some(StatusCode::SERVICE_UNAVAILABLE),
            "{error:?}"
        );
        // NOTE: a flight's retries wait less than 200 ms, then less than 400 ms.
        assert!(
            call.took < Duration::from_millis(600),
            "no caller waits longer than one flight's retries: {:?}",
            call.took
        );
    }
    // NOTE: the bound the contract states is one flight per minimum back-off (half the 1 s
    // base), times the source's 3 attempts; the doubling back-off keeps it much lower.
    let loose_bound = 1 + (elapsed.as_millis() / 500) as u64;
    let doubling_bound = most_failing_flights(elapsed);
    assert!(
        failing_flights <= doubling_bound && doubling_bound <= loose_bound,
        "{failing_flights} flights in {elapsed:?}, bounds {doubling_bound} and {loose_bound}"
    );
    assert_eq!(failing_calls as u64, failing_flights * ATTEMPTS as u64);
    assert_eq!(sent_while_down, 0, "nothing sent without a token");

    // Recovery: the first flight after the back-off succeeds at its first request, and every
    // call from then on has the token without waiting.
    let requests = calls.lock().unwrap().clone();
    assert_eq!(
        requests.len(),
        failing_calls + 1,
        "one request after recovery"
    );
    let since_last_failure = requests[failing_calls] - requests[failing_calls - 1];
    assert!(
        since_last_failure <= Duration::from_secs(31),
        "the longest back-off is 30 s, recovery came {since_last_failure:?} after the last failure"
    );
    let first_success = recovering
        .iter()
        .position(|call| call.result.is_ok())
        .expect("recovered");
    assert_eq!(
        recovering[first_success].started, requests[failing_calls],
        "the call that found the back-off over got the token"
    );
    assert!(recovering[first_success..]
        .iter()
        .all(|call| call.result.is_ok() && call.took.is_zero()));
    assert!(recovering[..first_success]
        .iter()
        .all(|call| call.result.is_err() && call.took.is_zero()));
    assert_eq!(handle.token_info().unwrap().generation, 1);
    assert_eq!(log.without_token(), 0);
    assert_eq!(log.tokens(), ["A1"]);
}

#[tokio::test(start_paused = true)]
async fn r9_background_refreshes_that_keep_failing_leave_the_token_in_service_at_a_bounded_rate() {
    let down = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(Mutex::new(Vec::new()));
    let is_down = Arc::clone(&down);
    let transport = transport(Arc::clone(&calls), move |n| {
        let down = is_down.load(Ordering::SeqCst);
        async move {
            if down {
                respond(StatusCode::SERVICE_UNAVAILABLE, &[], "")
            } else {
                let body =
                    format!(r#"{{"access_token":"A{n}","token_type":"Bearer","expires_in":3600}}"#);
                respond(StatusCode::OK, &[JSON], &body)
            }
        }
    });
    let source = ClientCredentials::builder(IN_PROCESS_URL, "client", "secret")
        .transport(transport)
        .build()
        .unwrap();
    let layer = RefreshLayer::new(source);
    let handle = layer.handle();
    let log = Arc::new(ApiLog::default());
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(api(Arc::clone(&log)));
    handle.refresh().await.unwrap();

    // The token is stale from 120 s before expiry and is not sent from 30 s before: 45 s of
    // failing background refreshes and a back-off of up to 30 s fit in between.
    tokio::time::advance(Duration::from_secs(3600 - 118)).await;
    down.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let failing = hammer(
        service.clone(),
        8,
        Duration::from_millis(10),
        started + Duration::from_secs(45),
    )
    .await;
    let elapsed = started.elapsed();
    let failing_flights = handle.stats().refreshes - 1;
    let failing_calls = calls.lock().unwrap().len() - 1;
    down.store(false, Ordering::SeqCst);
    let recovering = hammer(
        service.clone(),
        8,
        Duration::from_millis(10),
        Instant::now() + Duration::from_secs(31),
    )
    .await;

    assert!(failing.len() > 30_000, "{} calls", failing.len());
    assert!(
        failing
            .iter()
            .chain(&recovering)
            .all(|call| call.result.is_ok() && call.took.is_zero()),
        "every call had the valid token at once"
    );
    assert!(failing_flights >= 1);
    assert!(
        failing_flights <= most_failing_flights(elapsed),
        "{failing_flights} flights in {elapsed:?}"
    );
    assert_eq!(failing_calls as u64, failing_flights * ATTEMPTS as u64);
    assert_eq!(handle.stats().failures, failing_flights);
    assert_eq!(
        calls.lock().unwrap().len(),
        failing_calls + 2,
        "one request after recovery"
    );
    assert_eq!(handle.token_info().unwrap().generation, 2);
    assert_eq!(log.tokens().len(), 2, "the old token, then the new one");
    assert_eq!(log.without_token(), 0);
}

/// An in-process token endpoint of the refresh-token grant whose refresh tokens work once: it
/// rotates the presented one at once, then answers, the first time after `first_delay`, later
/// at once. A client that drops an answer loses the new refresh token, and its next refresh
/// gets `invalid_grant`.
struct Rotating {
    first_delay: Duration,
    books: Mutex<Books>,
}

#[derive(Default)]
struct Books {
    refresh_token: String,
    issued: usize,
    presented: Vec<String>,
    refused: usize,
}

impl Rotating {
    fn new(first_delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            first_delay,
            books: Mutex::new(Books {
                refresh_token: "R1".into(),
                ..Books::default()
            }),
        })
    }

    fn calls(&self) -> usize {
        self.books.lock().unwrap().presented.len()
    }

    fn presented(&self) -> Vec<String> {
        self.books.lock().unwrap().presented.clone()
    }

    fn refused(&self) -> usize {
        self.books.lock().unwrap().refused
    }

    /// A layer whose source asks this endpoint, starting from refresh token R1.
    fn layer(self: &Arc<Self>) -> RefreshLayer {
        let endpoint = Arc::clone(self);
        let transport = service_fn(move |request: Request<Full<Bytes>>| {
            let endpoint = Arc::clone(&endpoint);
            async move {
                let body = request.into_body().collect().await.unwrap().to_bytes();
                let presented = std::str::from_utf8(&body)
                    .unwrap()
                    .split('&')
                    .find_map(|pair| pair.strip_prefix("refresh_token="))
                    .unwrap_or_default()
                    .to_owned();
                let (answer, delay) = {
                    let mut books = endpoint.books.lock().unwrap();
                    books.presented.push(presented.clone());
                    let delay = if books.presented.len() == 1 {
                        endpoint.first_delay
                    } else {
                        Duration::ZERO
                    };
                    let answer = if presented == books.refresh_token {
                        books.issued += 1;
                        books.refresh_token = format!("R{}", books.issued + 1);
                        Some((books.issued, books.refresh_token.clone()))
                    } else {
                        books.refused += 1;
                        None
                    };
                    (answer, delay)
                };
                tokio::time::sleep(delay).await;
                let response = match answer {
                    Some((n, refresh_token)) => respond(
                        StatusCode::OK,
                        &[JSON],
                        &format!(
                            r#"{{"access_token":"A{n}","token_type":"Bearer","expires_in":3600,"refresh_token":"{refresh_token}"}}"#
                        ),
                    ),
                    None => respond(
                        StatusCode::BAD_REQUEST,
                        &[JSON],
                        r#"{"error":"invalid_grant"}"#,
                    ),
                };
                Ok::<_, Infallible>(response)
            }
        });
        let source = RefreshTokenGrant::builder(IN_PROCESS_URL, "desktop-app", "R1")
            .transport(transport)
            .build()
            .unwrap();
        RefreshLayer::new(source)
    }
}

/// Asserts that the token in service is generation `generation`, access token `access`, with
/// refresh token `refresh`.
fn assert_installed(handle: &RefreshHandle, generation: u64, access: &str, refresh: &str) {
    let token = handle.current_token().expect("a token is installed");
    assert_eq!(handle.token_info().unwrap().generation, generation);
    assert_eq!(token.expose_secret(), access);
    assert_eq!(
        token.expose_refresh_token(),
        Some(refresh),
        "rotated refresh token kept"
    );
}

#[tokio::test(start_paused = true)]
async fn r4_dropping_the_caller_that_started_a_refresh_keeps_the_refresh_and_its_rotation() {
    let endpoint = Rotating::new(Duration::from_secs(2));
    let layer = endpoint.layer();
    let handle = layer.handle();
    let log = Arc::new(ApiLog::default());
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(api(Arc::clone(&log)));

    // The caller that starts the first refresh gives up after 500 ms, mid-refresh.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(500),
        service.clone().oneshot(get("http://api.test/")),
    )
    .await;
    let calls_when_dropped = endpoint.calls();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let installed_after_the_flight = handle.token_info().map(|info| info.generation);
    let started = Instant::now();
    let later = service.clone().oneshot(get("http://api.test/")).await;
    let waited = started.elapsed();
    let next = handle.refresh().await;

    assert!(gave_up.is_err(), "the caller gave up");
    assert_eq!(calls_when_dropped, 1);
    assert_eq!(installed_after_the_flight, Some(1));
    assert!(later.is_ok());
    assert_eq!(
        waited,
        Duration::ZERO,
        "the later caller had the token at once"
    );
    assert_eq!(
        endpoint.presented(),
        ["R1", "R2"],
        "one request for the cancelled caller and the later one; the next refresh presents the rotated refresh token"
    );
    assert_eq!(next.unwrap().generation, 2);
    assert_eq!(endpoint.refused(), 0);
    assert_installed(&handle, 2, "A2", "R3");
    assert_eq!(log.tokens(), ["A1"]);
    assert_eq!(log.without_token(), 0);
}

#[tokio::test(start_paused = true)]
async fn r4_dropping_every_waiter_keeps_the_refresh_and_a_later_caller_joins_it() {
    let endpoint = Rotating::new(Duration::from_secs(2));
    let layer = endpoint.layer();
    let handle = layer.handle();
    let log = Arc::new(ApiLog::default());
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(api(Arc::clone(&log)));

    // Ten callers wait for the first token; all of them give up after 100 ms.
    let waiters: Vec<_> = (0..10)
        .map(|_| tokio::spawn(service.clone().oneshot(get("http://api.test/"))))
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for waiter in &waiters {
        waiter.abort();
    }
    for waiter in waiters {
        assert!(waiter.await.unwrap_err().is_cancelled());
    }
    let coalesced_before = handle.stats().coalesced;
    // A caller arrives at 1 s, while the flight that nobody waits for any more still runs.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let started = Instant::now();
    let joined = service.clone().oneshot(get("http://api.test/")).await;
    let waited = started.elapsed();
    let after = service.clone().oneshot(get("http://api.test/")).await;
    let next = handle.refresh().await;

    assert_eq!(coalesced_before, 9);
    assert!(joined.is_ok() && after.is_ok());
    assert_eq!(
        waited,
        Duration::from_secs(1),
        "it joined the flight, which ends at 2 s"
    );
    let stats = handle.stats();
    assert_eq!(stats.coalesced, 10, "{stats:?}");
    assert_eq!(
        stats.refreshes, 2,
        "the first and the forced one: {stats:?}"
    );
    assert_eq!(endpoint.presented(), ["R1", "R2"]);
    assert_eq!(next.unwrap().generation, 2);
    assert_eq!(endpoint.refused(), 0);
    assert_installed(&handle, 2, "A2", "R3");
    assert_eq!(log.tokens(), ["A1"]);
    assert_eq!(log.without_token(), 0);
}

#[tokio::test(start_paused = true)]
async fn r4_a_caller_during_a_late_refresh_gets_the_timeout_at_once_and_the_late_token_is_kept() {
    // The answer comes 2.5 s after the request, past the 1 s refresh timeout.
    let endpoint = Rotating::new(Duration::from_millis(2500));
    let layer = endpoint.layer().refresh_timeout(Duration::from_secs(1));
    let handle = layer.handle();
    let log = Arc::new(ApiLog::default());
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(api(Arc::clone(&log)));
    let call = || {
        let service = service.clone();
        async move {
            let started = Instant::now();
            let result = service.oneshot(get("http://api.test/")).await;
            (result, started.elapsed())
        }
    };

    let (first, first_waited) = call().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (during, during_waited) = call().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (after, after_waited) = call().await;
    let next = handle.refresh().await;

    let timeout = |result: Result<_, BoxError>| {
        result
            .unwrap_err()
            .downcast_ref::<Error>()
            .is_some_and(Error::is_timeout)
    };
    assert!(timeout(first), "the first caller gets the timeout");
    assert_eq!(first_waited, Duration::from_secs(1));
    assert!(
        timeout(during),
        "a caller during the late flight gets the timeout"
    );
    assert_eq!(during_waited, Duration::ZERO, "at once, not a hang");
    assert!(after.is_ok(), "the late token serves the next caller");
    assert_eq!(after_waited, Duration::ZERO);
    assert_eq!(
        endpoint.presented(),
        ["R1", "R2"],
        "no second request raced the late one, and the late answer's refresh token was kept"
    );
    assert_eq!(next.unwrap().generation, 2);
    assert_eq!(endpoint.refused(), 0);
    assert_installed(&handle, 2, "A2", "R3");
    assert_eq!(log.tokens(), ["A1"]);
    assert_eq!(log.without_token(), 0);
}

#[tokio::test(start_paused = true)]
async fn r4_waiters_stay_bounded_by_the_refresh_timeout_while_the_token_endpoint_is_slow() {
    // The first two token requests hang; the third answers after 1.5 s. Tokens never expire.
    let calls = Arc::new(Mutex::new(Vec::new()));
    let transport = transport(Arc::clone(&calls), |n| async move {
        if n <= 2 {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        respond(
            StatusCode::OK,
            &[JSON],
            r#"{"access_token":"A1","token_type":"Bearer"}"#,
        )
    });
    let source = ClientCredentials::builder(IN_PROCESS_URL, "client", "secret")
        .transport(transport)
        .build()
        .unwrap();
    let refresh_timeout = Duration::from_secs(2);
    let layer = RefreshLayer::new(source).refresh_timeout(refresh_timeout);
    let handle = layer.handle();
    let log = Arc::new(ApiLog::default());
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(api(Arc::clone(&log)));
    let pending = Arc::new(AtomicUsize::new(0));
    let most_pending = Arc::new(AtomicUsize::new(0));

    // A call every 7 ms for 30 s: 4,286 calls. (No flight starts or ends on a multiple of
    // 7 ms after another flight's start, so no arrival ties with a deadline.)
    let period = Duration::from_millis(7);
    let started = Instant::now();
    let mut arrivals = Vec::new();
    let mut tasks = Vec::new();
    let mut ticks = tokio::time::interval(period);
    while started.elapsed() < Duration::from_secs(30) {
        ticks.tick().await;
        arrivals.push(Instant::now());
        let call = service.clone().oneshot(get("http://api.test/"));
        let pending = Arc::clone(&pending);
        let most_pending = Arc::clone(&most_pending);
        tasks.push(tokio::spawn(async move {
            let now_pending = pending.fetch_add(1, Ordering::SeqCst) + 1;
            most_pending.fetch_max(now_pending, Ordering::SeqCst);
            let started = Instant::now();
            let result = call.await;
            pending.fetch_sub(1, Ordering::SeqCst);
            (result, started.elapsed())
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }

    // Three flights: two that hang and end at the refresh timeout, one that takes 1.5 s.
    let flights = calls.lock().unwrap().clone();
    assert_eq!(flights.len(), 3, "one request per flight");
    let stats = handle.stats();
    assert_eq!(stats.refreshes, 3, "{stats:?}");
    for (result, took) in &results {
        assert!(*took <= refresh_timeout, "a caller waited {took:?}");
        if let Err(error) = result {
            let error = error.downcast_ref::<Error>().unwrap();
            assert!(error.is_timeout(), "{error:?}");
        }
    }
    // Every caller that arrived while a flight was within its first refresh timeout joined
    // it; no other caller waited.
    let waits = [
        refresh_timeout,
        refresh_timeout,
        Duration::from_millis(1500),
    ];
    let joined: usize = flights
        .iter()
        .zip(waits)
        .map(|(start, wait)| {
            arrivals
                .iter()
                .filter(|at| **at > *start && **at < *start + wait)
                .count()
        })
        .sum();
    assert_eq!(stats.coalesced, joined as u64, "{stats:?}");
    // NOTE: no queue: at most the callers of one refresh timeout wait at once.
    let one_timeout_of_arrivals = (refresh_timeout.as_millis() / period.as_millis()) as usize + 1;
    assert!(
        most_pending.load(Ordering::SeqCst) <= one_timeout_of_arrivals,
        "{} callers pending at once",
        most_pending.load(Ordering::SeqCst)
    );
    assert_eq!(pending.load(Ordering::SeqCst), 0, "nobody left waiting");
    let installed_at = flights[2] + Duration::from_millis(1500);
    let after_install = arrivals.iter().filter(|at| **at >= installed_at).count();
    let succeeded = results.iter().filter(|(result, _)| result.is_ok()).count();
    let joined_the_last = arrivals
        .iter()
        .filter(|at| **at >= flights[2] && **at < installed_at)
        .count();
    assert_eq!(succeeded, after_install + joined_the_last);
    assert_eq!(log.served(), succeeded);
    assert_eq!(log.without_token(), 0, "nothing sent without a token");
}
