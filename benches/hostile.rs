//! What `event::parse` costs on the worst bodies an upstream can publish within
//! `broker.max_event_bytes` (1 MiB by default), beside an ordinary event: many top-level
//! keys, deep nesting, long escaped strings, many small numbers. Each body is parsed as
//! the consumer parses it; the figures, per KB, are in docs/performance.md ("Parsing
//! hostile input"). Run with `cargo bench --bench hostile`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

use courier::event;

/// `broker.max_event_bytes` by default.
const MAX: usize = 1 << 20;

/// The routing fields of a valid event, without the closing brace.
const HEAD: &str = r#"{"id":"evt-00000042","account":"acct-0042","type":"company","action":"updated","record_id":"rec-000042","occurred_at":"2026-11-28T09:02:50.937Z""#;

/// A valid event: `HEAD`, then `record` holding `inner`, then the closing brace.
fn with_record(inner: &str) -> String {
    format!("{HEAD},\"record\":{inner}}}")
}

/// Repeats `unit` as often as fits in `room` bytes.
fn fill(unit: &str, room: usize) -> String {
    unit.repeat(room / unit.len())
}

/// The room left in a 1 MiB body once `HEAD`, `record` and `extra` bytes are spent.
fn room(extra: usize) -> usize {
    MAX - HEAD.len() - 64 - extra
}

/// The bodies, by name; `valid` says what `parse` must answer for each.
fn bodies() -> Vec<(&'static str, String, bool)> {
    let ordinary = with_record(
        r#"{"id":"rec-000042","name":"Fabrikam \"Labs\" Müller & Søn","domain":"fabrikam.example","employees":350,"industry":"Financial Services","country":"JP","founded":2008,"tags":["growth","intent"],"description":"A platform customer with a pipeline of expansion plans, café naïve.\n"}"#,
    );
    let plain = with_record(&format!(
        "{{\"description\":\"{}\"}}",
        fill("customer platform ", room(20))
    ));
    // About 95,000 distinct keys: `"k00000":0,`.
    let n = room(0) / 11;
    let mut keys = String::with_capacity(MAX);
    keys.push_str(HEAD);
    for i in 0..n {
        keys.push_str(&format!(",\"k{i:05}\":0"));
    }
    keys.push_str(",\"record\":{}}");
    // Half a million levels of arrays: far past any recursion limit.
    let depth = room(0) / 2;
    let arrays = with_record(&format!(
        "{{\"a\":{}{}}}",
        "[".repeat(depth),
        "]".repeat(depth)
    ));
    let depth = room(0) / 6;
    let objects = with_record(&format!(
        "{}0{}",
        "{\"a\":".repeat(depth),
        "}".repeat(depth)
    ));
    let escaped_record = with_record(&format!(
        "{{\"s\":\"{}\"}}",
        fill(r#"\u00e9\n\"\ud83d\ude00"#, room(10))
    ));
    // Routing fields are decoded in full before their length is checked.
    let escaped_id = format!(
        "{{\"id\":\"{}\"{}",
        fill(r"\u0041", room(0)),
        &HEAD[HEAD.find(",\"account\"").unwrap()..]
    ) + ",\"record\":{}}";
    let escaped_key =
        format!("{{\"{}\":0,{}", fill(r"\u0041", room(0)), &HEAD[1..]) + ",\"record\":{}}";
    let numbers = with_record(&format!("{{\"n\":[{}0]}}", fill("7,", room(10))));
    let floats = with_record(&format!("{{\"n\":[{}0]}}", fill("-1.5e-7,", room(10))));
    vec![
        ("ordinary", ordinary, true),
        ("ordinary_1MiB", plain, true),
        ("many_keys", keys, true),
        ("deep_arrays", arrays, true),
        ("deep_objects", objects, true),
        ("escaped_record", escaped_record, true),
        ("escaped_id", escaped_id, false),
        ("escaped_key", escaped_key, true),
        ("small_numbers", numbers, true),
        ("small_floats", floats, true),
    ]
}

fn hostile(c: &mut Criterion) {
    let mut group = c.benchmark_group("hostile");
    for (name, body, valid) in bodies() {
        assert!(body.len() <= MAX, "{name} is {} bytes", body.len());
        let result = event::parse(body.as_bytes(), MAX).map(|e| e.kind);
        assert_eq!(result.is_ok(), valid, "{name}: {result:?}");
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::new(name, body.len()), &body, |b, body| {
            b.iter(|| event::parse(black_box(body.as_bytes()), MAX).map(|e| e.kind))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // A 1 MiB body takes milliseconds: twenty samples over three seconds are enough.
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3));
    targets = hostile
}
criterion_main!(benches);
