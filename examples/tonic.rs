//! A tonic client whose `Channel` is wrapped in [`RefreshLayer`], calling a tonic server that
//! checks every call's token.
//!
//! Two servers start on 127.0.0.1, each on a port the OS picks:
//!
//! - an `OAuth2` token endpoint (client credentials) that issues tokens living 2 seconds;
//! - a gRPC `echo.Echo` server (tests/grpc/echo.proto) whose interceptor answers every call
//!   that comes without a valid token with UNAUTHENTICATED: tonic sends that as a
//!   trailers-only response, `grpc-status: 16` in the headers, which the layer treats as a
//!   rejection of the token.
//!
//! The client is the stack the README shows, with no conversions:
//! `EchoClient::new(ServiceBuilder::new().layer(RefreshLayer::new(source)).service(channel))`.
//! It makes its calls in four rounds:
//!
//! 1. unary calls with the first token;
//! 2. the server revokes every token, and the next unary calls are rejected, refreshed once,
//!    replayed and retried;
//! 3. after the token's lifetime, unary calls wait for one refresh;
//! 4. a client-streaming call whose messages are sent over time, and a server-streaming call.
//!
//! It prints what happened, and exits 0 only if every call succeeded with exactly one token
//! request per round that needs one (three in all).
//!
//! ```text
//! cargo run --example tonic
//! RUST_LOG=tower_token_refresh=debug cargo run --example tonic
//! ```

#[path = "../tests/grpc/echo.rs"]
#[allow(unreachable_pub)] // generated: `pub` items for the modules that use them
mod echo;

use std::{
    collections::HashMap,
    io::IsTerminal,
    net::SocketAddr,
    process::ExitCode,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use axum::{extract::State, routing::post, Form, Json, Router};
use echo::{
    echo_client::EchoClient,
    echo_server::{Echo, EchoServer},
    EchoReply, EchoRequest, RepeatRequest,
};
use serde_json::json;
use tokio::{net::TcpListener, sync::mpsc, task::JoinSet, time::Instant};
use tokio_stream::{wrappers::ReceiverStream, wrappers::TcpListenerStream, Stream, StreamExt};
use tonic::{
    transport::{Channel, Endpoint, Server},
    Status,
};
use tower::ServiceBuilder;
use tower_token_refresh::{
    source::oauth2::{ClientAuth, ClientCredentials},
    BoxError, Refresh, RefreshLayer, Stats,
};
use tracing_subscriber::EnvFilter;

const CLIENT_ID: &str = "echo-client";
const CLIENT_SECRET: &str = "example-secret";

/// How long the token endpoint's tokens live.
const TOKEN_LIFETIME: Duration = Duration::from_secs(2);

/// How many unary calls each of the first three rounds makes at once.
const CALLS_PER_ROUND: usize = 8;

/// The token requests the run needs: the first token, one for the revocation, one for the
/// expiry.
const EXPECTED_TOKEN_REQUESTS: u64 = 3;

type Client = EchoClient<Refresh<Channel>>;

#[tokio::main]
async fn main() -> ExitCode {
    init_tracing();

    let summary = match run().await {
        Ok(summary) => summary,
        Err(err) => {
            eprintln!("tonic: failed: {err}");
            return ExitCode::FAILURE;
        }
    };

    summary.print();
    let reasons = summary.reasons();
    for reason in &reasons {
        eprintln!("tonic: failed: {reason}");
    }
    if reasons.is_empty() {
        println!("ok: every call succeeded, with one token request per expiry and revocation");
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
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

async fn run() -> Result<Summary, BoxError> {
    // The token endpoint and the gRPC server, sharing the table of issued tokens.
    let tokens = Arc::new(TokenTable::default());
    let token_address = serve_token_endpoint(Arc::clone(&tokens)).await?;
    let grpc_address = serve_grpc(Arc::clone(&tokens)).await?;
    println!("token endpoint: http://{token_address}/oauth/token");
    println!("gRPC server:    http://{grpc_address} (echo.Echo)");

    // The client: a tonic `Channel`, wrapped in the layer, handed to the generated client.
    let source = ClientCredentials::builder(
        format!("http://{token_address}/oauth/token"),
        CLIENT_ID,
        CLIENT_SECRET,
    )
    .client_auth(ClientAuth::RequestBody)
    .build()?;
    let layer = RefreshLayer::new(source);
    let handle = layer.handle();
    let channel = Endpoint::from_shared(format!("http://{grpc_address}"))?
        .connect()
        .await?;
    let client = EchoClient::new(ServiceBuilder::new().layer(layer).service(channel));

    let mut rounds = Vec::new();
    rounds.push(unary_round("first token", &client).await);

    tokens.revoke_all();
    rounds.push(unary_round("after the revocation", &client).await);

    // Nothing calls meanwhile, so the token is not refreshed ahead of its expiry.
    tokio::time::sleep(TOKEN_LIFETIME + Duration::from_millis(100)).await;
    rounds.push(unary_round("after the expiry", &client).await);

    rounds.push(streaming_round(&client).await);

    Ok(Summary {
        rounds,
        stats: handle.stats(),
        token_requests: tokens.requests.load(Ordering::Relaxed),
        rejected: tokens.rejected.load(Ordering::Relaxed),
    })
}

// ---------------------------------------------------------------------------------------------
// The calls
// ---------------------------------------------------------------------------------------------

/// What one round of calls did.
struct Round {
    name: &'static str,
    calls: usize,
    failures: Vec<String>,
    elapsed: Duration,
}

/// Unary calls at once on clones of `client`; each must get its own message back.
async fn unary_round(name: &'static str, client: &Client) -> Round {
    let started = Instant::now();
    let mut calls = JoinSet::new();
    for i in 0..CALLS_PER_ROUND {
        let mut client = client.clone();
        let message = format!("{name} #{i}");
        calls.spawn(async move {
            let request = EchoRequest {
                message: message.clone(),
            };
            match client.echo(request).await {
                Ok(reply) if reply.get_ref().message == message => Ok(()),
                Ok(reply) => Err(format!("{message}: echoed {:?}", reply.get_ref().message)),
                Err(status) => Err(format!("{message}: {status}")),
            }
        });
    }

    let results = calls.join_all().await;
    Round {
        name,
        calls: results.len(),
        failures: results.into_iter().filter_map(Result::err).collect(),
        elapsed: started.elapsed(),
    }
}

/// A client-streaming call whose messages leave one at a time, spread over time (the layer
/// passes them on as they come, keeping a copy for a possible replay), then a
/// server-streaming call.
async fn streaming_round(client: &Client) -> Round {
    let started = Instant::now();
    let mut failures = Vec::new();

    let parts = ["stream", "ed ", "over ", "time"];
    let (sender, receiver) = mpsc::channel(1);
    let mut collecting = client.clone();
    let call = tokio::spawn(async move { collecting.collect(ReceiverStream::new(receiver)).await });
    for part in parts {
        let request = EchoRequest {
            message: part.to_owned(),
        };
        if sender.send(request).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(sender);
    match call.await {
        Ok(Ok(reply)) if reply.get_ref().message == parts.concat() => {}
        Ok(Ok(reply)) => failures.push(format!("Collect: got {:?}", reply.get_ref().message)),
        Ok(Err(status)) => failures.push(format!("Collect: {status}")),
        Err(err) => failures.push(format!("Collect: {err}")),
    }

    let request = RepeatRequest {
        message: "again".to_owned(),
        times: 3,
    };
    match client.clone().repeat(request).await {
        Ok(stream) => {
            let replies: Vec<_> = stream.into_inner().collect().await;
            let counts: Result<Vec<_>, _> =
                replies.into_iter().map(|r| r.map(|r| r.count)).collect();
            match counts {
                Ok(counts) if counts == [1, 2, 3] => {}
                Ok(counts) => failures.push(format!("Repeat: got replies {counts:?}")),
                Err(status) => failures.push(format!("Repeat: {status}")),
            }
        }
        Err(status) => failures.push(format!("Repeat: {status}")),
    }

    Round {
        name: "client and server streaming",
        calls: 2,
        failures,
        elapsed: started.elapsed(),
    }
}

// ---------------------------------------------------------------------------------------------
// The summary
// ---------------------------------------------------------------------------------------------

struct Summary {
    rounds: Vec<Round>,
    stats: Stats,
    token_requests: u64,
    rejected: u64,
}

impl Summary {
    fn print(&self) {
        println!();
        for round in &self.rounds {
            println!(
                "{:<28} {} calls, {} failed, {} ms",
                round.name,
                round.calls,
                round.failures.len(),
                round.elapsed.as_millis()
            );
        }
        println!(
            "token requests: {} (expected {EXPECTED_TOKEN_REQUESTS})",
            self.token_requests
        );
        println!(
            "calls rejected by the server: {}, retried by the layer: {}",
            self.rejected, self.stats.retries
        );
        println!(
            "layer: refreshes {}, coalesced {}, rejections {}, passed through {}",
            self.stats.refreshes,
            self.stats.coalesced,
            self.stats.rejections,
            self.stats.passed_through
        );
    }

    /// Why the run failed; empty when it did not.
    fn reasons(&self) -> Vec<String> {
        let mut reasons: Vec<String> = self
            .rounds
            .iter()
            .flat_map(|round| {
                round
                    .failures
                    .iter()
                    .map(|f| format!("{}: {f}", round.name))
            })
            .collect();
        if self.token_requests != EXPECTED_TOKEN_REQUESTS {
            reasons.push(format!(
                "{} token requests, expected {EXPECTED_TOKEN_REQUESTS}",
                self.token_requests
            ));
        }
        if self.rejected == 0 {
            reasons.push("the revocation rejected no call".to_owned());
        }
        if self.stats.retries != self.rejected {
            reasons.push(format!(
                "{} calls rejected but {} retried",
                self.rejected, self.stats.retries
            ));
        }
        reasons
    }
}

// ---------------------------------------------------------------------------------------------
// The token endpoint and the gRPC server
// ---------------------------------------------------------------------------------------------

/// The tokens the token endpoint issued, as the gRPC server checks them.
#[derive(Default)]
struct TokenTable {
    /// Valid tokens and when each was issued.
    issued: Mutex<HashMap<String, Instant>>,
    requests: AtomicU64,
    rejected: AtomicU64,
}

impl TokenTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.issued.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn issue(&self) -> String {
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let token = format!("echo-token-{n}");
        self.lock().insert(token.clone(), Instant::now());
        token
    }

    fn accepts(&self, token: &str) -> bool {
        self.lock()
            .get(token)
            .is_some_and(|issued| issued.elapsed() < TOKEN_LIFETIME)
    }

    fn revoke_all(&self) {
        self.lock().clear();
    }
}

async fn serve_token_endpoint(tokens: Arc<TokenTable>) -> Result<SocketAddr, BoxError> {
    let router = Router::new()
        .route("/oauth/token", post(issue_token))
        .with_state(tokens);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, router).await {
            eprintln!("tonic: the token endpoint stopped: {err}");
        }
    });
    Ok(address)
}

/// Client credentials grant (RFC 6749 §4.4), client authentication in the form body.
async fn issue_token(
    State(tokens): State<Arc<TokenTable>>,
    Form(form): Form<HashMap<String, String>>,
) -> axum::response::Response {
    use axum::{http::StatusCode, response::IntoResponse};

    let field = |name: &str| form.get(name).map(String::as_str);
    if field("client_id") != Some(CLIENT_ID) || field("client_secret") != Some(CLIENT_SECRET) {
        let body = Json(json!({ "error": "invalid_client" }));
        return (StatusCode::UNAUTHORIZED, body).into_response();
    }
    if field("grant_type") != Some("client_credentials") {
        let body = Json(json!({ "error": "unsupported_grant_type" }));
        return (StatusCode::BAD_REQUEST, body).into_response();
    }

    Json(json!({
        "access_token": tokens.issue(),
        "token_type": "Bearer",
        "expires_in": TOKEN_LIFETIME.as_secs(),
    }))
    .into_response()
}

/// The gRPC server: every call needs a valid token, checked by an interceptor before the
/// service sees it.
async fn serve_grpc(tokens: Arc<TokenTable>) -> Result<SocketAddr, BoxError> {
    let interceptor = move |request: tonic::Request<()>| {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        if token.is_some_and(|token| tokens.accepts(token)) {
            Ok(request)
        } else {
            tokens.rejected.fetch_add(1, Ordering::Relaxed);
            Err(Status::unauthenticated("token expired or revoked"))
        }
    };
    let service = EchoServer::with_interceptor(EchoService, interceptor);

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        let served = Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
        if let Err(err) = served {
            eprintln!("tonic: the gRPC server stopped: {err}");
        }
    });
    Ok(address)
}

struct EchoService;

type ReplyStream = std::pin::Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, Status> {
        let message = request.into_inner().message;
        Ok(tonic::Response::new(EchoReply { message, count: 1 }))
    }

    async fn collect(
        &self,
        request: tonic::Request<tonic::Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<EchoReply>, Status> {
        let mut inbound = request.into_inner();
        let mut message = String::new();
        let mut count = 0;
        while let Some(request) = inbound.message().await? {
            message.push_str(&request.message);
            count += 1;
        }
        Ok(tonic::Response::new(EchoReply { message, count }))
    }

    type RepeatStream = ReplyStream;

    async fn repeat(
        &self,
        request: tonic::Request<RepeatRequest>,
    ) -> Result<tonic::Response<ReplyStream>, Status> {
        let RepeatRequest { message, times } = request.into_inner();
        let replies = (1..=times).map(move |count| {
            Ok(EchoReply {
                message: message.clone(),
                count,
            })
        });
        Ok(tonic::Response::new(Box::pin(tokio_stream::iter(replies))))
    }

    type ChatStream = ReplyStream;

    async fn chat(
        &self,
        request: tonic::Request<tonic::Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<ReplyStream>, Status> {
        let replies = request.into_inner().map(|request| {
            request.map(|request| EchoReply {
                message: request.message,
                count: 1,
            })
        });
        Ok(tonic::Response::new(Box::pin(replies)))
    }
}
