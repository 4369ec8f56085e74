//! Raw sections → typed [`Settings`], once: durations, URLs, bounded integers and
//! secrets are checked here so later code never re-checks (docs/configuration.md gives
//! every bound). The environment overrides `COURIER_AMQP_URL` and `COURIER_ADMIN_LISTEN`
//! are applied here too.

use std::ops::RangeInclusive;
use std::path::Path;
use std::time::Duration;

use url::Url;

use super::raw::{
    OneOrMany, RawAdmin, RawBroker, RawCircuit, RawConfig, RawDelivery, RawLog, RawRetry,
};
use super::{
    AdminSettings, BrokerSettings, BrokerTls, BrokerUrl, CircuitSettings, ConfigError,
    DeliverySettings, HOLD_CAP, LogSettings, Ordering, RetrySettings, Settings, account, tls,
};

/// Turns the raw file into settings; the first error found is returned.
pub(super) fn settings(
    v: &Validator,
    raw: RawConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Settings, ConfigError> {
    let shutdown_timeout = v.duration("shutdown_timeout", None, &raw.shutdown_timeout)?;
    let mut broker = broker(v, raw.broker, env)?;
    let delivery = delivery(v, raw.delivery, broker.max_event_bytes)?;
    broker.per_record = delivery.ordering == Ordering::PerRecord;
    let retry = retry(v, raw.retry)?;
    let circuit = circuit(v, raw.circuit)?;
    let admin = admin(v, raw.admin, env)?;
    let log = log(v, raw.log)?;
    let set = broker.prefetch_set.then_some(broker.prefetch);
    let accounts = account::accounts(v, raw.accounts, set)?;
    if !broker.prefetch_set {
        broker.prefetch = super::default_prefetch(accounts.values().map(|a| a.as_ref()));
    }
    Ok(Settings {
        source: v.file.to_path_buf(),
        shutdown_timeout,
        broker,
        delivery,
        retry,
        circuit,
        admin,
        log,
        accounts,
    })
}

fn broker(
    v: &Validator,
    raw: RawBroker,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<BrokerSettings, ConfigError> {
    let raw_urls = match env("COURIER_AMQP_URL").filter(|s| !s.is_empty()) {
        Some(url) => vec![url],
        None => match raw.url {
            Some(OneOrMany::One(url)) => vec![url],
            Some(OneOrMany::Many(urls)) => urls,
            None => return Err(v.err("broker.url", None, "is required (or set COURIER_AMQP_URL)")),
        },
    };
    if raw_urls.is_empty() {
        return Err(v.err("broker.url", None, "lists no broker"));
    }
    let tls = BrokerTls {
        ca: tls::ca_file(v, "broker.ca_file", raw.ca_file.as_deref())?,
        identity: tls::client_identity(
            v,
            "broker",
            None,
            raw.client_cert.as_deref(),
            raw.client_key.as_deref(),
        )?,
    };
    let urls = raw_urls
        .iter()
        .map(|u| {
            let mut url = BrokerUrl::parse(u).map_err(|m| v.err("broker.url", None, m))?;
            url.tls = tls.clone();
            Ok(url)
        })
        .collect::<Result<Vec<_>, _>>()?;
    // x509 authentication: the login is the client certificate, sent over TLS only.
    if urls.iter().any(|u| {
        u.logs_in_with_certificate() && (!u.display.starts_with("amqps:") || tls.identity.is_none())
    }) {
        return Err(v.err(
            "broker.url",
            None,
            "auth_mechanism=external logs in with a client certificate: it needs an amqps URL \
             and broker.client_cert / client_key",
        ));
    }
    if raw.exchange.is_empty() {
        return Err(v.err("broker.exchange", None, "may not be empty"));
    }
    if raw.queue_prefix.is_empty() || raw.queue_prefix.len() > 200 {
        return Err(v.err("broker.queue_prefix", None, "must be 1 to 200 bytes"));
    }
    Ok(BrokerSettings {
        urls,
        exchange: raw.exchange,
        queue_prefix: raw.queue_prefix,
        prefetch: match raw.prefetch {
            Some(prefetch) => v.int("broker.prefetch", None, prefetch, 1..=65535)?,
            None => 0, // derived from the accounts once they are read
        },
        prefetch_set: raw.prefetch.is_some(),
        shards: v.int("broker.shards", None, raw.shards, 1..=1024)?,
        per_record: false, // from delivery.ordering, once it is read
        max_event_bytes: v.int(
            "broker.max_event_bytes",
            None,
            raw.max_event_bytes,
            1..=128 << 20,
        )?,
        delivery_limit: v.int(
            "broker.delivery_limit",
            None,
            raw.delivery_limit,
            1..=1_000_000,
        )?,
        tls,
    })
}

fn delivery(
    v: &Validator,
    raw: RawDelivery,
    max_event_bytes: usize,
) -> Result<DeliverySettings, ConfigError> {
    let ordering = match raw.ordering.as_str() {
        "none" => Ordering::None,
        "per_record" => Ordering::PerRecord,
        _ => {
            return Err(v.err(
                "delivery.ordering",
                None,
                "must be \"none\" or \"per_record\"",
            ));
        }
    };
    let ca = tls::ca_file(v, "delivery.ca_file", raw.ca_file.as_deref())?;
    let max_body_bytes = v.int(
        "delivery.max_body_bytes",
        None,
        raw.max_body_bytes,
        1..=1 << 30,
    )?;
    if max_body_bytes < max_event_bytes {
        return Err(v.err(
            "delivery.max_body_bytes",
            None,
            "must be at least broker.max_event_bytes",
        ));
    }
    let timeout = v.duration("delivery.timeout", None, &raw.timeout)?;
    v.at_most("delivery.timeout", None, timeout, HOLD_CAP)?;
    Ok(DeliverySettings {
        timeout,
        max_concurrency: v.int(
            "delivery.max_concurrency",
            None,
            raw.max_concurrency,
            1..=100_000,
        )?,
        max_inflight_per_destination: v.int(
            "delivery.max_inflight_per_destination",
            None,
            raw.max_inflight_per_destination,
            1..=100_000,
        )?,
        max_body_bytes,
        allow_private_networks: raw.allow_private_networks,
        ca,
        ordering,
    })
}

fn retry(v: &Validator, raw: RawRetry) -> Result<RetrySettings, ConfigError> {
    let schedule = schedule(v, &raw.schedule)?;
    let retry = RetrySettings {
        immediate_attempts: v.int(
            "retry.immediate_attempts",
            None,
            raw.immediate_attempts,
            1..=100,
        )?,
        initial_interval: v.duration("retry.initial_interval", None, &raw.initial_interval)?,
        max_interval: v.duration("retry.max_interval", None, &raw.max_interval)?,
        schedule,
        max_age: v.duration("retry.max_age", None, &raw.max_age)?,
    };
    v.at_most("retry.max_interval", None, retry.max_interval, HOLD_CAP)?;
    if retry.max_interval < retry.initial_interval {
        return Err(v.err(
            "retry.max_interval",
            None,
            "must be at least retry.initial_interval",
        ));
    }
    Ok(retry)
}

/// `retry.schedule`: whole milliseconds, strictly increasing, none repeated.
fn schedule(v: &Validator, raw: &[String]) -> Result<Vec<Duration>, ConfigError> {
    let mut schedule = Vec::with_capacity(raw.len());
    for (index, raw) in raw.iter().enumerate() {
        // Delays are named by position: an error never shows a value.
        let nth = index + 1;
        let delay = v.parse_duration("retry.schedule", None, raw).map_err(|e| {
            v.err(
                "retry.schedule",
                None,
                format!("delay {nth}: {}", e.message),
            )
        })?;
        if delay < Duration::from_millis(1) || delay.subsec_nanos() % 1_000_000 != 0 {
            return Err(v.err(
                "retry.schedule",
                None,
                format!("delay {nth} must be whole milliseconds, at least 1ms"),
            ));
        }
        if schedule.contains(&delay) {
            return Err(v.err(
                "retry.schedule",
                None,
                format!("delay {nth} repeats an earlier one"),
            ));
        }
        if schedule.last().is_some_and(|last| *last > delay) {
            return Err(v.err("retry.schedule", None, "delays must be strictly increasing"));
        }
        schedule.push(delay);
    }
    Ok(schedule)
}

fn circuit(v: &Validator, raw: RawCircuit) -> Result<CircuitSettings, ConfigError> {
    let circuit = CircuitSettings {
        failure_threshold: v.int(
            "circuit.failure_threshold",
            None,
            raw.failure_threshold,
            1..=1_000_000,
        )?,
        cooldown: v.duration("circuit.cooldown", None, &raw.cooldown)?,
        max_cooldown: v.duration("circuit.max_cooldown", None, &raw.max_cooldown)?,
    };
    if circuit.max_cooldown < circuit.cooldown {
        return Err(v.err(
            "circuit.max_cooldown",
            None,
            "must be at least circuit.cooldown",
        ));
    }
    Ok(circuit)
}

fn admin(
    v: &Validator,
    raw: RawAdmin,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<AdminSettings, ConfigError> {
    let (listen, from) = match env("COURIER_ADMIN_LISTEN").filter(|s| !s.is_empty()) {
        Some(listen) => (listen, " (it comes from COURIER_ADMIN_LISTEN)"),
        None => (raw.listen, ""),
    };
    Ok(AdminSettings {
        listen: listen.parse().map_err(|_| {
            v.err(
                "admin.listen",
                None,
                format!("is not an address:port such as 127.0.0.1:9464{from}"),
            )
        })?,
    })
}

fn log(v: &Validator, raw: RawLog) -> Result<LogSettings, ConfigError> {
    if tracing_subscriber::EnvFilter::try_new(&raw.level).is_err() {
        return Err(v.err("log.level", None, "is not a log level or filter"));
    }
    Ok(LogSettings {
        level: raw.level,
        format: raw.format,
    })
}

/// Makes the errors of one file and checks single values.
pub(super) struct Validator<'a> {
    pub file: &'a Path,
}

impl<'a> Validator<'a> {
    pub fn new(file: &'a Path) -> Self {
        Self { file }
    }

    /// An error about `key` (of `account`, inside `[[account]]`).
    pub fn err(&self, key: &str, account: Option<&str>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            key: key.to_owned(),
            account: account.map(str::to_owned),
            message: message.into(),
        }
    }

    /// A humantime duration, zero allowed.
    pub fn parse_duration(
        &self,
        key: &str,
        account: Option<&str>,
        raw: &str,
    ) -> Result<Duration, ConfigError> {
        humantime::parse_duration(raw).map_err(|e| {
            // humantime's own message quotes the input.
            let what = match e {
                humantime::DurationError::Empty => "it is empty".to_owned(),
                humantime::DurationError::NumberOverflow => "its number is too large".to_owned(),
                humantime::DurationError::InvalidCharacter(at) => {
                    format!("an invalid character at byte {at}")
                }
                humantime::DurationError::NumberExpected(at) => {
                    format!("a number expected at byte {at}")
                }
                humantime::DurationError::UnknownUnit { start, .. } => {
                    format!("an unknown unit at byte {start}")
                }
            };
            self.err(
                key,
                account,
                format!("is not a duration like \"500ms\" or \"30s\": {what}"),
            )
        })
    }

    /// A humantime duration longer than zero.
    pub fn duration(
        &self,
        key: &str,
        account: Option<&str>,
        raw: &str,
    ) -> Result<Duration, ConfigError> {
        let duration = self.parse_duration(key, account, raw)?;
        if duration.is_zero() {
            return Err(self.err(key, account, "must be longer than zero"));
        }
        Ok(duration)
    }

    /// An integer within `range`, as the type the settings keep it in.
    pub fn int<T: TryFrom<i64>>(
        &self,
        key: &str,
        account: Option<&str>,
        value: i64,
        range: RangeInclusive<i64>,
    ) -> Result<T, ConfigError> {
        match T::try_from(value) {
            Ok(typed) if range.contains(&value) => Ok(typed),
            _ => Err(self.err(
                key,
                account,
                format!("is out of range {}..={}", range.start(), range.end()),
            )),
        }
    }

    /// Refuses a duration that would hold messages unacknowledged near the broker's
    /// consumer_timeout (docs/configuration.md, "Limits that protect the broker's
    /// consumer timeout").
    pub fn at_most(
        &self,
        key: &str,
        account: Option<&str>,
        value: Duration,
        max: Duration,
    ) -> Result<(), ConfigError> {
        if value > max {
            let message = format!(
                "may be at most {}: messages would sit unacknowledged near the broker's consumer_timeout",
                humantime::format_duration(max)
            );
            return Err(self.err(key, account, message));
        }
        Ok(())
    }

    /// An `http` or `https` URL with a host.
    pub fn url(&self, key: &str, account: &str, raw: &str) -> Result<Url, ConfigError> {
        let url = Url::parse(raw)
            .map_err(|e| self.err(key, Some(account), format!("not a valid URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(self.err(key, Some(account), "must be an http or https URL"));
        }
        if url.host().is_none() {
            return Err(self.err(key, Some(account), "the URL has no host"));
        }
        Ok(url)
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::super::DEFAULT_SIGNATURE_HEADER;
    use super::super::testing::{MINIMAL, error_of, parse_with};
    use super::*;

    #[test]
    fn the_default_prefetch_holds_a_batch_of_every_destination() {
        let accounts = |n: usize, batch: usize, contacts: bool| {
            let mut text = String::from("[broker]\nurl = \"amqp://127.0.0.1\"\n");
            for i in 0..n {
                text.push_str(&format!(
                    "[[account]]\nid = \"a{i}\"\ncompanies_url = \"https://h.example/c\"\nbatch_size = {batch}\n"
                ));
                if contacts {
                    text.push_str("contacts_url = \"https://h.example/p\"\n");
                }
            }
            parse_with(&text, &[]).unwrap().broker
        };
        let cases = [
            // (accounts, batch_size, contacts, window)
            (1, 1, false, 1000),     // at least 1,000
            (1, 200, true, 1000),    // 2 × (2 × 200) = 800
            (10, 200, true, 8000),   // 2 × 20 destinations × 200
            (20, 200, true, 16000),  // 40 destinations: the benchmark's shape
            (30, 200, true, 20000),  // at most 20,000
            (100, 200, true, 10000), // 200 destinations: shrinks in proportion
            (1000, 200, true, 2000), // 2,000 destinations: down to 2,000
            (2000, 200, true, 2000),
            (101, 1, false, 1000), // never above the window before shrinking
        ];
        for (n, batch, contacts, window) in cases {
            let broker = accounts(n, batch, contacts);
            assert_eq!(broker.prefetch, window, "{n} accounts, batch {batch}");
            assert!(!broker.prefetch_set);
        }
        let set = parse_with(
            &MINIMAL.replace("[broker]", "[broker]\nprefetch = 300"),
            &[],
        )
        .unwrap();
        assert_eq!((set.broker.prefetch, set.broker.prefetch_set), (300, true));
    }

    #[test]
    fn defaults_follow_the_contract() {
        let s = parse_with(MINIMAL, &[]).unwrap();
        assert_eq!(s.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(s.broker.prefetch, 1000);
        assert_eq!(s.broker.exchange, "record-changes");
        assert_eq!(s.broker.deliver_queue(), "courier.deliver");
        assert_eq!(s.broker.dead_queue(), "courier.dead");
        assert_eq!(s.broker.shards, 4);
        assert_eq!(s.broker.max_event_bytes, 1 << 20);
        assert_eq!(s.broker.delivery_limit, 10);
        assert_eq!(s.delivery.timeout, Duration::from_secs(10));
        assert_eq!(s.delivery.max_concurrency, 256);
        assert_eq!(s.delivery.max_inflight_per_destination, 16);
        assert_eq!(s.delivery.max_body_bytes, 5 << 20);
        assert!(!s.delivery.allow_private_networks);
        assert_eq!(s.retry.immediate_attempts, 3);
        assert_eq!(s.retry.initial_interval, Duration::from_millis(500));
        assert_eq!(s.retry.max_interval, Duration::from_secs(10));
        let schedule: Vec<_> = s
            .retry
            .schedule
            .iter()
            .map(|d| super::super::delay_name(*d))
            .collect();
        assert_eq!(schedule, ["30s", "5m", "30m", "2h", "6h", "12h"]);
        assert_eq!(s.retry.max_age, Duration::from_secs(24 * 3600));
        assert_eq!(s.circuit.failure_threshold, 5);
        assert_eq!(s.circuit.cooldown, Duration::from_secs(30));
        assert_eq!(s.circuit.max_cooldown, Duration::from_secs(600));
        assert_eq!(s.admin.listen.to_string(), "127.0.0.1:9464");
        assert_eq!(s.log.level, "info");
        assert_eq!(s.log.format, super::super::LogFormat::Text);
        let acme = &s.accounts["acme"];
        assert_eq!(acme.batch_size, 1);
        assert_eq!(acme.flush_interval, Duration::from_secs(1));
        assert_eq!(acme.signature_header.as_str(), DEFAULT_SIGNATURE_HEADER);
        assert!(acme.contacts_url.is_none());
        assert!(acme.hmac_secret.is_none());
        assert!(acme.headers.is_empty());
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
            ("colour = \"blue\"", "account.colour", Some("acme")),
            (
                "standard_webhooks_secret = \"whsec_AAAA\"",
                "account.standard_webhooks_secret",
                Some("acme"),
            ),
            (
                "standard_webhooks_secret = \"MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"",
                "account.standard_webhooks_secret",
                Some("acme"),
            ),
            (
                "standard_webhooks_secret = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\", \"whsec_!!\"]",
                "account.standard_webhooks_secret",
                Some("acme"),
            ),
            (
                "standard_webhooks_secret = []",
                "account.standard_webhooks_secret",
                Some("acme"),
            ),
            (
                "standard_webhooks_secret = 3",
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
        assert_eq!(unknown.key, "delivery.speed");
        assert!(unknown.message.contains("unknown key"), "{unknown}");
        let ordering = error_of(&format!("[delivery]\nordering = \"sorted\"\n{MINIMAL}"));
        assert_eq!(ordering.key, "delivery.ordering");
        let prefetch = error_of(&format!(
            "{}\nbatch_size = 50\n",
            MINIMAL.replace("[broker]", "[broker]\nprefetch = 10")
        ));
        assert_eq!(prefetch.key, "broker.prefetch", "{prefetch}");
    }

    #[test]
    fn bounded_integers_name_their_range() {
        let prefetch = error_of(&MINIMAL.replace("[broker]", "[broker]\nprefetch = 70000"));
        assert_eq!(prefetch.key, "broker.prefetch");
        assert_eq!(prefetch.message, "is out of range 1..=65535");
        let negative = error_of(&format!("[circuit]\nfailure_threshold = -1\n{MINIMAL}"));
        assert_eq!(negative.key, "circuit.failure_threshold");
        assert_eq!(negative.message, "is out of range 1..=1000000");
        let zero = error_of(&format!("[retry]\nmax_age = \"0s\"\n{MINIMAL}"));
        assert_eq!(zero.key, "retry.max_age");
        assert_eq!(zero.message, "must be longer than zero");
    }
}
