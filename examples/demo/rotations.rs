//! The application's side of rotation: a subscriber to the tokens the layer installs, which
//! counts the new refresh tokens it is handed, as an application that saves each one would.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::task::JoinHandle;
use tower_token_refresh::TokenUpdates;

/// What the subscriber saw.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rotations {
    /// Tokens installed.
    pub(crate) tokens: u64,
    /// Tokens that brought a refresh token other than the one before: the rotations.
    pub(crate) rotations: u64,
    /// Whether the subscription ended (the layer was gone, and no refresh ran) before the
    /// counts were read; if not, tokens installed later are missing from them.
    pub(crate) complete: bool,
}

/// A subscriber counting in the background.
pub(crate) struct RotationWatch {
    seen: Arc<Seen>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct Seen {
    tokens: AtomicU64,
    rotations: AtomicU64,
}

impl RotationWatch {
    /// Starts counting the tokens of `updates`, the first of which replaces a token that
    /// carried `refresh_token`.
    pub(crate) fn start(mut updates: TokenUpdates, refresh_token: String) -> Self {
        let seen = Arc::new(Seen::default());
        let counts = Arc::clone(&seen);

        let task = tokio::spawn(async move {
            let mut current = refresh_token;
            while let Some(token) = updates.next().await {
                counts.tokens.fetch_add(1, Ordering::Relaxed);
                // NOTE: the source keeps the presented refresh token when an answer brings no
                // new one; an unchanged refresh token is no rotation.
                let Some(new) = token.expose_refresh_token().filter(|new| *new != current) else {
                    continue;
                };
                current = new.to_owned();
                counts.rotations.fetch_add(1, Ordering::Relaxed);
            }
        });
        Self { seen, task }
    }

    /// The counts, once the subscription has ended, or after `patience` at the latest.
    ///
    /// The subscription ends when the layer, its services and its handles are all gone and
    /// no refresh still runs, so drop them first.
    pub(crate) async fn finish(mut self, patience: Duration) -> Rotations {
        let ended = tokio::time::timeout(patience, &mut self.task).await;
        let complete = matches!(ended, Ok(Ok(())));
        if !complete {
            self.task.abort();
            tracing::warn!(?patience, "the token subscription did not end in time");
        }

        Rotations {
            tokens: self.seen.tokens.load(Ordering::Relaxed),
            rotations: self.seen.rotations.load(Ordering::Relaxed),
            complete,
        }
    }
}
