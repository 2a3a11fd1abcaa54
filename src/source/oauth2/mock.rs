//! A scripted token endpoint for the tests of both grants: it replies in order (answers with
//! any status, headers and delay, connection failures, or silence) and records every request
//! with the moment it arrived.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::Service;

use crate::BoxError;

/// One reply of the mock.
pub(super) enum Reply {
    /// An HTTP answer, after `delay`.
    Answer {
        status: StatusCode,
        headers: Vec<(HeaderName, &'static str)>,
        body: String,
        delay: Duration,
    },
    /// The connection fails.
    Refused,
    /// No answer, ever.
    Silence,
}

impl Reply {
    pub(super) fn ok(body: impl Into<String>) -> Self {
        Self::status(StatusCode::OK, body)
    }

    pub(super) fn status(status: StatusCode, body: impl Into<String>) -> Self {
        Self::Answer {
            status,
            headers: Vec::new(),
            body: body.into(),
            delay: Duration::ZERO,
        }
    }

    /// An OAuth error answer, `{"error": code}`.
    pub(super) fn oauth_error(status: StatusCode, code: &str) -> Self {
        Self::status(status, format!(r#"{{"error":"{code}"}}"#))
    }

    pub(super) fn header(mut self, name: HeaderName, value: &'static str) -> Self {
        if let Self::Answer { headers, .. } = &mut self {
            headers.push((name, value));
        }
        self
    }

    pub(super) fn after(mut self, wait: Duration) -> Self {
        if let Self::Answer { delay, .. } = &mut self {
            *delay = wait;
        }
        self
    }
}

/// A request as the mock received it.
#[derive(Clone, Debug)]
pub(super) struct Received {
    pub(super) at: Instant,
    pub(super) headers: HeaderMap,
    pub(super) form: String,
}

/// The scripted token endpoint; clones share the script and the record.
#[derive(Clone, Default)]
pub(super) struct MockEndpoint {
    replies: Arc<Mutex<VecDeque<Reply>>>,
    received: Arc<Mutex<Vec<Received>>>,
}

impl MockEndpoint {
    pub(super) fn replying(replies: impl IntoIterator<Item = Reply>) -> Self {
        Self {
            replies: Arc::new(Mutex::new(replies.into_iter().collect())),
            ..Self::default()
        }
    }

    /// A transport for a builder. Running out of replies fails the test.
    pub(super) fn transport(
        &self,
    ) -> impl Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = BoxError,
        Future = impl Send + 'static,
    > + Clone
           + Send
           + Sync
           + 'static {
        let mock = self.clone();
        tower::service_fn(move |request: Request<Full<Bytes>>| {
            let mock = mock.clone();
            async move { mock.reply(request).await }
        })
    }

    async fn reply(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Full<Bytes>>, BoxError> {
        let (parts, body) = request.into_parts();
        let body = body.collect().await?.to_bytes();
        self.received.lock().unwrap().push(Received {
            at: Instant::now(),
            headers: parts.headers,
            form: String::from_utf8(body.to_vec())?,
        });

        let reply = self
            .replies
            .lock()
            .unwrap()
            .pop_front()
            .expect("the mock token endpoint has no more replies");
        match reply {
            Reply::Answer {
                status,
                headers,
                body,
                delay,
            } => {
                tokio::time::sleep(delay).await;
                let mut response = Response::new(Full::new(Bytes::from(body)));
                *response.status_mut() = status;
                for (name, value) in headers {
                    response
                        .headers_mut()
                        .append(name, HeaderValue::from_static(value));
                }
                Ok(response)
            }
            Reply::Refused => {
                Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into())
            }
            Reply::Silence => std::future::pending().await,
        }
    }

    /// How many requests arrived.
    pub(super) fn hits(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// The requests that arrived, in order.
    pub(super) fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// The form bodies of the requests that arrived, in order.
    pub(super) fn forms(&self) -> Vec<String> {
        self.received().into_iter().map(|r| r.form).collect()
    }
}
