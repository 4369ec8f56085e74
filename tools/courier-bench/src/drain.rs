//! `drain`: the bare consumer, the broker's ceiling: consume and ack, nothing else.

use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde_json::json;

use crate::broker::{connect, within};
use crate::cli::DrainArgs;
use crate::{Result, own_resources};

/// Consumes `--expect` messages at the configuration's prefetch and acks them.
pub async fn drain(args: DrainArgs) -> Result<()> {
    let target = args.target.resolve()?;
    let queue = target.queue.clone().ok_or("--queue or --config needed")?;
    let prefetch = args.prefetch.or(target.prefetch).unwrap_or(1000);
    let conn = connect(&target.url, "courier-bench drain").await?;
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "courier-bench-drain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let (cpu0, _) = own_resources();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    let mut count = 0u64;
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    let every = args.ack_every.max(1);
    let mut acks = futures_util::stream::FuturesUnordered::new();
    while count < args.expect {
        let next = tokio::time::timeout_at(deadline, consumer.next()).await;
        let delivery = match next {
            Ok(Some(d)) => d?,
            Ok(None) => return Err("the consumer was cancelled".into()),
            Err(_) => break,
        };
        first.get_or_insert_with(Instant::now);
        count += 1;
        if every == 1 && args.await_each_ack {
            delivery.acker.ack(BasicAckOptions::default()).await?;
        } else if every == 1 {
            // Each ack is sent in order; its write is awaited alongside the next deliveries.
            acks.push(async move { delivery.acker.ack(BasicAckOptions::default()).await });
            while let Some(Some(done)) = acks.next().now_or_never() {
                done?;
            }
        } else if count.is_multiple_of(every) || count == args.expect {
            channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true })
                .await?;
        }
        last = Instant::now();
    }
    while let Some(done) = acks.next().await {
        done?;
    }
    let (cpu1, hwm) = own_resources();
    let elapsed = first.map(|f| (last - f).as_secs_f64()).unwrap_or(0.0);
    let _ = within(conn.close(200, "done".into())).await;
    println!(
        "{}",
        json!({
            "cmd": "drain",
            "complete": count >= args.expect,
            "events": count,
            "prefetch": prefetch,
            "ack_every": every,
            "await_each_ack": args.await_each_ack,
            "elapsed_s": elapsed,
            "events_per_s": if elapsed > 0.0 { count as f64 / elapsed } else { 0.0 },
            "cpu_s": cpu1 - cpu0,
            "hwm_kib": hwm,
        })
    );
    if count < args.expect {
        return Err(format!("timed out after {count} of {} messages", args.expect).into());
    }
    Ok(())
}
