//! `receive`: the HTTP receiver of every run. It answers 200, counts events and
//! duplicates, verifies signatures and measures publish→receipt latency; it prints a JSON
//! summary once the expected events arrived.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::Result;
use crate::cli::ReceiveArgs;
use crate::events::now_ns;

/// What one body held: per event, its sequence number and `bench_ts` when readable.
#[derive(Default)]
struct Scan {
    events: u64,
    marks: Vec<(Option<u64>, Option<u64>)>,
}

/// Counts the events of a body (a JSON array of objects, or one object) without building
/// a tree, and reads the `"id":"<tag>-<seq>"` and `"bench_ts":<ns>` that this tool's
/// events start with.
fn scan_body(body: &[u8]) -> Scan {
    let mut scan = Scan::default();
    match body.first() {
        Some(b'{') => {
            scan.events = 1;
            scan.marks.push(mark(body));
        }
        Some(b'[') => {
            let (mut depth, mut in_str, mut i) = (0usize, false, 1usize);
            while i < body.len() {
                let b = body[i];
                if in_str {
                    match b {
                        b'\\' => i += 1,
                        b'"' => in_str = false,
                        _ => {}
                    }
                } else {
                    match b {
                        b'"' => in_str = true,
                        b'{' | b'[' => {
                            if depth == 0 {
                                scan.events += 1;
                                scan.marks.push(mark(&body[i..]));
                            }
                            depth += 1;
                        }
                        b'}' | b']' => {
                            if depth == 0 {
                                break;
                            }
                            depth -= 1;
                        }
                        _ => {}
                    }
                }
                i += 1;
            }
        }
        _ => {}
    }
    scan
}

fn mark(event: &[u8]) -> (Option<u64>, Option<u64>) {
    let Some(rest) = event.strip_prefix(b"{\"id\":\"") else {
        return (None, None);
    };
    let Some(end) = rest.iter().position(|&b| b == b'"') else {
        return (None, None);
    };
    let id = &rest[..end];
    let seq = id
        .iter()
        .rposition(|&b| b == b'-')
        .and_then(|p| std::str::from_utf8(&id[p + 1..]).ok())
        .and_then(|s| s.parse().ok());
    let ts = rest[end + 1..]
        .strip_prefix(b",\"bench_ts\":")
        .and_then(|t| {
            let n = t.iter().take_while(|b| b.is_ascii_digit()).count();
            std::str::from_utf8(&t[..n]).ok()?.parse().ok()
        });
    (seq, ts)
}

/// Sequence numbers seen, to count distinct events and duplicates.
#[derive(Default)]
struct Seen(Vec<u64>);

impl Seen {
    /// True when `seq` is new.
    fn insert(&mut self, seq: u64) -> bool {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.0.len() {
            self.0.resize(word + 1, 0);
        }
        let new = self.0[word] & (1 << bit) == 0;
        self.0[word] |= 1 << bit;
        new
    }
}

/// A pause between requests longer than any seen while a backlog drains (a few tens of
/// milliseconds), shorter than the default `flush_interval` (1 s).
const QUIET: Duration = Duration::from_millis(250);

#[derive(Default)]
struct Stats {
    requests: u64,
    events: u64,
    distinct: u64,
    duplicates: u64,
    untracked: u64,
    bytes: u64,
    sig_failures: u64,
    retried_requests: u64,
    first: Option<Instant>,
    last: Option<Instant>,
    /// The last receipt before the latest quiet spell (no request for [`QUIET`]) and the
    /// events counted up to it: a backlog's final partial batches wait for their
    /// `flush_interval`, and the rate before that wait is the sustained one.
    before_quiet: Option<(Instant, u64)>,
    latencies_ns: Vec<u64>,
    seen: Seen,
}

struct Receiver {
    secret: Option<String>,
    header: String,
    expect: u64,
    stats: Mutex<Stats>,
    done: Notify,
    touched: AtomicU64,
    connections: AtomicU64,
    delay: Duration,
}

async fn on_request(
    State(rx): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let now = Instant::now();
    let now_wall = now_ns();
    let sig_ok = match &rx.secret {
        None => true,
        Some(secret) => {
            let given = headers
                .get(&rx.header)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            courier::sign::verify(secret.as_bytes(), &body, given)
        }
    };
    let retried = headers
        .get("x-courier-attempt")
        .is_some_and(|v| v.as_bytes() != b"1");
    let scan = scan_body(&body);
    let complete = {
        let mut s = rx.stats.lock().expect("stats lock");
        s.requests += 1;
        s.events += scan.events;
        s.bytes += body.len() as u64;
        s.sig_failures += u64::from(!sig_ok);
        s.retried_requests += u64::from(retried);
        s.first.get_or_insert(now);
        if let Some(last) = s.last
            && now - last >= QUIET
        {
            s.before_quiet = Some((last, s.distinct + s.untracked));
        }
        s.last = Some(now);
        for (seq, ts) in scan.marks {
            match seq {
                Some(seq) if seq < 1 << 32 => {
                    if s.seen.insert(seq) {
                        s.distinct += 1;
                    } else {
                        s.duplicates += 1;
                    }
                }
                _ => s.untracked += 1,
            }
            if let Some(ts) = ts {
                s.latencies_ns.push(now_wall.saturating_sub(ts));
            }
        }
        s.distinct + s.untracked >= rx.expect
    };
    rx.touched.store(now_wall, Ordering::Relaxed);
    if complete {
        rx.done.notify_one();
    }
    if !rx.delay.is_zero() {
        tokio::time::sleep(rx.delay).await;
    }
    StatusCode::OK
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1e6
}

fn summary(rx: &Receiver, complete: bool) -> Value {
    let mut s = rx.stats.lock().expect("stats lock");
    let elapsed = match (s.first, s.last) {
        (Some(f), Some(l)) => (l - f).as_secs_f64(),
        _ => 0.0,
    };
    let per_s = |n: u64| {
        if elapsed > 0.0 {
            n as f64 / elapsed
        } else {
            0.0
        }
    };
    // Until the last quiet spell when there was one, else the whole run.
    let total = s.distinct + s.untracked;
    let (steady_events, steady_s) = match (s.first, s.before_quiet) {
        (Some(f), Some((before, events))) => (events, (before - f).as_secs_f64()),
        _ => (total, elapsed),
    };
    let final_wait_s = match (s.before_quiet, s.last) {
        (Some((before, _)), Some(l)) => (l - before).as_secs_f64(),
        _ => 0.0,
    };
    s.latencies_ns.sort_unstable();
    let l = &s.latencies_ns;
    let latency = if l.is_empty() {
        Value::Null
    } else {
        json!({
            "n": l.len(),
            "p50_ms": percentile(l, 50.0),
            "p90_ms": percentile(l, 90.0),
            "p99_ms": percentile(l, 99.0),
            "max_ms": *l.last().expect("not empty") as f64 / 1e6,
            "mean_ms": l.iter().map(|&x| x as f64).sum::<f64>() / l.len() as f64 / 1e6,
        })
    };
    json!({
        "cmd": "receive",
        "complete": complete,
        "expect": rx.expect,
        "events": s.events,
        "distinct": s.distinct,
        "duplicates": s.duplicates,
        "untracked": s.untracked,
        "requests": s.requests,
        "connections": rx.connections.load(Ordering::Relaxed),
        "bytes": s.bytes,
        "mean_batch": if s.requests > 0 { s.events as f64 / s.requests as f64 } else { 0.0 },
        "sig_failures": s.sig_failures,
        "retried_requests": s.retried_requests,
        "elapsed_s": elapsed,
        "events_per_s": per_s(total),
        "requests_per_s": per_s(s.requests),
        "steady_events_per_s": if steady_s > 0.0 { steady_events as f64 / steady_s } else { 0.0 },
        "events_after_quiet": total - steady_events,
        "final_wait_s": final_wait_s,
        "latency": latency,
    })
}

/// Serves until the expected events arrived (or a timeout), prints the summary, lingers.
pub async fn receive(args: ReceiveArgs) -> Result<()> {
    let rx = Arc::new(Receiver {
        secret: args.secret.clone(),
        header: args.header.to_ascii_lowercase(),
        expect: args.expect,
        stats: Mutex::new(Stats::default()),
        done: Notify::new(),
        touched: AtomicU64::new(0),
        connections: AtomicU64::new(0),
        delay: Duration::from_millis(args.delay_ms),
    });
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!(
        "courier-bench receive: listening on http://{}, expecting {} events",
        listener.local_addr()?,
        args.expect
    );
    let app = Router::new().fallback(on_request).with_state(rx.clone());
    // Counts connections: a client that does not reuse them pays a handshake per request.
    let listener = {
        use axum::serve::ListenerExt;
        let rx = rx.clone();
        listener.tap_io(move |_| {
            rx.connections.fetch_add(1, Ordering::Relaxed);
        })
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn({
        let stop = stop.clone();
        async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        }
    });

    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    let idle = Duration::from_secs(args.idle_timeout).as_nanos() as u64;
    let complete = loop {
        tokio::select! {
            _ = rx.done.notified() => break true,
            _ = tokio::time::sleep_until(deadline) => break false,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {
                let touched = rx.touched.load(Ordering::Relaxed);
                if touched > 0 && now_ns().saturating_sub(touched) > idle {
                    break false;
                }
            }
        }
    };
    let line = summary(&rx, complete).to_string();
    println!("{line}");
    if let Some(out) = &args.out {
        let tmp = out.with_extension("tmp");
        std::fs::write(&tmp, format!("{line}\n"))?;
        std::fs::rename(&tmp, out)?;
    }
    // Keep answering: courier may still be waiting for its last responses.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = tokio::time::sleep(Duration::from_secs(args.linger)) => {}
    }
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventGen;

    #[test]
    fn scanning_counts_events_and_reads_marks() {
        let mut g = EventGen::new(8, 3);
        let events: Vec<Vec<u8>> = (0..5).map(|s| g.event(s, Some(1000 + s)).1).collect();
        let mut body = b"[".to_vec();
        body.extend(events.join(&b","[..]));
        body.push(b']');
        let scan = scan_body(&body);
        assert_eq!(scan.events, 5);
        assert_eq!(scan.marks[3], (Some(3), Some(1003)));
        let one = scan_body(&events[0]);
        assert_eq!((one.events, one.marks[0]), (1, (Some(0), Some(1000))));
        let foreign = scan_body(br#"[{"a":"x]}\"{"},{"b":[1,{"c":2}]}]"#);
        assert_eq!(foreign.events, 2);
        assert_eq!(foreign.marks[0], (None, None));
    }
}
