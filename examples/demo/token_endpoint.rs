//! The embedded OAuth2 token endpoint: the client credentials grant (RFC 6749 §4.4) and the
//! refresh-token grant (§6) for one registered client, authenticated by HTTP Basic or by the
//! form body (§2.3.1).
//!
//! Refresh tokens rotate: each answer to a refresh brings a new one, and each one works once.

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::State,
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Json, Router,
};
use serde_json::json;

use crate::shared::{Counters, RefreshRefusal, Registry, Rotation, KNOWN_SCOPES, TOKEN_LIFETIME};

pub(crate) const TOKEN_PATH: &str = "/oauth/token";

/// The token endpoint's state: where it writes tokens, what it counts, whom it knows.
#[derive(Clone)]
pub(crate) struct TokenEndpoint {
    pub(crate) registry: Arc<Registry>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) client_id: Arc<str>,
    pub(crate) client_secret: Arc<str>,
}

pub(crate) fn router(endpoint: TokenEndpoint) -> Router {
    Router::new()
        .route(TOKEN_PATH, post(token))
        .with_state(endpoint)
}

async fn token(State(endpoint): State<TokenEndpoint>, headers: HeaderMap, body: Bytes) -> Response {
    Counters::bump(&endpoint.counters.token_calls);

    match endpoint.grant(&headers, &body) {
        Ok(response) => response,
        Err(error) => {
            Counters::bump(&endpoint.counters.token_errors);
            error.into_response()
        }
    }
}

impl TokenEndpoint {
    fn grant(&self, headers: &HeaderMap, body: &[u8]) -> Result<Response, OAuthError> {
        if !is_form(headers) {
            return Err(OAuthError::invalid_request(
                "content type must be application/x-www-form-urlencoded",
            ));
        }
        let form = Form::parse(body).ok_or(OAuthError::invalid_request(
            "form body is malformed or repeats a parameter",
        ))?;

        self.authenticate(headers, &form)?;
        let (scopes, refresh_token) = match form.get("grant_type") {
            Some("client_credentials") => (granted_scopes(form.get("scope"))?, None),
            Some("refresh_token") => {
                let rotation = self.rotate(&form)?;
                (rotation.scopes, Some(rotation.refresh_token))
            }
            Some(_) => return Err(OAuthError::unsupported_grant_type()),
            None => return Err(OAuthError::invalid_request("grant_type is missing")),
        };

        let access_token = self.registry.issue(scopes.clone());
        let mut body = json!({
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": TOKEN_LIFETIME.as_secs(),
            "scope": scopes.join(" "),
        });
        if let Some(refresh_token) = refresh_token {
            body["refresh_token"] = refresh_token.into();
        }
        Ok((no_store(), Json(body)).into_response())
    }

    /// Trades the presented refresh token for a new one, once (RFC 6749 §6 and §10.4).
    fn rotate(&self, form: &Form) -> Result<Rotation, OAuthError> {
        let presented = form
            .get("refresh_token")
            .ok_or(OAuthError::invalid_request("refresh_token is missing"))?;
        let requested: Vec<&str> = form
            .get("scope")
            .unwrap_or_default()
            .split(' ')
            .filter(|s| !s.is_empty())
            .collect();

        let counters = &self.counters;
        match self.registry.rotate_refresh_token(presented, &requested) {
            Ok(rotation) => {
                Counters::bump(&counters.refresh_grants);
                Ok(rotation)
            }
            Err(RefreshRefusal::Reused) => {
                Counters::bump(&counters.refresh_reused);
                tracing::warn!("a refresh token was presented a second time; refused");
                Err(OAuthError::invalid_grant("refresh token already used"))
            }
            Err(RefreshRefusal::Unknown) => {
                Counters::bump(&counters.refresh_unknown);
                Err(OAuthError::invalid_grant("refresh token unknown"))
            }
            Err(RefreshRefusal::ScopeNotGranted) => Err(OAuthError::invalid_scope()),
        }
    }

    /// Checks the client's credentials, from exactly one of the two places they may be in.
    fn authenticate(&self, headers: &HeaderMap, form: &Form) -> Result<(), OAuthError> {
        let basic = headers.get(header::AUTHORIZATION).map(basic_credentials);
        let (id, secret) = match (basic, form.get("client_secret")) {
            (Some(_), Some(_)) => {
                return Err(OAuthError::invalid_request(
                    "more than one client authentication method",
                ))
            }
            (Some(basic), None) => basic.ok_or(OAuthError::invalid_client())?,
            (None, Some(secret)) => {
                let id = form.get("client_id").unwrap_or_default();
                (id.to_owned(), secret.to_owned())
            }
            (None, None) => return Err(OAuthError::invalid_client()),
        };

        // NOTE: both are compared in full whatever the first difference, so that the time
        // taken tells an attacker nothing about how much of a guess was right.
        let id_matches = constant_time_eq(id.as_bytes(), self.client_id.as_bytes());
        let secret_matches = constant_time_eq(secret.as_bytes(), self.client_secret.as_bytes());
        if id_matches & secret_matches {
            Ok(())
        } else {
            Err(OAuthError::invalid_client())
        }
    }
}

/// The scopes to grant: all known ones when none were asked for, else exactly those asked.
fn granted_scopes(requested: Option<&str>) -> Result<Vec<String>, OAuthError> {
    let requested: Vec<&str> = requested.unwrap_or_default().split(' ').collect();
    let requested: Vec<&str> = requested.into_iter().filter(|s| !s.is_empty()).collect();
    if requested.is_empty() {
        return Ok(KNOWN_SCOPES.map(String::from).to_vec());
    }
    if !requested.iter().all(|s| KNOWN_SCOPES.contains(s)) {
        return Err(OAuthError::invalid_scope());
    }
    Ok(requested.into_iter().map(String::from).collect())
}

fn is_form(headers: &HeaderMap) -> bool {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let media_type = content_type.map(|v| v.split(';').next().unwrap_or_default().trim());
    media_type.is_some_and(|m| m.eq_ignore_ascii_case("application/x-www-form-urlencoded"))
}

/// Token responses must not be cached (RFC 6749 §5.1).
fn no_store() -> [(header::HeaderName, HeaderValue); 2] {
    [
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        (header::PRAGMA, HeaderValue::from_static("no-cache")),
    ]
}

/// An error answer of RFC 6749 §5.2.
struct OAuthError {
    status: StatusCode,
    code: &'static str,
    description: &'static str,
}

impl OAuthError {
    fn invalid_request(description: &'static str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            description,
        }
    }

    fn invalid_client() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: "invalid_client",
            description: "client authentication failed",
        }
    }

    fn unsupported_grant_type() -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "unsupported_grant_type",
            description: "client_credentials and refresh_token are supported",
        }
    }

    fn invalid_grant(description: &'static str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_grant",
            description,
        }
    }

    fn invalid_scope() -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_scope",
            description: "known scopes are orders:read and orders:write",
        }
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.code, "error_description": self.description });
        let mut response = (self.status, no_store(), Json(body)).into_response();

        // A 401 must say which authentication scheme the endpoint expects (RFC 6749 §5.2).
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Basic realm="demo""#),
            );
        }
        response
    }
}

/// A parsed `application/x-www-form-urlencoded` body whose parameters each appear once
/// (RFC 6749 §3.1).
struct Form(Vec<(String, String)>);

impl Form {
    fn parse(body: &[u8]) -> Option<Self> {
        let body = std::str::from_utf8(body).ok()?;
        let mut pairs: Vec<(String, String)> = Vec::new();
        for pair in body.split('&').filter(|pair| !pair.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let (name, value) = (form_decode(name)?, form_decode(value)?);
            if pairs.iter().any(|(seen, _)| *seen == name) {
                return None;
            }
            pairs.push((name, value));
        }
        Some(Self(pairs))
    }

    /// The value of `name`; an empty value counts as absent (RFC 6749 §3.1).
    fn get(&self, name: &str) -> Option<&str> {
        let (_, value) = self.0.iter().find(|(n, _)| n == name)?;
        Some(value.as_str()).filter(|v| !v.is_empty())
    }
}

/// Decodes one form-urlencoded component: `+` is a space, `%XX` a byte, and the result must
/// be UTF-8.
fn form_decode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        rest = tail;
        match byte {
            b'+' => bytes.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(rest.get(..2)?).ok()?;
                bytes.push(u8::from_str_radix(hex, 16).ok()?);
                rest = &rest[2..];
            }
            _ => bytes.push(byte),
        }
    }
    String::from_utf8(bytes).ok()
}

/// The client id and secret of a `Basic` authorization header. Each was form-urlencoded by
/// the client before being joined with `:` (RFC 6749 §2.3.1).
fn basic_credentials(value: &HeaderValue) -> Option<(String, String)> {
    let value = value.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(base64_decode(encoded.trim())?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((form_decode(id)?, form_decode(secret)?))
}

/// Decodes standard base64 with optional padding.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    if text.len() % 4 == 1 {
        return None;
    }

    let mut decoded = Vec::with_capacity(text.len() * 3 / 4);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for byte in text.bytes() {
        let sextet = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        buffer = (buffer << 6) | u32::from(sextet);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            decoded.push((buffer >> bits) as u8);
            buffer &= (1 << bits) - 1;
        }
    }
    Some(decoded)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let longest = a.len().max(b.len());
    let mut difference = u8::from(a.len() != b.len());
    for i in 0..longest {
        difference |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    difference == 0
}
