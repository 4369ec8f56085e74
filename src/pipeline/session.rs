//! One broker session: the consuming connection and channel, its acknowledgements and
//! prefetch window, and the tasks it spawned. The session owns those tasks: when it ends
//! (connection lost, shutdown), they stop wherever they wait, release their request
//! slots, and never ack or republish on behalf of a dead channel; what they held returns
//! through the broker.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use futures_util::stream::SelectAll;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio::task::JoinHandle;
use tokio_util::future::FutureExt as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::acks::Acks;
use crate::broker::{self, BrokerError};
use crate::config::Settings;

/// The tasks of one session. Cheap to clone.
#[derive(Clone)]
pub struct Tasks {
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Tasks {
    fn new() -> Self {
        Self {
            tracker: TaskTracker::new(),
            cancel: CancellationToken::new(),
        }
    }

    /// Runs `work` until it ends or the session is cancelled, whichever is first.
    pub fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        // A child token per task: polling a shared token's `cancelled()` takes the lock
        // of its one waiter list on every wake of every task. The combinator holds `work`
        // once; an `async` wrapper would hold it twice (before and after it is pinned),
        // which doubles the memory of every waiting task.
        let cancel = self.cancel.child_token();
        self.tracker
            .spawn(work.with_cancellation_token_owned(cancel));
    }

    /// Cancelled when the session ends.
    pub fn token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Tasks still running.
    pub fn unfinished(&self) -> usize {
        self.tracker.len()
    }
}

/// The prefetch of each consumer: `broker.prefetch`; with per-record ordering, where
/// a replica consumes every shard, its share of it (at least one full batch), so that the
/// window of a replica active on every shard stays `broker.prefetch` (docs/ordering.md,
/// "One replica per shard").
fn consumer_prefetch(settings: &Settings) -> u16 {
    let broker = &settings.broker;
    if !broker.per_record {
        return broker.prefetch;
    }
    let share = broker.prefetch.div_ceil(broker.shards.max(1));
    let floor = u16::try_from(settings.largest_batch())
        .unwrap_or(u16::MAX)
        .min(broker.prefetch);
    share.max(floor)
}

/// A consuming connection and what hangs off it.
pub struct Session {
    connection: Connection,
    channel: Channel,
    tags: Vec<String>,
    /// The deliveries (of every shard, with per-record ordering); the consumer loop
    /// takes them.
    pub consumer: SelectAll<Consumer>,
    /// Messages the broker holds unacknowledged for this channel. Each session has its
    /// own, so late settlements of a dead channel never skew a new one.
    pub window: Arc<AtomicUsize>,
    pub acks: Acks,
    ack_task: JoinHandle<()>,
    pub tasks: Tasks,
}

impl Session {
    /// Connects, declares the topology, and starts consuming the delivery queue.
    pub async fn open(settings: &Settings) -> Result<Self, BrokerError> {
        let broker = &settings.broker;
        let name = format!("courier consume {}", broker.queue_prefix);
        let connection = broker::connect_declared(broker, &settings.retry.schedule, &name).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(BrokerError::amqp("opening the consume channel"))?;
        channel
            .basic_qos(consumer_prefetch(settings), BasicQosOptions::default())
            .await
            .map_err(BrokerError::amqp("setting prefetch"))?;
        // Per-record ordering: every shard, each with a single active consumer across
        // the replicas (docs/ordering.md).
        let queues = if broker.per_record {
            (0..broker.shards).map(|n| broker.shard_queue(n)).collect()
        } else {
            vec![broker.deliver_queue()]
        };
        let mut tags = Vec::new();
        let mut consumer = SelectAll::new();
        for queue in queues {
            let tag = format!("courier-{}-{queue}", std::process::id());
            let consumed = channel
                .basic_consume(
                    queue.as_str().into(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(BrokerError::amqp(format!("consuming from {queue}")))?;
            consumer.push(consumed);
            tags.push(tag);
        }
        let window = Arc::new(AtomicUsize::new(0));
        let (acks, ack_task) = Acks::spawn(channel.clone(), broker.prefetch, window.clone());
        Ok(Self {
            connection,
            channel,
            tags,
            consumer,
            window,
            acks,
            ack_task,
            tasks: Tasks::new(),
        })
    }

    /// Ends the session on shutdown: stops consuming, gives the tasks up to `grace` to
    /// settle, cancels what is left (it returns to the queue), sends the last acks and
    /// closes the connection. Returns how many messages were left unacknowledged, for
    /// the broker to redeliver.
    pub async fn shut_down(self, grace: Duration) -> usize {
        let brief = Duration::from_secs(5);
        for tag in &self.tags {
            let cancel = self
                .channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
            let _ = tokio::time::timeout(brief, cancel).await;
        }
        // What is settled already is acknowledged now, not behind the watermark of what
        // is still in flight: the grace gives the broker time to take those acks.
        self.acks.flush();
        self.tasks.tracker.close();
        if tokio::time::timeout(grace, self.tasks.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                ?grace,
                unfinished = self.tasks.unfinished(),
                "shutdown timeout passed; unsettled messages return to the queue"
            );
        }
        let window = self.window.clone();
        self.end(brief).await;
        window.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The consuming connection (the parking log is read on it).
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// Ends a session whose connection was lost: its tasks stop at once.
    pub async fn abandon(self) {
        self.tasks.tracker.close();
        self.end(Duration::from_secs(1)).await;
    }

    async fn end(self, brief: Duration) {
        let Self {
            connection,
            channel,
            acks,
            ack_task,
            tasks,
            ..
        } = self;
        tasks.cancel.cancel();
        let _ = tokio::time::timeout(brief, tasks.tracker.wait()).await;
        // Every task is gone and with it its ack handle: the ack task sends what was
        // settled, then ends.
        drop(acks);
        let _ = tokio::time::timeout(brief, ack_task).await;
        // The broker answers a channel's close after its channel has read every ack sent
        // before it (the ack task's last pause covers the queues' side).
        let _ = tokio::time::timeout(brief, channel.close(200, "session ended".into())).await;
        let _ = tokio::time::timeout(brief, connection.close(200, "session ended".into())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::{MINIMAL, parse_with};

    #[test]
    fn shard_consumers_share_the_prefetch_but_hold_a_full_batch() {
        let with = |broker: &str, account: &str| {
            let text = format!("{MINIMAL}{account}").replace(
                "[broker]",
                &format!("[delivery]\nordering = \"per_record\"\n[broker]\n{broker}"),
            );
            consumer_prefetch(&parse_with(&text, &[]).unwrap())
        };
        assert_eq!(with("prefetch = 1000\nshards = 4", ""), 250);
        assert_eq!(with("prefetch = 1000\nshards = 3", ""), 334);
        assert_eq!(with("prefetch = 100\nshards = 8", "batch_size = 50\n"), 50);
        let unordered = parse_with(MINIMAL, &[]).unwrap();
        assert_eq!(consumer_prefetch(&unordered), unordered.broker.prefetch);
    }
}
