//! OAuth2 token sources (RFC 6749).
//!
//! [`ClientCredentials`] asks a token endpoint for tokens with the client credentials grant
//! (§4.4): a service proves who it is with its client id and secret, and gets a token in its
//! own name. [`RefreshTokenGrant`] trades a refresh token for tokens (§6), rotating the
//! refresh token as the server asks: see [the refresh-token grant](#the-refresh-token-grant).
//! Both share everything below except where a section names one of them.
//!
//! ```
//! use std::convert::Infallible;
//!
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use tower_token_refresh::{source::oauth2::ClientCredentials, TokenSource};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! // Stands in for a real HTTPS client, such as hyper-util's client with a TLS connector.
//! let https_client = tower::service_fn(|_request: http::Request<Full<Bytes>>| async {
//!     let body = r#"{"access_token":"eyJhbGciOi","token_type":"Bearer","expires_in":3600}"#;
//!     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body))))
//! });
//!
//! let source = ClientCredentials::builder(
//!     "https://auth.example.com/oauth/token",
//!     "reporting-service",
//!     "s3cr3t",
//! )
//! .scope("reports:read")
//! .audience("https://api.example.com")
//! .transport(https_client)
//! .build()?;
//!
//! let token = source.fetch(None).await?;
//!
//! assert_eq!(token.expose_secret(), "eyJhbGciOi");
//! assert_eq!(token.scopes(), ["reports:read"]);
//! # Ok(())
//! # }
//! ```
//!
//! # The request
//!
//! A `POST` to the token URL with `content-type: application/x-www-form-urlencoded`,
//! `accept: application/json` and the form body
//! `grant_type=client_credentials&scope=...&<extra parameters>`, or
//! `grant_type=refresh_token&refresh_token=...&scope=...&<extra parameters>`, encoded per
//! RFC 6749 Appendix B. `scope` is sent only when scopes were asked for, space-joined. The
//! client authenticates with [`ClientAuth::Basic`] (the default: `authorization: Basic
//! base64(urlencode(id) ":" urlencode(secret))`, marked sensitive) or
//! [`ClientAuth::RequestBody`] (`client_id` and `client_secret` last in the form). A
//! [`RefreshTokenGrant`] without a client secret is a public client: it sends `client_id`
//! last in the form and no credentials (RFC 6749 §3.2.1).
//!
//! Extra parameters ([`audience`](ClientCredentialsBuilder::audience),
//! [`resource`](ClientCredentialsBuilder::resource), any
//! [`param`](ClientCredentialsBuilder::param)) follow `scope` in the order given, and extra
//! [`header`](ClientCredentialsBuilder::header)s replace the request's own of the same name.
//! A parameter that would repeat one the source sends is refused at build time.
//!
//! Expiry counts from the moment the request is sent, not from when the answer arrives, so
//! that a slow token endpoint cannot make a token look younger than it is.
//!
//! # Reading the answer
//!
//! At most 64 KiB of the answer are read; a longer one is an error without an excerpt. The
//! body is parsed as JSON whatever its `content-type`.
//!
//! A success status (2xx) with a JSON object (RFC 6749 §5.1):
//!
//! | field | accepted | otherwise |
//! |---|---|---|
//! | `access_token` | a non-empty string | invalid response naming the field |
//! | `token_type` | `Bearer` in any case; missing or `null` is taken as Bearer | any other type (`mac`, `DPoP`, `""`): [`Error::is_invalid_token`](crate::Error::is_invalid_token), terminal; not a string: invalid response |
//! | `expires_in` | see below | invalid response naming the field, without an excerpt |
//! | `scope` | a space-separated string (`""` means none granted), or a list of strings; missing or `null`: the scopes asked for, and for a refresh that asked for none, the scopes of the token it replaces | invalid response naming the field |
//! | `refresh_token` | kept when a non-empty string | missing, `null`, `""` or not a string: no new refresh token (a refresh keeps the one it presented) |
//!
//! A `refresh_token` that is not a string is ignored rather than refused: the access token
//! beside it is good, and refusing the answer would throw it away while the server may
//! already have retired the refresh token presented. If it did, the next refresh fails with
//! a terminal `invalid_grant` that says so.
//!
//! Other fields (`id_token`, vendor extensions) travel with the token: see
//! [`Token::extra_fields`](crate::Token::extra_fields).
//!
//! A success status whose object has no `access_token` but an `error` code, as some servers
//! send, is read as an error response.
//!
//! `expires_in` (field cases F01 to F03):
//!
//! - a JSON number, integer or not: its whole seconds (`3600.9` is 3600 s, `1e3` is 1000 s);
//! - a string holding a plain decimal number, `-?[0-9]+(\.[0-9]+)?` after trimming ASCII
//!   whitespace: read the same way (`"3600"`, `" 3600 "` and `"3600.0"` are all 3600 s);
//!   `""`, `"1e3"`, `"+3600"`, `"3600."`, `"NaN"`, `"inf"` and anything else are refused, since
//!   no server is known to send them and guessing could turn garbage into a lifetime;
//! - missing or `null`: expiry unknown, the token is replaced when a server rejects it;
//! - zero, negative, or under one second: expired on arrival (it still serves the call that
//!   fetched it; the layer does not loop on it);
//! - huge: clamped to [`MAX_LIFETIME`](crate::MAX_LIFETIME);
//! - `true`, objects, lists: refused.
//!
//! An error status with a JSON object holding a string `error` (RFC 6749 §5.2) gives an
//! [`Error::is_endpoint`](crate::Error::is_endpoint) error with the code, `error_description`
//! and `error_uri`; `invalid_grant`, `invalid_client` and their kin are terminal (F18). Any
//! other error answer, such as a proxy's HTML page, gives the status and a short excerpt of
//! the body (F19); a success status with a body that is not a JSON object gives an invalid
//! response error with an excerpt.
//!
//! # The refresh-token grant
//!
//! [`RefreshTokenGrant`] starts from a refresh token, and optionally an access token, that
//! the application got at its login or saved from an earlier run:
//!
//! - The first fetch without a previous token hands out the access token given to
//!   [`access_token`](RefreshTokenGrantBuilder::access_token), with the refresh token, and
//!   sends nothing. It does so once, and not at all when that token has expired by then.
//!   Otherwise the first fetch presents the refresh token given to the builder.
//! - Every later fetch presents the refresh token of the token it replaces, which the layer
//!   hands it ([`TokenSource::fetch`](crate::TokenSource::fetch)'s `previous`); a previous
//!   token without one (not made by this source) falls back to the builder's.
//! - The answer's refresh token replaces the presented one in the new token, so the rotated
//!   pair is installed at once and reaches subscribers in one piece
//!   ([`RefreshHandle::subscribe`](crate::RefreshHandle::subscribe)): persist what they
//!   receive, and build the source from it on the next start. An answer without a new
//!   refresh token (missing, `null`, `""`) keeps the presented one.
//! - An answer without `scope` grants what the refresh asked for, or, when it asked for
//!   nothing, keeps the scopes of the token it replaces (RFC 6749 §5.1 and §6).
//! - Without [`client_secret`](RefreshTokenGrantBuilder::client_secret) the client is
//!   public, as mobile, desktop and command-line apps are: it identifies itself by
//!   `client_id` in the form. With a secret it authenticates like a [`ClientCredentials`].
//! - The source keeps no refresh token between fetches; the layer's token state does. Build
//!   one layer per refresh token and clone the layer: two layers sharing one source would
//!   each present the same refresh token, and a server that allows each once refuses one.
//! - Every attempt of one fetch presents the same refresh token. If the server rotated it
//!   but its answer was lost (a connection that broke while the answer was on its way), no
//!   client can know the new one: the retry meets `invalid_grant`, which is terminal, unless
//!   the server allows a refresh token to be reused for a grace period, as many do.
//!
//! ```
//! use std::{convert::Infallible, time::Duration};
//!
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use tower_token_refresh::{source::oauth2::RefreshTokenGrant, RefreshLayer, Token};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! // Stands in for a token endpoint that rotates refresh tokens.
//! let https_client = tower::service_fn(|_request: http::Request<Full<Bytes>>| async {
//!     let body = r#"{"access_token":"A2","token_type":"Bearer","expires_in":3600,
//!                   "refresh_token":"R2"}"#;
//!     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body))))
//! });
//!
//! // Start from the pair the application saved last time.
//! let token_url = "https://auth.example.com/oauth/token";
//! let source = RefreshTokenGrant::builder(token_url, "desktop-app", "R1")
//!     .access_token(Token::new("A1").with_expires_in(Duration::from_secs(300)))
//!     .transport(https_client)
//!     .build()?;
//! let layer = RefreshLayer::new(source);
//! let handle = layer.handle();
//! let mut updates = handle.subscribe();
//!
//! handle.refresh().await?; // the saved pair, without a request
//! handle.refresh().await?; // a rotation
//!
//! for expected in [("A1", "R1"), ("A2", "R2")] {
//!     let token = updates.next().await.expect("an installed token");
//!     // Persist these two together, e.g. in the OS keychain.
//!     let pair = (token.expose_secret(), token.expose_refresh_token().unwrap());
//!     assert_eq!(pair, expected);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Secrets
//!
//! No error, log line or `Debug` output holds the client secret or a token (R10):
//!
//! - an excerpt is added only when the body contains none of the words `token`, `secret` or
//!   `bearer` in any case, none of the forms of the client secret that were sent, not the
//!   refresh token that was presented, and has a space near its start (a single unbroken
//!   word may be a bare token);
//! - `error`, `error_description` and `error_uri` are dropped when they echo the client
//!   secret, the refresh token presented, or a token that the same body carries;
//! - errors about a field of a success answer never carry an excerpt;
//! - a plain `http://` token URL is refused unless its host is a loopback address or
//!   [`allow_insecure_http`](ClientCredentialsBuilder::allow_insecure_http) says otherwise,
//!   also for a public client, whose refresh token would travel in the clear;
//! - redirects are not followed (the default transport follows none; a custom one should
//!   not either, lest it forward the credentials).
//!
//! # HTTPS
//!
//! With the `rustls` feature, a source whose token URL is `https` and that has no transport of
//! its own reaches its token endpoint over rustls (TLS 1.2 and 1.3, the ring crypto provider
//! unless the process installed another one as rustls's default). It trusts the platform's
//! root certificates (on Linux the system bundle, which `SSL_CERT_FILE` and `SSL_CERT_DIR`
//! override) or, when the platform has none, as in a minimal container image, the Mozilla
//! roots compiled into the crate; the two sets are not merged, so that a root removed from
//! the platform store stays untrusted. The roots are loaded once per process, by the first
//! [`build`](ClientCredentialsBuilder::build) that needs them. A certificate that does not
//! check out fails the fetch with an [`Error::is_transport`](crate::Error::is_transport)
//! error, before anything is sent.
//!
//! For a private certificate authority, a client certificate or other TLS settings, give the
//! source the transport of `https_transport` (with the `rustls` feature), made from your own
//! `rustls::ClientConfig`. For the APIs themselves, build the client under the layer with
//! hyper-rustls in the same way.
//!
//! Whatever the transport, a plain `http://` token URL to a host that is not a loopback
//! address is refused at build time (R10), unless
//! [`allow_insecure_http`](ClientCredentialsBuilder::allow_insecure_http) allows it.
//!
//! # Transport, timeouts and retries
//!
//! Requests go through any tower HTTP service given to
//! [`transport`](ClientCredentialsBuilder::transport), so TLS, proxies and timeouts are the
//! transport's business. The default, with the `hyper-client` feature (on by default), is
//! hyper-util's HTTP/1 client; it speaks TLS with the `rustls` feature (see [HTTPS](#https)).
//! Without that feature [`build`](ClientCredentialsBuilder::build) refuses an `https` URL
//! that has no transport of its own, rather than fail at the first fetch.
//!
//! A connection failure is an [`Error::is_transport`](crate::Error::is_transport) error.
//!
//! One fetch makes up to [`max_attempts`](ClientCredentialsBuilder::max_attempts) attempts
//! (default 3; 1 switches retries off). An attempt is retried when its error is transient
//! and no success status arrived: connection errors and broken answers, an attempt that
//! ran out of its [`timeout`](ClientCredentialsBuilder::timeout), 5xx, 408, 429, and the
//! `temporarily_unavailable` and `slow_down` codes. Never retried:
//!
//! - terminal errors: `invalid_grant`, `invalid_client`, `unauthorized_client`,
//!   `unsupported_grant_type` and the other error codes of RFC 6749 §5.2 whatever the status,
//!   other 4xx statuses, and an unsupported token type; they reach the layer at once with
//!   their `error`, `error_description` and `error_uri` (F18);
//! - any answer with a success status, even an unusable one: the server may have acted on
//!   the request, and may have rotated the refresh token with that answer.
//!
//! Between attempts the source waits 200 ms after the first, doubling after each next one up
//! to 2 s, each wait scaled by a random factor between 0.5 and 1 so that many clients do not
//! come back in step. An answer with `Retry-After` (seconds, or an HTTP-date in any of the
//! three forms of RFC 9110) replaces that wait with its own, even a zero one.
//!
//! All of it happens inside one fetch, and so inside the layer's
//! [`refresh_timeout`](crate::RefreshLayer::refresh_timeout) (10 s by default), which ends
//! the fetch, retries and all, with an [`Error::is_timeout`](crate::Error::is_timeout)
//! error and no more detail. So the source keeps a
//! [`retry_budget`](ClientCredentialsBuilder::retry_budget) (default 5 s): a retry starts
//! only if its wait ends within the budget, counted from the start of the fetch, and a
//! `Retry-After` beyond what is left of it ends the fetch at once with the answer's error
//! (a 429, say), carrying the wait it asked for ([`Error::retry_after`](crate::Error::retry_after)):
//! the layer then asks again no sooner than that, up to its longest failure back-off (30 s by
//! default), so that one answer cannot take a client down for long. An attempt
//! started at the end of the budget has the other 5 s of the default refresh timeout to
//! finish. Keep the budget below the layer's refresh timeout, and the per-attempt timeout,
//! if you set one, well below the budget.
//!
//! The source has no per-attempt timeout unless one is set: an attempt that hangs is ended
//! by the layer's refresh timeout, not retried.
//!
//! # Logging
//!
//! Each attempt ends with one `DEBUG` event carrying the token URL's host, the grant type,
//! the attempt number, the time taken and the outcome (for a failure: status, whether it is
//! terminal, the error, and either the wait before the next attempt, `retry_in`, or why
//! there is none, `gave_up`). Bodies and secrets are never logged.

mod client_credentials;
mod config;
mod endpoint;
mod refresh_token;
mod request;
mod response;
mod retry;
mod transport;

#[cfg(test)]
mod mock;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod refresh_token_tests;
#[cfg(test)]
mod resilience_tests;
#[cfg(test)]
mod tests;

pub use client_credentials::{ClientCredentials, ClientCredentialsBuilder};
pub use refresh_token::{RefreshTokenGrant, RefreshTokenGrantBuilder};
pub use request::ClientAuth;
#[cfg(fuzzing)]
pub(crate) use response::parse_for_fuzzing;
#[cfg(feature = "rustls")]
pub use transport::{https_transport, HttpsTransport};
