//! The inbound event (docs/events.md): parse and validate a message body without building a
//! JSON tree and without re-encoding it.
//!
//! Strings borrow from the body when they hold no escapes and fall back to owned copies
//! when they do. The body itself is never changed: what was published is what a
//! receiver gets.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use chrono::{DateTime, FixedOffset};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};

/// The record type of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RecordType {
    Company,
    Contact,
}

impl RecordType {
    /// The label used in routing keys and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordType::Company => "company",
            RecordType::Contact => "contact",
        }
    }

    /// Parses `company` or `contact`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "company" => Some(RecordType::Company),
            "contact" => Some(RecordType::Contact),
            _ => None,
        }
    }
}

impl fmt::Display for RecordType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated event's routing facts, borrowing from the body where it can.
#[derive(Debug)]
pub struct Event<'a> {
    pub id: Cow<'a, str>,
    pub account: Cow<'a, str>,
    pub kind: RecordType,
    pub record_id: Cow<'a, str>,
    pub occurred_at: Option<DateTime<FixedOffset>>,
}

/// Why an event is invalid; becomes `x-courier-last-error` on its dead letter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidEvent(pub String);

/// `[A-Za-z0-9_.-]{1,64}`.
pub fn valid_account(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Parses and validates one event body of at most `max_bytes` bytes.
pub fn parse(body: &[u8], max_bytes: usize) -> Result<Event<'_>, InvalidEvent> {
    if body.len() > max_bytes {
        return Err(InvalidEvent(format!(
            "the event is {} bytes, over broker.max_event_bytes ({max_bytes})",
            body.len()
        )));
    }
    // Validated once here; strings inside `record` are only skipped by the parser. The
    // SIMD check is several times faster on text that is not all ASCII; the standard one
    // only runs to find where a bad body goes wrong.
    let text = simdutf8::basic::from_utf8(body).map_err(|_| {
        let at = std::str::from_utf8(body)
            .err()
            .map_or(0, |e| e.valid_up_to());
        InvalidEvent(format!("the event is not UTF-8 (byte {at})"))
    })?;
    let mut de = serde_json::Deserializer::from_str(text);
    let raw = de
        .deserialize_map(RawVisitor)
        .map_err(|e| InvalidEvent(e.to_string()))?;
    de.end().map_err(|e| InvalidEvent(e.to_string()))?;
    raw.validate()
}

#[derive(Default)]
struct Raw<'a> {
    id: Option<Cow<'a, str>>,
    account: Option<Cow<'a, str>>,
    kind: Option<Cow<'a, str>>,
    action: Option<Cow<'a, str>>,
    record_id: Option<Cow<'a, str>>,
    occurred_at: Option<Cow<'a, str>>,
    record: bool,
}

impl<'a> Raw<'a> {
    fn validate(self) -> Result<Event<'a>, InvalidEvent> {
        let missing = |field: &str| InvalidEvent(format!("missing field `{field}`"));
        let id = self.id.ok_or_else(|| missing("id"))?;
        check_len("id", &id, 128)?;
        let account = self.account.ok_or_else(|| missing("account"))?;
        if !valid_account(&account) {
            return Err(InvalidEvent(
                "`account` must match [A-Za-z0-9_.-]{1,64}".into(),
            ));
        }
        let kind = self.kind.ok_or_else(|| missing("type"))?;
        let kind = RecordType::parse(&kind)
            .ok_or_else(|| InvalidEvent("`type` must be \"company\" or \"contact\"".into()))?;
        let action = self.action.ok_or_else(|| missing("action"))?;
        if !matches!(action.as_ref(), "created" | "updated") {
            return Err(InvalidEvent(
                "`action` must be \"created\" or \"updated\"".into(),
            ));
        }
        let record_id = self.record_id.ok_or_else(|| missing("record_id"))?;
        check_len("record_id", &record_id, 128)?;
        if !self.record {
            return Err(missing("record"));
        }
        let occurred_at =
            match self.occurred_at {
                None => None,
                Some(raw) => Some(DateTime::parse_from_rfc3339(&raw).map_err(|_| {
                    InvalidEvent("`occurred_at` is not an RFC 3339 timestamp".into())
                })?),
            };
        Ok(Event {
            id,
            account,
            kind,
            record_id,
            occurred_at,
        })
    }
}

fn check_len(field: &str, value: &str, max: usize) -> Result<(), InvalidEvent> {
    let chars = value.chars().count();
    if chars == 0 || chars > max {
        return Err(InvalidEvent(format!(
            "`{field}` must be 1 to {max} characters, not {chars}"
        )));
    }
    Ok(())
}

/// A string that borrows from the input when it can.
struct CowStr<'a>(Cow<'a, str>);

impl<'de> de::Deserialize<'de> for CowStr<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CowStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// Accepts any JSON object and skips its contents.
struct AnyObject;

impl<'de> de::Deserialize<'de> for AnyObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = AnyObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(AnyObject)
            }
        }
        deserializer.deserialize_map(V)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut raw = Raw::default();
        let mut seen = SeenKeys::default();
        while let Some(CowStr(key)) = map.next_key::<CowStr<'de>>()? {
            let (name, slot) = match key.as_ref() {
                "id" => ("id", Some(&mut raw.id)),
                "account" => ("account", Some(&mut raw.account)),
                "type" => ("type", Some(&mut raw.kind)),
                "action" => ("action", Some(&mut raw.action)),
                "record_id" => ("record_id", Some(&mut raw.record_id)),
                "occurred_at" => ("occurred_at", Some(&mut raw.occurred_at)),
                "record" => ("record", None),
                _ => ("", None),
            };
            seen.insert(key)
                .map_err(|Key(key)| de::Error::custom(format_args!("duplicate field `{key}`")))?;
            match slot {
                Some(slot) => {
                    let value = map
                        .next_value::<CowStr<'de>>()
                        .map_err(|e| de::Error::custom(format_args!("field `{name}`: {e}")))?;
                    *slot = Some(value.0);
                }
                None if name == "record" => {
                    map.next_value::<AnyObject>()
                        .map_err(|e| de::Error::custom(format_args!("field `record`: {e}")))?;
                    raw.record = true;
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(raw)
    }
}

/// The top-level keys read so far, decoded (so `"\u0069d"` repeats `"id"`). Ordinary
/// events have a dozen keys, which a linear scan checks fastest; past [`SeenKeys::SCAN`]
/// keys they move into a hash set, so an event of any number of keys is checked in
/// linear time (docs/performance.md, "Parsing hostile input").
#[derive(Default)]
struct SeenKeys<'de> {
    few: Vec<Key<'de>>,
    many: HashSet<Key<'de>>,
}

impl<'de> SeenKeys<'de> {
    /// The most keys kept in the linear list.
    const SCAN: usize = 16;

    /// Adds `key`, or gives back the equal key seen before.
    fn insert(&mut self, key: Cow<'de, str>) -> Result<(), Key<'de>> {
        let key = Key(key);
        if self.many.is_empty() {
            if let Some(at) = self.few.iter().position(|seen| *seen == key) {
                return Err(self.few.swap_remove(at));
            }
            if self.few.len() < Self::SCAN {
                self.few.push(key);
                return Ok(());
            }
            self.many.reserve(4 * Self::SCAN);
            self.many.extend(self.few.drain(..));
        }
        // One lookup: `replace` hands back the key it displaced, if any.
        match self.many.replace(key) {
            None => Ok(()),
            Some(seen) => Err(seen),
        }
    }
}

/// A decoded top-level key. Its comparisons are counted in tests, which is how the tests
/// show the duplicate check is linear without timing it.
#[derive(Hash)]
struct Key<'de>(Cow<'de, str>);

impl PartialEq for Key<'_> {
    fn eq(&self, other: &Self) -> bool {
        *self == *other.0
    }
}

impl Eq for Key<'_> {}

impl PartialEq<str> for Key<'_> {
    fn eq(&self, other: &str) -> bool {
        #[cfg(test)]
        tests::KEY_COMPARISONS.with(|n| n.set(n.get() + 1));
        self.0 == other
    }
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    thread_local! {
        /// Comparisons of two top-level keys made on this thread.
        pub(super) static KEY_COMPARISONS: Cell<u64> = const { Cell::new(0) };
    }

    const GOOD: &str = r#"{"id":"e1","account":"acme","type":"company","action":"created","record_id":"r1","occurred_at":"2026-01-02T03:04:05+02:00","record":{"name":"Acme"},"extra":[1,2]}"#;

    /// `GOOD` with `extra` top-level keys `"k0":0,"k1":0,...` before its closing brace,
    /// then `last` (e.g. `,"k7":1`).
    fn with_keys(extra: usize, last: &str) -> String {
        let mut body = GOOD.trim_end_matches('}').to_owned();
        for i in 0..extra {
            body.push_str(&format!(",\"k{i}\":0"));
        }
        body.push_str(last);
        body.push('}');
        body
    }

    /// Parses `body` and returns the key comparisons it took.
    fn comparisons(body: &str) -> (Result<(), InvalidEvent>, u64) {
        KEY_COMPARISONS.with(|n| n.set(0));
        let result = parse(body.as_bytes(), 1 << 20).map(|_| ());
        (result, KEY_COMPARISONS.with(Cell::get))
    }

    #[test]
    fn the_duplicate_check_is_linear_in_the_number_of_keys() {
        // A scan of every earlier key makes n(n-1)/2 comparisons: 12.5 million here.
        let keys = 5_000;
        let (result, n) = comparisons(&with_keys(keys, ""));
        assert!(result.is_ok(), "{result:?}");
        assert!(
            n <= 2 * keys as u64,
            "{n} key comparisons for {keys} keys: the check is not linear"
        );
        // An ordinary event stays on the short linear scan.
        let (result, n) = comparisons(GOOD);
        assert!(result.is_ok());
        assert!(n <= 8 * 9 / 2, "{n} comparisons for 8 keys");
    }

    #[test]
    fn duplicates_among_many_keys_are_caught_however_spelled() {
        // `\u0035` is `5`: the same key as `k50`, and well past the linear scan.
        let (result, _) = comparisons(&with_keys(100, r#","k\u00350":1"#));
        assert!(result.unwrap_err().0.starts_with("duplicate field `k50` "));
        let (result, _) = comparisons(&with_keys(100, r#","\u0069d":"e2""#));
        assert!(result.unwrap_err().0.starts_with("duplicate field `id` "));
        let (result, _) = comparisons(&with_keys(100, r#","record":{}"#));
        assert!(
            result
                .unwrap_err()
                .0
                .starts_with("duplicate field `record` ")
        );
    }

    fn reason(body: &str) -> String {
        parse(body.as_bytes(), 1 << 20)
            .expect_err("should be invalid")
            .0
    }

    #[test]
    fn a_good_event_borrows_its_strings() {
        let e = parse(GOOD.as_bytes(), 1 << 20).unwrap();
        assert!(matches!(e.id, Cow::Borrowed("e1")));
        assert_eq!(e.account, "acme");
        assert_eq!(e.kind, RecordType::Company);
        assert_eq!(e.record_id, "r1");
        assert!(e.occurred_at.is_some());
    }

    #[test]
    fn escaped_strings_fall_back_to_owned() {
        let body = r#"{"id":"e\u00e9\n\"","account":"acme","type":"cont\u0061ct","action":"updated","record_id":"r","record":{}}"#;
        let e = parse(body.as_bytes(), 1 << 20).unwrap();
        assert_eq!(e.id, "eé\n\"");
        assert_eq!(e.kind, RecordType::Contact);
    }

    #[test]
    fn lengths_count_characters() {
        let id: String = "é".repeat(128);
        let body = GOOD.replace("\"e1\"", &format!("\"{id}\""));
        assert!(
            parse(body.as_bytes(), 1 << 20).is_ok(),
            "128 two-byte characters are allowed"
        );
        let body = GOOD.replace("\"e1\"", &format!("\"{id}x\""));
        assert!(reason(&body).contains("`id`"));
    }

    #[test]
    fn each_rule_is_enforced() {
        let cases = [
            ("not json", "expected"),
            ("[1,2]", "object"),
            ("{}", "missing field `id`"),
            (&GOOD.replace("\"acme\"", "\"ac me\""), "`account`"),
            (&GOOD.replace("\"company\"", "\"person\""), "`type`"),
            (&GOOD.replace("\"created\"", "\"deleted\""), "`action`"),
            (&GOOD.replace("\"r1\"", "\"\""), "`record_id`"),
            (
                &GOOD.replace("2026-01-02T03:04:05+02:00", "yesterday"),
                "occurred_at",
            ),
            (&GOOD.replace("{\"name\":\"Acme\"}", "[1]"), "record"),
            (
                &GOOD.replace(",\"record\":{\"name\":\"Acme\"}", ""),
                "missing field `record`",
            ),
            (&GOOD.replace("\"id\":\"e1\"", "\"id\":7"), "field `id`"),
            (&GOOD.replace("\"extra\"", "\"id\""), "duplicate field `id`"),
            (
                &GOOD.replace("\"extra\"", "\"record\""),
                "duplicate field `record`",
            ),
            (&format!("{GOOD} {{}}"), "trailing"),
        ];
        for (body, expected) in cases {
            let got = reason(body);
            assert!(got.contains(expected), "{body}: {got:?} lacks {expected:?}");
        }
    }

    #[test]
    fn deep_nesting_is_skipped_without_recursion() {
        // Half a million levels fill 1 MiB; a recursive skip would overflow the stack.
        let depth = 500_000;
        let (open, close) = ("[".repeat(depth), "]".repeat(depth));
        let deep = GOOD.replace("[1,2]", &format!("{open}{close}"));
        assert!(parse(deep.as_bytes(), 1 << 20).is_ok());
        let unclosed = GOOD.replace("[1,2]", &open);
        assert!(reason(&unclosed).contains("expected value"));
        let in_a_field = GOOD.replace("\"e1\"", &format!("{open}{close}"));
        assert!(reason(&in_a_field).starts_with("field `id`: invalid type"));
    }

    #[test]
    fn escaped_duplicate_keys_are_caught() {
        let body = GOOD.replace("\"extra\"", "\"\\u0069d\"");
        assert!(reason(&body).contains("duplicate field `id`"));
    }

    #[test]
    fn invalid_utf8_anywhere_is_refused() {
        let mut body = GOOD.replace("Acme", "Ac?e").into_bytes();
        let at = body.iter().position(|b| *b == b'?').unwrap();
        body[at] = 0xff;
        assert!(parse(&body, 1 << 20).unwrap_err().0.contains("UTF-8"));
    }

    #[test]
    fn size_limit_applies() {
        assert!(parse(GOOD.as_bytes(), GOOD.len()).is_ok());
        assert!(reason_with_limit(GOOD, GOOD.len() - 1).contains("max_event_bytes"));
    }

    fn reason_with_limit(body: &str, limit: usize) -> String {
        parse(body.as_bytes(), limit).unwrap_err().0
    }

    #[test]
    fn account_pattern() {
        assert!(valid_account("a.b_c-9"));
        assert!(!valid_account(""));
        assert!(!valid_account(&"a".repeat(65)));
        assert!(!valid_account("é"));
    }
}
