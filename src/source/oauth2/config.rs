//! What both grants' builders configure: the token endpoint, the client, the extras of the
//! request, the transport, time limits and retries; and the checks `build` makes.
//!
//! Each public builder keeps its own setters, documented for its grant, and forwards them
//! here; everything they have in common is decided in this file once.

use std::{fmt, net::IpAddr, time::Duration};

use http::{HeaderMap, HeaderName, HeaderValue, Uri};

use super::{
    endpoint::Endpoint,
    request::{basic_credentials, form_urlencode, ClientAuth, TokenRequest},
    response::SecretGuard,
    retry::RetryPolicy,
    transport::{self, Transport},
};
use crate::{BoxError, Error};

/// What sets a grant apart in the request it sends.
pub(super) struct Grant {
    /// The `grant_type` parameter, also logged.
    pub(super) grant_type: &'static str,
    /// Parameters the source sends itself on each fetch, which users may not add again.
    pub(super) per_fetch_params: &'static [&'static str],
    /// Whether an attempt that got no answer (a timeout, a broken connection) may be tried
    /// again. Not for a grant that spends a credential: the server may have used it up.
    pub(super) retry_unanswered: bool,
}

/// The configuration both builders share.
pub(super) struct EndpointConfig {
    token_url: Result<Uri, BoxError>,
    client_id: String,
    /// `None` for a public client.
    client_secret: Option<String>,
    client_auth: ClientAuth,
    scopes: Vec<String>,
    params: Vec<(String, String)>,
    headers: HeaderMap,
    transport: Option<Transport>,
    timeout: Option<Duration>,
    allow_insecure_http: bool,
    retry: RetryPolicy,
}

impl EndpointConfig {
    pub(super) fn new<U>(token_url: U, client_id: String, client_secret: Option<String>) -> Self
    where
        U: TryInto<Uri>,
        U::Error: Into<BoxError>,
    {
        Self {
            token_url: token_url.try_into().map_err(Into::into),
            client_id,
            client_secret,
            client_auth: ClientAuth::default(),
            scopes: Vec::new(),
            params: Vec::new(),
            headers: HeaderMap::new(),
            transport: None,
            timeout: None,
            allow_insecure_http: false,
            retry: RetryPolicy::default(),
        }
    }

    pub(super) fn set_client_secret(&mut self, client_secret: String) {
        self.client_secret = Some(client_secret);
    }

    pub(super) fn set_client_auth(&mut self, client_auth: ClientAuth) {
        self.client_auth = client_auth;
    }

    /// Adds each word of `scope`.
    pub(super) fn add_scope(&mut self, scope: &str) {
        self.scopes
            .extend(scope.split_ascii_whitespace().map(String::from));
    }

    pub(super) fn add_param(&mut self, name: String, value: String) {
        self.params.push((name, value));
    }

    pub(super) fn add_header(&mut self, name: HeaderName, value: HeaderValue) {
        self.headers.append(name, value);
    }

    pub(super) fn set_transport(&mut self, transport: Transport) {
        self.transport = Some(transport);
    }

    pub(super) fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = Some(timeout);
    }

    pub(super) fn set_allow_insecure_http(&mut self, allow: bool) {
        self.allow_insecure_http = allow;
    }

    pub(super) fn set_max_attempts(&mut self, max_attempts: u32) {
        self.retry.max_attempts = max_attempts;
    }

    pub(super) fn set_retry_budget(&mut self, budget: Duration) {
        self.retry.budget = budget;
    }

    /// Checks the configuration and builds the endpoint of `grant`.
    ///
    /// The checks are listed in the `# Errors` sections of both builders' `build`.
    pub(super) fn build(self, grant: &Grant) -> Result<Endpoint, Error> {
        if self.client_id.is_empty() {
            return Err(Error::config("client id is empty"));
        }
        if self.retry.max_attempts == 0 {
            return Err(Error::config("max_attempts must be at least 1"));
        }
        self.check_params(grant)?;
        let token_url = self
            .token_url
            .map_err(|err| Error::config("invalid token URL").with_source(err))?;
        check_token_url(
            &token_url,
            self.allow_insecure_http,
            self.client_secret.is_some(),
        )?;
        let transport = match self.transport {
            Some(transport) => transport,
            None => transport::default_for(&token_url)?,
        };

        let mut params = Vec::with_capacity(self.params.len() + 1);
        if !self.scopes.is_empty() {
            params.push(("scope".to_owned(), self.scopes.join(" ")));
        }
        params.extend(self.params);
        let request = TokenRequest::new(
            token_url,
            grant.grant_type,
            &self.client_id,
            self.client_secret.as_deref(),
            self.client_auth,
            &params,
            &self.headers,
        );
        let has_client_secret = self.client_secret.is_some();
        let guard = match self.client_secret {
            Some(client_secret) => SecretGuard::new([
                form_urlencode(&client_secret),
                basic_credentials(&self.client_id, &client_secret),
                client_secret,
            ]),
            None => SecretGuard::new([]),
        };

        Ok(Endpoint {
            request,
            transport,
            guard,
            grant_type: grant.grant_type,
            retry_unanswered: grant.retry_unanswered,
            client_id: self.client_id,
            client_auth: self.client_auth,
            has_client_secret,
            scopes: self.scopes,
            timeout: self.timeout,
            retry: self.retry,
        })
    }

    fn check_params(&self, grant: &Grant) -> Result<(), Error> {
        let credentials_in_body =
            self.client_secret.is_none() || self.client_auth == ClientAuth::RequestBody;
        for (name, _) in &self.params {
            let repeats = match name.as_str() {
                "" => return Err(Error::config("parameter name is empty")),
                "grant_type" | "client_secret" => true,
                "client_id" => credentials_in_body,
                "scope" => !self.scopes.is_empty(),
                name => grant.per_fetch_params.contains(&name),
            };
            if repeats {
                return Err(Error::config(
                    "parameter repeats one the token source sends",
                ));
            }
        }
        Ok(())
    }

    /// Adds the configuration to a builder's `Debug`, without secrets, parameter values or
    /// header values.
    pub(super) fn debug_fields(&self, d: &mut fmt::DebugStruct<'_, '_>) {
        let param_names: Vec<_> = self.params.iter().map(|(name, _)| name).collect();
        // NOTE: user info in the URL is refused by `build`, but may be a password until then.
        let token_url = self.token_url.as_ref().ok().map(|url| {
            if has_user_info(url) {
                "[redacted: holds user info]".to_owned()
            } else {
                url.to_string()
            }
        });
        d.field("token_url", &token_url)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &RedactedSecret(self.client_secret.is_some()),
            )
            .field("client_auth", &self.client_auth)
            .field("scopes", &self.scopes)
            .field("param_names", &param_names)
            .field("header_names", &self.headers.keys().collect::<Vec<_>>())
            .field("custom_transport", &self.transport.is_some())
            .field("timeout", &self.timeout)
            .field("max_attempts", &self.retry.max_attempts)
            .field("retry_budget", &self.retry.budget)
            .field("allow_insecure_http", &self.allow_insecure_http);
    }
}

/// Shows whether there is a client secret, never the secret.
pub(super) struct RedactedSecret(pub(super) bool);

impl fmt::Debug for RedactedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0 {
            "\"[redacted]\""
        } else {
            "None (public client)"
        })
    }
}

/// Refuses token URLs that cannot work or would leak the client's credentials (the client
/// secret, when there is one, and any refresh token).
fn check_token_url(url: &Uri, allow_insecure_http: bool, has_secret: bool) -> Result<(), Error> {
    let Some(authority) = url.authority() else {
        return Err(Error::config("token URL is not absolute"));
    };
    if has_user_info(url) {
        return Err(Error::config("token URL must not contain user info"));
    }

    match url.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if allow_insecure_http || is_loopback(authority.host()) => Ok(()),
        Some("http") if has_secret => Err(Error::config(
            "token URL is plain http to a non-loopback host; the client secret would travel \
             unencrypted (see allow_insecure_http)",
        )),
        Some("http") => Err(Error::config(
            "token URL is plain http to a non-loopback host; the refresh token would travel \
             unencrypted (see allow_insecure_http)",
        )),
        _ => Err(Error::config("token URL scheme is neither https nor http")),
    }
}

pub(super) fn has_user_info(url: &Uri) -> bool {
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
    use super::*;

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
}
