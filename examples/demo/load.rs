//! The load: concurrent callers that alternate GETs and POSTs with JSON bodies through the
//! layered client until the deadline, and what they saw.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use serde_json::{json, Value};
use tokio::time::Instant;
use tower::ServiceExt;
use tower_token_refresh::Refresh;

use crate::audit::CALL_HEADER;

/// The client under test: hyper-util's client behind the refresh layer.
pub(crate) type ApiClient = Refresh<Client<HttpConnector, Full<Bytes>>>;

/// A call that takes longer counts as failed, so that the demo ends on time even when a
/// server hangs. Well above the refresh timeout: a call may have to wait for one refresh.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// A caller whose call failed waits this long before the next one, so that a broken setup
/// (wrong credentials, no server) does not spin every caller in a tight loop. Calls that
/// succeed never wait.
const FAILURE_PAUSE: Duration = Duration::from_millis(100);

/// How many different kinds of failure are kept for the report.
const FAILURE_KINDS_KEPT: usize = 8;

/// Where the calls go.
pub(crate) struct Target {
    /// The API's base URL, without a trailing slash.
    pub(crate) base: String,
    /// Whether the API echoes POSTed orders, as the embedded one does.
    pub(crate) checks_echo: bool,
}

/// What the callers saw.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) gets: u64,
    pub(crate) posts: u64,
    pub(crate) successes: u64,
    pub(crate) failures: u64,
    pub(crate) latencies: Vec<Duration>,
    /// Failure descriptions and how often each occurred.
    pub(crate) failure_kinds: BTreeMap<String, u64>,
    /// How long the load ran, from the first call to the end of the last.
    pub(crate) elapsed: Duration,
}

impl Tally {
    fn record(&mut self, method: &Method, latency: Duration, outcome: Result<(), String>) {
        if method == Method::GET {
            self.gets += 1;
        } else {
            self.posts += 1;
        }
        self.latencies.push(latency);

        match outcome {
            Ok(()) => self.successes += 1,
            Err(kind) => {
                self.failures += 1;
                self.count_failure(kind, 1);
            }
        }
    }

    fn count_failure(&mut self, kind: String, times: u64) {
        let kept = self.failure_kinds.len() < FAILURE_KINDS_KEPT;
        if kept || self.failure_kinds.contains_key(&kind) {
            *self.failure_kinds.entry(kind).or_default() += times;
        }
    }

    fn merge(&mut self, other: Tally) {
        self.gets += other.gets;
        self.posts += other.posts;
        self.successes += other.successes;
        self.failures += other.failures;
        self.latencies.extend(other.latencies);
        for (kind, times) in other.failure_kinds {
            self.count_failure(kind, times);
        }
    }

    pub(crate) fn calls(&self) -> u64 {
        self.successes + self.failures
    }
}

/// Runs `concurrency` callers through `client` for `duration`, and waits for all of them.
pub(crate) async fn run(
    client: ApiClient,
    target: Target,
    concurrency: usize,
    duration: Duration,
) -> Tally {
    let target = Arc::new(target);
    let started = Instant::now();
    let deadline = started + duration;

    let callers: Vec<_> = (0..concurrency)
        .map(|id| {
            let caller = caller(client.clone(), Arc::clone(&target), id as u64, deadline);
            tokio::spawn(caller)
        })
        .collect();
    // Only the callers hold the client now: when they end, its connections close.
    drop(client);

    let mut tally = Tally::default();
    for caller in callers {
        match caller.await {
            Ok(seen) => tally.merge(seen),
            Err(error) => {
                tally.failures += 1;
                tally.count_failure(format!("caller task ended abnormally: {error}"), 1);
            }
        }
    }
    tally.elapsed = started.elapsed();
    tally
}

/// One caller: calls one after the other until `deadline`.
async fn caller(client: ApiClient, target: Arc<Target>, id: u64, deadline: Instant) -> Tally {
    let mut tally = Tally::default();

    let mut seq = 0;
    while Instant::now() < deadline {
        // Callers start on different methods, so that GETs and POSTs are always in flight.
        let (request, expected) = if (id + seq) % 2 == 0 {
            (read_order(&target.base, id, seq), None)
        } else {
            let (request, echo) = create_order(&target.base, id, seq);
            (request, target.checks_echo.then_some(echo))
        };
        let method = request.method().clone();

        let started = Instant::now();
        let call = call(client.clone(), request, expected);
        let outcome = match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("{method}: no answer within {CALL_TIMEOUT:?}")),
        };
        let failed = outcome.is_err();
        tally.record(&method, started.elapsed(), outcome);

        if failed {
            tokio::time::sleep_until(deadline.min(Instant::now() + FAILURE_PAUSE)).await;
        }
        seq += 1;
    }
    tally
}

fn read_order(base: &str, caller: u64, seq: u64) -> Request<Full<Bytes>> {
    let id = caller * 1_000_000 + seq;
    Request::get(format!("{base}/orders/{id}"))
        .header(CALL_HEADER, format!("{caller}-{seq}"))
        .body(Full::default())
        .expect("a valid request")
}

/// A POST whose JSON body varies in size, and the echo the embedded API answers it with.
fn create_order(base: &str, caller: u64, seq: u64) -> (Request<Full<Bytes>>, Value) {
    let items: Vec<u64> = (0..1 + seq % 16)
        .map(|i| (caller * 31 + seq * 7 + i * 13) % 1000)
        .collect();
    let sum: u64 = items.iter().sum();
    let note = "x".repeat(64 * (seq % 8) as usize);
    let body = json!({ "worker": caller, "seq": seq, "items": items, "sum": sum, "note": note });

    let request = Request::post(format!("{base}/orders"))
        .header(header::CONTENT_TYPE, "application/json")
        .header(CALL_HEADER, format!("{caller}-{seq}"))
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid request");
    let echo = json!({ "worker": caller, "seq": seq, "sum": sum });
    (request, echo)
}

/// Sends one request; a failure is described in a line that is the same for all failures of
/// its kind, so that they can be counted together.
async fn call(
    client: ApiClient,
    request: Request<Full<Bytes>>,
    expected: Option<Value>,
) -> Result<(), String> {
    let method = request.method().clone();

    let response = client
        .oneshot(request)
        .await
        .map_err(|error| format!("{method}: {}", with_sources(&*error)))?;
    let status = response.status();
    let challenge = response
        .headers()
        .get(header::WWW_AUTHENTICATE)
        .and_then(|value| value.to_str().ok())
        .map(|value| format!(" (WWW-Authenticate: {value})"))
        .unwrap_or_default();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|error| format!("{method}: response body broke off: {error}"))?
        .to_bytes();

    if !status.is_success() {
        return Err(format!("{method}: {status}{challenge}"));
    }
    if let Some(expected) = expected {
        let echo: Option<Value> = serde_json::from_slice(&body).ok();
        if echo.as_ref() != Some(&expected) {
            return Err(format!(
                "{method}: the API did not echo the order that was sent"
            ));
        }
    }
    Ok(())
}

/// An error and its sources, joined by `: `.
fn with_sources(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
