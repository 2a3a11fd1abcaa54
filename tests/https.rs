//! HTTPS to token endpoints and APIs, and R10 in the HTTPS era: certificate authorities made
//! by the test, servers on 127.0.0.1 that speak nothing but TLS, and the rustls transports.
#![cfg(feature = "rustls")]

mod common;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use common::{body_text, get, ok, respond, Recorded, TestServer};
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo},
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    ClientConfig, RootCertStore, ServerConfig,
};
use tokio_rustls::TlsAcceptor;
use tower::{ServiceBuilder, ServiceExt};
use tower_token_refresh::{
    source::oauth2::{https_transport, ClientCredentials, ClientCredentialsBuilder},
    BoxError, Error, RefreshLayer, TokenSource,
};

const CLIENT_ID: &str = "orders-service";
const SECRET: &str = "tls-client-s3cret";
/// `authorization: Basic base64("orders-service:tls-client-s3cret")`.
const BASIC: &str = "Basic b3JkZXJzLXNlcnZpY2U6dGxzLWNsaWVudC1zM2NyZXQ=";
const ACCESS: &str = "tls-access-token-1";

/// A certificate authority made for one test, with a server certificate it signed for
/// `127.0.0.1` and `localhost`.
struct TestCa {
    certificate: CertificateDer<'static>,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: Vec<u8>,
}

impl TestCa {
    fn new(name: &str) -> Self {
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, name);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();

        let server_key = KeyPair::generate().unwrap();
        let mut server =
            CertificateParams::new(["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        server
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let server = server.signed_by(&server_key, &*ca).unwrap();

        Self {
            certificate: ca.der().clone(),
            server_chain: vec![server.der().clone()],
            server_key: server_key.serialize_der(),
        }
    }

    /// A client configuration that trusts this authority and nothing else.
    fn client_config(&self) -> ClientConfig {
        let mut roots = RootCertStore::empty();
        roots.add(self.certificate.clone()).unwrap();
        ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth()
    }

    /// A server configuration presenting the certificate this authority signed.
    fn server_config(&self) -> ServerConfig {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.clone()));
        ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(self.server_chain.clone(), key)
            .unwrap()
    }
}

/// An HTTP/1 server on 127.0.0.1 that speaks only TLS, records every request that arrives
/// and answers with `handler`.
struct TlsServer {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsServer {
    async fn start<F>(tls: ServerConfig, handler: F) -> Self
    where
        F: Fn(&Recorded) -> Response<Full<Bytes>> + Clone + Send + Sync + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&requests);

        let task = tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (acceptor, handler, log) = (acceptor.clone(), handler.clone(), log.clone());
                tokio::spawn(async move {
                    // NOTE: a client that distrusts the certificate ends the handshake here;
                    // no request ever reaches the handler then.
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |request: Request<Incoming>| {
                        let (handler, log) = (handler.clone(), log.clone());
                        async move {
                            let (parts, body) = request.into_parts();
                            let recorded = Recorded {
                                method: parts.method,
                                uri: parts.uri,
                                headers: parts.headers,
                                body: body.collect().await?.to_bytes(),
                            };
                            let response = handler(&recorded);
                            log.lock().unwrap().push(recorded);
                            Ok::<_, hyper::Error>(response)
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            requests,
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}{}", self.addr, path)
    }

    fn recorded(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A token endpoint that issues `ACCESS` for an hour to whoever asks.
async fn token_endpoint(tls: ServerConfig) -> TlsServer {
    TlsServer::start(tls, |_| {
        respond(
            StatusCode::OK,
            &[("content-type", "application/json")],
            &format!(r#"{{"access_token":"{ACCESS}","token_type":"Bearer","expires_in":3600}}"#),
        )
    })
    .await
}

/// An API that serves callers bearing `ACCESS` and rejects everyone else.
async fn api(tls: ServerConfig) -> TlsServer {
    TlsServer::start(tls, |request| {
        if request.bearer().as_deref() == Some(ACCESS) {
            ok("orders: 3")
        } else {
            respond(StatusCode::UNAUTHORIZED, &[], "who are you")
        }
    })
    .await
}

fn source(token_url: &str) -> ClientCredentialsBuilder {
    ClientCredentials::builder(token_url, CLIENT_ID, SECRET).scope("orders:read")
}

/// hyper-util's client over hyper-rustls, as users build it for their APIs.
fn api_client(tls: ClientConfig) -> Client<HttpsConnector<HttpConnector>, Full<Bytes>> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(https)
}

/// An error and every error in its source chain, joined.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        text.push_str(": ");
        text.push_str(&err.to_string());
        source = err.source();
    }
    text
}

fn assert_no_secret(text: &str) {
    for secret in [SECRET, &BASIC["Basic ".len()..]] {
        assert!(!text.contains(secret), "a secret in {text:?}");
    }
}

#[tokio::test]
async fn r10_token_over_https_with_private_roots_authorizes_an_api_call_over_https() {
    let ca = TestCa::new("test CA");
    let auth = token_endpoint(ca.server_config()).await;
    let api = api(ca.server_config()).await;
    let source = source(&auth.url("/oauth/token"))
        .transport(https_transport(ca.client_config()))
        .build()
        .unwrap();
    let service = ServiceBuilder::new()
        .layer(RefreshLayer::new(source))
        .service(api_client(ca.client_config()));

    let response = service.oneshot(get(&api.url("/orders"))).await.unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body_text(response).await, "orders: 3");
    let [token_request] = auth.recorded().try_into().unwrap();
    assert_eq!(token_request.method, Method::POST);
    assert_eq!(token_request.uri, "/oauth/token");
    assert_eq!(token_request.headers[header::AUTHORIZATION], BASIC);
    assert_eq!(
        token_request.body,
        "grant_type=client_credentials&scope=orders%3Aread"
    );
    let [api_request] = api.recorded().try_into().unwrap();
    assert_eq!(api_request.bearer().as_deref(), Some(ACCESS));
}

#[tokio::test]
async fn r10_token_endpoint_with_an_untrusted_certificate_is_a_transport_error_without_secrets() {
    let trusted = TestCa::new("trusted CA");
    let rogue = TestCa::new("rogue CA");
    let auth = token_endpoint(rogue.server_config()).await;
    let source = source(&auth.url("/oauth/token"))
        .transport(https_transport(trusted.client_config()))
        .build()
        .unwrap();

    let err = source
        .fetch(None)
        .await
        .expect_err("an untrusted certificate");

    assert!(err.is_transport(), "{err:?}");
    assert!(err.is_transient());
    assert_eq!(err.to_string(), "token endpoint could not be reached");
    let chain = chain(&err);
    assert!(chain.contains("certificate"), "{chain}");
    assert_no_secret(&chain);
    assert_no_secret(&format!("{err:?}"));
    assert!(auth.recorded().is_empty(), "a request got through");
}

#[tokio::test]
async fn r9_untrusted_token_endpoint_fails_the_call_before_anything_reaches_the_api() {
    let trusted = TestCa::new("trusted CA");
    let rogue = TestCa::new("rogue CA");
    let auth = token_endpoint(rogue.server_config()).await;
    let api = api(trusted.server_config()).await;
    let source = source(&auth.url("/oauth/token"))
        .transport(https_transport(trusted.client_config()))
        .build()
        .unwrap();
    let service = ServiceBuilder::new()
        .layer(RefreshLayer::new(source))
        .service(api_client(trusted.client_config()));

    let err: BoxError = service
        .oneshot(get(&api.url("/orders")))
        .await
        .expect_err("no token");

    let err = err.downcast::<Error>().expect("the layer's error");
    assert!(err.is_transport(), "{err:?}");
    assert_no_secret(&chain(&*err));
    assert!(
        api.recorded().is_empty(),
        "the API was called without a token"
    );
}

#[test]
fn default_transport_accepts_an_https_token_url_at_build() {
    let built = source("https://auth.example.com/oauth/token").build();

    let source = built.expect("the default transport speaks TLS");
    assert_eq!(source.token_url(), "https://auth.example.com/oauth/token");
}

#[tokio::test]
async fn default_transport_speaks_tls_and_refuses_a_certificate_outside_its_roots() {
    let ca = TestCa::new("test CA");
    let auth = token_endpoint(ca.server_config()).await;
    let source = source(&auth.url("/oauth/token")).build().unwrap();

    let err = source
        .fetch(None)
        .await
        .expect_err("a test CA is no public root");

    assert!(err.is_transport(), "{err:?}");
    let chain = chain(&err);
    assert!(chain.contains("certificate"), "{chain}");
    assert_no_secret(&chain);
    assert!(auth.recorded().is_empty(), "a request got through");
}

#[test]
fn r10_plain_http_to_a_remote_host_is_refused_at_build_unless_allowed() {
    let refused = source("http://auth.example.com/token").build();
    let allowed = source("http://auth.example.com/token")
        .allow_insecure_http(true)
        .build();

    let err = refused.expect_err("plain http to a remote host");
    assert!(err.is_config() && err.is_terminal(), "{err:?}");
    assert!(err.to_string().contains("allow_insecure_http"), "{err}");
    assert_no_secret(&format!("{err} {err:?}"));
    let source = allowed.expect("explicitly allowed");
    assert_eq!(source.token_url(), "http://auth.example.com/token");
}

#[tokio::test]
async fn https_transport_speaks_http1_whatever_alpn_its_config_offers() {
    let ca = TestCa::new("test CA");
    let mut server_tls = ca.server_config();
    server_tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let auth = token_endpoint(server_tls).await;
    let mut client_tls = ca.client_config();
    client_tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let source = source(&auth.url("/oauth/token"))
        .transport(https_transport(client_tls))
        .build()
        .unwrap();

    let token = source.fetch(None).await.expect("a token over HTTP/1.1");

    assert_eq!(token.expose_secret(), ACCESS);
}

#[tokio::test]
async fn https_transport_also_serves_a_plain_http_loopback_token_endpoint() {
    let auth = TestServer::start(|_| async {
        ok(&format!(
            r#"{{"access_token":"{ACCESS}","token_type":"Bearer","expires_in":3600}}"#
        ))
    })
    .await;
    let source = source(&auth.url("/oauth/token"))
        .transport(https_transport(TestCa::new("unused CA").client_config()))
        .build()
        .unwrap();

    let token = source.fetch(None).await.expect("a token over plain http");

    assert_eq!(token.expose_secret(), ACCESS);
    assert_eq!(auth.recorded()[0].headers[header::AUTHORIZATION], BASIC);
}
