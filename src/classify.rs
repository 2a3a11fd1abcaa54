//! What counts as a rejection of the token (R7), and the parsed `WWW-Authenticate` challenge.
//!
//! By default a response rejects the token when:
//!
//! - its status is `401 Unauthorized`, unless its Bearer challenge says
//!   `error="insufficient_scope"` (a token with more scopes is needed, not a new one); or
//! - it carries `grpc-status: 16` (UNAUTHENTICATED) in its headers, as a gRPC trailers-only
//!   response does.
//!
//! `403 Forbidden` is not a rejection unless [`RefreshLayer::refresh_on_forbidden`] is set,
//! and [`RefreshLayer::rejection_predicate`] replaces the whole rule.
//!
//! Whenever a 401 or 403 response carries a Bearer challenge, the layer puts the parsed
//! [`Challenge`] into the response's extensions, retried or not:
//!
//! ```
//! use tower_token_refresh::Challenge;
//!
//! fn why<B>(response: &http::Response<B>) -> Option<&str> {
//!     response.extensions().get::<Challenge>()?.error()
//! }
//! # let _ = why::<()>;
//! ```
//!
//! [`RefreshLayer::refresh_on_forbidden`]: crate::RefreshLayer::refresh_on_forbidden
//! [`RefreshLayer::rejection_predicate`]: crate::RefreshLayer::rejection_predicate

use std::{fmt, sync::Arc};

use http::{header::WWW_AUTHENTICATE, HeaderMap, HeaderName, HeaderValue, StatusCode};

/// The gRPC status header, named once: looking it up by `&str` would parse the name on every
/// response.
static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// The longest `WWW-Authenticate` value that is parsed; longer ones are ignored.
const MAX_CHALLENGE_LEN: usize = 8 * 1024;

/// A user's rule for what counts as a rejection of the token.
pub(crate) type Predicate = Arc<dyn Fn(StatusCode, &HeaderMap) -> bool + Send + Sync>;

/// How responses are judged.
#[derive(Clone, Default)]
pub(crate) struct Classifier {
    pub(crate) forbidden: bool,
    pub(crate) predicate: Option<Predicate>,
}

impl fmt::Debug for Classifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Classifier")
            .field("forbidden", &self.forbidden)
            .field("predicate", &self.predicate.as_ref().map(|_| "custom"))
            .finish()
    }
}

/// The verdict on one response.
#[derive(Debug)]
pub(crate) struct Verdict {
    /// The token was rejected: refresh it.
    pub(crate) rejected: bool,
    /// The Bearer challenge of a 401 or 403, for the response's extensions.
    pub(crate) challenge: Option<Challenge>,
}

impl Classifier {
    /// Judges a response by its head.
    pub(crate) fn classify(&self, status: StatusCode, headers: &HeaderMap) -> Verdict {
        let auth_status = status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN;
        let challenge = if auth_status {
            Challenge::bearer_from_headers(headers)
        } else {
            None
        };

        let rejected = match &self.predicate {
            Some(predicate) => predicate(status, headers),
            None => {
                let insufficient_scope = challenge
                    .as_ref()
                    .is_some_and(|c| c.error() == Some("insufficient_scope"));
                let by_status = status == StatusCode::UNAUTHORIZED
                    || (self.forbidden && status == StatusCode::FORBIDDEN);
                (by_status && !insufficient_scope) || is_grpc_unauthenticated(headers)
            }
        };

        Verdict {
            rejected,
            challenge,
        }
    }
}

/// Returns true when `headers` (or trailers) carry `grpc-status: 16`.
pub(crate) fn is_grpc_unauthenticated(headers: &HeaderMap) -> bool {
    headers
        .get(&GRPC_STATUS)
        .is_some_and(|status| status.as_bytes().trim_ascii() == b"16")
}

/// A parsed `Bearer` challenge of a `WWW-Authenticate` header (RFC 6750 §3).
///
/// Unknown parameters are kept and reachable through [`Challenge::param`]. Parsing never fails:
/// what cannot be parsed is left out.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Challenge {
    params: Vec<(String, String)>,
}

impl Challenge {
    /// Finds the first `Bearer` challenge among the `WWW-Authenticate` headers.
    pub fn bearer_from_headers(headers: &HeaderMap) -> Option<Self> {
        headers
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .find_map(Self::bearer_from_value)
    }

    /// Parses one `WWW-Authenticate` value, which may hold several challenges, and returns its
    /// `Bearer` challenge.
    pub fn bearer_from_value(value: &HeaderValue) -> Option<Self> {
        let bytes = value.as_bytes();
        if bytes.len() > MAX_CHALLENGE_LEN {
            return None;
        }
        // NOTE: obs-text (bytes over 0x7f) is legal in quoted strings; it is kept as
        // replacement characters rather than losing the whole header.
        let text = String::from_utf8_lossy(bytes);
        parse_challenges(&text)
            .into_iter()
            .find(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, params)| Self { params })
    }

    /// The `error` parameter: `invalid_token`, `insufficient_scope`, `invalid_request`, ...
    pub fn error(&self) -> Option<&str> {
        self.param("error")
    }

    /// The `error_description` parameter.
    pub fn error_description(&self) -> Option<&str> {
        self.param("error_description")
    }

    /// The `scope` parameter: the scopes the resource needs, space-separated.
    pub fn scope(&self) -> Option<&str> {
        self.param("scope")
    }

    /// The `realm` parameter.
    pub fn realm(&self) -> Option<&str> {
        self.param("realm")
    }

    /// Any parameter, by case-insensitive name.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// Splits a `WWW-Authenticate` value into challenges: `(scheme, params)`.
///
/// The grammar (RFC 9110 §11.6.1) is `scheme [ token68 / #auth-param ]`, comma-separated, where
/// the comma also separates parameters. A new challenge starts at a token followed by a space
/// and not by `=`.
fn parse_challenges(text: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut challenges: Vec<(String, Vec<(String, String)>)> = Vec::new();
    let mut rest = text;

    loop {
        rest = rest.trim_start_matches([' ', '\t', ',']);
        if rest.is_empty() {
            break;
        }

        let token_len = rest.find(|c: char| !is_token_char(c)).unwrap_or(rest.len());
        if token_len == 0 {
            // Not a token: skip one character and try again.
            let skip = rest.chars().next().map_or(1, char::len_utf8);
            rest = &rest[skip..];
            continue;
        }
        let token = &rest[..token_len];
        let after = rest[token_len..].trim_start_matches([' ', '\t']);

        if let Some(value_part) = after.strip_prefix('=') {
            // A parameter of the current challenge.
            let value_part = value_part.trim_start_matches([' ', '\t']);
            let (value, remaining) = parse_param_value(value_part);
            if let Some((_, params)) = challenges.last_mut() {
                params.push((token.to_ascii_lowercase(), value));
            }
            rest = remaining;
        } else {
            // A new challenge's scheme; a token68 after it is skipped.
            challenges.push((token.to_owned(), Vec::new()));
            rest = after;
            if !rest.is_empty() && !rest.starts_with(',') {
                let next_len = rest.find([' ', ',', '=']).unwrap_or(rest.len());
                let after_next = rest[next_len..].trim_start_matches([' ', '\t']);
                let is_param = after_next.starts_with('=') && !after_next.starts_with("==");
                if !is_param {
                    rest = rest[next_len..].trim_start_matches('=');
                }
            }
        }
    }

    challenges
}

/// Parses a quoted string or a token; returns the value and what follows it.
fn parse_param_value(text: &str) -> (String, &str) {
    if let Some(quoted) = text.strip_prefix('"') {
        let mut value = String::new();
        let mut chars = quoted.char_indices();
        while let Some((index, ch)) = chars.next() {
            match ch {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(escaped);
                    }
                }
                '"' => return (value, &quoted[index + 1..]),
                _ => value.push(ch),
            }
        }
        // Unterminated: take what there is.
        (value, "")
    } else {
        let end = text.find([',', ' ', '\t']).unwrap_or(text.len());
        (text[..end].to_owned(), &text[end..])
    }
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn parses_a_bearer_challenge_with_quoted_and_plain_params() {
        let value = HeaderValue::from_static(
            r#"Bearer realm="example", error="invalid_token", error_description="The access token expired""#,
        );

        let challenge = Challenge::bearer_from_value(&value).unwrap();

        assert_eq!(challenge.realm(), Some("example"));
        assert_eq!(challenge.error(), Some("invalid_token"));
        assert_eq!(
            challenge.error_description(),
            Some("The access token expired")
        );
    }

    #[test]
    fn finds_bearer_among_several_challenges() {
        let value = HeaderValue::from_static(
            r#"Basic realm="a, b", Newauth realm="apps", type=1, Bearer error=insufficient_scope, scope="read write""#,
        );

        let challenge = Challenge::bearer_from_value(&value).unwrap();

        assert_eq!(challenge.error(), Some("insufficient_scope"));
        assert_eq!(challenge.scope(), Some("read write"));
        assert_eq!(challenge.realm(), None);
    }

    #[test]
    fn skips_token68_and_escapes() {
        let value = HeaderValue::from_static(r#"Negotiate abc123==, bearer error="a\"b", scope=x"#);

        let challenge = Challenge::bearer_from_value(&value).unwrap();

        assert_eq!(challenge.error(), Some("a\"b"));
        assert_eq!(challenge.scope(), Some("x"));
    }

    #[test]
    fn garbage_never_panics() {
        for text in [
            "",
            ",,,",
            "=",
            "Bearer =",
            "Bearer a=\"",
            "\"Bearer\"",
            "Bearer ,=,=",
            "Bearer é=ü",
        ] {
            let value = HeaderValue::from_bytes(text.as_bytes()).unwrap();
            let _ = Challenge::bearer_from_value(&value);
        }
        let huge =
            HeaderValue::from_str(&format!("Bearer error=\"{}\"", "x".repeat(20_000))).unwrap();
        assert_eq!(Challenge::bearer_from_value(&huge), None);
    }

    #[test]
    fn r7_unauthorized_is_a_rejection_but_insufficient_scope_is_not() {
        let classifier = Classifier::default();

        let plain = classifier.classify(StatusCode::UNAUTHORIZED, &HeaderMap::new());
        let invalid = classifier.classify(
            StatusCode::UNAUTHORIZED,
            &headers(&[("www-authenticate", r#"Bearer error="invalid_token""#)]),
        );
        let scope = classifier.classify(
            StatusCode::UNAUTHORIZED,
            &headers(&[(
                "www-authenticate",
                r#"Bearer error="insufficient_scope", scope="write""#,
            )]),
        );

        assert!(plain.rejected);
        assert!(invalid.rejected);
        assert!(!scope.rejected);
        assert_eq!(scope.challenge.unwrap().scope(), Some("write"));
    }

    #[test]
    fn r7_forbidden_only_when_configured() {
        let default = Classifier::default();
        let forbidden = Classifier {
            forbidden: true,
            ..Classifier::default()
        };

        assert!(
            !default
                .classify(StatusCode::FORBIDDEN, &HeaderMap::new())
                .rejected
        );
        assert!(
            forbidden
                .classify(StatusCode::FORBIDDEN, &HeaderMap::new())
                .rejected
        );
    }

    #[test]
    fn r7_grpc_unauthenticated_in_headers_is_a_rejection() {
        let classifier = Classifier::default();

        let verdict = classifier.classify(StatusCode::OK, &headers(&[("grpc-status", "16")]));
        let other = classifier.classify(StatusCode::OK, &headers(&[("grpc-status", "7")]));

        assert!(verdict.rejected);
        assert!(!other.rejected);
    }

    #[test]
    fn a_predicate_replaces_the_rule() {
        let classifier = Classifier {
            forbidden: false,
            predicate: Some(Arc::new(|status, _| status == StatusCode::IM_A_TEAPOT)),
        };

        assert!(
            classifier
                .classify(StatusCode::IM_A_TEAPOT, &HeaderMap::new())
                .rejected
        );
        assert!(
            !classifier
                .classify(StatusCode::UNAUTHORIZED, &HeaderMap::new())
                .rejected
        );
    }
}
