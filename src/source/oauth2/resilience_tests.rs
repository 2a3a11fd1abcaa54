//! Retries of both grants against the scripted token endpoint, on tokio's paused clock so
//! that every wait is exact: which failures are retried, how long each wait is, and where
//! the attempts and the retry budget stop.

use std::time::Duration;

use http::{header, StatusCode};
use tokio::time::Instant;

use super::{
    mock::{MockEndpoint, Reply},
    ClientCredentials, ClientCredentialsBuilder, RefreshTokenGrant,
};
use crate::{RefreshLayer, TokenSource};

const TOKEN_URL: &str = "https://auth.example.com/oauth/token";
const TOKEN: &str = r#"{"access_token":"A1","token_type":"Bearer","expires_in":3600}"#;

fn client_credentials(mock: &MockEndpoint, builder: ClientCredentialsBuilder) -> ClientCredentials {
    builder
        .transport(mock.transport())
        .build()
        .expect("a source")
}

fn builder() -> ClientCredentialsBuilder {
    ClientCredentials::builder(TOKEN_URL, "my-client", "client-s3cret")
}

fn unavailable() -> Reply {
    Reply::status(StatusCode::SERVICE_UNAVAILABLE, "")
}

/// The waits between the requests the mock received.
fn gaps(mock: &MockEndpoint) -> Vec<Duration> {
    let received = mock.received();
    received.windows(2).map(|w| w[1].at - w[0].at).collect()
}

fn jittered(base_ms: u64) -> std::ops::RangeInclusive<Duration> {
    Duration::from_millis(base_ms / 2)..=Duration::from_millis(base_ms)
}

#[tokio::test(start_paused = true)]
async fn r9_a_503_then_200_is_retried_once_after_a_jittered_back_off() {
    let mock = MockEndpoint::replying([unavailable(), Reply::ok(TOKEN)]);
    let source = client_credentials(&mock, builder());

    let token = source.fetch(None).await.expect("a token");

    assert_eq!(token.expose_secret(), "A1");
    assert_eq!(mock.hits(), 2);
    let gaps = gaps(&mock);
    assert!(jittered(200).contains(&gaps[0]), "{gaps:?}");
}

#[tokio::test(start_paused = true)]
async fn r9_back_off_doubles_and_the_last_error_is_returned_when_attempts_run_out() {
    let mock = MockEndpoint::replying([
        unavailable(),
        Reply::status(StatusCode::BAD_GATEWAY, ""),
        Reply::status(StatusCode::GATEWAY_TIMEOUT, "upstream timed out"),
    ]);
    let source = client_credentials(&mock, builder());

    let err = source.fetch(None).await.expect_err("a failure");

    assert_eq!(mock.hits(), 3, "three attempts by default");
    assert_eq!(err.status(), Some(StatusCode::GATEWAY_TIMEOUT));
    assert!(err.is_transient());
    assert_eq!(err.excerpt(), Some("upstream timed out"));
    let gaps = gaps(&mock);
    assert!(jittered(200).contains(&gaps[0]), "{gaps:?}");
    assert!(jittered(400).contains(&gaps[1]), "{gaps:?}");
}

#[tokio::test(start_paused = true)]
async fn r9_408_and_429_without_retry_after_are_retried_with_the_back_off() {
    for status in [StatusCode::REQUEST_TIMEOUT, StatusCode::TOO_MANY_REQUESTS] {
        let mock = MockEndpoint::replying([Reply::status(status, ""), Reply::ok(TOKEN)]);
        let source = client_credentials(&mock, builder());

        source.fetch(None).await.expect("a token");

        assert_eq!(mock.hits(), 2, "{status}");
        assert!(jittered(200).contains(&gaps(&mock)[0]), "{status}");
    }
}

#[tokio::test(start_paused = true)]
async fn r9_429_with_retry_after_in_seconds_waits_exactly_that_long() {
    let mock = MockEndpoint::replying([
        Reply::status(StatusCode::TOO_MANY_REQUESTS, "").header(header::RETRY_AFTER, "3"),
        Reply::ok(TOKEN),
    ]);
    let source = client_credentials(&mock, builder());
    let started = Instant::now();

    source.fetch(None).await.expect("a token");

    assert_eq!(mock.hits(), 2);
    assert_eq!(gaps(&mock), [Duration::from_secs(3)]);
    assert_eq!(started.elapsed(), Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn r9_503_with_a_retry_after_date_that_has_passed_is_retried_at_once() {
    let mock = MockEndpoint::replying([
        unavailable().header(header::RETRY_AFTER, "Thu, 01 Jan 1970 00:00:00 GMT"),
        Reply::ok(TOKEN),
    ]);
    let source = client_credentials(&mock, builder());

    source.fetch(None).await.expect("a token");

    assert_eq!(gaps(&mock), [Duration::ZERO]);
}

#[tokio::test(start_paused = true)]
async fn r9_retry_after_beyond_the_budget_gives_up_at_once_with_the_429() {
    let mock = MockEndpoint::replying([
        Reply::status(StatusCode::TOO_MANY_REQUESTS, "").header(header::RETRY_AFTER, "60")
    ]);
    let source = client_credentials(&mock, builder());
    let started = Instant::now();

    let err = source.fetch(None).await.expect_err("a failure");

    assert_eq!(mock.hits(), 1);
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(err.status(), Some(StatusCode::TOO_MANY_REQUESTS));
    assert!(err.is_transient());
}

#[tokio::test(start_paused = true)]
async fn r9_a_larger_retry_budget_waits_out_a_longer_retry_after() {
    let mock = MockEndpoint::replying([
        Reply::status(StatusCode::TOO_MANY_REQUESTS, "").header(header::RETRY_AFTER, "20"),
        Reply::ok(TOKEN),
    ]);
    let source = client_credentials(&mock, builder().retry_budget(Duration::from_secs(30)));

    source.fetch(None).await.expect("a token");

    assert_eq!(gaps(&mock), [Duration::from_secs(20)]);
}

#[tokio::test(start_paused = true)]
async fn r9_no_retry_starts_after_the_budget_is_spent() {
    let mock = MockEndpoint::replying([
        unavailable().header(header::RETRY_AFTER, "4"),
        unavailable().header(header::RETRY_AFTER, "2"),
    ]);
    let source = client_credentials(&mock, builder());
    let started = Instant::now();

    let err = source.fetch(None).await.expect_err("a failure");

    assert_eq!(mock.hits(), 2, "the second wait would end 6 s in, past 5 s");
    assert_eq!(started.elapsed(), Duration::from_secs(4));
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
}

#[tokio::test(start_paused = true)]
async fn r9_connection_failures_are_retried() {
    let mock = MockEndpoint::replying([Reply::Refused, Reply::ok(TOKEN)]);
    let source = client_credentials(&mock, builder());

    source.fetch(None).await.expect("a token");

    assert_eq!(mock.hits(), 2);
}

#[tokio::test(start_paused = true)]
async fn r9_a_timed_out_attempt_is_retried() {
    let mock = MockEndpoint::replying([Reply::Silence, Reply::ok(TOKEN)]);
    let source = client_credentials(&mock, builder().timeout(Duration::from_secs(1)));
    let started = Instant::now();

    source.fetch(None).await.expect("a token");

    assert_eq!(mock.hits(), 2);
    let gap = gaps(&mock)[0];
    assert!(
        (Duration::from_millis(1100)..=Duration::from_millis(1200)).contains(&gap),
        "{gap:?}"
    );
    assert_eq!(started.elapsed(), gap);
}

#[tokio::test(start_paused = true)]
async fn f18_terminal_errors_are_never_retried() {
    for (status, code) in [
        (StatusCode::BAD_REQUEST, "invalid_grant"),
        (StatusCode::UNAUTHORIZED, "invalid_client"),
        (StatusCode::BAD_REQUEST, "unauthorized_client"),
        (StatusCode::BAD_REQUEST, "unsupported_grant_type"),
        (StatusCode::SERVICE_UNAVAILABLE, "invalid_grant"),
    ] {
        let mock = MockEndpoint::replying([Reply::oauth_error(status, code)]);
        let source = client_credentials(&mock, builder());

        let err = source.fetch(None).await.expect_err("a refusal");

        assert_eq!(mock.hits(), 1, "{code}");
        assert!(err.is_terminal(), "{code}");
        assert_eq!(err.oauth_error(), Some(code));
    }
}

#[tokio::test(start_paused = true)]
async fn unsupported_token_type_is_terminal_and_not_retried() {
    let mock = MockEndpoint::replying([Reply::ok(
        r#"{"access_token":"A1","token_type":"mac","expires_in":3600}"#,
    )]);
    let source = client_credentials(&mock, builder());

    let err = source.fetch(None).await.expect_err("a refusal");

    assert_eq!(mock.hits(), 1);
    assert!(err.is_invalid_token() && err.is_terminal());
}

#[tokio::test(start_paused = true)]
async fn an_unusable_answer_with_a_success_status_is_not_retried() {
    let mock = MockEndpoint::replying([Reply::ok("Service is starting, please wait")]);
    let source = client_credentials(&mock, builder());

    let err = source.fetch(None).await.expect_err("a failure");

    assert_eq!(mock.hits(), 1);
    assert!(err.is_invalid_response());
}

#[tokio::test(start_paused = true)]
async fn max_attempts_of_one_switches_retries_off() {
    let mock = MockEndpoint::replying([unavailable()]);
    let source = client_credentials(&mock, builder().max_attempts(1));

    let err = source.fetch(None).await.expect_err("a failure");

    assert_eq!(mock.hits(), 1);
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
}

#[tokio::test(start_paused = true)]
async fn max_attempts_may_be_raised() {
    let mock = MockEndpoint::replying([
        unavailable(),
        unavailable(),
        unavailable(),
        unavailable(),
        Reply::ok(TOKEN),
    ]);
    let source = client_credentials(&mock, builder().max_attempts(5));

    source.fetch(None).await.expect("a token");

    assert_eq!(mock.hits(), 5);
}

#[tokio::test(start_paused = true)]
async fn refresh_token_grant_retries_with_the_same_refresh_token() {
    let mock = MockEndpoint::replying([
        Reply::Refused,
        unavailable(),
        Reply::ok(r#"{"access_token":"A2","refresh_token":"R2"}"#),
    ]);
    let source = RefreshTokenGrant::builder(TOKEN_URL, "my-app", "R1")
        .transport(mock.transport())
        .build()
        .expect("a source");

    let token = source.fetch(None).await.expect("a token");

    assert_eq!(token.expose_refresh_token(), Some("R2"));
    let forms = mock.forms();
    assert_eq!(forms.len(), 3);
    assert!(
        forms.iter().all(|form| form == &forms[0]),
        "every attempt presents R1: {forms:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn r4_retries_live_inside_the_layers_refresh_timeout() {
    let mock = MockEndpoint::replying([
        unavailable().header(header::RETRY_AFTER, "4"),
        unavailable().header(header::RETRY_AFTER, "4"),
    ]);
    let layer = RefreshLayer::new(client_credentials(&mock, builder()));
    let handle = layer.handle();
    let started = Instant::now();

    let err = handle.refresh().await.expect_err("a failure");

    assert_eq!(mock.hits(), 2);
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(4),
        "the source gave up with its own error, well before the layer's 10 s timeout"
    );
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    assert!(!err.is_timeout());
}

#[tokio::test(start_paused = true)]
async fn r4_the_layers_refresh_timeout_still_ends_a_fetch_whose_attempts_hang() {
    let mock = MockEndpoint::replying([Reply::Silence]);
    let layer = RefreshLayer::new(client_credentials(&mock, builder()))
        .refresh_timeout(Duration::from_secs(2));
    let handle = layer.handle();
    let started = Instant::now();

    let err = handle.refresh().await.expect_err("a timeout");

    assert!(err.is_timeout());
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert_eq!(mock.hits(), 1);
}
