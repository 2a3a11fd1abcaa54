//! The token endpoint as both grants use it: send the request, read and parse the answer,
//! retry what may mend itself, and log each attempt.

use std::{
    fmt,
    sync::{Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::Full;
use tokio::time::Instant;
use tower::ServiceExt;

use super::{
    config::RedactedSecret,
    request::{ClientAuth, TokenRequest},
    response::{parse_token_response, ResponseContext, SecretGuard},
    retry::{self, Decision, RetryPolicy},
    transport::{self, ReadError, Transport},
};
use crate::{Error, Token};

/// The largest token endpoint answer that is read; longer ones are refused.
const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// A configured token endpoint; made by `EndpointConfig::build`.
pub(super) struct Endpoint {
    pub(super) request: TokenRequest,
    pub(super) transport: Transport,
    /// What must never be copied from an answer into an error: the client secret's forms.
    pub(super) guard: SecretGuard,
    pub(super) grant_type: &'static str,
    /// Whether an attempt that got no answer may be tried again.
    pub(super) retry_unanswered: bool,
    pub(super) client_id: String,
    pub(super) client_auth: ClientAuth,
    pub(super) has_client_secret: bool,
    pub(super) scopes: Vec<String>,
    pub(super) timeout: Option<Duration>,
    pub(super) retry: RetryPolicy,
}

/// What one fetch adds to the endpoint's request.
pub(super) struct Exchange<'a> {
    /// Form parameters of this fetch, sent right after `grant_type`.
    pub(super) params: &'a [(&'a str, &'a str)],
    /// The endpoint's guard, extended with this fetch's secrets.
    pub(super) guard: &'a SecretGuard,
    /// The scopes of the token when the answer names none.
    pub(super) scopes_if_omitted: &'a [String],
    /// Where a refresh token handed out in a success answer is kept, even when the answer
    /// is unusable otherwise: the server may have rotated the one presented.
    pub(super) rotated: Option<&'a Mutex<Option<String>>>,
}

/// A failed attempt: the error, and how long the server asked us to wait.
struct Failure {
    error: Error,
    retry_after: Option<Duration>,
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Self {
            error,
            retry_after: None,
        }
    }
}

/// Keeps the refresh token of a success answer, whatever else the answer holds.
fn keep_rotated(sink: &Mutex<Option<String>>, body: &[u8]) {
    let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice(body) else {
        return;
    };
    if let Some(serde_json::Value::String(refresh_token)) = fields.get("refresh_token") {
        if !refresh_token.is_empty() {
            *sink.lock().unwrap_or_else(PoisonError::into_inner) = Some(refresh_token.clone());
        }
    }
}

impl Endpoint {
    /// The token endpoint's URL.
    pub(super) fn token_url(&self) -> &Uri {
        self.request.uri()
    }

    /// Asks the token endpoint for a token, retrying as the [`RetryPolicy`] allows.
    pub(super) async fn fetch(&self, exchange: Exchange<'_>) -> Result<Token, Error> {
        let host = self.token_url().host().unwrap_or_default();
        let started = Instant::now();

        let mut attempt = 1;
        loop {
            let sent_at = Instant::now();
            let outcome = self.attempt(&exchange, sent_at).await;
            let elapsed = sent_at.elapsed();

            let failure = match outcome {
                Ok(token) => {
                    tracing::debug!(
                        host,
                        grant_type = self.grant_type,
                        attempt,
                        ?elapsed,
                        expires_in = ?token.expires_in(),
                        "token request succeeded"
                    );
                    return Ok(token);
                }
                Err(failure) => failure,
            };

            let error = failure.error;
            let decision =
                if !self.retry_unanswered && error.status().is_none() && !retry::never_sent(&error)
                {
                    Decision::GiveUp("no answer, and the request may have spent its credential")
                } else {
                    self.retry
                        .decide(attempt, &error, failure.retry_after, started.elapsed())
                };
            let (retry_in, gave_up) = match decision {
                Decision::RetryAfter(delay) => (Some(delay), None),
                Decision::GiveUp(reason) => (None, Some(reason)),
            };
            tracing::debug!(
                host,
                grant_type = self.grant_type,
                attempt,
                ?elapsed,
                status = error.status().map(|status| status.as_u16()),
                terminal = error.is_terminal(),
                error = %error,
                retry_in = ?retry_in,
                gave_up,
                "token request failed"
            );
            match (retry_in, failure.retry_after) {
                (Some(delay), _) => tokio::time::sleep(delay).await,
                // The layer waits as long as the server asked before it asks again.
                (None, Some(wait)) => return Err(error.with_retry_after(wait)),
                (None, None) => return Err(error),
            }
            attempt += 1;
        }
    }

    /// One request and its answer, within the time limit of one attempt.
    async fn attempt(&self, exchange: &Exchange<'_>, sent_at: Instant) -> Result<Token, Failure> {
        let request = self.request.to_http_with(exchange.params);
        let exchanged = self.exchange(request, exchange, sent_at);

        match self.timeout {
            Some(limit) => tokio::time::timeout(limit, exchanged)
                .await
                .unwrap_or_else(|_elapsed| Err(Error::timeout().into())),
            None => exchanged.await,
        }
    }

    /// Sends the request and reads the answer.
    async fn exchange(
        &self,
        request: Request<Full<Bytes>>,
        exchange: &Exchange<'_>,
        sent_at: Instant,
    ) -> Result<Token, Failure> {
        let response = self
            .transport
            .clone()
            .oneshot(request)
            .await
            .map_err(Error::transport)?;

        let (parts, body) = response.into_parts();
        let retry_after = if parts.status.is_success() {
            None
        } else {
            retry::retry_after(&parts.headers, SystemTime::now())
        };
        let failure = |error| Failure { error, retry_after };
        let body = transport::read_body(body, MAX_RESPONSE_BODY)
            .await
            .map_err(|err| match err {
                ReadError::TooLarge => {
                    Error::invalid_response(parts.status, None, "response body larger than 64 KiB")
                }
                ReadError::Body(err) => Error::transport(err),
            })
            .map_err(failure)?;

        if parts.status.is_success() {
            if let Some(sink) = exchange.rotated {
                keep_rotated(sink, &body);
            }
        }

        let cx = ResponseContext {
            sent_at,
            scopes_if_omitted: exchange.scopes_if_omitted,
            guard: exchange.guard,
        };
        parse_token_response(parts.status, &body, &cx).map_err(failure)
    }

    /// Adds the endpoint to a source's `Debug`, without secrets.
    pub(super) fn debug_fields(&self, d: &mut fmt::DebugStruct<'_, '_>) {
        d.field("token_url", self.token_url())
            .field("client_id", &self.client_id)
            .field("client_secret", &RedactedSecret(self.has_client_secret))
            .field("client_auth", &self.client_auth)
            .field("scopes", &self.scopes)
            .field("timeout", &self.timeout)
            .field("max_attempts", &self.retry.max_attempts)
            .field("retry_budget", &self.retry.budget);
    }
}
