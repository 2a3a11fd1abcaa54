//! [`Refresh`]: attach the token, and hand the request to the response future.

use std::{
    fmt, mem,
    ops::Deref,
    sync::{Arc, Mutex, OnceLock, PoisonError},
    task::{Context, Poll},
};

use http::{Request, Response};
use http_body::Body;
use tower::Service;

use crate::{
    body::{Replay, ReplayBodies, ReplayPolicy, ResponseBody},
    future::ResponseFuture,
    layer::{Common, Origin},
    state::Current,
    BoxError,
};

/// Attaches the current token to every request, and retries a request once when its token
/// is rejected. Built by [`RefreshLayer`](crate::RefreshLayer).
///
/// Clones share the token state of the layer they came from.
pub struct Refresh<S, R = ReplayBodies> {
    inner: S,
    shared: Arc<Shared<S>>,
    replay: R,
}

/// What every clone of one [`Refresh`] shares, and its response futures hold: the layer's
/// settings and token state, and a spare of the wrapped service for retries.
pub(crate) struct Shared<S> {
    common: Common,
    /// A clone of the wrapped service, taken at the first call that may need a retry. A
    /// rejected request's retry goes through a clone of it, so that a request whose token is
    /// accepted clones no service.
    spare: OnceLock<Mutex<S>>,
}

impl<S> Deref for Shared<S> {
    type Target = Common;

    fn deref(&self) -> &Common {
        &self.common
    }
}

impl<S: Clone> Shared<S> {
    /// A service to send a retry on.
    pub(crate) fn spare(&self) -> Option<S> {
        let spare = self.spare.get()?;
        // NOTE: the lock only guards clones of the service; a panicking clone breaks nothing.
        Some(spare.lock().unwrap_or_else(PoisonError::into_inner).clone())
    }
}

/// Marks a request that is a retry because of its token, and the response to such a retry,
/// so that no other copy of the layer in the same stack retries it again (R6).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Retried;

impl<S, R> Refresh<S, R> {
    pub(crate) fn from_parts(inner: S, common: Common, replay: R) -> Self {
        Self {
            inner,
            shared: Arc::new(Shared {
                common,
                spare: OnceLock::new(),
            }),
            replay,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    ///
    /// Retries of this service's requests, and of its later clones', go through the changed
    /// service; other clones keep theirs.
    pub fn get_mut(&mut self) -> &mut S {
        // NOTE: the spare that retries are cloned from was taken from the service as it was,
        // and clones share it: this service leaves it and takes a new one at its next call.
        if self.shared.spare.get().is_some() || Arc::strong_count(&self.shared) > 1 {
            self.shared = Arc::new(Shared {
                common: self.shared.common.clone(),
                spare: OnceLock::new(),
            });
        }
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Returns true when the layer leaves this request alone.
    fn passes_through<B>(&self, request: &Request<B>) -> bool {
        let common = &self.shared.common;
        if !common.replace_existing && request.headers().contains_key(&common.header_name) {
            return true;
        }
        match &common.origins {
            Some(origins) => !Origin::allows(origins, request.uri()),
            None => false,
        }
    }
}

impl<S, R, B, ResBody> Service<Request<B>> for Refresh<S, R>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    R: ReplayPolicy<B>,
    ResBody: Body + Send + 'static,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        // NOTE: the service that was driven to readiness takes this request. It is called in
        // place unless the response future needs a service of its own (to send a retry, or
        // to be driven to readiness once a token is there); then a clone stays behind for the
        // next request, as tower's rule for cloned inner services asks.
        if self.passes_through(&request) {
            return ResponseFuture::passthrough(self.inner.call(request));
        }

        let shared = Arc::clone(&self.shared);
        let common = &shared.common;
        let mut retry = None;
        if common.retry && request.extensions().get::<Retried>().is_none() {
            retry = Replay::copy(&request, &self.replay);
            if retry.is_none() {
                (request, retry) = Replay::capture(request, &self.replay, common.replay_limit);
            }
        }

        match common.state.current() {
            Current::Ready { header, generation } => {
                request
                    .headers_mut()
                    .insert(common.header_name.clone(), header);
                if retry.is_some() {
                    // NOTE: the spare is taken once per service; later calls only read it.
                    let _ = shared.spare.get_or_init(|| Mutex::new(self.inner.clone()));
                }
                let future = self.inner.call(request);
                ResponseFuture::sent(future, shared, generation, retry)
            }
            Current::Wait { seen, cause } => {
                // NOTE: the ready service is dropped, and with it any permit or buffer slot it
                // holds: a request waiting for a token must not hold a concurrency limit below
                // the layer, or starve a token source that shares it (R13). A clone is driven
                // to readiness once the token is there.
                tracing::trace!(seen, ?cause, "request waits for a token");
                drop(self.take_ready());
                let service = self.inner.clone();
                ResponseFuture::waiting(shared, seen, cause, service, request, retry)
            }
        }
    }
}

impl<S: Clone, R> Refresh<S, R> {
    /// Takes the service that was driven to readiness, leaving a clone for the next request.
    fn take_ready(&mut self) -> S {
        let clone = self.inner.clone();
        mem::replace(&mut self.inner, clone)
    }
}

impl<S: Clone, R: Clone> Clone for Refresh<S, R> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
            replay: self.replay.clone(),
        }
    }
}

impl<S: fmt::Debug, R> fmt::Debug for Refresh<S, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Refresh")
            .field("inner", &self.inner)
            .field("state", &self.shared.state)
            .finish_non_exhaustive()
    }
}
