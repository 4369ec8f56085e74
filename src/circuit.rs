//! The circuit breaker (docs/operations.md, "The circuit breaker"): per destination, per replica.
//!
//! After `failure_threshold` retryable outcomes in a row (rejections count as neither
//! success nor failure) a destination opens for `cooldown`, doubling on every failed
//! probe up to `max_cooldown`. While open, batches skip the HTTP attempt and go straight
//! to scheduled retry; once the cooldown has passed, one probe batch is let through.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::CircuitSettings;

/// May a batch be sent now?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: send.
    Send,
    /// Open but cooled down: send this batch as the single probe.
    Probe,
    /// Open: do not send.
    Refuse,
}

/// The last retryable outcome of a request to a destination: while its circuit is open,
/// the events it refuses report this as their last status and error (no request of
/// theirs was sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    pub status: Option<u16>,
    pub error: String,
}

#[derive(Debug, Default)]
struct State {
    failures: u32,
    open_until: Option<Instant>,
    cooldown: Duration,
    probing: bool,
    last: Option<Cause>,
}

/// What changed with an outcome: the gauge follows `open`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub open: bool,
}

/// Circuit states by destination.
#[derive(Debug)]
pub struct Breakers<K> {
    states: HashMap<K, State>,
}

impl<K> Default for Breakers<K> {
    fn default() -> Self {
        Self {
            states: HashMap::new(),
        }
    }
}

impl<K: Eq + Hash + Clone> Breakers<K> {
    /// Whether a batch for `key` may be sent at `now`.
    pub fn admit(&mut self, key: &K, now: Instant) -> Admission {
        let Some(state) = self.states.get_mut(key) else {
            return Admission::Send;
        };
        match state.open_until {
            None => Admission::Send,
            Some(_) if state.probing => Admission::Refuse,
            Some(until) if now < until => Admission::Refuse,
            Some(_) => {
                state.probing = true;
                Admission::Probe
            }
        }
    }

    /// The last retryable outcome recorded for `key` since its last success.
    pub fn last_cause(&self, key: &K) -> Option<Cause> {
        self.states.get(key).and_then(|state| state.last.clone())
    }

    /// Forgets `key`: its circuit is closed and its count starts again (a destination
    /// whose URL or TLS identity changed is another destination). Returns a change if it
    /// was open.
    pub fn reset(&mut self, key: &K) -> Option<Change> {
        self.success(key)
    }

    /// Records a 2xx: the circuit closes. Returns a change if it was open.
    pub fn success(&mut self, key: &K) -> Option<Change> {
        let state = self.states.remove(key)?;
        state.open_until.map(|_| Change { open: false })
    }

    /// Records a retryable outcome; `probe` says whether it came from the probe batch.
    /// Returns a change when the circuit opens.
    pub fn failure(
        &mut self,
        key: &K,
        now: Instant,
        settings: &CircuitSettings,
        probe: bool,
        cause: Cause,
    ) -> Option<Change> {
        let state = self.states.entry(key.clone()).or_default();
        state.last = Some(cause);
        state.failures = state.failures.saturating_add(1);
        if state.probing && !probe {
            // A request sent before the circuit opened: the probe's answer decides.
            return None;
        }
        if state.probing {
            // The probe failed: open again, for twice as long.
            state.probing = false;
            state.cooldown = (state.cooldown * 2).min(settings.max_cooldown);
            state.open_until = Some(now + state.cooldown);
            return None;
        }
        if state.open_until.is_none() && state.failures >= settings.failure_threshold {
            state.cooldown = settings.cooldown;
            state.open_until = Some(now + state.cooldown);
            return Some(Change { open: true });
        }
        None
    }

    /// A probe that ended without an outcome for the circuit (a rejection): let the next
    /// batch probe again.
    pub fn neutral(&mut self, key: &K) {
        if let Some(state) = self.states.get_mut(key) {
            state.probing = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cause() -> Cause {
        Cause {
            status: Some(500),
            error: "HTTP 500 Internal Server Error".into(),
        }
    }

    fn settings() -> CircuitSettings {
        CircuitSettings {
            failure_threshold: 3,
            cooldown: Duration::from_secs(10),
            max_cooldown: Duration::from_secs(25),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_threshold_and_probes_after_the_cooldown() {
        let mut b = Breakers::default();
        let s = settings();
        let now = Instant::now();
        assert_eq!(b.failure(&"d", now, &s, false, cause()), None);
        assert_eq!(b.failure(&"d", now, &s, false, cause()), None);
        assert_eq!(b.admit(&"d", now), Admission::Send);
        assert_eq!(
            b.failure(&"d", now, &s, false, cause()),
            Some(Change { open: true })
        );
        assert_eq!(b.admit(&"d", now), Admission::Refuse);
        assert_eq!(b.admit(&"other", now), Admission::Send, "per destination");
        let later = now + Duration::from_secs(10);
        assert_eq!(b.admit(&"d", later), Admission::Probe);
        assert_eq!(
            b.admit(&"d", later),
            Admission::Refuse,
            "one probe at a time"
        );
        // The probe fails: cooldown doubles (20 s), then is capped (25 s).
        assert_eq!(
            b.failure(&"d", later, &s, false, cause()),
            None,
            "not the probe: no effect"
        );
        assert_eq!(
            b.admit(&"d", later),
            Admission::Refuse,
            "the probe is still out"
        );
        assert_eq!(b.failure(&"d", later, &s, true, cause()), None);
        assert_eq!(
            b.admit(&"d", later + Duration::from_secs(19)),
            Admission::Refuse
        );
        let t = later + Duration::from_secs(20);
        assert_eq!(b.admit(&"d", t), Admission::Probe);
        b.failure(&"d", t, &s, true, cause());
        assert_eq!(
            b.admit(&"d", t + Duration::from_secs(24)),
            Admission::Refuse
        );
        let t = t + Duration::from_secs(25);
        assert_eq!(b.admit(&"d", t), Admission::Probe);
        assert_eq!(b.last_cause(&"d"), Some(cause()));
        assert_eq!(b.success(&"d"), Some(Change { open: false }));
        assert_eq!(b.admit(&"d", t), Admission::Send);
        assert_eq!(b.last_cause(&"d"), None, "a success forgets the cause");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_closes_an_open_circuit() {
        let mut b = Breakers::default();
        let s = settings();
        let now = Instant::now();
        for _ in 0..3 {
            b.failure(&"d", now, &s, false, cause());
        }
        assert_eq!(b.admit(&"d", now), Admission::Refuse);
        assert_eq!(b.reset(&"d"), Some(Change { open: false }));
        assert_eq!(b.admit(&"d", now), Admission::Send);
        assert_eq!(b.reset(&"d"), None, "nothing left to reset");
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_count() {
        let mut b = Breakers::default();
        let s = settings();
        let now = Instant::now();
        b.failure(&"d", now, &s, false, cause());
        b.failure(&"d", now, &s, false, cause());
        assert_eq!(b.success(&"d"), None, "was not open");
        b.failure(&"d", now, &s, false, cause());
        b.failure(&"d", now, &s, false, cause());
        assert_eq!(b.admit(&"d", now), Admission::Send);
    }
}
