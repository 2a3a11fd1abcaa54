//! Retrying a token request: which failures are worth another attempt, how long to wait
//! (jittered exponential back-off, or the server's `Retry-After`), and when to give up.
//!
//! Every wait is a `tokio::time::sleep`, so tests drive it with `tokio::time::pause`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{header, HeaderMap};

use crate::{state::random_unit, Error};

/// Attempts per fetch, the first one included, unless configured otherwise.
pub(super) const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// How long after a fetch began a retry may still start, unless configured otherwise: half of
/// the layer's default refresh timeout, so that an attempt started at the end of the budget
/// still has 5 seconds to finish before the layer gives up on the whole fetch.
pub(super) const DEFAULT_RETRY_BUDGET: Duration = Duration::from_secs(5);

/// The back-off before the second attempt, before jitter; it doubles for each later one.
const BASE_DELAY: Duration = Duration::from_millis(200);

/// The longest back-off between two attempts, before jitter.
const MAX_DELAY: Duration = Duration::from_secs(2);

/// How a fetch retries its token request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RetryPolicy {
    /// Attempts per fetch, the first one included; at least 1.
    pub(super) max_attempts: u32,
    /// A retry starts only if it can start this long after the fetch began, at the latest.
    pub(super) budget: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            budget: DEFAULT_RETRY_BUDGET,
        }
    }
}

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Decision {
    /// Wait this long, then try again.
    RetryAfter(Duration),
    /// Return the error; the reason is logged.
    GiveUp(&'static str),
}

impl RetryPolicy {
    /// Decides what follows attempt number `attempt` (1 for the first), which failed with
    /// `error`, `elapsed` after the fetch began. `retry_after` is the server's `Retry-After`,
    /// if its answer had one.
    pub(super) fn decide(
        &self,
        attempt: u32,
        error: &Error,
        retry_after: Option<Duration>,
        elapsed: Duration,
    ) -> Decision {
        if !is_retryable(error) {
            return Decision::GiveUp(if error.is_terminal() {
                "terminal error"
            } else {
                "a success status arrived"
            });
        }
        if attempt >= self.max_attempts {
            return Decision::GiveUp("no attempts left");
        }

        let remaining = self.budget.saturating_sub(elapsed);
        match retry_after {
            // NOTE: the server said when it will answer; waiting less is pointless and
            // waiting past the budget is not ours to do, so its error goes back at once.
            Some(delay) if delay > remaining => Decision::GiveUp("retry-after beyond the budget"),
            Some(delay) => Decision::RetryAfter(delay),
            None => {
                let delay = backoff(attempt, random_unit());
                if delay > remaining {
                    Decision::GiveUp("retry budget spent")
                } else {
                    Decision::RetryAfter(delay)
                }
            }
        }
    }
}

/// Returns true for failures that another attempt may mend: the error calls itself transient
/// (a transport error, a timeout, 5xx, 408, 429, `temporarily_unavailable`), and no success
/// status arrived.
///
/// NOTE: an answer with a success status is never retried, even when it is unusable: the
/// server may have acted on the request, and for a refresh-token grant it may have rotated
/// the refresh token with that very answer.
pub(super) fn is_retryable(error: &Error) -> bool {
    error.is_transient() && !error.status().is_some_and(|status| status.is_success())
}

/// The back-off after attempt number `attempt` failed: [`BASE_DELAY`] doubled for each
/// attempt after the first, capped at [`MAX_DELAY`], then scaled by `0.5 + unit / 2`, a
/// factor in `[0.5, 1)` for a `unit` in `[0, 1)`.
pub(super) fn backoff(attempt: u32, unit: f64) -> Duration {
    let exponent = attempt.saturating_sub(1).min(16);
    let base = BASE_DELAY.saturating_mul(1 << exponent).min(MAX_DELAY);
    base.mul_f64(0.5 + unit.clamp(0.0, 1.0) / 2.0)
}

/// Returns true when `error` says the request never reached the server: the connection was
/// refused or could not be made. Such an attempt spent nothing and may always be tried again.
pub(super) fn never_sent(error: &Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(error) = cause {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        #[cfg(feature = "hyper-client")]
        if let Some(client) = error.downcast_ref::<hyper_util::client::legacy::Error>() {
            if client.is_connect() {
                return true;
            }
        }
        cause = error.source();
    }
    false
}

/// The wait a `Retry-After` header asks for (RFC 9110 §10.2.3), as of `now`: a number of
/// seconds, or an HTTP-date (zero when it has passed). `None` when there is no such header
/// or its first value is neither; the back-off applies then.
pub(super) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();

    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // NOTE: more digits than a u64 holds is a wait beyond any budget.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = parse_http_date(value, now)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Parses an HTTP-date in any of the three forms RFC 9110 §5.6.7 makes recipients accept:
///
/// - IMF-fixdate: `Sun, 06 Nov 1994 08:49:37 GMT`
/// - RFC 850: `Sunday, 06-Nov-94 08:49:37 GMT`, whose two-digit year is the latest one that is
///   not more than 50 years after `now`
/// - asctime: `Sun Nov  6 08:49:37 1994`
///
/// The day name is not checked, and a day of one digit is accepted in every form. Dates
/// before 1970 are refused.
fn parse_http_date(text: &str, now: SystemTime) -> Option<SystemTime> {
    let (day, month, year, time) = match text.split_once(", ") {
        Some((_day_name, rest)) => {
            let rest = rest.strip_suffix(" GMT")?;
            let (date, time) = rest.rsplit_once(' ')?;
            if let Some((day, rest)) = date.split_once('-') {
                let (month, year) = rest.split_once('-')?;
                (day, month, rfc850_year(two_digits(year)?, now)?, time)
            } else {
                let mut parts = date.split(' ');
                let (day, month, year) = (parts.next()?, parts.next()?, parts.next()?);
                if parts.next().is_some() || year.len() != 4 {
                    return None;
                }
                (day, month, digits(year)?, time)
            }
        }
        None => {
            let mut parts = text.split_ascii_whitespace();
            let (_day_name, month, day) = (parts.next()?, parts.next()?, parts.next()?);
            let (time, year) = (parts.next()?, parts.next()?);
            if parts.next().is_some() || year.len() != 4 {
                return None;
            }
            (day, month, digits(year)?, time)
        }
    };

    let day = u32::try_from(digits(day).filter(|_| day.len() <= 2)?).ok()?;
    let month = MONTHS.iter().position(|name| *name == month)? + 1;
    let mut clock = time.split(':');
    let (hour, minute, second) = (clock.next()?, clock.next()?, clock.next()?);
    if clock.next().is_some() {
        return None;
    }
    let (hour, minute, second) = (two_digits(hour)?, two_digits(minute)?, two_digits(second)?);
    if !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }

    let days = days_since_epoch(year, u32::try_from(month).ok()?, day);
    let seconds = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second);
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).ok()?))
}

/// A string of ASCII digits, up to a year's worth of them.
fn digits(text: &str) -> Option<i64> {
    if text.is_empty() || text.len() > 4 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn two_digits(text: &str) -> Option<u32> {
    if text.len() != 2 {
        return None;
    }
    u32::try_from(digits(text)?).ok()
}

/// The full year of an RFC 850 two-digit year: the latest year ending in those digits that
/// is not more than 50 years after `now`'s year.
fn rfc850_year(two_digits: u32, now: SystemTime) -> Option<i64> {
    let now_seconds = now.duration_since(UNIX_EPOCH).ok()?.as_secs();
    // NOTE: 365.2425 days a year is close enough to find the current year for this rule.
    let this_year = 1970 + i64::try_from(now_seconds / 31_556_952).ok()?;
    let mut year = this_year - this_year.rem_euclid(100) + i64::from(two_digits);
    if year > this_year + 50 {
        year -= 100;
    }
    Some(year)
}

/// Days from 1970-01-01 to the given date of the proleptic Gregorian calendar.
fn days_since_epoch(year: i64, month: u32, day: u32) -> i64 {
    // NOTE: counted in years that start in March, so that the leap day ends a year.
    let (year, month) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let days_before_year =
        365 * year + year.div_euclid(4) - year.div_euclid(100) + year.div_euclid(400);
    let days_before_month = i64::from((153 * month + 2) / 5);
    // NOTE: 719_468 is the count above for 1970-01-01.
    days_before_year + days_before_month + i64::from(day) - 1 - 719_468
}

#[cfg(test)]
mod tests {
    use http::{HeaderValue, StatusCode};

    use super::*;

    /// 1994-11-06 08:49:37 UTC, the date of RFC 9110's examples.
    fn rfc_example() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(784_111_777)
    }

    fn headers(retry_after: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from_str(retry_after).unwrap(),
        );
        headers
    }

    fn unavailable() -> Error {
        Error::endpoint(StatusCode::SERVICE_UNAVAILABLE, None, None, None)
    }

    #[test]
    fn retry_after_in_seconds() {
        let now = rfc_example();

        assert_eq!(
            retry_after(&headers("120"), now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(retry_after(&headers(" 0 "), now), Some(Duration::ZERO));
    }

    #[test]
    fn retry_after_with_more_digits_than_fit_is_a_very_long_wait() {
        let wait = retry_after(&headers("99999999999999999999999"), rfc_example());

        assert_eq!(wait, Some(Duration::from_secs(u64::MAX)));
    }

    #[test]
    fn retry_after_as_imf_fixdate_rfc850_and_asctime() {
        let now = rfc_example();

        for date in [
            "Sun, 06 Nov 1994 08:50:07 GMT",
            "Sunday, 06-Nov-94 08:50:07 GMT",
            "Sun Nov  6 08:50:07 1994",
        ] {
            assert_eq!(
                retry_after(&headers(date), now),
                Some(Duration::from_secs(30)),
                "{date}"
            );
        }
    }

    #[test]
    fn retry_after_date_with_a_one_digit_day_is_accepted() {
        let now = rfc_example();

        assert_eq!(
            retry_after(&headers("Sun, 6 Nov 1994 08:50:07 GMT"), now),
            Some(Duration::from_secs(30))
        );
    }

    #[test]
    fn retry_after_date_in_the_past_is_no_wait() {
        let now = rfc_example();

        assert_eq!(
            retry_after(&headers("Sat, 05 Nov 1994 08:49:37 GMT"), now),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn retry_after_that_is_neither_is_ignored() {
        let now = rfc_example();

        for value in [
            "",
            "-1",
            "1.5",
            "+10",
            "soon",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 06 Nov 94 08:49:37 GMT",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 24:00:00 GMT",
            "Sun, 06 Nov 1994 08:49 GMT",
            "Sun Nov  6 08:49:37 94",
            "Thu, 01 Jan 1969 00:00:00 GMT",
        ] {
            assert_eq!(retry_after(&headers(value), now), None, "{value:?}");
        }
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn http_dates_count_days_across_leap_years() {
        let epoch = UNIX_EPOCH;

        let cases = [
            ("Thu, 01 Jan 1970 00:00:00 GMT", 0),
            ("Tue, 29 Feb 2000 00:00:00 GMT", 951_782_400),
            ("Wed, 01 Mar 2000 00:00:00 GMT", 951_868_800),
            ("Fri, 31 Dec 2038 23:59:59 GMT", 2_177_452_799),
        ];

        for (date, seconds) in cases {
            let parsed = parse_http_date(date, epoch).expect(date);
            assert_eq!(parsed, UNIX_EPOCH + Duration::from_secs(seconds), "{date}");
        }
    }

    #[test]
    fn rfc850_two_digit_years_are_at_most_fifty_years_ahead() {
        // 2025-06-01
        let now = UNIX_EPOCH + Duration::from_secs(1_748_736_000);

        assert_eq!(rfc850_year(75, now), Some(2075));
        assert_eq!(rfc850_year(76, now), Some(1976));
        assert_eq!(rfc850_year(24, now), Some(2024));
    }

    #[test]
    fn backoff_doubles_from_200_ms_up_to_2_s_with_jitter_between_half_and_all() {
        assert_eq!(backoff(1, 0.0), Duration::from_millis(100));
        let longest_first = backoff(1, 0.999_999);
        assert!(
            (Duration::from_micros(199_999)..Duration::from_millis(200)).contains(&longest_first),
            "{longest_first:?}"
        );
        assert_eq!(backoff(2, 0.0), Duration::from_millis(200));
        assert_eq!(backoff(3, 0.0), Duration::from_millis(400));
        assert_eq!(backoff(5, 0.0), Duration::from_secs(1));
        assert_eq!(backoff(50, 0.0), Duration::from_secs(1));
        assert_eq!(backoff(u32::MAX, 1.0), Duration::from_secs(2));
    }

    #[test]
    fn random_unit_stays_in_zero_to_one() {
        for _ in 0..1000 {
            let unit = random_unit();
            assert!((0.0..1.0).contains(&unit), "{unit}");
        }
    }

    #[test]
    fn transient_failures_are_retried_with_the_back_off() {
        let policy = RetryPolicy::default();

        for error in [
            unavailable(),
            Error::endpoint(StatusCode::REQUEST_TIMEOUT, None, None, None),
            Error::endpoint(StatusCode::TOO_MANY_REQUESTS, None, None, None),
            Error::transport("connection refused"),
            Error::timeout(),
        ] {
            let decision = policy.decide(1, &error, None, Duration::ZERO);

            assert!(
                matches!(decision, Decision::RetryAfter(delay)
                    if (Duration::from_millis(100)..=Duration::from_millis(200)).contains(&delay)),
                "{error:?}: {decision:?}"
            );
        }
    }

    #[test]
    fn terminal_errors_and_unusable_success_answers_are_not_retried() {
        let policy = RetryPolicy::default();

        for error in [
            Error::endpoint(
                StatusCode::BAD_REQUEST,
                Some("invalid_grant".into()),
                None,
                None,
            ),
            Error::endpoint(
                StatusCode::SERVICE_UNAVAILABLE,
                Some("invalid_client".into()),
                None,
                None,
            ),
            Error::invalid_token("unsupported token type"),
            Error::invalid_response(StatusCode::OK, None, "not JSON"),
        ] {
            let decision = policy.decide(1, &error, None, Duration::ZERO);

            assert!(matches!(decision, Decision::GiveUp(_)), "{error:?}");
        }
    }

    #[test]
    fn attempts_are_bounded() {
        let policy = RetryPolicy {
            max_attempts: 2,
            ..RetryPolicy::default()
        };

        assert!(matches!(
            policy.decide(1, &unavailable(), None, Duration::ZERO),
            Decision::RetryAfter(_)
        ));
        assert_eq!(
            policy.decide(2, &unavailable(), None, Duration::ZERO),
            Decision::GiveUp("no attempts left")
        );
    }

    #[test]
    fn retry_after_replaces_the_back_off_within_the_budget() {
        let policy = RetryPolicy::default();
        let elapsed = Duration::from_secs(1);

        assert_eq!(
            policy.decide(1, &unavailable(), Some(Duration::from_secs(4)), elapsed),
            Decision::RetryAfter(Duration::from_secs(4))
        );
        assert_eq!(
            policy.decide(1, &unavailable(), Some(Duration::ZERO), elapsed),
            Decision::RetryAfter(Duration::ZERO)
        );
        assert_eq!(
            policy.decide(
                1,
                &unavailable(),
                Some(Duration::from_millis(4001)),
                elapsed
            ),
            Decision::GiveUp("retry-after beyond the budget")
        );
    }

    #[test]
    fn no_back_off_starts_past_the_budget() {
        let policy = RetryPolicy::default();

        let decision = policy.decide(1, &unavailable(), None, Duration::from_millis(4950));

        assert_eq!(decision, Decision::GiveUp("retry budget spent"));
    }
}
