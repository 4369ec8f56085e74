//! `courier publish`: NDJSON events in file order, publisher-confirmed, routing key
//! `<account>.<type>`. Every line is validated first; an invalid line stops the whole
//! file unless `--skip-invalid`. When the connection breaks (its node stopped), the
//! lines not yet confirmed are published again through the next node of `broker.url`
//! that answers.

use std::collections::VecDeque;
use std::io::BufRead;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::BasicProperties;

use crate::broker::publish::Confirm;
use crate::broker::{BrokerError, PublishError, Publisher};
use crate::config::Settings;
use crate::event;

/// Confirms awaited at once: enough to keep the broker busy, bounded in memory.
const CONFIRM_WINDOW: usize = 512;

/// Failed publishes in a row, without a confirm between them, that are tried again: a
/// node that stops mid-run is left for the next node of `broker.url` and its queues'
/// new leaders are waited for (about 30 s in all, docs/scaling.md); a broker that stays
/// away ends the run.
const RETRIES: usize = 17;
const RETRY_BACKOFF: Duration = Duration::from_millis(250);
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(2);

/// The waits before those publishes again: 0.25 s doubling to 2 s, [`RETRIES`] of them.
fn retry_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(RETRY_BACKOFF)
        .with_max_delay(MAX_RETRY_BACKOFF)
        .with_max_times(RETRIES)
        .build()
}

/// Why `courier publish` failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishFileError {
    #[error("cannot read the input: {0}")]
    Read(#[from] std::io::Error),
    #[error("{count} invalid line(s), nothing published:\n{report}")]
    Invalid { count: usize, report: String },
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(
        "no queue is bound to exchange {exchange} for event on line {line} (routing key \
         {routing_key}), so nothing was published from there on: run `courier setup` once to \
         declare courier's queues"
    )]
    Unroutable {
        exchange: String,
        line: usize,
        routing_key: String,
    },
    #[error(
        "the broker did not take event on line {line}: {source}; is the topology declared? run `courier setup`"
    )]
    NotConfirmed {
        line: usize,
        #[source]
        source: PublishError,
    },
}

/// What a publish run did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub published: usize,
    pub skipped: usize,
    /// `line N: reason` for each skipped line.
    pub report: Vec<String>,
}

struct Line {
    number: usize,
    routing_key: String,
    body: Vec<u8>,
}

/// Reads and validates every line.
fn read_lines(
    input: impl BufRead,
    max_bytes: usize,
) -> Result<(Vec<Line>, Vec<String>), std::io::Error> {
    let mut lines = Vec::new();
    let mut invalid = Vec::new();
    for (index, line) in input.split(b'\n').enumerate() {
        let mut body = line?;
        if body.last() == Some(&b'\r') {
            body.pop();
        }
        if body.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let number = index + 1;
        match event::parse(&body, max_bytes) {
            Ok(e) => {
                let routing_key = format!("{}.{}", e.account, e.kind);
                lines.push(Line {
                    number,
                    routing_key,
                    body,
                });
            }
            Err(reason) => invalid.push(format!("line {number}: {reason}")),
        }
    }
    Ok((lines, invalid))
}

/// Publishes `input` to the configured exchange.
pub async fn publish(
    settings: &Settings,
    input: impl BufRead,
    skip_invalid: bool,
) -> Result<Summary, PublishFileError> {
    let (lines, invalid) = read_lines(input, settings.broker.max_event_bytes)?;
    if !invalid.is_empty() && !skip_invalid {
        return Err(PublishFileError::Invalid {
            count: invalid.len(),
            report: invalid.join("\n"),
        });
    }
    let publisher = Publisher::connect(&settings.broker.urls, "courier-publish-cli").await?;
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    let exchange = settings.broker.exchange.as_str();
    let not_confirmed = |line: usize| {
        let routing_key = lines
            .iter()
            .find(|l| l.number == line)
            .map(|l| l.routing_key.clone())
            .unwrap_or_default();
        move |source| match source {
            PublishError::Returned(_) => PublishFileError::Unroutable {
                exchange: exchange.to_owned(),
                line,
                routing_key,
            },
            source => PublishFileError::NotConfirmed { line, source },
        }
    };
    // Confirms come back in publish order: `lines[..published]` are confirmed and
    // `pending` holds the lines after them that were sent. A send that fails while
    // confirms are pending waits for them (`held`): the broker's reason (a missing
    // exchange, a lost connection) comes back with the oldest.
    let mut pending: VecDeque<(usize, Confirm)> = VecDeque::with_capacity(CONFIRM_WINDOW);
    let mut held: Option<(usize, PublishError)> = None;
    let mut next = 0;
    let mut published = 0;
    let mut backoff = retry_backoff();
    // Whether a publish failed since the last confirm (the backoff then starts again).
    let mut failing = false;
    while published < lines.len() {
        let must_wait = held.is_some() || next == lines.len() || pending.len() >= CONFIRM_WINDOW;
        let failed = if must_wait && let Some((index, confirm)) = pending.pop_front() {
            match confirm.wait().await {
                Ok(()) => {
                    published += 1;
                    if failing {
                        backoff = retry_backoff();
                        failing = false;
                    }
                    None
                }
                Err(e) => Some((index, e)),
            }
        } else if let Some(failed) = held.take() {
            Some(failed)
        } else {
            let line = &lines[next];
            match publisher
                .send(exchange, &line.routing_key, &line.body, properties.clone())
                .await
            {
                Ok(confirm) => {
                    pending.push_back((next, confirm));
                    next += 1;
                    None
                }
                Err(e) if pending.is_empty() => Some((next, e)),
                Err(e) => {
                    held = Some((next, e));
                    None
                }
            }
        };
        let Some((index, e)) = failed else {
            continue;
        };
        let Some(delay) = backoff.next().filter(|_| e.is_transient()) else {
            return Err(not_confirmed(lines[index].number)(e));
        };
        failing = true;
        // The connection broke (its node stopped), or the broker refused a message (a
        // quorum queue electing a new leader): publish again from the oldest line not
        // confirmed, on the next node that answers if the connection is gone. The broker
        // may hold some of those already: duplicates, never a loss (docs/scaling.md).
        tracing::warn!(
            line = lines[index].number,
            error = %e,
            retry_in = ?delay,
            "publish failed; publishing again from line {}",
            lines[published].number
        );
        held = None;
        pending.clear();
        next = published;
        tokio::time::sleep(delay).await;
    }
    publisher.close().await;
    Ok(Summary {
        published,
        skipped: invalid.len(),
        report: invalid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_lines_are_reported_by_number() {
        let input = concat!(
            r#"{"id":"1","account":"a","type":"company","action":"created","record_id":"r","record":{}}"#,
            "\n\nnot json\n",
            r#"{"id":"2","account":"a","type":"contact","action":"updated","record_id":"r","record":{}}"#,
            "\r\n",
            r#"{"id":"3","account":"a","type":"company","action":"deleted","record_id":"r","record":{}}"#,
        );
        let (lines, invalid) = read_lines(input.as_bytes(), 1 << 20).unwrap();
        assert_eq!(
            lines.iter().map(|l| l.number).collect::<Vec<_>>(),
            vec![1, 4]
        );
        assert_eq!(lines[1].routing_key, "a.contact");
        assert!(!lines[1].body.ends_with(b"\r"));
        assert_eq!(invalid.len(), 2);
        assert!(invalid[0].starts_with("line 3: "), "{invalid:?}");
        assert!(
            invalid[1].starts_with("line 5: ") && invalid[1].contains("action"),
            "{invalid:?}"
        );
    }
}
