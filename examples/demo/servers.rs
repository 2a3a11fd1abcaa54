//! Starting and stopping the embedded servers, each on 127.0.0.1 with a port the OS picks.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use axum::Router;
use http::Uri;
use tokio::{net::TcpSocket, sync::watch, task::JoinHandle};

use crate::{
    api::{self, Api, TokenCheck, API_PATH},
    config::{Config, GrantType, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET},
    shared::{Counters, Registry, KNOWN_SCOPES},
    token_endpoint::{self, TokenEndpoint, TOKEN_PATH},
};

/// The longest queue of connections waiting to be accepted; the kernel caps it at
/// `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

/// How long a server may take to close its connections before it is stopped hard.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// Which parts run embedded, and what follows from that.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mode {
    pub(crate) token_endpoint: bool,
    pub(crate) api: bool,
}

impl Mode {
    /// The API knows the tokens (and can revoke them) only when it shares the token table
    /// with the token endpoint.
    pub(crate) fn tokens_verified(self) -> bool {
        self.token_endpoint && self.api
    }
}

/// The embedded servers that run, and where the client finds token endpoint and API.
pub(crate) struct Servers {
    pub(crate) mode: Mode,
    pub(crate) token_url: Uri,
    pub(crate) api_url: String,
    /// With the refresh-token grant, the refresh token the client starts from: the one given,
    /// or the random one the embedded token endpoint was seeded with.
    pub(crate) refresh_token: Option<String>,
    pub(crate) counters: Arc<Counters>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Servers {
    /// Starts the servers `config` does not replace with URLs of its own.
    pub(crate) async fn start(config: &Config) -> io::Result<Self> {
        let mode = Mode {
            token_endpoint: config.token_url.is_none(),
            api: config.api_url.is_none(),
        };
        let registry = Arc::new(Registry::default());
        let counters = Arc::new(Counters::default());
        let (shutdown, stop) = watch::channel(false);
        let mut tasks = Vec::new();

        let token_url = match &config.token_url {
            Some(url) => url.clone(),
            None => {
                let endpoint = TokenEndpoint {
                    registry: Arc::clone(&registry),
                    counters: Arc::clone(&counters),
                    // The embedded endpoint knows one client: the demo's defaults. Other
                    // credentials given on the command line are refused, as they should be.
                    client_id: DEFAULT_CLIENT_ID.into(),
                    client_secret: DEFAULT_CLIENT_SECRET.into(),
                };
                let (address, task) = serve(token_endpoint::router(endpoint), stop.clone()).await?;
                tasks.push(task);
                let url = local_url(address, TOKEN_PATH);
                url.parse().expect("a loopback URL is valid")
            }
        };
        let refresh_token = match config.grant {
            GrantType::ClientCredentials => None,
            // As if the client had got it at its login, for every scope the servers know.
            GrantType::RefreshToken if mode.token_endpoint => Some(registry.seed_refresh_token(
                config.refresh_token.clone(),
                KNOWN_SCOPES.map(String::from).to_vec(),
            )),
            GrantType::RefreshToken => config.refresh_token.clone(),
        };
        let api_url = match &config.api_url {
            Some(url) => url.clone(),
            None => {
                let api = Api {
                    check: token_check(mode, &registry),
                    counters: Arc::clone(&counters),
                    audit: Arc::default(),
                };
                let (address, task) = serve(api::router(api), stop.clone()).await?;
                tasks.push(task);
                local_url(address, API_PATH)
            }
        };
        if mode.tokens_verified() {
            let revoker = api::revoke_now_and_then(registry, Arc::clone(&counters), stop);
            tasks.push(tokio::spawn(revoker));
        }

        Ok(Self {
            mode,
            token_url,
            api_url,
            refresh_token,
            counters,
            shutdown,
            tasks,
        })
    }

    /// Stops every server and the revoker, and waits for them.
    pub(crate) async fn stop(self) {
        self.shutdown.send_replace(true);

        for mut task in self.tasks {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
            {
                tracing::warn!("an embedded server did not stop in time; stopping it hard");
                task.abort();
            }
        }
    }
}

/// How the embedded API judges tokens: by the table, when the token endpoint is ours too.
fn token_check(mode: Mode, registry: &Arc<Registry>) -> TokenCheck {
    if mode.tokens_verified() {
        TokenCheck::Registry(Arc::clone(registry))
    } else {
        TokenCheck::AnyNonEmpty
    }
}

fn local_url(address: SocketAddr, path: &str) -> String {
    format!("http://{address}{path}")
}

/// Serves `router` on a new loopback port until `stop` turns true.
async fn serve(
    router: Router,
    mut stop: watch::Receiver<bool>,
) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    let socket = TcpSocket::new_v4()?;
    socket.bind((Ipv4Addr::LOCALHOST, 0).into())?;
    // NOTE: thousands of callers connect at once; with tokio's default backlog (1024) the
    // kernel drops their SYNs, and the calls stall for a second or three in TCP retransmits.
    let listener = socket.listen(LISTEN_BACKLOG)?;
    let address = listener.local_addr()?;

    let task = tokio::spawn(async move {
        let stopped = async move {
            let _ = stop.wait_for(|stop| *stop).await;
        };
        let served = axum::serve(listener, router).with_graceful_shutdown(stopped);
        if let Err(error) = served.await {
            tracing::error!(%error, "embedded server failed");
        }
    });
    Ok((address, task))
}
