//! F07: concurrent expiry against an authorization server that rotates refresh tokens and
//! rate-limits its callers.

mod common;

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use common::{client, get, ok, respond, unauthorized, TestServer};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::Notify;
use tower::{ServiceBuilder, ServiceExt};
use tower_token_refresh::{source, Error, RefreshLayer, Token};

/// The authorization server's books: which refresh token is valid, which access tokens are.
#[derive(Default)]
struct Books {
    generation: usize,
    refresh_token: String,
    access_tokens: HashSet<String>,
    calls: usize,
}

/// An authorization server whose refresh tokens work once and that answers 429 to a fourth
/// call within a minute.
async fn rotating_server(books: Arc<Mutex<Books>>) -> TestServer {
    TestServer::start(move |request| {
        let books = Arc::clone(&books);
        async move {
            let form = String::from_utf8(request.body.to_vec()).unwrap();
            let presented = form
                .split('&')
                .find_map(|pair| pair.strip_prefix("refresh_token="))
                .unwrap_or_default()
                .to_owned();
            let mut books = books.lock().unwrap();
            books.calls += 1;
            if books.calls > 3 {
                return respond(StatusCode::TOO_MANY_REQUESTS, &[("retry-after", "60")], "");
            }
            if !form.contains("grant_type=refresh_token") || presented != books.refresh_token {
                return respond(
                    StatusCode::BAD_REQUEST,
                    &[("content-type", "application/json")],
                    r#"{"error":"invalid_grant","error_description":"refresh token reused"}"#,
                );
            }
            books.generation += 1;
            let access = format!("A{}", books.generation + 1);
            books.refresh_token = format!("R{}", books.generation + 1);
            books.access_tokens.insert(access.clone());
            let body = format!(
                r#"{{"access_token":"{access}","token_type":"Bearer","expires_in":3600,"refresh_token":"{}"}}"#,
                books.refresh_token
            );
            respond(StatusCode::OK, &[("content-type", "application/json")], &body)
        }
    })
    .await
}

/// A refresh-token source written with `from_fn`: it starts from persisted credentials
/// (A1, already expired or not, and R1) and rotates through the server afterwards.
fn rotating_source(
    token_url: String,
    first_lifetime: Duration,
) -> impl tower_token_refresh::TokenSource {
    let http = client();
    source::from_fn(move |previous: Option<Token>| {
        let http = http.clone();
        let token_url = token_url.clone();
        async move {
            let Some(previous) = previous else {
                return Ok(Token::new("A1")
                    .with_expires_in(first_lifetime)
                    .with_refresh_token("R1"));
            };
            let refresh_token = previous
                .expose_refresh_token()
                .unwrap_or_default()
                .to_owned();
            let request = Request::post(token_url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Full::new(Bytes::from(format!(
                    "grant_type=refresh_token&refresh_token={refresh_token}"
                ))))
                .unwrap();
            let response = http.request(request).await.map_err(Error::transient)?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(Error::transient)?
                .to_bytes();
            if !status.is_success() {
                return Err(Error::terminal(format!("token endpoint answered {status}")));
            }
            let json: serde_json::Value = serde_json::from_slice(&body).map_err(Error::terminal)?;
            Ok::<_, Error>(
                Token::new(json["access_token"].as_str().unwrap())
                    .with_expires_in(Duration::from_secs(json["expires_in"].as_u64().unwrap()))
                    .with_refresh_token(json["refresh_token"].as_str().unwrap()),
            )
        }
    })
}

fn valid_tokens_api(
    books: Arc<Mutex<Books>>,
    hold_a1: Option<Arc<(Notify, Mutex<usize>)>>,
) -> impl Fn(
    common::Recorded,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = http::Response<Full<Bytes>>> + Send>,
> + Clone
       + Send
       + Sync
       + 'static {
    move |request| {
        let books = Arc::clone(&books);
        let hold_a1 = hold_a1.clone();
        Box::pin(async move {
            let token = request.bearer().unwrap_or_default();
            if token == "A1" {
                // All ten requests with A1 arrive before any of them is rejected.
                if let Some(hold) = hold_a1 {
                    let arrived = {
                        let mut count = hold.1.lock().unwrap();
                        *count += 1;
                        *count
                    };
                    if arrived == 10 {
                        hold.0.notify_waiters();
                    } else {
                        hold.0.notified().await;
                    }
                }
                return unauthorized("invalid_token");
            }
            if books.lock().unwrap().access_tokens.contains(&token) {
                ok("served")
            } else {
                unauthorized("invalid_token")
            }
        })
    }
}

async fn ten_calls(
    service: impl tower::Service<
            Request<Full<Bytes>>,
            Response = http::Response<tower_token_refresh::ResponseBody<hyper::body::Incoming>>,
            Error = tower_token_refresh::BoxError,
            Future = impl Send + 'static,
        > + Clone
        + Send
        + 'static,
    url: String,
) -> Vec<StatusCode> {
    let calls: Vec<_> = (0..10)
        .map(|_| tokio::spawn(service.clone().oneshot(get(&url))))
        .collect();
    let mut statuses = Vec::new();
    for call in calls {
        statuses.push(call.await.unwrap().unwrap().status());
    }
    statuses
}

#[tokio::test]
async fn f07a_expiry_noticed_before_sending_one_rotation_for_ten_calls() {
    let books = Arc::new(Mutex::new(Books {
        refresh_token: "R1".into(),
        ..Books::default()
    }));
    let auth = rotating_server(Arc::clone(&books)).await;
    let api = TestServer::start(valid_tokens_api(Arc::clone(&books), None)).await;
    let layer = RefreshLayer::new(rotating_source(auth.url("/token"), Duration::ZERO));
    let handle = layer.handle();
    handle.refresh().await.unwrap();
    let service = ServiceBuilder::new().layer(layer).service(client());

    let statuses = ten_calls(service, api.url("/")).await;

    assert_eq!(statuses, vec![StatusCode::OK; 10]);
    assert_eq!(auth.hits(), 1, "one call to the authorization server");
    assert!(api
        .recorded()
        .iter()
        .all(|r| r.bearer().as_deref() == Some("A2")));
    let stored = handle.current_token().unwrap();
    assert_eq!(stored.expose_refresh_token(), Some("R2"));
}

#[tokio::test]
async fn f07b_ten_rejections_of_the_same_token_one_rotation() {
    let books = Arc::new(Mutex::new(Books {
        refresh_token: "R1".into(),
        ..Books::default()
    }));
    let auth = rotating_server(Arc::clone(&books)).await;
    let hold = Arc::new((Notify::new(), Mutex::new(0)));
    let api = TestServer::start(valid_tokens_api(Arc::clone(&books), Some(hold))).await;
    let layer = RefreshLayer::new(rotating_source(
        auth.url("/token"),
        Duration::from_secs(3600),
    ));
    let handle = layer.handle();
    handle.refresh().await.unwrap();
    let service = ServiceBuilder::new().layer(layer).service(client());

    let statuses = ten_calls(service, api.url("/")).await;

    assert_eq!(statuses, vec![StatusCode::OK; 10]);
    assert_eq!(auth.hits(), 1, "one call to the authorization server");
    let recorded = api.recorded();
    assert_eq!(
        recorded
            .iter()
            .filter(|r| r.bearer().as_deref() == Some("A1"))
            .count(),
        10
    );
    assert_eq!(
        recorded
            .iter()
            .filter(|r| r.bearer().as_deref() == Some("A2"))
            .count(),
        10
    );
    assert_eq!(
        handle.current_token().unwrap().expose_refresh_token(),
        Some("R2")
    );
    let stats = handle.stats();
    assert_eq!((stats.rejections, stats.retries), (10, 10));
}
