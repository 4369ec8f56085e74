//! Micro-benchmarks of the per-event and per-batch work on courier's hot path (issue 4):
//! parsing and validating one event, and encoding and signing a 200-event body. The
//! end-to-end figures come from scripts/bench.sh; these isolate our own code from the
//! broker and the network. Run with `cargo bench` (or `make bench`).

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

use courier::event;
use courier::http::encode_body;
use courier::sign;

/// A realistic event of about `size` bytes (CONTRACT §1): routing fields first, then a
/// record with an escaped quote, non-ASCII text and a padded free-text field.
fn make_event(seq: usize, size: usize) -> Vec<u8> {
    let company = seq % 5 < 3;
    let kind = if company { "company" } else { "contact" };
    let mut s = format!(
        "{{\"id\":\"evt-{seq:08}\",\"account\":\"acct-{:04}\",\"type\":\"{kind}\",\"action\":\"updated\",\
         \"record_id\":\"rec-{seq:06}\",\"occurred_at\":\"2026-11-28T09:02:50.937Z\",\"record\":{{\
         \"id\":\"rec-{seq:06}\",\"name\":\"Fabrikam \\\"Labs\\\" Müller & Søn\",\"domain\":\"fabrikam.example\",\
         \"employees\":350,\"industry\":\"Financial Services\",\"country\":\"JP\",\"founded\":2008,\
         \"tags\":[\"growth\",\"intent\"],\"description\":\"",
        seq % 20
    );
    let words = [
        "platform ",
        "customer ",
        "pipeline ",
        "café ",
        "naïve ",
        "\\n",
        "expansion ",
    ];
    let mut i = seq;
    while s.len() + 3 < size {
        let w = words[i % words.len()];
        i += 1;
        if s.len() + w.len() + 3 > size {
            s.push('.');
        } else {
            s.push_str(w);
        }
    }
    s.push_str("\"}}");
    s.into_bytes()
}

fn parse(c: &mut Criterion) {
    let body = make_event(42, 870);
    assert!(
        event::parse(&body, 1 << 20).is_ok(),
        "the sample event is valid"
    );
    let mut group = c.benchmark_group("event");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("parse_validate_870B", |b| {
        b.iter(|| event::parse(black_box(&body), 1 << 20).map(|e| e.kind))
    });
    group.finish();
}

/// The request body of a 200-event batch, as the worker builds it: the events' shared
/// buffers, joined into one array.
fn body_of(events: &[Bytes]) -> Bytes {
    encode_body(200, events)
}

fn encode_sign(c: &mut Criterion) {
    let events: Vec<Bytes> = (0..200)
        .map(|i| Bytes::from(make_event(i, 740 + (i * 37) % 261)))
        .collect();
    let ids: Vec<String> = (0..200).map(|i| format!("evt-{i:08}")).collect();
    let secret = b"a-webhook-secret-of-typical-length";
    let bytes: usize = events.iter().map(Bytes::len).sum::<usize>() + events.len() + 1;

    let mut group = c.benchmark_group("batch200");
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("encode", |b| b.iter(|| body_of(black_box(&events))));
    group.bench_function("encode_sign", |b| {
        b.iter(|| sign::signature(secret, &body_of(black_box(&events))))
    });
    // What one flushed batch costs end to end on our side: parse 200 events as they
    // arrive, then encode, sign and derive the delivery id.
    group.bench_function("parse_encode_sign_id", |b| {
        b.iter(|| {
            let mut kinds = 0usize;
            for e in black_box(&events) {
                kinds += event::parse(e, 1 << 20)
                    .map(|e| e.kind as usize)
                    .unwrap_or(0);
            }
            let sig = sign::signature(secret, &body_of(&events));
            let id = sign::delivery_id(ids.iter().map(String::as_str));
            (kinds, sig, id)
        })
    });
    group.finish();

    let mut group = c.benchmark_group("batch200_ids");
    group.throughput(Throughput::Elements(ids.len() as u64));
    group.bench_function("delivery_id", |b| {
        b.iter(|| sign::delivery_id(black_box(&ids).iter().map(String::as_str)))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    // Short runs: `make bench` stays within minutes; the spread is printed by criterion.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50);
    targets = parse, encode_sign
}
criterion_main!(benches);
