//! The refresh-token grant end to end: a builder, the scripted token endpoint, and the token
//! or error that comes out. Each rule of the module docs that is particular to this grant has
//! a test here; the rules both grants share are pinned in `response.rs` and `tests.rs`.

use std::time::Duration;

use http::{header, HeaderValue, StatusCode};
use tokio::time::Instant;

use super::{
    mock::{MockEndpoint, Reply},
    ClientAuth, RefreshTokenGrant, RefreshTokenGrantBuilder,
};
use crate::{Error, Token, TokenSource};

const TOKEN_URL: &str = "https://auth.example.com/oauth/token";
const SECRET: &str = "client-s3cret";
const R1: &str = "R1-initial-refresh-credential";
const R2: &str = "R2-rotated-refresh-credential";

fn builder() -> RefreshTokenGrantBuilder {
    RefreshTokenGrant::builder(TOKEN_URL, "my-app", R1)
}

fn source(mock: &MockEndpoint, builder: RefreshTokenGrantBuilder) -> RefreshTokenGrant {
    builder
        .transport(mock.transport())
        .build()
        .expect("a valid configuration")
}

/// A success answer with access token `access` and the given extra JSON members.
fn answer(access: &str, extra: &str) -> Reply {
    let separator = if extra.is_empty() { "" } else { "," };
    Reply::ok(format!(
        r#"{{"access_token":"{access}","token_type":"Bearer","expires_in":3600{separator}{extra}}}"#
    ))
}

fn rotated(access: &str, refresh: &str) -> Reply {
    answer(access, &format!(r#""refresh_token":"{refresh}""#))
}

fn assert_no_secret(err: &Error, secrets: &[&str]) {
    let shown = format!("{err} {err:?}");
    for secret in secrets {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
}

#[tokio::test]
async fn public_client_sends_refresh_token_and_client_id_in_the_form() {
    let mock = MockEndpoint::replying([rotated("A2", R2)]);
    let source = source(&mock, builder());

    source.fetch(None).await.expect("a token");

    let received = mock.received();
    assert_eq!(
        received[0].form,
        format!("grant_type=refresh_token&refresh_token={R1}&client_id=my-app")
    );
    assert!(!received[0].headers.contains_key(header::AUTHORIZATION));
    assert!(source.is_public_client());
}

#[tokio::test]
async fn confidential_client_authenticates_with_basic_by_default() {
    let mock = MockEndpoint::replying([rotated("A2", R2)]);
    let source = source(&mock, builder().client_secret(SECRET));

    source.fetch(None).await.expect("a token");

    let received = mock.received();
    assert_eq!(
        received[0].form,
        format!("grant_type=refresh_token&refresh_token={R1}")
    );
    // base64("my-app:client-s3cret")
    assert_eq!(
        received[0].headers[header::AUTHORIZATION],
        "Basic bXktYXBwOmNsaWVudC1zM2NyZXQ="
    );
    assert!(received[0].headers[header::AUTHORIZATION].is_sensitive());
    assert!(!source.is_public_client());
}

#[tokio::test]
async fn confidential_client_may_send_its_credentials_in_the_form() {
    let mock = MockEndpoint::replying([rotated("A2", R2)]);
    let source = source(
        &mock,
        builder()
            .client_secret("p@ss w+rd")
            .client_auth(ClientAuth::RequestBody),
    );

    source.fetch(None).await.expect("a token");

    assert_eq!(
        mock.forms(),
        [format!(
            "grant_type=refresh_token&refresh_token={R1}&client_id=my-app\
             &client_secret=p%40ss+w%2Brd"
        )]
    );
}

#[tokio::test]
async fn scopes_and_extra_parameters_follow_the_refresh_token_in_order() {
    let mock = MockEndpoint::replying([rotated("A2", R2)]);
    let source = source(
        &mock,
        builder()
            .scope("read write")
            .audience("https://api.example.com")
            .resource("urn:orders")
            .param("tenant", "acme & co")
            .header(header::USER_AGENT, HeaderValue::from_static("app/1.0")),
    );

    source.fetch(None).await.expect("a token");

    let received = mock.received();
    assert_eq!(
        received[0].form,
        format!(
            "grant_type=refresh_token&refresh_token={R1}&scope=read+write\
             &audience=https%3A%2F%2Fapi.example.com&resource=urn%3Aorders&tenant=acme+%26+co\
             &client_id=my-app"
        )
    );
    assert_eq!(received[0].headers[header::USER_AGENT], "app/1.0");
}

#[tokio::test]
async fn refresh_token_is_form_urlencoded() {
    let mock = MockEndpoint::replying([rotated("A2", R2)]);
    let source = source(
        &mock,
        RefreshTokenGrant::builder(TOKEN_URL, "my-app", "r/1+2=3&4 é"),
    );

    source.fetch(None).await.expect("a token");

    assert!(
        mock.forms()[0]
            .starts_with("grant_type=refresh_token&refresh_token=r%2F1%2B2%3D3%264+%C3%A9&"),
        "{:?}",
        mock.forms()
    );
}

#[tokio::test]
async fn later_fetches_present_the_refresh_token_of_the_previous_token() {
    let mock = MockEndpoint::replying([rotated("A2", R2), rotated("A3", "R3")]);
    let source = source(&mock, builder());

    let first = source.fetch(None).await.expect("a token");
    let second = source.fetch(Some(&first)).await.expect("a token");

    let forms = mock.forms();
    assert!(
        forms[0].contains(&format!("refresh_token={R1}&")),
        "{forms:?}"
    );
    assert!(
        forms[1].contains(&format!("refresh_token={R2}&")),
        "{forms:?}"
    );
    assert_eq!(second.expose_secret(), "A3");
    assert_eq!(second.expose_refresh_token(), Some("R3"));
}

#[tokio::test]
async fn rotated_refresh_token_travels_with_its_access_token() {
    let mock = MockEndpoint::replying([rotated("A2", R2)]);
    let source = source(&mock, builder());

    let token = source.fetch(None).await.expect("a token");

    assert_eq!(token.expose_secret(), "A2");
    assert_eq!(token.expose_refresh_token(), Some(R2));
}

#[tokio::test]
async fn answer_without_a_refresh_token_keeps_the_presented_one() {
    for refresh_token in [None, Some(r#""""#), Some("null"), Some("42"), Some("{}")] {
        let extra = refresh_token
            .map(|value| format!(r#""refresh_token":{value}"#))
            .unwrap_or_default();
        let mock = MockEndpoint::replying([answer("A2", &extra), answer("A3", &extra)]);
        let source = source(&mock, builder());

        let first = source.fetch(None).await.expect("a token");
        let second = source.fetch(Some(&first)).await.expect("a token");

        assert_eq!(first.expose_refresh_token(), Some(R1), "{refresh_token:?}");
        assert_eq!(second.expose_refresh_token(), Some(R1), "{refresh_token:?}");
        assert!(mock.forms()[1].contains(&format!("refresh_token={R1}&")));
    }
}

#[tokio::test]
async fn previous_token_without_a_refresh_token_falls_back_to_the_initial_one() {
    let mock = MockEndpoint::replying([rotated("A2", R2)]);
    let source = source(&mock, builder());

    source
        .fetch(Some(&Token::new("from elsewhere")))
        .await
        .expect("a token");

    assert!(mock.forms()[0].contains(&format!("refresh_token={R1}&")));
}

#[tokio::test]
async fn answer_without_scope_keeps_the_scopes_of_the_previous_token() {
    let mock = MockEndpoint::replying([rotated("A3", "R3")]);
    let source = source(&mock, builder());
    let previous = Token::new("A2")
        .with_refresh_token(R2)
        .with_scopes(["read", "write"]);

    let token = source.fetch(Some(&previous)).await.expect("a token");

    assert_eq!(token.scopes(), ["read", "write"]);
}

#[tokio::test]
async fn answer_without_scope_has_the_scopes_asked_for_when_some_were() {
    let mock = MockEndpoint::replying([rotated("A3", "R3")]);
    let source = source(&mock, builder().scope("read"));
    let previous = Token::new("A2")
        .with_refresh_token(R2)
        .with_scopes(["read", "write"]);

    let token = source.fetch(Some(&previous)).await.expect("a token");

    assert_eq!(token.scopes(), ["read"]);
}

#[tokio::test]
async fn answer_with_scope_replaces_the_previous_scopes() {
    let mock = MockEndpoint::replying([answer("A3", r#""scope":"read""#)]);
    let source = source(&mock, builder());
    let previous = Token::new("A2")
        .with_refresh_token(R2)
        .with_scopes(["read", "write"]);

    let token = source.fetch(Some(&previous)).await.expect("a token");

    assert_eq!(token.scopes(), ["read"]);
}

#[tokio::test]
async fn first_refresh_without_scope_in_the_answer_has_no_scopes() {
    let mock = MockEndpoint::replying([rotated("A2", R2)]);
    let source = source(&mock, builder());

    let token = source.fetch(None).await.expect("a token");

    assert!(token.scopes().is_empty());
}

#[tokio::test]
async fn initial_access_token_is_handed_out_first_without_a_request() {
    let mock = MockEndpoint::replying([rotated("A2", R2)]);
    let source = source(
        &mock,
        builder().access_token(
            Token::new("A1")
                .with_expires_in(Duration::from_secs(600))
                .with_scopes(["read"]),
        ),
    );

    let first = source.fetch(None).await.expect("the initial token");

    assert_eq!(mock.hits(), 0);
    assert_eq!(first.expose_secret(), "A1");
    assert_eq!(first.expose_refresh_token(), Some(R1));
    assert_eq!(first.scopes(), ["read"]);
}

#[tokio::test]
async fn initial_access_token_is_handed_out_once() {
    let mock = MockEndpoint::replying([rotated("A2", R2)]);
    let source = source(&mock, builder().access_token(Token::new("A1")));

    source.fetch(None).await.expect("the initial token");
    let second = source.fetch(None).await.expect("a refreshed token");

    assert_eq!(mock.hits(), 1);
    assert_eq!(second.expose_secret(), "A2");
    assert!(mock.forms()[0].contains(&format!("refresh_token={R1}&")));
}

#[tokio::test]
async fn initial_access_tokens_own_refresh_token_is_replaced_by_the_builders() {
    let mock = MockEndpoint::default();
    let source = source(
        &mock,
        builder().access_token(Token::new("A1").with_refresh_token("stale")),
    );

    let first = source.fetch(None).await.expect("the initial token");

    assert_eq!(first.expose_refresh_token(), Some(R1));
}

#[tokio::test(start_paused = true)]
async fn expired_initial_access_token_is_skipped_for_a_refresh_keeping_its_scopes() {
    let mock = MockEndpoint::replying([rotated("A2", R2)]);
    let source = source(
        &mock,
        builder().access_token(
            Token::new("A1")
                .with_expires_in(Duration::from_secs(5))
                .with_scopes(["read"]),
        ),
    );
    tokio::time::advance(Duration::from_secs(5)).await;

    let token = source.fetch(None).await.expect("a refreshed token");

    assert_eq!(mock.hits(), 1);
    assert_eq!(token.expose_secret(), "A2");
    assert_eq!(token.scopes(), ["read"]);
}

#[tokio::test(start_paused = true)]
async fn expiry_counts_from_the_moment_the_request_was_sent() {
    let mock = MockEndpoint::replying([rotated("A2", R2).after(Duration::from_secs(4))]);
    let source = source(&mock, builder());
    let before_sending = Instant::now();

    let token = source.fetch(None).await.expect("a token");

    assert_eq!(
        token.expires_at(),
        Some(before_sending + Duration::from_secs(3600))
    );
}

#[tokio::test]
async fn f18_invalid_grant_is_terminal_typed_and_asked_once() {
    let mock = MockEndpoint::replying([Reply::status(
        StatusCode::BAD_REQUEST,
        r#"{"error":"invalid_grant","error_description":"refresh token revoked",
            "error_uri":"https://auth.example.com/errors#invalid_grant"}"#,
    )]);
    let source = source(&mock, builder());

    let err = source.fetch(None).await.expect_err("a refusal");

    assert_eq!(mock.hits(), 1);
    assert!(err.is_endpoint() && err.is_terminal(), "{err:?}");
    assert_eq!(err.status(), Some(StatusCode::BAD_REQUEST));
    assert_eq!(err.oauth_error(), Some("invalid_grant"));
    assert_eq!(err.error_description(), Some("refresh token revoked"));
    assert_eq!(
        err.error_uri(),
        Some("https://auth.example.com/errors#invalid_grant")
    );
}

#[tokio::test]
async fn r10_error_fields_that_echo_the_refresh_token_are_dropped() {
    let mock = MockEndpoint::replying([Reply::status(
        StatusCode::BAD_REQUEST,
        format!(r#"{{"error":"invalid_grant","error_description":"unknown token {R1}"}}"#),
    )]);
    let source = source(&mock, builder());

    let err = source.fetch(None).await.expect_err("a refusal");

    assert_eq!(err.oauth_error(), Some("invalid_grant"));
    assert_eq!(err.error_description(), None);
    assert_no_secret(&err, &[R1]);
}

#[tokio::test]
async fn r10_error_excerpts_never_show_the_refresh_token() {
    let mock = MockEndpoint::replying([Reply::status(
        StatusCode::BAD_GATEWAY,
        format!("upstream said no to {R1} today"),
    )]);
    let source = source(&mock, builder().max_attempts(1));

    let err = source.fetch(None).await.expect_err("a failure");

    assert_eq!(err.excerpt(), None);
    assert_no_secret(&err, &[R1]);
}

#[tokio::test]
async fn r10_a_field_error_never_shows_either_token() {
    let mock = MockEndpoint::replying([Reply::ok(format!(
        r#"{{"access_token":"A2","expires_in":"soon","refresh_token":"{R2}"}}"#
    ))]);
    let source = source(&mock, builder());

    let err = source.fetch(None).await.expect_err("a parse error");

    assert_eq!(err.field(), Some("expires_in"));
    assert_no_secret(&err, &[R1, R2, "\"A2\""]);
}

#[test]
fn r10_debug_shows_no_secret_and_no_token() {
    let builder = builder()
        .client_secret(SECRET)
        .access_token(Token::new("A1-secret-access"));
    let builder_debug = format!("{builder:?}");
    let source = source(&MockEndpoint::default(), builder);

    let source_debug = format!("{source:?}");

    for debug in [&builder_debug, &source_debug] {
        for secret in [SECRET, R1, "A1-secret-access"] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        assert!(debug.contains("[redacted]"), "{debug}");
        assert!(debug.contains("my-app"), "{debug}");
    }
}

fn build_error(builder: RefreshTokenGrantBuilder) -> Error {
    builder
        .transport(MockEndpoint::default().transport())
        .build()
        .expect_err("a refusal")
}

#[test]
fn empty_refresh_token_is_refused() {
    let err = build_error(RefreshTokenGrant::builder(TOKEN_URL, "my-app", ""));

    assert!(err.is_config());
    assert_eq!(
        err.to_string(),
        "invalid configuration: refresh token is empty"
    );
}

#[test]
fn params_that_repeat_what_the_source_sends_are_refused() {
    for (builder, what) in [
        (builder().param("refresh_token", "x"), "refresh_token"),
        (builder().param("grant_type", "x"), "grant_type"),
        (builder().param("client_secret", "x"), "client_secret"),
        (
            builder().param("client_id", "x"),
            "client_id of a public client",
        ),
        (
            builder()
                .client_secret(SECRET)
                .client_auth(ClientAuth::RequestBody)
                .param("client_id", "x"),
            "client_id in the body",
        ),
        (builder().scope("a").param("scope", "b"), "scope twice"),
    ] {
        assert!(build_error(builder).is_config(), "{what}");
    }
}

#[test]
fn client_id_param_is_allowed_with_basic_auth() {
    let result = builder()
        .client_secret(SECRET)
        .param("client_id", "my-app")
        .transport(MockEndpoint::default().transport())
        .build();

    assert!(result.is_ok());
}

#[test]
fn zero_attempts_are_refused() {
    let err = build_error(builder().max_attempts(0));

    assert!(err.is_config());
}

#[test]
fn r10_plain_http_to_a_remote_host_is_refused_naming_the_refresh_token() {
    let err = build_error(RefreshTokenGrant::builder(
        "http://auth.example.com/token",
        "my-app",
        R1,
    ));

    assert_eq!(
        err.to_string(),
        "invalid configuration: token URL is plain http to a non-loopback host; the refresh \
         token would travel unencrypted (see allow_insecure_http)"
    );
}

#[test]
fn accessors_tell_the_configuration() {
    let source = source(&MockEndpoint::default(), builder().scope("read write"));

    assert_eq!(source.token_url(), TOKEN_URL);
    assert_eq!(source.client_id(), "my-app");
    assert_eq!(source.scopes(), ["read", "write"]);
}

#[test]
fn source_is_clone_send_sync_and_its_fetch_is_send() {
    fn assert_source<T: TokenSource + Clone + Send + Sync>(_: &T) {}
    fn assert_send<T: Send>(_: &T) {}

    let source = source(&MockEndpoint::default(), builder());
    assert_source(&source);
    let fetch = source.fetch(None);
    assert_send(&fetch);
}
