//! The settings tree: reading `courier.toml`, `${VAR}` expansion, environment overrides
//! and validation (CONTRACT §5).
//!
//! `load()` turns raw TOML into [`Settings`] once: durations, URLs, bounded integers,
//! header maps and secrets are checked here, so the rest of the crate never re-checks.
//! Every error names the file, the key and, inside `[[account]]`, the account.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

use crate::event::RecordType;

/// The longest `flush_interval`, `delivery.timeout` or `retry.max_interval` accepted.
pub const HOLD_CAP: Duration = Duration::from_secs(300);

/// The default signature header of the GoodFit connector.
pub const DEFAULT_SIGNATURE_HEADER: &str = "x-goodfit-hmac-sha256";
/// The largest batch the GoodFit connector allows.
pub const MAX_BATCH_SIZE: usize = 200;

/// A configuration error: which file, which key, which account, and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}{account}: {message}", file = .file.display(), account = AccountLabel(.account))]
pub struct ConfigError {
    /// The configuration file.
    pub file: PathBuf,
    /// The dotted key path, e.g. `account.batch_size` or `retry.schedule`.
    pub key: String,
    /// The account id (or `#index` when the id itself is missing) for `[[account]]` keys.
    pub account: Option<String>,
    /// What is wrong with it.
    pub message: String,
}

struct AccountLabel<'a>(&'a Option<String>);

impl fmt::Display for AccountLabel<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(account) => write!(f, " (account \"{account}\")"),
            None => Ok(()),
        }
    }
}

/// Where the configuration comes from: `--config`, else `$COURIER_CONFIG`, else
/// `./courier.toml`.
pub fn resolve_path(cli: Option<&Path>) -> PathBuf {
    cli.map(Path::to_path_buf)
        .or_else(|| std::env::var_os("COURIER_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("courier.toml"))
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The file it was read from.
    pub source: PathBuf,
    /// Grace period for in-flight work on SIGTERM/SIGINT.
    pub shutdown_timeout: Duration,
    pub broker: BrokerSettings,
    pub delivery: DeliverySettings,
    pub retry: RetrySettings,
    pub circuit: CircuitSettings,
    pub admin: AdminSettings,
    pub log: LogSettings,
    /// Accounts by id.
    pub accounts: HashMap<String, Arc<Account>>,
}

/// `[broker]`.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// Nodes to try in turn.
    pub urls: Vec<BrokerUrl>,
    pub exchange: String,
    pub queue_prefix: String,
    pub prefetch: u16,
    pub shards: u16,
    pub max_event_bytes: usize,
    pub delivery_limit: u32,
}

impl BrokerSettings {
    /// The delivery queue, e.g. `courier.deliver`.
    pub fn deliver_queue(&self) -> String {
        format!("{}.deliver", self.queue_prefix)
    }

    /// The dead-letter queue, e.g. `courier.dead`.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.queue_prefix)
    }

    /// The retry queue of one schedule delay, e.g. `courier.retry.30s`.
    pub fn retry_queue(&self, delay: Duration) -> String {
        format!("{}.retry.{}", self.queue_prefix, delay_name(delay))
    }
}

/// A broker address. The full URL (with its password) is a secret; `display` is safe to log.
#[derive(Clone)]
pub struct BrokerUrl {
    secret: SecretString,
    /// `scheme://host:port/vhost`, without user-info.
    pub display: String,
}

impl BrokerUrl {
    /// Parses and checks an `amqp://` or `amqps://` URL.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let url = Url::parse(raw).map_err(|e| format!("not a valid URL: {e}"))?;
        if !matches!(url.scheme(), "amqp" | "amqps") {
            return Err(format!(
                "scheme must be amqp or amqps, not {:?}",
                url.scheme()
            ));
        }
        let host = url.host_str().ok_or("the URL has no host")?;
        if matches!(url.host(), Some(url::Host::Ipv6(_))) {
            // The AMQP client would silently connect to localhost instead.
            return Err("IPv6 address literals are not supported here: use a host name".into());
        }
        let port = url
            .port()
            .unwrap_or(if url.scheme() == "amqps" { 5671 } else { 5672 });
        let display = format!("{}://{host}:{port}{}", url.scheme(), url.path());
        Ok(Self {
            secret: SecretString::from(raw.to_owned()),
            display,
        })
    }

    /// The full URL, for the connection only.
    pub fn expose(&self) -> &str {
        self.secret.expose_secret()
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display)
    }
}

/// `[delivery]`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliverySettings {
    pub timeout: Duration,
    pub max_concurrency: usize,
    pub max_inflight_per_destination: usize,
    pub max_body_bytes: usize,
    pub allow_private_networks: bool,
}

/// `[retry]`.
#[derive(Debug, Clone)]
pub struct RetrySettings {
    /// Attempts in all before the batch leaves the immediate stage (≥ 1).
    pub immediate_attempts: u32,
    pub initial_interval: Duration,
    pub max_interval: Duration,
    /// Strictly increasing delays of the scheduled tiers.
    pub schedule: Vec<Duration>,
    pub max_age: Duration,
}

/// `[circuit]`.
#[derive(Debug, Clone)]
pub struct CircuitSettings {
    pub failure_threshold: u32,
    pub cooldown: Duration,
    pub max_cooldown: Duration,
}

/// `[admin]`.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub listen: SocketAddr,
}

/// `[log]`.
#[derive(Debug, Clone)]
pub struct LogSettings {
    pub level: String,
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// One `[[account]]`: where its events go and how requests are signed.
pub struct Account {
    pub id: Arc<str>,
    pub companies_url: Url,
    /// `None`: contacts are not sent (acked and counted as skipped).
    pub contacts_url: Option<Url>,
    pub batch_size: usize,
    pub flush_interval: Duration,
    pub hmac_secret: Option<SecretString>,
    pub signature_header: HeaderName,
    /// The account's own headers; values are marked sensitive so they never print.
    pub headers: HeaderMap,
}

impl fmt::Debug for Account {
    // URLs shown as scheme, host and port only; secrets and header values never.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Account")
            .field("id", &self.id)
            .field("companies_url", &redact_url(&self.companies_url))
            .field("contacts_url", &self.contacts_url.as_ref().map(redact_url))
            .field("batch_size", &self.batch_size)
            .field("flush_interval", &self.flush_interval)
            .field("signed", &self.hmac_secret.is_some())
            .field("signature_header", &self.signature_header)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Account {
    /// The URL for events of `kind`, if the account receives them.
    pub fn url(&self, kind: RecordType) -> Option<&Url> {
        match kind {
            RecordType::Company => Some(&self.companies_url),
            RecordType::Contact => self.contacts_url.as_ref(),
        }
    }
}

/// The first section that differs between two configurations and needs a restart
/// (`[broker]`, `[admin]`, `[log]`); `None` when a reload may apply `new`.
pub fn restart_only_change(old: &Settings, new: &Settings) -> Option<&'static str> {
    let (a, b) = (&old.broker, &new.broker);
    let urls = |s: &BrokerSettings| {
        s.urls
            .iter()
            .map(|u| u.expose().to_owned())
            .collect::<Vec<_>>()
    };
    if urls(a) != urls(b)
        || a.exchange != b.exchange
        || a.queue_prefix != b.queue_prefix
        || a.prefetch != b.prefetch
        || a.shards != b.shards
        || a.max_event_bytes != b.max_event_bytes
        || a.delivery_limit != b.delivery_limit
    {
        return Some("[broker]");
    }
    if old.admin.listen != new.admin.listen {
        return Some("[admin]");
    }
    if old.log.level != new.log.level || old.log.format != new.log.format {
        return Some("[log]");
    }
    None
}

/// A URL shown as scheme, host and port only: paths and queries of webhook URLs often
/// carry tokens.
pub fn redact_url(url: &Url) -> String {
    let host = match url.host() {
        Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
        Some(host) => host.to_string(),
        None => String::new(),
    };
    match url.port_or_known_default() {
        Some(port) => format!("{}://{host}:{port}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    }
}

/// The name of a retry tier: the delay in the largest unit that divides it exactly.
pub fn delay_name(delay: Duration) -> String {
    let ms = delay.as_millis();
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

// ---------------------------------------------------------------------------------------
// Raw TOML shapes. Each section is deserialized on its own so an error names its section
// (and, for accounts, the account).

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTop {
    shutdown_timeout: Option<String>,
    broker: Option<toml::Value>,
    delivery: Option<toml::Value>,
    retry: Option<toml::Value>,
    circuit: Option<toml::Value>,
    admin: Option<toml::Value>,
    log: Option<toml::Value>,
    account: Option<Vec<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBroker {
    url: Option<OneOrMany>,
    exchange: Option<String>,
    queue_prefix: Option<String>,
    prefetch: Option<i64>,
    shards: Option<i64>,
    max_event_bytes: Option<i64>,
    delivery_limit: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDelivery {
    timeout: Option<String>,
    max_concurrency: Option<i64>,
    max_inflight_per_destination: Option<i64>,
    max_body_bytes: Option<i64>,
    ordering: Option<String>,
    allow_private_networks: Option<bool>,
    ca_file: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    immediate_attempts: Option<i64>,
    initial_interval: Option<String>,
    max_interval: Option<String>,
    schedule: Option<Vec<String>>,
    max_age: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCircuit {
    failure_threshold: Option<i64>,
    cooldown: Option<String>,
    max_cooldown: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<LogFormat>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    id: Option<String>,
    companies_url: Option<String>,
    contacts_url: Option<String>,
    batch_size: Option<i64>,
    flush_interval: Option<String>,
    hmac_secret: Option<String>,
    signature_header: Option<String>,
    headers: Option<HashMap<String, String>>,
    standard_webhooks_secret: Option<String>,
    client_cert: Option<String>,
    client_key: Option<String>,
}

/// Reads and validates the file at `path`, applying `COURIER_AMQP_URL` and
/// `COURIER_ADMIN_LISTEN`.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        key: "(file)".into(),
        account: None,
        message: format!("cannot read the configuration file: {e}"),
    })?;
    let env = |name: &str| std::env::var(name).ok();
    parse(path, &text, &env)
}

/// Parses configuration text; `env` looks variables up (the process environment in
/// `load`, a map in tests).
pub fn parse(
    path: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Settings, ConfigError> {
    let v = Validator { file: path };
    let mut root: toml::Value = toml::from_str::<toml::Table>(text)
        .map(toml::Value::Table)
        .map_err(|e| {
            v.err(
                "(syntax)",
                None,
                e.message().to_string() + &location(text, &e),
            )
        })?;
    // Accounts are expanded one by one below, so their errors can name the account.
    let mut raw_accounts_values = root.as_table_mut().and_then(|t| t.remove("account"));
    expand_env(&mut root, "", env).map_err(|(key, message)| v.err(&key, None, message))?;
    if let Some(toml::Value::Array(accounts)) = raw_accounts_values.as_mut() {
        for (index, account) in accounts.iter_mut().enumerate() {
            let label = account_label(account, index);
            expand_env(account, "account", env)
                .map_err(|(key, message)| v.err(&key, Some(&label), message))?;
        }
    }
    if let (Some(accounts), Some(table)) = (raw_accounts_values, root.as_table_mut()) {
        table.insert("account".into(), accounts);
    }
    let top: RawTop = root
        .try_into()
        .map_err(|e: toml::de::Error| v.err("(top level)", None, e.message().to_string()))?;

    let broker: RawBroker = v.section("broker", top.broker)?;
    let delivery: RawDelivery = v.section("delivery", top.delivery)?;
    let retry: RawRetry = v.section("retry", top.retry)?;
    let circuit: RawCircuit = v.section("circuit", top.circuit)?;
    let admin: RawAdmin = v.section("admin", top.admin)?;
    let log: RawLog = v.section("log", top.log)?;

    let shutdown_timeout = v.duration("shutdown_timeout", None, top.shutdown_timeout, "30s")?;

    // Broker.
    let raw_urls = match env("COURIER_AMQP_URL").filter(|s| !s.is_empty()) {
        Some(url) => vec![url],
        None => match broker.url {
            Some(OneOrMany::One(url)) => vec![url],
            Some(OneOrMany::Many(urls)) => urls,
            None => return Err(v.err("broker.url", None, "is required (or set COURIER_AMQP_URL)")),
        },
    };
    if raw_urls.is_empty() {
        return Err(v.err("broker.url", None, "lists no broker"));
    }
    let urls = raw_urls
        .iter()
        .map(|u| BrokerUrl::parse(u).map_err(|m| v.err("broker.url", None, m)))
        .collect::<Result<Vec<_>, _>>()?;
    let exchange = broker.exchange.unwrap_or_else(|| "record-changes".into());
    if exchange.is_empty() {
        return Err(v.err("broker.exchange", None, "may not be empty"));
    }
    let queue_prefix = broker.queue_prefix.unwrap_or_else(|| "courier".into());
    if queue_prefix.is_empty() || queue_prefix.len() > 200 {
        return Err(v.err("broker.queue_prefix", None, "must be 1 to 200 bytes"));
    }
    let prefetch = v.int("broker.prefetch", None, broker.prefetch, 1000, 1, 65535)? as u16;
    let shards = v.int("broker.shards", None, broker.shards, 4, 1, 1024)? as u16;
    let max_event_bytes = v.int(
        "broker.max_event_bytes",
        None,
        broker.max_event_bytes,
        1 << 20,
        1,
        128 << 20,
    )? as usize;
    let delivery_limit = v.int(
        "broker.delivery_limit",
        None,
        broker.delivery_limit,
        10,
        1,
        1_000_000,
    )? as u32;

    // Delivery.
    if let Some(ordering) = delivery.ordering.as_deref() {
        match ordering {
            "none" => {}
            "per_record" => {
                return Err(v.err(
                    "delivery.ordering",
                    None,
                    "\"per_record\" is not supported yet",
                ));
            }
            other => {
                return Err(v.err(
                    "delivery.ordering",
                    None,
                    format!("must be \"none\" or \"per_record\", not {other:?}"),
                ));
            }
        }
    }
    if delivery.ca_file.is_some() {
        return Err(v.err("delivery.ca_file", None, "is not supported yet"));
    }
    let max_body_bytes = v.int(
        "delivery.max_body_bytes",
        None,
        delivery.max_body_bytes,
        5 << 20,
        1,
        1 << 30,
    )? as usize;
    if max_body_bytes < max_event_bytes {
        return Err(v.err(
            "delivery.max_body_bytes",
            None,
            format!("must be at least broker.max_event_bytes ({max_event_bytes})"),
        ));
    }
    let delivery = DeliverySettings {
        timeout: v.duration("delivery.timeout", None, delivery.timeout, "10s")?,
        max_concurrency: v.int(
            "delivery.max_concurrency",
            None,
            delivery.max_concurrency,
            256,
            1,
            100_000,
        )? as usize,
        max_inflight_per_destination: v.int(
            "delivery.max_inflight_per_destination",
            None,
            delivery.max_inflight_per_destination,
            16,
            1,
            100_000,
        )? as usize,
        max_body_bytes,
        allow_private_networks: delivery.allow_private_networks.unwrap_or(false),
    };

    // Retry.
    let schedule_raw = retry.schedule.unwrap_or_else(|| {
        ["30s", "5m", "30m", "2h", "6h", "12h"]
            .map(String::from)
            .to_vec()
    });
    let mut schedule = Vec::with_capacity(schedule_raw.len());
    for raw in &schedule_raw {
        let delay = v.parse_duration("retry.schedule", None, raw)?;
        if delay < Duration::from_millis(1) || delay.subsec_nanos() % 1_000_000 != 0 {
            return Err(v.err(
                "retry.schedule",
                None,
                format!("{raw:?} must be whole milliseconds, at least 1ms"),
            ));
        }
        if schedule.contains(&delay) {
            return Err(v.err(
                "retry.schedule",
                None,
                format!("the delay {raw:?} is repeated"),
            ));
        }
        if schedule.last().is_some_and(|last| *last > delay) {
            return Err(v.err("retry.schedule", None, "delays must be strictly increasing"));
        }
        schedule.push(delay);
    }
    let retry = RetrySettings {
        immediate_attempts: v.int(
            "retry.immediate_attempts",
            None,
            retry.immediate_attempts,
            3,
            1,
            100,
        )? as u32,
        initial_interval: v.duration(
            "retry.initial_interval",
            None,
            retry.initial_interval,
            "500ms",
        )?,
        max_interval: v.duration("retry.max_interval", None, retry.max_interval, "10s")?,
        schedule,
        max_age: v.duration("retry.max_age", None, retry.max_age, "24h")?,
    };
    // Each of these holds messages unacknowledged; the broker closes a channel that holds
    // one for its consumer_timeout (30 min by default).
    v.at_most("delivery.timeout", None, delivery.timeout, HOLD_CAP)?;
    v.at_most("retry.max_interval", None, retry.max_interval, HOLD_CAP)?;
    if retry.max_interval < retry.initial_interval {
        return Err(v.err(
            "retry.max_interval",
            None,
            "must be at least retry.initial_interval",
        ));
    }

    let circuit = CircuitSettings {
        failure_threshold: v.int(
            "circuit.failure_threshold",
            None,
            circuit.failure_threshold,
            5,
            1,
            1_000_000,
        )? as u32,
        cooldown: v.duration("circuit.cooldown", None, circuit.cooldown, "30s")?,
        max_cooldown: v.duration("circuit.max_cooldown", None, circuit.max_cooldown, "10m")?,
    };
    if circuit.max_cooldown < circuit.cooldown {
        return Err(v.err(
            "circuit.max_cooldown",
            None,
            "must be at least circuit.cooldown",
        ));
    }

    let listen_raw = env("COURIER_ADMIN_LISTEN")
        .filter(|s| !s.is_empty())
        .or(admin.listen)
        .unwrap_or_else(|| "127.0.0.1:9464".into());
    let admin = AdminSettings {
        listen: listen_raw.parse().map_err(|_| {
            v.err(
                "admin.listen",
                None,
                format!("{listen_raw:?} is not an address:port"),
            )
        })?,
    };

    let level = log.level.unwrap_or_else(|| "info".into());
    if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        return Err(v.err(
            "log.level",
            None,
            format!("{level:?} is not a log level or filter"),
        ));
    }
    let log = LogSettings {
        level,
        format: log.format.unwrap_or(LogFormat::Text),
    };

    // Accounts.
    let raw_accounts = top.account.unwrap_or_default();
    if raw_accounts.is_empty() {
        return Err(v.err("account", None, "at least one [[account]] is required"));
    }
    let mut accounts = HashMap::with_capacity(raw_accounts.len());
    for (index, raw) in raw_accounts.into_iter().enumerate() {
        // The id first, so every later error can name the account.
        let label = account_label(&raw, index);
        let raw: RawAccount = raw.try_into().map_err(|e: toml::de::Error| {
            v.err("account", Some(&label), e.message().to_string())
        })?;
        let account = v.account(raw, &label)?;
        if account.batch_size > prefetch as usize {
            return Err(v.err(
                "broker.prefetch",
                None,
                format!(
                    "({prefetch}) must be at least the largest batch_size ({} of account \"{}\")",
                    account.batch_size, account.id
                ),
            ));
        }
        if accounts.contains_key(&*account.id) {
            return Err(v.err("account.id", Some(&label), "duplicate account id"));
        }
        accounts.insert(account.id.to_string(), Arc::new(account));
    }

    Ok(Settings {
        source: path.to_path_buf(),
        shutdown_timeout,
        broker: BrokerSettings {
            urls,
            exchange,
            queue_prefix,
            prefetch,
            shards,
            max_event_bytes,
            delivery_limit,
        },
        delivery,
        retry,
        circuit,
        admin,
        log,
        accounts,
    })
}

/// An account's id for error messages, or its position when the id is missing.
fn account_label(raw: &toml::Value, index: usize) -> String {
    raw.get("id")
        .and_then(toml::Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| format!("#{}", index + 1))
}

/// A toml error's line and column, for syntax errors.
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

/// Replaces `${NAME}` in every string of the tree. Only the braced form is expanded, so a
/// secret that contains a bare `$` survives as written.
fn expand_env(
    value: &mut toml::Value,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), (String, String)> {
    match value {
        toml::Value::String(s) if s.contains("${") => {
            *s = expand_str(s, env).map_err(|m| (key.to_owned(), m))?;
        }
        toml::Value::Array(items) => {
            for item in items {
                expand_env(item, key, env)?;
            }
        }
        toml::Value::Table(table) => {
            for (k, item) in table.iter_mut() {
                let path = if key.is_empty() {
                    k.clone()
                } else {
                    format!("{key}.{k}")
                };
                expand_env(item, &path, env)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn expand_str(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or("an unterminated ${ in a string")?;
        let name = &after[..end];
        let valid = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            return Err(format!("${{{name}}} is not a valid variable name"));
        }
        let value = env(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

struct Validator<'a> {
    file: &'a Path,
}

impl Validator<'_> {
    fn err(&self, key: &str, account: Option<&str>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            key: key.to_owned(),
            account: account.map(str::to_owned),
            message: message.into(),
        }
    }

    fn section<T: Default + serde::de::DeserializeOwned>(
        &self,
        name: &str,
        value: Option<toml::Value>,
    ) -> Result<T, ConfigError> {
        match value {
            None => Ok(T::default()),
            Some(value) => value
                .try_into()
                .map_err(|e: toml::de::Error| self.err(name, None, e.message().to_string())),
        }
    }

    fn parse_duration(
        &self,
        key: &str,
        account: Option<&str>,
        raw: &str,
    ) -> Result<Duration, ConfigError> {
        humantime::parse_duration(raw).map_err(|e| {
            self.err(
                key,
                account,
                format!("{raw:?} is not a duration like \"500ms\" or \"30s\": {e}"),
            )
        })
    }

    fn duration(
        &self,
        key: &str,
        account: Option<&str>,
        raw: Option<String>,
        default: &str,
    ) -> Result<Duration, ConfigError> {
        let duration = self.parse_duration(key, account, raw.as_deref().unwrap_or(default))?;
        if duration.is_zero() {
            return Err(self.err(key, account, "must be longer than zero"));
        }
        Ok(duration)
    }

    #[allow(clippy::too_many_arguments)]
    fn int(
        &self,
        key: &str,
        account: Option<&str>,
        raw: Option<i64>,
        default: i64,
        min: i64,
        max: i64,
    ) -> Result<i64, ConfigError> {
        let value = raw.unwrap_or(default);
        if !(min..=max).contains(&value) {
            return Err(self.err(
                key,
                account,
                format!("{value} is out of range {min}..={max}"),
            ));
        }
        Ok(value)
    }

    fn at_most(
        &self,
        key: &str,
        account: Option<&str>,
        value: Duration,
        max: Duration,
    ) -> Result<(), ConfigError> {
        if value > max {
            let message = format!(
                "{} is longer than {}: messages would sit unacknowledged near the broker's consumer_timeout",
                humantime::format_duration(value),
                humantime::format_duration(max)
            );
            return Err(self.err(key, account, message));
        }
        Ok(())
    }

    fn url(&self, key: &str, account: &str, raw: &str) -> Result<Url, ConfigError> {
        let url = Url::parse(raw)
            .map_err(|e| self.err(key, Some(account), format!("not a valid URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(self.err(
                key,
                Some(account),
                format!("must be http or https, not {:?}", url.scheme()),
            ));
        }
        if url.host().is_none() {
            return Err(self.err(key, Some(account), "the URL has no host"));
        }
        Ok(url)
    }

    fn account(&self, raw: RawAccount, label: &str) -> Result<Account, ConfigError> {
        let account = Some(label);
        for (key, set) in [
            (
                "account.standard_webhooks_secret",
                raw.standard_webhooks_secret.is_some(),
            ),
            ("account.client_cert", raw.client_cert.is_some()),
            ("account.client_key", raw.client_key.is_some()),
        ] {
            if set {
                return Err(self.err(key, account, "is not supported yet"));
            }
        }
        let id = raw
            .id
            .ok_or_else(|| self.err("account.id", account, "is required"))?;
        if !crate::event::valid_account(&id) {
            return Err(self.err("account.id", account, "must match [A-Za-z0-9_.-]{1,64}"));
        }
        let companies_url = raw
            .companies_url
            .ok_or_else(|| self.err("account.companies_url", account, "is required"))?;
        let companies_url = self.url("account.companies_url", label, &companies_url)?;
        let contacts_url = match raw.contacts_url.as_deref() {
            None | Some("") => None,
            Some(url) => Some(self.url("account.contacts_url", label, url)?),
        };
        let batch_size = self.int(
            "account.batch_size",
            account,
            raw.batch_size,
            1,
            1,
            MAX_BATCH_SIZE as i64,
        )? as usize;
        let flush_interval =
            self.duration("account.flush_interval", account, raw.flush_interval, "1s")?;
        self.at_most("account.flush_interval", account, flush_interval, HOLD_CAP)?;
        let hmac_secret = match raw.hmac_secret {
            Some(s) if s.is_empty() => {
                return Err(self.err(
                    "account.hmac_secret",
                    account,
                    "is empty (omit it to send unsigned requests)",
                ));
            }
            other => other.map(SecretString::from),
        };
        let signature_header = raw
            .signature_header
            .as_deref()
            .unwrap_or(DEFAULT_SIGNATURE_HEADER);
        let signature_header = HeaderName::try_from(signature_header).map_err(|_| {
            self.err(
                "account.signature_header",
                account,
                "is not a valid header name",
            )
        })?;
        let ours = [
            reqwest::header::CONTENT_TYPE,
            reqwest::header::USER_AGENT,
            reqwest::header::CONTENT_LENGTH,
            reqwest::header::HOST,
        ];
        if ours.contains(&signature_header) || signature_header.as_str().starts_with("x-courier-") {
            return Err(self.err(
                "account.signature_header",
                account,
                "may not be a header courier sets",
            ));
        }
        let reserved: HashSet<HeaderName> = [
            reqwest::header::CONTENT_TYPE,
            reqwest::header::USER_AGENT,
            reqwest::header::CONTENT_LENGTH,
            reqwest::header::HOST,
            reqwest::header::TRANSFER_ENCODING,
            signature_header.clone(),
        ]
        .into();
        let mut headers = HeaderMap::new();
        for (name, value) in raw.headers.unwrap_or_default() {
            let key = format!("account.headers.{name}");
            let header = HeaderName::try_from(name.as_str())
                .map_err(|_| self.err(&key, account, "is not a valid header name"))?;
            if reserved.contains(&header) || header.as_str().starts_with("x-courier-") {
                return Err(self.err(&key, account, "may not replace a header courier sets"));
            }
            let mut value = HeaderValue::try_from(value)
                .map_err(|_| self.err(&key, account, "the value is not a valid header value"))?;
            value.set_sensitive(true);
            headers.append(header, value);
        }
        Ok(Account {
            id: id.into(),
            companies_url,
            contacts_url,
            batch_size,
            flush_interval,
            hmac_secret,
            signature_header,
            headers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [broker]
        url = "amqp://guest:secretpw@127.0.0.1:5672/%2f"
        [[account]]
        id = "acme"
        companies_url = "https://hooks.example.com/c?token=abc"
    "#;

    fn parse_with(text: &str, vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse(Path::new("test.toml"), text, &|name| {
            vars.get(name).cloned()
        })
    }

    fn error_of(text: &str) -> ConfigError {
        parse_with(text, &[]).expect_err("config should be refused")
    }

    #[test]
    fn defaults_follow_the_contract() {
        let s = parse_with(MINIMAL, &[]).unwrap();
        assert_eq!(s.broker.prefetch, 1000);
        assert_eq!(s.broker.exchange, "record-changes");
        assert_eq!(s.broker.deliver_queue(), "courier.deliver");
        assert_eq!(s.broker.dead_queue(), "courier.dead");
        assert_eq!(s.retry.immediate_attempts, 3);
        assert_eq!(s.retry.schedule.len(), 6);
        assert_eq!(s.delivery.max_inflight_per_destination, 16);
        assert!(!s.delivery.allow_private_networks);
        let acme = &s.accounts["acme"];
        assert_eq!(acme.batch_size, 1);
        assert_eq!(acme.flush_interval, Duration::from_secs(1));
        assert_eq!(acme.signature_header.as_str(), DEFAULT_SIGNATURE_HEADER);
        assert!(acme.contacts_url.is_none());
        assert_eq!(s.admin.listen.to_string(), "127.0.0.1:9464");
    }

    #[test]
    fn secrets_never_print() {
        let text = format!(
            "{MINIMAL}\nhmac_secret = \"${{SECRET}}\"\nheaders = {{ Authorization = \"Bearer tok123\" }}\n"
        );
        let s = parse_with(&text, &[("SECRET", "hunter2")]).unwrap();
        let debug = format!("{s:?}");
        for secret in ["hunter2", "tok123", "secretpw", "token=abc"] {
            assert!(!debug.contains(secret), "{secret} leaked into {debug}");
        }
        assert_eq!(
            s.accounts["acme"]
                .hmac_secret
                .as_ref()
                .unwrap()
                .expose_secret(),
            "hunter2"
        );
    }

    #[test]
    fn env_expansion_is_braced_only() {
        assert_eq!(
            expand_str("a${X}b$Y${X}", &|_| Some("1".into())).unwrap(),
            "a1b$Y1"
        );
        let err = error_of(&format!("{MINIMAL}\nhmac_secret = \"${{NOPE}}\"\n"));
        assert_eq!(err.key, "account.hmac_secret");
        assert_eq!(err.account.as_deref(), Some("acme"));
        assert!(err.to_string().contains("NOPE"), "{err}");
    }

    #[test]
    fn env_overrides_broker_url_and_admin_listen() {
        let s = parse_with(
            MINIMAL,
            &[
                ("COURIER_AMQP_URL", "amqp://u:p@127.0.0.2:5673/v"),
                ("COURIER_ADMIN_LISTEN", "127.0.0.1:1"),
            ],
        )
        .unwrap();
        assert_eq!(s.broker.urls[0].display, "amqp://127.0.0.2:5673/v");
        assert_eq!(s.admin.listen.port(), 1);
    }

    #[test]
    fn errors_name_key_and_account() {
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("batch_size = 0", "account.batch_size", Some("acme")),
            ("batch_size = 201", "account.batch_size", Some("acme")),
            (
                "contacts_url = \"ftp://x/\"",
                "account.contacts_url",
                Some("acme"),
            ),
            ("colour = \"blue\"", "account", Some("acme")),
            (
                "standard_webhooks_secret = \"whsec_AAAA\"",
                "account.standard_webhooks_secret",
                Some("acme"),
            ),
            (
                "headers = { content-type = \"text/plain\" }",
                "account.headers.content-type",
                Some("acme"),
            ),
            (
                "flush_interval = \"soon\"",
                "account.flush_interval",
                Some("acme"),
            ),
            (
                "flush_interval = \"1h\"",
                "account.flush_interval",
                Some("acme"),
            ),
            (
                "headers = { User-Agent = \"x\" }",
                "account.headers.User-Agent",
                Some("acme"),
            ),
            (
                "signature_header = \"content-type\"",
                "account.signature_header",
                Some("acme"),
            ),
        ];
        for (line, key, account) in cases {
            let err = error_of(&format!("{MINIMAL}\n{line}\n"));
            assert_eq!(err.key, *key, "for {line}: {err}");
            assert_eq!(err.account.as_deref(), *account, "for {line}: {err}");
            assert!(err.to_string().starts_with("test.toml: "), "{err}");
        }
        let dup = error_of(&format!(
            "{MINIMAL}\n[[account]]\nid = \"acme\"\ncompanies_url = \"http://x/\"\n"
        ));
        assert_eq!(dup.key, "account.id");
        let schedule = error_of(&format!(
            "[retry]\nschedule = [\"30s\", \"30s\"]\n{MINIMAL}"
        ));
        assert_eq!(schedule.key, "retry.schedule");
        let unknown = error_of(&format!("[delivery]\nspeed = 1\n{MINIMAL}"));
        assert_eq!(unknown.key, "delivery");
        assert!(unknown.message.contains("speed"), "{unknown}");
        let ordering = error_of(&format!("[delivery]\nordering = \"per_record\"\n{MINIMAL}"));
        assert!(ordering.message.contains("not supported yet"));
        let prefetch = error_of(&format!(
            "{}\nbatch_size = 50\n",
            MINIMAL.replace("[broker]", "[broker]\nprefetch = 10")
        ));
        assert_eq!(prefetch.key, "broker.prefetch", "{prefetch}");
    }

    #[test]
    fn retry_queue_names_use_the_largest_exact_unit() {
        let cases = [
            ("30s", "30s"),
            ("90s", "90s"),
            ("60s", "1m"),
            ("2h", "2h"),
            ("1500ms", "1500ms"),
            ("48h", "2d"),
        ];
        for (raw, name) in cases {
            assert_eq!(delay_name(humantime::parse_duration(raw).unwrap()), name);
        }
    }

    #[test]
    fn redacted_urls_keep_scheme_host_and_port() {
        let url = Url::parse("https://user:pw@hooks.example.com/path/token?key=1").unwrap();
        assert_eq!(redact_url(&url), "https://hooks.example.com:443");
        let url = Url::parse("http://[::1]:8080/x").unwrap();
        assert_eq!(redact_url(&url), "http://[::1]:8080");
    }
}
