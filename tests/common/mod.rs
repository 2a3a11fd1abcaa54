//! Loopback peers shared by the integration tests: a recording HTTP server, a counting token
//! source and a hyper-util client.
#![allow(dead_code, unreachable_pub)]

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use axum::{body::Body as AxumBody, extract::Request as AxumRequest, Router};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use tower_token_refresh::{source, Error, Token};

/// A request as the server saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    /// The values of the `authorization` headers, in order.
    pub fn authorizations(&self) -> Vec<String> {
        self.headers
            .get_all(http::header::AUTHORIZATION)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    /// The bearer token, if exactly one `authorization: Bearer` header arrived.
    pub fn bearer(&self) -> Option<String> {
        match self.authorizations().as_slice() {
            [one] => one.strip_prefix("Bearer ").map(str::to_owned),
            _ => None,
        }
    }
}

/// An HTTP server on 127.0.0.1 that records every request and answers with `handler`.
pub struct TestServer {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Recorded>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    pub async fn start<F, Fut>(handler: F) -> Self
    where
        F: Fn(Recorded) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&requests);
        let app = Router::new().fallback(move |request: AxumRequest| {
            let handler = handler.clone();
            let log = Arc::clone(&log);
            async move {
                let (parts, body) = request.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                let recorded = Recorded {
                    method: parts.method,
                    uri: parts.uri,
                    headers: parts.headers,
                    body,
                };
                log.lock().unwrap().push(recorded.clone());
                handler(recorded).await.map(AxumBody::new)
            }
        });

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            addr,
            requests,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn hits(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    pub fn recorded(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A response with `status`, the given headers and body.
pub fn respond(status: StatusCode, headers: &[(&str, &str)], body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::builder().status(status);
    for (name, value) in headers {
        response = response.header(*name, *value);
    }
    response
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .unwrap()
}

pub fn ok(body: &str) -> Response<Full<Bytes>> {
    respond(StatusCode::OK, &[], body)
}

pub fn unauthorized(error: &str) -> Response<Full<Bytes>> {
    respond(
        StatusCode::UNAUTHORIZED,
        &[(
            "www-authenticate",
            &format!(r#"Bearer realm="test", error="{error}""#),
        )],
        "token rejected",
    )
}

/// hyper-util's client, as users build it.
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn get(url: &str) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::new(Bytes::new())).unwrap()
}

pub async fn body_text<B>(response: Response<B>) -> String
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// A token source that counts its calls and hands out `token-1`, `token-2`, ...
#[derive(Clone)]
pub struct Counting {
    pub calls: Arc<AtomicUsize>,
}

impl Counting {
    pub fn new() -> Self {
        Self {
            calls: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// A source whose tokens live `lifetime` (unknown expiry when `None`), answering after
    /// `delay`.
    pub fn source(
        &self,
        lifetime: Option<Duration>,
        delay: Duration,
    ) -> impl tower_token_refresh::TokenSource {
        let calls = Arc::clone(&self.calls);
        source::from_fn(move |_previous: Option<Token>| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let token = Token::new(format!("token-{n}"));
                Ok::<_, Error>(match lifetime {
                    Some(lifetime) => token.with_expires_in(lifetime),
                    None => token,
                })
            }
        })
    }
}

/// A body that streams its chunks and cannot be copied. It tells its end only when asked
/// after its last chunk, as a unary gRPC call's encoded message does.
pub struct Chunks(pub Vec<Bytes>);

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = tower_token_refresh::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.0.is_empty() {
            std::task::Poll::Ready(None)
        } else {
            std::task::Poll::Ready(Some(Ok(http_body::Frame::data(self.0.remove(0)))))
        }
    }
}
