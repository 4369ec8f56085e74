//! The accumulator: one open batch per destination, flushed by size, body bytes, age,
//! a full prefetch window, or shutdown (docs/receiving.md, "The request").
//!
//! Pure data structure: it owns no timers and does no I/O. The worker asks it for the
//! next deadline and calls [`Accumulator::expired`] when it passes. Each batch keeps the
//! context (account settings) it was formed under, so a reload never changes an open
//! batch.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::time::Duration;

use tokio::time::Instant;

/// The flush rules of one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Events per request; 1 sends the bare object instead of an array.
    pub batch_size: usize,
    /// A batch is flushed before its body would grow past this.
    pub max_body_bytes: usize,
    /// A batch is flushed this long after its first event arrived.
    pub flush_interval: Duration,
}

/// Why a batch was flushed (the `reason` label of `courier_batches_flushed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushReason {
    Size,
    Bytes,
    Interval,
    Window,
    Shutdown,
}

impl FlushReason {
    pub const ALL: [FlushReason; 5] = [
        Self::Size,
        Self::Bytes,
        Self::Interval,
        Self::Window,
        Self::Shutdown,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            FlushReason::Size => "size",
            FlushReason::Bytes => "bytes",
            FlushReason::Interval => "interval",
            FlushReason::Window => "window",
            FlushReason::Shutdown => "shutdown",
        }
    }
}

/// A batch that left the accumulator.
#[derive(Debug)]
pub struct Flushed<K, C, T> {
    pub key: K,
    pub ctx: C,
    pub limits: Limits,
    pub items: Vec<T>,
    pub reason: FlushReason,
}

struct Open<C, T> {
    ctx: C,
    limits: Limits,
    items: Vec<T>,
    /// Sum of the events' lengths.
    event_bytes: usize,
    deadline: Instant,
    seq: u64,
}

impl<C, T> Open<C, T> {
    /// The body length if `extra` more bytes (one more event) were added.
    fn body_len_with(&self, extra: usize) -> usize {
        let n = self.items.len() + 1;
        if self.limits.batch_size == 1 {
            extra
        } else {
            // `[` + events + commas + `]`
            2 + self.event_bytes + extra + (n - 1)
        }
    }
}

/// Open batches by destination key.
pub struct Accumulator<K, C, T> {
    open: HashMap<K, Open<C, T>>,
    deadlines: BTreeMap<(Instant, u64), K>,
    /// Open batches by age (`seq`), the oldest first.
    ages: BTreeMap<u64, K>,
    next_seq: u64,
    buffered: usize,
}

impl<K: Clone + Eq + Hash, C, T> Default for Accumulator<K, C, T> {
    fn default() -> Self {
        Self {
            open: HashMap::new(),
            deadlines: BTreeMap::new(),
            ages: BTreeMap::new(),
            next_seq: 0,
            buffered: 0,
        }
    }
}

impl<K: Clone + Eq + Hash, C, T> Accumulator<K, C, T> {
    /// Events held in open batches.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// Open batches.
    pub fn open_batches(&self) -> usize {
        self.open.len()
    }

    /// When the oldest open batch is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.keys().next().map(|(at, _)| *at)
    }

    /// The oldest open batch and its first event: the one that arrived first of all the
    /// events held open.
    pub fn oldest(&self) -> Option<(&K, &T)> {
        let key = self.ages.values().next()?;
        let first = self.open.get(key)?.items.first()?;
        Some((key, first))
    }

    /// Flushes the open batch of `key`, if there is one.
    pub fn flush(&mut self, key: &K, reason: FlushReason, mut emit: impl FnMut(Flushed<K, C, T>)) {
        if let Some(flushed) = self.take(key, reason) {
            emit(flushed);
        }
    }

    /// Adds one event of `len` bytes. `ctx` gives the settings for a new batch (it is not
    /// called when the destination already has an open batch). Full batches go to `emit`.
    pub fn push(
        &mut self,
        key: &K,
        item: T,
        len: usize,
        now: Instant,
        ctx: impl FnOnce() -> (C, Limits),
        mut emit: impl FnMut(Flushed<K, C, T>),
    ) {
        if let Some(open) = self.open.get(key)
            && open.body_len_with(len) > open.limits.max_body_bytes
        {
            let flushed = self
                .take(key, FlushReason::Bytes)
                .expect("open batch exists");
            emit(flushed);
        }
        let open = match self.open.get_mut(key) {
            Some(open) => open,
            None => {
                let (ctx, limits) = ctx();
                let seq = self.next_seq;
                self.next_seq += 1;
                let deadline = now + limits.flush_interval;
                self.deadlines.insert((deadline, seq), key.clone());
                self.ages.insert(seq, key.clone());
                self.open.entry(key.clone()).or_insert(Open {
                    ctx,
                    limits,
                    // Small at first: with thousands of destinations most batches stay tiny.
                    items: Vec::with_capacity(limits.batch_size.min(4)),
                    event_bytes: 0,
                    deadline,
                    seq,
                })
            }
        };
        open.items.push(item);
        open.event_bytes += len;
        self.buffered += 1;
        if open.items.len() >= open.limits.batch_size {
            let flushed = self
                .take(key, FlushReason::Size)
                .expect("open batch exists");
            emit(flushed);
        }
    }

    /// Flushes every batch whose interval has passed.
    pub fn expired(&mut self, now: Instant, mut emit: impl FnMut(Flushed<K, C, T>)) {
        while let Some(entry) = self.deadlines.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let key = entry.remove();
            if let Some(flushed) = self.take(&key, FlushReason::Interval) {
                emit(flushed);
            }
        }
    }

    /// Flushes every open batch: a full prefetch window (`Window`, no new message can
    /// arrive) or shutdown.
    pub fn drain(&mut self, reason: FlushReason, mut emit: impl FnMut(Flushed<K, C, T>)) {
        let keys: Vec<K> = self.open.keys().cloned().collect();
        for key in keys {
            if let Some(flushed) = self.take(&key, reason) {
                emit(flushed);
            }
        }
    }

    /// Flushes the fullest open batches, largest first, until at most `keep` events stay
    /// buffered: the prefetch window is (nearly) full. The batches left open keep
    /// filling, so a window shared by many destinations still sends batches near their
    /// size instead of many small ones.
    pub fn flush_fullest(
        &mut self,
        reason: FlushReason,
        keep: usize,
        mut emit: impl FnMut(Flushed<K, C, T>),
    ) {
        if self.buffered <= keep {
            return;
        }
        let mut by_size: Vec<(usize, u64, K)> = self
            .open
            .iter()
            .map(|(key, open)| (open.items.len(), open.seq, key.clone()))
            .collect();
        // Fullest first; among equals the oldest, whose messages hold the ack watermark.
        by_size.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for (_, _, key) in by_size {
            if self.buffered <= keep {
                break;
            }
            if let Some(flushed) = self.take(&key, reason) {
                emit(flushed);
            }
        }
    }

    /// Drops every open batch without flushing (their messages were lost with their
    /// channel and will be redelivered).
    pub fn discard(&mut self) -> usize {
        let n = self.buffered;
        self.open.clear();
        self.deadlines.clear();
        self.ages.clear();
        self.buffered = 0;
        n
    }

    fn take(&mut self, key: &K, reason: FlushReason) -> Option<Flushed<K, C, T>> {
        let open = self.open.remove(key)?;
        self.deadlines.remove(&(open.deadline, open.seq));
        self.ages.remove(&open.seq);
        self.buffered -= open.items.len();
        Some(Flushed {
            key: key.clone(),
            ctx: open.ctx,
            limits: open.limits,
            items: open.items,
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Acc = Accumulator<&'static str, (), u32>;

    fn limits(batch_size: usize, max_body_bytes: usize, ms: u64) -> Limits {
        Limits {
            batch_size,
            max_body_bytes,
            flush_interval: Duration::from_millis(ms),
        }
    }

    fn push(
        acc: &mut Acc,
        key: &'static str,
        item: u32,
        len: usize,
        l: Limits,
    ) -> Vec<(Vec<u32>, FlushReason)> {
        let mut out = Vec::new();
        acc.push(
            &key,
            item,
            len,
            Instant::now(),
            || ((), l),
            |f| out.push((f.items, f.reason)),
        );
        out
    }

    #[test]
    fn flushes_at_batch_size() {
        let mut acc = Acc::default();
        let l = limits(3, 1000, 1000);
        assert!(push(&mut acc, "a", 1, 10, l).is_empty());
        assert!(push(&mut acc, "b", 9, 10, l).is_empty());
        assert!(push(&mut acc, "a", 2, 10, l).is_empty());
        assert_eq!(
            push(&mut acc, "a", 3, 10, l),
            vec![(vec![1, 2, 3], FlushReason::Size)]
        );
        assert_eq!(acc.buffered(), 1);
        assert_eq!(acc.open_batches(), 1);
    }

    #[test]
    fn batch_size_one_flushes_every_event() {
        let mut acc = Acc::default();
        let l = limits(1, 100, 1000);
        assert_eq!(
            push(&mut acc, "a", 1, 100, l),
            vec![(vec![1], FlushReason::Size)]
        );
        assert_eq!(acc.buffered(), 0);
        assert_eq!(acc.next_deadline(), None);
    }

    #[test]
    fn flushes_before_the_body_would_exceed_max_bytes() {
        let mut acc = Acc::default();
        // Two events of 10 bytes: "[" + 10 + "," + 10 + "]" = 23 bytes.
        let l = limits(200, 23, 1000);
        assert!(push(&mut acc, "a", 1, 10, l).is_empty());
        assert!(push(&mut acc, "a", 2, 10, l).is_empty());
        assert_eq!(
            push(&mut acc, "a", 3, 1, l),
            vec![(vec![1, 2], FlushReason::Bytes)]
        );
        assert_eq!(acc.buffered(), 1);
    }

    #[test]
    fn an_oversized_event_still_travels_alone() {
        let mut acc = Acc::default();
        let l = limits(200, 5, 1000);
        assert!(push(&mut acc, "a", 1, 50, l).is_empty());
        assert_eq!(
            push(&mut acc, "a", 2, 50, l),
            vec![(vec![1], FlushReason::Bytes)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn flushes_on_interval() {
        let mut acc = Acc::default();
        push(&mut acc, "a", 1, 10, limits(10, 1000, 100));
        tokio::time::advance(Duration::from_millis(50)).await;
        push(&mut acc, "b", 2, 10, limits(10, 1000, 100));
        push(&mut acc, "a", 3, 10, limits(10, 1000, 100));
        let mut out = Vec::new();
        acc.expired(Instant::now(), |f| out.push(f.items));
        assert!(out.is_empty());
        assert_eq!(
            acc.next_deadline().unwrap() - Instant::now(),
            Duration::from_millis(50)
        );
        tokio::time::advance(Duration::from_millis(50)).await;
        acc.expired(Instant::now(), |f| out.push(f.items));
        assert_eq!(
            out,
            vec![vec![1, 3]],
            "the interval counts from the first event"
        );
        tokio::time::advance(Duration::from_millis(50)).await;
        acc.expired(Instant::now(), |f| out.push(f.items));
        assert_eq!(out, vec![vec![1, 3], vec![2]]);
        assert_eq!(acc.next_deadline(), None);
    }

    #[test]
    fn drain_flushes_every_open_batch_with_its_reason() {
        let mut acc = Acc::default();
        let l = limits(100, 10_000, 60_000);
        for (key, n) in [("a", 1), ("b", 5), ("c", 3)] {
            for i in 0..n {
                push(&mut acc, key, i, 10, l);
            }
        }
        let mut out = Vec::new();
        acc.drain(FlushReason::Window, |f| {
            out.push((f.key, f.items.len(), f.reason))
        });
        out.sort_unstable_by_key(|o| o.0);
        assert_eq!(
            out,
            vec![
                ("a", 1, FlushReason::Window),
                ("b", 5, FlushReason::Window),
                ("c", 3, FlushReason::Window)
            ]
        );
        assert_eq!(acc.buffered(), 0);
        assert_eq!(acc.next_deadline(), None);
        push(&mut acc, "d", 0, 10, l);
        let mut rest = Vec::new();
        acc.drain(FlushReason::Shutdown, |f| {
            rest.push((f.items.len(), f.reason))
        });
        assert_eq!(rest, vec![(1, FlushReason::Shutdown)]);
    }

    #[test]
    fn flush_fullest_sends_the_largest_batches_until_few_enough_stay() {
        let mut acc = Acc::default();
        let l = limits(100, 10_000, 60_000);
        for (key, n) in [("a", 2), ("b", 7), ("c", 4), ("d", 4), ("e", 1)] {
            for i in 0..n {
                push(&mut acc, key, i, 10, l);
            }
        }
        assert_eq!(acc.buffered(), 18);
        let mut out = Vec::new();
        acc.flush_fullest(FlushReason::Window, 9, |f| {
            out.push((f.key, f.items.len(), f.reason))
        });
        // 18 - 7 = 11 > 9, so one of the two fours goes too: the older ("c").
        assert_eq!(
            out,
            vec![("b", 7, FlushReason::Window), ("c", 4, FlushReason::Window)]
        );
        assert_eq!(acc.buffered(), 7);
        assert_eq!(acc.open_batches(), 3);
        out.clear();
        acc.flush_fullest(FlushReason::Window, 7, |f| out.push((f.key, 0, f.reason)));
        assert!(out.is_empty(), "nothing to do at or below `keep`");
        acc.flush_fullest(FlushReason::Window, 0, |f| out.push((f.key, 0, f.reason)));
        assert_eq!(out.len(), 3);
        assert_eq!(acc.buffered(), 0);
        assert_eq!(acc.next_deadline(), None);
    }

    #[test]
    fn the_oldest_batch_is_the_first_opened_still_open() {
        let mut acc = Acc::default();
        let l = limits(2, 10_000, 60_000);
        assert_eq!(acc.oldest(), None);
        push(&mut acc, "a", 1, 10, l);
        push(&mut acc, "b", 2, 10, l);
        push(&mut acc, "c", 3, 10, l);
        assert_eq!(acc.oldest(), Some((&"a", &1)));
        push(&mut acc, "a", 4, 10, l); // full: flushed by size
        assert_eq!(acc.oldest(), Some((&"b", &2)));
        let mut out = Vec::new();
        acc.flush(&"b", FlushReason::Window, |f| {
            out.push((f.key, f.items, f.reason))
        });
        assert_eq!(out, vec![("b", vec![2], FlushReason::Window)]);
        assert_eq!(acc.oldest(), Some((&"c", &3)));
        push(&mut acc, "a", 5, 10, l);
        assert_eq!(
            acc.oldest(),
            Some((&"c", &3)),
            "a reopened batch is the newest"
        );
        acc.flush(&"zz", FlushReason::Window, |_| panic!("no such batch"));
        assert_eq!(acc.discard(), 2);
        assert_eq!(acc.oldest(), None);
    }

    #[test]
    fn settings_of_an_open_batch_do_not_change() {
        let mut acc = Acc::default();
        push(&mut acc, "a", 1, 10, limits(2, 1000, 1000));
        // A reload shrinks nothing already open: the batch keeps batch_size 2.
        assert_eq!(
            push(&mut acc, "a", 2, 10, limits(50, 1000, 1000)),
            vec![(vec![1, 2], FlushReason::Size)]
        );
    }
}
