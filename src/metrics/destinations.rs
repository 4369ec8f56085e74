//! The per-destination series, in plain atomics rendered by hand.
//!
//! The `prometheus` crate keeps a child per label set that carries its own copy of the
//! metric's description and label pairs, several KiB per destination for the seven
//! families below, and a label lookup per call. Here a destination costs one map entry of
//! atomics, found by one lookup per call, and the scrape writes text straight from them
//! (docs/performance.md has the figures).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, PoisonError, RwLock};

use super::RequestOutcome;
use crate::event::RecordType;
use crate::pipeline::batch::FlushReason;

/// `courier_request_duration_seconds`: 5 ms doubling to ~20 s.
const DURATION_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
];
/// `courier_batch_size`, as docs/operations.md ("Metrics") lists them.
const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 150.0, 200.0];

/// A histogram's counts per bucket (not cumulative, the last slot past every bound) and
/// its sum (f64 bits). The count is the total of the slots, so a scrape that races an
/// observation still shows cumulative buckets that never exceed `+Inf`.
pub(super) struct Buckets<const N: usize> {
    bounds: &'static [f64; N],
    counts: [AtomicU64; N],
    overflow: AtomicU64,
    sum: AtomicU64,
}

impl<const N: usize> Buckets<N> {
    fn new(bounds: &'static [f64; N]) -> Self {
        Self {
            bounds,
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            overflow: AtomicU64::new(0),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    pub(super) fn observe(&self, value: f64) {
        match self.bounds.iter().position(|&bound| value <= bound) {
            Some(i) => self.counts[i].fetch_add(1, Relaxed),
            None => self.overflow.fetch_add(1, Relaxed),
        };
        let _ = self.sum.fetch_update(Relaxed, Relaxed, |bits| {
            Some((f64::from_bits(bits) + value).to_bits())
        });
    }

    /// Writes the samples, unless nothing was observed yet.
    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let counts: [u64; N] = std::array::from_fn(|i| self.counts[i].load(Relaxed));
        let count = counts.iter().sum::<u64>() + self.overflow.load(Relaxed);
        if count == 0 {
            return;
        }
        let mut cumulative = 0;
        for (bound, n) in self.bounds.iter().zip(counts) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let sum = f64::from_bits(self.sum.load(Relaxed));
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// The series of one destination (account, type).
pub(super) struct Series {
    pub(super) consumed: AtomicU64,
    pub(super) delivered: AtomicU64,
    /// Indexed by `RequestOutcome`.
    pub(super) requests: [AtomicU64; 3],
    pub(super) duration: Buckets<13>,
    pub(super) batch_size: Buckets<9>,
    /// Indexed by `FlushReason`.
    pub(super) flushed: [AtomicU64; 5],
    pub(super) splits: AtomicU64,
}

impl Default for Series {
    fn default() -> Self {
        Self {
            consumed: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            requests: Default::default(),
            duration: Buckets::new(&DURATION_BUCKETS),
            batch_size: Buckets::new(&BATCH_BUCKETS),
            flushed: Default::default(),
            splits: AtomicU64::new(0),
        }
    }
}

/// An account's two destinations, indexed by `RecordType`.
type ByType = [Option<Arc<Series>>; 2];

/// Every destination seen so far, by account and type.
#[derive(Default)]
pub(super) struct Destinations {
    by_account: RwLock<HashMap<Box<str>, ByType>>,
}

impl Destinations {
    /// Runs `f` on the destination's series, creating them on first use.
    pub(super) fn with<R>(
        &self,
        account: &str,
        kind: RecordType,
        f: impl FnOnce(&Series) -> R,
    ) -> R {
        {
            let map = self
                .by_account
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(series) = map.get(account).and_then(|s| s[kind as usize].as_deref()) {
                return f(series);
            }
        }
        let mut map = self
            .by_account
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let slot = &mut map.entry(account.into()).or_default()[kind as usize];
        f(slot.get_or_insert_with(Default::default))
    }

    /// Appends the families in Prometheus text format, destinations sorted.
    pub(super) fn render(&self, out: &mut String) {
        self.chunks().for_each(|chunk| out.push_str(&chunk));
    }

    /// The same text in pieces of about [`CHUNK`] bytes, each written when it is taken:
    /// a scrape of thousands of destinations (megabytes of text) never holds all of it.
    pub(super) fn chunks(&self) -> Chunks {
        self.chunks_of(CHUNK)
    }

    fn chunks_of(&self, size: usize) -> Chunks {
        Chunks {
            destinations: self.snapshot(),
            size,
            family: 0,
            next: 0,
            headed: false,
        }
    }

    /// Every destination's series, sorted. A snapshot, so the lock is not held while
    /// megabytes of text are written: a new destination's first event would otherwise
    /// wait, and every call behind it.
    fn snapshot(&self) -> Vec<(Box<str>, RecordType, Arc<Series>)> {
        let mut destinations: Vec<(Box<str>, RecordType, Arc<Series>)> = {
            let map = self
                .by_account
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            map.iter()
                .flat_map(|(account, by_type)| {
                    [RecordType::Company, RecordType::Contact]
                        .into_iter()
                        .filter_map(|kind| {
                            Some((account.clone(), kind, by_type[kind as usize].clone()?))
                        })
                })
                .collect()
        };
        destinations.sort_unstable_by(|a, b| (&a.0, a.1 as usize).cmp(&(&b.0, b.1 as usize)));
        destinations
    }
}

/// The size a piece of the scrape grows to before it is handed out.
pub(super) const CHUNK: usize = 64 * 1024;

/// The families' text, family by family and destination by destination.
pub(super) struct Chunks {
    destinations: Vec<(Box<str>, RecordType, Arc<Series>)>,
    /// A piece is handed out once it holds this many bytes.
    size: usize,
    /// The family being written, an index into [`FAMILIES`].
    family: usize,
    /// Its next destination.
    next: usize,
    /// Its `# HELP` and `# TYPE` lines are written.
    headed: bool,
}

impl Iterator for Chunks {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        if self.family == FAMILIES.len() {
            return None;
        }
        let mut out = String::with_capacity(self.size.min(CHUNK) + 4 * 1024);
        while out.len() < self.size && self.family < FAMILIES.len() {
            let (name, kind, help, write) = FAMILIES[self.family];
            if !self.headed {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
                self.headed = true;
            }
            while out.len() < self.size
                && let Some((account, kind, series)) = self.destinations.get(self.next)
            {
                let mut sample = Sample {
                    out: &mut out,
                    name,
                    account,
                    kind: kind.as_str(),
                };
                write(&mut sample, series);
                self.next += 1;
            }
            if self.next == self.destinations.len() {
                self.family += 1;
                self.next = 0;
                self.headed = false;
            }
        }
        Some(out)
    }
}

/// Writes one destination's samples of a family.
type WriteSamples = fn(&mut Sample, &Series);

/// The families with account and type labels: name, type, help, samples.
const FAMILIES: [(&str, &str, &str, WriteSamples); 7] = [
    (
        "courier_events_consumed_total",
        "counter",
        "Valid events consumed",
        |w, s| w.counter(None, s.consumed.load(Relaxed)),
    ),
    (
        "courier_events_delivered_total",
        "counter",
        "Events delivered with a 2xx",
        |w, s| w.counter(None, s.delivered.load(Relaxed)),
    ),
    (
        "courier_requests_total",
        "counter",
        "HTTP requests by outcome",
        |w, s| {
            let values = RequestOutcome::ALL.map(|o| (o.as_str(), &s.requests[o as usize]));
            w.used_counters("outcome", values)
        },
    ),
    (
        "courier_request_duration_seconds",
        "histogram",
        "HTTP request duration",
        |w, s| w.histogram(&s.duration),
    ),
    (
        "courier_batch_size",
        "histogram",
        "Events per flushed batch",
        |w, s| w.histogram(&s.batch_size),
    ),
    (
        "courier_batches_flushed_total",
        "counter",
        "Batches flushed, by reason",
        |w, s| {
            let values = FlushReason::ALL.map(|r| (r.as_str(), &s.flushed[r as usize]));
            w.used_counters("reason", values)
        },
    ),
    (
        "courier_batch_splits_total",
        "counter",
        "Extra requests spent isolating rejections",
        |w, s| {
            let v = s.splits.load(Relaxed);
            if v > 0 {
                w.counter(None, v);
            }
        },
    ),
];

/// Writes the samples of one family for one destination.
struct Sample<'a> {
    out: &'a mut String,
    name: &'a str,
    account: &'a str,
    kind: &'a str,
}

impl Sample<'_> {
    /// One counter sample; `extra` is a label that sorts between `account` and `type`.
    fn counter(&mut self, extra: Option<(&str, &str)>, value: u64) {
        let Self {
            out,
            name,
            account,
            kind,
        } = self;
        let _ = write!(out, "{name}{{account=\"{account}\"");
        if let Some((label, v)) = extra {
            let _ = write!(out, ",{label}=\"{v}\"");
        }
        let _ = writeln!(out, ",type=\"{kind}\"}} {value}");
    }

    /// One sample per value of `label` whose counter has moved (as the `prometheus`
    /// crate showed a label set only once used).
    fn used_counters<const N: usize>(&mut self, label: &str, values: [(&str, &AtomicU64); N]) {
        for (value, counter) in values {
            let n = counter.load(Relaxed);
            if n > 0 {
                self.counter(Some((label, value)), n);
            }
        }
    }

    /// A histogram's samples, once it has observed something.
    fn histogram<const N: usize>(&mut self, h: &Buckets<N>) {
        let labels = format!("account=\"{}\",type=\"{}\"", self.account, self.kind);
        h.write(self.out, self.name, &labels);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_of_any_size_join_into_the_same_text() {
        let d = Destinations::default();
        for i in 0..7 {
            let account = format!("a{i}");
            d.with(&account, RecordType::Company, |s| {
                s.consumed.fetch_add(i, Relaxed);
                s.batch_size.observe(3.0);
            });
        }
        let whole: String = d.chunks_of(usize::MAX).collect();
        assert_eq!(whole.matches("# TYPE ").count(), FAMILIES.len());
        // Every size ends pieces at every kind of place: inside a family, right after a
        // family's last destination, right after a header.
        for size in 1..=whole.len() + 1 {
            // No piece is empty, so there are at most as many as bytes.
            let joined: String = d.chunks_of(size).take(whole.len() + 1).collect();
            assert_eq!(joined, whole, "pieces of {size} bytes");
        }
    }

    #[test]
    fn a_scrape_of_thousands_of_destinations_comes_in_bounded_pieces() {
        let d = Destinations::default();
        for i in 0..3000 {
            let account = format!("acct-{i:04}");
            for kind in [RecordType::Company, RecordType::Contact] {
                d.with(&account, kind, |s| {
                    s.consumed.fetch_add(1, Relaxed);
                    s.batch_size.observe(7.0);
                    s.duration.observe(0.01);
                });
            }
        }
        let pieces: Vec<String> = d.chunks().collect();
        let text = pieces.concat();
        assert!(text.len() > 20 * CHUNK, "{} bytes", text.len());
        // One destination's samples of one family is at most a few KiB past the mark.
        assert!(pieces.iter().all(|p| p.len() < CHUNK + 4 * 1024));
        assert!(pieces.len() > 20);
        for (name, ..) in FAMILIES {
            assert!(
                text.matches(&format!("# TYPE {name} ")).count() <= 1,
                "{name} declared twice"
            );
        }
        assert_eq!(
            text.matches("courier_events_consumed_total{").count(),
            6000,
            "every destination once"
        );
        assert!(
            text.contains("courier_batch_size_count{account=\"acct-2999\",type=\"contact\"} 1")
        );
    }

    #[test]
    fn histograms_render_cumulative_buckets_sum_and_count() {
        let d = Destinations::default();
        for size in [1.0, 3.0, 200.0, 250.0] {
            d.with("a", RecordType::Company, |s| s.batch_size.observe(size));
        }
        let mut text = String::new();
        d.render(&mut text);
        for line in [
            "courier_batch_size_bucket{account=\"a\",type=\"company\",le=\"1\"} 1",
            "courier_batch_size_bucket{account=\"a\",type=\"company\",le=\"2\"} 1",
            "courier_batch_size_bucket{account=\"a\",type=\"company\",le=\"5\"} 2",
            "courier_batch_size_bucket{account=\"a\",type=\"company\",le=\"200\"} 3",
            "courier_batch_size_bucket{account=\"a\",type=\"company\",le=\"+Inf\"} 4",
            "courier_batch_size_sum{account=\"a\",type=\"company\"} 454",
            "courier_batch_size_count{account=\"a\",type=\"company\"} 4",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        // Only the destination that was used appears.
        assert!(!text.contains("type=\"contact\""));
    }

    #[test]
    fn destinations_are_sorted_and_counters_with_a_reason_appear_once_used() {
        let d = Destinations::default();
        d.with("b", RecordType::Contact, |s| {
            s.consumed.fetch_add(2, Relaxed)
        });
        d.with("a", RecordType::Company, |s| {
            s.flushed[FlushReason::Window as usize].fetch_add(1, Relaxed)
        });
        let mut text = String::new();
        d.render(&mut text);
        let a = text
            .find("courier_events_consumed_total{account=\"a\"")
            .unwrap();
        let b = text
            .find("courier_events_consumed_total{account=\"b\",type=\"contact\"} 2")
            .unwrap();
        assert!(a < b);
        assert!(text.contains(
            "courier_batches_flushed_total{account=\"a\",reason=\"window\",type=\"company\"} 1"
        ));
        assert!(!text.contains("reason=\"size\""));
    }

    #[test]
    fn a_scrape_during_observations_never_shows_a_bucket_above_its_count() {
        let d = std::sync::Arc::new(Destinations::default());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0..3)
            .map(|_| {
                let (d, stop) = (d.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Relaxed) {
                        d.with("a", RecordType::Company, |s| s.batch_size.observe(150.0));
                    }
                })
            })
            .collect();
        for _ in 0..300 {
            let mut text = String::new();
            d.render(&mut text);
            let value = |needle: &str| -> Option<u64> {
                let line = text.lines().find(|l| l.starts_with(needle))?;
                line.rsplit(' ').next()?.parse().ok()
            };
            let (Some(top), Some(inf), Some(count)) = (
                value("courier_batch_size_bucket{account=\"a\",type=\"company\",le=\"200\"}"),
                value("courier_batch_size_bucket{account=\"a\",type=\"company\",le=\"+Inf\"}"),
                value("courier_batch_size_count{"),
            ) else {
                continue;
            };
            assert!(top <= inf, "le=200 {top} > +Inf {inf}");
            assert_eq!(inf, count);
        }
        stop.store(true, Relaxed);
        writers.into_iter().for_each(|w| w.join().unwrap());
    }
}
