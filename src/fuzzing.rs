//! Entry points of the fuzz targets in `fuzz/`, built only with `--cfg fuzzing` (as
//! `cargo fuzz` builds). Not part of the API: no semver promise covers it.

use http::StatusCode;
use serde_json::Value;
use tokio::time::Instant;

use crate::{source::oauth2::parse_for_fuzzing, Error, MAX_LIFETIME};

/// The client secret the guard looks for. Like a real one, it holds none of the words
/// that keep a body from being quoted (`token`, `secret`, `bearer`).
const GUARDED: &str = "cs-Zq8wLm3vKd7PqXy2";

/// Fields of an answer that hold credentials.
const CREDENTIAL_FIELDS: [&str; 3] = ["access_token", "refresh_token", "id_token"];

/// Shortest credential looked for in `Display` and `Debug` output. The errors' own
/// wording has no run of [`token_char`]s this long, so a hit there is the body's text.
const DISTINCTIVE_LEN: usize = 16;

/// Reads `body` as a token endpoint's answer with status `status`, and panics when an
/// invariant breaks: the parser must not panic; an error must not show the guarded
/// secret nor a credential that the body carries; a token must be the body's.
///
/// Statuses outside 100..=999 are skipped: no response has one.
pub fn token_response(status: u16, body: &[u8]) {
    let Ok(status) = StatusCode::from_u16(status) else {
        return;
    };
    let json = serde_json::from_slice::<Value>(body).ok();
    let credentials: Vec<&str> = CREDENTIAL_FIELDS
        .iter()
        .filter_map(|name| json.as_ref()?.get(*name)?.as_str())
        .filter(|credential| !credential.is_empty())
        .collect();
    let sent_at = Instant::now();

    let parsed = parse_for_fuzzing(status, body, sent_at, GUARDED);

    match parsed {
        Err(err) => {
            for secret in credentials.iter().copied().chain([GUARDED]) {
                assert_not_shown(&err, secret);
            }
        }
        Ok(token) => {
            let field = |name| json.as_ref().and_then(|json| json.get(name)?.as_str());
            assert_eq!(Some(token.expose_secret()), field("access_token"));
            let refresh_token = field("refresh_token").filter(|r| !r.is_empty());
            assert_eq!(token.expose_refresh_token(), refresh_token);
            if let Some(expires_at) = token.expires_at() {
                assert!(expires_at >= sent_at && expires_at - sent_at <= MAX_LIFETIME);
            }
        }
    }
}

/// Panics when `err` shows `secret`: in the text it took from the body, or, for a
/// distinctive secret, anywhere in its `Display` or `Debug` output.
fn assert_not_shown(err: &Error, secret: &str) {
    let from_body = [
        err.oauth_error(),
        err.error_description(),
        err.error_uri(),
        err.excerpt(),
    ];
    assert!(
        !from_body
            .into_iter()
            .flatten()
            .any(|text| text.contains(secret)),
        "error shows a credential of the body: {secret:?} in {err:?}"
    );

    let distinctive = secret.chars().count() >= DISTINCTIVE_LEN && secret.chars().all(token_char);
    if distinctive {
        // NOTE: `Debug` escapes a newline as `\n`; blanking each escape keeps its letter
        // from starting a run that was never in the body.
        let shown = without_escapes(&format!("{err} {err:?}"));
        assert!(
            !shown.contains(secret),
            "error shows a credential: {secret:?} in {err:?}"
        );
    }
}

/// Characters of OAuth2 tokens as servers mint them: base64url, base64 and JWT dots.
fn token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~+/=".contains(c)
}

/// `text` with each backslash and the character after it replaced by spaces.
fn without_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            chars.next();
            out.push_str("  ");
        } else {
            out.push(c);
        }
    }
    out
}
