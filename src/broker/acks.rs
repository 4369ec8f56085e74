//! Acknowledgements by watermark, one task per consuming channel.
//!
//! Per-destination batching settles messages out of order. Acking each one alone makes
//! the broker scan its unacknowledged list on every ack, which halves what a quorum queue
//! can take (docs/performance.md). Instead, settled tags are collected and acknowledged with
//! one `multiple = true` ack up to the highest tag below which everything is settled.
//!
//! Care points, all kept here:
//! - every tag is acknowledged exactly once: a `multiple` ack always names a tag that is
//!   still outstanding (the broker closes the channel otherwise), and tags acked alone
//!   are never named again;
//! - a multiple ack never crosses channel generations: each channel has its own task;
//! - a batch held in backoff freezes the watermark while settled messages behind it still
//!   fill the prefetch window: when they are most of the window, or when a nearly full
//!   window has not moved for a tick, or any window for a second, the settled ones are
//!   acknowledged alone. (A batch still open that holds the watermark is the consumer's
//!   to flush: the lowest tag not yet passed is published for it, [`Acks::low`].)
//! - a shutdown acknowledges what is settled at once ([`Acks::flush`]), and the last
//!   single acks before a channel closes get a moment to reach the queue
//!   (docs/design.md, "Shutdown").

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::mpsc;

/// A tag's state above the watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Delivered, not settled.
    Open,
    /// Settled; its ack waits for the watermark.
    Deferred,
    /// Acked or nacked on its own already.
    Done,
}

/// The bookkeeping, without I/O: which acks to send.
#[derive(Debug)]
pub struct Watermark {
    /// The lowest tag not yet passed (tags start at 1 on every channel).
    next: u64,
    /// `slots[i]` is tag `next + i`.
    slots: VecDeque<Slot>,
    deferred: usize,
    /// Tags deferred since the last `take_deferred` (some may have passed the watermark
    /// since): the fallback visits these, not every slot.
    waiting: Vec<u64>,
}

impl Default for Watermark {
    fn default() -> Self {
        Self {
            next: 1,
            slots: VecDeque::new(),
            deferred: 0,
            waiting: Vec::new(),
        }
    }
}

impl Watermark {
    fn slot(&mut self, tag: u64) -> Option<&mut Slot> {
        if tag < self.next {
            return None;
        }
        let index = (tag - self.next) as usize;
        if index >= self.slots.len() {
            self.slots.resize(index + 1, Slot::Open);
        }
        self.slots.get_mut(index)
    }

    /// Records a settled tag whose ack may wait.
    pub fn defer(&mut self, tag: u64) {
        if let Some(slot) = self.slot(tag)
            && *slot == Slot::Open
        {
            *slot = Slot::Deferred;
            self.deferred += 1;
            self.waiting.push(tag);
            if self.waiting.len() > 4 * self.deferred + 1024 {
                // Most entries passed the watermark already: keep the list near the
                // number of tags that really wait.
                let (next, slots) = (self.next, &self.slots);
                self.waiting.retain(|&t| {
                    t >= next && slots.get((t - next) as usize) == Some(&Slot::Deferred)
                });
            }
        }
    }

    /// Records a tag acknowledged (or nacked) on its own.
    pub fn done(&mut self, tag: u64) {
        let was_deferred = self
            .slot(tag)
            .map(|slot| std::mem::replace(slot, Slot::Done))
            == Some(Slot::Deferred);
        if was_deferred {
            self.deferred -= 1;
        }
    }

    /// Moves the watermark over every settled tag at the front. Returns the tag for one
    /// `multiple` ack (the highest deferred tag passed; still outstanding) and how many
    /// deferred tags it covers.
    pub fn advance(&mut self) -> Option<(u64, usize)> {
        let mut target = None;
        let mut covered = 0;
        while let Some(front) = self.slots.front().copied() {
            match front {
                Slot::Open => break,
                Slot::Deferred => {
                    target = Some(self.next);
                    covered += 1;
                    self.deferred -= 1;
                }
                Slot::Done => {}
            }
            self.slots.pop_front();
            self.next += 1;
        }
        if self.deferred == 0 {
            self.waiting.clear();
        }
        target.map(|tag| (tag, covered))
    }

    /// The lowest tag not yet settled or passed: the message that holds the watermark.
    pub fn low(&self) -> u64 {
        self.next
    }

    /// Settled tags whose acks wait.
    pub fn deferred(&self) -> usize {
        self.deferred
    }

    /// Marks every deferred tag done and returns them, to be acked one by one.
    pub fn take_deferred(&mut self) -> Vec<u64> {
        let mut tags = std::mem::take(&mut self.waiting);
        tags.retain(|&tag| {
            let index = tag.checked_sub(self.next).map(|i| i as usize);
            match index.and_then(|i| self.slots.get_mut(i)) {
                Some(slot) if *slot == Slot::Deferred => {
                    *slot = Slot::Done;
                    true
                }
                _ => false, // passed the watermark, or acked meanwhile
            }
        });
        self.deferred = 0;
        tags
    }
}

enum Msg {
    Ack(Vec<u64>),
    Nack(u64),
    /// Acknowledge every settled tag now, alone if the watermark cannot pass them.
    Flush,
}

/// Settles messages of one channel. Cheap to clone; the task ends when every handle is
/// dropped, after acknowledging what was settled.
#[derive(Clone)]
pub struct Acks {
    tx: mpsc::UnboundedSender<Msg>,
    low: Arc<AtomicU64>,
}

impl Acks {
    /// Starts the ack task of `channel`. `window` counts messages the broker holds as
    /// unacknowledged for this channel; the task decrements it as acks go out.
    pub fn spawn(
        channel: Channel,
        prefetch: u16,
        window: Arc<AtomicUsize>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        // Single acks cost the broker a scan of its unacknowledged list each (with a
        // window of thousands, more than the rest of its work: docs/performance.md). A
        // watermark that stands still costs nothing while the broker can still send, and
        // the consumer flushes an open batch that holds it once the window fills; so
        // acks go alone only when a (nearly) full window does not move.
        let nearly_full = (prefetch as usize * 7 / 8).max(1);
        let low = Arc::new(AtomicU64::new(1));
        let task = tokio::spawn(run(channel, rx, nearly_full, window, low.clone()));
        (Self { tx, low }, task)
    }

    /// Acknowledges these tags (delivered, or confirmed into another queue).
    pub fn ack(&self, tags: Vec<u64>) {
        // A closed task means the channel is gone: the broker redelivers.
        let _ = self.tx.send(Msg::Ack(tags));
    }

    /// The lowest tag that is neither settled nor acknowledged: while it waits, no
    /// `multiple` ack can pass it.
    pub fn low(&self) -> u64 {
        self.low.load(Ordering::Relaxed)
    }

    /// Returns this tag to the queue.
    pub fn nack(&self, tag: u64) {
        let _ = self.tx.send(Msg::Nack(tag));
    }

    /// Acknowledges everything settled so far without waiting for the watermark: at the
    /// start of a shutdown, so that the broker has taken those acks before the channel
    /// closes.
    pub fn flush(&self) {
        let _ = self.tx.send(Msg::Flush);
    }
}

/// Settlements taken from the queue before one ack goes out: enough to coalesce what
/// arrives while an ack is written, few enough to keep the window moving.
const COALESCE_AT_MOST: usize = 1024;

/// Ticks (of 100 ms) after which a watermark that stands still, however full the
/// window, lets the settled messages behind it go with single acks: they are delivered,
/// and a crash should not send them again.
const STILL_TICKS: u32 = 10;

async fn run(
    channel: Channel,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    nearly_full: usize,
    window: Arc<AtomicUsize>,
    low: Arc<AtomicU64>,
) {
    let mut marks = Watermark::default();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut moved = true;
    // Ticks since the watermark last moved.
    let mut still = 0u32;
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                let mut flush = false;
                // Take what else is queued before acking: requests that ended while the
                // last ack was being written go out in one `multiple` ack, not one each.
                let mut next = Some(msg);
                let mut taken = 0;
                while let Some(msg) = next.take() {
                    match msg {
                        Msg::Ack(tags) => tags.into_iter().for_each(|tag| marks.defer(tag)),
                        Msg::Flush => flush = true,
                        Msg::Nack(tag) => {
                            marks.done(tag);
                            window.fetch_sub(1, Ordering::SeqCst);
                            if let Err(e) = channel.basic_nack(tag, BasicNackOptions { multiple: false, requeue: true }).await {
                                tracing::debug!(error = %e, tag, "nack failed; the message will be redelivered");
                            }
                        }
                    }
                    taken += 1;
                    if taken < COALESCE_AT_MOST {
                        next = rx.try_recv().ok();
                    }
                }
                let advanced = marks.advance();
                low.store(marks.low(), Ordering::Relaxed);
                if let Some((tag, covered)) = advanced {
                    moved = true;
                    window.fetch_sub(covered, Ordering::SeqCst);
                    if let Err(e) = channel.basic_ack(tag, BasicAckOptions { multiple: true }).await {
                        tracing::debug!(error = %e, tag, "ack failed; the messages will be redelivered");
                    }
                }
                if flush || marks.deferred() >= nearly_full {
                    ack_alone(&channel, &mut marks, &window).await;
                }
            }
            _ = tick.tick() => {
                // The watermark is stuck behind a slow batch: ack what waits, alone.
                still = if moved { 0 } else { still + 1 };
                let pressed = window.load(Ordering::SeqCst) >= nearly_full;
                if marks.deferred() > 0 && (still >= 1 && pressed || still >= STILL_TICKS) {
                    ack_alone(&channel, &mut marks, &window).await;
                }
                moved = false;
            }
        }
    }
    // Every handle is gone: acknowledge what was settled before the channel closes.
    if let Some((tag, covered)) = marks.advance() {
        window.fetch_sub(covered, Ordering::SeqCst);
        let _ = channel
            .basic_ack(tag, BasicAckOptions { multiple: true })
            .await;
    }
    let alone = ack_alone(&channel, &mut marks, &window).await;
    if alone > QUEUE_CLIENT_IN_FLIGHT && channel.status().connected() {
        // The channel's close does not wait for its quorum queues to take the acks sent
        // just before it: the broker's queue client sends a few dozen commands at a time
        // and drops what it still holds when the channel goes. Give it time to send them.
        let pause = Duration::from_micros(500 * alone as u64).min(Duration::from_secs(1));
        tracing::debug!(
            acked_alone = alone,
            ?pause,
            "last acks sent; letting the broker take them"
        );
        tokio::time::sleep(pause).await;
    }
}

/// Commands the broker's quorum queue client of a channel keeps in flight; beyond that it
/// holds them back until earlier ones are applied.
const QUEUE_CLIENT_IN_FLIGHT: usize = 32;

/// Acknowledges every deferred tag on its own.
async fn ack_alone(channel: &Channel, marks: &mut Watermark, window: &AtomicUsize) -> usize {
    let tags = marks.take_deferred();
    let n = tags.len();
    for tag in tags {
        window.fetch_sub(1, Ordering::SeqCst);
        if let Err(e) = channel
            .basic_ack(tag, BasicAckOptions { multiple: false })
            .await
        {
            tracing::debug!(error = %e, tag, "ack failed; the message will be redelivered");
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_settlement_is_one_multiple_ack() {
        let mut w = Watermark::default();
        w.defer(1);
        assert_eq!(w.advance(), Some((1, 1)));
        w.defer(2);
        w.defer(3);
        assert_eq!(w.advance(), Some((3, 2)));
        assert_eq!(w.deferred(), 0);
    }

    #[test]
    fn low_is_the_tag_that_holds_the_watermark() {
        let mut w = Watermark::default();
        assert_eq!(w.low(), 1);
        w.defer(2);
        w.advance();
        assert_eq!(w.low(), 1, "tag 1 is open");
        w.defer(1);
        w.advance();
        assert_eq!(w.low(), 3);
        w.done(3);
        w.advance();
        assert_eq!(w.low(), 4, "a nacked tag passes too");
    }

    #[test]
    fn a_gap_holds_the_watermark() {
        let mut w = Watermark::default();
        w.defer(2);
        w.defer(3);
        assert_eq!(w.advance(), None, "tag 1 is open");
        assert_eq!(w.deferred(), 2);
        w.defer(1);
        assert_eq!(w.advance(), Some((3, 3)));
    }

    #[test]
    fn a_multiple_ack_never_names_a_tag_acked_alone() {
        let mut w = Watermark::default();
        w.defer(2);
        w.defer(3);
        assert_eq!(w.take_deferred(), vec![2, 3], "the stuck ones go alone");
        w.defer(1);
        // 2 and 3 are done: the multiple ack names 1, the highest still outstanding.
        assert_eq!(w.advance(), Some((1, 1)));
        w.done(4); // a nack
        assert_eq!(w.advance(), None, "nothing outstanding to ack");
        w.defer(5);
        assert_eq!(w.advance(), Some((5, 1)));
    }

    #[test]
    fn the_waiting_list_stays_small_when_the_watermark_moves() {
        let mut w = Watermark::default();
        w.defer(1);
        for tag in 3..100_000 {
            w.defer(tag);
            w.done(tag - 1);
            w.advance();
        }
        assert!(w.waiting.len() < 5_000, "{} stale entries", w.waiting.len());
        assert_eq!(
            w.take_deferred(),
            Vec::<u64>::new(),
            "everything passed the watermark"
        );
        // A stuck front: the deferred tags behind it are exactly what take_deferred returns.
        let mut w = Watermark::default();
        for tag in 2..50 {
            w.defer(tag);
        }
        w.done(10);
        assert_eq!(w.take_deferred().len(), 47);
    }

    #[test]
    fn settling_twice_counts_once() {
        let mut w = Watermark::default();
        w.defer(1);
        w.defer(1);
        assert_eq!(w.deferred(), 1);
        assert_eq!(w.advance(), Some((1, 1)));
        w.defer(1); // below the watermark: ignored
        assert_eq!(w.advance(), None);
    }
}
