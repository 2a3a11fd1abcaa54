//! The HTTP client a source reaches its token endpoint with: any tower HTTP service, its type
//! erased; the default one; and, with the `rustls` feature, the HTTPS one and its roots.

#[cfg(feature = "rustls")]
use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::Body;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use tower::{util::BoxCloneSyncService, Service, ServiceExt};

use crate::{BoxError, Error};

/// A response body of any transport.
pub(super) type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// A transport with its type erased.
pub(super) type Transport =
    BoxCloneSyncService<Request<Full<Bytes>>, Response<ResponseBody>, BoxError>;

/// Erases the type of a tower HTTP service.
pub(super) fn erase<S, B>(service: S) -> Transport
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let service = service
        .map_response(|response: Response<B>| {
            response.map(|body| body.map_err(Into::into).boxed_unsync())
        })
        .map_err(Into::into);
    BoxCloneSyncService::new(service)
}

/// hyper-util's pooled HTTP/1 client without TLS.
#[cfg(feature = "hyper-client")]
fn plain_http_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
> {
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};

    Client::builder(TokioExecutor::new()).build_http()
}

/// The default transport for `token_url`, or why there is none.
///
/// A plain `http` URL gets hyper-util's HTTP/1 client without TLS: a source keeps its URL and
/// follows no redirect, so it never needs TLS, and no root store is loaded for it. With the
/// `rustls` feature an `https` URL gets an `HttpsTransport` with the roots of
/// `default_tls_config`.
#[cfg(feature = "hyper-client")]
pub(super) fn default_for(token_url: &Uri) -> Result<Transport, Error> {
    match token_url.scheme_str() {
        Some("http") => Ok(erase(plain_http_client())),
        #[cfg(feature = "rustls")]
        Some("https") => Ok(erase(HttpsTransport::new(default_tls_config()?))),
        #[cfg(feature = "rustls")]
        _ => Err(Error::config(
            "the default transport speaks https and http only",
        )),
        #[cfg(not(feature = "rustls"))]
        _ => Err(Error::config(
            "the default transport speaks plain http only; for an https token URL enable the \
             `rustls` feature or pass a TLS-capable client to transport()",
        )),
    }
}

/// The default transport for `token_url`, or why there is none.
#[cfg(not(feature = "hyper-client"))]
pub(super) fn default_for(_token_url: &Uri) -> Result<Transport, Error> {
    Err(Error::config(
        "no transport: pass one to transport() or enable the hyper-client feature",
    ))
}

/// Makes a transport that reaches token endpoints over HTTPS with `tls_config`, such as one
/// that trusts a private certificate authority; pass it to
/// [`ClientCredentialsBuilder::transport`](super::ClientCredentialsBuilder::transport).
///
/// The transport is hyper-util's pooled HTTP/1 client over rustls. It takes from `tls_config`
/// everything but the ALPN protocols: the roots, the certificate verifier, a client
/// certificate, the protocol versions and the crypto provider. Its ALPN list is emptied,
/// because the transport speaks HTTP/1.1 only, and hyper-rustls sets ALPN itself. It speaks
/// plain `http` too, for a token URL that the source accepts as such (a loopback host, or
/// [`allow_insecure_http`](super::ClientCredentialsBuilder::allow_insecure_http)). Redirects
/// are not followed. Cloning the transport is cheap and clones share one connection pool.
///
/// Without a transport of its own, a source with an `https` token URL uses one made with the
/// default configuration: the platform's root certificates, or the Mozilla roots compiled
/// into the crate when the platform has none; see the [module docs](super#https).
///
/// ```
/// use std::sync::Arc;
///
/// use rustls::pki_types::{pem::PemObject, CertificateDer};
/// use tower_token_refresh::source::oauth2::{https_transport, ClientCredentials};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// # let dir = tempfile::tempdir()?;
/// # let ca_file = dir.path().join("corp-ca.pem");
/// # let ca = rcgen::generate_simple_self_signed(["corp-ca.internal".to_owned()])?;
/// # std::fs::write(&ca_file, ca.cert.pem())?;
/// // Trust the company's certificate authority, and nothing else.
/// let mut roots = rustls::RootCertStore::empty();
/// for certificate in CertificateDer::pem_file_iter(&ca_file)? {
///     roots.add(certificate?)?;
/// }
/// let tls_config = rustls::ClientConfig::builder()
///     .with_root_certificates(roots)
///     .with_no_client_auth();
///
/// let source = ClientCredentials::builder(
///     "https://auth.corp.internal/oauth/token",
///     "reporting-service",
///     "s3cr3t",
/// )
/// .transport(https_transport(tls_config))
/// .build()?;
/// # let _ = source;
/// # Ok(())
/// # }
/// ```
#[cfg(feature = "rustls")]
#[cfg_attr(docsrs, doc(cfg(feature = "rustls")))]
pub fn https_transport(tls_config: impl Into<Arc<rustls::ClientConfig>>) -> HttpsTransport {
    HttpsTransport::new(tls_config.into())
}

/// A transport that reaches token endpoints over HTTPS; made by [`https_transport`].
///
/// A tower service from `http::Request<Full<Bytes>>` to `http::Response<hyper::body::Incoming>`,
/// so it can be wrapped in tower layers (a timeout, a concurrency limit, tracing) before it is
/// given to a source.
#[cfg(feature = "rustls")]
#[cfg_attr(docsrs, doc(cfg(feature = "rustls")))]
#[derive(Clone)]
pub struct HttpsTransport {
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Full<Bytes>,
    >,
}

#[cfg(feature = "rustls")]
impl HttpsTransport {
    fn new(tls_config: Arc<rustls::ClientConfig>) -> Self {
        use hyper_util::{client::legacy::Client, rt::TokioExecutor};

        // NOTE: hyper-rustls refuses a configuration with ALPN protocols (it sets them from the
        // HTTP versions it enables); an empty list announces HTTP/1.1, all this client speaks.
        // The clone shares the expensive parts (root store, verifier, session cache).
        let mut tls_config = Arc::unwrap_or_clone(tls_config);
        tls_config.alpn_protocols.clear();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config)
            .https_or_http()
            .enable_http1()
            .build();

        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }
}

#[cfg(feature = "rustls")]
impl Service<Request<Full<Bytes>>> for HttpsTransport {
    type Response = Response<hyper::body::Incoming>;
    type Error = BoxError;
    // NOTE: one allocation per token request, next to a TCP connection or at least a round
    // trip; it keeps hyper-util's and hyper-rustls's types out of this crate's public API.
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Service::<Request<Full<Bytes>>>::poll_ready(&mut self.client, cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
        let response = self.client.request(request);
        Box::pin(async move { response.await.map_err(Into::into) })
    }
}

#[cfg(feature = "rustls")]
impl fmt::Debug for HttpsTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpsTransport").finish_non_exhaustive()
    }
}

/// The TLS configuration of the default transport, built at its first use and shared by every
/// source of the process, because loading the platform's root certificates reads many files.
///
/// Roots: the platform's (on Linux the system bundle, which the `SSL_CERT_FILE` and
/// `SSL_CERT_DIR` environment variables override), or, when the platform has no usable root
/// certificate (a minimal container image), the Mozilla roots of the `webpki-roots` crate.
/// The two are not combined: a root that an administrator removed from the platform store
/// stays untrusted. Crypto: the process-wide rustls provider when one is installed, ring
/// otherwise.
#[cfg(feature = "rustls")]
fn default_tls_config() -> Result<Arc<rustls::ClientConfig>, Error> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, Error>> = OnceLock::new();

    CONFIG.get_or_init(build_default_tls_config).clone()
}

#[cfg(feature = "rustls")]
fn build_default_tls_config() -> Result<Arc<rustls::ClientConfig>, Error> {
    use hyper_rustls::ConfigBuilderExt;
    use rustls::{crypto::CryptoProvider, ClientConfig};

    // NOTE: rustls marks its ring provider deprecated because ring offers no post-quantum key
    // exchange. It stays the fallback because it builds with no C toolchain beyond the
    // system's; an application that wants post-quantum key exchange installs a provider that
    // has it (aws-lc-rs) process-wide, and that provider is the one used here.
    #[allow(deprecated)]
    let fallback = rustls::crypto::ring::default_provider;
    let provider = CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(fallback()));
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| {
            Error::config("the rustls crypto provider supports no safe TLS version")
                .with_source(err)
        })?;

    let builder = match builder.clone().with_native_roots() {
        Ok(builder) => {
            tracing::debug!(roots = "platform", "default TLS configuration built");
            builder
        }
        Err(err) => {
            // NOTE: an operator who points SSL_CERT_FILE or SSL_CERT_DIR at a trust store
            // expects it to be used; falling back silently would hide the mistake.
            if std::env::var_os("SSL_CERT_FILE").is_some()
                || std::env::var_os("SSL_CERT_DIR").is_some()
            {
                tracing::warn!(
                    reason = %err,
                    "SSL_CERT_FILE or SSL_CERT_DIR is set but gave no usable root certificate; \
                     using the compiled-in Mozilla roots"
                );
            } else {
                tracing::debug!(
                    roots = "webpki",
                    reason = %err,
                    "default TLS configuration built; the platform has no root certificates"
                );
            }
            builder.with_webpki_roots()
        }
    };
    Ok(Arc::new(builder.with_no_client_auth()))
}

/// Why a response body could not be read.
pub(super) enum ReadError {
    /// The body is longer than the limit.
    TooLarge,
    /// The body broke off.
    Body(BoxError),
}

/// Reads a whole body, refusing one longer than `limit` bytes without reading on.
pub(super) async fn read_body(mut body: ResponseBody, limit: usize) -> Result<Vec<u8>, ReadError> {
    let limit_u64 = u64::try_from(limit).unwrap_or(u64::MAX);
    if body.size_hint().lower() > limit_u64 {
        return Err(ReadError::TooLarge);
    }

    let mut collected = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ReadError::Body)?;
        if let Ok(data) = frame.into_data() {
            if collected.len() + data.len() > limit {
                return Err(ReadError::TooLarge);
            }
            collected.extend_from_slice(&data);
        }
    }
    Ok(collected)
}

#[cfg(test)]
pub(super) mod tests {
    use std::{
        collections::VecDeque,
        convert::Infallible,
        pin::Pin,
        task::{Context, Poll},
    };

    use http_body::Frame;

    use super::*;

    /// A body that arrives in the given pieces and does not tell its length up front.
    pub(crate) struct Chunks(pub(crate) VecDeque<Result<Bytes, BoxError>>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(
                self.get_mut()
                    .0
                    .pop_front()
                    .map(|chunk| chunk.map(Frame::data)),
            )
        }
    }

    pub(crate) fn chunks<const N: usize>(pieces: [&'static str; N]) -> Chunks {
        Chunks(
            pieces
                .into_iter()
                .map(|piece| Ok(Bytes::from(piece)))
                .collect(),
        )
    }

    fn boxed(body: impl Body<Data = Bytes, Error = BoxError> + Send + 'static) -> ResponseBody {
        body.boxed_unsync()
    }

    #[tokio::test]
    async fn read_body_joins_the_chunks() {
        let body = boxed(chunks(["{\"a\":", "1}"]));

        let read = read_body(body, 64).await;

        assert_eq!(read.ok().as_deref(), Some(&b"{\"a\":1}"[..]));
    }

    #[tokio::test]
    async fn read_body_accepts_exactly_the_limit() {
        let body = boxed(chunks(["12345", "678"]));

        let read = read_body(body, 8).await;

        assert_eq!(read.ok().map(|body| body.len()), Some(8));
    }

    #[tokio::test]
    async fn read_body_refuses_a_streamed_body_over_the_limit() {
        let body = boxed(chunks(["12345", "6789"]));

        let read = read_body(body, 8).await;

        assert!(matches!(read, Err(ReadError::TooLarge)));
    }

    #[tokio::test]
    async fn read_body_refuses_a_body_announced_over_the_limit_without_reading_it() {
        let body = Full::new(Bytes::from_static(b"123456789"))
            .map_err(|never: Infallible| match never {})
            .boxed_unsync();

        let read = read_body(body, 8).await;

        assert!(matches!(read, Err(ReadError::TooLarge)));
    }

    #[tokio::test]
    async fn read_body_reports_a_broken_body() {
        let body = boxed(Chunks(VecDeque::from([
            Ok(Bytes::from_static(b"{")),
            Err(BoxError::from("connection reset")),
        ])));

        let read = read_body(body, 64).await;

        assert!(matches!(read, Err(ReadError::Body(err)) if err.to_string() == "connection reset"));
    }

    #[cfg(all(feature = "hyper-client", not(feature = "rustls")))]
    #[test]
    fn default_for_refuses_an_https_url_and_names_the_rustls_feature() {
        let url = Uri::from_static("https://auth.example.com/token");

        let refusal = default_for(&url).err();

        let err = refusal.expect("a refusal");
        assert!(err.is_config());
        assert!(err.to_string().contains("`rustls` feature"), "{err}");
    }

    #[cfg(feature = "rustls")]
    #[test]
    fn default_for_serves_an_https_url_with_the_rustls_feature() {
        let url = Uri::from_static("https://auth.example.com/token");

        assert!(default_for(&url).is_ok());
    }

    #[cfg(feature = "hyper-client")]
    #[test]
    fn default_for_refuses_other_schemes() {
        let url = Uri::from_static("ftp://auth.example.com/token");

        let refusal = default_for(&url).err();

        assert!(refusal.is_some_and(|err| err.is_config()));
    }

    #[cfg(feature = "rustls")]
    #[test]
    fn default_tls_config_is_built_once_and_shared() {
        let first = default_tls_config().expect("a TLS configuration");
        let second = default_tls_config().expect("a TLS configuration");

        assert!(Arc::ptr_eq(&first, &second));
        assert!(first.alpn_protocols.is_empty());
    }

    #[cfg(feature = "rustls")]
    #[test]
    fn https_transport_is_a_clone_send_sync_service_and_hides_its_insides() {
        fn assert_transport<T: Clone + Send + Sync + 'static>(_: &T) {}

        let transport = https_transport(default_tls_config().expect("a TLS configuration"));

        assert_transport(&transport);
        assert_eq!(format!("{transport:?}"), "HttpsTransport { .. }");
    }
}
