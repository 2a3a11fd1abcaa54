//! The model check of the token state: loom runs two or three callers of a real [`Refresh`]
//! service, the refresh tasks they start, and a cancelled caller through every interleaving
//! of their steps (up to [`PREEMPTIONS`] forced switches per run,
//! [`PREEMPTIONS_THREE_CALLERS`] with three callers). Each run must keep R3 (one refresh at a
//! time, one outcome for all its waiters, no refresh for a caller that comes after one
//! finished) and R5 (a rejection of a replaced token causes no second refresh).
//!
//! Run with `RUSTFLAGS="--cfg token_refresh_loom" cargo test --release --lib state::model`
//! (`.ci/run` does). Under this cfg the primitives of [`crate::sync`] are loom's; the clock
//! stands still and timers never fire, so timing is left to the paused-clock tests.
//!
//! [`Refresh`]: crate::Refresh

use std::{
    convert::Infallible,
    future::Future,
    pin::pin,
    sync::{
        atomic::{AtomicUsize, Ordering as StdOrdering},
        Arc,
    },
    task::{Context, Waker},
};

use bytes::Bytes;
use http::{header::AUTHORIZATION, Request, Response, StatusCode};
use http_body_util::Empty;
use loom::sync::atomic::{AtomicUsize as LoomUsize, Ordering};
use tower::{service_fn, Layer, Service, ServiceExt};

use crate::{source, Error, RefreshHandle, RefreshLayer, Token};

/// Forced thread switches per run with two callers; every interleaving within this bound is
/// explored.
const PREEMPTIONS: usize = 3;

/// The same for three callers, where a bound of three takes several minutes.
const PREEMPTIONS_THREE_CALLERS: usize = 2;

fn check(preemptions: usize, model: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(preemptions);
    builder.check(model);
}

/// What the model's token endpoint says when a fetch fails.
const ENDPOINT_ERROR: &str = "token endpoint unavailable";

/// The token endpoint of the model: hands out `t1`, `t2`, ... and checks that no two fetches
/// ever overlap (R3).
struct Endpoint {
    fetches: AtomicUsize,
    running: LoomUsize,
    /// Fetches with these numbers fail with a transient error.
    failing: &'static [usize],
    /// Tokens with these numbers ask to be replaced at once (they are stale on arrival).
    stale: &'static [usize],
}

impl Endpoint {
    fn new(failing: &'static [usize], stale: &'static [usize]) -> Arc<Self> {
        Arc::new(Self {
            fetches: AtomicUsize::new(0),
            running: LoomUsize::new(0),
            failing,
            stale,
        })
    }

    fn fetches(&self) -> usize {
        self.fetches.load(StdOrdering::SeqCst)
    }

    fn layer(self: &Arc<Self>) -> RefreshLayer {
        let endpoint = Arc::clone(self);
        RefreshLayer::new(source::from_fn(move |_previous| {
            let endpoint = Arc::clone(&endpoint);
            async move {
                let overlapping = endpoint.running.fetch_add(1, Ordering::SeqCst);
                assert_eq!(overlapping, 0, "R3: two refreshes ran at once");
                let n = endpoint.fetches.fetch_add(1, StdOrdering::SeqCst) + 1;
                endpoint.running.fetch_sub(1, Ordering::SeqCst);
                if endpoint.failing.contains(&n) {
                    return Err(Error::transient(ENDPOINT_ERROR));
                }
                let token = Token::new(format!("t{n}"));
                Ok(if endpoint.stale.contains(&n) {
                    token.with_refresh_at(crate::sync::now())
                } else {
                    token
                })
            }
        }))
    }
}

/// The API of the model: accepts tokens from `t{accepts_from}` on and answers 401 to older
/// ones. Every answer carries the token it saw, so callers can tell which one got through.
fn api(
    accepts_from: usize,
) -> impl Service<
    Request<Empty<Bytes>>,
    Response = Response<Empty<Bytes>>,
    Error = Infallible,
    Future = impl Future + Send,
> + Clone
       + Send {
    service_fn(move |request: Request<Empty<Bytes>>| {
        let token = request.headers().get(AUTHORIZATION).cloned();
        let number = token
            .as_ref()
            .and_then(|v| v.to_str().ok()?.strip_prefix("Bearer t")?.parse().ok())
            .unwrap_or(0usize);
        async move {
            let mut response = Response::new(Empty::new());
            if number < accepts_from {
                *response.status_mut() = StatusCode::UNAUTHORIZED;
            }
            if let Some(token) = token {
                response.headers_mut().insert("x-seen", token);
            }
            Ok::<_, Infallible>(response)
        }
    })
}

/// What a caller got: the status and the token the API saw last.
#[derive(Debug)]
struct Seen {
    status: StatusCode,
    token: Option<String>,
}

async fn call<S>(client: S) -> Result<Seen, crate::BoxError>
where
    S: Service<Request<Empty<Bytes>>, Response = Response<crate::ResponseBody<Empty<Bytes>>>>,
    S::Error: Into<crate::BoxError>,
{
    let response = client
        .oneshot(Request::new(Empty::new()))
        .await
        .map_err(Into::into)?;
    Ok(Seen {
        status: response.status(),
        token: response
            .headers()
            .get("x-seen")
            .map(|v| v.to_str().unwrap().to_owned()),
    })
}

/// Polls a future once, then drops it: a caller that gives up mid-way.
fn poll_once_then_drop(future: impl Future) {
    let mut future = pin!(future);
    let _ = future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()));
}

/// Starts a caller that gives up after one poll, on a thread of its own.
fn spawn_quitter<S>(client: S) -> loom::thread::JoinHandle<()>
where
    S: Service<Request<Empty<Bytes>>, Response = Response<crate::ResponseBody<Empty<Bytes>>>>
        + Send
        + 'static,
    S::Error: Into<crate::BoxError>,
{
    loom::thread::spawn(move || poll_once_then_drop(call(client)))
}

/// Starts a caller on a thread of its own.
fn spawn_call<S>(client: S) -> loom::thread::JoinHandle<Result<Seen, crate::BoxError>>
where
    S: Service<Request<Empty<Bytes>>, Response = Response<crate::ResponseBody<Empty<Bytes>>>>
        + Send
        + 'static,
    S::Error: Into<crate::BoxError>,
{
    loom::thread::spawn(move || loom::future::block_on(call(client)))
}

/// Asserts that every caller got through with `token`.
fn all_got_through(seen: impl IntoIterator<Item = Seen>, token: &str) {
    for seen in seen {
        assert_eq!(seen.status, StatusCode::OK);
        assert_eq!(seen.token.as_deref(), Some(token));
    }
}

fn generation(handle: &RefreshHandle) -> Option<u64> {
    handle.token_info().map(|info| info.generation)
}

/// R3: callers that meet no token share one refresh, and all get through with it.
#[test]
fn callers_meeting_no_token_share_one_refresh() {
    check(PREEMPTIONS_THREE_CALLERS, || {
        let endpoint = Endpoint::new(&[], &[]);
        let layer = endpoint.layer();
        let client = layer.layer(api(1));

        let threads: Vec<_> = (0..2).map(|_| spawn_call(client.clone())).collect();
        let main = loom::future::block_on(call(client)).unwrap();

        let others = threads.into_iter().map(|t| t.join().unwrap().unwrap());
        all_got_through(others.chain([main]), "Bearer t1");
        assert_eq!(endpoint.fetches(), 1);
        assert_eq!(generation(&layer.handle()), Some(1));
    });
}

/// R3 + R5: callers whose token is rejected share one refresh, whichever of them sees the
/// rejection first, and each is retried once with the new token; a rejection that arrives
/// after the new token was installed causes no second refresh.
#[test]
fn rejected_callers_share_one_refresh_and_late_rejections_cause_none() {
    check(PREEMPTIONS, || {
        let endpoint = Endpoint::new(&[], &[]);
        let layer = endpoint.layer();
        // The API takes t2 on only: t1 is rejected by every caller that sends it.
        let client = layer.layer(api(2));
        // Install t1 before the callers start.
        loom::future::block_on(layer.handle().refresh()).unwrap();

        let other = spawn_call(client.clone());
        let main = loom::future::block_on(call(client)).unwrap();
        let other = other.join().unwrap().unwrap();

        all_got_through([main, other], "Bearer t2");
        assert_eq!(endpoint.fetches(), 2, "R5: one refresh for t1's rejections");
        assert_eq!(generation(&layer.handle()), Some(2));
    });
}

/// R4: a caller that starts a refresh and gives up never cancels it, and a caller that
/// comes meanwhile or after neither waits on a dead flight nor starts a second refresh.
#[test]
fn a_caller_that_gives_up_cancels_nothing() {
    check(PREEMPTIONS, || {
        let endpoint = Endpoint::new(&[], &[]);
        let layer = endpoint.layer();
        let client = layer.layer(api(2));
        loom::future::block_on(layer.handle().refresh()).unwrap();

        let quitter = spawn_quitter(client.clone());
        let seen = loom::future::block_on(call(client)).unwrap();
        quitter.join().unwrap();

        assert_eq!(seen.status, StatusCode::OK);
        assert_eq!(seen.token.as_deref(), Some("Bearer t2"));
        // Loom waits for the refresh task too: whoever started it, it ran to the end.
        assert_eq!(endpoint.fetches(), 2);
    });
}

/// R3 + R9: the waiters of a failed refresh all get its error, and none starts another
/// while its back-off lasts (the model's clock stands still, so it lasts).
#[test]
fn waiters_of_a_failed_refresh_share_its_error() {
    check(PREEMPTIONS, || {
        let endpoint = Endpoint::new(&[1], &[]);
        let layer = endpoint.layer();
        let client = layer.layer(api(1));

        let other = spawn_call(client.clone());
        let main = loom::future::block_on(call(client));
        let other = other.join().unwrap();

        for result in [main, other] {
            let error = result.unwrap_err();
            let error = error.downcast_ref::<Error>().expect("a token error");
            assert!(error.is_transient() && !error.is_timeout(), "{error:?}");
            assert_eq!(
                error.to_string(),
                Error::transient(ENDPOINT_ERROR).to_string()
            );
        }
        assert_eq!(endpoint.fetches(), 1);
        assert_eq!(generation(&layer.handle()), None);
    });
}

/// R3 on the stale path: a token that asks to be replaced keeps serving callers while one
/// background refresh replaces it; nobody waits and nobody starts a second one. (The token
/// is stale on arrival, so the refresh that installed it holds the next one back for a
/// back-off base; in the model that pause ends at any point, so one or two fetches are both
/// right, three never.)
#[test]
fn a_stale_token_is_replaced_once_in_the_background() {
    check(PREEMPTIONS, || {
        let endpoint = Endpoint::new(&[], &[1]);
        let layer = endpoint.layer();
        let client = layer.layer(api(1));
        loom::future::block_on(layer.handle().refresh()).unwrap();

        let other = spawn_call(client.clone());
        let main = loom::future::block_on(call(client)).unwrap();
        let other = other.join().unwrap().unwrap();

        for seen in [main, other] {
            assert_eq!(seen.status, StatusCode::OK);
            let token = seen.token.unwrap();
            assert!(token == "Bearer t1" || token == "Bearer t2", "{token}");
        }
        assert!((1..=2).contains(&endpoint.fetches()));
    });
}

/// R3 + R4 + R5 with three callers: two whose token is rejected, and one that gives up
/// half-way. One refresh replaces the rejected token, whoever starts it.
#[test]
fn three_callers_with_a_rejection_and_a_quitter_cause_one_refresh() {
    check(PREEMPTIONS_THREE_CALLERS, || {
        let endpoint = Endpoint::new(&[], &[]);
        let layer = endpoint.layer();
        let client = layer.layer(api(2));
        loom::future::block_on(layer.handle().refresh()).unwrap();

        let quitter = spawn_quitter(client.clone());
        let other = spawn_call(client.clone());
        let main = loom::future::block_on(call(client)).unwrap();
        let other = other.join().unwrap().unwrap();
        quitter.join().unwrap();

        all_got_through([main, other], "Bearer t2");
        assert_eq!(endpoint.fetches(), 2);
        assert_eq!(generation(&layer.handle()), Some(2));
    });
}
