//! HTTPS end to end: a token endpoint and a protected API on 127.0.0.1, both behind
//! certificates of a certificate authority made at start-up, called through [`RefreshLayer`].
//!
//! The client trusts that authority and nothing else. Its token source reaches the token
//! endpoint through [`https_transport`] with those roots; the API client under the layer is
//! hyper-util's client over hyper-rustls with the same roots, as you would build it for your
//! own APIs. After two calls the API revokes the token, so the third call shows a rejection,
//! one refresh and a retry, all over TLS. The exit status says whether everything happened as
//! it should.
//!
//! ```text
//! cargo run --example https --features rustls
//! RUST_LOG=tower_token_refresh=debug cargo run --example https --features rustls
//! ```

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    ClientConfig, RootCertStore, ServerConfig,
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_token_refresh::{
    source::oauth2::{https_transport, ClientAuth, ClientCredentials},
    BoxError, RefreshLayer,
};
use tracing_subscriber::EnvFilter;

const CLIENT_ID: &str = "orders-service";
const CLIENT_SECRET: &str = "example-secret";

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::from_default_env())
        .init();

    // The certificate authority, and a certificate it signs for the servers' address.
    let ca = CertificateAuthority::new()?;
    let server_tls = Arc::new(ca.server_config()?);
    let tokens = Arc::new(Tokens::default());
    let token_address = serve_tls(Arc::clone(&server_tls), token_endpoint(&tokens)).await?;
    let api_address = serve_tls(server_tls, api(&tokens)).await?;
    println!("token endpoint: https://{token_address}/oauth/token");
    println!("API:            https://{api_address}/orders");

    // The client: one TLS configuration trusting that authority, for both connections.
    let client_tls = ca.client_config()?;
    let source = ClientCredentials::builder(
        format!("https://{token_address}/oauth/token"),
        CLIENT_ID,
        CLIENT_SECRET,
    )
    .client_auth(ClientAuth::RequestBody)
    .scope("orders:read")
    .transport(https_transport(client_tls.clone()))
    .build()?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_tls)
        .https_only()
        .enable_http1()
        .build();
    let layer = RefreshLayer::new(source);
    let handle = layer.handle();
    let mut client = ServiceBuilder::new()
        .layer(layer)
        .service(Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(https));

    // Two calls with the first token, then one after the API revoked it.
    let url = format!("https://{api_address}/orders");
    for call in 1..=3 {
        if call == 3 {
            tokens.revoke_all();
            println!("the API revokes every token it has seen");
        }
        let request = Request::get(&url).body(Full::default())?;
        let response = client.ready().await?.call(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        println!("call {call}: {status} {}", String::from_utf8_lossy(&body));
        if status != StatusCode::OK {
            return Err(format!("call {call} failed with {status}").into());
        }
    }

    // Expected: a token for the first call, another after the revocation, one retry.
    let stats = handle.stats();
    let issued = tokens.issued();
    println!(
        "tokens issued: {issued}, refreshes: {}, retries: {}",
        stats.refreshes, stats.retries
    );
    if issued != 2 || stats.refreshes != 2 || stats.retries != 1 {
        return Err("the token endpoint was not asked exactly as often as needed".into());
    }
    println!("ok: every call went over HTTPS with a valid token");
    Ok(())
}

/// A certificate authority made for this run, and a server certificate it signed for
/// `127.0.0.1` and `localhost`.
struct CertificateAuthority {
    certificate: CertificateDer<'static>,
    server_certificate: CertificateDer<'static>,
    server_key: Vec<u8>,
}

impl CertificateAuthority {
    fn new() -> Result<Self, BoxError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "tower-token-refresh example CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;

        let server_key = KeyPair::generate()?;
        let mut params = CertificateParams::new(["127.0.0.1".to_owned(), "localhost".to_owned()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let server_certificate = params.signed_by(&server_key, &*issuer)?;

        Ok(Self {
            certificate: issuer.der().clone(),
            server_certificate: server_certificate.der().clone(),
            server_key: server_key.serialize_der(),
        })
    }

    /// What a client that trusts this authority, and no other, uses.
    fn client_config(&self) -> Result<ClientConfig, BoxError> {
        let mut roots = RootCertStore::empty();
        roots.add(self.certificate.clone())?;
        Ok(ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth())
    }

    /// What the servers present.
    fn server_config(&self) -> Result<ServerConfig, BoxError> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.clone()));
        Ok(ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![self.server_certificate.clone()], key)?)
    }
}

/// The tokens the token endpoint issued and the API accepts.
#[derive(Default)]
struct Tokens {
    valid: Mutex<HashSet<String>>,
    issued: Mutex<usize>,
}

impl Tokens {
    fn issue(&self) -> String {
        let mut issued = self.issued.lock().unwrap();
        *issued += 1;
        let token = format!("example-token-{issued}");
        self.valid.lock().unwrap().insert(token.clone());
        token
    }

    fn is_valid(&self, token: &str) -> bool {
        self.valid.lock().unwrap().contains(token)
    }

    fn revoke_all(&self) {
        self.valid.lock().unwrap().clear();
    }

    fn issued(&self) -> usize {
        *self.issued.lock().unwrap()
    }
}

/// How a server answers a request, given the request's head and its whole body.
type Handler = Arc<dyn Fn(&http::request::Parts, &[u8]) -> Response<Full<Bytes>> + Send + Sync>;

/// The token endpoint: the client credentials grant for one client.
fn token_endpoint(tokens: &Arc<Tokens>) -> Handler {
    let tokens = Arc::clone(tokens);
    Arc::new(move |_parts, body| {
        let form = String::from_utf8_lossy(body);
        let field = |name: &str| {
            form.split('&')
                .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
                .map(str::to_owned)
        };
        let known_client = field("client_id").as_deref() == Some(CLIENT_ID)
            && field("client_secret").as_deref() == Some(CLIENT_SECRET);
        if field("grant_type").as_deref() != Some("client_credentials") || !known_client {
            return json(StatusCode::UNAUTHORIZED, r#"{"error":"invalid_client"}"#);
        }
        let token = tokens.issue();
        json(
            StatusCode::OK,
            &format!(r#"{{"access_token":"{token}","token_type":"Bearer","expires_in":3600}}"#),
        )
    })
}

/// The protected API: answers callers with a valid token, rejects the others with 401.
fn api(tokens: &Arc<Tokens>) -> Handler {
    let tokens = Arc::clone(tokens);
    Arc::new(move |parts, _body| {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        match token {
            Some(token) if tokens.is_valid(token) => json(StatusCode::OK, r#"{"orders":3}"#),
            _ => Response::builder()
                .status(StatusCode::UNAUTHORIZED)
                .header(header::WWW_AUTHENTICATE, r#"Bearer error="invalid_token""#)
                .body(Full::default())
                .expect("a valid response"),
        }
    })
}

fn json(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .expect("a valid response")
}

/// Serves `handler` over HTTPS (HTTP/1.1) on a new port of 127.0.0.1, until the process ends.
async fn serve_tls(tls: Arc<ServerConfig>, handler: Handler) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let acceptor = TlsAcceptor::from(tls);

    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, handler) = (acceptor.clone(), Arc::clone(&handler));
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(move |request: Request<Incoming>| {
                    let handler = Arc::clone(&handler);
                    async move {
                        let (parts, body) = request.into_parts();
                        let body = body.collect().await?.to_bytes();
                        Ok::<_, hyper::Error>(handler(&parts, &body))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(address)
}
