//! The delivery policy, pure: what an attempt came to → what happens next. Nothing here
//! does I/O or reads a clock; the delivery task ([`super::deliver`]) carries the
//! decisions out. docs/operations.md ("Retries and dead letters") states the rules; the
//! table test at the bottom walks every row of them.
//!
//! Two decisions are made here:
//! - [`decide`]: after one try at a batch, whether to acknowledge it, split it, reject
//!   its one event, wait and try again (an immediate retry), or leave the immediate stage;
//! - [`next_tier`]: for each event that leaves the immediate stage, its scheduled tier,
//!   or `retries_exhausted`.
//!
//! [`circuit_note`] says what an attempt tells the destination's circuit breaker.

use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::time::Instant;

use crate::circuit::{Admission, Cause};
use crate::config::RetrySettings;
use crate::http::Outcome;

/// The longest a message waits unacknowledged for its immediate attempts (request slots
/// and backoff included) before it goes to a scheduled tier: well below the broker's
/// `consumer_timeout` (30 min by default), after which the broker closes the channel.
pub const MAX_HOLD: Duration = Duration::from_secs(600);

/// What became of one try to send a batch.
#[derive(Debug, Clone)]
pub enum Attempted {
    /// No request slot came free before the hold limit.
    NoSlot,
    /// The destination's circuit is open: no request was sent. `cause` is the last
    /// retryable outcome of a request to it, which the events report as theirs.
    CircuitOpen { cause: Option<Cause> },
    /// A request went out under `admission` and came to `outcome`.
    Sent {
        admission: Admission,
        outcome: Outcome,
    },
}

/// Where a batch stands when its attempt is judged.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    /// Attempts made so far, this one included.
    pub attempt: u32,
    /// Events in the batch.
    pub events: usize,
    pub now: Instant,
    /// The batch's oldest message must be settled before this ([`MAX_HOLD`]).
    pub hold_deadline: Instant,
    /// The next delay of the immediate backoff.
    pub backoff: Duration,
    /// The destination as it may be shown: scheme, host and port.
    pub destination: &'a str,
}

/// What to do with the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Delivered: acknowledge every event.
    Ack,
    /// Rejected with several events: split in halves, each sent as a batch of its own.
    Split { status: u16 },
    /// Rejected with one event: dead-letter it as `rejected_<status>`.
    Reject { status: u16 },
    /// Try again after this delay.
    Wait(Duration),
    /// Leave the immediate stage: every event goes to its next scheduled tier.
    Schedule(Failure),
}

/// Why a batch left the immediate stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The HTTP status of the last attempt, if one answered.
    pub status: Option<u16>,
    /// Safe to log and to store in `x-courier-last-error`.
    pub error: String,
    /// A `Retry-After` longer than the immediate stage allows: it picks the tier.
    pub retry_after: Option<Duration>,
}

/// Decides what follows one try at a batch.
///
/// | attempt | → step |
/// |---|---|
/// | no slot before the hold limit, or circuit open | `Schedule` (an open circuit reports the last real attempt's status and error) |
/// | 2xx | `Ack` |
/// | 400, 413, 422 | `Split` (several events), `Reject` (one) |
/// | retryable, as the probe, or the last immediate attempt, or `Retry-After` over `max_interval` | `Schedule` |
/// | retryable, its wait (`Retry-After`, else the backoff) past the hold limit | `Schedule` |
/// | retryable otherwise | `Wait` (`Retry-After`, else the backoff) |
pub fn decide(attempted: &Attempted, progress: &Progress<'_>, retry: &RetrySettings) -> Step {
    let (admission, outcome) = match attempted {
        Attempted::NoSlot => {
            return Step::Schedule(Failure {
                status: None,
                error: format!(
                    "no request slot for {} within {MAX_HOLD:?}",
                    progress.destination
                ),
                retry_after: None,
            });
        }
        Attempted::CircuitOpen { cause } => {
            let open = format!("circuit open for {}", progress.destination);
            return Step::Schedule(match cause {
                Some(cause) => Failure {
                    status: cause.status,
                    error: format!("{} (then {open}; no request sent)", cause.error),
                    retry_after: None,
                },
                None => Failure {
                    status: None,
                    error: open,
                    retry_after: None,
                },
            });
        }
        Attempted::Sent { admission, outcome } => (*admission, outcome),
    };
    let (status, error, retry_after) = match outcome {
        Outcome::Delivered { .. } => return Step::Ack,
        Outcome::Rejected { status } if progress.events > 1 => {
            return Step::Split { status: *status };
        }
        Outcome::Rejected { status } => return Step::Reject { status: *status },
        Outcome::Retryable {
            status,
            error,
            retry_after,
        } => (*status, error, *retry_after),
    };
    let failure = |retry_after| {
        Step::Schedule(Failure {
            status,
            error: error.clone(),
            retry_after,
        })
    };
    let too_long = retry_after.filter(|wait| *wait > retry.max_interval);
    if admission == Admission::Probe
        || progress.attempt >= retry.immediate_attempts
        || too_long.is_some()
    {
        return failure(too_long);
    }
    let delay = retry_after.unwrap_or(progress.backoff);
    if progress.now + delay > progress.hold_deadline {
        return failure(None);
    }
    Step::Wait(delay)
}

/// What one attempt tells the destination's circuit breaker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CircuitNote {
    /// A 2xx: the circuit closes.
    Success,
    /// A retryable outcome; `probe` when it answered the probe. `cause` is what events
    /// refused by the open circuit report.
    Failure { probe: bool, cause: Cause },
    /// A rejected probe: neither success nor failure, the next batch probes again.
    Neutral,
    /// A rejection outside a probe: nothing to record.
    Nothing,
}

/// The circuit breaker's view of an attempt: rejections count as neither success nor
/// failure.
pub fn circuit_note(admission: Admission, outcome: &Outcome) -> CircuitNote {
    let probe = admission == Admission::Probe;
    match outcome {
        Outcome::Delivered { .. } => CircuitNote::Success,
        Outcome::Retryable { status, error, .. } => CircuitNote::Failure {
            probe,
            cause: Cause {
                status: *status,
                error: error.clone(),
            },
        },
        Outcome::Rejected { .. } if probe => CircuitNote::Neutral,
        Outcome::Rejected { .. } => CircuitNote::Nothing,
    }
}

/// The delays between immediate attempts: exponential from `initial_interval`, with
/// jitter, never above `max_interval`.
pub fn immediate_backoff(retry: &RetrySettings) -> impl Iterator<Item = Duration> + use<> {
    let max = retry.max_interval;
    ExponentialBuilder::default()
        .with_min_delay(retry.initial_interval)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
        .map(move |delay| delay.min(max))
}

/// Where an event goes when it leaves the immediate stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Republish to the tier at `index` of the schedule; its `x-courier-retries` becomes
    /// `retries` (the tier's position, 1-based).
    Tier { index: usize, retries: usize },
    /// Dead-letter as `retries_exhausted`.
    Exhausted,
}

/// Chooses an event's next scheduled tier.
///
/// - `retries`: scheduled retries the event already had (`x-courier-retries`);
/// - `retry_after`: a receiver's `Retry-After` longer than the immediate stage allows:
///   the first tier whose delay is at least that long (the last tier if none is), the
///   tiers skipped being used up;
/// - `first_failure`: when the event first failed; past `max_age`, it is exhausted.
pub fn next_tier(
    schedule: &[Duration],
    retries: usize,
    retry_after: Option<Duration>,
    first_failure: SystemTime,
    now: SystemTime,
    max_age: Duration,
) -> Next {
    let failing_for = now.duration_since(first_failure).unwrap_or_default();
    if failing_for > max_age || retries >= schedule.len() {
        return Next::Exhausted;
    }
    let index = match retry_after {
        None => retries,
        Some(wait) => {
            let fits = schedule
                .iter()
                .position(|delay| *delay >= wait)
                .unwrap_or(schedule.len() - 1);
            fits.max(retries)
        }
    };
    Next::Tier {
        index,
        retries: index + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1;
    const DAY: Duration = Duration::from_secs(86_400);

    fn schedule() -> Vec<Duration> {
        ["30s", "5m", "30m", "2h"]
            .iter()
            .map(|s| humantime::parse_duration(s).unwrap())
            .collect()
    }

    /// immediate_attempts 3, max_interval 10 s.
    fn retry() -> RetrySettings {
        RetrySettings {
            immediate_attempts: 3,
            initial_interval: Duration::from_millis(500),
            max_interval: Duration::from_secs(10),
            schedule: schedule(),
            max_age: DAY,
        }
    }

    fn retryable(status: Option<u16>, retry_after: Option<u64>) -> Outcome {
        Outcome::Retryable {
            status,
            error: "HTTP 503".into(),
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    fn schedule_step(status: Option<u16>, retry_after: Option<u64>) -> Step {
        Step::Schedule(Failure {
            status,
            error: "HTTP 503".into(),
            retry_after: retry_after.map(Duration::from_secs),
        })
    }

    fn judge(attempted: Attempted, attempt: u32, events: usize, hold_left: u64) -> Step {
        let now = Instant::now();
        let progress = Progress {
            attempt,
            events,
            now,
            hold_deadline: now + Duration::from_secs(hold_left),
            backoff: Duration::from_secs(2 * S),
            destination: "https://hooks.example:443",
        };
        decide(&attempted, &progress, &retry())
    }

    #[test]
    fn every_row_of_the_retry_rules() {
        use Admission::{Probe, Send};
        let delivered = Outcome::Delivered { status: 200 };
        let rejected = |status| Outcome::Rejected { status };
        let wait = |s| Step::Wait(Duration::from_secs(s));
        #[rustfmt::skip]
        let rows = [
            // 2xx, whatever the attempt or admission.
            ("2xx", Send, delivered.clone(), 1, 5, 600, Step::Ack),
            ("2xx on the last attempt", Send, delivered.clone(), 3, 1, 600, Step::Ack),
            ("2xx as the probe", Probe, delivered, 1, 5, 600, Step::Ack),
            // Rejections: split several, reject one; never retried.
            ("400, several", Send, rejected(400), 1, 8, 600, Step::Split { status: 400 }),
            ("413, several", Send, rejected(413), 3, 2, 600, Step::Split { status: 413 }),
            ("422, one", Send, rejected(422), 1, 1, 600, Step::Reject { status: 422 }),
            ("400, one, probe", Probe, rejected(400), 1, 1, 600, Step::Reject { status: 400 }),
            // Retryable with attempts left: the backoff, or a short Retry-After.
            ("5xx, attempts left", Send, retryable(Some(503), None), 1, 5, 600, wait(2)),
            ("no answer, attempts left", Send, retryable(None, None), 2, 5, 600, wait(2)),
            ("Retry-After short", Send, retryable(Some(429), Some(7)), 1, 5, 600, wait(7)),
            ("Retry-After = max_interval", Send, retryable(Some(429), Some(10)), 1, 5, 600, wait(10)),
            // Retryable, leaving the immediate stage.
            ("5xx, last attempt", Send, retryable(Some(503), None), 3, 5, 600, schedule_step(Some(503), None)),
            ("Retry-After long", Send, retryable(Some(503), Some(11)), 1, 5, 600, schedule_step(Some(503), Some(11))),
            ("Retry-After long, last attempt", Send, retryable(Some(429), Some(3600)), 3, 5, 600, schedule_step(Some(429), Some(3600))),
            ("probe failed", Probe, retryable(Some(500), None), 1, 5, 600, schedule_step(Some(500), None)),
            ("probe failed, short Retry-After", Probe, retryable(Some(503), Some(1)), 1, 5, 600, schedule_step(Some(503), None)),
            ("backoff past the hold limit", Send, retryable(Some(503), None), 1, 5, 1, schedule_step(Some(503), None)),
            ("Retry-After past the hold limit", Send, retryable(Some(503), Some(5)), 1, 5, 4, schedule_step(Some(503), None)),
        ];
        // (what, admission, outcome, attempt, events, seconds left of the hold, step)
        for (what, admission, outcome, attempt, events, hold_left, expected) in rows {
            let attempted = Attempted::Sent { admission, outcome };
            assert_eq!(
                judge(attempted, attempt, events, hold_left),
                expected,
                "{what}"
            );
        }
    }

    #[test]
    fn no_slot_and_an_open_circuit_leave_without_a_request() {
        let open = |cause| judge(Attempted::CircuitOpen { cause }, 1, 5, 600);
        let Step::Schedule(f) = open(None) else {
            panic!("circuit open must schedule");
        };
        assert_eq!((f.status, f.retry_after), (None, None));
        assert_eq!(f.error, "circuit open for https://hooks.example:443");
        // The last real attempt's status and error stay the events' own.
        let cause = Cause {
            status: Some(500),
            error: "HTTP 500 Internal Server Error".into(),
        };
        let Step::Schedule(f) = open(Some(cause)) else {
            panic!("circuit open must schedule");
        };
        assert_eq!((f.status, f.retry_after), (Some(500), None));
        assert_eq!(
            f.error,
            "HTTP 500 Internal Server Error (then circuit open for \
             https://hooks.example:443; no request sent)"
        );
        let Step::Schedule(f) = judge(Attempted::NoSlot, 2, 5, 0) else {
            panic!("no slot must schedule");
        };
        assert!(
            f.error
                .starts_with("no request slot for https://hooks.example:443")
        );
    }

    #[test]
    fn what_the_circuit_is_told() {
        use Admission::{Probe, Send};
        let ok = Outcome::Delivered { status: 204 };
        let no = Outcome::Rejected { status: 400 };
        let err = retryable(Some(500), None);
        assert_eq!(circuit_note(Send, &ok), CircuitNote::Success);
        assert_eq!(circuit_note(Probe, &ok), CircuitNote::Success);
        let cause = Cause {
            status: Some(500),
            error: "HTTP 503".into(),
        };
        assert_eq!(
            circuit_note(Send, &err),
            CircuitNote::Failure {
                probe: false,
                cause: cause.clone()
            }
        );
        assert_eq!(
            circuit_note(Probe, &err),
            CircuitNote::Failure { probe: true, cause }
        );
        assert_eq!(circuit_note(Send, &no), CircuitNote::Nothing);
        assert_eq!(circuit_note(Probe, &no), CircuitNote::Neutral);
    }

    fn next(retries: usize, retry_after: Option<u64>, failing_for: u64) -> Next {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        next_tier(
            &schedule(),
            retries,
            retry_after.map(Duration::from_secs),
            now - Duration::from_secs(failing_for),
            now,
            DAY,
        )
    }

    fn tier(index: usize) -> Next {
        Next::Tier {
            index,
            retries: index + 1,
        }
    }

    #[test]
    fn every_row_of_the_schedule_rules() {
        #[rustfmt::skip]
        let rows = [
            ("first failure", next(0, None, 0), tier(0)),
            ("second", next(1, None, 0), tier(1)),
            ("last tier", next(3, None, 0), tier(3)),
            ("schedule used up", next(4, None, 0), Next::Exhausted),
            ("max_age passed", next(0, None, 86_401), Next::Exhausted),
            ("max_age not yet", next(0, None, 86_399), tier(0)),
            ("Retry-After fits the first", next(0, Some(20), 0), tier(0)),
            ("Retry-After skips a tier", next(0, Some(60), 0), tier(1)),
            ("Retry-After equal to a tier", next(0, Some(300), 0), tier(1)),
            ("Retry-After longer than all", next(0, Some(100_000), 0), tier(3)),
            ("never back to a used tier", next(2, Some(60), 0), tier(2)),
            ("Retry-After after max_age", next(1, Some(60), 90_000), Next::Exhausted),
        ];
        for (what, got, expected) in rows {
            assert_eq!(got, expected, "{what}");
        }
    }

    #[test]
    fn immediate_backoff_stays_within_bounds() {
        let mut retry = retry();
        retry.initial_interval = Duration::from_millis(100);
        retry.max_interval = Duration::from_millis(400);
        let delays: Vec<Duration> = immediate_backoff(&retry).take(10).collect();
        assert_eq!(delays.len(), 10);
        for d in &delays {
            assert!(
                *d >= Duration::from_millis(100) && *d <= Duration::from_millis(400),
                "{d:?}"
            );
        }
    }
}
