//! The client credentials source behind the layer, against token endpoints on loopback that
//! misbehave the way real ones do (F01, F03, F11, F18, F19).

mod common;

use std::{sync::Arc, time::Duration};

use common::{client, get, ok, respond, TestServer};
use http::StatusCode;
use tokio::{sync::Notify, time::Instant};
use tower::{ServiceBuilder, ServiceExt};
use tower_token_refresh::{
    source::oauth2::{ClientAuth, ClientCredentials},
    BoxError, Error, RefreshHandle, RefreshLayer,
};

const JSON: (&str, &str) = ("content-type", "application/json");

fn source(token_url: String) -> ClientCredentials {
    ClientCredentials::builder(token_url, "client", "client-secret")
        .client_auth(ClientAuth::RequestBody)
        .build()
        .unwrap()
}

async fn api() -> TestServer {
    TestServer::start(|_| async { ok("served") }).await
}

type Client = tower_token_refresh::Refresh<
    hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
>;

fn layered(layer: RefreshLayer) -> (Client, RefreshHandle) {
    let handle = layer.handle();
    (ServiceBuilder::new().layer(layer).service(client()), handle)
}

/// Five calls at once; returns their errors once all have finished.
async fn five_failing_calls(service: &Client, url: &str) -> Vec<Error> {
    let calls: Vec<_> = (0..5)
        .map(|_| tokio::spawn(service.clone().oneshot(get(url))))
        .collect();
    let mut errors = Vec::new();
    for call in calls {
        let error: BoxError = call.await.unwrap().unwrap_err();
        errors.push(*error.downcast::<Error>().unwrap());
    }
    errors
}

#[tokio::test]
async fn f01_expires_in_as_a_string_is_a_lifetime() {
    let auth = TestServer::start(|_| async {
        respond(
            StatusCode::OK,
            &[JSON],
            r#"{"access_token":"A1","token_type":"Bearer","expires_in":"3600"}"#,
        )
    })
    .await;
    let api = api().await;
    let (service, handle) = layered(RefreshLayer::new(source(auth.url("/token"))));

    service.oneshot(get(&api.url("/"))).await.unwrap();

    let left = handle.token_info().unwrap().expires_in().unwrap();
    assert!(left > Duration::from_secs(3590) && left <= Duration::from_secs(3600));
    assert_eq!(api.recorded()[0].bearer().as_deref(), Some("A1"));
}

#[tokio::test]
async fn f03_expires_in_zero_serves_its_call_and_coalesced_waiters_without_a_loop() {
    let auth = TestServer::start(|_| async {
        respond(
            StatusCode::OK,
            &[JSON],
            r#"{"access_token":"A0","token_type":"bearer","expires_in":0}"#,
        )
    })
    .await;
    let api = api().await;
    let (service, _handle) = layered(RefreshLayer::new(source(auth.url("/token"))));

    let calls: Vec<_> = (0..5)
        .map(|_| tokio::spawn(service.clone().oneshot(get(&api.url("/")))))
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    let after_concurrent = auth.hits();
    service.clone().oneshot(get(&api.url("/"))).await.unwrap();

    assert_eq!(after_concurrent, 1, "five waiters, one token request");
    assert_eq!(auth.hits(), 2, "one token request per triggering call");
    assert!(api
        .recorded()
        .iter()
        .all(|r| r.bearer().as_deref() == Some("A0")));
}

#[tokio::test]
async fn f18_a_dead_credential_is_terminal_typed_and_not_hammered() {
    let auth = TestServer::start(|_| async {
        respond(
            StatusCode::BAD_REQUEST,
            &[JSON],
            r#"{"error":"invalid_grant","error_description":"Token has been revoked"}"#,
        )
    })
    .await;
    let api = api().await;
    let (service, _handle) = layered(RefreshLayer::new(source(auth.url("/token"))));

    let first = service
        .clone()
        .oneshot(get(&api.url("/")))
        .await
        .unwrap_err();
    let second = service
        .clone()
        .oneshot(get(&api.url("/")))
        .await
        .unwrap_err();

    for error in [first, second] {
        let error = error.downcast::<Error>().unwrap();
        assert!(error.is_terminal());
        assert!(error.is_endpoint());
        assert!(!error.is_transport());
        assert_eq!(error.status(), Some(StatusCode::BAD_REQUEST));
        assert_eq!(error.oauth_error(), Some("invalid_grant"));
        assert_eq!(error.error_description(), Some("Token has been revoked"));
    }
    assert_eq!(auth.hits(), 1, "the second call meets the back-off");
    assert_eq!(api.hits(), 0);
}

#[tokio::test]
async fn f19_an_html_error_page_gives_status_and_a_safe_excerpt() {
    let auth = TestServer::start(|request| async move {
        if request.uri.path() == "/gateway" {
            respond(
                StatusCode::BAD_GATEWAY,
                &[("content-type", "text/html")],
                "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
            )
        } else {
            respond(
                StatusCode::OK,
                &[("content-type", "text/html")],
                "<html>Maintenance in progress</html>",
            )
        }
    })
    .await;
    let api = api().await;

    for (path, status) in [
        ("/gateway", StatusCode::BAD_GATEWAY),
        ("/ok", StatusCode::OK),
    ] {
        let (service, _handle) = layered(RefreshLayer::new(source(auth.url(path))));

        let error = service.oneshot(get(&api.url("/"))).await.unwrap_err();

        let error = error.downcast::<Error>().unwrap();
        assert_eq!(error.status(), Some(status));
        assert!(error.excerpt().unwrap().starts_with("<html>"), "{error}");
        assert!(error.to_string().contains("<html>"), "{error}");
        assert!(
            !error.to_string().contains("expected value"),
            "no bare JSON message"
        );
    }
    assert_eq!(api.hits(), 0);
}

#[tokio::test]
async fn f11_a_failing_refresh_fails_every_waiter_promptly() {
    let release = Arc::new(Notify::new());
    let held = Arc::clone(&release);
    let auth = TestServer::start(move |_| {
        let held = Arc::clone(&held);
        async move {
            held.notified().await;
            respond(
                StatusCode::BAD_REQUEST,
                &[JSON],
                r#"{"error":"invalid_grant"}"#,
            )
        }
    })
    .await;
    let api = api().await;
    let (service, handle) = layered(RefreshLayer::new(source(auth.url("/token"))));

    let waiting = {
        let service = service.clone();
        let url = api.url("/");
        tokio::spawn(async move { five_failing_calls(&service, &url).await })
    };
    while handle.stats().coalesced < 4 {
        tokio::task::yield_now().await;
    }
    release.notify_one();
    let errors = waiting.await.unwrap();

    assert_eq!(errors.len(), 5);
    assert!(errors
        .iter()
        .all(|e| e.oauth_error() == Some("invalid_grant")));
    assert_eq!(auth.hits(), 1);
    assert_eq!(api.hits(), 0, "nothing sent without a token");
}

#[tokio::test]
async fn f11_a_token_endpoint_that_never_answers_fails_waiters_at_the_refresh_timeout() {
    let auth = TestServer::start(|_| std::future::pending()).await;
    let api = api().await;
    let layer =
        RefreshLayer::new(source(auth.url("/token"))).refresh_timeout(Duration::from_millis(200));
    let (service, _handle) = layered(layer);

    let started = Instant::now();
    let errors = five_failing_calls(&service, &api.url("/")).await;

    assert!(errors.iter().all(Error::is_timeout));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(api.hits(), 0);
}

#[tokio::test]
async fn f11_a_token_endpoint_that_resets_the_connection_is_a_transport_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let resetter = tokio::spawn(async move {
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            socket.set_zero_linger().unwrap();
            drop(socket);
        }
    });
    let api = api().await;
    let (service, _handle) = layered(RefreshLayer::new(source(format!("http://{addr}/token"))));

    let errors = five_failing_calls(&service, &api.url("/")).await;

    assert!(
        errors.iter().all(|e| e.is_transport() && e.is_transient()),
        "{errors:?}"
    );
    assert_eq!(api.hits(), 0);
    resetter.abort();
}

#[tokio::test]
async fn f11_a_503_is_a_transient_endpoint_error() {
    let auth =
        TestServer::start(|_| async { respond(StatusCode::SERVICE_UNAVAILABLE, &[], "") }).await;
    let api = api().await;
    let (service, _handle) = layered(RefreshLayer::new(source(auth.url("/token"))));

    let errors = five_failing_calls(&service, &api.url("/")).await;

    assert!(errors
        .iter()
        .all(|e| e.status() == Some(StatusCode::SERVICE_UNAVAILABLE) && e.is_transient()));
    assert_eq!(
        auth.hits(),
        3,
        "three attempts inside one refresh, then the error"
    );
    assert_eq!(api.hits(), 0);
}

#[tokio::test]
async fn unknown_fields_of_the_answer_travel_with_the_token() {
    let auth = TestServer::start(|_| async {
        respond(
            StatusCode::OK,
            &[JSON],
            r#"{"access_token":"A1","token_type":"Bearer","id_token":"eyJ.x.y","ext_expires_in":7200}"#,
        )
    })
    .await;
    let api = api().await;
    let (service, handle) = layered(RefreshLayer::new(source(auth.url("/token"))));

    service.oneshot(get(&api.url("/"))).await.unwrap();

    let token = handle.current_token().unwrap();
    let extra = token.extra_fields().unwrap();
    assert_eq!(extra["id_token"], "eyJ.x.y");
    assert_eq!(extra["ext_expires_in"], 7200);
    assert!(
        !extra.contains_key("access_token"),
        "read fields are not repeated"
    );
    assert!(!format!("{token:?}").contains("eyJ.x.y"));
}

#[tokio::test(start_paused = true)]
async fn r9_the_layer_waits_as_long_as_retry_after_asks() {
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&hits);
    let transport = tower::service_fn(
        move |_request: http::Request<http_body_util::Full<bytes::Bytes>>| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async {
                let response = http::Response::builder()
                    .status(StatusCode::TOO_MANY_REQUESTS)
                    .header("retry-after", "30")
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                Ok::<_, std::convert::Infallible>(response)
            }
        },
    );
    let source = ClientCredentials::builder("http://127.0.0.1:9/token", "client", "secret")
        .transport(transport)
        .build()
        .unwrap();
    let api = tower::service_fn(
        |_request: http::Request<http_body_util::Full<bytes::Bytes>>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                bytes::Bytes::new(),
            )))
        },
    );
    let service = ServiceBuilder::new()
        .layer(RefreshLayer::new(source))
        .service(api);
    let call = || {
        let service = service.clone();
        async move {
            let error = service.oneshot(get("http://api.test/")).await.unwrap_err();
            *error.downcast::<Error>().unwrap()
        }
    };
    let hits_now = || hits.load(std::sync::atomic::Ordering::SeqCst);

    let first = call().await;
    let hits_at_first = hits_now();
    tokio::time::advance(Duration::from_secs(20)).await;
    call().await;
    let hits_within_the_wait = hits_now();
    tokio::time::advance(Duration::from_secs(11)).await;
    call().await;

    assert_eq!(first.retry_after(), Some(Duration::from_secs(30)));
    assert_eq!(first.status(), Some(StatusCode::TOO_MANY_REQUESTS));
    assert_eq!(
        hits_at_first, 1,
        "a wait longer than the retry budget is not waited out"
    );
    assert_eq!(
        hits_within_the_wait, 1,
        "the layer waits as asked, not its own 1 s"
    );
    assert_eq!(hits_now(), 2);
}
