//! The file as written: serde shapes of each section with every default named once
//! here, unknown keys refused (docs/configuration.md lists every key and its default).
//!
//! Integers stay `i64` and durations strings, so validation can name the key of a value
//! out of range or malformed; `validate.rs` turns them into typed settings.

use std::collections::HashMap;
use std::fmt;

use serde::de::{self, DeserializeOwned, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::error::ConfigError;
use super::validate::Validator;
use super::{DEFAULT_SIGNATURE_HEADER, LogFormat, env, shape};

/// The whole file, each section deserialized on its own so an error names its section.
pub(super) struct RawConfig {
    pub shutdown_timeout: String,
    pub broker: RawBroker,
    pub delivery: RawDelivery,
    pub retry: RawRetry,
    pub circuit: RawCircuit,
    pub admin: RawAdmin,
    pub log: RawLog,
    /// `[[account]]` tables, deserialized one by one as `RawAccount` so an error can
    /// name the account.
    pub accounts: Vec<toml::Value>,
}

/// Parses the text, expands `${VAR}` and deserializes the sections.
pub(super) fn read(
    v: &Validator,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<RawConfig, ConfigError> {
    let mut root = syntax(v, text)?;
    env::expand(v, &mut root, env)?;
    let top: RawTop = shape(v, "", None, toml::Value::Table(root))?;
    Ok(RawConfig {
        shutdown_timeout: top.shutdown_timeout,
        broker: section(v, "broker", top.broker)?,
        delivery: section(v, "delivery", top.delivery)?,
        retry: section(v, "retry", top.retry)?,
        circuit: section(v, "circuit", top.circuit)?,
        admin: section(v, "admin", top.admin)?,
        log: section(v, "log", top.log)?,
        accounts: top.account.unwrap_or_default(),
    })
}

/// The TOML tree of `text`. The grammar is checked first, on its own: its messages
/// describe the syntax only. What can fail after it is a number out of range, and toml's
/// message for that quotes the number, so it gets a message of ours.
fn syntax(v: &Validator, text: &str) -> Result<toml::Table, ConfigError> {
    let refused = |message: &str, e: &toml::de::Error| {
        v.err("(syntax)", None, format!("{message}{}", location(text, e)))
    };
    toml::de::DeTable::parse(text).map_err(|e| match duplicate(text, &e) {
        Some(message) => v.err("(syntax)", None, format!("{message}{}", location(text, &e))),
        None => refused(e.message(), &e),
    })?;
    toml::from_str(text).map_err(|e| refused("a number is out of range", &e))
}

/// Deserializes `value`, found at `key` (of `account`); an error names the key below it
/// and the type expected there (shape.rs).
pub(super) fn shape<T: DeserializeOwned>(
    v: &Validator,
    key: &str,
    account: Option<&str>,
    value: toml::Value,
) -> Result<T, ConfigError> {
    shape::from_value(value).map_err(|e| {
        let key = e.key(key);
        let key = if key.is_empty() { "(top level)" } else { &key };
        v.err(key, account, e.message)
    })
}

/// One section; a missing one is all defaults.
fn section<T: DeserializeOwned>(
    v: &Validator,
    name: &str,
    value: Option<toml::Value>,
) -> Result<T, ConfigError> {
    let value = value.unwrap_or_else(|| toml::Value::Table(toml::Table::new()));
    shape(v, name, None, value)
}

/// What to say of a key or table written twice: its name (a key name, never a value),
/// and for a table that its keys belong under one header.
fn duplicate(text: &str, e: &toml::de::Error) -> Option<String> {
    if !e.message().starts_with("duplicate key") {
        return None;
    }
    let span = e.span()?;
    let name = text.get(span.clone())?.trim().trim_matches('"');
    let plain = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !plain {
        return None;
    }
    let line_start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
    if text[line_start..].trim_start().starts_with('[') {
        Some(format!(
            "the table [{name}] appears twice; put all its keys under one [{name}] header"
        ))
    } else {
        Some(format!("the key {name} is given twice in the same table"))
    }
}

/// A toml error's line, for syntax errors.
fn location(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTop {
    #[serde(default = "default_shutdown_timeout")]
    shutdown_timeout: String,
    broker: Option<toml::Value>,
    delivery: Option<toml::Value>,
    retry: Option<toml::Value>,
    circuit: Option<toml::Value>,
    admin: Option<toml::Value>,
    log: Option<toml::Value>,
    account: Option<Vec<toml::Value>>,
}

fn default_shutdown_timeout() -> String {
    "30s".into()
}

/// One string or several: `broker.url` (one node or the nodes of a cluster),
/// `account.standard_webhooks_secret` (one key, or several during a rotation).
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// By hand rather than `#[serde(untagged)]`, whose error names neither form.
impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Urls;
        impl<'de> Visitor<'de> for Urls {
            type Value = OneOrMany;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array of strings")
            }

            fn visit_str<E: de::Error>(self, url: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany::One(url.to_owned()))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut urls = Vec::new();
                while let Some(url) = seq.next_element()? {
                    urls.push(url);
                }
                Ok(OneOrMany::Many(urls))
            }
        }
        deserializer.deserialize_any(Urls)
    }
}

/// `[broker]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBroker {
    /// Required, unless `COURIER_AMQP_URL` is set.
    pub url: Option<OneOrMany>,
    #[serde(default = "default_exchange")]
    pub exchange: String,
    #[serde(default = "default_queue_prefix")]
    pub queue_prefix: String,
    /// Unset: derived from the accounts (`config::default_prefetch`).
    #[serde(default)]
    pub prefetch: Option<i64>,
    #[serde(default = "default_shards")]
    pub shards: i64,
    #[serde(default = "default_max_event_bytes")]
    pub max_event_bytes: i64,
    #[serde(default = "default_delivery_limit")]
    pub delivery_limit: i64,
    /// Extra trusted CA certificates for `amqps` nodes (PEM file).
    pub ca_file: Option<String>,
    /// Client certificate chain for `amqps` nodes (PEM file).
    pub client_cert: Option<String>,
    /// Its private key (PEM file).
    pub client_key: Option<String>,
}

fn default_exchange() -> String {
    "record-changes".into()
}

fn default_queue_prefix() -> String {
    "courier".into()
}

fn default_shards() -> i64 {
    4
}

fn default_max_event_bytes() -> i64 {
    1 << 20
}

fn default_delivery_limit() -> i64 {
    10
}

/// `[delivery]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDelivery {
    #[serde(default = "default_delivery_timeout")]
    pub timeout: String,
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: i64,
    #[serde(default = "default_max_inflight_per_destination")]
    pub max_inflight_per_destination: i64,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: i64,
    #[serde(default = "default_ordering")]
    pub ordering: String,
    #[serde(default = "default_allow_private_networks")]
    pub allow_private_networks: bool,
    /// Extra trusted CA certificates for receivers (PEM file).
    pub ca_file: Option<String>,
}

fn default_delivery_timeout() -> String {
    "10s".into()
}

fn default_max_concurrency() -> i64 {
    256
}

fn default_max_inflight_per_destination() -> i64 {
    16
}

fn default_max_body_bytes() -> i64 {
    5 << 20
}

fn default_ordering() -> String {
    "none".into()
}

fn default_allow_private_networks() -> bool {
    false
}

/// `[retry]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetry {
    #[serde(default = "default_immediate_attempts")]
    pub immediate_attempts: i64,
    #[serde(default = "default_initial_interval")]
    pub initial_interval: String,
    #[serde(default = "default_max_interval")]
    pub max_interval: String,
    #[serde(default = "default_schedule")]
    pub schedule: Vec<String>,
    #[serde(default = "default_max_age")]
    pub max_age: String,
}

fn default_immediate_attempts() -> i64 {
    3
}

fn default_initial_interval() -> String {
    "500ms".into()
}

fn default_max_interval() -> String {
    "10s".into()
}

fn default_schedule() -> Vec<String> {
    ["30s", "5m", "30m", "2h", "6h", "12h"]
        .map(String::from)
        .to_vec()
}

fn default_max_age() -> String {
    "24h".into()
}

/// `[circuit]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCircuit {
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: i64,
    #[serde(default = "default_cooldown")]
    pub cooldown: String,
    #[serde(default = "default_max_cooldown")]
    pub max_cooldown: String,
}

fn default_failure_threshold() -> i64 {
    5
}

fn default_cooldown() -> String {
    "30s".into()
}

fn default_max_cooldown() -> String {
    "10m".into()
}

/// `[admin]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    #[serde(default = "default_listen")]
    pub listen: String,
}

fn default_listen() -> String {
    "127.0.0.1:9464".into()
}

/// `[log]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    #[serde(default = "default_level")]
    pub level: String,
    #[serde(default = "default_format")]
    pub format: LogFormat,
}

fn default_level() -> String {
    "info".into()
}

fn default_format() -> LogFormat {
    LogFormat::Text
}

/// One `[[account]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccount {
    /// Required.
    pub id: Option<String>,
    /// Required.
    pub companies_url: Option<String>,
    /// Omitted or empty: contacts are not sent.
    pub contacts_url: Option<String>,
    #[serde(default = "default_batch_size")]
    pub batch_size: i64,
    #[serde(default = "default_flush_interval")]
    pub flush_interval: String,
    /// Omitted: requests are sent unsigned.
    pub hmac_secret: Option<String>,
    #[serde(default = "default_signature_header")]
    pub signature_header: String,
    #[serde(default)]
    pub headers: HashMap<String, String>,
    /// Omitted: no Standard Webhooks signature. Several: one signature per key.
    pub standard_webhooks_secret: Option<OneOrMany>,
    /// Client certificate chain for receivers that demand mTLS (PEM file).
    pub client_cert: Option<String>,
    /// Its private key (PEM file).
    pub client_key: Option<String>,
}

fn default_batch_size() -> i64 {
    1
}

fn default_flush_interval() -> String {
    "1s".into()
}

fn default_signature_header() -> String {
    DEFAULT_SIGNATURE_HEADER.into()
}
