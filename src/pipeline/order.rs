//! Per-record ordering on the shard consumers (docs/ordering.md): which record has a batch
//! out, which events wait for it, and which records are parked behind an event in a retry
//! tier. Pure: the consumer loop asks [`Records::admit`] what to do with each event and
//! tells [`Records::resolve`] what became of it; nothing here does I/O or reads a clock.
//!
//! The rules:
//! - a record has at most one event in a batch (open or in flight); a later event of it
//!   is held in memory until that batch resolves;
//! - when an event goes to a scheduled tier, its record is parked: a FIFO of event ids,
//!   the first (the head) being the only one that may be delivered. Every later event of
//!   the record is republished to the tier where the head is, behind it, and joins the
//!   FIFO if it was not in it; when the head is delivered or dead-lettered, the next id
//!   becomes the head; when the FIFO is empty the record is free;
//! - a head that has been due back for longer than its tier's delay and
//!   [`OVERDUE_GRACE`] is dropped (a lost message must not freeze its record for ever).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, SystemTime};

use crate::event::RecordType;

/// How long past (its tier's delay after) its due time a parked head may still be
/// waited for.
pub const OVERDUE_GRACE: Duration = Duration::from_secs(600);

/// A record: events with the same key are delivered in publish order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordKey {
    pub account: String,
    pub kind: RecordType,
    pub record_id: String,
}

/// An event of the FIFO of a parked record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parked {
    pub id: String,
    /// The tier it was last put into; `None` while it is back in its shard queue (a
    /// republish failed).
    pub tier: Option<Duration>,
    /// When it was put there.
    pub at: SystemTime,
}

impl Parked {
    /// Whether it should have come back long ago: more than its tier's delay plus
    /// [`OVERDUE_GRACE`] after it was due.
    fn overdue(&self, now: SystemTime) -> bool {
        let tier = self.tier.unwrap_or_default();
        let limit = self.at + tier + tier + OVERDUE_GRACE;
        now > limit
    }
}

/// A parked record: its shard and its FIFO, the head first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Queue {
    pub shard: u16,
    pub fifo: VecDeque<Parked>,
}

/// What to do with an arriving event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// Batch it; `head`: it is the head of its parked record.
    Batch { head: bool },
    /// Keep it in memory until its record's batch resolves.
    Hold,
    /// Republish it to this tier, behind the head; `new`: it joined the FIFO now.
    Park { tier: Duration, new: bool },
}

/// What became of an event of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Delivered or dead-lettered: it leaves its record's FIFO.
    Done,
    /// Confirmed into the scheduled tier of this delay.
    Tier(Duration),
    /// Returned to its queue (a republish failed): it comes back.
    Back,
}

/// One session's ordering state; `H` is what a held event carries.
#[derive(Debug)]
pub struct Records<H> {
    /// Records with an event in a batch: that event's id and shard.
    busy: HashMap<RecordKey, (String, u16)>,
    held: HashMap<RecordKey, VecDeque<H>>,
    parked: HashMap<RecordKey, Queue>,
}

impl<H> Default for Records<H> {
    fn default() -> Self {
        Self {
            busy: HashMap::new(),
            held: HashMap::new(),
            parked: HashMap::new(),
        }
    }
}

impl<H> Records<H> {
    /// Parked records.
    pub fn parked(&self) -> usize {
        self.parked.len()
    }

    /// Events held in memory.
    pub fn held(&self) -> usize {
        self.held.values().map(VecDeque::len).sum()
    }

    /// Decides what to do with event `id` of `record`, arrived from `shard`. Returns the
    /// decision and the ids of overdue heads dropped on the way. On [`Admit::Hold`] the
    /// caller passes the event to [`Self::hold`].
    pub fn admit(
        &mut self,
        shard: u16,
        record: &RecordKey,
        id: &str,
        now: SystemTime,
    ) -> (Admit, Vec<String>) {
        if self.busy.contains_key(record) {
            return (Admit::Hold, Vec::new());
        }
        let mut dropped = Vec::new();
        if let Some(queue) = self.parked.get_mut(record) {
            while let Some(head) = queue.fifo.front()
                && head.id != id
                && head.overdue(now)
            {
                dropped.extend(queue.fifo.pop_front().map(|p| p.id));
            }
            if queue.fifo.is_empty() {
                self.parked.remove(record);
            }
        }
        let Some(queue) = self.parked.get_mut(record) else {
            self.busy.insert(record.clone(), (id.to_owned(), shard));
            return (Admit::Batch { head: false }, dropped);
        };
        let head = queue.fifo.front().expect("a parked record has a head");
        if head.id == id {
            self.busy.insert(record.clone(), (id.to_owned(), shard));
            return (Admit::Batch { head: true }, dropped);
        }
        let Some(tier) = head.tier else {
            // The head is on its way back through the shard queue.
            return (Admit::Hold, dropped);
        };
        let admit = match queue.fifo.iter_mut().find(|p| p.id == id) {
            Some(follower) => {
                follower.tier = Some(tier);
                follower.at = now;
                Admit::Park { tier, new: false }
            }
            None => {
                queue.fifo.push_back(Parked {
                    id: id.to_owned(),
                    tier: Some(tier),
                    at: now,
                });
                Admit::Park { tier, new: true }
            }
        };
        (admit, dropped)
    }

    /// Keeps an event that [`Self::admit`] held, behind the others of its record.
    pub fn hold(&mut self, record: RecordKey, held: H) {
        self.held.entry(record).or_default().push_back(held);
    }

    /// Records what became of event `id` of `record`'s batch. Returns the events held
    /// for the record, in order, to be admitted again.
    pub fn resolve(&mut self, record: &RecordKey, id: &str, fate: Fate, now: SystemTime) -> Vec<H> {
        let shard = match self.busy.get(record) {
            Some((busy, shard)) if busy == id => {
                let shard = *shard;
                self.busy.remove(record);
                shard
            }
            // Not this session's batch (or already resolved): nothing to release.
            _ => return Vec::new(),
        };
        match fate {
            Fate::Done => {
                if let Some(queue) = self.parked.get_mut(record) {
                    queue.fifo.retain(|p| p.id != id);
                    if queue.fifo.is_empty() {
                        self.parked.remove(record);
                    }
                }
            }
            Fate::Tier(_) | Fate::Back => {
                let tier = match fate {
                    Fate::Tier(tier) => Some(tier),
                    _ => None,
                };
                let queue = self.parked.entry(record.clone()).or_insert_with(|| Queue {
                    shard,
                    fifo: VecDeque::new(),
                });
                match queue.fifo.iter_mut().find(|p| p.id == id) {
                    Some(parked) => {
                        parked.tier = tier;
                        parked.at = now;
                    }
                    None if tier.is_some() => queue.fifo.push_front(Parked {
                        id: id.to_owned(),
                        tier,
                        at: now,
                    }),
                    // A record that was not parked, returned to its queue: still free.
                    None => {}
                }
                if queue.fifo.is_empty() {
                    self.parked.remove(record);
                }
            }
        }
        self.held.remove(record).map(Vec::from).unwrap_or_default()
    }

    /// Replaces what is known of `shard`'s parked records by what its parking log says,
    /// entries in the order they were written.
    pub fn rebuild<'a>(&mut self, shard: u16, entries: impl IntoIterator<Item = LogOp<'a>>) {
        self.parked.retain(|_, q| q.shard != shard);
        for entry in entries {
            match entry {
                LogOp::Park {
                    record,
                    id,
                    tier,
                    at,
                } => {
                    let queue = self.parked.entry(record).or_insert_with(|| Queue {
                        shard,
                        fifo: VecDeque::new(),
                    });
                    match queue.fifo.iter_mut().find(|p| p.id == id) {
                        Some(parked) => {
                            parked.tier = Some(tier);
                            parked.at = at;
                        }
                        None => queue.fifo.push_back(Parked {
                            id: id.to_owned(),
                            tier: Some(tier),
                            at,
                        }),
                    }
                }
                LogOp::Release { record, id } => {
                    if let Some(queue) = self.parked.get_mut(&record) {
                        queue.fifo.retain(|p| p.id != id);
                        if queue.fifo.is_empty() {
                            self.parked.remove(&record);
                        }
                    }
                }
            }
        }
    }
}

/// One entry of a shard's parking log, as [`Records::rebuild`] reads it.
#[derive(Debug, Clone)]
pub enum LogOp<'a> {
    Park {
        record: RecordKey,
        id: &'a str,
        tier: Duration,
        at: SystemTime,
    },
    Release {
        record: RecordKey,
        id: &'a str,
    },
}

/// The shard of a record: FNV-1a (64 bits) of account, type and `record_id`, each
/// followed by a zero byte, modulo `shards`. Stable across builds, machines and
/// releases: it is part of how events reach their shard queue (docs/ordering.md).
pub fn shard_of(account: &str, kind: &str, record_id: &str, shards: u16) -> u16 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for part in [account, kind, record_id] {
        for byte in part.bytes().chain([0]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(PRIME);
        }
    }
    (hash % u64::from(shards.max(1))) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> RecordKey {
        RecordKey {
            account: "acme".into(),
            kind: RecordType::Company,
            record_id: id.into(),
        }
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    const T1: Duration = Duration::from_secs(30);
    const T2: Duration = Duration::from_secs(300);

    #[test]
    fn the_shard_function_is_stable_and_spreads() {
        // Fixed values (computed apart, with Python): a change here re-maps every record
        // (docs/ordering.md).
        assert_eq!(shard_of("acme", "company", "r1", 4), 3);
        assert_eq!(shard_of("acme", "company", "r2", 4), 0);
        assert_eq!(shard_of("acme", "contact", "r1", 1024), 328);
        assert_eq!(shard_of("a", "b", "c", 1), 0);
        // Field boundaries count: ("ab", "c") is not ("a", "bc").
        assert_ne!(
            shard_of("ab", "company", "c", 1024),
            shard_of("a", "bcompany", "c", 1024)
        );
        let mut counts = [0usize; 8];
        for n in 0..8000 {
            counts[shard_of("acme", "company", &format!("rec-{n}"), 8) as usize] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven spread: {counts:?}");
        }
    }

    /// Steps of a table test: (event id, what happens, expected decision or release).
    enum Step {
        Arrive(&'static str, u64, Admit),
        Resolve(&'static str, Fate, u64, usize),
    }

    #[test]
    fn the_parking_fifo_follows_its_head() {
        use Step::*;
        let steps = [
            // A free record: its first event is batched; the next waits in memory.
            Arrive("e1", 0, Admit::Batch { head: false }),
            Arrive("e2", 1, Admit::Hold),
            // e1 fails into tier 1: the record is parked, e2 is released.
            Resolve("e1", Fate::Tier(T1), 2, 1),
            // e2 (released) and e3 (new) park behind e1 in tier 1.
            Arrive(
                "e2",
                2,
                Admit::Park {
                    tier: T1,
                    new: true,
                },
            ),
            Arrive(
                "e3",
                3,
                Admit::Park {
                    tier: T1,
                    new: true,
                },
            ),
            // e1 comes back: it is the head, batched.
            Arrive("e1", 32, Admit::Batch { head: true }),
            // e2 comes back while the head is out: held.
            Arrive("e2", 33, Admit::Hold),
            // The head fails again into tier 2: e2 follows it there.
            Resolve("e1", Fate::Tier(T2), 34, 1),
            Arrive(
                "e2",
                34,
                Admit::Park {
                    tier: T2,
                    new: false,
                },
            ),
            Arrive(
                "e3",
                35,
                Admit::Park {
                    tier: T2,
                    new: false,
                },
            ),
            // The head comes back and is delivered: e2 is the head now.
            Arrive("e1", 340, Admit::Batch { head: true }),
            Resolve("e1", Fate::Done, 341, 0),
            // e4 arrives: parked where the head e2 is.
            Arrive(
                "e4",
                342,
                Admit::Park {
                    tier: T2,
                    new: true,
                },
            ),
            Arrive("e2", 345, Admit::Batch { head: true }),
            Resolve("e2", Fate::Done, 346, 0),
            // e3 is dead-lettered (Done as well), then e4 goes, and the record is free.
            Arrive("e3", 347, Admit::Batch { head: true }),
            Resolve("e3", Fate::Done, 348, 0),
            Arrive("e4", 650, Admit::Batch { head: true }),
            Resolve("e4", Fate::Done, 651, 0),
            Arrive("e5", 652, Admit::Batch { head: false }),
        ];
        let mut records = Records::<&str>::default();
        let r = record("r1");
        for (n, step) in steps.into_iter().enumerate() {
            match step {
                Arrive(id, t, expected) => {
                    let (admit, dropped) = records.admit(0, &r, id, at(t));
                    assert_eq!(admit, expected, "step {n}: {id}");
                    assert!(dropped.is_empty(), "step {n}");
                    if admit == Admit::Hold {
                        records.hold(r.clone(), id);
                    }
                }
                Resolve(id, fate, t, released) => {
                    let held = records.resolve(&r, id, fate, at(t));
                    assert_eq!(held.len(), released, "step {n}: {id}");
                }
            }
        }
        assert_eq!(records.parked(), 0);
    }

    #[test]
    fn other_records_flow_and_a_returned_head_holds_its_followers() {
        let mut records = Records::<&str>::default();
        let (r1, r2) = (record("r1"), record("r2"));
        assert_eq!(
            records.admit(0, &r1, "a1", at(0)).0,
            Admit::Batch { head: false }
        );
        assert_eq!(
            records.admit(1, &r2, "b1", at(0)).0,
            Admit::Batch { head: false }
        );
        records.resolve(&r1, "a1", Fate::Tier(T1), at(1));
        assert_eq!(records.parked(), 1);
        // r2 is not held up by r1.
        records.resolve(&r2, "b1", Fate::Done, at(1));
        assert_eq!(
            records.admit(1, &r2, "b2", at(2)).0,
            Admit::Batch { head: false }
        );
        // r1's head comes back and its republish fails: followers wait in memory.
        assert_eq!(
            records.admit(0, &r1, "a1", at(31)).0,
            Admit::Batch { head: true }
        );
        records.resolve(&r1, "a1", Fate::Back, at(32));
        assert_eq!(records.admit(0, &r1, "a2", at(33)).0, Admit::Hold);
        // A record that was free and returned is still free.
        records.resolve(&r2, "b2", Fate::Back, at(3));
        assert_eq!(
            records.admit(1, &r2, "b2", at(4)).0,
            Admit::Batch { head: false }
        );
    }

    #[test]
    fn an_overdue_head_is_dropped() {
        let mut records = Records::<&str>::default();
        let r = record("r1");
        records.admit(0, &r, "e1", at(0));
        records.resolve(&r, "e1", Fate::Tier(T1), at(0));
        // Due back at 30 s; waited for until 30 + 30 + 600 s.
        let (admit, dropped) = records.admit(0, &r, "e2", at(600));
        assert_eq!(
            admit,
            Admit::Park {
                tier: T1,
                new: true
            }
        );
        assert!(dropped.is_empty());
        let (admit, dropped) = records.admit(0, &r, "e2", at(661));
        assert_eq!(dropped, vec!["e1".to_owned()]);
        assert_eq!(admit, Admit::Batch { head: true });
        records.resolve(&r, "e2", Fate::Done, at(662));
        assert_eq!(records.parked(), 0);
    }

    #[test]
    fn the_log_rebuilds_a_shard() {
        let mut records = Records::<&str>::default();
        let (r1, r2, r3) = (record("r1"), record("r2"), record("r3"));
        // Something of another shard is kept; what this replica knew of shard 0 is not.
        records.admit(1, &r3, "c1", at(0));
        records.resolve(&r3, "c1", Fate::Tier(T1), at(0));
        let entries = vec![
            LogOp::Park {
                record: r1.clone(),
                id: "a1",
                tier: T1,
                at: at(0),
            },
            LogOp::Park {
                record: r1.clone(),
                id: "a2",
                tier: T1,
                at: at(1),
            },
            LogOp::Park {
                record: r2.clone(),
                id: "b1",
                tier: T1,
                at: at(1),
            },
            LogOp::Park {
                record: r1.clone(),
                id: "a1",
                tier: T2,
                at: at(40),
            },
            LogOp::Release {
                record: r2.clone(),
                id: "b1",
            },
        ];
        records.rebuild(0, entries);
        assert_eq!(records.parked(), 2);
        // r1: head a1 in tier 2, a2 behind it; r2 is free.
        assert_eq!(
            records.admit(0, &r1, "a2", at(41)).0,
            Admit::Park {
                tier: T2,
                new: false
            }
        );
        assert_eq!(
            records.admit(0, &r1, "a1", at(341)).0,
            Admit::Batch { head: true }
        );
        assert_eq!(
            records.admit(0, &r2, "b2", at(41)).0,
            Admit::Batch { head: false }
        );
        assert_eq!(
            records.admit(1, &r3, "c2", at(2)).0,
            Admit::Park {
                tier: T1,
                new: true
            }
        );
    }
}
