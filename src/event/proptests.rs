//! Generated input for `event::parse`: arbitrary bytes, arbitrary JSON values and
//! near-valid events with one thing changed. Whatever comes in, `parse` returns: never a
//! panic, every refusal an [`InvalidEvent`] with a reason (an `invalid_event` dead
//! letter), and a valid event's routing fields come back as they were written.

use chrono::DateTime;
use proptest::prelude::*;
use serde_json::{Map, Value};

use super::*;

/// `broker.max_event_bytes` by default.
const MAX: usize = 1 << 20;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    }
}

/// Parses `body`; a refusal must carry a reason.
fn parse_checked(body: &[u8]) -> Result<Event<'_>, InvalidEvent> {
    let result = parse(body, MAX);
    if let Err(InvalidEvent(reason)) = &result {
        assert!(!reason.trim().is_empty(), "a refusal without a reason");
    }
    result
}

/// Any JSON value, a few levels deep.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|entries| Value::Object(entries.into_iter().collect())),
        ]
    })
}

/// A top-level key: one of the event's fields most of the time.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "id", "account", "type", "action", "record_id", "occurred_at", "record", "extra",
        ])
        .prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

/// A timestamp `DateTime::parse_from_rfc3339` may or may not take.
fn timestamp() -> impl Strategy<Value = String> {
    prop_oneof![
        (
            0u32..10_000,
            0u32..14,
            0u32..33,
            0u32..25,
            0u32..61,
            prop::sample::select(vec!["Z", "+02:00", "-11:30", "+24:00", ".123Z", ""]),
        )
            .prop_map(|(y, mo, d, h, mi, tz)| format!(
                "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:00{tz}"
            )),
        any::<String>(),
    ]
}

/// The fields of a valid event, as values.
fn valid_fields() -> impl Strategy<Value = Map<String, Value>> {
    (
        "\\PC{1,128}",
        "[A-Za-z0-9_.-]{1,64}",
        prop::sample::select(vec!["company", "contact"]),
        prop::sample::select(vec!["created", "updated"]),
        "\\PC{1,128}",
        prop::option::of(
            (0u32..3000, 1u32..13, 1u32..29)
                .prop_map(|(y, m, d)| format!("{:04}-{m:02}-{d:02}T09:14:03.120+05:30", 1000 + y)),
        ),
        json(),
    )
        .prop_map(|(id, account, kind, action, record_id, at, inner)| {
            let mut m = Map::new();
            m.insert("id".into(), id.into());
            m.insert("account".into(), account.into());
            m.insert("type".into(), kind.into());
            m.insert("action".into(), action.into());
            m.insert("record_id".into(), record_id.into());
            if let Some(at) = at {
                m.insert("occurred_at".into(), at.into());
            }
            m.insert("record".into(), serde_json::json!({ "inner": inner }));
            m
        })
}

/// One change to a valid event's fields.
#[derive(Debug, Clone)]
enum Change {
    None,
    Remove(String),
    Set(String, Value),
    SetTimestamp(String),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        Just(Change::None),
        key().prop_map(Change::Remove),
        (key(), json()).prop_map(|(k, v)| Change::Set(k, v)),
        // A string field at its length limits, in characters of one to four bytes.
        (
            prop::sample::select(vec!["id", "account", "record_id"]),
            prop::sample::select(vec![0usize, 1, 64, 65, 128, 129]),
            any::<char>(),
        )
            .prop_map(|(k, n, c)| Change::Set(k.into(), Value::String(c.to_string().repeat(n)))),
        timestamp().prop_map(Change::SetTimestamp),
    ]
}

/// Whether `fields` make a valid event, by the rules of docs/events.md written out again.
fn valid(fields: &Map<String, Value>) -> bool {
    let text = |name: &str, max: usize| match fields.get(name) {
        Some(Value::String(s)) => (1..=max).contains(&s.chars().count()),
        _ => false,
    };
    let one_of = |name: &str, allowed: &[&str]| matches!(fields.get(name), Some(Value::String(s)) if allowed.contains(&s.as_str()));
    text("id", 128)
        && matches!(fields.get("account"), Some(Value::String(a)) if valid_account(a))
        && one_of("type", &["company", "contact"])
        && one_of("action", &["created", "updated"])
        && text("record_id", 128)
        && match fields.get("occurred_at") {
            None => true,
            Some(Value::String(at)) => DateTime::parse_from_rfc3339(at).is_ok(),
            Some(_) => false,
        }
        && matches!(fields.get("record"), Some(Value::Object(_)))
}

/// Writes `value` as JSON; with `escape`, every character of every string as `\uXXXX`
/// (surrogate pairs beyond the BMP), as a publisher may.
fn write(value: &Value, escape: bool, out: &mut String) {
    match value {
        Value::String(s) if escape => {
            out.push('"');
            for unit in s.encode_utf16() {
                out.push_str(&format!("\\u{unit:04x}"));
            }
            out.push('"');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, (k, v)) in m.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(&Value::String(k.clone()), escape, out);
                out.push(':');
                write(v, escape, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(v, escape, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn to_json(value: &Value, escape: bool) -> String {
    let mut out = String::new();
    write(value, escape, &mut out);
    out
}

/// Checks that an accepted event holds the fields it was written with.
fn assert_round_trip(event: &Event<'_>, fields: &Map<String, Value>) {
    let field = |name: &str| fields[name].as_str().unwrap();
    assert_eq!(event.id, field("id"));
    assert_eq!(event.account, field("account"));
    assert_eq!(event.kind.as_str(), field("type"));
    assert_eq!(event.record_id, field("record_id"));
    let at = fields
        .get("occurred_at")
        .map(|at| DateTime::parse_from_rfc3339(at.as_str().unwrap()).unwrap());
    assert_eq!(event.occurred_at, at);
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_are_refused_with_a_reason(body in prop::collection::vec(any::<u8>(), 0..512)) {
        // Random bytes are never a valid event: five string fields and an object.
        prop_assert!(parse_checked(&body).is_err());
    }

    #[test]
    fn arbitrary_json_is_judged_by_the_rules(value in json(), escape in any::<bool>()) {
        let body = to_json(&value, escape);
        let expected = matches!(&value, Value::Object(m) if valid(m));
        prop_assert_eq!(parse_checked(body.as_bytes()).is_ok(), expected, "{}", body);
    }

    #[test]
    fn near_valid_events_round_trip_or_are_refused(
        mut fields in valid_fields(),
        change in change(),
        escape in any::<bool>(),
    ) {
        match change {
            Change::None => {}
            Change::Remove(k) => {
                fields.remove(&k);
            }
            Change::Set(k, v) => {
                fields.insert(k, v);
            }
            Change::SetTimestamp(at) => {
                fields.insert("occurred_at".into(), at.into());
            }
        }
        let body = to_json(&Value::Object(fields.clone()), escape);
        match parse_checked(body.as_bytes()) {
            Ok(event) => {
                prop_assert!(valid(&fields), "accepted: {}", body);
                assert_round_trip(&event, &fields);
            }
            Err(_) => prop_assert!(!valid(&fields), "refused: {}", body),
        }
    }

    #[test]
    fn a_repeated_or_cut_event_is_refused(
        fields in valid_fields(),
        repeat in 0usize..8,
        escape in any::<bool>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let body = to_json(&Value::Object(fields.clone()), escape);
        prop_assert!(parse_checked(body.as_bytes()).is_ok(), "{}", body);

        // Any key written again, however spelled, at the end.
        let keys: Vec<&String> = fields.keys().collect();
        let k = keys[repeat % keys.len()];
        let again = format!(
            "{},{}:0}}",
            &body[..body.len() - 1],
            to_json(&Value::String(k.clone()), !escape)
        );
        let reason = parse_checked(again.as_bytes()).unwrap_err().0;
        prop_assert!(reason.starts_with(&format!("duplicate field `{k}`")), "{}", reason);

        // Any proper prefix, cut on a character boundary.
        let mut at = cut.index(body.len());
        while !body.is_char_boundary(at) {
            at -= 1;
        }
        prop_assert!(parse_checked(&body.as_bytes()[..at]).is_err());
    }
}
