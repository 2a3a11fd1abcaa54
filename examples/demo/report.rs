//! The summary: what happened, whether it is what a correct client makes happen, and the
//! same as one JSON line.

use std::time::Duration;

use serde_json::{json, Value};
use tower_token_refresh::Stats;

use crate::{
    api::REVOCATION_GRACE,
    config::GrantType,
    load::Tally,
    rotations::Rotations,
    servers::Mode,
    shared::{Counters, TOKEN_LIFETIME},
    LAYER_EXPIRY_MARGIN, LAYER_REFRESH_AHEAD,
};

/// Everything the report is made of.
pub(crate) struct Report {
    pub(crate) mode: Mode,
    pub(crate) grant: GrantType,
    pub(crate) concurrency: usize,
    pub(crate) tally: Tally,
    pub(crate) stats: Stats,
    /// What the token subscriber saw; with the refresh-token grant only.
    pub(crate) rotations: Option<Rotations>,
    pub(crate) servers: ServerCounts,
}

/// What the embedded servers counted.
pub(crate) struct ServerCounts {
    pub(crate) token_calls: u64,
    pub(crate) token_errors: u64,
    pub(crate) rejected_revoked: u64,
    pub(crate) rejected_expired: u64,
    pub(crate) rejected_unknown: u64,
    pub(crate) rejected_missing: u64,
    pub(crate) doubled_headers: u64,
    pub(crate) damaged_bodies: u64,
    pub(crate) revocations: u64,
    pub(crate) retries_seen: u64,
    pub(crate) retries_with_same_token: u64,
    pub(crate) retries_revoked_together: u64,
    pub(crate) retries_rejected_otherwise: u64,
    pub(crate) refresh_grants: u64,
    pub(crate) refresh_reused: u64,
    pub(crate) refresh_unknown: u64,
}

impl ServerCounts {
    pub(crate) fn read(counters: &Counters) -> Self {
        Self {
            token_calls: Counters::read(&counters.token_calls),
            token_errors: Counters::read(&counters.token_errors),
            rejected_revoked: Counters::read(&counters.rejected_revoked),
            rejected_expired: Counters::read(&counters.rejected_expired),
            rejected_unknown: Counters::read(&counters.rejected_unknown),
            rejected_missing: Counters::read(&counters.rejected_missing),
            doubled_headers: Counters::read(&counters.doubled_headers),
            damaged_bodies: Counters::read(&counters.damaged_bodies),
            revocations: Counters::read(&counters.revocations),
            retries_seen: Counters::read(&counters.retries_seen),
            retries_with_same_token: Counters::read(&counters.retries_with_same_token),
            retries_revoked_together: Counters::read(&counters.retries_revoked_together),
            retries_rejected_otherwise: Counters::read(&counters.retries_rejected_otherwise),
            refresh_grants: Counters::read(&counters.refresh_grants),
            refresh_reused: Counters::read(&counters.refresh_reused),
            refresh_unknown: Counters::read(&counters.refresh_unknown),
        }
    }
}

/// How long the layer uses a token of `lifetime` before it asks for the next one.
///
/// The layer starts a background refresh once a token is stale: `refresh_ahead` before
/// expiry, clamped to half the lifetime but never below the expiry margin, which is itself
/// clamped to a quarter of the lifetime:
///
/// ```text
/// margin = min(expiry_margin, lifetime / 4)
/// ahead  = max(min(refresh_ahead, lifetime / 2), margin)
/// replaced after lifetime - ahead
/// ```
///
/// For 2 s tokens and the defaults the demo keeps (120 s ahead, 30 s margin): margin 0.5 s,
/// ahead 1 s, so a token is replaced 1 s after its request was sent.
fn replaced_after(lifetime: Duration) -> Duration {
    let margin = LAYER_EXPIRY_MARGIN.min(lifetime / 4);
    let ahead = LAYER_REFRESH_AHEAD.min(lifetime / 2).max(margin);
    lifetime - ahead
}

/// The most token endpoint calls a run of `elapsed` explains:
///
/// ```text
/// ceil(elapsed / replaced_after) + revocations + 1
/// ```
///
/// Background refreshes start at least `replaced_after` apart, so `elapsed` holds at most
/// `ceil(elapsed / replaced_after)` of them; each revocation that revoked a token may cost one
/// refresh more, shared by every request it rejected; and the first token costs one.
fn token_call_bound(elapsed: Duration, revocations: u64) -> u64 {
    let periods = (elapsed.as_secs_f64() / replaced_after(TOKEN_LIFETIME).as_secs_f64()).ceil();
    periods as u64 + revocations + 1
}

/// Latency percentiles, nearest rank.
struct Latency {
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Latency {
    fn of(latencies: &[Duration]) -> Self {
        let mut sorted = latencies.to_vec();
        sorted.sort_unstable();
        let rank = |p: f64| {
            let index = (p * sorted.len() as f64).ceil() as usize;
            sorted
                .get(index.saturating_sub(1))
                .copied()
                .unwrap_or_default()
        };
        Self {
            p50: rank(0.50),
            p99: rank(0.99),
            max: sorted.last().copied().unwrap_or_default(),
        }
    }
}

fn ms(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1e6).round() / 1e3
}

impl Report {
    /// The token-count bound, when it applies: only when both servers are embedded are all
    /// token requests and all revocations known.
    fn bound(&self) -> Option<u64> {
        self.mode
            .tokens_verified()
            .then(|| token_call_bound(self.tally.elapsed, self.servers.revocations))
    }

    /// Why the run failed; empty when it did not.
    pub(crate) fn reasons(&self) -> Vec<String> {
        let tally = &self.tally;
        let mut reasons = Vec::new();

        if tally.calls() == 0 {
            reasons.push("no call was made".to_owned());
        }
        if tally.failures > 0 {
            let (kind, times) = tally
                .failure_kinds
                .iter()
                .max_by_key(|(_, times)| **times)
                .map_or(("unknown", 0), |(kind, times)| (kind.as_str(), *times));
            reasons.push(format!(
                "{} of {} calls failed; most often ({times}x): {kind}",
                tally.failures,
                tally.calls()
            ));
        }
        if self.servers.retries_revoked_together > 0 {
            reasons.push(format!(
                "{} retries were rejected because the revocation that rejected their first \
                 attempt had revoked the newer token they were retried with too: the first \
                 attempt was in transit longer than the API's {} ms revocation grace. The layer \
                 rightly retries only once (R6); this load is more than the demo's API can \
                 serve on this machine",
                self.servers.retries_revoked_together,
                REVOCATION_GRACE.as_millis()
            ));
        }
        if self.servers.retries_with_same_token > 0 {
            reasons.push(format!(
                "{} retries carried the very token whose rejection they followed",
                self.servers.retries_with_same_token
            ));
        }
        if self.servers.doubled_headers > 0 {
            reasons.push(format!(
                "{} requests reached the API with more than one Authorization header",
                self.servers.doubled_headers
            ));
        }
        if self.servers.damaged_bodies > 0 {
            reasons.push(format!(
                "{} POST bodies reached the API damaged",
                self.servers.damaged_bodies
            ));
        }
        if let Some(bound) = self.bound() {
            if self.servers.token_calls > bound {
                reasons.push(format!(
                    "the token endpoint was called {} times; {:.2} s of {:.1} s token use and {} \
                     revocations explain at most {bound}",
                    self.servers.token_calls,
                    tally.elapsed.as_secs_f64(),
                    replaced_after(TOKEN_LIFETIME).as_secs_f64(),
                    self.servers.revocations,
                ));
            }
        }
        self.rotation_reasons(&mut reasons);
        reasons
    }

    /// Why the refresh-token grant failed, when the embedded token endpoint can tell: a
    /// refresh token it refused, or a rotation it made that the subscriber did not see.
    fn rotation_reasons(&self, reasons: &mut Vec<String>) {
        let (Some(rotations), true) = (self.rotations, self.mode.token_endpoint) else {
            return;
        };
        let servers = &self.servers;

        let refused = servers.refresh_reused + servers.refresh_unknown;
        if refused > 0 {
            reasons.push(format!(
                "the token endpoint refused {refused} refresh-token grants ({} for a refresh \
                 token used before, {} for an unknown one); each refresh token works once, and \
                 a client must present the newest",
                servers.refresh_reused, servers.refresh_unknown
            ));
        }
        if rotations.rotations != servers.refresh_grants {
            let incomplete = if rotations.complete {
                ""
            } else {
                "; the subscription had not ended when it was counted"
            };
            reasons.push(format!(
                "the token endpoint served {} refresh-token grants, each with a new refresh \
                 token, but the token subscriber saw {} rotations{incomplete}",
                servers.refresh_grants, rotations.rotations
            ));
        }
    }

    /// Prints the summary, given the `reasons` why the run failed; its last line is the JSON
    /// object.
    pub(crate) fn print(&self, reasons: &[String]) {
        let tally = &self.tally;
        let stats = &self.stats;
        let latency = Latency::of(&tally.latencies);
        let per_second = tally.calls() as f64 / tally.elapsed.as_secs_f64().max(1e-9);

        println!();
        println!(
            "calls            {} ({} GET, {} POST) in {:.2} s, {per_second:.0} per second",
            tally.calls(),
            tally.gets,
            tally.posts,
            tally.elapsed.as_secs_f64()
        );
        println!("  succeeded      {}", tally.successes);
        println!("  failed         {}", tally.failures);
        for (kind, times) in &tally.failure_kinds {
            println!("    {times:>8}x    {kind}");
        }
        println!(
            "latency          p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            ms(latency.p50),
            ms(latency.p99),
            ms(latency.max)
        );

        println!("layer");
        println!(
            "  rejections     {} (responses that rejected the token)",
            stats.rejections
        );
        println!("  retries        {}", stats.retries);
        println!(
            "  passed through {} (rejections returned to the caller)",
            stats.passed_through
        );
        println!(
            "  refreshes      {} ({} failed; {} waiters joined one in progress)",
            stats.refreshes, stats.failures, stats.coalesced
        );

        self.print_servers();
        self.print_rotations();
        let verdict = if reasons.is_empty() { "ok" } else { "FAILED" };
        println!("result           {verdict}");
        println!("{}", self.json(&latency, reasons));
    }

    fn print_servers(&self) {
        let servers = &self.servers;
        println!("servers");

        if self.mode.token_endpoint {
            let bound = match self.bound() {
                Some(bound) => format!(
                    ", at most {bound} expected = ceil({:.2} s / {:.1} s) + {} revocations + 1",
                    self.tally.elapsed.as_secs_f64(),
                    replaced_after(TOKEN_LIFETIME).as_secs_f64(),
                    servers.revocations
                ),
                None => String::new(),
            };
            println!(
                "  token endpoint {} calls ({} refused){bound}",
                servers.token_calls, servers.token_errors
            );
        } else {
            println!("  token endpoint external: its calls are not counted");
        }

        if self.mode.tokens_verified() {
            println!("  revocations    {}", servers.revocations);
            println!(
                "  retries seen   {} ({} with the rejected token; rejected again: {} by the same \
                 revocation, {} otherwise)",
                servers.retries_seen,
                servers.retries_with_same_token,
                servers.retries_revoked_together,
                servers.retries_rejected_otherwise
            );
        }
        if self.mode.api {
            let total = servers.rejected_revoked
                + servers.rejected_expired
                + servers.rejected_unknown
                + servers.rejected_missing;
            println!(
                "  API 401s       {total} ({} revoked, {} expired, {} unknown, {} without a \
                 token)",
                servers.rejected_revoked,
                servers.rejected_expired,
                servers.rejected_unknown,
                servers.rejected_missing
            );
        }

        if !self.mode.api {
            println!(
                "  note: external API: the revocation and token-count checks need both \
                 embedded servers and are skipped"
            );
        } else if !self.mode.token_endpoint {
            println!(
                "  note: external token endpoint: tokens are not verified in this mode; the \
                 embedded API accepts any non-empty bearer token and revokes nothing, and the \
                 token-count check is skipped"
            );
        }
    }

    fn print_rotations(&self) {
        let Some(rotations) = self.rotations else {
            return;
        };
        let servers = &self.servers;
        println!("refresh tokens");

        let rotating = if self.mode.token_endpoint {
            ", rotating: each refresh token works once"
        } else {
            ""
        };
        println!("  grant          refresh_token{rotating}");
        let incomplete = if rotations.complete {
            ""
        } else {
            " (counted before the subscription ended)"
        };
        println!(
            "  rotations      {} seen by the token subscriber (tokens installed: {}){incomplete}",
            rotations.rotations, rotations.tokens
        );
        if self.mode.token_endpoint {
            println!(
                "  served         {} refresh-token grants, each with a new refresh token",
                servers.refresh_grants
            );
            println!(
                "  refused        {} refresh-token grants ({} for a refresh token used before, \
                 {} for an unknown one)",
                servers.refresh_reused + servers.refresh_unknown,
                servers.refresh_reused,
                servers.refresh_unknown
            );
        } else {
            println!(
                "  note: external token endpoint: its grants and refusals are not counted, and \
                 the rotation checks are skipped"
            );
        }
    }

    fn json(&self, latency: &Latency, reasons: &[String]) -> Value {
        let (tally, stats, servers) = (&self.tally, &self.stats, &self.servers);
        let counted = |value: u64, counted: bool| counted.then_some(value);

        json!({
            "requests": tally.calls(),
            "successes": tally.successes,
            "failures": tally.failures,
            "rejections": stats.rejections,
            "retries": stats.retries,
            "passed_through": stats.passed_through,
            "refreshes": stats.refreshes,
            "refresh_failures": stats.failures,
            "coalesced": stats.coalesced,
            "token_endpoint_calls": counted(servers.token_calls, self.mode.token_endpoint),
            "token_endpoint_call_bound": self.bound(),
            "revocations": counted(servers.revocations, self.mode.tokens_verified()),
            "grant": self.grant.as_str(),
            "rotations": self.rotations.map(|rotations| rotations.rotations),
            "p50_ms": ms(latency.p50),
            "p99_ms": ms(latency.p99),
            "max_ms": ms(latency.max),
            "duration_s": (tally.elapsed.as_secs_f64() * 1e3).round() / 1e3,
            "concurrency": self.concurrency,
            "ok": reasons.is_empty(),
            "reasons": reasons,
        })
    }
}
