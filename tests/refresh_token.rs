//! The refresh-token grant behind the layer, against an authorization server of our own on
//! 127.0.0.1 that rotates refresh tokens (each works once; a reused one gets `invalid_grant`)
//! and a protected API that accepts only the access tokens that server issued and did not
//! revoke (F07, F18, R9, R12).

mod common;

use std::{
    collections::{HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use common::{client, get, ok, respond, unauthorized, Recorded, TestServer};
use http::{Response, StatusCode};
use http_body_util::Full;
use tokio::{sync::Barrier, time::Instant};
use tower::{ServiceBuilder, ServiceExt};
use tower_token_refresh::{
    source::oauth2::RefreshTokenGrant, Error, RefreshHandle, RefreshLayer, Token, TokenUpdates,
};

const JSON: (&str, &str) = ("content-type", "application/json");
const CLIENT_ID: &str = "desktop-app";
const REFUSAL: &str =
    r#"{"error":"invalid_grant","error_description":"refresh token unknown or used"}"#;

/// What the authorization server knows.
struct Books {
    /// The one refresh token that works now.
    refresh_token: String,
    /// Access tokens issued and not revoked.
    valid: HashSet<String>,
    /// How many token pairs were issued.
    issued: usize,
    /// Whether each answer carries a new refresh token.
    rotate: bool,
    /// Answers given instead of a token, first come first served.
    faults: VecDeque<Response<Full<Bytes>>>,
    /// Refresh tokens presented, in order.
    presented: Vec<String>,
    /// Requests refused with `invalid_grant`.
    refused: usize,
}

impl Books {
    /// Starts with the credentials an application saved: A1 and R1.
    fn new() -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Self {
            refresh_token: "R1".into(),
            valid: HashSet::from(["A1".to_owned()]),
            issued: 1,
            rotate: true,
            faults: VecDeque::new(),
            presented: Vec::new(),
            refused: 0,
        }))
    }
}

/// Decodes an `application/x-www-form-urlencoded` body.
fn form(body: &Bytes) -> Vec<(String, String)> {
    let decode = |text: &str| {
        let bytes = text.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 2;
                }
                byte => out.push(byte),
            }
            i += 1;
        }
        String::from_utf8(out).unwrap()
    };
    std::str::from_utf8(body)
        .unwrap()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap();
            (decode(name), decode(value))
        })
        .collect()
}

/// The token endpoint: a public client's refresh-token grant, refresh tokens single-use.
async fn authorization_server(books: Arc<Mutex<Books>>) -> TestServer {
    TestServer::start(move |request: Recorded| {
        let books = Arc::clone(&books);
        async move {
            let form = form(&request.body);
            let param = |name: &str| {
                form.iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, value)| value.clone())
            };
            let mut books = books.lock().unwrap();
            if let Some(fault) = books.faults.pop_front() {
                return fault;
            }

            let presented = param("refresh_token").unwrap_or_default();
            books.presented.push(presented.clone());
            if param("grant_type").as_deref() != Some("refresh_token")
                || param("client_id").as_deref() != Some(CLIENT_ID)
                || presented != books.refresh_token
            {
                books.refused += 1;
                return respond(StatusCode::BAD_REQUEST, &[JSON], REFUSAL);
            }

            books.issued += 1;
            let access = format!("A{}", books.issued);
            books.valid.insert(access.clone());
            let body = if books.rotate {
                books.refresh_token = format!("R{}", books.issued);
                format!(
                    r#"{{"access_token":"{access}","token_type":"Bearer","expires_in":3600,
                        "refresh_token":"{}","scope":"orders"}}"#,
                    books.refresh_token
                )
            } else {
                format!(r#"{{"access_token":"{access}","token_type":"Bearer","expires_in":3600}}"#)
            };
            respond(StatusCode::OK, &[JSON], &body)
        }
    })
    .await
}

/// The protected API: 200 for a valid access token, 401 `invalid_token` otherwise.
async fn protected_api(books: Arc<Mutex<Books>>) -> TestServer {
    TestServer::start(move |request: Recorded| {
        let books = Arc::clone(&books);
        async move {
            let token = request.bearer().unwrap_or_default();
            if books.lock().unwrap().valid.contains(&token) {
                ok("orders")
            } else {
                unauthorized("invalid_token")
            }
        }
    })
    .await
}

/// Revokes every access token issued so far.
fn revoke_all(books: &Mutex<Books>) {
    books.lock().unwrap().valid.clear();
}

fn source(
    auth: &TestServer,
    refresh_token: &str,
    access_token: Option<Token>,
) -> RefreshTokenGrant {
    let mut builder = RefreshTokenGrant::builder(auth.url("/token"), CLIENT_ID, refresh_token);
    if let Some(access_token) = access_token {
        builder = builder.access_token(access_token);
    }
    builder.build().expect("a loopback token URL is accepted")
}

fn saved_a1() -> Token {
    Token::new("A1").with_expires_in(Duration::from_secs(3600))
}

type Client = tower_token_refresh::Refresh<
    hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
>;

fn layered(layer: RefreshLayer) -> (Client, RefreshHandle) {
    let handle = layer.handle();
    (ServiceBuilder::new().layer(layer).service(client()), handle)
}

async fn status_of(service: &Client, url: &str) -> Result<StatusCode, String> {
    service
        .clone()
        .oneshot(get(url))
        .await
        .map(|response| response.status())
        .map_err(|err| err.to_string())
}

/// The (access, refresh) pairs installed so far, waiting up to 100 ms for each.
async fn installed_pairs(updates: &mut TokenUpdates) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    while let Ok(Some(token)) =
        tokio::time::timeout(Duration::from_millis(100), updates.next()).await
    {
        pairs.push((
            token.expose_secret().to_owned(),
            token.expose_refresh_token().unwrap_or_default().to_owned(),
        ));
    }
    pairs
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, r)| ((*a).to_owned(), (*r).to_owned()))
        .collect()
}

const CALLERS: usize = 100;
const ROTATIONS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f07_a_hundred_concurrent_callers_across_three_rotations_make_three_token_requests() {
    let books = Books::new();
    let auth = authorization_server(Arc::clone(&books)).await;
    let api = protected_api(Arc::clone(&books)).await;
    let (service, handle) = layered(RefreshLayer::new(source(&auth, "R1", Some(saved_a1()))));
    let mut updates = handle.subscribe();
    let start = Arc::new(Barrier::new(CALLERS + 1));
    let done = Arc::new(Barrier::new(CALLERS + 1));

    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (service, url) = (service.clone(), api.url("/orders"));
            let (start, done) = (Arc::clone(&start), Arc::clone(&done));
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                for _ in 0..ROTATIONS {
                    start.wait().await;
                    statuses.push(status_of(&service, &url).await);
                    done.wait().await;
                }
                statuses
            })
        })
        .collect();
    let mut requests_after_each_round = Vec::new();
    for round in 0..ROTATIONS {
        // F07 (b): the API rejects the token all callers hold; in the middle round the
        // token is taken for expired before anyone sends it, F07 (a).
        if round == 1 {
            handle.invalidate();
        } else {
            revoke_all(&books);
        }
        start.wait().await;
        done.wait().await;
        requests_after_each_round.push(auth.hits());
    }

    for caller in callers {
        let statuses = caller.await.unwrap();
        assert_eq!(statuses, vec![Ok(StatusCode::OK); ROTATIONS]);
    }
    assert_eq!(
        requests_after_each_round,
        [1, 2, 3],
        "one token request per rotation"
    );
    assert_eq!(auth.hits(), ROTATIONS);
    {
        let books = books.lock().unwrap();
        assert_eq!(books.presented, ["R1", "R2", "R3"]);
        assert_eq!(books.refused, 0, "no refresh token was presented twice");
    }
    assert_eq!(
        installed_pairs(&mut updates).await,
        pairs(&[("A1", "R1"), ("A2", "R2"), ("A3", "R3"), ("A4", "R4")]),
        "each rotated pair once, in order, the saved one first"
    );
    let stats = handle.stats();
    assert_eq!(stats.refreshes, 1 + ROTATIONS as u64, "{stats:?}");
    assert_eq!(stats.failures, 0, "{stats:?}");
    let current = handle.current_token().unwrap();
    assert_eq!(current.scopes(), ["orders"]);
}

#[tokio::test]
async fn r12_an_application_restarts_from_the_pair_it_saved() {
    let books = Books::new();
    let auth = authorization_server(Arc::clone(&books)).await;
    let api = protected_api(Arc::clone(&books)).await;
    let saved = {
        let (service, handle) = layered(RefreshLayer::new(source(&auth, "R1", None)));
        let mut updates = handle.subscribe();
        assert_eq!(status_of(&service, &api.url("/")).await, Ok(StatusCode::OK));
        updates.next().await.expect("the first token")
    };
    assert_eq!(saved.expose_refresh_token(), Some("R2"));

    let restarted = source(
        &auth,
        saved.expose_refresh_token().unwrap(),
        Some(Token::new(saved.expose_secret()).with_expires_in(saved.expires_in().unwrap())),
    );
    let (service, handle) = layered(RefreshLayer::new(restarted));
    let first = status_of(&service, &api.url("/")).await;
    let hits_before_revocation = auth.hits();
    revoke_all(&books);
    let second = status_of(&service, &api.url("/")).await;

    assert_eq!(first, Ok(StatusCode::OK));
    assert_eq!(
        hits_before_revocation, 1,
        "the saved access token served without a request"
    );
    assert_eq!(second, Ok(StatusCode::OK));
    assert_eq!(books.lock().unwrap().presented, ["R1", "R2"]);
    let current = handle.current_token().unwrap();
    assert_eq!(
        (current.expose_secret(), current.expose_refresh_token()),
        ("A3", Some("R3"))
    );
}

#[tokio::test]
async fn an_answer_without_a_refresh_token_keeps_the_old_one_in_every_installed_token() {
    let books = Books::new();
    books.lock().unwrap().rotate = false;
    let auth = authorization_server(Arc::clone(&books)).await;
    let api = protected_api(Arc::clone(&books)).await;
    let (service, handle) = layered(RefreshLayer::new(source(&auth, "R1", None)));
    let mut updates = handle.subscribe();

    for _ in 0..2 {
        revoke_all(&books);
        assert_eq!(status_of(&service, &api.url("/")).await, Ok(StatusCode::OK));
    }

    assert_eq!(
        installed_pairs(&mut updates).await,
        pairs(&[("A2", "R1"), ("A3", "R1")])
    );
    assert_eq!(books.lock().unwrap().presented, ["R1", "R1"]);
}

#[tokio::test]
async fn r9_a_503_then_a_token_is_one_refresh_with_two_requests() {
    let books = Books::new();
    books.lock().unwrap().faults.push_back(respond(
        StatusCode::SERVICE_UNAVAILABLE,
        &[],
        "try again",
    ));
    let auth = authorization_server(Arc::clone(&books)).await;
    let api = protected_api(Arc::clone(&books)).await;
    let (service, handle) = layered(RefreshLayer::new(source(&auth, "R1", None)));

    let status = status_of(&service, &api.url("/")).await;

    assert_eq!(status, Ok(StatusCode::OK));
    assert_eq!(auth.hits(), 2);
    assert_eq!(api.hits(), 1);
    let stats = handle.stats();
    assert_eq!((stats.refreshes, stats.failures), (1, 0), "{stats:?}");
}

#[tokio::test]
async fn r9_a_429_with_retry_after_is_waited_out() {
    let books = Books::new();
    books.lock().unwrap().faults.push_back(respond(
        StatusCode::TOO_MANY_REQUESTS,
        &[("retry-after", "1")],
        "",
    ));
    let auth = authorization_server(Arc::clone(&books)).await;
    let (_service, handle) = layered(RefreshLayer::new(source(&auth, "R1", None)));
    let started = Instant::now();

    let refreshed = handle.refresh().await;

    assert!(refreshed.is_ok(), "{refreshed:?}");
    assert_eq!(auth.hits(), 2);
    let elapsed = started.elapsed();
    assert!(
        (Duration::from_secs(1)..Duration::from_secs(3)).contains(&elapsed),
        "{elapsed:?}"
    );
}

#[tokio::test]
async fn r9_a_429_asking_for_more_than_the_retry_budget_fails_at_once() {
    let books = Books::new();
    books.lock().unwrap().faults.push_back(respond(
        StatusCode::TOO_MANY_REQUESTS,
        &[("retry-after", "60")],
        "",
    ));
    let auth = authorization_server(Arc::clone(&books)).await;
    let (_service, handle) = layered(RefreshLayer::new(source(&auth, "R1", None)));
    let started = Instant::now();

    let err = handle.refresh().await.expect_err("a failure");

    assert_eq!(auth.hits(), 1);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(err.status(), Some(StatusCode::TOO_MANY_REQUESTS));
    assert!(err.is_transient());
}

#[tokio::test]
async fn f18_a_reused_refresh_token_is_a_terminal_error_asked_once() {
    let books = Books::new();
    books.lock().unwrap().refresh_token = "R9".into();
    let auth = authorization_server(Arc::clone(&books)).await;
    let api = protected_api(Arc::clone(&books)).await;
    let (service, _handle) = layered(RefreshLayer::new(source(&auth, "R1", None)));

    let first = service.clone().oneshot(get(&api.url("/"))).await;
    let second = service.clone().oneshot(get(&api.url("/"))).await;

    for outcome in [first, second] {
        let err = *outcome.expect_err("no token").downcast::<Error>().unwrap();
        assert!(err.is_terminal() && err.is_endpoint(), "{err:?}");
        assert_eq!(err.oauth_error(), Some("invalid_grant"));
        assert_eq!(
            err.error_description(),
            Some("refresh token unknown or used")
        );
    }
    assert_eq!(
        auth.hits(),
        1,
        "not retried, and the second call met the back-off"
    );
    assert_eq!(api.hits(), 0, "nothing sent without a token");
}

/// What a valid refresh gets: given the request number and the rotated pair, how long to
/// wait and what to answer.
type Script = fn(usize, &str, &str) -> (Duration, Response<Full<Bytes>>);

/// A strict single-use authorization server whose answers the test scripts: each refresh
/// token works once.
async fn scripted_server(answer: Script) -> (TestServer, Arc<Mutex<Vec<String>>>) {
    let presented = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&presented);
    let valid = Arc::new(Mutex::new(String::from("R1")));
    let server = TestServer::start(move |request: Recorded| {
        let log = Arc::clone(&log);
        let valid = Arc::clone(&valid);
        async move {
            let refresh_token = form(&request.body)
                .into_iter()
                .find(|(name, _)| name == "refresh_token")
                .map(|(_, value)| value)
                .unwrap_or_default();
            let (n, accepted) = {
                let mut log = log.lock().unwrap();
                log.push(refresh_token.clone());
                let mut valid = valid.lock().unwrap();
                let accepted = *valid == refresh_token;
                if accepted {
                    *valid = format!("R{}", log.len() + 1);
                }
                (log.len(), accepted.then(|| valid.clone()))
            };
            let Some(rotated) = accepted else {
                return respond(
                    StatusCode::BAD_REQUEST,
                    &[("content-type", "application/json")],
                    r#"{"error":"invalid_grant"}"#,
                );
            };
            let (delay, response) = answer(n, &format!("A{}", n + 1), &rotated);
            tokio::time::sleep(delay).await;
            response
        }
    })
    .await;
    (server, presented)
}

#[tokio::test]
async fn r4_a_rotated_refresh_token_in_an_unusable_answer_is_kept_for_the_next_refresh() {
    let (auth, presented) = scripted_server(|n, access, rotated| {
        // The first answer rotates the refresh token but its access token is unusable.
        let access = if n == 1 { "" } else { access };
        let body = format!(
            r#"{{"access_token":"{access}","token_type":"Bearer","expires_in":3600,"refresh_token":"{rotated}"}}"#
        );
        (Duration::ZERO, respond(StatusCode::OK, &[("content-type", "application/json")], &body))
    })
    .await;
    let source = RefreshTokenGrant::builder(auth.url("/token"), "app", "R1")
        .build()
        .unwrap();
    let handle = RefreshLayer::new(source)
        .failure_backoff(Duration::ZERO)
        .handle();

    let unusable = handle.refresh().await.unwrap_err();
    let next = handle.refresh().await.unwrap();

    assert!(unusable.is_invalid_response(), "{unusable}");
    assert_eq!(*presented.lock().unwrap(), ["R1", "R2"], "R2 was not lost");
    assert_eq!(next.generation, 1);
    assert_eq!(
        handle.current_token().unwrap().expose_refresh_token(),
        Some("R3")
    );
}

#[tokio::test]
async fn r4_an_attempt_that_timed_out_is_not_repeated_with_a_spent_refresh_token() {
    let (auth, presented) = scripted_server(|_, access, rotated| {
        let body = format!(
            r#"{{"access_token":"{access}","token_type":"Bearer","expires_in":3600,"refresh_token":"{rotated}"}}"#
        );
        (
            Duration::from_millis(400),
            respond(StatusCode::OK, &[("content-type", "application/json")], &body),
        )
    })
    .await;
    let source = RefreshTokenGrant::builder(auth.url("/token"), "app", "R1")
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let handle = RefreshLayer::new(source).handle();

    let timed_out = handle.refresh().await.unwrap_err();

    assert!(timed_out.is_timeout(), "{timed_out}");
    assert_eq!(
        *presented.lock().unwrap(),
        ["R1"],
        "not presented a second time"
    );
}

#[tokio::test]
async fn r4_a_late_rotation_is_installed_after_the_refresh_timeout() {
    let (auth, presented) = scripted_server(|_, access, rotated| {
        let body = format!(
            r#"{{"access_token":"{access}","token_type":"Bearer","expires_in":3600,"refresh_token":"{rotated}"}}"#
        );
        (
            Duration::from_millis(700),
            respond(StatusCode::OK, &[("content-type", "application/json")], &body),
        )
    })
    .await;
    let source = RefreshTokenGrant::builder(auth.url("/token"), "app", "R1")
        .build()
        .unwrap();
    let layer = RefreshLayer::new(source).refresh_timeout(Duration::from_millis(100));
    let handle = layer.handle();
    let mut updates = handle.subscribe();

    let late = handle.refresh().await.unwrap_err();
    let installed = updates.next().await.unwrap();

    assert!(late.is_timeout());
    assert_eq!(installed.expose_refresh_token(), Some("R2"));
    assert_eq!(*presented.lock().unwrap(), ["R1"]);
}
