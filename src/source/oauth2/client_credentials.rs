//! The client credentials grant (RFC 6749 §4.4): a confidential client asks for a token in its
//! own name.

use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, Uri};
use http_body::Body;
use http_body_util::Full;
use tower::Service;

use super::{
    config::{EndpointConfig, Grant},
    endpoint::{Endpoint, Exchange},
    request::ClientAuth,
    transport,
};
use crate::{BoxError, Error, Token, TokenSource};

/// The grant: nothing is sent per fetch.
const GRANT: Grant = Grant {
    grant_type: "client_credentials",
    per_fetch_params: &[],
    retry_unanswered: true,
};

/// A token source for the OAuth2 client credentials grant (RFC 6749 §4.4).
///
/// Built with [`ClientCredentials::builder`]; see the [module docs](super) for the request it
/// sends, how it reads the answer and when it retries. Cloning is cheap and clones share the
/// transport. `Debug` never shows the client secret.
#[derive(Clone)]
pub struct ClientCredentials {
    endpoint: Arc<Endpoint>,
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
            config: EndpointConfig::new(token_url, client_id.into(), Some(client_secret.into())),
        }
    }

    /// The token endpoint's URL.
    pub fn token_url(&self) -> &Uri {
        self.endpoint.token_url()
    }

    /// The client id.
    pub fn client_id(&self) -> &str {
        &self.endpoint.client_id
    }

    /// The scopes asked for, in the order they are sent.
    pub fn scopes(&self) -> &[String] {
        &self.endpoint.scopes
    }
}

impl TokenSource for ClientCredentials {
    async fn fetch(&self, _previous: Option<&Token>) -> Result<Token, Error> {
        let endpoint = &*self.endpoint;
        endpoint
            .fetch(Exchange {
                params: &[],
                guard: &endpoint.guard,
                scopes_if_omitted: &endpoint.scopes,
                rotated: None,
            })
            .await
    }
}

impl fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ClientCredentials");
        self.endpoint.debug_fields(&mut d);
        d.finish_non_exhaustive()
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
/// .timeout(Duration::from_secs(3));
/// # let _ = builder;
/// ```
#[must_use = "a builder does nothing until `build` is called"]
pub struct ClientCredentialsBuilder {
    config: EndpointConfig,
}

impl ClientCredentialsBuilder {
    /// How the client authenticates itself. Default: [`ClientAuth::Basic`].
    pub fn client_auth(mut self, client_auth: ClientAuth) -> Self {
        self.config.set_client_auth(client_auth);
        self
    }

    /// Asks for a scope. Each call adds to the scopes asked for; a string holding spaces adds
    /// each of its words. Default: no `scope` parameter, the server's default scopes.
    ///
    /// A token whose response names no scopes is taken to have the ones asked for.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.config.add_scope(&scope.into());
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
        self.config.add_param(name.into(), value.into());
        self
    }

    /// Adds a header to every token request. It replaces a header of the same name that the
    /// request would otherwise carry (`accept`, `content-type`, and with
    /// [`ClientAuth::Basic`] `authorization`); several calls with one name send every value.
    /// Default: none.
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.config.add_header(name, value);
        self
    }

    /// Sends token requests through this HTTP client: any tower service from
    /// `http::Request<Full<Bytes>>` to `http::Response` of any body, such as a hyper-util
    /// client with a TLS connector, wrapped in proxies, timeouts or tracing.
    ///
    /// Default: with the `hyper-client` feature, hyper-util's HTTP/1 client, which speaks
    /// plain HTTP and so suits a token endpoint on a loopback address; with the `rustls`
    /// feature it speaks HTTPS too, trusting the platform's root certificates (see
    /// [HTTPS](super#https)). Without either, a transport must be given.
    pub fn transport<S, B>(mut self, transport: S) -> Self
    where
        S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        self.config.set_transport(transport::erase(transport));
        self
    }

    /// Gives up on one attempt of a token request after this long, sending and reading the
    /// answer included, with an error for which [`Error::is_timeout`] is true; the attempt is
    /// retried like a connection failure. Default: no limit of its own; the refresh timeout
    /// of the layer bounds every fetch.
    ///
    /// See [the module docs](super#transport-timeouts-and-retries) for how this, the retry
    /// budget and the layer's refresh timeout fit together.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config.set_timeout(timeout);
        self
    }

    /// How many attempts one fetch makes at most, the first included, when the token
    /// endpoint fails in a way that may mend itself (connection errors, timeouts, 5xx, 408,
    /// 429). `1` switches retries off. Default: 3.
    ///
    /// [`build`](Self::build) refuses `0`.
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.config.set_max_attempts(max_attempts);
        self
    }

    /// A retry starts only if it can start within this long after the fetch began; a
    /// `Retry-After` that asks for a longer wait ends the fetch with the error at once.
    /// Default: 5 seconds, half the layer's default refresh timeout.
    ///
    /// Keep it below the layer's [`refresh_timeout`](crate::RefreshLayer::refresh_timeout),
    /// which ends the whole fetch, retries included, with a plain timeout error.
    pub fn retry_budget(mut self, budget: Duration) -> Self {
        self.config.set_retry_budget(budget);
        self
    }

    /// Allows a plain `http://` token URL to a host that is not a loopback address, which
    /// sends the client secret unencrypted (R10). Default: `false`.
    ///
    /// A loopback host (`localhost`, `127.0.0.0/8`, `[::1]`) is always allowed.
    pub fn allow_insecure_http(mut self, allow: bool) -> Self {
        self.config.set_allow_insecure_http(allow);
        self
    }

    /// Checks the configuration and builds the source.
    ///
    /// # Errors
    ///
    /// An error for which [`Error::is_config`] is true when the token URL is not an absolute
    /// `https` or `http` URL, holds user info, or is plain `http` to a host that is not a
    /// loopback address without [`allow_insecure_http`](Self::allow_insecure_http); when the
    /// client id is empty; when an extra parameter repeats one the source sends; when
    /// [`max_attempts`](Self::max_attempts) is 0; and when no transport is given and the
    /// default one cannot reach the URL (it speaks no TLS without the `rustls` feature) or is not compiled in (the
    /// `hyper-client` feature is off).
    pub fn build(self) -> Result<ClientCredentials, Error> {
        Ok(ClientCredentials {
            endpoint: Arc::new(self.config.build(&GRANT)?),
        })
    }
}

impl fmt::Debug for ClientCredentialsBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ClientCredentialsBuilder");
        self.config.debug_fields(&mut d);
        d.finish()
    }
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

    #[cfg(all(feature = "hyper-client", not(feature = "rustls")))]
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
