//! The client credentials grant (RFC 6749 §4.4): a confidential client asks for a token in its
//! own name.

use std::{fmt, net::IpAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, Uri};
use http_body::Body;
use http_body_util::Full;
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use super::{
    request::{basic_credentials, form_urlencode, ClientAuth, TokenRequest},
    response::{parse_token_response, ResponseContext, SecretGuard},
    transport::{self, ReadError, Transport},
};
use crate::{BoxError, Error, Token, TokenSource};

/// The largest token endpoint answer that is read; longer ones are refused.
const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// The grant type, as sent and as logged.
const GRANT_TYPE: &str = "client_credentials";

/// A token source for the OAuth2 client credentials grant (RFC 6749 §4.4).
///
/// Built with [`ClientCredentials::builder`]; see the [module docs](super) for the request it
/// sends and how it reads the answer. Cloning is cheap and clones share the transport. `Debug`
/// never shows the client secret.
#[derive(Clone)]
pub struct ClientCredentials {
    inner: Arc<Inner>,
}

struct Inner {
    request: TokenRequest,
    transport: Transport,
    client_id: String,
    client_auth: ClientAuth,
    scopes: Vec<String>,
    timeout: Option<Duration>,
    guard: SecretGuard,
}

impl ClientCredentials {
    /// Starts building a source that asks the token endpoint at `token_url` for tokens, as
    /// the client `client_id` with the secret `client_secret`.
    ///
    /// The URL is checked by [`ClientCredentialsBuilder::build`].
    pub fn builder<U>(
        token_url: U,
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
    ) -> ClientCredentialsBuilder
    where
        U: TryInto<Uri>,
        U::Error: Into<BoxError>,
    {
        ClientCredentialsBuilder {
            token_url: token_url.try_into().map_err(Into::into),
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            client_auth: ClientAuth::default(),
            scopes: Vec::new(),
            params: Vec::new(),
            headers: HeaderMap::new(),
            transport: None,
            timeout: None,
            allow_insecure_http: false,
        }
    }

    /// The token endpoint's URL.
    pub fn token_url(&self) -> &Uri {
        self.inner.request.uri()
    }

    /// The client id.
    pub fn client_id(&self) -> &str {
        &self.inner.client_id
    }

    /// The scopes asked for, in the order they are sent.
    pub fn scopes(&self) -> &[String] {
        &self.inner.scopes
    }
}

impl TokenSource for ClientCredentials {
    async fn fetch(&self, _previous: Option<&Token>) -> Result<Token, Error> {
        let inner = &*self.inner;
        let request = inner.request.to_http();
        let host = inner.request.uri().host().unwrap_or_default();

        let sent_at = Instant::now();
        let outcome = match inner.timeout {
            Some(limit) => tokio::time::timeout(limit, inner.exchange(request, sent_at))
                .await
                .unwrap_or_else(|_elapsed| Err(Error::timeout())),
            None => inner.exchange(request, sent_at).await,
        };

        let elapsed = sent_at.elapsed();
        match &outcome {
            Ok(token) => tracing::debug!(
                host,
                grant_type = GRANT_TYPE,
                ?elapsed,
                expires_in = ?token.expires_in(),
                "token request succeeded"
            ),
            Err(err) => tracing::debug!(
                host,
                grant_type = GRANT_TYPE,
                ?elapsed,
                status = err.status().map(|status| status.as_u16()),
                terminal = err.is_terminal(),
                error = %err,
                "token request failed"
            ),
        }
        outcome
    }
}

impl Inner {
    /// Sends the request and reads the answer.
    async fn exchange(
        &self,
        request: Request<Full<Bytes>>,
        sent_at: Instant,
    ) -> Result<Token, Error> {
        let response = self
            .transport
            .clone()
            .oneshot(request)
            .await
            .map_err(Error::transport)?;

        let (parts, body) = response.into_parts();
        let body = transport::read_body(body, MAX_RESPONSE_BODY)
            .await
            .map_err(|err| match err {
                ReadError::TooLarge => {
                    Error::invalid_response(parts.status, None, "response body larger than 64 KiB")
                }
                ReadError::Body(err) => Error::transport(err),
            })?;

        let cx = ResponseContext {
            sent_at,
            requested_scopes: &self.scopes,
            guard: &self.guard,
        };
        parse_token_response(parts.status, &body, &cx)
    }
}

impl fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &*self.inner;
        f.debug_struct("ClientCredentials")
            .field("token_url", inner.request.uri())
            .field("client_id", &inner.client_id)
            .field("client_secret", &"[redacted]")
            .field("client_auth", &inner.client_auth)
            .field("scopes", &inner.scopes)
            .field("timeout", &inner.timeout)
            .finish_non_exhaustive()
    }
}

/// Configures a [`ClientCredentials`] source; made by [`ClientCredentials::builder`].
///
/// ```
/// use std::time::Duration;
/// use tower_token_refresh::source::oauth2::{ClientAuth, ClientCredentials};
///
/// let builder = ClientCredentials::builder(
///     "https://auth.example.com/oauth/token",
///     "reporting-service",
///     "s3cr3t",
/// )
/// .client_auth(ClientAuth::RequestBody)
/// .scopes(["reports:read", "reports:write"])
/// .audience("https://api.example.com")
/// .timeout(Duration::from_secs(10));
/// # let _ = builder;
/// ```
#[must_use = "a builder does nothing until `build` is called"]
pub struct ClientCredentialsBuilder {
    token_url: Result<Uri, BoxError>,
    client_id: String,
    client_secret: String,
    client_auth: ClientAuth,
    scopes: Vec<String>,
    params: Vec<(String, String)>,
    headers: HeaderMap,
    transport: Option<Transport>,
    timeout: Option<Duration>,
    allow_insecure_http: bool,
}

impl ClientCredentialsBuilder {
    /// How the client authenticates itself. Default: [`ClientAuth::Basic`].
    pub fn client_auth(mut self, client_auth: ClientAuth) -> Self {
        self.client_auth = client_auth;
        self
    }

    /// Asks for a scope. Each call adds to the scopes asked for; a string holding spaces adds
    /// each of its words. Default: no `scope` parameter, the server's default scopes.
    ///
    /// A token whose response names no scopes is taken to have the ones asked for.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        let scope = scope.into();
        self.scopes
            .extend(scope.split_ascii_whitespace().map(String::from));
        self
    }

    /// Asks for several scopes; the same as calling [`scope`](Self::scope) for each.
    /// Default: none.
    pub fn scopes<I>(self, scopes: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        scopes.into_iter().fold(self, Self::scope)
    }

    /// Adds an `audience` parameter, as Auth0 and RFC 8693 servers expect it. Each call adds
    /// one. Default: none.
    pub fn audience(self, audience: impl Into<String>) -> Self {
        self.param("audience", audience)
    }

    /// Adds a `resource` parameter, the resource indicator of RFC 8707. Each call adds one.
    /// Default: none.
    pub fn resource(self, resource: impl Into<String>) -> Self {
        self.param("resource", resource)
    }

    /// Adds any form parameter to the token request, after the ones the source sends itself.
    /// Each call adds one. Default: none.
    ///
    /// [`build`](Self::build) refuses a parameter that would repeat one the source sends:
    /// `grant_type` and `client_secret` always, `client_id` with
    /// [`ClientAuth::RequestBody`], and `scope` when scopes were asked for.
    pub fn param(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.params.push((name.into(), value.into()));
        self
    }

    /// Adds a header to every token request. It replaces a header of the same name that the
    /// request would otherwise carry (`accept`, `content-type`, and with
    /// [`ClientAuth::Basic`] `authorization`); several calls with one name send every value.
    /// Default: none.
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.append(name, value);
        self
    }

    /// Sends token requests through this HTTP client: any tower service from
    /// `http::Request<Full<Bytes>>` to `http::Response` of any body, such as a hyper-util
    /// client with a TLS connector, wrapped in proxies, timeouts or tracing.
    ///
    /// Default: with the `hyper-client` feature, hyper-util's HTTP/1 client, which speaks
    /// plain HTTP only and therefore suits only a token endpoint on a loopback address.
    /// Without the feature, a transport must be given.
    pub fn transport<S, B>(mut self, transport: S) -> Self
    where
        S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        self.transport = Some(transport::erase(transport));
        self
    }

    /// Gives up on a token request after this long, with an error for which
    /// [`Error::is_timeout`] is true. Default: no limit of its own; the refresh timeout of
    /// the layer bounds every fetch.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Allows a plain `http://` token URL to a host that is not a loopback address, which
    /// sends the client secret unencrypted (R10). Default: `false`.
    ///
    /// A loopback host (`localhost`, `127.0.0.0/8`, `[::1]`) is always allowed.
    pub fn allow_insecure_http(mut self, allow: bool) -> Self {
        self.allow_insecure_http = allow;
        self
    }

    /// Checks the configuration and builds the source.
    ///
    /// # Errors
    ///
    /// An error for which [`Error::is_config`] is true when the token URL is not an absolute
    /// `https` or `http` URL, holds user info, or is plain `http` to a host that is not a
    /// loopback address without [`allow_insecure_http`](Self::allow_insecure_http); when the
    /// client id is empty; when an extra parameter repeats one the source sends; and when no
    /// transport is given and the default one cannot reach the URL (it speaks no TLS) or is
    /// not compiled in (the `hyper-client` feature is off).
    pub fn build(self) -> Result<ClientCredentials, Error> {
        if self.client_id.is_empty() {
            return Err(Error::config("client id is empty"));
        }
        self.check_params()?;
        let token_url = self
            .token_url
            .map_err(|err| Error::config("invalid token URL").with_source(err))?;
        check_token_url(&token_url, self.allow_insecure_http)?;
        let transport = match self.transport {
            Some(transport) => transport,
            None => transport::default_for(&token_url)?,
        };

        let mut params = Vec::with_capacity(self.params.len() + 1);
        if !self.scopes.is_empty() {
            params.push(("scope".to_owned(), self.scopes.join(" ")));
        }
        params.extend(self.params);
        let request = TokenRequest::client_credentials(
            token_url,
            &self.client_id,
            &self.client_secret,
            self.client_auth,
            &params,
            &self.headers,
        );
        let guard = SecretGuard::new([
            form_urlencode(&self.client_secret),
            basic_credentials(&self.client_id, &self.client_secret),
            self.client_secret,
        ]);

        Ok(ClientCredentials {
            inner: Arc::new(Inner {
                request,
                transport,
                client_id: self.client_id,
                client_auth: self.client_auth,
                scopes: self.scopes,
                timeout: self.timeout,
                guard,
            }),
        })
    }

    fn check_params(&self) -> Result<(), Error> {
        for (name, _) in &self.params {
            let repeats = match name.as_str() {
                "" => return Err(Error::config("parameter name is empty")),
                "grant_type" | "client_secret" => true,
                "client_id" => self.client_auth == ClientAuth::RequestBody,
                "scope" => !self.scopes.is_empty(),
                _ => false,
            };
            if repeats {
                return Err(Error::config(
                    "parameter repeats one the token source sends",
                ));
            }
        }
        Ok(())
    }
}

impl fmt::Debug for ClientCredentialsBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let param_names: Vec<_> = self.params.iter().map(|(name, _)| name).collect();
        // NOTE: user info in the URL is refused by `build`, but may be a password until then.
        let token_url = self.token_url.as_ref().ok().map(|url| {
            if has_user_info(url) {
                "[redacted: holds user info]".to_owned()
            } else {
                url.to_string()
            }
        });
        f.debug_struct("ClientCredentialsBuilder")
            .field("token_url", &token_url)
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("client_auth", &self.client_auth)
            .field("scopes", &self.scopes)
            .field("param_names", &param_names)
            .field("header_names", &self.headers.keys().collect::<Vec<_>>())
            .field("custom_transport", &self.transport.is_some())
            .field("timeout", &self.timeout)
            .field("allow_insecure_http", &self.allow_insecure_http)
            .finish()
    }
}

/// Refuses token URLs that cannot work or would leak the client secret.
fn check_token_url(url: &Uri, allow_insecure_http: bool) -> Result<(), Error> {
    let Some(authority) = url.authority() else {
        return Err(Error::config("token URL is not absolute"));
    };
    if has_user_info(url) {
        return Err(Error::config("token URL must not contain user info"));
    }

    match url.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if allow_insecure_http || is_loopback(authority.host()) => Ok(()),
        Some("http") => Err(Error::config(
            "token URL is plain http to a non-loopback host; the client secret would travel \
             unencrypted (see allow_insecure_http)",
        )),
        _ => Err(Error::config("token URL scheme is neither https nor http")),
    }
}

fn has_user_info(url: &Uri) -> bool {
    url.authority()
        .is_some_and(|authority| authority.as_str().contains('@'))
}

/// Returns true for `localhost`, `127.0.0.0/8` and `[::1]`; names are not resolved.
fn is_loopback(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let literal = host
        .strip_prefix('[')
        .and_then(|host| host.strip_suffix(']'))
        .unwrap_or(host);
    literal.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    trait WithUnusedTransport {
        fn with_unused_transport(self) -> Self;
    }

    impl WithUnusedTransport for ClientCredentialsBuilder {
        /// A transport that is never called: these tests only build.
        fn with_unused_transport(self) -> Self {
            self.transport(tower::service_fn(|_request: Request<Full<Bytes>>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            }))
        }
    }

    fn build(url: &str) -> Result<ClientCredentials, Error> {
        ClientCredentials::builder(url, "id", "secret")
            .with_unused_transport()
            .build()
    }

    fn assert_config_error(result: Result<ClientCredentials, Error>, what: &str) {
        match result {
            Err(err) => assert!(err.is_config() && err.is_terminal(), "{what}: {err:?}"),
            Ok(source) => panic!("{what}: built {source:?}"),
        }
    }

    #[test]
    fn https_token_url_is_accepted() {
        let source = build("https://auth.example.com:8443/oauth/token?tenant=a").expect("a source");

        assert_eq!(
            source.token_url(),
            "https://auth.example.com:8443/oauth/token?tenant=a"
        );
        assert_eq!(source.client_id(), "id");
    }

    #[test]
    fn token_url_may_be_given_as_a_uri() {
        let url = Uri::from_static("https://auth.example.com/token");

        let source = ClientCredentials::builder(url, "id", "secret")
            .with_unused_transport()
            .build();

        assert!(source.is_ok());
    }

    #[test]
    fn r10_plain_http_to_a_remote_host_is_refused() {
        for url in [
            "http://auth.example.com/token",
            "http://10.0.0.1/token",
            "http://localhost.example.com/token",
            "http://127.0.0.1.nip.io/token",
            "http://[::ffff:127.0.0.1]/token",
            "http://[2001:db8::1]/token",
        ] {
            assert_config_error(build(url), url);
        }
    }

    #[test]
    fn r10_refusal_says_why() {
        let err = build("http://auth.example.com/token").expect_err("a refusal");

        assert_eq!(
            err.to_string(),
            "invalid configuration: token URL is plain http to a non-loopback host; the client \
             secret would travel unencrypted (see allow_insecure_http)"
        );
    }

    #[test]
    fn r10_plain_http_to_a_loopback_host_is_accepted() {
        for url in [
            "http://localhost/token",
            "http://LocalHost:8080/token",
            "http://127.0.0.1:8080/token",
            "http://127.10.20.30/token",
            "http://[::1]:9000/token",
        ] {
            assert!(build(url).is_ok(), "{url}");
        }
    }

    #[test]
    fn r10_plain_http_to_a_remote_host_is_accepted_when_allowed() {
        let source = ClientCredentials::builder("http://auth.internal/token", "id", "secret")
            .allow_insecure_http(true)
            .with_unused_transport()
            .build();

        assert!(source.is_ok());
    }

    #[test]
    fn unusable_token_urls_are_refused() {
        for url in [
            "not a url",
            "",
            "/oauth/token",
            "auth.example.com/token",
            "ftp://auth.example.com/token",
            "https://user:pass@auth.example.com/token",
        ] {
            assert_config_error(build(url), url);
        }
    }

    #[test]
    fn builder_debug_hides_user_info_of_the_token_url() {
        let builder =
            ClientCredentials::builder("https://user:pa55word@auth.example.com/t", "id", "s");

        let debug = format!("{builder:?}");

        assert!(!debug.contains("pa55word"), "{debug}");
        assert!(debug.contains("[redacted: holds user info]"), "{debug}");
    }

    #[test]
    fn empty_client_id_is_refused() {
        let result = ClientCredentials::builder("https://auth.example.com/token", "", "secret")
            .with_unused_transport()
            .build();

        assert_config_error(result, "empty client id");
    }

    #[test]
    fn empty_client_secret_is_allowed() {
        let result = ClientCredentials::builder("https://auth.example.com/token", "id", "")
            .with_unused_transport()
            .build();

        assert!(result.is_ok());
    }

    #[test]
    fn params_that_repeat_what_the_source_sends_are_refused() {
        let base = || {
            ClientCredentials::builder("https://auth.example.com/token", "id", "secret")
                .with_unused_transport()
        };

        assert_config_error(base().param("grant_type", "password").build(), "grant_type");
        assert_config_error(base().param("client_secret", "x").build(), "client_secret");
        assert_config_error(
            base()
                .client_auth(ClientAuth::RequestBody)
                .param("client_id", "x")
                .build(),
            "client_id with RequestBody",
        );
        assert_config_error(base().scope("a").param("scope", "b").build(), "scope twice");
        assert_config_error(base().param("", "x").build(), "empty name");
    }

    #[test]
    fn params_that_do_not_repeat_are_accepted() {
        let base = || {
            ClientCredentials::builder("https://auth.example.com/token", "id", "secret")
                .with_unused_transport()
        };

        assert!(
            base().param("client_id", "id").build().is_ok(),
            "client_id with Basic"
        );
        assert!(
            base().param("scope", "a b").build().is_ok(),
            "scope without .scope()"
        );
    }

    #[test]
    fn scope_splits_on_spaces_and_skips_empty_words() {
        let source = ClientCredentials::builder("https://auth.example.com/token", "id", "secret")
            .scope(" read  write ")
            .scope("")
            .scopes(["admin"])
            .with_unused_transport()
            .build()
            .expect("a source");

        assert_eq!(source.scopes(), ["read", "write", "admin"]);
    }

    #[test]
    fn is_loopback_knows_only_literal_loopback_hosts() {
        assert!(is_loopback("localhost"));
        assert!(is_loopback("127.0.0.1"));
        assert!(is_loopback("127.255.255.254"));
        assert!(is_loopback("[::1]"));

        assert!(!is_loopback("localhost."));
        assert!(!is_loopback("128.0.0.1"));
        assert!(!is_loopback("[::2]"));
    }

    #[cfg(feature = "hyper-client")]
    #[test]
    fn default_transport_refuses_an_https_token_url() {
        let result =
            ClientCredentials::builder("https://auth.example.com/token", "id", "secret").build();

        let err = result.expect_err("a refusal");
        assert!(err.is_config());
        assert!(err.to_string().contains("TLS"), "{err}");
    }

    #[cfg(feature = "hyper-client")]
    #[test]
    fn default_transport_serves_a_loopback_http_token_url() {
        let result =
            ClientCredentials::builder("http://127.0.0.1:8080/token", "id", "secret").build();

        assert!(result.is_ok());
    }

    #[cfg(not(feature = "hyper-client"))]
    #[test]
    fn without_the_hyper_client_feature_a_transport_is_required() {
        let result =
            ClientCredentials::builder("http://127.0.0.1:8080/token", "id", "secret").build();

        assert!(result.expect_err("a refusal").is_config());
    }
}
