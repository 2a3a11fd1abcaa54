//! The crate's job, end to end.
//!
//! Starts an OAuth2 token endpoint that issues 2-second tokens and a protected API that
//! revokes every token now and then, both on 127.0.0.1, then sends many concurrent GETs and
//! POSTs through [`RefreshLayer`] over hyper-util's client for a few seconds. A correct layer
//! makes every call succeed while asking the token endpoint only as often as token lifetimes
//! and revocations require; the summary says whether it did, and the exit status too.
//!
//! ```text
//! cargo run --example demo
//! cargo run --example demo -- --concurrency 200 --duration 3 --client-auth post
//! cargo run --example demo -- --help
//! ```

mod api;
mod audit;
mod config;
mod load;
mod report;
mod servers;
mod shared;
mod token_endpoint;

use std::{io::IsTerminal, process::ExitCode, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tower::Layer;
use tower_token_refresh::{
    source::oauth2::{ClientAuth, ClientCredentials},
    RefreshLayer,
};
use tracing_subscriber::EnvFilter;

use crate::{
    api::REVOCATION_INTERVAL,
    config::{Command, Config, UsageError, USAGE},
    load::{ApiClient, Target},
    report::{Report, ServerCounts},
    servers::Servers,
    shared::TOKEN_LIFETIME,
};

/// The layer's refresh-ahead and expiry margin: its defaults, spelled out because the
/// token-count check derives its bound from them (see `report::replaced_after`).
pub(crate) const LAYER_REFRESH_AHEAD: Duration = Duration::from_secs(120);
pub(crate) const LAYER_EXPIRY_MARGIN: Duration = Duration::from_secs(30);

/// A loopback token endpoint answers in milliseconds; waiting longer only delays the end.
const LAYER_REFRESH_TIMEOUT: Duration = Duration::from_secs(2);

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
    let source = match token_source(config, &servers) {
        Ok(source) => source,
        Err(message) => {
            servers.stop().await;
            return Err(Failure::Usage(message));
        }
    };
    print_setup(config, &servers);

    let layer = RefreshLayer::new(source)
        .refresh_ahead(LAYER_REFRESH_AHEAD)
        .expiry_margin(LAYER_EXPIRY_MARGIN)
        .refresh_timeout(LAYER_REFRESH_TIMEOUT);
    let handle = layer.handle();
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

    let counts = ServerCounts::read(&servers.counters);
    let mode = servers.mode;
    servers.stop().await;
    Ok(Report {
        mode,
        concurrency: config.concurrency,
        tally,
        stats,
        servers: counts,
    })
}

/// The client credentials source for the token endpoint in use.
fn token_source(config: &Config, servers: &Servers) -> Result<ClientCredentials, String> {
    let mut builder = ClientCredentials::builder(
        servers.token_url.clone(),
        config.client_id.clone(),
        config.client_secret.clone(),
    )
    .client_auth(config.client_auth);
    if let Some(scope) = &config.scope {
        builder = builder.scope(scope.clone());
    }
    builder
        .build()
        .map_err(|error| format!("the token source refuses this setup: {error}"))
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
    println!(
        "  load           {} callers for {:.2} s, GET and POST alternating",
        config.concurrency,
        config.duration.as_secs_f64()
    );
}
