//! Reloading the configuration (SIGHUP), in one place: whether a new file may take
//! effect ([`Reloader`]), and what it changes for batches formed afterwards
//! ([`Live::reloaded`]). Open batches keep the settings they were formed under
//! (docs/configuration.md, "Reloading").

use std::sync::Arc;

use tokio::sync::{Semaphore, watch};

use super::Key;
use crate::broker;
use crate::config::{self, Settings};
use crate::event::RecordType;
use crate::http::Sender;
use crate::metrics::Metrics;

/// What batches are formed under: the settings and the clients built from them. A batch
/// keeps the one it was formed under.
pub struct Live {
    pub settings: Arc<Settings>,
    pub sender: Sender,
    /// Requests in flight, all destinations together.
    pub requests: Arc<Semaphore>,
    /// The prefetch window holds two of the largest batches: the consumer flushes at half
    /// a window (see `consume`).
    pub pipelined: bool,
}

impl Live {
    /// The clients for `settings`.
    pub fn new(settings: Arc<Settings>) -> Result<Self, reqwest::Error> {
        let sender = Sender::new(&settings.delivery, settings.accounts.values().map(|a| &**a))?;
        let requests = Arc::new(Semaphore::new(settings.delivery.max_concurrency));
        Ok(Self {
            pipelined: pipelined(&settings),
            settings,
            sender,
            requests,
        })
    }

    /// What batches formed after a reload use. An unchanged `[delivery]`, with the same
    /// client certificates, keeps the HTTP clients (their pools) and the request limit.
    /// The second value says whether the per-destination request limits must be built
    /// again.
    pub fn reloaded(&self, settings: Arc<Settings>) -> Result<(Self, bool), reqwest::Error> {
        if settings.delivery == self.settings.delivery
            && identities(&settings) == identities(&self.settings)
        {
            let live = Self {
                pipelined: pipelined(&settings),
                settings,
                sender: self.sender.clone(),
                requests: self.requests.clone(),
            };
            return Ok((live, false));
        }
        let reset = settings.delivery.max_inflight_per_destination
            != self.settings.delivery.max_inflight_per_destination;
        Ok((Self::new(settings)?, reset))
    }
}

/// The distinct client certificates of the accounts.
fn identities(settings: &Settings) -> std::collections::HashSet<&crate::config::ClientIdentity> {
    settings
        .accounts
        .values()
        .filter_map(|a| a.client_identity.as_ref())
        .collect()
}

/// The destinations of accounts in both `old` and `new` that are reached another way:
/// another receiver, or the same one with another TLS identity, so their circuits start
/// closed (docs/operations.md, "The circuit breaker"). The whole URL counts, path
/// included: a corrected path is a fix as much as a host. So do the account's client
/// certificate and key, and `delivery.ca_file` for every destination: a corrected or
/// renewed file is a fix as much as a URL.
pub fn moved_destinations(old: &Settings, new: &Settings) -> Vec<Key> {
    let mut moved = Vec::new();
    for (id, account) in &new.accounts {
        let Some(before) = old.accounts.get(id) else {
            continue;
        };
        for kind in [RecordType::Company, RecordType::Contact] {
            let key = (account.id.clone(), kind);
            let routed = account.url(kind).is_some() || before.url(kind).is_some();
            if routed && !same_destination(old, new, &key) {
                moved.push(key);
            }
        }
    }
    moved
}

/// Whether destination `key` is reached the same way under `old` and `new`: the same URL,
/// client certificate and key (as read from their files) and `delivery.ca_file`. A batch
/// formed under `old` tells nothing about the destination under `new` otherwise.
pub fn same_destination(old: &Settings, new: &Settings, key: &Key) -> bool {
    let (Some(before), Some(after)) = (old.accounts.get(&*key.0), new.accounts.get(&*key.0)) else {
        return false;
    };
    before.url(key.1) == after.url(key.1)
        && before.client_identity == after.client_identity
        && old.delivery.ca == new.delivery.ca
}

fn pipelined(settings: &Settings) -> bool {
    settings.broker.prefetch as usize >= 2 * settings.largest_batch()
}

/// Applies a new configuration file to a running worker (SIGHUP).
#[derive(Clone)]
pub struct Reloader {
    pub(super) metrics: Arc<Metrics>,
    pub(super) current: Arc<watch::Sender<Arc<Settings>>>,
}

impl Reloader {
    /// Reads the worker's configuration file again. A valid file that changes only
    /// reloadable sections takes effect for batches formed afterwards; otherwise the old
    /// configuration stays, and the error is returned, logged and counted.
    pub async fn reload(&self) -> Result<(), String> {
        let current = self.current.borrow().clone();
        match accept(&current).await {
            Ok(new) => {
                tracing::info!(config = %new.source.display(), accounts = new.accounts.len(), "configuration reloaded");
                self.metrics.config_reload(true);
                self.current.send_replace(Arc::new(new));
                Ok(())
            }
            Err(error) => {
                tracing::error!(%error, "configuration reload failed; the old configuration stays");
                self.metrics.config_reload(false);
                Err(error)
            }
        }
    }
}

/// Loads the file of `current` again and checks that it can take effect.
async fn accept(current: &Settings) -> Result<Settings, String> {
    let mut new = config::load(&current.source).map_err(|e| e.to_string())?;
    if !new.broker.prefetch_set && !current.broker.prefetch_set {
        // A derived window follows the accounts at start only: the running session
        // keeps its own (docs/configuration.md, `prefetch`).
        new.broker.prefetch = current.broker.prefetch;
    }
    if let Some(key) = config::restart_only_change(current, &new) {
        return Err(format!(
            "{}: {key} changed, which needs a restart; the reload was refused",
            new.source.display()
        ));
    }
    // Build the new HTTP client now, so a reload that cannot take effect is refused.
    Sender::new(&new.delivery, new.accounts.values().map(|a| &**a))
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    if new.retry.schedule != current.retry.schedule {
        // New tiers need their queues before anything is published to them.
        broker::ensure_topology(&new.broker, &new.retry.schedule, "courier reload")
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::testing::self_signed;

    fn settings(accounts: &str) -> Settings {
        let text = format!("[broker]\nurl = \"amqp://127.0.0.1:5672/%2f\"\n{accounts}");
        config::parse(Path::new("t.toml"), &text, &|_| None).expect("valid")
    }

    #[test]
    fn a_changed_url_moves_its_destination_only() {
        let old = settings(
            "[[account]]\nid = \"a\"\ncompanies_url = \"https://a.example/x\"\n\
             [[account]]\nid = \"b\"\ncompanies_url = \"https://b.example/\"\n\
             contacts_url = \"https://b.example/c\"\n",
        );
        let new = settings(
            "[[account]]\nid = \"a\"\ncompanies_url = \"https://a.example/y\"\n\
             [[account]]\nid = \"b\"\ncompanies_url = \"https://b.example/\"\n\
             [[account]]\nid = \"c\"\ncompanies_url = \"https://c.example/\"\n",
        );
        let mut moved = moved_destinations(&old, &new);
        moved.sort();
        let key = |id: &str, kind| (Arc::<str>::from(id), kind);
        assert_eq!(
            moved,
            vec![key("a", RecordType::Company), key("b", RecordType::Contact)]
        );
        assert!(moved_destinations(&new, &new).is_empty());
    }

    #[test]
    fn a_changed_client_certificate_or_ca_file_moves_its_destinations() {
        let dir = std::env::temp_dir().join(format!("courier-reload-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        self_signed(&dir, "one");
        self_signed(&dir, "two");
        // Files named relative to the configuration file, read anew by each parse.
        let load = |delivery: &str, identity: &str| {
            let text = format!(
                "[delivery]\n{delivery}\n[broker]\nurl = \"amqp://127.0.0.1:5672/%2f\"\n\
                 [[account]]\nid = \"a\"\ncompanies_url = \"https://a.example/\"\n\
                 contacts_url = \"https://a.example/c\"\n{identity}\n\
                 [[account]]\nid = \"b\"\ncompanies_url = \"https://b.example/\"\n"
            );
            config::parse(&dir.join("courier.toml"), &text, &|_| None).expect("valid")
        };
        let identity =
            |stem: &str| format!("client_cert = \"{stem}.pem\"\nclient_key = \"{stem}.key\"");
        let key = |id: &str, kind| (Arc::<str>::from(id), kind);
        let moved = |old: &Settings, new: &Settings| {
            let mut moved = moved_destinations(old, new);
            moved.sort();
            moved
        };
        let both_of_a = vec![key("a", RecordType::Company), key("a", RecordType::Contact)];

        // The same files read again: nothing moved.
        let before = load("", &identity("one"));
        assert!(moved(&before, &load("", &identity("one"))).is_empty());
        // A client certificate added, replaced or removed: that account's destinations.
        assert_eq!(moved(&load("", ""), &before), both_of_a);
        assert_eq!(moved(&before, &load("", &identity("two"))), both_of_a);
        assert_eq!(moved(&before, &load("", "")), both_of_a);
        // Same paths, new contents (a renewed certificate): moved too.
        std::fs::copy(dir.join("two.pem"), dir.join("one.pem")).unwrap();
        std::fs::copy(dir.join("two.key"), dir.join("one.key")).unwrap();
        assert_eq!(moved(&before, &load("", &identity("one"))), both_of_a);

        // delivery.ca_file added, changed or removed: every destination.
        let every = vec![
            key("a", RecordType::Company),
            key("a", RecordType::Contact),
            key("b", RecordType::Company),
        ];
        let (ca_one, ca_two) = ("ca_file = \"one.pem\"", "ca_file = \"two.pem\"");
        assert_eq!(moved(&load("", ""), &load(ca_two, "")), every);
        // The same certificates at another path: not moved.
        std::fs::copy(dir.join("two.pem"), dir.join("three.pem")).unwrap();
        assert!(moved(&load(ca_two, ""), &load("ca_file = \"three.pem\"", "")).is_empty());
        self_signed(&dir, "one");
        assert_eq!(moved(&load(ca_one, ""), &load(ca_two, "")), every);
        assert_eq!(moved(&load(ca_one, ""), &load("", "")), every);

        // A batch formed under the old file is not the destination's any more.
        let (old, new) = (load("", ""), load("", &identity("two")));
        assert!(!same_destination(
            &old,
            &new,
            &key("a", RecordType::Company)
        ));
        assert!(same_destination(&old, &new, &key("b", RecordType::Company)));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
