//! The commands besides `run`: `check`, `setup`, `publish` and `receive`.

pub mod check;
pub mod dlq;
pub mod publish;
pub mod receive;

use crate::broker::{self, BrokerError};
use crate::config::{Settings, redact_url};

/// `courier check`: a summary of a valid configuration, secrets left out.
pub fn check_summary(settings: &Settings) -> String {
    let mut out = String::new();
    let b = &settings.broker;
    out.push_str(&format!(
        "configuration {} is valid\n",
        settings.source.display()
    ));
    let nodes: Vec<&str> = b.urls.iter().map(|u| u.display.as_str()).collect();
    out.push_str(&format!(
        "broker: {} (exchange {}, prefetch {}{})\n",
        nodes.join(", "),
        b.exchange,
        b.prefetch,
        if b.prefetch_set {
            ""
        } else {
            ", the default for these accounts"
        }
    ));
    let tiers: Vec<String> = settings
        .retry
        .schedule
        .iter()
        .map(|d| b.retry_queue(*d))
        .collect();
    out.push_str(&format!(
        "queues: {}, {}, {}\n",
        b.deliver_queue(),
        b.dead_queue(),
        tiers.join(", ")
    ));
    out.push_str(&if b.per_record {
        format!(
            "ordering: per_record: {} routes to {} shard queues {}..{}, parking log {} \
             (docs/ordering.md)\n",
            b.deliver_queue(),
            b.shards,
            b.shard_queue(0),
            b.shard_queue(b.shards - 1),
            b.parking_queue()
        )
    } else {
        "ordering: none (no order across batches, retries or replicas)\n".to_owned()
    });
    out.push_str(&format!(
        "admin: http://{}/metrics\n",
        settings.admin.listen
    ));
    let mut accounts: Vec<_> = settings.accounts.values().collect();
    accounts.sort_by(|a, b| a.id.cmp(&b.id));
    out.push_str(&format!("accounts: {}\n", accounts.len()));
    for a in accounts {
        let contacts = a
            .contacts_url
            .as_ref()
            .map(redact_url)
            .unwrap_or_else(|| "(not sent)".into());
        out.push_str(&format!(
            "  {}: companies {}, contacts {}, batch_size {}, flush_interval {}, {}{}, {} custom header(s)\n",
            a.id,
            redact_url(&a.companies_url),
            contacts,
            a.batch_size,
            humantime::format_duration(a.flush_interval),
            if a.hmac_secret.is_some() { format!("signed ({})", a.signature_header) } else { "unsigned".into() },
            match a.standard_webhooks_keys.len() {
                0 => String::new(),
                1 => ", Standard Webhooks signature".into(),
                n => format!(", Standard Webhooks signature ({n} keys)"),
            },
            a.headers.len(),
        ));
    }
    out
}

/// `courier setup`: declares the topology and lists what was declared.
pub async fn setup(settings: &Settings) -> Result<String, BrokerError> {
    broker::ensure_topology(&settings.broker, &settings.retry.schedule, "courier-setup").await?;
    let names: Vec<String> =
        broker::topology::queues(&settings.broker, &settings.retry.schedule, None)
            .into_iter()
            .map(|q| q.name)
            .collect();
    Ok(format!(
        "declared exchange {} and queues {}\n",
        settings.broker.exchange,
        names.join(", ")
    ))
}
