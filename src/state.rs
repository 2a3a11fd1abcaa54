//! The token state that every clone of a layer shares.
//!
//! Reading the current token is lock-free: the installed token sits behind an `ArcSwapOption`
//! and a request only loads it, reads the clock when the token has a known expiry, and copies
//! the prepared header value. Everything else (starting a refresh, joining one, remembering a
//! failure) happens under one small mutex that the fresh-token path never touches.
//!
//! A refresh runs on a task of its own (R4), so a caller that stops waiting never cancels it,
//! and its outcome is published on a `watch` channel that every waiter holds (R3). Flights are
//! keyed by generation (R5): a flight always replaces the generation that is current when it
//! starts, and a caller that asks to replace an older generation gets the newer token at once.

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, PoisonError,
    },
    time::Duration,
};

use http::HeaderValue;
use tokio::sync::broadcast;
use tracing::Instrument;

use crate::{
    source::DynSource,
    sync::{self, watch, AtomicBool, AtomicU8, Instant, Mutex, MutexGuard, Runtime, TokenCell},
    Error, Token,
};

/// The token may be sent.
const VALID: u8 = 0;
/// A server rejected the token; it is not sent while a refresh replaces it.
const REJECTED: u8 = 1;
/// The application invalidated the token; it is never sent again.
const INVALIDATED: u8 = 2;

/// The longest back-off after failed refreshes, whatever the settings say.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// How many installed tokens a subscriber may fall behind before it misses the oldest.
const UPDATES_CAPACITY: usize = 64;

/// The longest header value a token may make; longer tokens are refused.
pub(crate) const MAX_HEADER_LEN: usize = 32 * 1024;

/// Why a refresh was started; recorded in traces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cause {
    /// No token was installed yet.
    FirstUse,
    /// The token entered its refresh window; callers keep using it meanwhile.
    Stale,
    /// The token expired (or was invalidated); callers wait.
    Expired,
    /// A server rejected the token.
    Rejected,
    /// The application asked for it through the handle.
    Forced,
}

/// Settings of the token state, shared by every clone of a layer.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub(crate) refresh_ahead: Duration,
    pub(crate) expiry_margin: Duration,
    pub(crate) refresh_timeout: Duration,
    pub(crate) failure_backoff: Duration,
    pub(crate) max_failure_backoff: Duration,
    pub(crate) scheme: Option<String>,
    pub(crate) refresh_jitter: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            refresh_ahead: Duration::from_secs(120),
            expiry_margin: Duration::from_secs(30),
            refresh_timeout: Duration::from_secs(10),
            failure_backoff: Duration::from_secs(1),
            max_failure_backoff: Duration::from_secs(30),
            scheme: Some("Bearer".to_owned()),
            refresh_jitter: Duration::ZERO,
        }
    }
}

/// A token in service, with its header value prepared and its deadlines computed.
#[derive(Debug)]
pub(crate) struct Installed {
    pub(crate) generation: u64,
    pub(crate) header: HeaderValue,
    pub(crate) token: Token,
    /// From here on a background refresh is started; `None` when the expiry is unknown.
    stale_at: Option<Instant>,
    /// From here on the token is never sent.
    expired_at: Option<Instant>,
    /// Why the token may not be sent any more: [`VALID`], [`REJECTED`] or [`INVALIDATED`].
    invalidated: AtomicU8,
    /// A background refresh was asked for while this token was stale.
    background: AtomicBool,
}

/// How a request may use the current token.
pub(crate) enum Current {
    /// Attach this header; it was installed as `generation`.
    Ready {
        header: HeaderValue,
        generation: u64,
    },
    /// Wait for a token that replaces `seen` (0: none was installed).
    Wait { seen: u64, cause: Cause },
}

enum Freshness {
    Fresh,
    Stale,
    Expired,
}

impl Installed {
    fn new(
        token: Token,
        generation: u64,
        settings: &Settings,
        now: Instant,
    ) -> Result<Self, Error> {
        let header = header_value(&token, settings.scheme.as_deref())?;

        let (stale_at, expired_at) = match token.expires_at() {
            None => (None, None),
            Some(expires_at) => {
                // NOTE: margins are clamped to the token's lifetime (R2), so a short-lived token
                // is still used and no setting makes every call refresh.
                let lifetime = expires_at.saturating_duration_since(now);
                let margin = settings.expiry_margin.min(lifetime / 4);
                let ahead = settings.refresh_ahead.min(lifetime / 2).max(margin);
                // Many processes started together spread their refreshes over the jitter,
                // which is kept within the first half of what is left of the lifetime.
                let spread = settings
                    .refresh_jitter
                    .min(lifetime.saturating_sub(ahead) / 2)
                    .mul_f64(random_unit());
                let at = |before: Duration| expires_at.checked_sub(before).unwrap_or(now);
                (Some(at(ahead + spread)), Some(at(margin)))
            }
        };
        let stale_at = match (stale_at, token.refresh_at()) {
            (Some(stale_at), Some(asked)) => Some(stale_at.min(asked)),
            (stale_at, asked) => stale_at.or(asked),
        };

        Ok(Self {
            generation,
            header,
            token,
            stale_at,
            expired_at,
            invalidated: AtomicU8::new(VALID),
            background: AtomicBool::new(false),
        })
    }

    pub(crate) fn is_invalidated(&self) -> bool {
        self.invalidated.load(Ordering::Relaxed) != VALID
    }

    fn freshness(&self) -> Freshness {
        if self.invalidated.load(Ordering::Relaxed) != VALID {
            return Freshness::Expired;
        }
        if self.stale_at.is_none() {
            // NOTE: `expired_at` is set only with `stale_at`: no deadline, no clock read.
            return Freshness::Fresh;
        }

        let now = sync::now();
        if self.expired_at.is_some_and(|expired_at| now >= expired_at) {
            Freshness::Expired
        } else if self.stale_at.is_some_and(|stale_at| now >= stale_at) {
            Freshness::Stale
        } else {
            Freshness::Fresh
        }
    }
}

fn header_value(token: &Token, scheme: Option<&str>) -> Result<HeaderValue, Error> {
    let secret = token.expose_secret();
    if secret.is_empty() {
        return Err(Error::invalid_token("token is empty"));
    }

    let mut bytes = Vec::with_capacity(secret.len() + scheme.map_or(0, |s| s.len() + 1));
    if let Some(scheme) = scheme {
        bytes.extend_from_slice(scheme.as_bytes());
        bytes.push(b' ');
    }
    bytes.extend_from_slice(secret.as_bytes());
    if bytes.len() > MAX_HEADER_LEN {
        return Err(Error::invalid_token("token is too long for a header"));
    }

    // NOTE: only visible ASCII is accepted, so a token can never smuggle a line break or a
    // second header into the request.
    if !bytes.iter().all(|b| (0x21..0x7f).contains(b) || *b == b' ') {
        return Err(Error::invalid_token(
            "token holds characters that are not allowed in a header",
        ));
    }
    let mut value = HeaderValue::from_maybe_shared(bytes::Bytes::from(bytes))
        .map_err(|_| Error::invalid_token("token is not a valid header value"))?;
    value.set_sensitive(true);
    Ok(value)
}

/// Counters of what the layer did, for [`Stats`](crate::Stats).
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) refreshes: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) coalesced: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) rejections: AtomicU64,
    pub(crate) passed_through: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// What the mutex guards: the flight in progress and the last failure.
#[derive(Default)]
struct Slot {
    flight: Option<Flight>,
    failure: Option<Failure>,
    consecutive_failures: u32,
    next_flight_id: u64,
}

struct Flight {
    id: u64,
    outcome: watch::Receiver<Option<Outcome>>,
    /// The refresh timeout passed: the waiters were released, the fetch goes on.
    late: bool,
}

struct Failure {
    /// The generation that the failed flight meant to replace.
    generation: u64,
    until: Instant,
    error: Error,
}

type Outcome = Result<Arc<Installed>, Error>;

/// What a caller that needs a new token gets at once.
enum Ticket {
    Ready(Arc<Installed>),
    Failed(Error),
    Wait(watch::Receiver<Option<Outcome>>),
}

/// The shared token state.
pub(crate) struct TokenState {
    current: TokenCell<Installed>,
    slot: Mutex<Slot>,
    source: Arc<dyn DynSource>,
    settings: std::sync::Mutex<Settings>,
    pub(crate) counters: Counters,
    updates: broadcast::Sender<Token>,
}

impl fmt::Debug for TokenState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let generation = self.current.load().as_ref().map(|c| c.generation);
        f.debug_struct("TokenState")
            .field("generation", &generation)
            .finish_non_exhaustive()
    }
}

impl TokenState {
    pub(crate) fn new(source: Arc<dyn DynSource>) -> Self {
        Self {
            current: TokenCell::empty(),
            slot: Mutex::new(Slot::default()),
            source,
            settings: std::sync::Mutex::new(Settings::default()),
            counters: Counters::default(),
            updates: broadcast::Sender::new(UPDATES_CAPACITY),
        }
    }

    pub(crate) fn update_settings(&self, f: impl FnOnce(&mut Settings)) {
        f(&mut self.settings.lock().unwrap_or_else(PoisonError::into_inner));
    }

    fn settings(&self) -> Settings {
        self.settings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn lock(&self) -> MutexGuard<'_, Slot> {
        // NOTE: nothing panics while holding the lock, so poisoning carries no broken state.
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The hot path: which header a request leaves with, or that it must wait.
    pub(crate) fn current(self: &Arc<Self>) -> Current {
        let guard = self.current.load();
        let Some(installed) = guard.as_ref() else {
            return Current::Wait {
                seen: 0,
                cause: Cause::FirstUse,
            };
        };

        match installed.freshness() {
            Freshness::Fresh => {}
            Freshness::Stale => self.refresh_in_background(installed),
            Freshness::Expired => {
                return Current::Wait {
                    seen: installed.generation,
                    cause: Cause::Expired,
                }
            }
        }
        Current::Ready {
            header: installed.header.clone(),
            generation: installed.generation,
        }
    }

    /// The token in service, if any.
    pub(crate) fn installed(&self) -> Option<Arc<Installed>> {
        self.current.load_full()
    }

    /// Waits for a token that replaces generation `seen`, starting or joining the one flight.
    ///
    /// Returns at once with the current token when it is already newer than `seen` (R5), and
    /// with the remembered error while a failed flight's back-off lasts (R9).
    pub(crate) async fn renew(self: Arc<Self>, seen: u64, cause: Cause) -> Outcome {
        let ticket = self.ticket(seen, cause, false);
        Self::redeem(ticket).await
    }

    /// Starts a refresh of the current token, even during a failure back-off, and waits for it.
    pub(crate) async fn force(self: Arc<Self>) -> Outcome {
        let seen = self.installed().map_or(0, |c| c.generation);
        let ticket = self.ticket(seen, Cause::Forced, true);
        Self::redeem(ticket).await
    }

    /// Marks generation `generation`, when it is still in service, as rejected by a server
    /// after its response had started (gRPC UNAUTHENTICATED in trailers): the next caller
    /// refreshes first.
    pub(crate) fn suspect(&self, generation: u64) {
        Counters::bump(&self.counters.rejections);
        Counters::bump(&self.counters.passed_through);
        if let Some(current) = self.current.load().as_ref() {
            if current.generation == generation {
                tracing::debug!(
                    generation,
                    "token rejected in trailers, refreshing before the next call"
                );
                let _ = current.invalidated.compare_exchange(
                    VALID,
                    REJECTED,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
        }
    }

    /// Marks the token in service as unusable, so the next caller refreshes first.
    pub(crate) fn invalidate(&self) {
        if let Some(current) = self.current.load().as_ref() {
            current.invalidated.store(INVALIDATED, Ordering::Relaxed);
        }
    }

    /// Starts a refresh that replaces generation `seen` unless one runs, a newer token is
    /// installed, or a failure back-off lasts. Does not wait.
    pub(crate) fn refresh_soon(self: &Arc<Self>, seen: u64, cause: Cause) {
        drop(self.ticket(seen, cause, false));
    }

    /// Subscribes to installed tokens.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Token> {
        self.updates.subscribe()
    }

    fn refresh_in_background(self: &Arc<Self>, installed: &Installed) {
        // NOTE: the flag makes this a single atomic load for every stale-path request after
        // the first; the flight resets it if it fails, once its back-off is over.
        if installed.background.load(Ordering::Relaxed)
            || installed.background.swap(true, Ordering::AcqRel)
        {
            return;
        }
        self.refresh_soon(installed.generation, Cause::Stale);
    }

    async fn redeem(ticket: Ticket) -> Outcome {
        match ticket {
            Ticket::Ready(installed) => Ok(installed),
            Ticket::Failed(err) => Err(err),
            Ticket::Wait(mut outcome) => match outcome.wait_for(Option::is_some).await {
                Ok(outcome) => outcome.clone().unwrap_or_else(|| Err(Error::aborted())),
                Err(_) => Err(Error::aborted()),
            },
        }
    }

    fn ticket(self: &Arc<Self>, seen: u64, cause: Cause, force: bool) -> Ticket {
        let mut slot = self.lock();

        let current = self.current.load_full();
        let generation = current.as_ref().map_or(0, |c| c.generation);
        if generation > seen {
            if let Some(current) = current {
                tracing::trace!(seen, generation, "newer token already installed");
                return Ticket::Ready(current);
            }
        }

        // NOTE: a flight always replaces the generation that was current when it started, and
        // installing clears the flight under this lock: a running flight replaces `seen`.
        if let Some(flight) = &slot.flight {
            if flight.late {
                // Its waiters got a timeout; it may still install a rotated token, and no
                // second refresh may start meanwhile.
                return Ticket::Failed(Error::timeout());
            }
            Counters::bump(&self.counters.coalesced);
            let outcome = flight.outcome.clone();
            drop(slot);
            self.mark_rejected(current.as_deref(), cause);
            return Ticket::Wait(outcome);
        }

        if !force {
            if let Some(failure) = &slot.failure {
                if failure.generation == generation && sync::now() < failure.until {
                    tracing::trace!(generation, "refresh failed recently, not retrying yet");
                    return Ticket::Failed(failure.error.clone());
                }
            }
        }

        let Some(runtime) = Runtime::current() else {
            tracing::warn!("token refresh needs a tokio runtime, and none is running");
            return Ticket::Failed(Error::config("no tokio runtime to run the refresh on"));
        };

        let (sender, receiver) = watch::channel(None);
        let id = slot.next_flight_id;
        slot.next_flight_id += 1;
        slot.flight = Some(Flight {
            id,
            outcome: receiver.clone(),
            late: false,
        });
        drop(slot);
        self.mark_rejected(current.as_deref(), cause);

        Counters::bump(&self.counters.refreshes);
        let previous = current.map(|c| c.token.clone());
        let span = tracing::debug_span!("token_refresh", generation = generation + 1, ?cause);
        runtime.spawn(
            Arc::clone(self)
                .fly(id, generation, previous, sender)
                .instrument(span),
        );
        Ticket::Wait(receiver)
    }

    /// A rejected token is not sent again while a refresh replaces it, whatever its expiry
    /// says (F15): callers that arrive meanwhile wait for the new one.
    fn mark_rejected(&self, current: Option<&Installed>, cause: Cause) {
        if let (Some(current), Cause::Rejected) = (current, cause) {
            let _ = current.invalidated.compare_exchange(
                VALID,
                REJECTED,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// The refresh task: fetch, install, publish.
    ///
    /// Waiters get an outcome within the refresh timeout. A fetch that takes longer is
    /// cancelled, unless its source rotates credentials: then it goes on (R4: a rotated
    /// refresh token must not be lost) for up to [`late_grace`] more, while callers get the
    /// timeout error and no second refresh starts.
    async fn fly(
        self: Arc<Self>,
        id: u64,
        replaces: u64,
        previous: Option<Token>,
        sender: watch::Sender<Option<Outcome>>,
    ) {
        let mut guard = FlightGuard {
            state: Some(Arc::clone(&self)),
            id,
        };
        let settings = self.settings();
        let started = sync::now();

        let rotates = self.source.rotates_credentials();
        let mut fetch = Arc::clone(&self.source).fetch_owned(previous);
        let mut released = false;
        let fetched = match sync::timeout(settings.refresh_timeout, &mut fetch).await {
            Ok(fetched) => fetched,
            Err(_) if rotates => {
                // NOTE: the fetch may have used up a refresh token that only its answer
                // replaces (R4): waiters are released, but the fetch goes on, and no other
                // refresh starts until it ends.
                released = true;
                let waiters = self.release_late(id, replaces, &settings, &sender);
                tracing::debug!(waiters, "token refresh is late, waiters released");
                sync::timeout(late_grace(&settings), fetch)
                    .await
                    .unwrap_or_else(|_| Err(Error::timeout()))
            }
            Err(_) => Err(Error::timeout()),
        };
        let now = sync::now();
        let outcome = fetched
            .and_then(|token| Installed::new(token, replaces + 1, &settings, now))
            .map(Arc::new);

        let (waiters, backoff) = {
            let mut slot = self.lock();
            let waiters = sender.receiver_count().saturating_sub(1);
            slot.flight = None;
            let backoff = match &outcome {
                Ok(installed) => {
                    self.current.store(Some(Arc::clone(installed)));
                    // NOTE: sent under the lock, so subscribers see tokens in the order they
                    // were installed. No subscriber is not an error.
                    let _ = self.updates.send(installed.token.clone());
                    slot.failure = None;
                    slot.consecutive_failures = 0;
                    None
                }
                // NOTE: a late flight counted its failure when it released its waiters.
                Err(error) => {
                    Some(self.remember_failure(&mut slot, replaces, error, &settings, !released))
                }
            };
            (waiters, backoff)
        };
        guard.disarm();

        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match &outcome {
            Ok(installed) => {
                tracing::debug!(
                    waiters,
                    elapsed_ms,
                    expires_in_s = installed.token.expires_in().map(|d| d.as_secs()),
                    "token refreshed"
                );
            }
            Err(error) if released => {
                tracing::error!(elapsed_ms, %error, "late token refresh failed");
            }
            Err(error) => {
                Counters::bump(&self.counters.failures);
                tracing::error!(waiters, elapsed_ms, %error, "token refresh failed");
            }
        }
        let installed = outcome.as_ref().ok().map(Arc::clone);
        if !released {
            sender.send_replace(Some(outcome));
        }

        match (installed, backoff) {
            (_, Some(backoff)) => self.after_failure(replaces, backoff).await,
            (Some(installed), None) => Self::pace_background(&installed, &settings).await,
            (None, None) => {}
        }
    }

    /// A token that is stale the moment it is installed (a source that handed back the same
    /// token, or asked to be asked again at once) would otherwise start a background refresh
    /// on every request: such a token asks again at most once per back-off base.
    async fn pace_background(installed: &Installed, settings: &Settings) {
        if matches!(installed.freshness(), Freshness::Fresh) {
            return;
        }
        installed.background.store(true, Ordering::Relaxed);
        sync::sleep(settings.failure_backoff.min(MAX_BACKOFF)).await;
        installed.background.store(false, Ordering::Relaxed);
    }

    /// Gives the waiters of a late flight the timeout error, and marks the flight late so
    /// that nobody joins it and no other flight starts while it runs. Returns the number of
    /// waiters released.
    fn release_late(
        &self,
        id: u64,
        replaces: u64,
        settings: &Settings,
        sender: &watch::Sender<Option<Outcome>>,
    ) -> usize {
        let error = Error::timeout();
        let waiters = {
            let mut slot = self.lock();
            if let Some(flight) = slot.flight.as_mut().filter(|f| f.id == id) {
                flight.late = true;
            }
            self.remember_failure(&mut slot, replaces, &error, settings, true);
            sender.receiver_count().saturating_sub(1)
        };
        Counters::bump(&self.counters.failures);
        sender.send_replace(Some(Err(error)));
        waiters
    }

    /// Remembers a failed refresh for the back-off, counting it among the failures in a row
    /// when `count` is set; returns the back-off.
    fn remember_failure(
        &self,
        slot: &mut Slot,
        replaces: u64,
        error: &Error,
        settings: &Settings,
        count: bool,
    ) -> Duration {
        if count {
            slot.consecutive_failures = slot.consecutive_failures.saturating_add(1);
        }
        // NOTE: a server's Retry-After is honoured up to the longest back-off of the settings
        // (30 s by default): one answer must not take the client down for an hour.
        let asked = error
            .retry_after()
            .unwrap_or_default()
            .min(settings.max_failure_backoff)
            .min(MAX_BACKOFF);
        let backoff = backoff(settings, slot.consecutive_failures).max(asked);
        let now = sync::now();
        slot.failure = Some(Failure {
            generation: replaces,
            until: now.checked_add(backoff).unwrap_or(now),
            error: error.clone(),
        });
        backoff
    }

    /// After a failed refresh, the token it meant to replace goes back into service if only a
    /// rejection had taken it out (R9: one path that keeps answering 401 while the token
    /// endpoint is down must not fail every call), and may ask for a background refresh
    /// again once the back-off is over.
    async fn after_failure(&self, replaces: u64, backoff: Duration) {
        let Some(current) = self.installed().filter(|c| c.generation == replaces) else {
            return;
        };
        let _ = current.invalidated.compare_exchange(
            REJECTED,
            VALID,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );

        // NOTE: a stale-path request that met the back-off started nothing, whichever refresh
        // failed; clearing the flag lets the next one try.
        sync::sleep(backoff).await;
        current.background.store(false, Ordering::Relaxed);
    }
}

/// Clears the flight when the refresh task ends without finishing (a panicking source, a
/// runtime shutting down), so that no later caller joins a dead flight.
struct FlightGuard {
    state: Option<Arc<TokenState>>,
    id: u64,
}

impl FlightGuard {
    fn disarm(&mut self) {
        self.state = None;
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        let Some(state) = self.state.take() else {
            return;
        };
        let mut slot = state.lock();
        if slot.flight.as_ref().is_some_and(|f| f.id == self.id) {
            slot.flight = None;
        }
    }
}

/// How long a late fetch of a source that rotates credentials may go on after the refresh
/// timeout: a minute, or six refresh timeouts if that is longer.
fn late_grace(settings: &Settings) -> Duration {
    settings
        .refresh_timeout
        .saturating_mul(6)
        .max(Duration::from_secs(60))
}

/// The jittered back-off after `failures` failures in a row: doubling from the base, capped,
/// then scaled by a random factor in [0.5, 1].
fn backoff(settings: &Settings, failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    let base = settings
        .failure_backoff
        .saturating_mul(1 << exponent)
        .min(settings.max_failure_backoff)
        .min(MAX_BACKOFF);
    base.mul_f64(0.5 + random_unit() / 2.0)
}

/// A random number in [0, 1), from the standard library's randomly seeded hasher.
pub(crate) fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};

    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(all(test, token_refresh_loom))]
mod model;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source;
    use std::sync::atomic::AtomicUsize;

    fn counting_source(lifetime: Option<Duration>) -> (Arc<TokenState>, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&calls);
        let source = source::from_fn(move |_previous| {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                let token = Token::new(format!("token-{n}"));
                Ok::<_, Error>(match lifetime {
                    Some(lifetime) => token.with_expires_in(lifetime),
                    None => token,
                })
            }
        });
        (Arc::new(TokenState::new(Arc::new(source))), calls)
    }

    fn header_of(current: Current) -> Option<String> {
        match current {
            Current::Ready { header, .. } => Some(header.to_str().unwrap().to_owned()),
            Current::Wait { .. } => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn r3_many_waiters_share_one_flight() {
        let (state, calls) = counting_source(None);

        let waiters: Vec<_> = (0..100)
            .map(|_| tokio::spawn(Arc::clone(&state).renew(0, Cause::FirstUse)))
            .collect();
        for waiter in waiters {
            assert_eq!(waiter.await.unwrap().unwrap().generation, 1);
        }

        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(state.counters.refreshes.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn r5_asking_to_replace_an_old_generation_returns_the_new_one() {
        let (state, calls) = counting_source(None);
        Arc::clone(&state).renew(0, Cause::FirstUse).await.unwrap();
        Arc::clone(&state).renew(1, Cause::Rejected).await.unwrap();

        let late = Arc::clone(&state).renew(1, Cause::Rejected).await.unwrap();

        assert_eq!(late.generation, 2);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn r2_short_tokens_are_fresh_then_stale_then_expired() {
        let (state, calls) = counting_source(Some(Duration::from_secs(4)));
        Arc::clone(&state).renew(0, Cause::FirstUse).await.unwrap();

        // Fresh for half the lifetime, stale until the last quarter, expired after.
        assert_eq!(
            header_of(state.current()).as_deref(),
            Some("Bearer token-1")
        );
        tokio::time::advance(Duration::from_millis(2100)).await;
        assert_eq!(
            header_of(state.current()).as_deref(),
            Some("Bearer token-1")
        );
        tokio::task::yield_now().await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "stale token refreshed in background"
        );
        assert_eq!(
            header_of(state.current()).as_deref(),
            Some("Bearer token-2")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn r2_an_expired_token_is_never_handed_out() {
        let (state, _calls) = counting_source(Some(Duration::from_secs(4)));
        Arc::clone(&state).renew(0, Cause::FirstUse).await.unwrap();

        tokio::time::advance(Duration::from_millis(3100)).await;

        assert!(matches!(
            state.current(),
            Current::Wait {
                seen: 1,
                cause: Cause::Expired
            }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_can_ask_to_be_asked_again_before_expiry() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&calls);
        let source = source::from_fn(move |_previous| {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                let asked = sync::now() + Duration::from_secs(30);
                Ok::<_, Error>(Token::new(format!("token-{n}")).with_refresh_at(asked))
            }
        });
        let state = Arc::new(TokenState::new(Arc::new(source)));
        Arc::clone(&state).renew(0, Cause::FirstUse).await.unwrap();

        assert_eq!(
            header_of(state.current()).as_deref(),
            Some("Bearer token-1")
        );
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(
            header_of(state.current()).as_deref(),
            Some("Bearer token-1")
        );
        tokio::task::yield_now().await;
        assert_eq!(
            header_of(state.current()).as_deref(),
            Some("Bearer token-2")
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_that_asks_again_at_once_is_paced() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&calls);
        let source = source::from_fn(move |_previous| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, Error>(Token::new("same").with_refresh_at(sync::now())) }
        });
        let state = Arc::new(TokenState::new(Arc::new(source)));
        Arc::clone(&state).renew(0, Cause::FirstUse).await.unwrap();

        for _ in 0..20 {
            assert!(header_of(state.current()).is_some());
            tokio::task::yield_now().await;
        }
        let within_a_second = calls.load(Ordering::SeqCst);
        sync::sleep(Duration::from_millis(1100)).await;
        assert!(header_of(state.current()).is_some());
        tokio::task::yield_now().await;

        assert_eq!(within_a_second, 1);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn refresh_jitter_spreads_refreshes_before_the_window() {
        let settings = Settings {
            refresh_jitter: Duration::from_secs(60),
            ..Settings::default()
        };
        let now = sync::now();
        let expires_at = now + Duration::from_secs(3600);

        let starts: Vec<_> = (0..50)
            .map(|_| {
                let token = Token::new("t").with_expires_at(expires_at);
                let installed = Installed::new(token, 1, &settings, now).unwrap();
                expires_at - installed.stale_at.unwrap()
            })
            .collect();

        assert!(starts.iter().all(
            |before| *before >= Duration::from_secs(120) && *before <= Duration::from_secs(180)
        ));
        assert!(
            starts.iter().any(|before| *before != starts[0]),
            "spread, not one moment"
        );
    }

    proptest::proptest! {
        #[test]
        fn r2_deadlines_are_ordered_and_clamped_whatever_the_settings(
            lifetime_ms in proptest::prelude::any::<u64>(),
            margin_ms in proptest::prelude::any::<u64>(),
            ahead_ms in proptest::prelude::any::<u64>(),
            jitter_ms in proptest::prelude::any::<u64>(),
        ) {
            let settings = Settings {
                expiry_margin: Duration::from_millis(margin_ms),
                refresh_ahead: Duration::from_millis(ahead_ms),
                refresh_jitter: Duration::from_millis(jitter_ms),
                ..Settings::default()
            };
            let now = sync::now();
            let token = Token::new("t").with_lifetime_from(now, Duration::from_millis(lifetime_ms));
            let lifetime = token.expires_at().unwrap() - now;

            let installed = Installed::new(token, 1, &settings, now).unwrap();

            let (stale_at, expired_at) = (installed.stale_at.unwrap(), installed.expired_at.unwrap());
            proptest::prop_assert!(now <= stale_at);
            proptest::prop_assert!(stale_at <= expired_at);
            proptest::prop_assert!(expired_at <= now + lifetime);
            // The margin takes at most a quarter of the lifetime: a short token is still used.
            proptest::prop_assert!(expired_at - now >= lifetime - lifetime / 4);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn r2_unknown_expiry_is_always_fresh() {
        let (state, _calls) = counting_source(None);
        Arc::clone(&state).renew(0, Cause::FirstUse).await.unwrap();

        tokio::time::advance(Duration::from_secs(10 * 365 * 24 * 3600)).await;

        assert!(header_of(state.current()).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn r4_a_refresh_outlives_its_cancelled_callers() {
        let (state, calls) = counting_source(None);

        let waiter = tokio::spawn(Arc::clone(&state).renew(0, Cause::FirstUse));
        tokio::task::yield_now().await;
        waiter.abort();
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;

        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(state.installed().unwrap().generation, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn r9_failures_reach_every_waiter_and_are_remembered_briefly() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&calls);
        let source = source::from_fn(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Err::<Token, _>(Error::terminal(std::io::Error::other("revoked"))) }
        });
        let state = Arc::new(TokenState::new(Arc::new(source)));

        let first = Arc::clone(&state)
            .renew(0, Cause::FirstUse)
            .await
            .unwrap_err();
        let second = Arc::clone(&state)
            .renew(0, Cause::FirstUse)
            .await
            .unwrap_err();
        tokio::time::advance(Duration::from_secs(2)).await;
        let third = Arc::clone(&state)
            .renew(0, Cause::FirstUse)
            .await
            .unwrap_err();

        assert!(first.is_terminal() && second.is_terminal() && third.is_terminal());
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "one call per back-off period"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn r4_a_hanging_source_times_out() {
        let source = source::from_fn(|_| std::future::pending::<Result<Token, Error>>());
        let state = Arc::new(TokenState::new(Arc::new(source)));
        state.update_settings(|s| s.refresh_timeout = Duration::from_secs(3));

        let started = sync::now();
        let err = Arc::clone(&state)
            .renew(0, Cause::FirstUse)
            .await
            .unwrap_err();

        assert!(err.is_timeout());
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test]
    async fn a_panicking_source_leaves_no_dead_flight() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&calls);
        let source = source::from_fn(move |_| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                assert!(n > 0, "first fetch panics");
                Ok::<_, Error>(Token::new("ok"))
            }
        });
        let state = Arc::new(TokenState::new(Arc::new(source)));

        let first = Arc::clone(&state)
            .renew(0, Cause::FirstUse)
            .await
            .unwrap_err();
        let second = Arc::clone(&state).renew(0, Cause::FirstUse).await.unwrap();

        assert!(first.is_aborted());
        assert_eq!(second.generation, 1);
    }

    #[test]
    fn hostile_tokens_are_refused_without_echoing_them() {
        for secret in [
            "a\r\nX-Evil: 1",
            "tab\there",
            "é",
            &"x".repeat(MAX_HEADER_LEN),
        ] {
            let err = header_value(&Token::new(secret), Some("Bearer")).unwrap_err();
            assert!(err.is_invalid_token());
            assert!(!err.to_string().contains(secret));
        }
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let settings = Settings::default();

        let first = backoff(&settings, 1);
        let tenth = backoff(&settings, 10);

        assert!(first >= Duration::from_millis(500) && first <= Duration::from_secs(1));
        assert!(tenth >= Duration::from_secs(15) && tenth <= Duration::from_secs(30));
    }
}
