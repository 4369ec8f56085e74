//! Test configurations: the names a test owns on the broker and the config text.

use std::path::Path;
use std::time::Duration;

use courier::config::{self, Settings};

use super::{amqp_url, eventually_async, free_port, http_get, suffix};

/// Extra lines for the sections of a test configuration.
#[derive(Default, Clone)]
pub struct ConfigSpec {
    pub broker: String,
    pub delivery: String,
    pub retry: String,
    pub top: String,
    /// `[[account]]` tables.
    pub accounts: String,
}

/// The names one test owns on the broker.
#[derive(Clone)]
pub struct Names {
    pub prefix: String,
    pub exchange: String,
}

impl Names {
    pub fn new() -> Self {
        let s = suffix();
        Self {
            prefix: format!("test-{s}"),
            exchange: format!("test-x-{s}"),
        }
    }

    pub fn deliver(&self) -> String {
        format!("{}.deliver", self.prefix)
    }

    pub fn dead(&self) -> String {
        format!("{}.dead", self.prefix)
    }
}

/// A full configuration text for `spec` on `names`.
pub fn config_text(names: &Names, spec: &ConfigSpec) -> String {
    format!(
        r#"{top}
[broker]
url = "{url}"
exchange = "{exchange}"
queue_prefix = "{prefix}"
{broker}

[delivery]
allow_private_networks = true
{delivery}

[retry]
initial_interval = "50ms"
{schedule}
{retry}

[admin]
listen = "127.0.0.1:0"

{accounts}
"#,
        top = spec.top,
        url = amqp_url(),
        exchange = names.exchange,
        prefix = names.prefix,
        broker = spec.broker,
        delivery = default_unless(&spec.delivery, "timeout", "timeout = \"2s\""),
        retry = default_unless(&spec.retry, "max_interval", "max_interval = \"200ms\""),
        schedule = if spec.retry.contains("schedule") {
            ""
        } else {
            "schedule = [\"30s\"]"
        },
        accounts = spec.accounts,
    )
}

/// `section` with `default` added unless it sets `key` itself.
fn default_unless(section: &str, key: &str, default: &str) -> String {
    if section.contains(key) {
        section.to_owned()
    } else {
        format!("{default}\n{section}")
    }
}

/// The test configuration with `broker.url` replaced by a list of nodes.
pub fn with_nodes(names: &Names, spec: &ConfigSpec, urls: &[String]) -> String {
    let text = config_text(names, spec);
    let one = format!("url = \"{}\"", amqp_url());
    assert!(text.contains(&one));
    text.replace(&one, &format!("url = {urls:?}"))
}

/// A configuration text for a courier subprocess, with its admin endpoints on a port
/// from `free_port`; returns the text and the port. (`start_courier` with `config_text`
/// needs no port chosen in advance.)
pub fn config_with_admin(names: &Names, spec: &ConfigSpec) -> (String, u16) {
    let admin = free_port();
    let text = config_text(names, spec).replace("127.0.0.1:0", &format!("127.0.0.1:{admin}"));
    (text, admin)
}

/// Waits (up to 20 s) until the courier subprocess with this admin port is ready.
pub async fn wait_ready(admin: u16) -> bool {
    eventually_async(Duration::from_secs(20), || async {
        http_get(admin, "/readyz").await.0 == 200
    })
    .await
}

/// Parses a test configuration with an empty environment: a `COURIER_*` variable set on
/// the machine must not send the worker to another broker or admin port.
pub fn settings(names: &Names, spec: &ConfigSpec) -> Settings {
    settings_with_env(names, spec, &[])
}

/// Parses a test configuration with only the environment variables `env`.
pub fn settings_with_env(names: &Names, spec: &ConfigSpec, env: &[(&str, &str)]) -> Settings {
    let text = config_text(names, spec);
    config::parse(Path::new("test.toml"), &text, &|name| {
        env.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| (*v).to_owned())
    })
    .unwrap_or_else(|e| panic!("test config invalid: {e}\n{text}"))
}
