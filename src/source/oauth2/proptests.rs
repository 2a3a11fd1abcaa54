//! Properties of reading token endpoint answers: any JSON value in any field, any body and any
//! `Retry-After` value is read without a panic, and no error ever shows a credential: the
//! client secret, the refresh token that was presented, or a token the answer carries.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{header, HeaderMap, HeaderValue, StatusCode};
use proptest::prelude::*;
use serde_json::{Map, Number, Value};
use tokio::time::Instant;

use super::{
    request::form_urlencode,
    response::{parse_token_response, ResponseContext, SecretGuard},
    retry::{backoff, retry_after},
};
use crate::Error;

/// Credentials without the telltale words `token`, `secret` or `bearer`, so that only the
/// guard and the parser's own care keep them out of errors.
const CLIENT_SECRET: &str = "cs-Zq8wLm3v";
const PRESENTED: &str = "rt-Pk2xNd7f";
const ACCESS: &str = "at-Hv5cJr1y";
const ROTATED: &str = "rt-Wm9bQs4e";
const ID_TOKEN: &str = "it-Gt6nXa0k";

const CREDENTIALS: [&str; 5] = [CLIENT_SECRET, PRESENTED, ACCESS, ROTATED, ID_TOKEN];

/// The fields of a token response that the parser reads, and one it does not.
const FIELDS: [&str; 9] = [
    "access_token",
    "token_type",
    "expires_in",
    "scope",
    "refresh_token",
    "error",
    "error_description",
    "error_uri",
    "id_token",
];

fn guard() -> SecretGuard {
    SecretGuard::new([CLIENT_SECRET.to_owned(), form_urlencode(CLIENT_SECRET)])
        .extended([PRESENTED.to_owned()])
}

/// Strings as servers send them, arbitrary ones, and ones holding a credential.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ -~]{0,16}",
        "-?[0-9]{1,25}(\\.[0-9]{0,4})?",
        " ?(bearer|Bearer|mac|invalid_grant|read write)? ?",
        (
            "[ -~]{0,8}",
            prop::sample::select(CREDENTIALS.to_vec()),
            "[ -~]{0,8}"
        )
            .prop_map(|(before, credential, after)| format!("{before}{credential}{after}")),
    ]
}

/// Any JSON value, nested a few levels.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((text(), inner), 0..4)
                .prop_map(|members| Value::Object(members.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn status() -> impl Strategy<Value = StatusCode> {
    prop_oneof![
        Just(StatusCode::OK),
        Just(StatusCode::CREATED),
        Just(StatusCode::BAD_REQUEST),
        Just(StatusCode::UNAUTHORIZED),
        Just(StatusCode::TOO_MANY_REQUESTS),
        Just(StatusCode::INTERNAL_SERVER_ERROR),
        Just(StatusCode::SERVICE_UNAVAILABLE),
        (100u16..600).prop_map(|code| StatusCode::from_u16(code).unwrap()),
    ]
}

/// A complete answer carrying every credential, with `field` set to `value`.
fn answer_with(field: &str, value: Value) -> Vec<u8> {
    let mut fields = Map::new();
    fields.insert("access_token".into(), Value::from(ACCESS));
    fields.insert("token_type".into(), Value::from("Bearer"));
    fields.insert("expires_in".into(), Value::from(3600));
    fields.insert("refresh_token".into(), Value::from(ROTATED));
    fields.insert("id_token".into(), Value::from(ID_TOKEN));
    fields.insert(field.into(), value);
    serde_json::to_vec(&Value::Object(fields)).unwrap()
}

fn parse(status: StatusCode, body: &[u8]) -> Result<crate::Token, Error> {
    let guard = guard();
    let scopes = ["read".to_owned()];
    let cx = ResponseContext {
        sent_at: Instant::now(),
        scopes_if_omitted: &scopes,
        guard: &guard,
    };
    parse_token_response(status, body, &cx)
}

fn shows_credential(err: &Error) -> Option<&'static str> {
    let shown = format!("{err} {err:?}");
    CREDENTIALS
        .into_iter()
        .find(|credential| shown.contains(credential))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_json_value_in_any_field_never_panics_nor_leaks_a_credential(
        field in prop::sample::select(FIELDS.to_vec()),
        value in json(),
        status in status(),
    ) {
        let body = answer_with(field, value);

        let parsed = parse(status, &body);

        if let Err(err) = parsed {
            prop_assert_eq!(shows_credential(&err), None, "{}", err);
        }
    }

    #[test]
    fn any_json_body_never_panics_nor_leaks_a_guarded_secret(value in json(), status in status()) {
        let body = serde_json::to_vec(&value).unwrap();

        let parsed = parse(status, &body);

        // NOTE: a body of any shape carries no credential the parser could know of; what it
        // must keep out of errors is what the guard knows.
        if let Err(err) = parsed {
            let shown = format!("{err} {err:?}");
            prop_assert!(!shown.contains(CLIENT_SECRET) && !shown.contains(PRESENTED), "{}", shown);
        }
    }

    #[test]
    fn any_bytes_never_panic_nor_leak_a_guarded_secret(
        before in prop::collection::vec(any::<u8>(), 0..64),
        secret in prop::sample::select(vec![CLIENT_SECRET, PRESENTED]),
        after in "[ -~]{0,64}",
        status in status(),
    ) {
        let mut body = before;
        body.extend_from_slice(secret.as_bytes());
        body.extend_from_slice(after.as_bytes());

        let parsed = parse(status, &body);

        if let Err(err) = parsed {
            prop_assert!(!format!("{err} {err:?}").contains(secret), "{}", err);
        }
    }

    #[test]
    fn a_successful_parse_keeps_the_access_token_it_was_given(
        field in prop::sample::select(FIELDS[1..5].to_vec()),
        value in json(),
    ) {
        let body = answer_with(field, value);

        if let Ok(token) = parse(StatusCode::OK, &body) {
            prop_assert_eq!(token.expose_secret(), ACCESS);
        }
    }

    #[test]
    fn any_retry_after_value_never_panics(value in "[ -~]{0,40}", seconds in 0u64..10_000_000_000) {
        let mut headers = HeaderMap::new();
        headers.insert(header::RETRY_AFTER, HeaderValue::from_str(&value).unwrap());
        let now = UNIX_EPOCH + Duration::from_secs(seconds);

        let _ = retry_after(&headers, now);
        let _ = retry_after(&headers, SystemTime::now());
    }

    #[test]
    fn back_off_stays_between_half_and_all_of_its_capped_base(
        attempt in any::<u32>(),
        unit in 0.0f64..1.0,
    ) {
        let delay = backoff(attempt, unit);

        prop_assert!(delay >= Duration::from_millis(100), "{:?}", delay);
        prop_assert!(delay <= Duration::from_secs(2), "{:?}", delay);
    }
}
