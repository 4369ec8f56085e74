//! What happens after a failed delivery (CONTRACT §3): the immediate backoff, and which
//! scheduled tier an event goes to next, or whether its retries are exhausted.
//!
//! Pure functions over durations and times; the worker does the publishing.

use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::config::RetrySettings;

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

/// Where an event goes after its immediate attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Republish to the tier at `index` of the schedule; its `x-courier-retries` becomes
    /// `retries` (the tier's position, 1-based).
    Tier { index: usize, retries: usize },
    /// Dead-letter as `retries_exhausted`.
    Exhausted,
}

/// Chooses the next scheduled tier.
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

    fn schedule() -> Vec<Duration> {
        ["30s", "5m", "30m", "2h"]
            .iter()
            .map(|s| humantime::parse_duration(s).unwrap())
            .collect()
    }

    const DAY: Duration = Duration::from_secs(86_400);

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

    #[test]
    fn walks_the_schedule_then_gives_up() {
        assert_eq!(
            next(0, None, 0),
            Next::Tier {
                index: 0,
                retries: 1
            }
        );
        assert_eq!(
            next(1, None, 0),
            Next::Tier {
                index: 1,
                retries: 2
            }
        );
        assert_eq!(
            next(3, None, 0),
            Next::Tier {
                index: 3,
                retries: 4
            }
        );
        assert_eq!(next(4, None, 0), Next::Exhausted);
    }

    #[test]
    fn max_age_ends_retries() {
        assert_eq!(next(0, None, 86_401), Next::Exhausted);
        assert_eq!(
            next(0, None, 86_399),
            Next::Tier {
                index: 0,
                retries: 1
            }
        );
    }

    #[test]
    fn retry_after_jumps_to_the_first_long_enough_tier() {
        assert_eq!(
            next(0, Some(20), 0),
            Next::Tier {
                index: 0,
                retries: 1
            }
        );
        assert_eq!(
            next(0, Some(60), 0),
            Next::Tier {
                index: 1,
                retries: 2
            }
        );
        assert_eq!(
            next(0, Some(300), 0),
            Next::Tier {
                index: 1,
                retries: 2
            }
        );
        assert_eq!(
            next(0, Some(100_000), 0),
            Next::Tier {
                index: 3,
                retries: 4
            },
            "the last tier if none is long enough"
        );
        assert_eq!(
            next(2, Some(60), 0),
            Next::Tier {
                index: 2,
                retries: 3
            },
            "never back to a used tier"
        );
    }

    #[test]
    fn immediate_backoff_stays_within_bounds() {
        let retry = RetrySettings {
            immediate_attempts: 3,
            initial_interval: Duration::from_millis(100),
            max_interval: Duration::from_millis(400),
            schedule: schedule(),
            max_age: DAY,
        };
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
