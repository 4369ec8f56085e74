//! `http-flood`: the bare reqwest loop, the HTTP ceiling of one receiver.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::cli::FloodArgs;
use crate::events::EventGen;
use crate::{Result, own_resources};

/// POSTs single signed events from `--concurrency` tasks until `--requests` were sent.
pub async fn http_flood(args: FloodArgs) -> Result<()> {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(args.concurrency)
        .tcp_nodelay(true)
        .build()?;
    let url: reqwest::Url = args.url.parse()?;
    if !url
        .host_str()
        .is_some_and(|h| h == "localhost" || h.starts_with("127.") || h == "[::1]")
    {
        return Err("http-flood only targets loopback addresses".into());
    }
    let next = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.concurrency.max(1) {
        let (client, url, next, failures) =
            (client.clone(), url.clone(), next.clone(), failures.clone());
        let secret = args.secret.clone();
        let header = args.header.clone();
        let mut generator = EventGen::new(args.seed.wrapping_add(c as u64), 20);
        let total = args.requests;
        tasks.push(tokio::spawn(async move {
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= total {
                    break;
                }
                let (_, body) = generator.event(seq, None);
                let mut req = client
                    .post(url.clone())
                    .header("content-type", "application/json")
                    .header("user-agent", "courier-bench")
                    .header("x-courier-attempt", "1")
                    .header("x-courier-event-count", "1");
                if let Some(secret) = &secret {
                    req = req.header(
                        header.as_str(),
                        courier::sign::signature(secret.as_bytes(), &body),
                    );
                }
                match req.body(body).send().await {
                    Ok(resp) if resp.status().is_success() => {
                        let _ = resp.bytes().await;
                    }
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (cpu, _) = own_resources();
    println!(
        "{}",
        json!({
            "cmd": "http-flood",
            "requests": args.requests,
            "failures": failures.load(Ordering::Relaxed),
            "concurrency": args.concurrency,
            "elapsed_s": elapsed,
            "requests_per_s": args.requests as f64 / elapsed,
            "cpu_s": cpu,
        })
    );
    Ok(())
}
