//! Receivers that misbehave at the TCP level: accept and never answer, drip the response
//! a byte a second, reset the connection, answer with a 100 MB body. The request timeout
//! holds, at most 64 KiB of a body is read, and the events take the retry path with a
//! `last_error` that says what happened (docs/receiving.md, "What courier expects").

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::helpers::*;

#[derive(Clone, Copy)]
enum Misbehaviour {
    Silent,
    Drip,
    Reset,
    HugeBody,
}

/// How much a 100 MB answer got out before courier closed the connection.
const HUGE: usize = 100 << 20;

/// A server that behaves as `how`; returns its URL and the bytes of response it wrote.
async fn misbehaving(how: Misbehaviour) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let written = Arc::new(AtomicUsize::new(0));
    let counter = written.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(answer(socket, how, counter.clone()));
        }
    });
    (url, written)
}

async fn answer(mut socket: TcpStream, how: Misbehaviour, written: Arc<AtomicUsize>) {
    read_request(&mut socket).await;
    match how {
        Misbehaviour::Silent => {
            // Hold the connection open, never answer.
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        Misbehaviour::Drip => {
            for byte in b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n" {
                if socket.write_all(&[*byte]).await.is_err() {
                    return;
                }
                written.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        Misbehaviour::Reset => {
            socket.set_zero_linger().unwrap();
            drop(socket);
        }
        Misbehaviour::HugeBody => {
            let head =
                format!("HTTP/1.1 500 Internal Server Error\r\ncontent-length: {HUGE}\r\n\r\n");
            if socket.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = vec![b'x'; 64 << 10];
            let mut sent = 0;
            while sent < HUGE {
                match socket.write(&chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        sent += n;
                        written.fetch_add(n, Ordering::SeqCst);
                    }
                }
            }
        }
    }
}

/// Reads one request: its head and a `content-length` body.
async fn read_request(socket: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let body_start = loop {
        let Ok(n) = socket.read(&mut chunk).await else {
            return;
        };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..body_start]).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < body_start + length {
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_receivers_time_out_or_fail_and_their_events_take_the_retry_path() {
    let cases = [
        ("silent", Misbehaviour::Silent),
        ("drip", Misbehaviour::Drip),
        ("reset", Misbehaviour::Reset),
        ("huge", Misbehaviour::HugeBody),
    ];
    let mut servers = Vec::new();
    let mut accounts = String::new();
    for (id, how) in cases {
        let (url, written) = misbehaving(how).await;
        accounts.push_str(&format!(
            "[[account]]\nid = \"{id}\"\ncompanies_url = \"{url}\"\n"
        ));
        servers.push((id, written));
    }
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let spec = ConfigSpec {
        top: "[circuit]\nfailure_threshold = 100000".into(),
        delivery: "timeout = \"1s\"".into(),
        retry: "immediate_attempts = 2".into(),
        accounts,
        ..Default::default()
    };
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    let started = Instant::now();
    let published: Vec<Vec<u8>> = cases
        .iter()
        .map(|(id, _)| event(&format!("{id}-1"), id, "company"))
        .collect();
    broker.publish(&published).await;
    // Two attempts of at most the 1 s timeout each, then the 30 s tier.
    let tier = format!("{}.retry.30s", names.prefix);
    assert_eq!(
        broker
            .wait_for_depth(&tier, 4, Duration::from_secs(15))
            .await,
        4,
        "every event reaches the retry tier"
    );
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(8), "took {elapsed:?}");
    let errors = broker.drain_last_errors(&tier).await;
    for (id, error) in &errors {
        eprintln!("{id}: {error}");
        let expected = match id.as_str() {
            "silent-1" | "drip-1" => "timed out",
            "reset-1" => "reset",
            "huge-1" => "HTTP 500",
            other => panic!("unexpected event {other}"),
        };
        assert!(error.contains(expected), "{id}: {error}");
    }
    assert_eq!(
        worker.metric("courier_requests_total", &[("outcome", "retryable")]),
        8.0,
        "two attempts each"
    );
    // The dripping receiver got at most a couple of bytes out per attempt.
    let dripped = servers[1].1.load(Ordering::SeqCst);
    assert!(dripped <= 6, "{dripped} bytes dripped");
    // Of the 100 MB bodies, courier read at most 64 KiB of each and closed the
    // connection: what the server got out is what the socket buffers hold, far from
    // the 200 MB of two full answers.
    let huge = servers[3].1.load(Ordering::SeqCst);
    eprintln!(
        "figures misbehaving receivers: 4 events to the tier in {elapsed:?}, 100 MB bodies: {huge} bytes written in all"
    );
    assert!(
        huge < 2 * HUGE / 10,
        "{huge} bytes of the 100 MB bodies were taken"
    );
    worker.shutdown().await;
}
