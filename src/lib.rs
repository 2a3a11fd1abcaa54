//! Tower middleware that keeps an access token on every request.
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
