//! The `x-courier-*` headers: their names and one typed view of them, [`Trail`]. Every
//! read and write of these headers happens here, and so does the one place that builds
//! the properties of a republished copy ([`republish_properties`]).
//!
//! courier trusts a trail only on messages that it put back itself (they come through the
//! default exchange: from a retry tier or from `dlq replay`). What a publisher writes into
//! these headers on the events exchange is ignored and never carried into a copy
//! (docs/operations.md, "Retries and dead letters").

use std::collections::BTreeMap;
use std::time::SystemTime;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// Scheduled retries so far.
pub const RETRIES: &str = "x-courier-retries";
/// When the event first failed (RFC 3339).
pub const FIRST_FAILURE: &str = "x-courier-first-failure";
/// When courier first consumed the event (RFC 3339): the start of the lag metric.
pub const FIRST_SEEN: &str = "x-courier-first-seen";
/// Why the last attempt failed, at most [`LAST_ERROR_MAX`] bytes.
pub const LAST_ERROR: &str = "x-courier-last-error";
/// Why the event is a dead letter.
pub const REASON: &str = "x-courier-reason";
/// The HTTP status of the last attempt, as an integer.
pub const LAST_STATUS: &str = "x-courier-last-status";
/// When the event was dead-lettered (RFC 3339).
pub const DEAD_AT: &str = "x-courier-dead-at";
/// Scheme, host and port of the destination that failed.
pub const DESTINATION: &str = "x-courier-destination";
/// `true` on an event parked behind an earlier event of its record in a retry tier
/// (docs/ordering.md); for logs and `dlq show`.
pub const PARKED: &str = "x-courier-parked";

/// Every header name courier writes starts with this.
pub const PREFIX: &str = "x-courier-";

/// The longest `x-courier-last-error`, in bytes.
pub const LAST_ERROR_MAX: usize = 1024;

/// What courier recorded on a message: each field is absent when the header is (or when
/// the message was not trusted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trail {
    pub retries: Option<i64>,
    pub first_failure: Option<SystemTime>,
    pub first_seen: Option<SystemTime>,
    pub last_error: Option<String>,
    pub reason: Option<String>,
    pub last_status: Option<u16>,
    pub dead_at: Option<SystemTime>,
    pub destination: Option<String>,
    /// Parked behind an earlier event of its record ([`PARKED`]).
    pub parked: bool,
}

impl Trail {
    /// Reads the trail of a message's headers.
    pub fn read(headers: Option<&FieldTable>) -> Self {
        let Some(headers) = headers.map(FieldTable::inner) else {
            return Self::default();
        };
        let text = |name: &str| headers.get(name).and_then(text);
        let time = |name: &str| text(name).and_then(|t| parse_time(&t));
        Self {
            retries: headers.get(RETRIES).and_then(integer),
            first_failure: time(FIRST_FAILURE),
            first_seen: time(FIRST_SEEN),
            last_error: text(LAST_ERROR),
            reason: text(REASON),
            last_status: headers
                .get(LAST_STATUS)
                .and_then(integer)
                .and_then(|n| u16::try_from(n).ok()),
            dead_at: time(DEAD_AT),
            destination: text(DESTINATION),
            parked: matches!(headers.get(PARKED), Some(AMQPValue::Boolean(true))),
        }
    }

    /// Reads the trail of a consumed message, if courier put it back itself (it came
    /// through the default exchange); otherwise an empty trail.
    pub fn of_delivery(exchange: &str, properties: &BasicProperties) -> Self {
        if exchange.is_empty() {
            Self::read(properties.headers().as_ref())
        } else {
            Self::default()
        }
    }

    /// `original`'s headers without the broker's history and without any `x-courier-*`
    /// header, with this trail written in their place.
    pub fn write(&self, original: Option<&FieldTable>) -> FieldTable {
        let mut headers = foreign_headers(original);
        let mut put = |name: &str, value: AMQPValue| {
            headers.insert(name.into(), value);
        };
        if let Some(n) = self.retries {
            put(RETRIES, AMQPValue::LongLongInt(n));
        }
        if let Some(t) = self.first_failure {
            put(FIRST_FAILURE, long_string(&rfc3339(t)));
        }
        if let Some(t) = self.first_seen {
            put(FIRST_SEEN, long_string(&rfc3339(t)));
        }
        if let Some(e) = &self.last_error {
            put(LAST_ERROR, long_string(truncate(e, LAST_ERROR_MAX)));
        }
        if let Some(r) = &self.reason {
            put(REASON, long_string(r));
        }
        if let Some(s) = self.last_status {
            put(LAST_STATUS, AMQPValue::LongLongInt(s.into()));
        }
        if let Some(t) = self.dead_at {
            put(DEAD_AT, long_string(&rfc3339(t)));
        }
        if let Some(d) = &self.destination {
            put(DESTINATION, long_string(d));
        }
        if self.parked {
            put(PARKED, AMQPValue::Boolean(true));
        }
        FieldTable::from(headers)
    }
}

/// A waiting event's AMQP properties, boxed, and kept only when a copy would carry
/// something of them (a message id, a timestamp or headers, [`republish_properties`]):
/// the whole property set is ten optional strings and a header table, and most events
/// have none of these (docs/design.md, "Memory").
#[derive(Debug, Default)]
pub struct Carried(Option<Box<BasicProperties>>);

impl Carried {
    /// Keeps `properties` if a copy would carry something of them.
    pub fn new(properties: BasicProperties) -> Self {
        let carries = properties.message_id().is_some()
            || properties.timestamp().is_some()
            || properties.headers().is_some();
        Self(carries.then(|| Box::new(properties)))
    }

    /// The message's properties (the defaults where none were kept).
    pub fn properties(&self) -> &BasicProperties {
        static NONE: std::sync::LazyLock<BasicProperties> =
            std::sync::LazyLock::new(BasicProperties::default);
        self.0.as_deref().unwrap_or(&NONE)
    }
}

/// The properties of a copy courier publishes (to a retry tier, the dead-letter queue, or
/// back to delivery): persistent JSON with these headers, the original's message id and
/// timestamp, and no `expiration` (a stale one could expire the copy).
pub fn republish_properties(original: &BasicProperties, headers: FieldTable) -> BasicProperties {
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_headers(headers);
    if let Some(id) = original.message_id() {
        properties = properties.with_message_id(id.clone());
    }
    if let Some(ts) = original.timestamp() {
        properties = properties.with_timestamp(*ts);
    }
    properties
}

/// A message's headers without the broker's history (`x-death`, `x-first-death-*`,
/// `x-last-death-*`, `x-delivery-count`, so that stale history cannot trip the broker's
/// dead-letter cycle detection) and without courier's own headers.
fn foreign_headers(headers: Option<&FieldTable>) -> BTreeMap<ShortString, AMQPValue> {
    let mut map = headers.map(|h| h.inner().clone()).unwrap_or_default();
    map.retain(|k, _| {
        let k = k.as_str();
        k != "x-death"
            && k != "x-delivery-count"
            && !k.starts_with("x-first-death-")
            && !k.starts_with("x-last-death-")
            && !k.starts_with(PREFIX)
    });
    map
}

/// The reason in the first entry of the broker's `x-death` header (e.g. `delivery_limit`).
pub fn broker_death_reason(headers: Option<&FieldTable>) -> Option<String> {
    let AMQPValue::FieldArray(deaths) = headers?.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    first.inner().get("reason").and_then(text)
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

fn integer(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some((*n).into()),
        AMQPValue::ShortInt(n) => Some((*n).into()),
        AMQPValue::LongUInt(n) => Some((*n).into()),
        AMQPValue::ShortUInt(n) => Some((*n).into()),
        _ => None,
    }
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn parse_time(text: &str) -> Option<SystemTime> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(SystemTime::from)
}

/// Truncates to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use lapin::types::FieldArray;

    use super::*;

    fn at(secs: u64) -> SystemTime {
        // Whole milliseconds survive the RFC 3339 round trip.
        SystemTime::UNIX_EPOCH + Duration::from_millis(secs * 1000 + 250)
    }

    #[test]
    fn a_trail_survives_writing_and_reading() {
        let trail = Trail {
            retries: Some(3),
            first_failure: Some(at(1_700_000_000)),
            first_seen: Some(at(1_699_999_000)),
            last_error: Some("HTTP 503".into()),
            reason: Some("retries_exhausted".into()),
            last_status: Some(503),
            dead_at: Some(at(1_700_000_100)),
            destination: Some("https://hooks.example:443".into()),
            parked: true,
        };
        assert_eq!(Trail::read(Some(&trail.write(None))), trail);
    }

    #[test]
    fn writing_drops_history_and_stale_courier_headers_and_keeps_the_rest() {
        let mut original = FieldTable::default();
        for k in [
            "x-death",
            "x-first-death-queue",
            "x-last-death-reason",
            "x-delivery-count",
            "x-courier-reason",
            "x-courier-anything",
            "trace",
        ] {
            original.insert(k.into(), AMQPValue::Boolean(true));
        }
        let written = Trail {
            retries: Some(1),
            ..Default::default()
        }
        .write(Some(&original));
        let kept: Vec<&str> = written.inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(kept, vec!["trace", RETRIES]);
    }

    #[test]
    fn only_messages_from_the_default_exchange_are_trusted() {
        let mut h = FieldTable::default();
        h.insert(RETRIES.into(), AMQPValue::LongLongInt(5));
        let props = BasicProperties::default().with_headers(h);
        assert_eq!(Trail::of_delivery("", &props).retries, Some(5));
        assert_eq!(
            Trail::of_delivery("record-changes", &props),
            Trail::default()
        );
    }

    #[test]
    fn integers_of_any_width_and_long_errors_are_read_and_cut() {
        let mut h = FieldTable::default();
        h.insert(RETRIES.into(), AMQPValue::ShortInt(2));
        h.insert(LAST_STATUS.into(), AMQPValue::LongInt(429));
        let trail = Trail::read(Some(&h));
        assert_eq!((trail.retries, trail.last_status), (Some(2), Some(429)));
        let long = Trail {
            last_error: Some("é".repeat(600)),
            ..Default::default()
        }
        .write(None);
        let error = Trail::read(Some(&long)).last_error.unwrap();
        assert_eq!(error.len(), LAST_ERROR_MAX);
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }

    #[test]
    fn the_broker_reason_is_the_first_death() {
        let mut death = FieldTable::default();
        death.insert("reason".into(), long_string("delivery_limit"));
        let mut h = FieldTable::default();
        h.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        assert_eq!(
            broker_death_reason(Some(&h)).as_deref(),
            Some("delivery_limit")
        );
        assert_eq!(broker_death_reason(None), None);
    }
}
