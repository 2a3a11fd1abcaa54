//! The crate's job, end to end.
//!
//! Starts an OAuth2 token endpoint that issues 2-second tokens and a protected API that
//! revokes every token now and then, both on 127.0.0.1, then sends many concurrent GETs and
//! POSTs through [`RefreshLayer`] over hyper-util's client for a few seconds. A correct layer
//! makes every call succeed while asking the token endpoint only as often as token lifetimes
//! and revocations require; the summary says whether it did, and the exit status too.
//!
//! With `--refresh-token` (or `--grant refresh_token`) the client gets its tokens with the
//! refresh-token grant instead of the client credentials grant, from a token endpoint that
//! rotates refresh tokens and allows each one once, while a subscriber to the layer's tokens
//! counts the rotations it sees.
//!
//! ```text
//! cargo run --example demo
//! cargo run --example demo -- --concurrency 200 --duration 3 --client-auth post
//! cargo run --example demo -- --refresh-token demo-refresh-1
//! cargo run --example demo -- --help
//! ```

mod api;
mod audit;
mod config;
mod load;
mod report;
mod rotations;
mod servers;
mod shared;
mod token_endpoint;

use std::{io::IsTerminal, process::ExitCode, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tower::Layer;
use tower_token_refresh::{
    source::oauth2::{ClientAuth, ClientCredentials, RefreshTokenGrant},
    RefreshLayer,
};
use tracing_subscriber::EnvFilter;

use crate::{
    api::REVOCATION_INTERVAL,
    config::{Command, Config, GrantType, UsageError, USAGE},
    load::{ApiClient, Target},
    report::{Report, ServerCounts},
    rotations::RotationWatch,
    servers::Servers,
    shared::TOKEN_LIFETIME,
};

/// The layer's refresh-ahead and expiry margin: its defaults, spelled out because the
/// token-count check derives its bound from them (see `report::replaced_after`).
pub(crate) const LAYER_REFRESH_AHEAD: Duration = Duration::from_secs(120);
pub(crate) const LAYER_EXPIRY_MARGIN: Duration = Duration::from_secs(30);

/// A loopback token endpoint answers in milliseconds; waiting longer only delays the end.
const LAYER_REFRESH_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the token subscriber may take to see its last token once the load is over: a
/// refresh still running then may run for three refresh timeouts, since the layer keeps a
/// late one going for twice the timeout more, so as not to lose a rotated refresh token.
const SUBSCRIPTION_PATIENCE: Duration = LAYER_REFRESH_TIMEOUT
    .saturating_mul(3)
    .saturating_add(Duration::from_millis(500));

#[tokio::main]
async fn main() -> ExitCode {
    let args = std::env::args_os().skip(1);
    let config = match config::parse(args, |name| std::env::var_os(name)) {
        Ok(Command::Run(config)) => config,
        Ok(Command::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(UsageError(message)) => return usage_error(&message),
    };
    init_tracing();

    match run(&config).await {
        Ok(report) => {
            let reasons = report.reasons();
            report.print(&reasons);
            for reason in &reasons {
                eprintln!("demo: failed: {reason}");
            }
            if reasons.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(Failure::Usage(message)) => usage_error(&message),
        Err(Failure::Setup(message)) => {
            eprintln!("demo: failed: {message}");
            ExitCode::FAILURE
        }
    }
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("demo: error: {message}");
    eprintln!("demo: see --help");
    ExitCode::from(2)
}

/// Logs go to stderr, so that the summary on stdout stays readable; `RUST_LOG` picks what.
fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Why the demo could not run.
enum Failure {
    /// A value the user gave cannot work; exit code 2.
    Usage(String),
    /// Something else went wrong while setting up, such as binding a port.
    Setup(String),
}

async fn run(config: &Config) -> Result<Report, Failure> {
    let servers = Servers::start(config)
        .await
        .map_err(|error| Failure::Setup(format!("cannot start the embedded servers: {error}")))?;
    let layer = match refresh_layer(config, &servers) {
        Ok(layer) => layer,
        Err(message) => {
            servers.stop().await;
            return Err(Failure::Usage(message));
        }
    };
    print_setup(config, &servers);

    let layer = layer
        .refresh_ahead(LAYER_REFRESH_AHEAD)
        .expiry_margin(LAYER_EXPIRY_MARGIN)
        .refresh_timeout(LAYER_REFRESH_TIMEOUT);
    let handle = layer.handle();
    // Subscribed before the first request, so that it sees every token from the first on.
    let watch = servers
        .refresh_token
        .clone()
        .map(|refresh_token| RotationWatch::start(handle.subscribe(), refresh_token));
    let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let client: ApiClient = layer.layer(http);
    // From here on only the callers and the handle hold the layer's token state, and with it
    // the token source's pooled connections: once both are gone the servers stop at once.
    drop(layer);

    let target = Target {
        base: servers.api_url.clone(),
        checks_echo: servers.mode.api,
    };
    let tally = load::run(client, target, config.concurrency, config.duration).await;
    let stats = handle.stats();
    drop(handle);
    // NOTE: read before the servers' counts, so that a refresh the token endpoint answered
    // has reached the subscriber by then.
    let rotations = match watch {
        Some(watch) => Some(watch.finish(SUBSCRIPTION_PATIENCE).await),
        None => None,
    };

    let counts = ServerCounts::read(&servers.counters);
    let mode = servers.mode;
    servers.stop().await;
    Ok(Report {
        mode,
        grant: config.grant,
        concurrency: config.concurrency,
        tally,
        stats,
        rotations,
        servers: counts,
    })
}

/// The layer, over the token source of the grant in use.
fn refresh_layer(config: &Config, servers: &Servers) -> Result<RefreshLayer, String> {
    let refused = |error| format!("the token source refuses this setup: {error}");

    match &servers.refresh_token {
        None => client_credentials(config, servers)
            .map(RefreshLayer::new)
            .map_err(refused),
        Some(refresh_token) => refresh_token_grant(config, servers, refresh_token)
            .map(RefreshLayer::new)
            .map_err(refused),
    }
}

/// The client credentials source for the token endpoint in use.
fn client_credentials(
    config: &Config,
    servers: &Servers,
) -> Result<ClientCredentials, tower_token_refresh::Error> {
    let mut builder = ClientCredentials::builder(
        servers.token_url.clone(),
        config.client_id.clone(),
        config.client_secret.clone(),
    )
    .client_auth(config.client_auth);
    if let Some(scope) = &config.scope {
        builder = builder.scope(scope.clone());
    }
    builder.build()
}

/// The refresh-token grant source for the token endpoint in use, as the same confidential
/// client, starting from `refresh_token`.
fn refresh_token_grant(
    config: &Config,
    servers: &Servers,
    refresh_token: &str,
) -> Result<RefreshTokenGrant, tower_token_refresh::Error> {
    let mut builder = RefreshTokenGrant::builder(
        servers.token_url.clone(),
        config.client_id.clone(),
        refresh_token,
    )
    .client_secret(config.client_secret.clone())
    .client_auth(config.client_auth);
    if let Some(scope) = &config.scope {
        builder = builder.scope(scope.clone());
    }
    builder.build()
}

fn print_setup(config: &Config, servers: &Servers) {
    let mode = servers.mode;
    let embedded = |yes: bool| if yes { "embedded" } else { "external" };
    let client_auth = match config.client_auth {
        ClientAuth::RequestBody => "post",
        _ => "basic",
    };

    println!("tower-token-refresh demo");
    println!(
        "  token endpoint {} ({}, client auth {client_auth}{})",
        servers.token_url,
        embedded(mode.token_endpoint),
        if mode.token_endpoint {
            format!(", {} s tokens", TOKEN_LIFETIME.as_secs())
        } else {
            String::new()
        },
    );
    println!(
        "  API            {} ({}{})",
        servers.api_url,
        embedded(mode.api),
        if mode.tokens_verified() {
            format!(
                ", revokes every token about every {:.1} s",
                REVOCATION_INTERVAL.as_secs_f64()
            )
        } else {
            String::new()
        },
    );
    if config.grant == GrantType::RefreshToken {
        let start = if config.refresh_token.is_some() {
            "the refresh token given"
        } else {
            "a random refresh token the embedded token endpoint was seeded with"
        };
        println!("  grant          refresh_token, starting from {start}");
    }
    println!(
        "  load           {} callers for {:.2} s, GET and POST alternating",
        config.concurrency,
        config.duration.as_secs_f64()
    );
}
