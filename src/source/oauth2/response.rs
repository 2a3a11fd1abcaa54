//! Reading a token endpoint's answer: RFC 6749 §5.1 (success) and §5.2 (error), with the
//! deviations real servers show (field-cases.md F01, F02, F03, F18, F19).
//!
//! The rules are listed in the module docs of [`oauth2`](super); each has a test below.

use std::time::Duration;

use http::StatusCode;
use serde_json::{Map, Number, Value};
use tokio::time::Instant;

use crate::{Error, Token};

/// What the parser needs to know about the request that was answered.
pub(super) struct ResponseContext<'a> {
    /// When the request was sent: expiry counts from here.
    pub(super) sent_at: Instant,
    /// The scopes the token has when the answer names none: the ones asked for, or for a
    /// refresh that asked for none, those of the token it replaces.
    pub(super) scopes_if_omitted: &'a [String],
    /// What must never be copied from a body into an error.
    pub(super) guard: &'a SecretGuard,
}

/// Turns a complete answer of the token endpoint into a token or an error.
pub(super) fn parse_token_response(
    status: StatusCode,
    body: &[u8],
    cx: &ResponseContext<'_>,
) -> Result<Token, Error> {
    let json = serde_json::from_slice::<Value>(body).ok();

    if !status.is_success() {
        let oauth = json
            .as_ref()
            .and_then(Value::as_object)
            .and_then(|fields| oauth_error(status, fields, cx.guard));
        return Err(oauth.unwrap_or_else(|| {
            cx.guard
                .add_excerpt(Error::endpoint(status, None, None, None), body)
        }));
    }

    let fields = match json {
        Some(Value::Object(fields)) => fields,
        Some(_) => {
            let err = Error::invalid_response(status, None, "not a JSON object");
            return Err(cx.guard.add_excerpt(err, body));
        }
        None => {
            let err = Error::invalid_response(status, None, "not JSON");
            return Err(cx.guard.add_excerpt(err, body));
        }
    };

    // NOTE: some servers answer errors with a success status; without an access token, an
    // `error` code is the better explanation.
    if !fields.contains_key("access_token") {
        if let Some(err) = oauth_error(status, &fields, cx.guard) {
            return Err(err);
        }
    }

    token_from_fields(status, fields, cx)
}

/// Reads an answer the way a source does, with a guard that looks for `guarded` and no
/// scopes asked for: the entry point of the fuzz targets (see `crate::fuzzing`).
#[cfg(fuzzing)]
pub(crate) fn parse_for_fuzzing(
    status: StatusCode,
    body: &[u8],
    sent_at: Instant,
    guarded: &str,
) -> Result<Token, Error> {
    let guard = SecretGuard::new([guarded.to_owned()]);
    let cx = ResponseContext {
        sent_at,
        scopes_if_omitted: &[],
        guard: &guard,
    };
    parse_token_response(status, body, &cx)
}

/// Builds the token of a §5.1 success response. No error made here carries an excerpt: the
/// body holds a token.
fn token_from_fields(
    status: StatusCode,
    mut fields: Map<String, Value>,
    cx: &ResponseContext<'_>,
) -> Result<Token, Error> {
    let field_error = |field, message| Error::invalid_response(status, Some(field), message);

    let access_token = match fields.remove("access_token") {
        Some(Value::String(secret)) if !secret.is_empty() => secret,
        Some(Value::String(_)) => return Err(field_error("access_token", "empty")),
        None | Some(Value::Null) => return Err(field_error("access_token", "missing")),
        Some(_) => return Err(field_error("access_token", "not a string")),
    };

    let token_type = match fields.remove("token_type") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) if name.eq_ignore_ascii_case("bearer") => Some(name),
        Some(Value::String(_)) => return Err(Error::invalid_token("unsupported token type")),
        Some(_) => return Err(field_error("token_type", "not a string")),
    };

    let lifetime = lifetime(fields.remove("expires_in").as_ref())
        .map_err(|message| field_error("expires_in", message))?;

    let scopes = match fields.remove("scope") {
        None | Some(Value::Null) => cx.scopes_if_omitted.to_vec(),
        Some(Value::String(scope)) => scope.split_ascii_whitespace().map(String::from).collect(),
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                Value::String(scope) => Ok(scope),
                _ => Err(field_error("scope", "not a list of strings")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(field_error("scope", "not a space-separated string")),
    };

    let refresh_token = match fields.remove("refresh_token") {
        Some(Value::String(refresh_token)) if !refresh_token.is_empty() => Some(refresh_token),
        _ => None,
    };

    // NOTE: what is left in `fields` are the fields no rule reads (`id_token`, vendor
    // extensions): they travel with the token.
    let mut token = Token::new(access_token)
        .with_scopes(scopes)
        .with_extra_fields(fields);
    if let Some(token_type) = token_type {
        token = token.with_token_type(token_type);
    }
    if let Some(lifetime) = lifetime {
        token = token.with_lifetime_from(cx.sent_at, lifetime);
    }
    if let Some(refresh_token) = refresh_token {
        token = token.with_refresh_token(refresh_token);
    }
    Ok(token)
}

/// Fields of a token response that hold credentials.
const CREDENTIAL_FIELDS: [&str; 3] = ["access_token", "refresh_token", "id_token"];

/// The §5.2 error of a body, if it names an `error` code.
///
/// A text field is dropped when it holds a guarded secret, or a credential that the same body
/// carries (a confused server may send a token along with an error).
fn oauth_error(
    status: StatusCode,
    fields: &Map<String, Value>,
    guard: &SecretGuard,
) -> Option<Error> {
    let credentials: Vec<&str> = CREDENTIAL_FIELDS
        .iter()
        .filter_map(|name| fields.get(*name)?.as_str())
        .filter(|credential| !credential.is_empty())
        .collect();
    let text = |name: &str| {
        fields
            .get(name)
            .and_then(Value::as_str)
            .filter(|text| !text.is_empty() && !guard.reveals(text.as_bytes()))
            .filter(|text| !credentials.iter().any(|c| text.contains(c)))
            .map(String::from)
    };

    let code = text("error")?;
    Some(Error::endpoint(
        status,
        Some(code),
        text("error_description"),
        text("error_uri"),
    ))
}

const NOT_SECONDS: &str = "not a number of seconds";

/// The lifetime an `expires_in` value gives: `None` when it is unknown, zero when the token is
/// expired on arrival.
fn lifetime(value: Option<&Value>) -> Result<Option<Duration>, &'static str> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(number)) => Ok(Some(number_seconds(number))),
        Some(Value::String(text)) => decimal_seconds(text).map(Some).ok_or(NOT_SECONDS),
        Some(_) => Err(NOT_SECONDS),
    }
}

/// Seconds of a JSON number: the fraction dropped, negative values taken as zero, huge ones
/// saturated (the token clamps them to [`MAX_LIFETIME`](crate::MAX_LIFETIME)).
fn number_seconds(number: &Number) -> Duration {
    if let Some(seconds) = number.as_u64() {
        return Duration::from_secs(seconds);
    }
    if number.is_i64() {
        return Duration::ZERO;
    }

    // NOTE: serde_json numbers are always finite; `as` truncates and saturates.
    let seconds = number.as_f64().unwrap_or(0.0);
    if seconds >= 1.0 {
        Duration::from_secs(seconds as u64)
    } else {
        Duration::ZERO
    }
}

/// Seconds of a string holding a decimal number, `-?[0-9]+(\.[0-9]+)?` after trimming ASCII
/// whitespace, read like a JSON number would be. No exponent, no sign `+`, no `NaN`.
fn decimal_seconds(text: &str) -> Option<Duration> {
    let text = text.trim_matches(|c: char| c.is_ascii_whitespace());
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = match unsigned.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (unsigned, None),
    };

    let all_digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(whole) || !fraction.is_none_or(all_digits) {
        return None;
    }
    if negative {
        return Some(Duration::ZERO);
    }

    let seconds = whole.bytes().fold(0u64, |seconds, digit| {
        seconds
            .saturating_mul(10)
            .saturating_add(u64::from(digit - b'0'))
    });
    Some(Duration::from_secs(seconds))
}

/// Words whose presence in a body means it may hold a credential.
const TELLTALE_WORDS: [&[u8]; 3] = [b"token", b"secret", b"bearer"];

/// How long an unbroken run of token characters with letters and digits may be before the body
/// it is in counts as possibly holding a credential: a JWT, an opaque token or a session
/// identifier that an error page echoes.
const OPAQUE_RUN: usize = 20;

/// Returns true when `text` has a run of at least [`OPAQUE_RUN`] characters of the sets
/// credentials are written in (base64, base64url, hex, JWT dots), with letters and digits.
fn has_opaque_run(text: &[u8]) -> bool {
    let credential_char = |b: &u8| {
        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'+' | b'/' | b'=')
    };
    text.split(|b| !credential_char(b)).any(|run| {
        run.len() >= OPAQUE_RUN
            && run.iter().any(u8::is_ascii_digit)
            && run.iter().any(u8::is_ascii_alphabetic)
    })
}

/// Decides what of a token endpoint's body may be copied into an error (R10).
pub(super) struct SecretGuard {
    secrets: Vec<Box<[u8]>>,
}

impl SecretGuard {
    /// A guard that also looks for these exact strings, such as the client secret in the
    /// forms it is sent in.
    pub(super) fn new(secrets: impl IntoIterator<Item = String>) -> Self {
        let secrets = secrets
            .into_iter()
            .filter(|secret| !secret.is_empty())
            .map(|secret| secret.into_bytes().into_boxed_slice())
            .collect();
        Self { secrets }
    }

    /// This guard, also looking for `more`: the refresh token a request presents, say.
    pub(super) fn extended(&self, more: impl IntoIterator<Item = String>) -> Self {
        let mut extended = Self::new(more);
        extended.secrets.extend(self.secrets.iter().cloned());
        extended
    }

    /// Returns true when `text` holds one of the guarded strings, in any ASCII case, also
    /// once percent-decoded or HTML-unescaped, as servers that echo what they were sent may
    /// write it.
    fn reveals(&self, text: &[u8]) -> bool {
        let variants = [text.to_vec(), percent_decoded(text), html_unescaped(text)];
        variants.iter().any(|variant| {
            self.secrets.iter().any(|secret| {
                variant
                    .windows(secret.len())
                    .any(|window| window.eq_ignore_ascii_case(secret))
            })
        })
    }

    /// Adds the start of `body` to `err` when it is safe to show: the body holds none of the
    /// guarded strings, none of the telltale words in any case and no long opaque run of
    /// letters and digits, and its start has a space (a single unbroken word may be a bare
    /// token).
    fn add_excerpt(&self, err: Error, body: &[u8]) -> Error {
        let unsafe_to_show = |text: &[u8]| {
            let has_telltale = TELLTALE_WORDS.iter().any(|word| {
                text.windows(word.len())
                    .any(|window| window.eq_ignore_ascii_case(word))
            });
            has_telltale || has_opaque_run(text) || self.reveals(text)
        };
        if unsafe_to_show(body) {
            return err;
        }
        // NOTE: JSON escapes (`access_\u0074oken`, `\/`) hide words from a look at the raw
        // bytes; the same look at the decoded JSON sees through them.
        if let Ok(json) = serde_json::from_slice::<Value>(body) {
            if unsafe_to_show(json.to_string().as_bytes()) {
                return err;
            }
        }

        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        let has_space = text
            .chars()
            .take(crate::error::EXCERPT_LIMIT)
            .any(char::is_whitespace);
        if !has_space {
            return err;
        }
        err.with_excerpt(text)
    }
}

/// `text` with `%XX` escapes (either case) decoded and `+` read as a space.
fn percent_decoded(text: &[u8]) -> Vec<u8> {
    let hex = |byte: u8| char::from(byte).to_digit(16);
    let mut out = Vec::with_capacity(text.len());
    let mut index = 0;
    while index < text.len() {
        match text[index] {
            b'%' if index + 2 < text.len() => match (hex(text[index + 1]), hex(text[index + 2])) {
                (Some(high), Some(low)) => {
                    out.push((high * 16 + low) as u8);
                    index += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            byte => out.push(byte),
        }
        index += 1;
    }
    out
}

/// `text` with the common HTML character references unescaped: `&amp;`, `&lt;`, `&gt;`,
/// `&quot;`, `&apos;`, and numeric ones (`&#39;`, `&#x27;`).
fn html_unescaped(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut index = 0;
    while index < text.len() {
        if text[index] == b'&' {
            if let Some(length) = text[index..].iter().take(12).position(|b| *b == b';') {
                let entity = &text[index + 1..index + length];
                let decoded = match entity {
                    b"amp" => Some('&'),
                    b"lt" => Some('<'),
                    b"gt" => Some('>'),
                    b"quot" => Some('"'),
                    b"apos" => Some('\''),
                    [b'#', b'x' | b'X', digits @ ..] => std::str::from_utf8(digits)
                        .ok()
                        .and_then(|d| u32::from_str_radix(d, 16).ok())
                        .and_then(char::from_u32),
                    [b'#', digits @ ..] => std::str::from_utf8(digits)
                        .ok()
                        .and_then(|d| d.parse().ok())
                        .and_then(char::from_u32),
                    _ => None,
                };
                if let Some(ch) = decoded {
                    let mut buffer = [0; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buffer).as_bytes());
                    index += length + 1;
                    continue;
                }
            }
        }
        out.push(text[index]);
        index += 1;
    }
    out
}

#[cfg(test)]
mod escape_tests {
    use super::*;

    #[test]
    fn r10_json_escapes_do_not_smuggle_a_token_into_an_excerpt() {
        let guard = SecretGuard::new([String::from("client/secret")]);
        let bodies: [&[u8]; 3] = [
            br#"{"access_\u0074oken": "Zq8wLm3vKd7PqXy2AbCd"}"#,
            br#"{"refresh_\u0074oken": "Zq8wLm3vKd7PqXy2AbCd", "x": 1}"#,
            br#"{"echo": "client\/secret is wrong", "x": 1}"#,
        ];

        for body in bodies {
            let err = Error::endpoint(StatusCode::INTERNAL_SERVER_ERROR, None, None, None);

            let err = guard.add_excerpt(err, body);

            assert_eq!(err.excerpt(), None, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn r10_a_page_echoing_an_unknown_credential_gives_no_excerpt() {
        let guard = SecretGuard::new([String::from("client-secret")]);
        let pages: [&[u8]; 3] = [
            b"<p>session eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl expired</p>",
            b"upstream refused sk_live_51HqZx8Kd02pLmNoPq for this client",
            b"error id 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 logged",
        ];

        for page in pages {
            let err = Error::endpoint(StatusCode::INTERNAL_SERVER_ERROR, None, None, None);

            let err = guard.add_excerpt(err, page);

            assert_eq!(err.excerpt(), None, "{}", String::from_utf8_lossy(page));
        }
        let plain = b"upstream connect error or disconnect/reset before headers. reset reason: 503";
        let err = Error::endpoint(StatusCode::SERVICE_UNAVAILABLE, None, None, None);
        assert!(guard.add_excerpt(err, plain).excerpt().is_some());
    }

    #[test]
    fn r10_echoed_secrets_are_recognised_in_other_encodings() {
        let guard = SecretGuard::new([String::from("p@ss word/x&y<z>")]);
        let echoes: [&[u8]; 5] = [
            b"invalid client p@ss word/x&amp;y&lt;z&gt; here",
            b"invalid client p%40ss%20word%2fx%26y%3cz%3e here",
            b"invalid client p%40ss+word%2Fx%26y%3Cz%3E here",
            b"invalid client P@SS WORD/X&Y<Z> here",
            b"invalid client p&#64;ss word&#x2F;x&amp;y&lt;z&gt; here",
        ];

        for echo in echoes {
            let err = Error::endpoint(StatusCode::BAD_GATEWAY, None, None, None);

            let err = guard.add_excerpt(err, echo);

            assert_eq!(err.excerpt(), None, "{}", String::from_utf8_lossy(echo));
        }
        let harmless = guard.add_excerpt(
            Error::endpoint(StatusCode::BAD_GATEWAY, None, None, None),
            b"<html> 502 bad gateway </html>",
        );
        assert!(harmless.excerpt().is_some());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MAX_LIFETIME;

    const ACCESS: &str = "A1-very-secret-access-token-value";

    fn guard() -> SecretGuard {
        SecretGuard::new(["client-s3cret".to_owned()])
    }

    fn parse_as(status: StatusCode, body: &str, sent_at: Instant) -> Result<Token, Error> {
        let guard = guard();
        let requested = ["read".to_owned(), "write".to_owned()];
        let cx = ResponseContext {
            sent_at,
            scopes_if_omitted: &requested,
            guard: &guard,
        };
        parse_token_response(status, body.as_bytes(), &cx)
    }

    fn parse_ok(body: &str) -> (Token, Instant) {
        let sent_at = Instant::now();
        let token = parse_as(StatusCode::OK, body, sent_at).expect("a token");
        (token, sent_at)
    }

    fn parse_err(status: StatusCode, body: &str) -> Error {
        parse_as(status, body, Instant::now()).expect_err("an error")
    }

    fn with_expires_in(expires_in: &str) -> String {
        format!(r#"{{"access_token":"{ACCESS}","token_type":"Bearer","expires_in":{expires_in}}}"#)
    }

    fn lifetime_of(expires_in: &str) -> Option<Duration> {
        let (token, sent_at) = parse_ok(&with_expires_in(expires_in));
        token.expires_at().map(|at| at - sent_at)
    }

    fn assert_expires_in_rejected(expires_in: &str) {
        let err = parse_err(StatusCode::OK, &with_expires_in(expires_in));

        assert!(err.is_invalid_response(), "{expires_in}: {err:?}");
        assert_eq!(err.field(), Some("expires_in"), "{expires_in}");
        assert_eq!(err.status(), Some(StatusCode::OK));
        assert_eq!(err.excerpt(), None, "{expires_in}");
        assert!(!format!("{err}").contains(ACCESS), "{expires_in}: {err}");
        assert!(
            !format!("{err:?}").contains(ACCESS),
            "{expires_in}: {err:?}"
        );
    }

    #[test]
    fn a_complete_response_gives_a_complete_token() {
        let (token, sent_at) = parse_ok(&format!(
            r#"{{"access_token":"{ACCESS}","token_type":"Bearer","expires_in":3600,
                "scope":"read admin","refresh_token":"R1","extra":{{"ignored":true}}}}"#
        ));

        assert_eq!(token.expose_secret(), ACCESS);
        assert_eq!(token.token_type(), Some("Bearer"));
        assert_eq!(
            token.expires_at(),
            Some(sent_at + Duration::from_secs(3600))
        );
        assert_eq!(token.scopes(), ["read", "admin"]);
        assert_eq!(token.expose_refresh_token(), Some("R1"));
    }

    #[test]
    fn f01_expires_in_as_string_is_read_like_the_number() {
        assert_eq!(lifetime_of(r#""3600""#), Some(Duration::from_secs(3600)));
    }

    #[test]
    fn f01_expires_in_string_is_trimmed_of_ascii_whitespace() {
        assert_eq!(lifetime_of(r#"" 3600 ""#), Some(Duration::from_secs(3600)));
        assert_eq!(
            lifetime_of(r#""\t3600\r\n""#),
            Some(Duration::from_secs(3600))
        );
    }

    #[test]
    fn f01_expires_in_string_with_fraction_drops_the_fraction() {
        assert_eq!(lifetime_of(r#""3600.0""#), Some(Duration::from_secs(3600)));
        assert_eq!(lifetime_of(r#""3600.9""#), Some(Duration::from_secs(3600)));
    }

    #[test]
    fn f01_expires_in_not_a_number_is_a_typed_error_without_the_token() {
        assert_expires_in_rejected(r#""abc""#);
    }

    #[test]
    fn f01_expires_in_malformed_strings_are_rejected() {
        let malformed = [
            r#""""#,
            r#"" ""#,
            r#""1e3""#,
            r#""NaN""#,
            r#""inf""#,
            r#""Infinity""#,
            r#""+3600""#,
            r#""3600.""#,
            r#"".5""#,
            r#""-""#,
            r#""0x10""#,
            r#""3600s""#,
            r#""36 00""#,
            r#""٣٦٠٠""#,
        ];

        for expires_in in malformed {
            assert_expires_in_rejected(expires_in);
        }
    }

    #[test]
    fn f01_expires_in_of_other_json_types_is_rejected() {
        for expires_in in ["true", "false", "{}", "[3600]"] {
            assert_expires_in_rejected(expires_in);
        }
    }

    #[test]
    fn f01_expires_in_error_names_the_field() {
        let err = parse_err(StatusCode::OK, &with_expires_in(r#""abc""#));

        assert_eq!(
            err.to_string(),
            "token endpoint sent an unusable response (status 200): not a number of seconds \
             (field `expires_in`)"
        );
    }

    #[test]
    fn expires_in_float_drops_the_fraction() {
        assert_eq!(lifetime_of("3600.0"), Some(Duration::from_secs(3600)));
        assert_eq!(lifetime_of("59.99"), Some(Duration::from_secs(59)));
    }

    #[test]
    fn expires_in_number_with_exponent_is_a_json_number() {
        assert_eq!(lifetime_of("1e3"), Some(Duration::from_secs(1000)));
    }

    #[test]
    fn f02_expires_in_missing_means_unknown_expiry() {
        let (token, _) = parse_ok(&format!(
            r#"{{"access_token":"{ACCESS}","token_type":"Bearer"}}"#
        ));

        assert_eq!(token.expires_at(), None);
    }

    #[test]
    fn f02_expires_in_null_means_unknown_expiry() {
        assert_eq!(lifetime_of("null"), None);
    }

    #[test]
    fn f03_expires_in_zero_is_expired_on_arrival() {
        assert_eq!(lifetime_of("0"), Some(Duration::ZERO));
        assert_eq!(lifetime_of(r#""0""#), Some(Duration::ZERO));
    }

    #[test]
    fn f03_expires_in_negative_is_expired_on_arrival() {
        for expires_in in [
            "-60",
            "-0.5",
            "-1e300",
            r#""-1""#,
            r#""-3600.5""#,
            "-9223372036854775809",
        ] {
            assert_eq!(
                lifetime_of(expires_in),
                Some(Duration::ZERO),
                "{expires_in}"
            );
        }
    }

    #[test]
    fn f03_expires_in_below_one_second_is_expired_on_arrival() {
        assert_eq!(lifetime_of("0.5"), Some(Duration::ZERO));
        assert_eq!(lifetime_of(r#""0.999""#), Some(Duration::ZERO));
    }

    #[test]
    fn expires_in_huge_values_are_clamped_to_max_lifetime() {
        let huge = [
            "18446744073709551615",
            "1e300",
            r#""99999999999999999999999999""#,
            "99999999999999999999999999",
        ];

        for expires_in in huge {
            assert_eq!(lifetime_of(expires_in), Some(MAX_LIFETIME), "{expires_in}");
        }
    }

    #[test]
    fn access_token_missing_is_an_error_naming_the_field() {
        let err = parse_err(StatusCode::OK, r#"{"token_type":"Bearer","expires_in":60}"#);

        assert!(err.is_invalid_response());
        assert_eq!(err.field(), Some("access_token"));
        assert_eq!(err.excerpt(), None);
        assert_eq!(
            err.to_string(),
            "token endpoint sent an unusable response (status 200): missing (field `access_token`)"
        );
    }

    #[test]
    fn access_token_of_wrong_type_or_empty_is_an_error_naming_the_field() {
        for body in [
            r#"{"access_token":42}"#,
            r#"{"access_token":null}"#,
            r#"{"access_token":["a"]}"#,
            r#"{"access_token":""}"#,
        ] {
            let err = parse_err(StatusCode::OK, body);

            assert!(err.is_invalid_response(), "{body}");
            assert_eq!(err.field(), Some("access_token"), "{body}");
            assert_eq!(err.excerpt(), None, "{body}");
        }
    }

    #[test]
    fn token_type_is_compared_without_case() {
        for name in ["bearer", "BEARER", "Bearer"] {
            let (token, _) = parse_ok(&format!(
                r#"{{"access_token":"{ACCESS}","token_type":"{name}"}}"#
            ));

            assert_eq!(token.token_type(), Some(name));
        }
    }

    #[test]
    fn token_type_missing_is_taken_as_bearer() {
        let (token, _) = parse_ok(&format!(r#"{{"access_token":"{ACCESS}"}}"#));

        assert_eq!(
            token.token_type(),
            None,
            "Token::token_type None means Bearer"
        );
        assert_eq!(token.expose_secret(), ACCESS);
    }

    #[test]
    fn token_type_other_than_bearer_is_terminal() {
        for name in ["mac", "DPoP", "N_A", ""] {
            let err = parse_err(
                StatusCode::OK,
                &format!(r#"{{"access_token":"{ACCESS}","token_type":"{name}"}}"#),
            );

            assert!(err.is_invalid_token(), "{name}: {err:?}");
            assert!(err.is_terminal(), "{name}");
            assert_eq!(
                err.to_string(),
                "token cannot be used: unsupported token type"
            );
        }
    }

    #[test]
    fn token_type_of_wrong_type_is_an_error_naming_the_field() {
        let err = parse_err(
            StatusCode::OK,
            &format!(r#"{{"access_token":"{ACCESS}","token_type":1}}"#),
        );

        assert!(err.is_invalid_response());
        assert_eq!(err.field(), Some("token_type"));
    }

    #[test]
    fn scope_missing_means_the_requested_scopes() {
        let (token, _) = parse_ok(&format!(r#"{{"access_token":"{ACCESS}"}}"#));

        assert_eq!(token.scopes(), ["read", "write"]);
    }

    #[test]
    fn scope_string_is_split_on_spaces() {
        let (token, _) = parse_ok(&format!(
            r#"{{"access_token":"{ACCESS}","scope":" a  b c "}}"#
        ));

        assert_eq!(token.scopes(), ["a", "b", "c"]);
    }

    #[test]
    fn scope_empty_string_means_no_scopes_granted() {
        let (token, _) = parse_ok(&format!(r#"{{"access_token":"{ACCESS}","scope":""}}"#));

        assert!(token.scopes().is_empty());
    }

    #[test]
    fn scope_as_list_of_strings_is_accepted() {
        let (token, _) = parse_ok(&format!(
            r#"{{"access_token":"{ACCESS}","scope":["a","b"]}}"#
        ));

        assert_eq!(token.scopes(), ["a", "b"]);
    }

    #[test]
    fn scope_of_wrong_type_is_an_error_naming_the_field() {
        for scope in ["42", "{}", r#"["a",1]"#] {
            let err = parse_err(
                StatusCode::OK,
                &format!(r#"{{"access_token":"{ACCESS}","scope":{scope}}}"#),
            );

            assert_eq!(err.field(), Some("scope"), "{scope}");
            assert_eq!(err.excerpt(), None, "{scope}");
        }
    }

    #[test]
    fn refresh_token_is_kept_only_when_a_non_empty_string() {
        for refresh_token in [r#""""#, "null", "42"] {
            let (token, _) = parse_ok(&format!(
                r#"{{"access_token":"{ACCESS}","refresh_token":{refresh_token}}}"#
            ));

            assert!(!token.has_refresh_token(), "{refresh_token}");
        }
    }

    #[test]
    fn f18_invalid_grant_is_terminal_and_carries_its_description() {
        let err = parse_err(
            StatusCode::BAD_REQUEST,
            r#"{"error":"invalid_grant","error_description":"client disabled",
                "error_uri":"https://auth.example.com/docs/errors"}"#,
        );

        assert!(err.is_endpoint());
        assert!(err.is_terminal());
        assert_eq!(err.status(), Some(StatusCode::BAD_REQUEST));
        assert_eq!(err.oauth_error(), Some("invalid_grant"));
        assert_eq!(err.error_description(), Some("client disabled"));
        assert_eq!(
            err.error_uri(),
            Some("https://auth.example.com/docs/errors")
        );
        assert_eq!(err.excerpt(), None);
    }

    #[test]
    fn f18_invalid_grant_without_description() {
        let err = parse_err(StatusCode::BAD_REQUEST, r#"{"error":"invalid_grant"}"#);

        assert!(err.is_terminal());
        assert_eq!(err.oauth_error(), Some("invalid_grant"));
        assert_eq!(err.error_description(), None);
        assert_eq!(
            err.to_string(),
            "token endpoint refused the request (status 400): invalid_grant"
        );
    }

    #[test]
    fn error_response_with_transient_code_is_transient() {
        let err = parse_err(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"error":"temporarily_unavailable"}"#,
        );

        assert!(err.is_transient());
        assert_eq!(err.oauth_error(), Some("temporarily_unavailable"));
    }

    #[test]
    fn error_fields_that_echo_the_client_secret_are_dropped() {
        let err = parse_err(
            StatusCode::UNAUTHORIZED,
            r#"{"error":"invalid_client","error_description":"bad secret client-s3cret"}"#,
        );

        assert_eq!(err.oauth_error(), Some("invalid_client"));
        assert_eq!(err.error_description(), None);
        assert!(!format!("{err} {err:?}").contains("client-s3cret"));
    }

    #[test]
    fn error_fields_that_echo_a_token_of_the_same_body_are_dropped() {
        let err = parse_err(
            StatusCode::BAD_REQUEST,
            &format!(
                r#"{{"error":"invalid_request","error_description":"issued {ACCESS} anyway",
                    "access_token":"{ACCESS}"}}"#
            ),
        );

        assert_eq!(err.oauth_error(), Some("invalid_request"));
        assert_eq!(err.error_description(), None);
        assert!(!format!("{err} {err:?}").contains(ACCESS));
    }

    #[test]
    fn error_code_in_a_success_response_without_token_is_an_endpoint_error() {
        let err = parse_err(StatusCode::OK, r#"{"error":"invalid_client"}"#);

        assert!(err.is_endpoint());
        assert!(err.is_terminal());
        assert_eq!(err.oauth_error(), Some("invalid_client"));
    }

    #[test]
    fn f19_html_error_page_gives_status_and_short_excerpt() {
        let page = format!(
            "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>{}</body></html>",
            "<center>nginx</center>".repeat(20)
        );

        let err = parse_err(StatusCode::BAD_GATEWAY, &page);

        assert!(err.is_endpoint());
        assert!(err.is_transient());
        assert_eq!(err.status(), Some(StatusCode::BAD_GATEWAY));
        assert_eq!(err.oauth_error(), None);
        let excerpt = err.excerpt().expect("an excerpt");
        assert!(
            excerpt.starts_with("<html>  <head><title>502 Bad Gateway</title>"),
            "{excerpt}"
        );
        assert!(excerpt.chars().count() <= 121, "{excerpt}");
        assert!(err
            .to_string()
            .starts_with("token endpoint refused the request (status 502)"));
    }

    #[test]
    fn f19_json_error_body_without_error_code_gets_an_excerpt() {
        let err = parse_err(
            StatusCode::INTERNAL_SERVER_ERROR,
            r#"{"message": "upstream down"}"#,
        );

        assert!(err.is_endpoint());
        assert_eq!(err.oauth_error(), None);
        assert_eq!(err.excerpt(), Some(r#"{"message": "upstream down"}"#));
    }

    #[test]
    fn f19_success_status_with_html_is_not_json() {
        let err = parse_err(
            StatusCode::OK,
            "<!DOCTYPE html><html><body>Please log in</body></html>",
        );

        assert!(err.is_invalid_response());
        assert_eq!(err.status(), Some(StatusCode::OK));
        assert_eq!(err.field(), None);
        assert_eq!(
            err.excerpt(),
            Some("<!DOCTYPE html><html><body>Please log in</body></html>")
        );
        assert!(err.to_string().contains("not JSON"), "{err}");
    }

    #[test]
    fn f19_form_encoded_token_never_becomes_an_excerpt() {
        let body = format!("access_token={ACCESS}&token_type=bearer&expires_in=3600 ok");

        let err = parse_err(StatusCode::OK, &body);

        assert!(err.is_invalid_response());
        assert_eq!(err.excerpt(), None);
        assert!(!format!("{err} {err:?}").contains(ACCESS));
    }

    #[test]
    fn f19_body_with_telltale_words_in_any_case_gets_no_excerpt() {
        for body in [
            "Your TOKEN is abc def",
            "the Secret is x y",
            "BEARER abc def",
            "x-refresh_token y",
        ] {
            let err = parse_err(StatusCode::BAD_GATEWAY, body);

            assert_eq!(err.excerpt(), None, "{body}");
        }
    }

    #[test]
    fn f19_bare_word_body_gets_no_excerpt_it_may_be_a_token() {
        let err = parse_err(
            StatusCode::OK,
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl\n",
        );

        assert!(err.is_invalid_response());
        assert_eq!(err.excerpt(), None);
    }

    #[test]
    fn f19_json_string_body_gets_no_excerpt_it_may_be_a_token() {
        let err = parse_err(StatusCode::OK, &format!("\"{ACCESS}\""));

        assert!(err.is_invalid_response());
        assert_eq!(err.excerpt(), None);
        assert!(err.to_string().contains("not a JSON object"), "{err}");
    }

    #[test]
    fn body_echoing_the_client_secret_gets_no_excerpt() {
        let err = parse_err(
            StatusCode::BAD_REQUEST,
            "bad request: client-s3cret is wrong",
        );

        assert_eq!(err.excerpt(), None);
        assert!(!format!("{err} {err:?}").contains("client-s3cret"));
    }

    #[test]
    fn empty_error_body_gives_the_status_alone() {
        let err = parse_err(StatusCode::SERVICE_UNAVAILABLE, "");

        assert!(err.is_endpoint());
        assert_eq!(err.excerpt(), None);
        assert_eq!(
            err.to_string(),
            "token endpoint refused the request (status 503)"
        );
    }

    #[test]
    fn decimal_seconds_grammar() {
        assert_eq!(decimal_seconds("0036"), Some(Duration::from_secs(36)));
        assert_eq!(decimal_seconds("-0"), Some(Duration::ZERO));
        assert_eq!(decimal_seconds("1.5.5"), None);
        assert_eq!(decimal_seconds("--1"), None);
        assert_eq!(
            decimal_seconds("\u{a0}1"),
            None,
            "only ASCII whitespace is trimmed"
        );
    }
}
