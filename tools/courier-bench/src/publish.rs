//! The publishing side: the preloaded backlog, and the fixed-rate stream of the latency run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;

use crate::Result;
use crate::broker::{ConfirmedPublisher, connect, within};
use crate::cli::{LatencyArgs, PreloadArgs};
use crate::events::{EventGen, now_ns};

/// `preload`: publishes the backlog from a few connections, confirms pipelined.
pub async fn preload(args: PreloadArgs) -> Result<()> {
    let target = args.target.resolve()?;
    let exchange = target
        .exchange
        .clone()
        .ok_or("--exchange or --config needed")?;
    if args.declare {
        let queue = target.queue.as_deref().ok_or("--declare needs --queue")?;
        declare(&target.url, &exchange, queue).await?;
    }
    let publishers = args.publishers.max(1) as u64;
    let bytes = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let url = target.url.clone();
        let exchange = exchange.clone();
        let bytes = bytes.clone();
        let window = args.window;
        let (events, accounts, seed) = (args.events, args.accounts, args.seed);
        tasks.push(tokio::spawn(async move {
            let publisher = ConfirmedPublisher::open(
                &url,
                &exchange,
                window,
                &format!("courier-bench preload {p}"),
            )
            .await?;
            let mut generator = EventGen::new(seed.wrapping_add(p * 7919), accounts);
            let mut seq = p;
            while seq < events {
                let (key, body) = generator.event(seq, None);
                bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                publisher.publish(&key, &body).await?;
                seq += publishers;
            }
            publisher.finish().await
        }));
    }
    let mut confirmed = 0;
    for t in tasks {
        confirmed += t.await??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({
            "cmd": "preload",
            "events": confirmed,
            "mean_bytes": bytes.load(Ordering::Relaxed) as f64 / confirmed.max(1) as f64,
            "elapsed_s": elapsed,
            "events_per_s": confirmed as f64 / elapsed,
        })
    );
    if confirmed != args.events {
        return Err(format!("only {confirmed} of {} events confirmed", args.events).into());
    }
    Ok(())
}

/// `preload --declare`: the exchange (topic) and a quorum queue bound with `#`, for a
/// drain without courier's topology.
async fn declare(url: &str, exchange: &str, queue: &str) -> Result<()> {
    let conn = connect(url, "courier-bench declare").await?;
    let ch = conn.create_channel().await?;
    ch.exchange_declare(
        exchange.into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    let mut qargs = FieldTable::default();
    qargs.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        qargs,
    )
    .await?;
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let _ = within(conn.close(200, "done".into())).await;
    Ok(())
}

/// `latency`: publishes at a fixed rate, each event stamped just before its publish call.
pub async fn latency(args: LatencyArgs) -> Result<()> {
    let target = args.target.resolve()?;
    let exchange = target
        .exchange
        .clone()
        .ok_or("--exchange or --config needed")?;
    let publisher =
        ConfirmedPublisher::open(&target.url, &exchange, args.window, "courier-bench latency")
            .await?;
    let mut generator = EventGen::new(args.seed, args.accounts);
    let total = args.rate * args.duration;
    let start = Instant::now();
    let mut sent = 0u64;
    let mut behind_max = 0.0f64;
    while sent < total {
        let due = ((start.elapsed().as_secs_f64() * args.rate as f64) as u64 + 1).min(total);
        behind_max = behind_max.max((due - sent.min(due)) as f64 / args.rate as f64);
        while sent < due {
            // Stamped as late as possible: what is measured starts at the publish call.
            let (key, body) = generator.event(sent, Some(now_ns()));
            publisher.publish(&key, &body).await?;
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let confirmed = publisher.finish().await?;
    println!(
        "{}",
        json!({
            "cmd": "latency",
            "events": confirmed,
            "rate": args.rate,
            "achieved_rate": sent as f64 / elapsed,
            "max_behind_s": behind_max,
            "elapsed_s": elapsed,
        })
    );
    Ok(())
}
