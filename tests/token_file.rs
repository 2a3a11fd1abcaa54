//! The token file source behind the layer: a real file in a temporary folder, a real API on
//! loopback. Re-read on change and on rejection, clear errors, JWT expiry (R2, R6, R9).

mod common;

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::{client, get, ok, unauthorized, TestServer};
use http::StatusCode;
use jsonwebtoken::{EncodingKey, Header};
use tempfile::TempDir;
use tower::{ServiceBuilder, ServiceExt};
use tower_token_refresh::{source::TokenFile, Error, RefreshLayer};

/// The check interval of the tests that wait for a check, in real time.
const CHECK: Duration = Duration::from_millis(50);

/// A temporary folder with the file `token` holding `contents`.
fn folder_with_token(contents: &str) -> (TempDir, std::path::PathBuf) {
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("token");
    std::fs::write(&path, contents).unwrap();
    (folder, path)
}

/// Replaces the file the way careful writers do: a new file renamed over the old one.
fn replace_atomically(path: &Path, contents: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, contents).unwrap();
    std::fs::rename(&next, path).unwrap();
}

/// An API that accepts the token in `accepted` and rejects every other one with 401.
async fn api_accepting(accepted: Arc<Mutex<String>>) -> TestServer {
    TestServer::start(move |request| {
        let accepted = accepted.lock().unwrap().clone();
        async move {
            if request.bearer() == Some(accepted) {
                ok("welcome")
            } else {
                unauthorized("invalid_token")
            }
        }
    })
    .await
}

fn bearers(api: &TestServer) -> Vec<String> {
    api.recorded()
        .iter()
        .map(|request| request.bearer().unwrap())
        .collect()
}

fn chain(err: &Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(next) = source {
        text.push_str(&format!(": {next}"));
        source = next.source();
    }
    text
}

#[tokio::test]
async fn rereads_the_file_when_it_changes() {
    let api = TestServer::start(|_| async { ok("fine") }).await;
    let (_folder, path) = folder_with_token("token-1\n");
    let layer = RefreshLayer::new(TokenFile::new(&path).check_interval(CHECK));
    let handle = layer.handle();
    let mut installed = handle.subscribe();
    let service = ServiceBuilder::new().layer(layer).service(client());
    service.clone().oneshot(get(&api.url("/"))).await.unwrap();
    assert_eq!(installed.next().await.unwrap().expose_secret(), "token-1");

    replace_atomically(&path, "token-2\n");
    tokio::time::sleep(CHECK).await;
    let during_check = service.clone().oneshot(get(&api.url("/"))).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), installed.next())
        .await
        .expect("the check installs the new token")
        .unwrap();
    let after_check = service.clone().oneshot(get(&api.url("/"))).await.unwrap();

    assert_eq!(next.expose_secret(), "token-2");
    assert_eq!(during_check.status(), StatusCode::OK);
    assert_eq!(after_check.status(), StatusCode::OK);
    assert_eq!(
        bearers(&api),
        ["token-1", "token-1", "token-2"],
        "the token in service is used while the file is checked in the background"
    );
    assert_eq!(handle.stats().refreshes, 2);
}

#[tokio::test]
async fn rereads_the_file_when_the_token_is_rejected() {
    let accepted = Arc::new(Mutex::new(String::from("token-1")));
    let api = api_accepting(Arc::clone(&accepted)).await;
    let (_folder, path) = folder_with_token("token-1");
    let layer = RefreshLayer::new(TokenFile::new(&path).check_interval(Duration::from_secs(3600)));
    let handle = layer.handle();
    let service = ServiceBuilder::new().layer(layer).service(client());
    service.clone().oneshot(get(&api.url("/"))).await.unwrap();

    // The sidecar writes a new token, and the API stops accepting the old one, long before
    // the next check.
    std::fs::write(&path, "token-2\n").unwrap();
    *accepted.lock().unwrap() = String::from("token-2");
    let response = service.clone().oneshot(get(&api.url("/"))).await.unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(bearers(&api), ["token-1", "token-1", "token-2"]);
    let stats = handle.stats();
    assert_eq!((stats.refreshes, stats.retries), (2, 1));
}

#[tokio::test]
async fn r6_a_rejected_token_still_in_the_file_is_retried_once_then_the_401_returned() {
    let api = TestServer::start(|_| async { unauthorized("invalid_token") }).await;
    let (_folder, path) = folder_with_token("token-1");
    let layer = RefreshLayer::new(TokenFile::new(&path));
    let handle = layer.handle();
    let service = ServiceBuilder::new().layer(layer).service(client());

    let response = service.oneshot(get(&api.url("/"))).await.unwrap();

    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(bearers(&api), ["token-1", "token-1"]);
    let stats = handle.stats();
    assert_eq!(
        (stats.refreshes, stats.retries, stats.passed_through),
        (2, 1, 1),
        "the file was read again, and its token sent once more"
    );
}

#[tokio::test]
async fn r9_a_missing_file_fails_the_request_with_a_transient_error_and_sends_nothing() {
    let api = TestServer::start(|_| async { ok("fine") }).await;
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("not-written-yet");
    let service = ServiceBuilder::new()
        .layer(RefreshLayer::new(TokenFile::new(&path)))
        .service(client());

    let err = service.oneshot(get(&api.url("/"))).await.unwrap_err();

    let err = err.downcast_ref::<Error>().expect("a token error");
    assert!(err.is_file() && err.is_transient(), "{err:?}");
    assert!(
        chain(err).contains(&format!("token file {path:?} does not exist")),
        "{}",
        chain(err)
    );
    assert_eq!(api.hits(), 0);
}

#[tokio::test]
async fn r9_a_file_written_late_is_used_once_the_failure_backoff_is_over() {
    let api = TestServer::start(|_| async { ok("fine") }).await;
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("token");
    let backoff = Duration::from_millis(10);
    let service = ServiceBuilder::new()
        .layer(RefreshLayer::new(TokenFile::new(&path)).failure_backoff(backoff))
        .service(client());
    let early = service.clone().oneshot(get(&api.url("/"))).await;

    std::fs::write(&path, "token-1\n").unwrap();
    tokio::time::sleep(backoff * 2).await;
    let late = service.clone().oneshot(get(&api.url("/"))).await.unwrap();

    assert!(early.is_err());
    assert_eq!(late.status(), StatusCode::OK);
    assert_eq!(bearers(&api), ["token-1"]);
}

#[tokio::test]
async fn r9_an_empty_file_fails_the_request_with_a_clear_error() {
    let api = TestServer::start(|_| async { ok("fine") }).await;
    let (_folder, path) = folder_with_token(" \n");
    let service = ServiceBuilder::new()
        .layer(RefreshLayer::new(TokenFile::new(&path)))
        .service(client());

    let err = service.oneshot(get(&api.url("/"))).await.unwrap_err();

    let err = err.downcast_ref::<Error>().expect("a token error");
    assert!(err.is_file() && err.is_transient(), "{err:?}");
    assert!(
        chain(err).ends_with(&format!("token file {path:?} is empty")),
        "{}",
        chain(err)
    );
    assert_eq!(api.hits(), 0);
}

#[tokio::test]
async fn r9_a_failed_check_keeps_the_token_in_service() {
    let api = TestServer::start(|_| async { ok("fine") }).await;
    let (_folder, path) = folder_with_token("token-1");
    let layer = RefreshLayer::new(TokenFile::new(&path).check_interval(CHECK));
    let handle = layer.handle();
    let service = ServiceBuilder::new().layer(layer).service(client());
    service.clone().oneshot(get(&api.url("/"))).await.unwrap();

    std::fs::remove_file(&path).unwrap();
    tokio::time::sleep(CHECK).await;
    let during_check = service.clone().oneshot(get(&api.url("/"))).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while handle.stats().failures == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the check fails");
    let after_check = service.clone().oneshot(get(&api.url("/"))).await.unwrap();

    assert_eq!(during_check.status(), StatusCode::OK);
    assert_eq!(after_check.status(), StatusCode::OK);
    assert_eq!(bearers(&api), ["token-1", "token-1", "token-1"]);
}

#[tokio::test]
async fn r2_the_exp_of_a_jwt_in_the_file_is_its_expiry() {
    let api = TestServer::start(|_| async { ok("fine") }).await;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let claims = serde_json::json!({ "sub": "system:serviceaccount:default:app", "exp": now.as_secs() + 3600 });
    let jwt = jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(b"test key"),
    )
    .unwrap();
    let (_folder, path) = folder_with_token(&format!("{jwt}\n"));
    let layer = RefreshLayer::new(TokenFile::new(&path));
    let handle = layer.handle();
    let service = ServiceBuilder::new().layer(layer).service(client());

    let response = service.oneshot(get(&api.url("/"))).await.unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(bearers(&api), [jwt]);
    let expires_in = handle.token_info().unwrap().expires_in().unwrap();
    assert!(
        expires_in > Duration::from_secs(3590) && expires_in <= Duration::from_secs(3600),
        "{expires_in:?}"
    );
}
