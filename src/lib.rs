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
//! [`source::Static`] for fixed keys, and [`source::oauth2::ClientCredentials`] for the OAuth2
//! client credentials grant.
//!
//! # Request bodies
//!
//! A retry needs the request body a second time. Bodies that are cheap to copy (`Full`,
//! `Empty`, `String`) and empty boxed bodies are copied before the first attempt; other
//! bodies are sent once, and their rejection is returned to the caller while the token is
//! refreshed for the next call. See [`ReplayBody`] and [`RefreshLayer::replay_with`].
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
//! - `hyper-client` (default): hyper-util's client as the default transport of token sources.
#![forbid(unsafe_code)]
#![deny(unreachable_pub)]
#![warn(missing_docs)]

mod body;
mod classify;
pub mod error;
pub mod future;
mod handle;
mod layer;
mod service;
pub mod source;
mod state;
mod token;

pub use body::{ReplayBodies, ReplayBody, ReplayPolicy};
pub use classify::Challenge;
pub use error::{BoxError, Error};
pub use handle::{RefreshHandle, Stats, TokenInfo, TokenUpdates};
pub use layer::RefreshLayer;
pub use service::Refresh;
pub use source::TokenSource;
pub use token::{Token, MAX_LIFETIME};
