//! Retries, watched from the server side.
//!
//! Both attempts of a call carry the same `x-demo-call` header (a retry is a copy of the
//! request), so the API can pair a retry with the rejection it follows: it checks that the
//! retry carries a different token (R5), and tells why a retry was rejected again.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
};

use crate::shared::{Counters, Invalid};

/// The header that names a call: the same on its first attempt and its retry.
pub(crate) const CALL_HEADER: &str = "x-demo-call";

/// First attempts that were rejected, by call, until their retry arrives.
#[derive(Default)]
pub(crate) struct RetryAudit {
    rejected: Mutex<HashMap<String, Rejected>>,
}

struct Rejected {
    token: String,
    why: Invalid,
}

impl RetryAudit {
    /// Notes an attempt of `call` that carried `token` and was rejected for `rejected`, or
    /// accepted when that is `None`.
    pub(crate) fn note(
        &self,
        counters: &Counters,
        call: &str,
        token: &str,
        rejected: Option<Invalid>,
    ) {
        let mut calls = self.rejected.lock().unwrap_or_else(PoisonError::into_inner);

        let Some(first) = calls.remove(call) else {
            // A first attempt: remembered only if rejected, since only then may a retry follow.
            if let Some(why) = rejected {
                let token = token.to_owned();
                calls.insert(call.to_owned(), Rejected { token, why });
            }
            return;
        };
        drop(calls);

        Counters::bump(&counters.retries_seen);
        if first.token == token {
            Counters::bump(&counters.retries_with_same_token);
        }
        match (first.why, rejected) {
            (_, None) => {}
            (Invalid::Revoked(first), Some(Invalid::Revoked(retry))) if first == retry => {
                Counters::bump(&counters.retries_revoked_together);
            }
            (_, Some(_)) => Counters::bump(&counters.retries_rejected_otherwise),
        }
    }
}
