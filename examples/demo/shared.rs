//! What the embedded servers share: the table of issued tokens, their counters, and a source
//! of random numbers.

use std::{
    collections::{hash_map::RandomState, HashMap, HashSet},
    hash::{BuildHasher, Hasher},
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, PoisonError,
    },
    time::Duration,
};

use tokio::time::Instant;

/// How long an issued token lives: short, so that a few seconds of load see many refreshes.
pub(crate) const TOKEN_LIFETIME: Duration = Duration::from_secs(2);

/// The scopes the embedded servers know; a token request without `scope` gets all of them.
pub(crate) const READ_SCOPE: &str = "orders:read";
pub(crate) const WRITE_SCOPE: &str = "orders:write";
pub(crate) const KNOWN_SCOPES: [&str; 2] = [READ_SCOPE, WRITE_SCOPE];

/// The tokens the token endpoint issued and the API accepts.
#[derive(Default)]
pub(crate) struct Registry {
    tables: Mutex<Tables>,
}

#[derive(Default)]
struct Tables {
    live: HashMap<String, Grant>,
    /// Revoked tokens, with the number of the revocation that revoked them, until they would
    /// have expired, so that a rejection can say why.
    revoked: HashMap<String, (Grant, u64)>,
    /// Refresh tokens not used yet, with the scopes of the grant each one continues.
    refresh: HashMap<String, Vec<String>>,
    /// Refresh tokens already traded, so that a reuse is told apart from an unknown token.
    /// NOTE: kept for the whole run; a few rotations a second make a small table.
    refreshed: HashSet<String>,
}

struct Grant {
    issued_at: Instant,
    expires_at: Instant,
    scopes: Vec<String>,
}

/// What the API makes of a presented token.
pub(crate) enum Verdict {
    Valid,
    Invalid(Invalid),
    /// Valid, but not for what was asked.
    InsufficientScope,
}

/// A refresh token traded for a new one (RFC 6749 §6).
pub(crate) struct Rotation {
    /// The new refresh token, which continues the same grant.
    pub(crate) refresh_token: String,
    /// The scopes of the new access token.
    pub(crate) scopes: Vec<String>,
}

/// Why a refresh token was not traded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RefreshRefusal {
    /// Traded before: each refresh token works once.
    Reused,
    /// Never issued here.
    Unknown,
    /// The refresh asked for a scope its grant does not hold; the refresh token stays valid.
    ScopeNotGranted,
}

/// Why a token is not valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Invalid {
    Expired,
    /// Revoked by the revocation with this number.
    Revoked(u64),
    /// Never issued here, or expired so long ago that it was forgotten.
    Unknown,
}

impl Registry {
    /// Issues a new opaque token for `scopes`, valid for [`TOKEN_LIFETIME`].
    pub(crate) fn issue(&self, scopes: Vec<String>) -> String {
        let token = format!("demo-{:016x}{:016x}", random_u64(), random_u64());
        let now = Instant::now();
        let grant = Grant {
            issued_at: now,
            expires_at: now + TOKEN_LIFETIME,
            scopes,
        };

        let mut tables = self.lock();
        // Tokens are forgotten a lifetime after they expired: the tables stay small, and a
        // token that expired recently is still told apart from an unknown one.
        tables
            .live
            .retain(|_, grant| grant.expires_at + TOKEN_LIFETIME > now);
        tables
            .revoked
            .retain(|_, (grant, _)| grant.expires_at + TOKEN_LIFETIME > now);
        tables.live.insert(token.clone(), grant);
        token
    }

    /// Makes `refresh_token` (or, if `None`, a new random one) a valid refresh token for a
    /// grant of `scopes`, as if the client had got it at its login; returns it.
    pub(crate) fn seed_refresh_token(
        &self,
        refresh_token: Option<String>,
        scopes: Vec<String>,
    ) -> String {
        let refresh_token = refresh_token.unwrap_or_else(new_refresh_token);

        self.lock().refresh.insert(refresh_token.clone(), scopes);
        refresh_token
    }

    /// Trades `presented` for a new refresh token of the same grant, once: the new access
    /// token gets the `requested` scopes, or the grant's when none are requested.
    pub(crate) fn rotate_refresh_token(
        &self,
        presented: &str,
        requested: &[&str],
    ) -> Result<Rotation, RefreshRefusal> {
        let mut tables = self.lock();

        let Some(granted) = tables.refresh.get(presented) else {
            return Err(if tables.refreshed.contains(presented) {
                RefreshRefusal::Reused
            } else {
                RefreshRefusal::Unknown
            });
        };
        // RFC 6749 §6: a refresh may narrow the scopes of the grant, never widen them.
        if !requested.iter().all(|s| granted.iter().any(|g| g == s)) {
            return Err(RefreshRefusal::ScopeNotGranted);
        }
        let scopes = if requested.is_empty() {
            granted.clone()
        } else {
            requested.iter().map(|s| (*s).to_owned()).collect()
        };

        let granted = tables.refresh.remove(presented).expect("looked up above");
        tables.refreshed.insert(presented.to_owned());
        let refresh_token = new_refresh_token();
        tables.refresh.insert(refresh_token.clone(), granted);
        Ok(Rotation {
            refresh_token,
            scopes,
        })
    }

    /// Judges `token` for a request that needs `scope`.
    pub(crate) fn check(&self, token: &str, scope: &str) -> Verdict {
        let tables = self.lock();
        if let Some((_, revocation)) = tables.revoked.get(token) {
            return Verdict::Invalid(Invalid::Revoked(*revocation));
        }
        match tables.live.get(token) {
            None => Verdict::Invalid(Invalid::Unknown),
            Some(grant) if grant.expires_at <= Instant::now() => Verdict::Invalid(Invalid::Expired),
            Some(grant) if !grant.scopes.iter().any(|s| s == scope) => Verdict::InsufficientScope,
            Some(_) => Verdict::Valid,
        }
    }

    /// Revokes every unexpired token issued before `cutoff`, as revocation number
    /// `revocation`; returns how many were revoked.
    pub(crate) fn revoke_issued_before(&self, cutoff: Instant, revocation: u64) -> usize {
        let now = Instant::now();
        let mut tables = self.lock();

        let doomed: Vec<String> = tables
            .live
            .iter()
            .filter(|(_, grant)| grant.issued_at < cutoff && grant.expires_at > now)
            .map(|(token, _)| token.clone())
            .collect();
        for token in &doomed {
            let grant = tables.live.remove(token).expect("listed above");
            tables.revoked.insert(token.clone(), (grant, revocation));
        }
        doomed.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What the embedded servers counted.
#[derive(Default)]
pub(crate) struct Counters {
    /// Requests to the token endpoint, answered with a token or an error.
    pub(crate) token_calls: AtomicU64,
    /// Token endpoint requests answered with an error.
    pub(crate) token_errors: AtomicU64,
    /// Requests to the API.
    pub(crate) api_calls: AtomicU64,
    /// API requests answered with 401, by why: revoked, expired, unknown or no token.
    pub(crate) rejected_revoked: AtomicU64,
    pub(crate) rejected_expired: AtomicU64,
    pub(crate) rejected_unknown: AtomicU64,
    pub(crate) rejected_missing: AtomicU64,
    /// API requests that carried more than one `Authorization` header.
    pub(crate) doubled_headers: AtomicU64,
    /// POST bodies that arrived damaged.
    pub(crate) damaged_bodies: AtomicU64,
    /// Revocations that revoked at least one token.
    pub(crate) revocations: AtomicU64,
    /// Retries (second attempts of a call whose first attempt got a 401) the API saw.
    pub(crate) retries_seen: AtomicU64,
    /// Retries that carried the very token whose rejection they follow: a client bug.
    pub(crate) retries_with_same_token: AtomicU64,
    /// Retries rejected because the revocation that rejected the first attempt had revoked
    /// the newer token they carried too.
    pub(crate) retries_revoked_together: AtomicU64,
    /// Retries rejected for another reason.
    pub(crate) retries_rejected_otherwise: AtomicU64,
    /// Refresh tokens traded for new ones: the refresh-token grants served.
    pub(crate) refresh_grants: AtomicU64,
    /// Refresh-token grants refused because the refresh token was used before.
    pub(crate) refresh_reused: AtomicU64,
    /// Refresh-token grants refused because the refresh token was never issued.
    pub(crate) refresh_unknown: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn read(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

fn new_refresh_token() -> String {
    format!("demo-refresh-{:016x}{:016x}", random_u64(), random_u64())
}

/// A random number from the standard library's randomly keyed hasher. Enough for a demo's
/// tokens and jitter; a real token server would use a cryptographic generator.
pub(crate) fn random_u64() -> u64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);

    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(CALLS.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

/// `base` scaled by a random factor between `1 - spread` and `1 + spread`.
pub(crate) fn jittered(base: Duration, spread: f64) -> Duration {
    let unit = (random_u64() >> 11) as f64 / (1u64 << 53) as f64;
    base.mul_f64(1.0 - spread + 2.0 * spread * unit)
}
