//! The embedded protected API: `GET /api/orders/{id}` and `POST /api/orders`, answering only
//! requests whose bearer token the token endpoint issued and nobody revoked (RFC 6750), and a
//! revoker that now and then revokes every token early.

use std::{sync::Arc, time::Duration};

use axum::{
    body::Bytes,
    extract::{Path, Request, State},
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde_json::{json, Value};
use tokio::{sync::watch, time::Instant};

use crate::{
    audit::{RetryAudit, CALL_HEADER},
    shared::{jittered, Counters, Invalid, Registry, Verdict, READ_SCOPE, WRITE_SCOPE},
};

pub(crate) const API_PATH: &str = "/api";

/// How often, on average, every token is revoked.
pub(crate) const REVOCATION_INTERVAL: Duration = Duration::from_millis(1500);

/// Tokens younger than this survive a revocation.
///
/// NOTE: a token the endpoint has just issued may still be on its way to the client, or be
/// on a retry that is on its way to the API. Revoking it too would reject the retry of a
/// request whose first attempt the same revocation rejected, and a correct client does not
/// retry twice (R6): the demo would report a failure no client could avoid.
pub(crate) const REVOCATION_GRACE: Duration = Duration::from_millis(250);

/// How the API judges tokens.
#[derive(Clone)]
pub(crate) enum TokenCheck {
    /// Only tokens in the table, unexpired, with the scope needed.
    Registry(Arc<Registry>),
    /// Any non-empty bearer token: the token endpoint is not ours, so its tokens are unknown.
    AnyNonEmpty,
}

#[derive(Clone)]
pub(crate) struct Api {
    pub(crate) check: TokenCheck,
    pub(crate) counters: Arc<Counters>,
    pub(crate) audit: Arc<RetryAudit>,
}

pub(crate) fn router(api: Api) -> Router {
    let orders = Router::new()
        .route("/orders", post(create_order))
        .route("/orders/{id}", get(read_order))
        .route_layer(middleware::from_fn_with_state(api.clone(), require_token))
        .with_state(api);
    Router::new().nest(API_PATH, orders)
}

/// What an `Authorization` header holds.
enum Presented<'a> {
    Nothing,
    Bearer(&'a str),
    /// Another scheme, an empty token, or several headers.
    Malformed,
}

fn presented(headers: &HeaderMap) -> Presented<'_> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        if headers.contains_key(header::AUTHORIZATION) {
            return Presented::Malformed;
        }
        return Presented::Nothing;
    };

    let bearer = value.to_str().ok().and_then(|v| v.split_once(' '));
    match bearer {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() => {
            Presented::Bearer(token)
        }
        _ => Presented::Malformed,
    }
}

async fn require_token(State(api): State<Api>, request: Request, next: Next) -> Response {
    Counters::bump(&api.counters.api_calls);

    match api.admit(request.method(), request.headers()) {
        Ok(()) => next.run(request).await,
        Err(refusal) => refusal.into_response(),
    }
}

impl Api {
    /// Lets a request through, or answers it the way RFC 6750 §3 says.
    fn admit(&self, method: &Method, headers: &HeaderMap) -> Result<(), Refusal> {
        let counters = &self.counters;
        let scope = if method == Method::GET {
            READ_SCOPE
        } else {
            WRITE_SCOPE
        };

        let token = match presented(headers) {
            Presented::Bearer(token) => token,
            Presented::Nothing => {
                Counters::bump(&counters.rejected_missing);
                return Err(Refusal(StatusCode::UNAUTHORIZED, r#"Bearer realm="demo""#));
            }
            Presented::Malformed => {
                if headers.get_all(header::AUTHORIZATION).iter().count() > 1 {
                    Counters::bump(&counters.doubled_headers);
                }
                let invalid_request = r#"Bearer error="invalid_request""#;
                return Err(Refusal(StatusCode::BAD_REQUEST, invalid_request));
            }
        };
        let verdict = match &self.check {
            TokenCheck::Registry(registry) => registry.check(token, scope),
            TokenCheck::AnyNonEmpty => Verdict::Valid,
        };
        self.audit_retry(headers, token, &verdict);

        match verdict {
            Verdict::Valid => Ok(()),
            Verdict::Invalid(why) => {
                Counters::bump(match why {
                    Invalid::Revoked(_) => &counters.rejected_revoked,
                    Invalid::Expired => &counters.rejected_expired,
                    Invalid::Unknown => &counters.rejected_unknown,
                });
                let invalid_token = r#"Bearer error="invalid_token""#;
                Err(Refusal(StatusCode::UNAUTHORIZED, invalid_token))
            }
            Verdict::InsufficientScope => {
                let insufficient_scope = if scope == READ_SCOPE {
                    r#"Bearer error="insufficient_scope", scope="orders:read""#
                } else {
                    r#"Bearer error="insufficient_scope", scope="orders:write""#
                };
                Err(Refusal(StatusCode::FORBIDDEN, insufficient_scope))
            }
        }
    }

    fn audit_retry(&self, headers: &HeaderMap, token: &str, verdict: &Verdict) {
        let Some(call) = headers.get(CALL_HEADER).and_then(|v| v.to_str().ok()) else {
            return;
        };
        let rejected = match verdict {
            Verdict::Invalid(why) => Some(*why),
            Verdict::Valid | Verdict::InsufficientScope => None,
        };
        self.audit.note(&self.counters, call, token, rejected);
    }
}

/// An answer to a request without a usable token: a status and a `WWW-Authenticate`
/// challenge.
struct Refusal(StatusCode, &'static str);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let Self(status, challenge) = self;
        let header = (
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        );
        (status, [header]).into_response()
    }
}

async fn read_order(Path(id): Path<u64>) -> Json<Value> {
    Json(json!({ "id": id, "status": "shipped" }))
}

/// Accepts an order whose `sum` matches its `items`, and echoes who sent it, so the caller can
/// check that its own body arrived, and intact.
async fn create_order(State(api): State<Api>, body: Bytes) -> Response {
    match check_order(&body) {
        Some(echo) => (StatusCode::CREATED, Json(echo)).into_response(),
        None => {
            Counters::bump(&api.counters.damaged_bodies);
            let body = json!({ "error": "order body damaged" });
            (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response()
        }
    }
}

fn check_order(body: &[u8]) -> Option<Value> {
    let order: Value = serde_json::from_slice(body).ok()?;
    let items = order.get("items")?.as_array()?;
    let sum: u64 = items.iter().map(Value::as_u64).sum::<Option<u64>>()?;

    let intact = order.get("sum")?.as_u64()? == sum;
    intact.then(|| json!({ "worker": order["worker"], "seq": order["seq"], "sum": sum }))
}

/// Revokes every token (but those within [`REVOCATION_GRACE`] of their issue) at jittered
/// intervals, until `shutdown` turns true.
pub(crate) async fn revoke_now_and_then(
    registry: Arc<Registry>,
    counters: Arc<Counters>,
    mut shutdown: watch::Receiver<bool>,
) {
    for revocation in 1.. {
        let pause = jittered(REVOCATION_INTERVAL, 0.4);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }

        let Some(cutoff) = Instant::now().checked_sub(REVOCATION_GRACE) else {
            continue;
        };
        let revoked = registry.revoke_issued_before(cutoff, revocation);
        if revoked > 0 {
            Counters::bump(&counters.revocations);
            tracing::debug!(revoked, "revoked every token");
        }
    }
}
