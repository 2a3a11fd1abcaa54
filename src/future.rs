//! [`ResponseFuture`]: wait for a token if needed, send, judge the response, retry once.

use std::{
    fmt,
    future::Future,
    pin::{pin, Pin},
    sync::Arc,
    task::{ready, Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tower::Service;

use crate::{
    body::{Replay, ResponseBody},
    layer::Common,
    service::{Retried, Shared},
    state::{Cause, Counters, Installed, TokenState},
    BoxError, Error,
};

/// How much of a rejected response's body is read before the retry, so that the connection
/// can be reused; a longer body is dropped instead.
const DRAIN_LIMIT: usize = 64 * 1024;

/// How long reading a rejected response's body may take before it is dropped.
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// How long a rejected request waits for the transport to finish, or drop, a streamed body
/// that it is still capturing, before the rejection goes back as it is.
const CAPTURE_TIME: Duration = Duration::from_secs(1);

type TokenFuture = Pin<Box<dyn Future<Output = Result<Arc<Installed>, Error>> + Send>>;

type Deciding<R> = Pin<Box<dyn Future<Output = R> + Send>>;

pin_project! {
    /// The response future of [`Refresh`](crate::Refresh).
    #[project = Proj]
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future, S::Response>,
        common: Option<Arc<Shared<S>>>,
        // The generation of the token the current attempt was sent with.
        generation: u64,
        // The request and the service to send it on, while they wait for a token or for the
        // service to become ready.
        pending: Option<(Request<B>, S)>,
        // What the request keeps for its retry.
        retry: Option<Replay<B>>,
        // After a wait for a token, the service that sent the first attempt, kept to send the
        // retry; otherwise the retry goes through a clone of the layer's spare service.
        service: Option<S>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, R> {
        // The request waits for a first or unexpired token.
        Waiting { token: TokenFuture },
        // The first attempt is in flight.
        First { #[pin] future: F },
        // The token was rejected while the request's streamed body was still being captured:
        // the transport finishes or drops the body before the request can be copied.
        // It holds the rejection, and gives it back once the capture is decided.
        Deciding { wait: Deciding<R> },
        // The token was rejected: the rejected body is drained while a new token comes.
        Renewing { token: TokenFuture },
        // The request, with its token, waits for its service to become ready: after a wait
        // for a token (`retry: false`) or a rejection (`retry: true`).
        Readying { retry: bool },
        // The retry is in flight.
        Retry { #[pin] future: F },
        // A request the layer leaves alone.
        Passthrough { #[pin] future: F },
        Done,
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn passthrough(future: S::Future) -> Self {
        Self {
            state: State::Passthrough { future },
            common: None,
            generation: 0,
            pending: None,
            retry: None,
            service: None,
        }
    }

    pub(crate) fn sent(
        future: S::Future,
        common: Arc<Shared<S>>,
        generation: u64,
        retry: Option<Replay<B>>,
    ) -> Self {
        Self {
            state: State::First { future },
            common: Some(common),
            generation,
            pending: None,
            retry,
            service: None,
        }
    }

    pub(crate) fn waiting(
        common: Arc<Shared<S>>,
        seen: u64,
        cause: Cause,
        service: S,
        request: Request<B>,
        retry: Option<Replay<B>>,
    ) -> Self {
        let token = Box::pin(Arc::clone(&common.state).renew(seen, cause));
        Self {
            state: State::Waiting { token },
            common: Some(common),
            generation: seen,
            pending: Some((request, service)),
            retry,
            service: None,
        }
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    ResBody: Body + Send + 'static,
{
    type Output = Result<Response<ResponseBody<ResBody>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Passthrough { future } => {
                    let result = ready!(future.poll(cx)).map_err(Into::into);
                    this.state.set(State::Done);
                    return Poll::Ready(result.map(|r| r.map(ResponseBody::plain)));
                }
                StateProj::Waiting { token } => {
                    let installed = match ready!(token.as_mut().poll(cx)) {
                        Ok(installed) => installed,
                        Err(error) => {
                            // NOTE: a request is never sent without a token (R9).
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error.into()));
                        }
                    };
                    let common = this.common.as_ref().expect("waiting without common");
                    let (request, _) = this.pending.as_mut().expect("waiting without a request");

                    request
                        .headers_mut()
                        .insert(common.header_name.clone(), installed.header.clone());
                    *this.generation = installed.generation;
                    this.state.set(State::Readying { retry: false });
                }
                StateProj::First { future } => {
                    let result = ready!(future.poll(cx));
                    let mut response = match result {
                        Ok(response) => response,
                        Err(error) => {
                            *this.retry = None;
                            *this.service = None;
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error.into()));
                        }
                    };
                    let common = this.common.as_ref().expect("first attempt without common");
                    if response.extensions().get::<Retried>().is_some() {
                        // NOTE: another copy of the layer below this one already retried this
                        // request once (R6); its answer goes back as it is.
                        *this.retry = None;
                        *this.service = None;
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(response.map(ResponseBody::plain)));
                    }
                    if !judge(common, &mut response) {
                        // NOTE: dropping the retry's share releases a captured body at once.
                        *this.retry = None;
                        *this.service = None;
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(watched(common, *this.generation, response)));
                    }

                    if let Some(capture) = this.retry.as_ref().and_then(Replay::undecided) {
                        tracing::trace!("token rejected while the request body is being sent");
                        // NOTE: the refresh starts now, not after the wait: a caller that gives
                        // up meanwhile must not leave the rejected token in service (R4).
                        common.state.refresh_soon(*this.generation, Cause::Rejected);
                        let wait = Box::pin(async move {
                            let _ = crate::sync::timeout(CAPTURE_TIME, capture.decided()).await;
                            response
                        });
                        this.state.set(State::Deciding { wait });
                        continue;
                    }
                    if let Some(response) = this.after_rejection(response) {
                        return Poll::Ready(Ok(response));
                    }
                }
                StateProj::Deciding { wait } => {
                    let response = ready!(wait.as_mut().poll(cx));
                    if let Some(response) = this.after_rejection(response) {
                        return Poll::Ready(Ok(response));
                    }
                }
                StateProj::Renewing { token } => {
                    let installed = match ready!(token.as_mut().poll(cx)) {
                        Ok(installed) => installed,
                        Err(error) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error.into()));
                        }
                    };
                    let common = this.common.as_ref().expect("renewing without common");
                    let (mut request, service) =
                        this.pending.take().expect("renewing without a request");

                    request
                        .headers_mut()
                        .insert(common.header_name.clone(), installed.header.clone());
                    request.extensions_mut().insert(Retried);
                    *this.generation = installed.generation;
                    *this.pending = Some((request, service));
                    this.state.set(State::Readying { retry: true });
                }
                StateProj::Readying { retry } => {
                    let retry = *retry;
                    let (_, service) = this.pending.as_mut().expect("readying without a request");
                    if let Err(error) = ready!(service.poll_ready(cx)) {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(error.into()));
                    }
                    let (request, mut service) = this.pending.take().expect("checked above");

                    let future = service.call(request);
                    if retry {
                        let common = this.common.as_ref().expect("retry without common");
                        Counters::bump(&common.state.counters.retries);
                        this.state.set(State::Retry { future });
                    } else {
                        if this.retry.is_some() {
                            *this.service = Some(service);
                        }
                        this.state.set(State::First { future });
                    }
                }
                StateProj::Retry { future } => {
                    let result = ready!(future.poll(cx));
                    this.state.set(State::Done);
                    let mut response = result.map_err(Into::into)?;

                    // NOTE: one retry, then the truth (R6): a second rejection is returned as it
                    // is, and does not start another refresh.
                    let common = this.common.as_ref().expect("retry without common");
                    if judge(common, &mut response) {
                        tracing::debug!(
                            generation = *this.generation,
                            "retried request rejected again"
                        );
                        Counters::bump(&common.state.counters.passed_through);
                        response.extensions_mut().insert(Retried);
                        return Poll::Ready(Ok(response.map(ResponseBody::plain)));
                    }
                    return Poll::Ready(Ok(watched(common, *this.generation, response)));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

impl<S, B, ResBody> Proj<'_, S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    ResBody: Body + Send + 'static,
{
    /// After a rejection: sets the request and a service to send it on aside, and waits for
    /// a new token while the rejected body is drained. When the request cannot be sent
    /// again, returns the rejection as it is; the next call gets a new token.
    fn after_rejection(
        &mut self,
        response: Response<ResBody>,
    ) -> Option<Response<ResponseBody<ResBody>>> {
        let common = self.common.as_ref().expect("rejection without common");
        let state = Arc::clone(&common.state);
        let generation = *self.generation;
        let request = self.retry.take().and_then(Replay::into_request);
        let service = self.service.take();
        *self.pending = request.and_then(|r| Some((r, service.or_else(|| common.spare())?)));
        if self.pending.is_none() {
            tracing::debug!(generation, "token rejected, request cannot be retried");
            Counters::bump(&state.counters.passed_through);
            state.refresh_soon(generation, Cause::Rejected);
            self.state.set(State::Done);
            return Some(response.map(ResponseBody::plain));
        }

        tracing::debug!(generation, "token rejected, retrying with a new one");
        let body = response.into_body();
        let token = Box::pin(renew_while_draining(state, generation, body));
        self.state.set(State::Renewing { token });
        None
    }
}

/// Wraps an accepted response's body; a gRPC response's trailers are watched for
/// UNAUTHENTICATED (R7), which marks the token it was sent with so the next call refreshes.
fn watched<ResBody>(
    common: &Common,
    generation: u64,
    response: Response<ResBody>,
) -> Response<ResponseBody<ResBody>> {
    let grpc = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        let state = Arc::clone(&common.state);
        response.map(|body| ResponseBody::watched(body, state, generation))
    } else {
        response.map(ResponseBody::plain)
    }
}

/// Returns true when `response` rejects the token; puts its Bearer challenge, if any, into its
/// extensions.
fn judge<ResBody>(common: &Common, response: &mut Response<ResBody>) -> bool {
    let verdict = common
        .classifier
        .classify(response.status(), response.headers());
    if let Some(challenge) = verdict.challenge {
        response.extensions_mut().insert(challenge);
    }
    if verdict.rejected {
        Counters::bump(&common.state.counters.rejections);
    }
    verdict.rejected
}

/// Waits for a token that replaces `generation`, reading the rejected body meanwhile; the
/// body is dropped unread as soon as the token is there, so that a slow body never delays
/// the retry.
async fn renew_while_draining<B: Body>(
    state: Arc<TokenState>,
    generation: u64,
    body: B,
) -> Result<Arc<Installed>, Error> {
    let renew = state.renew(generation, Cause::Rejected);
    let drain = drain(body);
    tokio::pin!(renew, drain);

    let mut drained = false;
    loop {
        tokio::select! {
            biased;
            renewed = &mut renew => return renewed,
            () = &mut drain, if !drained => drained = true,
        }
    }
}

/// Reads and discards a rejected response's body, within [`DRAIN_LIMIT`] and [`DRAIN_TIME`].
async fn drain<B: Body>(body: B) {
    let read = async {
        let mut body = pin!(body);
        let mut drained = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(data) = frame.data_ref() {
                drained = drained.saturating_add(bytes::Buf::remaining(data));
                if drained > DRAIN_LIMIT {
                    break;
                }
            }
        }
    };
    let _ = crate::sync::timeout(DRAIN_TIME, read).await;
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}
