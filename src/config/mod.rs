//! The settings tree: `courier.toml` read once into [`Settings`] (docs/configuration.md
//! describes every key).
//!
//! Data flows one way through the files of this module:
//!
//! ```text
//! load(path) ── reads the file ──▶ parse(path, text, env)
//!   raw.rs       TOML text → raw sections: serde shapes, unknown keys refused,
//!                every default named once
//!     shape.rs   the deserializer of those shapes: errors name the key and the
//!                expected type, never the value
//!     env.rs     `${VAR}` expanded in every string value first (hand-written: docs/design.md)
//!   validate.rs  raw sections → typed Settings, once: durations, URLs, bounded
//!                integers, secrets, the COURIER_AMQP_URL / COURIER_ADMIN_LISTEN overrides
//!     account.rs one `[[account]]` → Account
//!     headers.rs the request headers courier sets, which an account may not set
//!     tls.rs     CA and client-certificate files, read and checked
//!   error.rs     ConfigError: the file, the key, the account, never a secret value
//! ```
//!
//! Later code never re-checks a value. [`restart_only_change`] decides what a `SIGHUP`
//! reload may change.

mod account;
mod env;
mod error;
mod headers;
mod raw;
mod shape;
mod tls;
mod validate;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName};
use secrecy::{ExposeSecret, SecretSlice, SecretString};
use serde::Deserialize;
use url::Url;

use crate::event::RecordType;

pub use error::ConfigError;
pub use headers::{COURIER_HEADER_PREFIX, COURIER_REQUEST_HEADERS, is_courier_header};
pub use tls::{CaFile, ClientIdentity};

/// The longest `flush_interval`, `delivery.timeout` or `retry.max_interval` accepted.
pub const HOLD_CAP: Duration = Duration::from_secs(300);

/// The default signature header of the GoodFit connector.
pub const DEFAULT_SIGNATURE_HEADER: &str = "x-goodfit-hmac-sha256";
/// The largest batch the GoodFit connector allows.
pub const MAX_BATCH_SIZE: usize = 200;

/// Where the configuration comes from: `--config`, else `$COURIER_CONFIG`, else
/// `./courier.toml`.
pub fn resolve_path(cli: Option<&Path>) -> PathBuf {
    cli.map(Path::to_path_buf)
        .or_else(|| std::env::var_os("COURIER_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("courier.toml"))
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
    let v = validate::Validator::new(path);
    let raw = raw::read(&v, text, env)?;
    validate::settings(&v, raw, env)
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

/// The first key that differs between two configurations and needs a restart (e.g.
/// `broker.prefetch`), or its section (`[broker]`, `[admin]`, `[log]`) when no key
/// listed here differs; `None` when a reload may apply `new`.
///
/// Each of these sections is compared whole, by its derived equality, so a key added to
/// one of them needs a restart too without anyone remembering to list it here: it is
/// then named by its section. `delivery.ordering` needs a restart as well
/// (docs/configuration.md): the broker section mirrors it, since it changes the
/// topology.
pub fn restart_only_change(old: &Settings, new: &Settings) -> Option<&'static str> {
    let (b, nb) = (&old.broker, &new.broker);
    let sections = [
        (
            "[broker]",
            b == nb,
            vec![
                ("broker.url", b.urls == nb.urls),
                ("broker.exchange", b.exchange == nb.exchange),
                ("broker.queue_prefix", b.queue_prefix == nb.queue_prefix),
                (
                    "broker.prefetch",
                    b.prefetch == nb.prefetch && b.prefetch_set == nb.prefetch_set,
                ),
                ("broker.shards", b.shards == nb.shards),
                ("delivery.ordering", b.per_record == nb.per_record),
                (
                    "broker.max_event_bytes",
                    b.max_event_bytes == nb.max_event_bytes,
                ),
                (
                    "broker.delivery_limit",
                    b.delivery_limit == nb.delivery_limit,
                ),
            ],
        ),
        (
            "[admin]",
            old.admin == new.admin,
            vec![("admin.listen", old.admin.listen == new.admin.listen)],
        ),
        (
            "[log]",
            old.log == new.log,
            vec![
                ("log.level", old.log.level == new.log.level),
                ("log.format", old.log.format == new.log.format),
            ],
        ),
    ];
    let (section, _, keys) = sections.into_iter().find(|(_, same, _)| !same)?;
    let key = keys.into_iter().find(|(_, same)| !same).map(|(key, _)| key);
    Some(key.unwrap_or(section))
}

/// courier's default prefetch window, from the accounts (docs/configuration.md,
/// `prefetch`): room for two full batches of every destination, so that one round of
/// batches fills while the one before it is delivered and acknowledged, between 1,000
/// and 20,000 messages. Past 100 destinations the window shrinks in proportion, down to
/// 2,000 (or the window before shrinking, if smaller): their batches cannot fill in any
/// window of a reasonable size, and each destination costs memory of its own.
pub fn default_prefetch<'a>(accounts: impl IntoIterator<Item = &'a Account>) -> u16 {
    const LEAST: usize = 1000;
    const MOST: usize = 20_000;
    const MANY_DESTINATIONS: usize = 100;
    const MANY_LEAST: usize = 2000;
    let (mut destinations, mut room) = (0usize, 0usize);
    for account in accounts {
        let types = 1 + usize::from(account.contacts_url.is_some());
        destinations += types;
        room += types * account.batch_size;
    }
    let mut window = (2 * room).clamp(LEAST, MOST);
    if destinations > MANY_DESTINATIONS {
        window = (window * MANY_DESTINATIONS / destinations).max(window.min(MANY_LEAST));
    }
    u16::try_from(window).expect("at most 20,000")
}

/// `[broker]`. Needs a restart to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerSettings {
    /// Nodes to try in turn.
    pub urls: Vec<BrokerUrl>,
    pub exchange: String,
    pub queue_prefix: String,
    /// The prefetch window: as configured, else [`default_prefetch`] of the accounts.
    pub prefetch: u16,
    /// `prefetch` was set in the file.
    pub prefetch_set: bool,
    pub shards: u16,
    /// `delivery.ordering = "per_record"`: the topology then has the shard queues and
    /// the parking log, and the worker consumes the shards (docs/ordering.md).
    pub per_record: bool,
    pub max_event_bytes: usize,
    pub delivery_limit: u32,
    /// TLS to `amqps` nodes; every URL of `urls` carries it too.
    pub tls: BrokerTls,
}

/// TLS to `amqps` nodes besides the system's trust store: `broker.ca_file`,
/// `broker.client_cert` and `broker.client_key`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerTls {
    pub ca: Option<CaFile>,
    pub identity: Option<ClientIdentity>,
}

impl Settings {
    /// The largest `batch_size` of the accounts (1 with none).
    pub fn largest_batch(&self) -> usize {
        self.accounts
            .values()
            .map(|a| a.batch_size)
            .max()
            .unwrap_or(1)
    }
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

    /// Shard queue `n` of per-record ordering, e.g. `courier.deliver.3`.
    pub fn shard_queue(&self, n: u16) -> String {
        format!("{}.deliver.{n}", self.queue_prefix)
    }

    /// The parking log of per-record ordering, a stream: `courier.parking`.
    pub fn parking_queue(&self) -> String {
        format!("{}.parking", self.queue_prefix)
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
    /// TLS settings for an `amqps` URL (`[broker]`'s, the same for every node).
    pub tls: BrokerTls,
    /// The URL asks for x509 authentication (`?auth_mechanism=external`).
    certificate_login: bool,
}

impl BrokerUrl {
    /// Parses and checks an `amqp://` or `amqps://` URL.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let url = Url::parse(raw).map_err(|e| format!("not a valid URL: {e}"))?;
        if !matches!(url.scheme(), "amqp" | "amqps") {
            return Err("scheme must be amqp or amqps".into());
        }
        let host = url.host_str().ok_or("the URL has no host")?;
        if matches!(url.host(), Some(url::Host::Ipv6(_))) {
            // The AMQP client would silently connect to localhost instead.
            return Err("IPv6 address literals are not supported here: use a host name".into());
        }
        let port = url
            .port()
            .unwrap_or(if url.scheme() == "amqps" { 5671 } else { 5672 });
        let mechanism = url
            .query_pairs()
            .find(|(key, _)| key == "auth_mechanism")
            .map(|(_, value)| value.to_ascii_lowercase());
        if let Some(mechanism) = &mechanism
            && !matches!(mechanism.as_str(), "plain" | "amqplain" | "external")
        {
            return Err(format!(
                "auth_mechanism={mechanism} is not one of plain, amqplain, external"
            ));
        }
        let display = format!("{}://{host}:{port}{}", url.scheme(), url.path());
        Ok(Self {
            secret: SecretString::from(raw.to_owned()),
            display,
            tls: BrokerTls::default(),
            certificate_login: mechanism.as_deref() == Some("external"),
        })
    }

    /// The full URL, for the connection only.
    pub fn expose(&self) -> &str {
        self.secret.expose_secret()
    }

    /// Whether the URL asks for x509 authentication (`?auth_mechanism=external`): the
    /// client certificate is the login (docs/configuration.md, "x509 authentication").
    pub fn logs_in_with_certificate(&self) -> bool {
        self.certificate_login
    }
}

/// Two addresses are equal when their full URLs and TLS settings are: a new password
/// is a change.
impl PartialEq for BrokerUrl {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose() && self.tls == other.tls
    }
}

impl Eq for BrokerUrl {}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display)
    }
}

/// `[delivery]`. Reloadable.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliverySettings {
    pub timeout: Duration,
    pub max_concurrency: usize,
    pub max_inflight_per_destination: usize,
    pub max_body_bytes: usize,
    pub allow_private_networks: bool,
    /// CA certificates trusted for receivers besides the system's (`ca_file`).
    pub ca: Option<CaFile>,
    /// Whether events of one record are delivered in order (docs/ordering.md). Needs a
    /// restart to change.
    pub ordering: Ordering,
}

/// `delivery.ordering`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ordering {
    /// No order across batches, retries or replicas.
    #[default]
    None,
    /// Events of one record (account, type, `record_id`) in publish order, through
    /// sharded queues (docs/ordering.md).
    PerRecord,
}

/// `[retry]`. Reloadable.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrySettings {
    /// Attempts in all before the batch leaves the immediate stage (≥ 1).
    pub immediate_attempts: u32,
    pub initial_interval: Duration,
    pub max_interval: Duration,
    /// Strictly increasing delays of the scheduled tiers.
    pub schedule: Vec<Duration>,
    pub max_age: Duration,
}

/// `[circuit]`. Reloadable.
#[derive(Debug, Clone, PartialEq)]
pub struct CircuitSettings {
    pub failure_threshold: u32,
    pub cooldown: Duration,
    pub max_cooldown: Duration,
}

/// `[admin]`. Needs a restart to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    pub listen: SocketAddr,
}

/// `[log]`. Needs a restart to change.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// One `[[account]]`: where its events go and how requests are signed. Reloadable.
pub struct Account {
    pub id: Arc<str>,
    pub companies_url: Url,
    /// `None`: contacts are not sent (acked and counted as skipped).
    pub contacts_url: Option<Url>,
    pub batch_size: usize,
    pub flush_interval: Duration,
    pub hmac_secret: Option<SecretString>,
    pub signature_header: HeaderName,
    /// The keys of the Standard Webhooks signature (the `whsec_` secrets decoded), each
    /// signing every request; empty: no such signature (docs/receiving.md).
    pub standard_webhooks_keys: Vec<SecretSlice<u8>>,
    /// The account's own headers; values are marked sensitive so they never print.
    pub headers: HeaderMap,
    /// The client certificate presented to receivers that demand mTLS.
    pub client_identity: Option<ClientIdentity>,
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
            .field("standard_webhooks_keys", &self.standard_webhooks_keys.len())
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("client_cert", &self.client_identity.is_some())
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

/// Parsing with a fixed environment, for the tests of every file of this module.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::HashMap;
    use std::path::Path;

    use super::{ConfigError, Settings};

    /// The smallest valid file; its broker password and URL token must never print.
    pub const MINIMAL: &str = r#"
        [broker]
        url = "amqp://guest:secretpw@127.0.0.1:5672/%2f"
        [[account]]
        id = "acme"
        companies_url = "https://hooks.example.com/c?token=abc"
    "#;

    /// Parses `text` as `test.toml` with exactly the variables `vars`.
    pub fn parse_with(text: &str, vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        super::parse(Path::new("test.toml"), text, &|name| {
            vars.get(name).cloned()
        })
    }

    /// The error refusing `text`.
    pub fn error_of(text: &str) -> ConfigError {
        parse_with(text, &[]).expect_err("config should be refused")
    }

    /// A self-signed certificate and its key, `<stem>.pem` and `<stem>.key` in `dir`,
    /// made by the `openssl` command (as the TLS integration tests make theirs).
    pub fn self_signed(dir: &Path, stem: &str) {
        let status = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args(["-subj", &format!("/CN={stem}"), "-keyout"])
            .arg(dir.join(format!("{stem}.key")))
            .arg("-out")
            .arg(dir.join(format!("{stem}.pem")))
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl runs");
        assert!(status.success(), "openssl req failed");
    }
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::testing::{MINIMAL, parse_with};
    use super::*;

    /// `MINIMAL` with `line` added to `[broker]`, `[admin]`, … as `section` says.
    fn with(section: &str, line: &str) -> Settings {
        let text = match section {
            "top" => format!("{line}\n{MINIMAL}"),
            "account" => format!("{MINIMAL}\n{line}\n"),
            "broker" => MINIMAL.replace("[broker]", &format!("[broker]\n{line}")),
            other => format!("[{other}]\n{line}\n{MINIMAL}"),
        };
        parse_with(&text, &[]).unwrap_or_else(|e| panic!("{section} {line}: {e}"))
    }

    #[test]
    fn restart_only_sections_are_refused_on_reload() {
        let old = parse_with(MINIMAL, &[]).unwrap();
        let changes = [
            ("broker", "exchange = \"other\"", "broker.exchange"),
            ("broker", "queue_prefix = \"other\"", "broker.queue_prefix"),
            ("broker", "prefetch = 999", "broker.prefetch"),
            ("broker", "shards = 5", "broker.shards"),
            ("broker", "max_event_bytes = 1000", "broker.max_event_bytes"),
            ("broker", "delivery_limit = 11", "broker.delivery_limit"),
            ("admin", "listen = \"127.0.0.1:9465\"", "admin.listen"),
            ("log", "level = \"debug\"", "log.level"),
            ("log", "format = \"json\"", "log.format"),
            ("delivery", "ordering = \"per_record\"", "delivery.ordering"),
        ];
        for (section, line, refused) in changes {
            let new = with(section, line);
            assert_eq!(restart_only_change(&old, &new), Some(refused), "{line}");
        }
        // The whole URL counts, its password too.
        let url = MINIMAL.replace("secretpw", "newpw");
        let new = parse_with(&url, &[]).unwrap();
        assert_eq!(restart_only_change(&old, &new), Some("broker.url"));
    }

    #[test]
    fn a_table_twice_and_a_top_level_key_after_the_accounts_are_named() {
        let twice = MINIMAL.replace("[[account]]", "[broker]\nprefetch = 5\n[[account]]");
        let err = parse_with(&twice, &[]).unwrap_err().to_string();
        assert!(err.contains("the table [broker] appears twice"), "{err}");
        assert!(err.contains("(line "), "{err}");
        let key_twice = MINIMAL.replace(
            "[[account]]",
            "[retry]\nmax_age = \"1h\"\nmax_age = \"2h\"\n[[account]]",
        );
        let err = parse_with(&key_twice, &[]).unwrap_err().to_string();
        assert!(err.contains("the key max_age is given twice"), "{err}");
        let late = format!("{MINIMAL}shutdown_timeout = \"5s\"\n");
        let err = parse_with(&late, &[]).unwrap_err().to_string();
        assert!(err.contains("account.shutdown_timeout"), "{err}");
        assert!(err.contains("shutdown_timeout is a top-level key"), "{err}");
        assert!(err.contains("above the first"), "{err}");
    }

    #[test]
    fn reloadable_sections_are_accepted_on_reload() {
        let old = parse_with(MINIMAL, &[]).unwrap();
        let changes = [
            ("top", "shutdown_timeout = \"5s\""),
            ("delivery", "timeout = \"3s\""),
            ("delivery", "max_concurrency = 8"),
            ("delivery", "allow_private_networks = true"),
            ("delivery", "ordering = \"none\""),
            ("retry", "schedule = [\"1m\"]"),
            ("retry", "max_age = \"1h\""),
            ("circuit", "failure_threshold = 2"),
            ("circuit", "cooldown = \"1s\""),
            ("account", "batch_size = 50"),
            ("account", "hmac_secret = \"s\""),
        ];
        for (section, line) in changes {
            let new = with(section, line);
            assert_eq!(restart_only_change(&old, &new), None, "{line}");
        }
        assert_eq!(restart_only_change(&old, &old.clone()), None);
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
