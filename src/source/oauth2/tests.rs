//! End-to-end tests of the client credentials source: a builder, a mock token endpoint
//! behind `tower::service_fn`, and the token or error that comes out.

use std::{
    collections::VecDeque,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;

use super::{transport::tests::chunks, ClientAuth, ClientCredentials, ClientCredentialsBuilder};
use crate::{BoxError, TokenSource};

const TOKEN_URL: &str = "https://auth.example.com/oauth/token";
const SECRET: &str = "client-s3cret";
const ACCESS: &str = "A1-very-secret-access-token-value";

/// A request as the mock token endpoint received it.
#[derive(Debug)]
struct Seen {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: String,
}

/// A mock token endpoint: gives its answers in order and records every request.
#[derive(Clone, Default)]
struct Endpoint {
    answers: Arc<Mutex<VecDeque<(StatusCode, String)>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    delay: Duration,
}

impl Endpoint {
    fn answering<const N: usize>(answers: [(StatusCode, &str); N]) -> Self {
        let answers = answers
            .into_iter()
            .map(|(status, body)| (status, body.to_owned()))
            .collect();
        Self {
            answers: Arc::new(Mutex::new(answers)),
            ..Self::default()
        }
    }

    fn ok(body: &str) -> Self {
        Self::answering([(StatusCode::OK, body)])
    }

    fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Builds the source with this endpoint as its transport.
    fn source(&self, builder: ClientCredentialsBuilder) -> ClientCredentials {
        let endpoint = self.clone();
        let transport = tower::service_fn(move |request: Request<Full<Bytes>>| {
            let endpoint = endpoint.clone();
            async move { Ok::<_, Infallible>(endpoint.answer(request).await) }
        });
        builder
            .transport(transport)
            .build()
            .expect("a valid configuration")
    }

    async fn answer(&self, request: Request<Full<Bytes>>) -> Response<Full<Bytes>> {
        let (parts, body) = request.into_parts();
        let body = body.collect().await.expect("infallible").to_bytes();
        self.seen.lock().unwrap().push(Seen {
            method: parts.method,
            uri: parts.uri,
            headers: parts.headers,
            body: String::from_utf8(body.to_vec()).expect("a UTF-8 form"),
        });

        tokio::time::sleep(self.delay).await;

        let (status, body) = self
            .answers
            .lock()
            .unwrap()
            .pop_front()
            .expect("no more answers");
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
    }

    fn seen(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

fn builder() -> ClientCredentialsBuilder {
    ClientCredentials::builder(TOKEN_URL, "my-client", SECRET)
}

fn bearer(expires_in: u64) -> String {
    format!(r#"{{"access_token":"{ACCESS}","token_type":"Bearer","expires_in":{expires_in}}}"#)
}

fn headers_of(seen: &Seen, name: header::HeaderName) -> Vec<&HeaderValue> {
    seen.headers.get_all(name).iter().collect()
}

#[tokio::test]
async fn basic_auth_request_has_exact_form_body_and_headers() {
    let endpoint = Endpoint::ok(&bearer(3600));
    let source = endpoint.source(builder().scope("read write").scope("admin"));

    let token = source.fetch(None).await.expect("a token");

    let seen = endpoint.seen();
    assert_eq!(seen.len(), 1);
    let request = &seen[0];
    assert_eq!(request.method, Method::POST);
    assert_eq!(request.uri, TOKEN_URL);
    assert_eq!(
        request.body,
        "grant_type=client_credentials&scope=read+write+admin"
    );
    assert_eq!(
        headers_of(request, header::CONTENT_TYPE),
        ["application/x-www-form-urlencoded"]
    );
    assert_eq!(headers_of(request, header::ACCEPT), ["application/json"]);
    // base64("my-client:client-s3cret")
    assert_eq!(
        headers_of(request, header::AUTHORIZATION),
        ["Basic bXktY2xpZW50OmNsaWVudC1zM2NyZXQ="]
    );
    assert!(request.headers[header::AUTHORIZATION].is_sensitive());
    assert_eq!(request.headers.len(), 3);
    assert_eq!(token.expose_secret(), ACCESS);
    assert_eq!(token.scopes(), ["read", "write", "admin"]);
}

#[tokio::test]
async fn basic_auth_form_urlencodes_special_characters_of_id_and_secret() {
    let endpoint = Endpoint::ok(&bearer(60));
    let source = endpoint.source(ClientCredentials::builder(
        TOKEN_URL,
        "client:1 +%/é",
        "p@ss w:rd+%~*ü",
    ));

    source.fetch(None).await.expect("a token");

    let seen = endpoint.seen();
    // base64("client%3A1+%2B%25%2F%C3%A9:p%40ss+w%3Ard%2B%25%7E*%C3%BC")
    assert_eq!(
        headers_of(&seen[0], header::AUTHORIZATION),
        ["Basic Y2xpZW50JTNBMSslMkIlMjUlMkYlQzMlQTk6cCU0MHNzK3clM0FyZCUyQiUyNSU3RSolQzMlQkM="]
    );
    assert_eq!(seen[0].body, "grant_type=client_credentials");
}

#[tokio::test]
async fn request_body_auth_sends_the_credentials_in_the_form_only() {
    let endpoint = Endpoint::ok(&bearer(60));
    let source = endpoint.source(
        ClientCredentials::builder(TOKEN_URL, "client:1 +%/é", "p@ss w:rd+%~*ü")
            .client_auth(ClientAuth::RequestBody)
            .scope("read"),
    );

    source.fetch(None).await.expect("a token");

    let seen = endpoint.seen();
    assert_eq!(
        seen[0].body,
        "grant_type=client_credentials&scope=read\
         &client_id=client%3A1+%2B%25%2F%C3%A9&client_secret=p%40ss+w%3Ard%2B%25%7E*%C3%BC"
    );
    assert!(!seen[0].headers.contains_key(header::AUTHORIZATION));
}

#[tokio::test]
async fn audience_resource_and_params_follow_the_scope_in_order() {
    let endpoint = Endpoint::ok(&bearer(60));
    let source = endpoint.source(
        builder()
            .scopes(["a", "b"])
            .audience("https://api.example.com")
            .resource("urn:orders")
            .resource("urn:billing")
            .param("tenant", "acme & co"),
    );

    source.fetch(None).await.expect("a token");

    assert_eq!(
        endpoint.seen()[0].body,
        "grant_type=client_credentials&scope=a+b&audience=https%3A%2F%2Fapi.example.com\
         &resource=urn%3Aorders&resource=urn%3Abilling&tenant=acme+%26+co"
    );
}

#[tokio::test]
async fn extra_headers_are_sent_with_every_request() {
    let endpoint =
        Endpoint::answering([(StatusCode::OK, &bearer(60)), (StatusCode::OK, &bearer(60))]);
    let source = endpoint.source(
        builder()
            .header(header::USER_AGENT, HeaderValue::from_static("reports/1.0"))
            .header(
                header::ACCEPT,
                HeaderValue::from_static("application/jwt, application/json"),
            ),
    );

    source.fetch(None).await.expect("a token");
    source.fetch(None).await.expect("a token");

    for seen in endpoint.seen() {
        assert_eq!(headers_of(&seen, header::USER_AGENT), ["reports/1.0"]);
        assert_eq!(
            headers_of(&seen, header::ACCEPT),
            ["application/jwt, application/json"]
        );
    }
}

#[tokio::test(start_paused = true)]
async fn expiry_counts_from_the_moment_the_request_was_sent() {
    let endpoint = Endpoint::ok(&bearer(3600)).after(Duration::from_secs(10));
    let source = endpoint.source(builder());
    let before_sending = Instant::now();

    let token = source.fetch(None).await.expect("a token");

    assert_eq!(Instant::now() - before_sending, Duration::from_secs(10));
    assert_eq!(
        token.expires_at(),
        Some(before_sending + Duration::from_secs(3600))
    );
}

#[tokio::test(start_paused = true)]
async fn f01_expires_in_string_end_to_end() {
    let endpoint = Endpoint::ok(&format!(
        r#"{{"access_token":"{ACCESS}","token_type":"Bearer","expires_in":"3600"}}"#
    ));
    let source = endpoint.source(builder());
    let before_sending = Instant::now();

    let token = source.fetch(None).await.expect("a token");

    assert_eq!(
        token.expires_at(),
        Some(before_sending + Duration::from_secs(3600))
    );
}

#[tokio::test]
async fn f01_bad_expires_in_end_to_end_never_shows_the_token() {
    let endpoint = Endpoint::ok(&format!(
        r#"{{"access_token":"{ACCESS}","token_type":"Bearer","expires_in":"abc"}}"#
    ));
    let source = endpoint.source(builder());

    let err = source.fetch(None).await.expect_err("a parse error");

    assert!(err.is_invalid_response());
    assert_eq!(err.field(), Some("expires_in"));
    assert!(!format!("{err}").contains(ACCESS), "{err}");
    assert!(!format!("{err:?}").contains(ACCESS), "{err:?}");
}

#[tokio::test]
async fn f02_a_later_response_without_expires_in_does_not_reuse_the_old_expiry() {
    let without_expiry = r#"{"access_token":"A2","token_type":"Bearer"}"#;
    let endpoint = Endpoint::answering([
        (StatusCode::OK, &bearer(3600)),
        (StatusCode::OK, without_expiry),
    ]);
    let source = endpoint.source(builder());

    let first = source.fetch(None).await.expect("a token");
    let second = source.fetch(Some(&first)).await.expect("a token");

    assert!(first.expires_at().is_some());
    assert_eq!(second.expose_secret(), "A2");
    assert_eq!(second.expires_at(), None);
}

#[tokio::test(start_paused = true)]
async fn f03_expires_in_zero_end_to_end_is_expired_at_the_send_moment() {
    let endpoint = Endpoint::ok(&bearer(0)).after(Duration::from_secs(2));
    let source = endpoint.source(builder());
    let before_sending = Instant::now();

    let token = source.fetch(None).await.expect("a token");

    assert_eq!(token.expires_at(), Some(before_sending));
    assert_eq!(token.expires_in(), Some(Duration::ZERO));
}

#[tokio::test]
async fn f18_invalid_grant_end_to_end_is_terminal_with_its_description() {
    let endpoint = Endpoint::answering([(
        StatusCode::BAD_REQUEST,
        r#"{"error":"invalid_grant","error_description":"client assertion expired"}"#,
    )]);
    let source = endpoint.source(builder());

    let err = source.fetch(None).await.expect_err("a refusal");

    assert!(err.is_endpoint());
    assert!(err.is_terminal());
    assert!(!err.is_transport());
    assert_eq!(err.status(), Some(StatusCode::BAD_REQUEST));
    assert_eq!(err.oauth_error(), Some("invalid_grant"));
    assert_eq!(err.error_description(), Some("client assertion expired"));
    assert_eq!(
        err.to_string(),
        "token endpoint refused the request (status 400): invalid_grant (client assertion expired)"
    );
}

#[tokio::test]
async fn f19_bad_gateway_html_end_to_end_gives_status_and_excerpt() {
    let endpoint = Endpoint::answering([(
        StatusCode::BAD_GATEWAY,
        "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
    )]);
    let source = endpoint.source(builder().max_attempts(1));

    let err = source.fetch(None).await.expect_err("a failure");

    assert!(err.is_endpoint());
    assert!(err.is_transient());
    assert_eq!(err.status(), Some(StatusCode::BAD_GATEWAY));
    assert_eq!(
        err.excerpt(),
        Some("<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>")
    );
}

#[tokio::test]
async fn f19_success_status_with_a_non_json_body_end_to_end() {
    let endpoint = Endpoint::ok("Service is starting, please wait");
    let source = endpoint.source(builder());

    let err = source.fetch(None).await.expect_err("a failure");

    assert!(err.is_invalid_response());
    assert_eq!(err.status(), Some(StatusCode::OK));
    assert_eq!(err.excerpt(), Some("Service is starting, please wait"));
}

#[tokio::test]
async fn transport_failure_is_a_transient_transport_error() {
    let transport = tower::service_fn(|_request: Request<Full<Bytes>>| async {
        Err::<Response<Full<Bytes>>, _>(std::io::Error::other("connection refused"))
    });
    let source = builder().transport(transport).build().expect("a source");

    let err = source.fetch(None).await.expect_err("a failure");

    assert!(err.is_transport());
    assert!(err.is_transient());
    assert_eq!(err.status(), None);
    let cause = std::error::Error::source(&err).expect("the transport error");
    assert_eq!(cause.to_string(), "connection refused");
}

#[tokio::test]
async fn broken_response_body_is_a_transport_error() {
    let transport = tower::service_fn(|_request: Request<Full<Bytes>>| async {
        let mut body = chunks([r#"{"access_token":"#]);
        body.0.push_back(Err(BoxError::from("connection reset")));
        Ok::<_, Infallible>(Response::new(body))
    });
    let source = builder().transport(transport).build().expect("a source");

    let err = source.fetch(None).await.expect_err("a failure");

    assert!(err.is_transport());
    assert!(err.is_transient());
}

#[tokio::test]
async fn response_body_over_64_kib_is_refused_without_excerpt() {
    let huge = format!("{} {}", bearer(60), " ".repeat(64 * 1024));
    let endpoint = Endpoint::ok(&huge);
    let source = endpoint.source(builder());

    let err = source.fetch(None).await.expect_err("a refusal");

    assert!(err.is_invalid_response());
    assert_eq!(err.excerpt(), None);
    assert_eq!(
        err.to_string(),
        "token endpoint sent an unusable response (status 200): response body larger than 64 KiB"
    );
}

#[tokio::test]
async fn response_body_of_exactly_64_kib_is_read() {
    let json = bearer(60);
    let padded = format!("{json}{}", " ".repeat(64 * 1024 - json.len()));
    let endpoint = Endpoint::ok(&padded);
    let source = endpoint.source(builder());

    let token = source.fetch(None).await.expect("a token");

    assert_eq!(token.expose_secret(), ACCESS);
}

#[tokio::test(start_paused = true)]
async fn timeout_option_bounds_a_slow_token_endpoint() {
    let endpoint = Endpoint::ok(&bearer(60)).after(Duration::from_secs(60));
    let source = endpoint.source(builder().timeout(Duration::from_secs(5)));
    let before_sending = Instant::now();

    let err = source.fetch(None).await.expect_err("a timeout");

    assert!(err.is_timeout());
    assert!(err.is_transient());
    assert_eq!(Instant::now() - before_sending, Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn without_timeout_option_a_slow_token_endpoint_is_waited_for() {
    let endpoint = Endpoint::ok(&bearer(60)).after(Duration::from_secs(600));
    let source = endpoint.source(builder());

    let token = source.fetch(None).await.expect("a token");

    assert_eq!(token.expose_secret(), ACCESS);
}

#[tokio::test]
async fn clones_share_the_transport() {
    let endpoint =
        Endpoint::answering([(StatusCode::OK, &bearer(60)), (StatusCode::OK, &bearer(60))]);
    let source = endpoint.source(builder());
    let clone = source.clone();

    source.fetch(None).await.expect("a token");
    clone.fetch(None).await.expect("a token");

    assert_eq!(endpoint.seen().len(), 2);
}

#[test]
fn debug_redacts_the_client_secret() {
    let builder = builder()
        .param("client_assertion", "assertion-value")
        .header(
            header::HeaderName::from_static("x-api-key"),
            HeaderValue::from_static("key-value"),
        );
    let builder_debug = format!("{builder:?}");
    let source = Endpoint::default().source(builder);

    let source_debug = format!("{source:?}");

    for debug in [&builder_debug, &source_debug] {
        assert!(!debug.contains(SECRET), "{debug}");
        assert!(!debug.contains("assertion-value"), "{debug}");
        assert!(!debug.contains("key-value"), "{debug}");
        // base64("my-client:client-s3cret")
        assert!(
            !debug.contains("bXktY2xpZW50OmNsaWVudC1zM2NyZXQ="),
            "{debug}"
        );
        assert!(debug.contains("[redacted]"), "{debug}");
        assert!(debug.contains("my-client"), "{debug}");
    }
}

#[test]
fn source_is_clone_send_sync_and_its_fetch_is_send() {
    fn assert_source<T: TokenSource + Clone + Send + Sync>(_: &T) {}
    fn assert_send<T: Send>(_: &T) {}

    let source = Endpoint::default().source(builder());
    assert_source(&source);
    let fetch = source.fetch(None);
    assert_send(&fetch);
}

#[cfg(feature = "hyper-client")]
#[tokio::test]
async fn default_transport_reaches_a_loopback_token_endpoint() {
    use hyper::{body::Incoming, server::conn::http1, service::service_fn};
    use hyper_util::rt::TokioIo;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(None));
    let server_seen = seen.clone();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let service = service_fn(move |request: Request<Incoming>| {
            let seen = server_seen.clone();
            async move {
                let (parts, body) = request.into_parts();
                let body = body.collect().await?.to_bytes();
                *seen.lock().unwrap() = Some((parts.method, parts.uri, parts.headers, body));
                Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(bearer(60)))))
            }
        });
        http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .await
    });
    let token_url = format!("http://{address}/oauth/token");
    let source = ClientCredentials::builder(token_url.as_str(), "my-client", SECRET)
        .scope("read")
        .build()
        .expect("a source with the default transport");

    let token = source.fetch(None).await.expect("a token");

    assert_eq!(token.expose_secret(), ACCESS);
    let (method, uri, headers, body) = seen.lock().unwrap().take().expect("a request");
    assert_eq!(method, Method::POST);
    assert_eq!(uri, "/oauth/token");
    assert_eq!(headers[header::HOST], address.to_string().as_str());
    assert_eq!(
        headers[header::CONTENT_LENGTH],
        body.len().to_string().as_str()
    );
    assert_eq!(
        headers[header::AUTHORIZATION],
        "Basic bXktY2xpZW50OmNsaWVudC1zM2NyZXQ="
    );
    assert_eq!(body, "grant_type=client_credentials&scope=read");
    server.abort();
}

#[cfg(feature = "hyper-client")]
#[tokio::test]
async fn default_transport_to_a_closed_loopback_port_is_a_transport_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let token_url = format!("http://{address}/token");
    let source = ClientCredentials::builder(token_url.as_str(), "my-client", SECRET)
        .build()
        .expect("a source with the default transport");

    let err = source.fetch(None).await.expect_err("no server");

    assert!(err.is_transport(), "{err:?}");
    assert!(err.is_transient());
}

/// Collects what a `tracing` subscriber writes.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    /// Sends the `DEBUG` events of this thread here until the guard is dropped.
    fn capture_debug_on_this_thread(&self) -> tracing::subscriber::DefaultGuard {
        // NOTE: tracing caches per call site whether any subscriber listens. While exactly one
        // subscriber is registered, a call site first reached on another test thread is
        // judged by that thread's subscriber (none) and stays silent for ours. A second,
        // silent subscriber kept alive for good makes every judgement ask all of them.
        static SECOND_SUBSCRIBER: std::sync::OnceLock<tracing::Dispatch> =
            std::sync::OnceLock::new();
        SECOND_SUBSCRIBER
            .get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));

        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }
}

#[tokio::test]
async fn r10_debug_log_of_token_requests_names_host_and_outcome_but_no_secret() {
    let endpoint = Endpoint::answering([
        (StatusCode::OK, &bearer(60)),
        (StatusCode::UNAUTHORIZED, r#"{"error":"invalid_client"}"#),
    ]);
    let source = endpoint.source(builder().client_auth(ClientAuth::RequestBody));
    let logs = LogBuffer::default();
    let _guard = logs.capture_debug_on_this_thread();

    source.fetch(None).await.expect("a token");
    source.fetch(None).await.expect_err("a refusal");

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<_> = logs.lines().collect();
    assert_eq!(lines.len(), 2, "{logs}");
    assert!(lines[0].contains("token request succeeded"), "{logs}");
    assert!(lines[1].contains("token request failed"), "{logs}");
    assert!(lines[1].contains("status=401"), "{logs}");
    for line in &lines {
        assert!(line.contains("DEBUG"), "{line}");
        assert!(line.contains("host=\"auth.example.com\""), "{line}");
        assert!(line.contains("grant_type=\"client_credentials\""), "{line}");
    }
    assert!(!logs.contains(SECRET), "{logs}");
    assert!(!logs.contains(ACCESS), "{logs}");
}

#[tokio::test(start_paused = true)]
async fn r10_debug_log_of_a_retried_refresh_names_each_attempt_but_no_secret() {
    use super::{
        mock::{MockEndpoint, Reply},
        RefreshTokenGrant,
    };

    let mock = MockEndpoint::replying([
        Reply::status(StatusCode::SERVICE_UNAVAILABLE, "busy, try again")
            .header(header::RETRY_AFTER, "1"),
        Reply::ok(r#"{"access_token":"A2-access-value","refresh_token":"R2-rotated-value"}"#),
    ]);
    let source = RefreshTokenGrant::builder(TOKEN_URL, "my-app", "R1-presented-value")
        .client_secret(SECRET)
        .transport(mock.transport())
        .build()
        .expect("a source");
    let logs = LogBuffer::default();
    let _guard = logs.capture_debug_on_this_thread();

    source.fetch(None).await.expect("a token");

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<_> = logs.lines().collect();
    assert_eq!(lines.len(), 2, "{logs}");
    assert!(lines[0].contains("token request failed"), "{logs}");
    assert!(lines[0].contains("attempt=1"), "{logs}");
    assert!(lines[0].contains("status=503"), "{logs}");
    assert!(lines[0].contains("retry_in=Some(1s)"), "{logs}");
    assert!(lines[1].contains("token request succeeded"), "{logs}");
    assert!(lines[1].contains("attempt=2"), "{logs}");
    for line in &lines {
        assert!(line.contains("grant_type=\"refresh_token\""), "{line}");
    }
    for secret in [
        SECRET,
        "R1-presented-value",
        "A2-access-value",
        "R2-rotated-value",
    ] {
        assert!(!logs.contains(secret), "{secret} in {logs}");
    }
}
