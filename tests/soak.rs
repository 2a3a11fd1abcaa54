//! A bounded soak (R3, R5, R6, R9, and memory): 32 callers drive a protected API on 127.0.0.1
//! through the layer over hyper-util's client for `SOAK_SECONDS` (30 by default), while the
//! token endpoint on 127.0.0.1 now and then answers 503, answers slowly or resets the
//! connection, tokens live 3 seconds, and the API now and then revokes every token.
//!
//! # Which failures a correct client could have saved
//!
//! A call may fail only when no client could have made it succeed:
//!
//! - the token endpoint gave no token within the refresh timeout, or
//! - the API rejected the call's retry too, which had a token fetched after the first
//!   rejection (R6: one retry, then the truth).
//!
//! The faults are shaped so that neither can happen, and so every call must succeed:
//!
//! - the token endpoint never fails twice in a row, so the source's second attempt, 200 ms
//!   after the first at most, gets a token, and a refresh takes well under the refresh
//!   timeout (a slow answer takes 300 ms at most);
//! - a revocation spares tokens issued less than [`REVOCATION_MIN_AGE`] (1 s) before it, the
//!   time a client needs to put a fresh token to use: a token revoked the moment it is issued
//!   would fail the retry of every client.
//!
//! Set `SOAK_SECONDS` to run longer, and `SOAK_SEED` to replay the faults of an earlier run
//! (each run prints its seed).
#![allow(unsafe_code)]

mod common;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::HashMap,
    convert::Infallible,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use axum::{extract::State, Router};
use bytes::Bytes;
use common::{client, get, ok, respond, unauthorized};
use http::{header, HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, time::Instant};
use tower::{ServiceBuilder, ServiceExt};
use tower_token_refresh::{source::oauth2::ClientCredentials, RefreshLayer};

/// The system allocator, counting the bytes that are live.
struct Counted;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counted {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
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

const CALLERS: usize = 32;
/// What the token endpoint's `expires_in` says.
const TOKEN_LIFETIME: Duration = Duration::from_secs(3);
const REFRESH_TIMEOUT: Duration = Duration::from_secs(2);
/// A revocation spares tokens younger than this: the time a client needs to put a fresh
/// token to use.
const REVOCATION_MIN_AGE: Duration = Duration::from_secs(1);
/// The longest slow answer of the token endpoint.
const SLOWEST_ANSWER: Duration = Duration::from_millis(300);
/// Live heap bytes may grow this much between the end of the warm-up and the end.
const HEAP_SLACK: usize = 4 * 1024 * 1024;
/// Resident memory may grow this much between the end of the warm-up and the end.
const RSS_SLACK: usize = 32 * 1024 * 1024;

/// A small xorshift generator: the faults of a run follow from its seed.
struct Rng(u64);

impl Rng {
    /// A generator seeded from `SOAK_SEED`, or at random; returns the seed too.
    fn seeded() -> (Self, u64) {
        use std::hash::{BuildHasher, Hasher};

        let seed = std::env::var("SOAK_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
                hasher.write_u64(0);
                hasher.finish()
            });
        (Self::from_seed(seed), seed)
    }

    fn from_seed(seed: u64) -> Self {
        Self(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the token endpoint does with one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Token,
    Slow(Duration),
    Unavailable,
    Reset,
}

impl Answer {
    fn is_fault(self) -> bool {
        matches!(self, Self::Unavailable | Self::Reset)
    }
}

/// Counters of the servers.
#[derive(Default)]
struct Counters {
    token_connections: AtomicU64,
    resets: AtomicU64,
    unavailable: AtomicU64,
    slow: AtomicU64,
    issued: AtomicU64,
    revocations: AtomicU64,
    served: AtomicU64,
    rejected: AtomicU64,
    without_token: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn read(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// The tokens the token endpoint issued and the API accepts.
#[derive(Default)]
struct Ledger {
    /// When each token that has not expired was issued, by number.
    issued: HashMap<u64, Instant>,
    next: u64,
    /// Tokens up to this number are revoked.
    revoked_up_to: u64,
}

/// The state the token endpoint, the API and the revoker share.
struct Authority {
    ledger: Mutex<Ledger>,
    faults: Mutex<(Rng, Answer)>,
    counters: Counters,
}

impl Authority {
    /// Decides what the token endpoint does with its next connection: never two faults in a
    /// row.
    fn next_answer(&self) -> Answer {
        let mut faults = self.faults.lock().unwrap();
        let (rng, last) = &mut *faults;
        let roll = rng.below(100);
        let slow = Duration::from_millis(50 + rng.below(SLOWEST_ANSWER.as_millis() as u64 - 50));
        let answer = match roll {
            _ if last.is_fault() => Answer::Token,
            0..15 => Answer::Reset,
            15..40 => Answer::Unavailable,
            40..65 => Answer::Slow(slow),
            _ => Answer::Token,
        };
        *last = answer;
        answer
    }

    /// Issues a token, and forgets the ones that have expired.
    fn issue(&self) -> String {
        let now = Instant::now();
        let mut ledger = self.ledger.lock().unwrap();
        ledger.issued.retain(|_, at| *at + TOKEN_LIFETIME > now);
        ledger.next += 1;
        let n = ledger.next;
        ledger.issued.insert(n, now);
        bump(&self.counters.issued);
        format!("tok-{n}")
    }

    /// Revokes every token issued at least [`REVOCATION_MIN_AGE`] ago.
    fn revoke(&self) {
        let now = Instant::now();
        let cutoff = now.checked_sub(REVOCATION_MIN_AGE).unwrap_or(now);
        let mut ledger = self.ledger.lock().unwrap();
        let newest_old = ledger
            .issued
            .iter()
            .filter(|(_, at)| **at <= cutoff)
            .map(|(n, _)| *n)
            .max();
        if let Some(n) = newest_old {
            ledger.revoked_up_to = ledger.revoked_up_to.max(n);
        }
        bump(&self.counters.revocations);
    }

    /// Whether the API accepts `token`: issued, not expired, not revoked.
    fn accepts(&self, token: &str) -> bool {
        let Some(n) = token
            .strip_prefix("tok-")
            .and_then(|n| n.parse::<u64>().ok())
        else {
            return false;
        };
        let ledger = self.ledger.lock().unwrap();
        let live = ledger
            .issued
            .get(&n)
            .is_some_and(|at| *at + TOKEN_LIFETIME > Instant::now());
        live && n > ledger.revoked_up_to
    }
}

/// The token endpoint: one request per connection, and what [`Authority::next_answer`] says.
async fn token_endpoint(authority: Arc<Authority>) -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/token", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of file descriptors, say: the client's retry meets a later accept.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let counters = &authority.counters;
            bump(&counters.token_connections);
            let answer = authority.next_answer();
            if answer == Answer::Reset {
                bump(&counters.resets);
                let _ = stream.set_zero_linger();
                drop(stream);
                continue;
            }

            let authority = Arc::clone(&authority);
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let authority = Arc::clone(&authority);
                    async move {
                        let _ = request.into_body().collect().await;
                        Ok::<_, Infallible>(token_answer(&authority, answer).await)
                    }
                });
                let _ = http1::Builder::new()
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, task)
}

async fn token_answer(authority: &Authority, answer: Answer) -> Response<Full<Bytes>> {
    let counters = &authority.counters;
    match answer {
        Answer::Unavailable => {
            bump(&counters.unavailable);
            return respond(StatusCode::SERVICE_UNAVAILABLE, &[], "try again");
        }
        Answer::Slow(delay) => {
            bump(&counters.slow);
            tokio::time::sleep(delay).await;
        }
        Answer::Token | Answer::Reset => {}
    }
    let body = format!(
        r#"{{"access_token":"{}","token_type":"Bearer","expires_in":{}}}"#,
        authority.issue(),
        TOKEN_LIFETIME.as_secs()
    );
    respond(
        StatusCode::OK,
        &[("content-type", "application/json")],
        &body,
    )
}

/// The protected API: 200 for a token the authority accepts, 401 `invalid_token` otherwise.
async fn api(authority: Arc<Authority>) -> (String, tokio::task::JoinHandle<()>) {
    let app = Router::new()
        .fallback(
            |State(authority): State<Arc<Authority>>, headers: HeaderMap| async move {
                let counters = &authority.counters;
                let bearer = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "));
                match bearer {
                    None => {
                        bump(&counters.without_token);
                        unauthorized("invalid_request")
                    }
                    Some(token) if authority.accepts(token) => {
                        bump(&counters.served);
                        ok("served")
                    }
                    Some(_) => {
                        bump(&counters.rejected);
                        unauthorized("invalid_token")
                    }
                }
            },
        )
        .with_state(authority);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/orders", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (url, task)
}

/// The resident set size of this process, from `/proc/self/status`; `None` where there is no
/// such file.
fn resident_bytes() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn soak_duration() -> Duration {
    let seconds = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(30)
        .max(5);
    Duration::from_secs(seconds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_every_call_succeeds_the_token_endpoint_is_asked_within_bounds_and_memory_is_flat() {
    let duration = soak_duration();
    let warm_up = (duration / 6).min(Duration::from_secs(10));
    let (rng, seed) = Rng::seeded();
    println!("soak: {duration:?}, seed {seed} (SOAK_SEED={seed} replays these faults)");
    let authority = Arc::new(Authority {
        ledger: Mutex::new(Ledger::default()),
        faults: Mutex::new((rng, Answer::Token)),
        counters: Counters::default(),
    });
    let (token_url, token_task) = token_endpoint(Arc::clone(&authority)).await;
    let (api_url, api_task) = api(Arc::clone(&authority)).await;
    let source = ClientCredentials::builder(token_url, "soak-client", "soak-secret")
        .retry_budget(Duration::from_secs(1))
        .build()
        .unwrap();
    let layer = RefreshLayer::new(source).refresh_timeout(REFRESH_TIMEOUT);
    let handle = layer.handle();
    let service = ServiceBuilder::new().layer(layer).service(client());

    let revoker = {
        let authority = Arc::clone(&authority);
        let mut rng = Rng::from_seed(seed.rotate_left(17));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(1000 + rng.below(3000))).await;
                authority.revoke();
            }
        })
    };
    let calls = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new((0u64, Vec::<String>::new())));
    let slowest = Arc::new(Mutex::new(Duration::ZERO));
    let started = Instant::now();
    let deadline = started + duration;
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (service, url) = (service.clone(), api_url.clone());
            let (calls, failures, slowest) = (
                Arc::clone(&calls),
                Arc::clone(&failures),
                Arc::clone(&slowest),
            );
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let call_started = Instant::now();
                    let outcome = match service.clone().oneshot(get(&url)).await {
                        Ok(response) => {
                            let status = response.status();
                            let body = response.into_body().collect().await;
                            match (status, body) {
                                (StatusCode::OK, Ok(_)) => Ok(()),
                                (status, _) => Err(format!("status {status}")),
                            }
                        }
                        Err(error) => Err(format!("error: {error}")),
                    };
                    let took = call_started.elapsed();
                    calls.fetch_add(1, Ordering::Relaxed);
                    {
                        let mut slowest = slowest.lock().unwrap();
                        *slowest = (*slowest).max(took);
                    }
                    if let Err(failure) = outcome {
                        let mut failures = failures.lock().unwrap();
                        failures.0 += 1;
                        if failures.1.len() < 10 {
                            let at = call_started - started;
                            failures.1.push(format!("at {at:?}: {failure}"));
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        })
        .collect();

    tokio::time::sleep(warm_up).await;
    let heap_after_warm_up = LIVE.load(Ordering::Relaxed);
    let rss_after_warm_up = resident_bytes();
    tokio::time::sleep_until(deadline - Duration::from_millis(100)).await;
    let heap_at_end = LIVE.load(Ordering::Relaxed);
    let rss_at_end = resident_bytes();
    for caller in callers {
        caller.await.expect("no caller panics");
    }
    let elapsed = started.elapsed();
    // NOTE: a call near the end may have started a background refresh that is still running:
    // it is let finish, within the refresh timeout, before the token endpoint is stopped and
    // its tokens are counted.
    let settle = Instant::now() + REFRESH_TIMEOUT;
    while Instant::now() < settle {
        let stats = handle.stats();
        if stats.refreshes <= read(&authority.counters.issued) + stats.failures {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    revoker.abort();
    token_task.abort();
    api_task.abort();

    let counters = &authority.counters;
    let stats = handle.stats();
    let (failed, examples) = failures.lock().unwrap().clone();
    let slowest = *slowest.lock().unwrap();
    let calls = calls.load(Ordering::Relaxed);
    let revocations = read(&counters.revocations);
    let summary = format!(
        "calls {calls}, failed {failed}, slowest {slowest:?}, revocations {revocations}, \
         token connections {} (resets {}, 503s {}, slow {}), tokens issued {}, \
         API served {} rejected {} without token {}, {stats:?}, \
         live heap {heap_after_warm_up} -> {heap_at_end} bytes, \
         RSS {rss_after_warm_up:?} -> {rss_at_end:?} bytes",
        read(&counters.token_connections),
        read(&counters.resets),
        read(&counters.unavailable),
        read(&counters.slow),
        read(&counters.issued),
        read(&counters.served),
        read(&counters.rejected),
        read(&counters.without_token),
    );
    println!("soak: {summary}");

    assert!(calls > 1000, "the soak ran: {summary}");
    assert_eq!(
        failed, 0,
        "every call could have been saved, yet some failed: {examples:#?}\n{summary}"
    );
    assert_eq!(
        read(&counters.without_token),
        0,
        "a call reached the API without a token: {summary}"
    );
    assert!(
        slowest < REFRESH_TIMEOUT,
        "no call waits longer than the refresh timeout: {summary}"
    );
    assert_eq!(stats.failures, 0, "no refresh failed: {summary}");
    // NOTE: flights: the first; one per lifetime / 2 (a token is stale half its lifetime
    // after its request was sent, and a flight starts only for a stale, expired or rejected
    // token); one per revocation (a rejection of the current token). Each flight makes at
    // most two requests, since the endpoint never fails twice in a row.
    let flight_bound =
        2 + elapsed.as_millis() as u64 / (TOKEN_LIFETIME.as_millis() as u64 / 2) + revocations;
    assert!(
        stats.refreshes <= flight_bound,
        "at most {flight_bound} flights: {summary}"
    );
    assert!(
        read(&counters.token_connections) <= 2 * stats.refreshes,
        "at most two token requests per flight: {summary}"
    );
    assert_eq!(
        read(&counters.issued),
        stats.refreshes,
        "each flight got exactly one token: {summary}"
    );
    // NOTE: the live heap, counted by the allocator above, is the real measure; resident
    // memory is only a coarse check, since the allocator keeps freed pages, per-thread
    // arenas grow to their peak and never shrink, and the kernel counts pages as they are
    // touched.
    assert!(
        heap_at_end < heap_after_warm_up + HEAP_SLACK,
        "the live heap grew by more than {HEAP_SLACK} bytes: {summary}"
    );
    if let (Some(before), Some(after)) = (rss_after_warm_up, rss_at_end) {
        assert!(
            after < before + RSS_SLACK,
            "resident memory grew by more than {RSS_SLACK} bytes: {summary}"
        );
    }
}
