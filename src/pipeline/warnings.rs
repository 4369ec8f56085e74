//! Warnings about bad input, summarised: a publisher that sends thousands of invalid
//! events or events of unknown accounts gets a few log lines, not one per event. The
//! dead-letterings of deliveries (`retries_exhausted`, `rejected_*`) are summarised the
//! same way, per account, type and reason ([`DeadLetterLog`]).
//!
//! The first warning of a kind is logged at once; later ones within the same interval are
//! counted, and one line per interval reports how many there were, with a few sample
//! event ids. Pure bookkeeping: the consumer loop asks for the next deadline and logs
//! the lines it is given (docs/operations.md, "Logging").

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

/// How long warnings of one kind are gathered before their summary is logged.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// Sample ids kept per summary.
const SAMPLES: usize = 3;

/// A kind of bad input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    InvalidEvent,
    UnknownAccount,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::InvalidEvent => "invalid event",
            Kind::UnknownAccount => "event of an unknown account",
        }
    }
}

/// One line to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// The first of its kind in an interval: its own line.
    First {
        kind: Kind,
        id: String,
        detail: String,
    },
    /// How many more there were in the interval.
    Summary {
        kind: Kind,
        count: u64,
        samples: Vec<String>,
    },
}

impl Line {
    /// Logs the line as a warning.
    pub fn log(&self) {
        match self {
            Line::First { kind, id, detail } => {
                tracing::warn!(id = %id, %detail, "{} dead-lettered; more of its kind are summarised every {:?}", kind.as_str(), INTERVAL);
            }
            Line::Summary {
                kind,
                count,
                samples,
            } => {
                tracing::warn!(count, samples = %samples.join(", "), "{count} more {}(s) dead-lettered in the last {:?}", kind.as_str(), INTERVAL);
            }
        }
    }
}

#[derive(Debug, Default)]
struct Gathered {
    /// When the current interval ends; `None` while no interval is open.
    until: Option<Instant>,
    count: u64,
    samples: Vec<String>,
}

/// The warnings of each kind gathered so far.
#[derive(Debug, Default)]
pub struct Warnings {
    invalid: Gathered,
    unknown: Gathered,
}

impl Warnings {
    fn of(&mut self, kind: Kind) -> &mut Gathered {
        match kind {
            Kind::InvalidEvent => &mut self.invalid,
            Kind::UnknownAccount => &mut self.unknown,
        }
    }

    /// Notes one warning; returns the line to log at once, if any. `id` must be safe to
    /// log (an event id, never a header value).
    pub fn note(&mut self, kind: Kind, id: &str, detail: &str, now: Instant) -> Option<Line> {
        let gathered = self.of(kind);
        if gathered.until.is_none() {
            gathered.until = Some(now + INTERVAL);
            return Some(Line::First {
                kind,
                id: id.to_owned(),
                detail: detail.to_owned(),
            });
        }
        gathered.count += 1;
        if gathered.samples.len() < SAMPLES {
            gathered.samples.push(id.to_owned());
        }
        None
    }

    /// When the next summary is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        [self.invalid.until, self.unknown.until]
            .into_iter()
            .flatten()
            .min()
    }

    /// The summaries of every interval that has ended by `now`. A kind with nothing more
    /// to report closes its interval, so its next warning is logged at once again.
    pub fn due(&mut self, now: Instant) -> Vec<Line> {
        let mut lines = Vec::new();
        for kind in [Kind::InvalidEvent, Kind::UnknownAccount] {
            let gathered = self.of(kind);
            if gathered.until.is_some_and(|until| until <= now) {
                let count = std::mem::take(&mut gathered.count);
                let samples = std::mem::take(&mut gathered.samples);
                if count == 0 {
                    gathered.until = None;
                } else {
                    gathered.until = Some(now + INTERVAL);
                    lines.push(Line::Summary {
                        kind,
                        count,
                        samples,
                    });
                }
            }
        }
        lines
    }
}

/// One group of dead letters: account, type, reason.
pub type Group = (String, String, String);

/// The dead-letterings of deliveries, summarised per [`Group`]: the first of a group in
/// an interval is logged at once with its cause; the events dead-lettered after it in
/// the interval are counted and reported by one line at its end.
#[derive(Debug, Default)]
pub struct DeadLetterLog {
    groups: BTreeMap<Group, Gathered>,
}

/// How many more events of a group were dead-lettered in an interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadSummary {
    pub group: Group,
    pub count: u64,
    pub samples: Vec<String>,
}

impl DeadSummary {
    /// Logs the summary as a warning.
    pub fn log(&self) {
        let (account, kind, reason) = &self.group;
        tracing::warn!(%account, r#type = %kind, %reason, count = self.count, samples = %self.samples.join(", "), "{} more event(s) dead-lettered in the last {:?}", self.count, INTERVAL);
    }
}

impl DeadLetterLog {
    /// Notes the events `ids` of `group`, dead-lettered; returns whether to log them at
    /// once (the first of their group in an interval).
    pub fn note(&mut self, group: Group, ids: &[&str], now: Instant) -> bool {
        let gathered = self.groups.entry(group).or_default();
        if gathered.until.is_none() {
            gathered.until = Some(now + INTERVAL);
            return true;
        }
        gathered.count += ids.len() as u64;
        let room = SAMPLES.saturating_sub(gathered.samples.len());
        gathered
            .samples
            .extend(ids.iter().take(room).map(|id| (*id).to_owned()));
        false
    }

    /// The summaries of every interval that has ended by `now`; a group with nothing
    /// more to report is forgotten, so its next dead letter is logged at once again.
    pub fn due(&mut self, now: Instant) -> Vec<DeadSummary> {
        let mut summaries = Vec::new();
        self.groups.retain(|group, gathered| {
            if gathered.until.is_none_or(|until| until > now) {
                return true;
            }
            if gathered.count == 0 {
                return false;
            }
            summaries.push(DeadSummary {
                group: group.clone(),
                count: std::mem::take(&mut gathered.count),
                samples: std::mem::take(&mut gathered.samples),
            });
            gathered.until = Some(now + INTERVAL);
            true
        });
        summaries
    }

    /// Every summary still gathering, whatever its interval (on shutdown).
    pub fn flush(&mut self) -> Vec<DeadSummary> {
        let far = Instant::now() + INTERVAL * 1000;
        let summaries = self.due(far);
        self.groups.clear();
        summaries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn thousands_of_warnings_make_a_few_lines() {
        let mut w = Warnings::default();
        let start = Instant::now();
        let mut lines = Vec::new();
        for i in 0..2000 {
            // 2,000 unknown accounts over 25 s.
            let now = start + Duration::from_millis(i * 12);
            lines.extend(w.due(now));
            lines.extend(w.note(Kind::UnknownAccount, &format!("e{i}"), "acct", now));
        }
        lines.extend(w.due(start + Duration::from_secs(60)));
        let firsts = lines
            .iter()
            .filter(|l| matches!(l, Line::First { .. }))
            .count();
        let counted: u64 = lines
            .iter()
            .map(|l| match l {
                Line::First { .. } => 1,
                Line::Summary { count, .. } => *count,
            })
            .sum();
        assert_eq!(firsts, 1);
        assert_eq!(counted, 2000, "every warning is counted once");
        assert!(lines.len() <= 4, "{} lines", lines.len());
        let Line::Summary { samples, .. } = &lines[1] else {
            panic!("a summary follows the first line");
        };
        assert_eq!(samples, &["e1", "e2", "e3"]);
    }

    #[tokio::test(start_paused = true)]
    async fn kinds_are_apart_and_a_quiet_interval_resets() {
        let mut w = Warnings::default();
        let t = Instant::now();
        assert!(w.note(Kind::InvalidEvent, "a", "bad", t).is_some());
        assert!(w.note(Kind::UnknownAccount, "b", "x", t).is_some());
        assert!(w.note(Kind::InvalidEvent, "c", "bad", t).is_none());
        assert_eq!(w.next_deadline(), Some(t + INTERVAL));
        assert_eq!(w.due(t + INTERVAL).len(), 1, "only the kind with more");
        // Nothing more for a whole interval: the next one is logged at once again.
        assert!(w.due(t + 2 * INTERVAL).is_empty());
        assert!(
            w.note(Kind::InvalidEvent, "d", "bad", t + 3 * INTERVAL)
                .is_some()
        );
        assert!(
            w.note(Kind::UnknownAccount, "e", "x", t + 3 * INTERVAL)
                .is_some()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn dead_letterings_are_summarised_per_group() {
        let mut log = DeadLetterLog::default();
        let t = Instant::now();
        let group = |reason: &str| ("acme".to_owned(), "company".to_owned(), reason.to_owned());
        assert!(log.note(group("retries_exhausted"), &["a"], t));
        assert!(
            log.note(group("rejected_422"), &["b"], t),
            "groups are apart"
        );
        assert!(!log.note(group("retries_exhausted"), &["c", "d", "e", "f"], t));
        assert!(!log.note(group("retries_exhausted"), &["g"], t));
        assert!(log.due(t + Duration::from_secs(1)).is_empty(), "too early");
        let due = log.due(t + INTERVAL);
        assert_eq!(
            due,
            vec![DeadSummary {
                group: group("retries_exhausted"),
                count: 5,
                samples: vec!["c".into(), "d".into(), "e".into()],
            }]
        );
        // The quiet group was forgotten: its next one is logged at once.
        assert!(log.note(group("rejected_422"), &["h"], t + INTERVAL));
        assert!(!log.note(group("retries_exhausted"), &["i"], t + INTERVAL));
        assert_eq!(log.flush().len(), 1, "shutdown reports what is gathered");
        assert!(log.note(group("retries_exhausted"), &["j"], t + INTERVAL));
    }
}
