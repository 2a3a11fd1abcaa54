//! Tower middleware that keeps a valid access token on every request.
//!
//! [`RefreshLayer`] wraps any tower HTTP client (hyper-util's client, a tonic `Channel`, a
//! `service_fn`, a `BoxCloneService`). It attaches the current token to every request,
//! renews the token before it runs out, and when a server rejects it (401, or gRPC
//! UNAUTHENTICATED) it runs one refresh for everyone who noticed and retries the call once.
//!
//! ```no_run
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::{client::legacy::Client, rt::TokioExecutor};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_token_refresh::{source::oauth2::ClientCredentials, RefreshLayer};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), tower_token_refresh::BoxError> {
//! let source = ClientCredentials::builder("http://127.0.0.1:8080/token", "my-client", "my-secret")
//!     .scope("orders:read")
//!     .build()?;
//! let client = ServiceBuilder::new()
//!     .layer(RefreshLayer::new(source))
//!     .service(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());
//!
//! let request = http::Request::get("http://127.0.0.1:8081/orders").body(Full::default())?;
//! let response = client.oneshot(request).await?;
//! # let _ = response;
//! # Ok(())
//! # }
//! ```
//!
//! # What it guarantees
//!
//! - **One refresh at a time.** However many requests, clones of the service or clones of the
//!   layer notice that a token must be replaced, one refresh runs, and every caller gets its
//!   outcome. A refresh runs on a task of its own with a timeout, so a caller that gives up
//!   never cancels it and a rotated refresh token is never lost.
//! - **Generation-aware retries.** Each request remembers which token it was sent with. A late
//!   rejection of a token that was already replaced is retried with the new token, without a
//!   second refresh. A request is retried at most once; if the retry is rejected too, the
//!   caller gets that response as it is.
//! - **Nothing sent without a token.** When a refresh fails, every waiting caller gets the
//!   same typed [`Error`], which says whether trying again can help.
//! - **No secret in sight.** Tokens, refresh tokens and client secrets never appear in
//!   `Debug` output, error messages or logs; the header value is marked sensitive.
//!
//! # Token sources
//!
//! Anything that implements [`TokenSource`]. Shipped: [`source::from_fn`] for closures,
//! [`source::Static`] for fixed keys, [`source::TokenFile`] for tokens another process keeps in
//! a file, and the OAuth2 grants [`source::oauth2::ClientCredentials`] and
//! [`source::oauth2::RefreshTokenGrant`] (with rotation, bounded retries and `Retry-After`).
//!
//! # Request bodies
//!
//! A retry needs the request body a second time. Bodies that are cheap to copy (`Full`,
//! `Empty`, `String`) and empty boxed bodies are copied before the first attempt. Other boxed
//! bodies (and tonic's) stream through while the layer keeps a copy, within
//! [`RefreshLayer::replay_limit`]; a body that cannot be copied, or was not captured whole,
//! is sent once, and its rejection is returned to the caller while the token is refreshed
//! for the next call. See [`ReplayBody`] and [`RefreshLayer::replay_with`].
//!
//! # Where to place it
//!
//! Inside retry and redirect layers, outside concurrency limits; see [`RefreshLayer`].
//!
//! # Observability
//!
//! Refreshes are traced with `tracing` at DEBUG (cause, generation, waiters, duration), the
//! request path at TRACE, and failed refreshes at ERROR. [`RefreshHandle::stats`] returns the
//! counters.
//!
//! # Cargo features
//!
//! - `hyper-client` (default): hyper-util's HTTP/1 client as the default transport of token
//!   sources, without TLS: it serves `http` token URLs, which a source accepts for a loopback
//!   host only unless insecure http is explicitly allowed (R10).
//! - `rustls`: HTTPS for token endpoints with rustls and hyper-rustls (TLS 1.2 and 1.3, ring).
//!   The default transport then serves `https` token URLs too, trusting the platform's root
//!   certificates, or the Mozilla roots compiled in when the platform has none;
//!   `source::oauth2::https_transport` takes your own `rustls::ClientConfig`, for a private
//!   certificate authority. Turns on `hyper-client`. See
//!   [HTTPS](source::oauth2#https) for the details, and the `https` example for an API
//!   called over HTTPS.
//! - `tonic`: [`ReplayBody`] for `tonic::body::Body`, so the layer goes directly under a
//!   tonic `Channel` and the stack is handed to a generated client as it is. Depends on tonic
//!   without its default features (its body type only). See the `tonic` example.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]
#![deny(unreachable_pub)]
#![warn(missing_docs)]

pub mod body;
mod classify;
pub mod error;
pub mod future;
mod handle;
mod layer;
mod service;
pub mod source;
mod state;
mod sync;
mod token;

pub use body::{ReplayBodies, ReplayBody, ReplayPolicy, ResponseBody};
pub use classify::Challenge;
pub use error::{BoxError, Error};
pub use handle::{RefreshHandle, Stats, TokenInfo, TokenUpdates};
pub use layer::RefreshLayer;
pub use service::Refresh;
pub use source::TokenSource;
pub use token::{Token, MAX_LIFETIME};

/// Entry points of the fuzz targets in `fuzz/`; see the module.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing;

/// The README's examples, compiled as doc tests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
