//! `courier check`'s warnings about a valid configuration that cannot work as it stands
//! (docs/configuration.md, "Checking a configuration"): a webhook URL whose host is, or
//! now resolves to, an address the private-network guard refuses, and retry-tier queues
//! left on the broker by an older `retry.schedule`. Warnings never change the exit code:
//! the guard still decides per request, and an old tier still drains into delivery.
//!
//! Only names are resolved; no connection is made to any webhook host.

use std::net::IpAddr;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use url::{Host, Url};

use crate::broker;
use crate::config::{Settings, delay_name, redact_url};
use crate::http::guard;

/// How long a name may take to resolve, and the broker to answer.
const PATIENCE: Duration = Duration::from_secs(5);

/// Every warning for `settings`; `offline` skips name resolution and the broker.
pub async fn warnings(settings: &Settings, offline: bool) -> Vec<String> {
    let mut out = Vec::new();
    if !settings.delivery.allow_private_networks {
        let mut accounts: Vec<_> = settings.accounts.values().collect();
        accounts.sort_by(|a, b| a.id.cmp(&b.id));
        for account in accounts {
            let urls = [
                ("account.companies_url", Some(&account.companies_url)),
                ("account.contacts_url", account.contacts_url.as_ref()),
            ];
            for (key, url) in urls {
                let Some(url) = url else { continue };
                if let Some(why) = guarded(url, offline).await {
                    out.push(format!(
                        "account \"{}\": {key} ({}) {why}, which the private-network guard \
                         refuses while delivery.allow_private_networks = false: its requests \
                         will fail and retry until that changes",
                        account.id,
                        redact_url(url)
                    ));
                }
            }
        }
    }
    if !offline {
        out.extend(stale_tiers(settings).await);
    }
    out
}

/// Why the guard would refuse `url`'s host, if it would.
async fn guarded(url: &Url, offline: bool) -> Option<String> {
    let ip = |ip: IpAddr| guard::refusal(ip).map(|why| format!("is a {why} address"));
    match url.host()? {
        Host::Ipv4(v4) => ip(v4.into()),
        Host::Ipv6(v6) => ip(v6.into()),
        Host::Domain(name) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if name == "localhost" || name.ends_with(".localhost") {
                return Some("is loopback (localhost)".into());
            }
            if offline || documentation_name(&name) {
                return None;
            }
            resolved(&name, url.port_or_known_default().unwrap_or(443)).await
        }
    }
}

/// Names reserved for documentation and tests (RFC 2606, RFC 6761): never a real
/// receiver, so not worth a DNS query.
fn documentation_name(name: &str) -> bool {
    let reserved = [
        "example",
        "example.com",
        "example.net",
        "example.org",
        "test",
        "invalid",
    ];
    reserved
        .iter()
        .any(|r| name == *r || name.ends_with(&format!(".{r}")))
}

/// Resolves `name` now: the first refused address it resolves to. A name that does not
/// resolve gets no warning here: the guard judges its addresses when it does.
async fn resolved(name: &str, port: u16) -> Option<String> {
    let lookup = tokio::time::timeout(PATIENCE, tokio::net::lookup_host((name, port))).await;
    let Ok(Ok(addrs)) = lookup else {
        return None;
    };
    addrs.into_iter().find_map(|addr| {
        guard::refusal(addr.ip()).map(|why| format!("now resolves to {why} address {}", addr.ip()))
    })
}

/// Delays whose tier queues an older schedule may have left: round values in each unit,
/// and the default schedule. The broker offers no way to list queues over AMQP, so
/// these names are looked for one by one (a passive declare each).
fn candidate_delays() -> Vec<Duration> {
    let mut delays: Vec<Duration> = Vec::new();
    delays.extend((1..=9).map(|n| Duration::from_millis(n * 100)));
    delays.extend((1..=60).map(Duration::from_secs));
    delays.extend([90, 120, 300, 600, 900, 1200, 1800, 2700].map(Duration::from_secs));
    delays.extend((1..=24).map(|h| Duration::from_secs(h * 3600)));
    delays.extend((1..=7).map(|d| Duration::from_secs(d * 86_400)));
    delays.sort();
    delays.dedup();
    delays
}

/// Tier queues on the broker that are not in `retry.schedule`, with their messages; a
/// note instead when the broker cannot be reached.
async fn stale_tiers(settings: &Settings) -> Vec<String> {
    let b = &settings.broker;
    let connect = broker::connect(&b.urls, "courier check");
    let conn = match tokio::time::timeout(PATIENCE, connect).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            return vec![format!(
                "broker not reachable, tier queues not compared: {e}"
            )];
        }
        Err(_) => return vec!["broker not reachable in 5s, tier queues not compared".into()],
    };
    let current: Vec<String> = settings
        .retry
        .schedule
        .iter()
        .map(|d| b.retry_queue(*d))
        .collect();
    let mut out = Vec::new();
    for delay in candidate_delays() {
        let queue = b.retry_queue(delay);
        if current.contains(&queue) {
            continue;
        }
        // A passive declare of a missing queue closes its channel: one channel each.
        let Ok(channel) = conn.create_channel().await else {
            break;
        };
        let options = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let declared = channel
            .queue_declare(queue.as_str().into(), options, FieldTable::default())
            .await;
        if let Ok(declared) = declared {
            out.push(format!(
                "queue {queue} exists on the broker but {} is not in retry.schedule: its {} \
                 message(s) still return to delivery when due; delete it once it is empty",
                delay_name(delay),
                declared.message_count()
            ));
            let _ = channel.close(200, "done".into()).await;
        }
    }
    let _ = conn.close(200, "done".into()).await;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn why(url: &str) -> Option<String> {
        guarded(&Url::parse(url).unwrap(), false).await
    }

    #[tokio::test]
    async fn refused_hosts_are_named_without_a_connection() {
        for (url, expected) in [
            ("http://127.0.0.1:8080/x", "is a loopback address"),
            ("http://10.1.2.3/", "is a private address"),
            ("http://172.16.0.9/", "is a private address"),
            ("http://192.168.1.1/", "is a private address"),
            ("http://169.254.169.254/latest", "is a link-local address"),
            (
                "http://100.64.0.1/",
                "is a shared (carrier-grade NAT) address",
            ),
            ("http://[::1]/", "is a loopback address"),
            ("http://[fd00::1]/", "is a private (unique local) address"),
            ("http://[::ffff:10.0.0.1]/", "is a private address"),
            ("http://0x7f.1/", "is a loopback address"),
            ("http://localhost:8787/", "is loopback (localhost)"),
            ("http://api.localhost/", "is loopback (localhost)"),
        ] {
            assert_eq!(why(url).await.as_deref(), Some(expected), "{url}");
        }
        // Public addresses and documentation names (never looked up) pass.
        for url in [
            "https://203.0.114.7/",
            "https://hooks.acme.example/",
            "https://a.example.com/",
        ] {
            assert_eq!(why(url).await, None, "{url}");
        }
    }

    #[test]
    fn candidate_tiers_cover_the_default_schedule() {
        let names: Vec<String> = candidate_delays().into_iter().map(delay_name).collect();
        for name in ["30s", "5m", "30m", "2h", "6h", "12h", "1d", "90s", "500ms"] {
            assert!(names.contains(&name.to_owned()), "{name}");
        }
    }
}
