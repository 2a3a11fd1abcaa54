//! R7, R8, F14 with tonic: the layer directly under a tonic `Channel`, handed to a generated
//! client, against a real tonic server on 127.0.0.1 whose interceptor answers UNAUTHENTICATED
//! (a trailers-only response, `grpc-status: 16` in the headers) for expired and revoked tokens.
//!
//! The token endpoint is a small HTTP server reached by a real `ClientCredentials` source; it
//! writes every token it issues into the table the gRPC server checks.
#![cfg(feature = "tonic")]

mod common;
#[path = "grpc/echo.rs"]
#[allow(unreachable_pub)] // generated: `pub` items for the modules that use them
mod echo;

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use common::TestServer;
use echo::{
    echo_client::EchoClient,
    echo_server::{Echo, EchoServer},
    EchoReply, EchoRequest, RepeatRequest,
};
use http::StatusCode;
use tokio::{sync::mpsc, sync::Notify, task::JoinSet};
use tokio_stream::{wrappers::ReceiverStream, wrappers::TcpListenerStream, Stream, StreamExt};
use tonic::{
    transport::{Channel, Endpoint, Server},
    Code, Status,
};
use tower::ServiceBuilder;
use tower_token_refresh::{source::oauth2::ClientCredentials, Refresh, RefreshLayer};

/// How long a test waits for a streamed message before it fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(5);

/// The `Repeat` message that makes the server end its stream with UNAUTHENTICATED in the
/// trailers, and revoke the token the call came with.
const END_UNAUTHENTICATED: &str = "end-unauthenticated";

/// The tokens the token endpoint issued, as the gRPC server checks them.
#[derive(Clone, Default)]
struct Tokens(Arc<Mutex<HashMap<String, Issued>>>);

struct Issued {
    expires_at: Instant,
    revoked: bool,
}

impl Tokens {
    fn issue(&self, lifetime: Duration) -> String {
        let mut tokens = self.0.lock().unwrap();
        let token = format!("grpc-token-{}", tokens.len() + 1);
        let issued = Issued {
            expires_at: Instant::now() + lifetime,
            revoked: false,
        };
        tokens.insert(token.clone(), issued);
        token
    }

    fn is_valid(&self, token: &str) -> bool {
        self.0
            .lock()
            .unwrap()
            .get(token)
            .is_some_and(|issued| !issued.revoked && Instant::now() < issued.expires_at)
    }

    fn revoke(&self, token: &str) {
        if let Some(issued) = self.0.lock().unwrap().get_mut(token) {
            issued.revoked = true;
        }
    }

    fn revoke_all(&self) {
        for issued in self.0.lock().unwrap().values_mut() {
            issued.revoked = true;
        }
    }
}

/// A call the service handled, after the interceptor let it through.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Handled {
    method: &'static str,
    token: String,
    message: String,
}

/// The `Echo` service: records what it handles.
#[derive(Clone)]
struct EchoService {
    tokens: Tokens,
    handled: Arc<Mutex<Vec<Handled>>>,
    first_collected: Arc<Notify>,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

fn bearer<T>(request: &tonic::Request<T>) -> String {
    request
        .metadata()
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned()
}

impl EchoService {
    fn record(&self, method: &'static str, token: &str, message: &str) {
        self.handled.lock().unwrap().push(Handled {
            method,
            token: token.to_owned(),
            message: message.to_owned(),
        });
    }
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, Status> {
        let token = bearer(&request);
        let message = request.into_inner().message;

        self.record("Echo", &token, &message);
        Ok(tonic::Response::new(EchoReply { message, count: 1 }))
    }

    async fn collect(
        &self,
        request: tonic::Request<tonic::Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<EchoReply>, Status> {
        let token = bearer(&request);
        let mut inbound = request.into_inner();

        let mut messages = Vec::new();
        while let Some(request) = inbound.message().await? {
            self.record("Collect", &token, &request.message);
            messages.push(request.message);
            if messages.len() == 1 {
                self.first_collected.notify_one();
            }
        }

        let count = u32::try_from(messages.len()).unwrap();
        Ok(tonic::Response::new(EchoReply {
            message: messages.concat(),
            count,
        }))
    }

    type RepeatStream = ReplyStream;

    async fn repeat(
        &self,
        request: tonic::Request<RepeatRequest>,
    ) -> Result<tonic::Response<ReplyStream>, Status> {
        let token = bearer(&request);
        let RepeatRequest { message, times } = request.into_inner();
        self.record("Repeat", &token, &message);

        let mut replies: Vec<Result<EchoReply, Status>> = (1..=times)
            .map(|count| {
                Ok(EchoReply {
                    message: message.clone(),
                    count,
                })
            })
            .collect();
        if message == END_UNAUTHENTICATED {
            // The server decides in the middle of the stream that the token is no good: the
            // status comes in the trailers, after the replies.
            self.tokens.revoke(&token);
            replies.push(Err(Status::unauthenticated("token revoked")));
        }
        Ok(tonic::Response::new(Box::pin(tokio_stream::iter(replies))))
    }

    type ChatStream = ReplyStream;

    async fn chat(
        &self,
        request: tonic::Request<tonic::Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<ReplyStream>, Status> {
        let token = bearer(&request);
        let mut inbound = request.into_inner();
        let service = self.clone();

        let (replies, outbound) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut count = 0;
            while let Ok(Some(request)) = inbound.message().await {
                count += 1;
                service.record("Chat", &token, &request.message);
                let reply = EchoReply {
                    message: request.message,
                    count,
                };
                if replies.send(Ok(reply)).await.is_err() {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(
            outbound,
        ))))
    }
}

/// A token endpoint and a gRPC server on 127.0.0.1, sharing one token table.
struct Peers {
    auth: TestServer,
    tokens: Tokens,
    /// The lifetime of the tokens issued from now on, in milliseconds.
    lifetime_ms: Arc<AtomicU64>,
    /// Calls the interceptor answered with UNAUTHENTICATED.
    rejected: Arc<AtomicUsize>,
    service: EchoService,
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl Peers {
    async fn start() -> Self {
        let tokens = Tokens::default();
        let lifetime_ms = Arc::new(AtomicU64::new(60_000));
        let auth = {
            let tokens = tokens.clone();
            let lifetime_ms = Arc::clone(&lifetime_ms);
            TestServer::start(move |_request| {
                let lifetime = Duration::from_millis(lifetime_ms.load(Ordering::SeqCst));
                let token = tokens.issue(lifetime);
                async move {
                    let body = serde_json::json!({
                        "access_token": token,
                        "token_type": "Bearer",
                        "expires_in": lifetime.as_secs(),
                    });
                    common::respond(
                        StatusCode::OK,
                        &[("content-type", "application/json")],
                        &body.to_string(),
                    )
                }
            })
            .await
        };

        let rejected = Arc::new(AtomicUsize::new(0));
        let interceptor = {
            let tokens = tokens.clone();
            let rejected = Arc::clone(&rejected);
            move |request: tonic::Request<()>| {
                if tokens.is_valid(&bearer(&request)) {
                    Ok(request)
                } else {
                    rejected.fetch_add(1, Ordering::SeqCst);
                    Err(Status::unauthenticated("token expired or revoked"))
                }
            }
        };
        let service = EchoService {
            tokens: tokens.clone(),
            handled: Arc::default(),
            first_collected: Arc::new(Notify::new()),
        };
        let grpc = EchoServer::with_interceptor(service.clone(), interceptor);

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            Server::builder()
                .add_service(grpc)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
                .unwrap();
        });

        Self {
            auth,
            tokens,
            lifetime_ms,
            rejected,
            service,
            addr,
            server,
        }
    }

    fn set_lifetime(&self, lifetime: Duration) {
        let millis = u64::try_from(lifetime.as_millis()).unwrap();
        self.lifetime_ms.store(millis, Ordering::SeqCst);
    }

    fn layer(&self) -> RefreshLayer {
        let source = ClientCredentials::builder(self.auth.url("/token"), "grpc-client", "secret")
            .build()
            .unwrap();
        RefreshLayer::new(source)
    }

    /// The stack the README shows: `Channel`, wrapped in the layer, handed to the generated
    /// client as it is.
    async fn client(&self, layer: RefreshLayer) -> EchoClient<Refresh<Channel>> {
        let channel = Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let service = ServiceBuilder::new().layer(layer).service(channel);
        EchoClient::new(service)
    }

    fn token_requests(&self) -> usize {
        self.auth.hits()
    }

    fn rejected(&self) -> usize {
        self.rejected.load(Ordering::SeqCst)
    }

    fn handled(&self) -> Vec<Handled> {
        self.service.handled.lock().unwrap().clone()
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn echo_request(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.to_owned(),
    }
}

/// Sends `Echo` calls with the given messages at once, on clones of `client`; returns each
/// message with the message of its reply.
async fn echo_all(
    client: &EchoClient<Refresh<Channel>>,
    messages: &[String],
) -> Vec<(String, Result<String, Status>)> {
    let mut calls = JoinSet::new();
    for message in messages {
        let mut client = client.clone();
        let message = message.clone();
        calls.spawn(async move {
            let reply = client.echo(echo_request(&message)).await;
            (message, reply.map(|reply| reply.into_inner().message))
        });
    }
    calls.join_all().await
}

fn messages(round: &str) -> Vec<String> {
    (0..4).map(|i| format!("{round}-{i}")).collect()
}

/// The tokens the handled calls of one round came with.
fn tokens_of(handled: &[Handled], round: &str) -> Vec<String> {
    let mut tokens: Vec<_> = handled
        .iter()
        .filter(|call| call.message.starts_with(round))
        .map(|call| call.token.clone())
        .collect();
    tokens.dedup();
    tokens
}

#[tokio::test]
async fn r5_unary_calls_across_revocation_and_expiry_succeed_with_one_refresh_each() {
    let peers = Peers::start().await;
    let layer = peers.layer();
    let handle = layer.handle();
    let client = peers.client(layer).await;

    // A first token that lives a minute.
    let first = echo_all(&client, &messages("first")).await;
    // Every token revoked: each call is rejected with a trailers-only UNAUTHENTICATED, then
    // replayed with the one new token. That token lives one second.
    peers.tokens.revoke_all();
    peers.set_lifetime(Duration::from_secs(1));
    let revoked = echo_all(&client, &messages("revoked")).await;
    // Past its expiry, the next calls wait for one refresh.
    peers.set_lifetime(Duration::from_secs(60));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let expired = echo_all(&client, &messages("expired")).await;

    for (message, reply) in first.iter().chain(&revoked).chain(&expired) {
        assert_eq!(reply.as_ref().ok(), Some(message), "every call succeeds");
    }
    assert_eq!(
        peers.token_requests(),
        3,
        "the first token, one refresh for the revocation, one for the expiry"
    );
    let handled = peers.handled();
    assert_eq!(handled.len(), 12, "each call handled exactly once");
    let mut received: Vec<_> = handled.iter().map(|call| call.message.clone()).collect();
    let mut sent: Vec<_> = [messages("first"), messages("revoked"), messages("expired")].concat();
    received.sort();
    sent.sort();
    assert_eq!(received, sent, "the replayed calls carried their messages");
    assert_eq!(tokens_of(&handled, "first"), ["grpc-token-1"]);
    assert_eq!(tokens_of(&handled, "revoked"), ["grpc-token-2"]);
    assert_eq!(tokens_of(&handled, "expired"), ["grpc-token-3"]);
    let stats = handle.stats();
    assert_eq!(stats.refreshes, 3);
    assert!(stats.rejections >= 1);
    assert_eq!(stats.rejections, peers.rejected() as u64);
    assert_eq!(
        stats.retries, stats.rejections,
        "every rejected call retried"
    );
    assert_eq!(stats.passed_through, 0);
}

#[tokio::test]
async fn f14_a_trailers_only_unauthenticated_is_refreshed_replayed_and_retried_once() {
    let peers = Peers::start().await;
    let layer = peers.layer();
    let handle = layer.handle();
    handle.refresh().await.unwrap();
    peers.tokens.revoke_all();
    let mut client = peers.client(layer).await;

    let reply = client.echo(echo_request("replay me")).await.unwrap();

    assert_eq!(reply.into_inner().message, "replay me");
    assert_eq!(peers.rejected(), 1);
    assert_eq!(
        peers.handled(),
        [Handled {
            method: "Echo",
            token: "grpc-token-2".into(),
            message: "replay me".into(),
        }],
        "the retry carried the same message with the new token"
    );
    assert_eq!(peers.token_requests(), 2);
    let stats = handle.stats();
    assert_eq!((stats.rejections, stats.retries), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f14_two_hundred_unary_calls_rejected_at_once_share_one_refresh_and_are_all_replayed() {
    // NOTE: the interceptor refuses each call before the service reads its message, so an
    // answer may come before the channel has polled the message's stream to its end. The
    // stand-in transports of `tests/streaming.rs` pin that ordering down; this runs it at
    // scale over a real channel.
    let peers = Peers::start().await;
    let layer = peers.layer();
    let handle = layer.handle();
    handle.refresh().await.unwrap();
    peers.tokens.revoke_all();
    let client = peers.client(layer).await;
    let sent: Vec<String> = (0..200).map(|i| format!("call-{i}")).collect();

    let replies = echo_all(&client, &sent).await;

    for (message, reply) in &replies {
        assert_eq!(reply.as_ref().ok(), Some(message), "every call is replayed");
    }
    assert_eq!(peers.rejected(), 200);
    assert_eq!(peers.token_requests(), 2);
    let stats = handle.stats();
    assert_eq!((stats.rejections, stats.retries), (200, 200));
    assert_eq!(stats.passed_through, 0);
}

#[tokio::test]
async fn f14_unauthenticated_in_trailers_is_returned_as_it_is_and_the_next_call_refreshes() {
    let peers = Peers::start().await;
    let layer = peers.layer();
    let handle = layer.handle();
    let mut client = peers.client(layer).await;
    client.echo(echo_request("before")).await.unwrap();

    let request = RepeatRequest {
        message: END_UNAUTHENTICATED.into(),
        times: 2,
    };
    let mut stream = client.repeat(request).await.unwrap().into_inner();
    let mut replies = Vec::new();
    let status = loop {
        match tokio::time::timeout(PATIENCE, stream.message())
            .await
            .unwrap()
        {
            Ok(Some(reply)) => replies.push(reply.count),
            Ok(None) => panic!("the stream ended without its status"),
            Err(status) => break status,
        }
    };
    let requests_after_stream = peers.token_requests();
    let after = client.echo(echo_request("after")).await.unwrap();

    assert_eq!(replies, [1, 2], "the replies came through as they were");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(requests_after_stream, 1, "no refresh while the stream ran");
    assert_eq!(after.into_inner().message, "after");
    assert_eq!(peers.token_requests(), 2, "the next call refreshed first");
    assert_eq!(
        peers.rejected(),
        0,
        "the next call was not sent with the old token"
    );
    let handled = peers.handled();
    let repeats = handled
        .iter()
        .filter(|call| call.method == "Repeat")
        .count();
    assert_eq!(repeats, 1, "the streamed call was not replayed");
    assert_eq!(tokens_of(&handled, "before"), ["grpc-token-1"]);
    assert_eq!(tokens_of(&handled, "after"), ["grpc-token-2"]);
    let stats = handle.stats();
    assert_eq!(
        (stats.rejections, stats.retries, stats.passed_through),
        (1, 0, 1)
    );
}

#[tokio::test]
async fn r7_a_server_streaming_call_rejected_at_the_start_is_retried() {
    let peers = Peers::start().await;
    let layer = peers.layer();
    let handle = layer.handle();
    handle.refresh().await.unwrap();
    peers.tokens.revoke_all();
    let mut client = peers.client(layer).await;

    let request = RepeatRequest {
        message: "again".into(),
        times: 3,
    };
    let stream = client.repeat(request).await.unwrap().into_inner();
    let replies: Vec<_> = tokio::time::timeout(PATIENCE, stream.collect::<Vec<_>>())
        .await
        .unwrap();

    let counts: Vec<_> = replies
        .into_iter()
        .map(|reply| reply.unwrap().count)
        .collect();
    assert_eq!(counts, [1, 2, 3]);
    assert_eq!(peers.rejected(), 1);
    assert_eq!(tokens_of(&peers.handled(), "again"), ["grpc-token-2"]);
    assert_eq!(handle.stats().retries, 1);
}

#[tokio::test]
async fn r8_a_client_stream_fed_over_time_keeps_streaming() {
    let peers = Peers::start().await;
    let mut client = peers.client(peers.layer()).await;
    let (sender, receiver) = mpsc::channel(1);

    let call = tokio::spawn(async move { client.collect(ReceiverStream::new(receiver)).await });
    sender.send(echo_request("one,")).await.unwrap();
    // Nothing more is sent until the server has the first message: a layer that held the
    // body back would stall here.
    tokio::time::timeout(PATIENCE, peers.service.first_collected.notified())
        .await
        .expect("the server saw the first message before the last was sent");
    for message in ["two,", "three,", "four"] {
        sender.send(echo_request(message)).await.unwrap();
    }
    drop(sender);
    let reply = tokio::time::timeout(PATIENCE, call)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .into_inner();

    assert_eq!(reply.count, 4);
    assert_eq!(reply.message, "one,two,three,four");
}

#[tokio::test]
async fn r8_a_bidirectional_call_is_answered_message_by_message() {
    let peers = Peers::start().await;
    let mut client = peers.client(peers.layer()).await;
    let (sender, receiver) = mpsc::channel(1);

    sender.send(echo_request("ping-1")).await.unwrap();
    let mut replies = client
        .chat(ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    let mut answered = Vec::new();
    for next in ["ping-2", "ping-3", ""] {
        // Each reply arrives before the next message is sent.
        let reply = tokio::time::timeout(PATIENCE, replies.message())
            .await
            .expect("a reply before the next message")
            .unwrap()
            .unwrap();
        answered.push(reply.message);
        if !next.is_empty() {
            sender.send(echo_request(next)).await.unwrap();
        }
    }
    drop(sender);

    assert_eq!(answered, ["ping-1", "ping-2", "ping-3"]);
    let end = tokio::time::timeout(PATIENCE, replies.message()).await;
    assert!(matches!(end, Ok(Ok(None))), "the call ends cleanly");
}

#[tokio::test]
async fn r8_a_client_stream_rejected_beyond_the_replay_limit_returns_unauthenticated() {
    let peers = Peers::start().await;
    let layer = peers.layer().replay_limit(16);
    let handle = layer.handle();
    handle.refresh().await.unwrap();
    peers.tokens.revoke_all();
    let mut client = peers.client(layer).await;
    let messages: Vec<_> = (0..5)
        .map(|i| echo_request(&format!("message number {i}")))
        .collect();

    let rejected = client.collect(tokio_stream::iter(messages)).await;
    let next = client.echo(echo_request("next")).await;

    let status = rejected.expect_err("not retried");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(next.unwrap().into_inner().message, "next");
    assert_eq!(peers.rejected(), 1, "the next call had a new token");
    assert_eq!(peers.token_requests(), 2);
    let handled = peers.handled();
    assert!(handled.iter().all(|call| call.method != "Collect"));
    let stats = handle.stats();
    assert_eq!((stats.retries, stats.passed_through), (0, 1));
}

#[tokio::test]
async fn r8_a_client_stream_rejected_within_the_replay_limit_is_replayed() {
    let peers = Peers::start().await;
    let layer = peers.layer();
    let handle = layer.handle();
    handle.refresh().await.unwrap();
    peers.tokens.revoke_all();
    let mut client = peers.client(layer).await;
    let messages: Vec<_> = (0..5)
        .map(|i| echo_request(&format!("message number {i};")))
        .collect();

    let reply = client
        .collect(tokio_stream::iter(messages))
        .await
        .unwrap()
        .into_inner();

    assert_eq!(reply.count, 5);
    assert_eq!(
        reply.message,
        (0..5)
            .map(|i| format!("message number {i};"))
            .collect::<String>()
    );
    assert_eq!(tokens_of(&peers.handled(), "message"), ["grpc-token-2"]);
    assert_eq!(handle.stats().retries, 1);
}
