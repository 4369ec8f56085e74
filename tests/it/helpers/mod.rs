//! Test helpers: a real local receiver, a worker on its own random queues, publishing
//! and inspecting through a real RabbitMQ (zero2prod's `spawn_app`, Svix's receiver).
//! One file per fixture.

mod broker;
mod certs;
mod cluster;
mod config;
mod node;
mod process;
mod receiver;
mod tools;
mod worker;

use std::time::Duration;

use tokio::time::Instant;

pub use broker::*;
pub use certs::*;
pub use cluster::*;
pub use config::*;
pub use node::*;
pub use process::*;
pub use receiver::*;
pub use tools::*;
pub use worker::*;

/// The broker the tests use.
pub fn amqp_url() -> String {
    std::env::var("COURIER_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A random suffix for names.
pub fn suffix() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..10)
        .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
        .collect()
}

/// Logs for `TEST_LOG=1`.
pub fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        courier::telemetry::init("debug", courier::config::LogFormat::Text);
    }
}

/// The `id` field of an event.
pub fn event_id(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).expect("JSON");
    v["id"].as_str().expect("an id").to_owned()
}

/// An event body.
pub fn event(id: &str, account: &str, kind: &str) -> Vec<u8> {
    format!(
        r#"{{"id":"{id}","account":"{account}","type":"{kind}","action":"created","record_id":"rec-{id}","occurred_at":"2026-11-28T10:00:00Z","record":{{"name":"Company {id}","employees":42}}}}"#
    )
    .into_bytes()
}

/// Waits until `f` holds.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Prints what a fault test saw, for docs/reliability.md: `cargo nextest run
/// --no-capture <test>` shows the line. `delivered` holds every accepted event id, with
/// repeats.
pub fn print_figures(
    test: &str,
    published: usize,
    delivered: &[String],
    dead: usize,
    recovered: Duration,
) {
    let distinct = delivered
        .iter()
        .collect::<std::collections::HashSet<_>>()
        .len();
    eprintln!(
        "figures {test}: events {published}, delivered {distinct}, dead-lettered {dead}, \
         duplicates {}, recovered in {:.1} s",
        delivered.len() - distinct,
        recovered.as_secs_f64()
    );
}
