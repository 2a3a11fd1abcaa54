//! Resources, readiness and failure paths: the token state is freed, a waiting request holds no
//! permit, a late refresh still installs its token, a failed refresh after one rejection does
//! not take the token out of service.

mod common;

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use common::{get, Counting};
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use tokio::time::Instant;
use tower::{
    limit::GlobalConcurrencyLimitLayer, service_fn, Layer, Service, ServiceBuilder, ServiceExt,
};
use tower_token_refresh::{source, Error, RefreshLayer, Token, TokenSource};

type Seen = Arc<Mutex<Vec<String>>>;

fn bearer<B>(request: &Request<B>) -> String {
    request
        .headers()
        .get(http::header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap().trim_start_matches("Bearer ").to_owned())
        .unwrap_or_default()
}

/// Answers 200 to `accepted` on any path but `/broken`, 401 otherwise; records each token.
fn api(
    seen: Seen,
    accepted: &'static str,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    service_fn(move |request: Request<Full<Bytes>>| {
        let token = bearer(&request);
        seen.lock().unwrap().push(token.clone());
        let status = if token == accepted && request.uri().path() != "/broken" {
            StatusCode::OK
        } else {
            StatusCode::UNAUTHORIZED
        };
        async move {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = status;
            Ok::<_, Infallible>(response)
        }
    })
}

struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A source that raises its flag when it is dropped.
struct FlaggedSource {
    _flag: DropFlag,
}

impl TokenSource for FlaggedSource {
    async fn fetch(&self, _previous: Option<&Token>) -> Result<Token, Error> {
        Ok(Token::new("token-1"))
    }
}

#[tokio::test]
async fn the_token_state_and_its_source_are_freed_after_use() {
    let dropped = Arc::new(AtomicBool::new(false));
    let layer = RefreshLayer::new(FlaggedSource {
        _flag: DropFlag(Arc::clone(&dropped)),
    });
    let mut updates = layer.handle().subscribe();
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(api(Seen::default(), "token-1"));

    service
        .clone()
        .oneshot(get("http://api.test/"))
        .await
        .unwrap();
    updates.next().await.unwrap();
    drop(service);
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }

    assert!(dropped.load(Ordering::SeqCst), "the source was freed");
    assert!(updates.next().await.is_none(), "subscribers see the end");
}

#[tokio::test(start_paused = true)]
async fn r13_a_request_waiting_for_a_token_holds_no_permit_of_a_shared_limit() {
    // One permit, shared by the API client and the token source's own client.
    let limit = GlobalConcurrencyLimitLayer::new(1);
    let token_endpoint = limit.layer(service_fn(|_: ()| async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok::<_, Infallible>(Token::new("token-1"))
    }));
    let source = source::from_fn(move |_previous| {
        let token_endpoint = token_endpoint.clone();
        async move { token_endpoint.oneshot(()).await }
    });
    let seen = Seen::default();
    let service = ServiceBuilder::new()
        .layer(RefreshLayer::new(source).refresh_timeout(Duration::from_secs(5)))
        .layer(limit)
        .service(api(Arc::clone(&seen), "token-1"));

    let started = Instant::now();
    let response = service.oneshot(get("http://api.test/")).await.unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(100),
        "no deadlock, no timeout"
    );
}

#[tokio::test(start_paused = true)]
async fn r4_a_refresh_answered_after_the_timeout_still_installs_the_rotated_token() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let source = source::from_fn(move |_previous| {
        counter.fetch_add(1, Ordering::SeqCst);
        async {
            // The server has rotated the refresh token; its answer is slow.
            tokio::time::sleep(Duration::from_secs(12)).await;
            Ok::<_, Error>(Token::new("token-1").with_refresh_token("refresh-3"))
        }
    })
    .rotates_credentials(true);
    let layer = RefreshLayer::new(source).refresh_timeout(Duration::from_secs(10));
    let handle = layer.handle();
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(api(Seen::default(), "token-1"));

    let late = handle.refresh().await.unwrap_err();
    let during = service
        .clone()
        .oneshot(get("http://api.test/"))
        .await
        .unwrap_err();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = service
        .clone()
        .oneshot(get("http://api.test/"))
        .await
        .unwrap();

    assert!(late.is_timeout());
    assert!(during.downcast_ref::<Error>().unwrap().is_timeout());
    assert_eq!(after.status(), StatusCode::OK);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "no second refresh raced the late one"
    );
    let token = handle.current_token().unwrap();
    assert_eq!(
        token.expose_refresh_token(),
        Some("refresh-3"),
        "nothing lost"
    );
}

#[tokio::test(start_paused = true)]
async fn r9_one_path_that_rejects_while_the_endpoint_is_down_does_not_fail_every_call() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let source = source::from_fn(move |_previous| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            if n == 1 {
                Ok(Token::new("token-1").with_expires_in(Duration::from_secs(3600)))
            } else {
                Err(Error::transient(std::io::Error::other("endpoint down")))
            }
        }
    });
    let seen = Seen::default();
    let service = ServiceBuilder::new()
        .layer(RefreshLayer::new(source))
        .service(api(Arc::clone(&seen), "token-1"));

    let before = service
        .clone()
        .oneshot(get("http://api.test/ok"))
        .await
        .unwrap();
    let broken = service.clone().oneshot(get("http://api.test/broken")).await;
    let after = service
        .clone()
        .oneshot(get("http://api.test/ok"))
        .await
        .unwrap();
    let broken_again = service.clone().oneshot(get("http://api.test/broken")).await;
    let still = service
        .clone()
        .oneshot(get("http://api.test/ok"))
        .await
        .unwrap();

    assert_eq!(before.status(), StatusCode::OK);
    assert!(broken
        .unwrap_err()
        .downcast_ref::<Error>()
        .unwrap()
        .is_transient());
    assert_eq!(
        after.status(),
        StatusCode::OK,
        "the token is back in service"
    );
    assert!(broken_again.is_err(), "the back-off answers at once");
    assert_eq!(still.status(), StatusCode::OK);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "one failed refresh within the back-off"
    );
}

#[tokio::test(start_paused = true)]
async fn r9_an_absurd_backoff_is_clamped_not_a_panic() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let source = source::from_fn(move |_previous| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Err::<Token, _>(Error::terminal(std::io::Error::other("revoked"))) }
    });
    let service = ServiceBuilder::new()
        .layer(RefreshLayer::new(source).failure_backoff(Duration::MAX))
        .service(api(Seen::default(), "token-1"));

    for _ in 0..3 {
        let error = service
            .clone()
            .oneshot(get("http://api.test/"))
            .await
            .unwrap_err();
        let error = error.downcast::<Error>().unwrap();
        assert!(error.is_terminal() && error.is_source(), "{error:?}");
    }

    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A body that never ends.
struct Endless;

impl http_body::Body for Endless {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Pending
    }
}

#[tokio::test(start_paused = true)]
async fn r8_a_rejected_body_that_never_ends_does_not_delay_the_retry() {
    let tokens = common::Counting::new();
    let inner = service_fn(|request: Request<Full<Bytes>>| async move {
        let response = if bearer(&request) == "token-1" {
            let mut response = Response::new(Endless.boxed());
            *response.status_mut() = StatusCode::UNAUTHORIZED;
            response
        } else {
            Response::new(Full::new(Bytes::from_static(b"ok")).boxed())
        };
        Ok::<Response<BoxBody<Bytes, Infallible>>, Infallible>(response)
    });
    let service = ServiceBuilder::new()
        .layer(RefreshLayer::new(tokens.source(None, Duration::ZERO)))
        .service(inner);

    let started = Instant::now();
    let response = service.oneshot(get("http://api.test/")).await.unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(tokens.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn r9_a_hung_fetch_of_a_source_that_rotates_nothing_is_cancelled_at_the_timeout() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let source = source::from_fn(move |_previous| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            if n == 1 {
                std::future::pending::<()>().await;
            }
            Ok::<_, Error>(Token::new("token-2"))
        }
    });
    let layer = RefreshLayer::new(source).refresh_timeout(Duration::from_millis(500));
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(api(Seen::default(), "token-2"));

    let hung = service
        .clone()
        .oneshot(get("http://api.test/"))
        .await
        .unwrap_err();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let after_the_backoff = service
        .clone()
        .oneshot(get("http://api.test/"))
        .await
        .unwrap();

    assert!(hung.downcast_ref::<Error>().unwrap().is_timeout());
    assert_eq!(
        after_the_backoff.status(),
        StatusCode::OK,
        "no late window, a short back-off"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn r12_subscribers_see_tokens_in_the_order_they_were_installed() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let source = source::from_fn(move |_previous| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move { Ok::<_, Error>(Token::new(format!("token-{n}"))) }
    });
    let layer = RefreshLayer::new(source);
    let handle = layer.handle();
    let mut updates = handle.subscribe();

    let forcing: Vec<_> = (0..4)
        .map(|_| {
            let handle = handle.clone();
            tokio::spawn(async move {
                for _ in 0..50 {
                    let _ = handle.refresh().await;
                }
            })
        })
        .collect();
    for task in forcing {
        task.await.unwrap();
    }
    let installed = calls.load(Ordering::SeqCst);
    let mut seen = Vec::new();
    for _ in 0..installed {
        seen.push(updates.next().await.unwrap().expose_secret().to_owned());
    }

    let expected: Vec<_> = (1..=installed).map(|n| format!("token-{n}")).collect();
    assert_eq!(seen, expected);
}

/// An inner service that counts its clones and answers 200.
#[derive(Default)]
struct CountingClones {
    clones: Arc<AtomicUsize>,
}

impl Clone for CountingClones {
    fn clone(&self) -> Self {
        self.clones.fetch_add(1, Ordering::SeqCst);
        Self {
            clones: Arc::clone(&self.clones),
        }
    }
}

impl Service<Request<Full<Bytes>>> for CountingClones {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: Request<Full<Bytes>>) -> Self::Future {
        std::future::ready(Ok(Response::new(Full::default())))
    }
}

/// A request whose token is accepted clones no inner service: with retries on, the layer
/// takes one spare clone at the first call and clones retries from it only on a rejection;
/// with retries off or for a request the layer leaves alone, it clones nothing.
#[tokio::test]
async fn an_accepted_request_clones_no_inner_service() {
    for (retry, header, clones) in [(true, None, 1), (false, None, 0), (true, Some("x"), 0)] {
        let inner = CountingClones::default();
        let counted = Arc::clone(&inner.clones);
        let layer = RefreshLayer::new(source::Static::new("t1")).retry(retry);
        // The token is there before the first request: a request that waits for it needs a
        // service of its own, and is counted elsewhere.
        layer.handle().refresh().await.unwrap();
        let mut service = layer.layer(inner);
        for _ in 0..10 {
            let mut request = Request::new(Full::new(Bytes::from_static(b"body")));
            if let Some(value) = header {
                request
                    .headers_mut()
                    .insert(http::header::AUTHORIZATION, value.parse().unwrap());
            }
            let response = service.ready().await.unwrap().call(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
        }
        assert_eq!(
            counted.load(Ordering::SeqCst),
            clones,
            "retry {retry}, header {header:?}"
        );
    }
}

/// An inner service with a label that logs which label sent each token; "B" rejects
/// `token-1`.
#[derive(Clone)]
struct Labeled {
    label: &'static str,
    log: Arc<Mutex<Vec<(&'static str, String)>>>,
}

impl Service<Request<Full<Bytes>>> for Labeled {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
        let token = bearer(&request);
        let mut response = Response::new(Full::default());
        if self.label == "B" && token == "token-1" {
            *response.status_mut() = StatusCode::UNAUTHORIZED;
        }
        self.log.lock().unwrap().push((self.label, token));
        std::future::ready(Ok(response))
    }
}

/// A layer whose source hands out `token-1`, `token-2`, ... with `token-1` installed.
async fn numbered_layer() -> RefreshLayer {
    let layer = RefreshLayer::new(Counting::new().source(None, Duration::ZERO));
    layer.handle().refresh().await.unwrap();
    layer
}

/// A retry goes to the inner service the caller has now, also after `get_mut` changed it
/// following earlier calls, and a clone changed through `get_mut` retries on its own service.
#[tokio::test]
async fn r6_a_retry_goes_to_the_inner_service_as_changed_through_get_mut() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let layer = numbered_layer().await;
    let mut service = layer.layer(Labeled {
        label: "A",
        log: Arc::clone(&log),
    });
    let first = service.ready().await.unwrap().call(get("http://x/")).await;
    assert_eq!(first.unwrap().status(), StatusCode::OK);

    service.get_mut().label = "B";
    let second = service.ready().await.unwrap().call(get("http://x/")).await;
    assert_eq!(second.unwrap().status(), StatusCode::OK);
    assert_eq!(
        *log.lock().unwrap(),
        [
            ("A", "token-1".into()),
            ("B", "token-1".into()),
            ("B", "token-2".into())
        ]
    );

    // Two clones, one changed before either sent anything: each retries on its own.
    let log = Arc::new(Mutex::new(Vec::new()));
    let layer = numbered_layer().await;
    let mut a = layer.layer(Labeled {
        label: "A",
        log: Arc::clone(&log),
    });
    let mut b = a.clone();
    b.get_mut().label = "B";
    let _ = a
        .ready()
        .await
        .unwrap()
        .call(get("http://x/"))
        .await
        .unwrap();
    let rejected_then_retried = b.ready().await.unwrap().call(get("http://x/")).await;
    assert_eq!(rejected_then_retried.unwrap().status(), StatusCode::OK);
    assert_eq!(
        *log.lock().unwrap(),
        [
            ("A", "token-1".into()),
            ("B", "token-1".into()),
            ("B", "token-2".into())
        ]
    );
}
