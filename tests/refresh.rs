//! R2, R3, R4, R9, R12: when tokens are renewed, how many times, and what callers see meanwhile.

mod common;

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use common::{client, get, ok, unauthorized, Counting, TestServer};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tokio::time::Instant;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_token_refresh::{source, source::oauth2::ClientCredentials, Error, RefreshLayer, Token};

type Recorder = Arc<Mutex<Vec<String>>>;

/// An in-process service that records the bearer token of each request and answers 200, or
/// 401 for the tokens listed in `reject`.
fn recording_service(
    seen: Recorder,
    reject: &'static [&'static str],
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    service_fn(move |request: Request<Full<Bytes>>| {
        let token = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap().trim_start_matches("Bearer ").to_owned())
            .unwrap_or_default();
        seen.lock().unwrap().push(token.clone());
        let status = if reject.contains(&token.as_str()) {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::OK
        };
        async move {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = status;
            Ok::<_, Infallible>(response)
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_a_thousand_calls_meeting_an_expired_token_cause_one_refresh() {
    let api = TestServer::start(|request| async move {
        match request.bearer().as_deref() {
            Some("token-2") => ok("fine"),
            _ => unauthorized("invalid_token"),
        }
    })
    .await;
    // A token endpoint whose first token is expired on arrival and whose second lives an
    // hour; it takes 50 ms to answer.
    let issued = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&issued);
    let auth = TestServer::start(move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let lifetime = if n == 1 { 0 } else { 3600 };
            common::respond(
                StatusCode::OK,
                &[("content-type", "application/json")],
                &format!(r#"{{"access_token":"token-{n}","token_type":"Bearer","expires_in":{lifetime}}}"#),
            )
        }
    })
    .await;
    let source = ClientCredentials::builder(auth.url("/token"), "client", "secret")
        .build()
        .unwrap();
    let layer = RefreshLayer::new(source);
    let handle = layer.handle();
    handle.refresh().await.unwrap();
    let service = ServiceBuilder::new().layer(layer).service(client());

    let tasks: Vec<_> = (0..1000)
        .map(|_| tokio::spawn(service.clone().oneshot(get(&api.url("/")))))
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap().unwrap().status());
    }

    assert!(statuses.iter().all(|s| *s == StatusCode::OK));
    assert_eq!(auth.hits(), 2, "one token request for a thousand callers");
    assert_eq!(api.hits(), 1000, "nobody sent the expired token");
    let stats = handle.stats();
    assert_eq!(stats.refreshes, 2);
    assert_eq!(stats.coalesced, 999);
}

#[tokio::test(start_paused = true)]
async fn f03_a_token_expired_on_arrival_is_used_once_without_a_loop() {
    let seen = Recorder::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let source = source::from_fn(move |_previous| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok::<_, Error>(Token::new(format!("token-{n}")).with_expires_in(Duration::ZERO))
        }
    });
    let service = ServiceBuilder::new()
        .layer(RefreshLayer::new(source))
        .service(recording_service(Arc::clone(&seen), &[]));

    let first_round: Vec<_> = (0..10)
        .map(|_| tokio::spawn(service.clone().oneshot(get("http://api.test/"))))
        .collect();
    for call in first_round {
        assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    let after_first_round = calls.load(Ordering::SeqCst);
    service
        .clone()
        .oneshot(get("http://api.test/"))
        .await
        .unwrap();

    assert_eq!(after_first_round, 1, "ten waiters share one fetch");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "one fetch per triggering call"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[..10], vec!["token-1".to_owned(); 10]);
    assert_eq!(seen[10], "token-2");
}

#[tokio::test(start_paused = true)]
async fn f02_unknown_expiry_is_never_refreshed_ahead_but_a_401_still_renews_it() {
    let seen = Recorder::default();
    let tokens = Counting::new();
    let layer = RefreshLayer::new(tokens.source(None, Duration::ZERO));
    let handle = layer.handle();
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(recording_service(Arc::clone(&seen), &["token-1"]));
    handle.refresh().await.unwrap();

    tokio::time::advance(Duration::from_secs(10 * 365 * 24 * 3600)).await;
    assert_eq!(handle.token_info().unwrap().expires_at, None);
    let response = service.oneshot(get("http://api.test/")).await.unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(*seen.lock().unwrap(), ["token-1", "token-2"]);
    assert_eq!(tokens.calls(), 2, "one refresh, caused by the 401 only");
}

#[tokio::test(start_paused = true)]
async fn f13_the_default_margin_replaces_a_token_with_twelve_seconds_left() {
    let seen = Recorder::default();
    let tokens = Counting::new();
    let layer = RefreshLayer::new(tokens.source(Some(Duration::from_secs(3600)), Duration::ZERO));
    let handle = layer.handle();
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(recording_service(Arc::clone(&seen), &[]));
    handle.refresh().await.unwrap();

    tokio::time::advance(Duration::from_secs(3600 - 12)).await;
    service.oneshot(get("http://api.test/")).await.unwrap();

    assert_eq!(
        *seen.lock().unwrap(),
        ["token-2"],
        "the old token is not sent"
    );
    assert_eq!(tokens.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn f13_the_default_margin_is_thirty_seconds() {
    let seen = Recorder::default();
    let tokens = Counting::new();
    let layer = RefreshLayer::new(tokens.source(Some(Duration::from_secs(3600)), Duration::ZERO))
        .refresh_ahead(Duration::ZERO);
    let handle = layer.handle();
    let mut service = ServiceBuilder::new()
        .layer(layer)
        .service(recording_service(Arc::clone(&seen), &[]));
    handle.refresh().await.unwrap();

    tokio::time::advance(Duration::from_secs(3600 - 31)).await;
    send(&mut service).await;
    tokio::time::advance(Duration::from_secs(2)).await;
    send(&mut service).await;

    assert_eq!(
        *seen.lock().unwrap(),
        ["token-1", "token-2"],
        "sent with 31 s left, replaced with 29 s left"
    );
    assert_eq!(tokens.calls(), 2);
}

/// Sends one request through `service` itself, not a clone, and expects a 200.
async fn send<S, B>(service: &mut S)
where
    S: tower::Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    let response = service
        .ready()
        .await
        .unwrap()
        .call(get("http://api.test/"))
        .await;
    assert_eq!(response.unwrap().status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn r2_a_service_that_sends_many_requests_follows_every_new_invalidated_and_expired_token() {
    let seen = Recorder::default();
    let tokens = Counting::new();
    let layer = RefreshLayer::new(tokens.source(Some(Duration::from_secs(3600)), Duration::ZERO));
    let handle = layer.handle();
    // NOTE: one service sends every request: from its second on, it reads the token through
    // its own copy, which must follow every change of the shared token.
    let mut service = ServiceBuilder::new()
        .layer(layer)
        .service(recording_service(Arc::clone(&seen), &[]));
    handle.refresh().await.unwrap();

    send(&mut service).await;
    send(&mut service).await;
    handle.refresh().await.unwrap();
    send(&mut service).await;
    handle.invalidate();
    send(&mut service).await;
    tokio::time::advance(Duration::from_secs(3600 - 12)).await;
    send(&mut service).await;

    assert_eq!(
        *seen.lock().unwrap(),
        ["token-1", "token-1", "token-2", "token-3", "token-4"]
    );
    assert_eq!(tokens.calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn r2_a_stale_token_is_used_while_one_background_refresh_runs() {
    let seen = Recorder::default();
    let tokens = Counting::new();
    let layer =
        RefreshLayer::new(tokens.source(Some(Duration::from_secs(3600)), Duration::from_secs(2)));
    let handle = layer.handle();
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(recording_service(Arc::clone(&seen), &[]));
    handle.refresh().await.unwrap();

    // Inside the default two-minute window before expiry.
    tokio::time::advance(Duration::from_secs(3600 - 100)).await;
    let started = Instant::now();
    for _ in 0..5 {
        service
            .clone()
            .oneshot(get("http://api.test/"))
            .await
            .unwrap();
    }
    let waited = started.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    service
        .clone()
        .oneshot(get("http://api.test/"))
        .await
        .unwrap();

    assert_eq!(
        waited,
        Duration::ZERO,
        "nobody waited for the background refresh"
    );
    assert_eq!(tokens.calls(), 2, "one background refresh");
    assert_eq!(
        *seen.lock().unwrap(),
        ["token-1", "token-1", "token-1", "token-1", "token-1", "token-2"]
    );
}

#[tokio::test(start_paused = true)]
async fn r9_a_failed_background_refresh_keeps_the_valid_token_in_service() {
    let seen = Recorder::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let source = source::from_fn(move |_previous| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            if n == 2 {
                return Err(Error::transient(std::io::Error::other("endpoint down")));
            }
            Ok(Token::new(format!("token-{n}")).with_expires_in(Duration::from_secs(600)))
        }
    });
    let layer = RefreshLayer::new(source);
    let handle = layer.handle();
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(recording_service(Arc::clone(&seen), &[]));
    handle.refresh().await.unwrap();

    tokio::time::advance(Duration::from_secs(500)).await;
    let during_failure = service.clone().oneshot(get("http://api.test/")).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let failures = handle.stats().failures;
    tokio::time::sleep(Duration::from_secs(2)).await;
    service
        .clone()
        .oneshot(get("http://api.test/"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    service
        .clone()
        .oneshot(get("http://api.test/"))
        .await
        .unwrap();

    assert_eq!(during_failure.unwrap().status(), StatusCode::OK);
    assert_eq!(failures, 1);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "tried again after the back-off"
    );
    assert_eq!(*seen.lock().unwrap(), ["token-1", "token-1", "token-3"]);
}

#[tokio::test(start_paused = true)]
async fn r4_a_caller_that_gives_up_does_not_cancel_the_refresh() {
    let seen = Recorder::default();
    let source = source::from_fn(|previous: Option<Token>| async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let rotated = match previous.as_ref().and_then(Token::expose_refresh_token) {
            None => "refresh-2",
            Some(_) => "refresh-3",
        };
        Ok::<_, Error>(Token::new("access").with_refresh_token(rotated))
    });
    let layer = RefreshLayer::new(source);
    let handle = layer.handle();
    let service = ServiceBuilder::new()
        .timeout(Duration::from_secs(1))
        .layer(layer)
        .service(recording_service(Arc::clone(&seen), &[]));

    let impatient = service.clone().oneshot(get("http://api.test/")).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let started = Instant::now();
    let patient = service.oneshot(get("http://api.test/")).await;

    assert!(impatient
        .unwrap_err()
        .is::<tower::timeout::error::Elapsed>());
    assert_eq!(patient.unwrap().status(), StatusCode::OK);
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "the token was already there"
    );
    let token = handle.current_token().unwrap();
    assert_eq!(
        token.expose_refresh_token(),
        Some("refresh-2"),
        "nothing lost"
    );
    assert_eq!(handle.token_info().unwrap().generation, 1);
}

#[tokio::test(start_paused = true)]
async fn r4_no_caller_waits_longer_than_the_refresh_timeout() {
    let source = source::from_fn(|_| std::future::pending::<Result<Token, Error>>());
    let seen = Recorder::default();
    let service = ServiceBuilder::new()
        .layer(RefreshLayer::new(source).refresh_timeout(Duration::from_secs(2)))
        .service(recording_service(Arc::clone(&seen), &[]));

    let started = Instant::now();
    let calls: Vec<_> = (0..5)
        .map(|_| tokio::spawn(service.clone().oneshot(get("http://api.test/"))))
        .collect();
    for call in calls {
        let error = call.await.unwrap().unwrap_err();
        assert!(error.downcast_ref::<Error>().unwrap().is_timeout());
    }

    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert!(
        seen.lock().unwrap().is_empty(),
        "nothing sent without a token"
    );
}

#[tokio::test(start_paused = true)]
async fn r12_invalidate_subscribe_and_inspect_through_the_handle() {
    let seen = Recorder::default();
    let tokens = Counting::new();
    let layer = RefreshLayer::new(tokens.source(Some(Duration::from_secs(3600)), Duration::ZERO));
    let handle = layer.handle();
    let mut updates = handle.subscribe();
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(recording_service(Arc::clone(&seen), &[]));

    service
        .clone()
        .oneshot(get("http://api.test/"))
        .await
        .unwrap();
    let first = updates.next().await.unwrap();
    handle.invalidate();
    assert!(handle.token_info().unwrap().invalidated);
    service
        .clone()
        .oneshot(get("http://api.test/"))
        .await
        .unwrap();
    let second = updates.next().await.unwrap();
    let forced = handle.refresh().await.unwrap();

    assert_eq!(first.expose_secret(), "token-1");
    assert_eq!(second.expose_secret(), "token-2");
    assert_eq!(forced.generation, 3);
    assert_eq!(*seen.lock().unwrap(), ["token-1", "token-2"]);
    let info = handle.token_info().unwrap();
    assert_eq!(info.expires_in(), Some(Duration::from_secs(3600)));
    assert!(!format!("{info:?}").contains("token-3"));
    assert!(!format!("{handle:?}").contains("token-3"));
}

#[tokio::test(start_paused = true)]
async fn r9_a_stale_token_refreshes_in_background_after_a_failed_forced_refresh() {
    let seen = Recorder::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let source = source::from_fn(move |_previous| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            if n == 2 {
                return Err(Error::transient(std::io::Error::other("endpoint down")));
            }
            Ok(Token::new(format!("token-{n}")).with_expires_in(Duration::from_secs(600)))
        }
    });
    let layer = RefreshLayer::new(source);
    let handle = layer.handle();
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(recording_service(Arc::clone(&seen), &[]));
    handle.refresh().await.unwrap();

    // The token is stale; a forced refresh fails, and a request meets the back-off.
    tokio::time::advance(Duration::from_secs(490)).await;
    handle.refresh().await.unwrap_err();
    service
        .clone()
        .oneshot(get("http://api.test/"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    service
        .clone()
        .oneshot(get("http://api.test/"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    service
        .clone()
        .oneshot(get("http://api.test/"))
        .await
        .unwrap();

    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "the stale token was refreshed"
    );
    assert_eq!(*seen.lock().unwrap(), ["token-1", "token-1", "token-3"]);
}
