//! One HTTP attempt and its [`Outcome`]: the shared client, the request courier sends
//! (docs/receiving.md), the classification of what came back, and the private-network
//! [`guard`] on destination addresses.

pub mod guard;

use std::borrow::Borrow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER, USER_AGENT};
use secrecy::ExposeSecret;
use url::Url;

use crate::config::{Account, ClientIdentity, DeliverySettings};

/// What one request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Any 2xx: the events are delivered.
    Delivered { status: u16 },
    /// 400, 413, 422: the receiver rejects the content.
    Rejected { status: u16 },
    /// Anything else: try again later.
    Retryable {
        /// The HTTP status, if a response came back at all.
        status: Option<u16>,
        /// Why, safe to log and to store in `x-courier-last-error`.
        error: String,
        /// From `Retry-After` on 429 or 503.
        retry_after: Option<Duration>,
    },
}

/// How a status is handled:
///
/// | status                                   | outcome     |
/// |------------------------------------------|-------------|
/// | 2xx                                      | `Delivered` |
/// | 400, 413, 422                            | `Rejected`  |
/// | 3xx (never followed), 401, 403, 404, 408, 429, other 4xx, 5xx | `Retryable` |
pub fn classify(status: StatusCode, retry_after: Option<Duration>) -> Outcome {
    let code = status.as_u16();
    if status.is_success() {
        Outcome::Delivered { status: code }
    } else if matches!(code, 400 | 413 | 422) {
        Outcome::Rejected { status: code }
    } else {
        let retry_after = if matches!(code, 429 | 503) {
            retry_after
        } else {
            None
        };
        Outcome::Retryable {
            status: Some(code),
            error: format!("HTTP {status}"),
            retry_after,
        }
    }
}

/// Parses `Retry-After`: delay-seconds or an HTTP date (a date in the past is zero).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The request body of a batch: the event itself for `batch_size = 1` (shared, not
/// copied), else a JSON array of the events as published, joined without whitespace.
pub fn encode_body<E: Borrow<Bytes>>(batch_size: usize, events: &[E]) -> Bytes {
    if let [single] = events
        && batch_size == 1
    {
        return Bytes::clone(single.borrow());
    }
    let total: usize = events.iter().map(|e| e.borrow().len()).sum::<usize>() + events.len() + 1;
    let mut body = Vec::with_capacity(total.max(2));
    body.push(b'[');
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(event.borrow());
    }
    body.push(b']');
    Bytes::from(body)
}

/// [`encode_body`], after which each event's bytes point into the body instead of a
/// copy of their own: a batch in flight or waiting holds its events once, not twice
/// (docs/design.md, "Memory"). The body lives until the last of its events is settled.
pub fn encode_body_shared(batch_size: usize, mut events: Vec<&mut Bytes>) -> Bytes {
    let body = encode_body(batch_size, &events);
    if let [single] = events.as_slice()
        && batch_size == 1
    {
        debug_assert_eq!(single.as_ptr(), body.as_ptr(), "the event is the body");
        return body;
    }
    let mut at = 1; // past `[`
    for event in &mut events {
        let len = event.len();
        debug_assert_eq!(&body[at..at + len], &event[..]);
        **event = body.slice(at..at + len);
        at += len + 1; // and the `,` or `]` after it
    }
    body
}

/// One request to send.
pub struct Request<'a> {
    pub account: &'a Account,
    pub url: &'a Url,
    pub body: Bytes,
    /// The signature header's value, if the account signs.
    pub signature: Option<&'a str>,
    pub delivery_id: &'a str,
    pub attempt: u32,
    pub event_count: usize,
}

/// The shared, pooled HTTP clients: rustls, no redirects, no proxy from the environment.
/// One client per distinct client certificate of the accounts, all built alike (the
/// private-network guard, timeouts, pool sizes, `delivery.ca_file`).
#[derive(Clone)]
pub struct Sender {
    client: reqwest::Client,
    /// The clients of accounts with `client_cert`, by identity.
    identities: Arc<HashMap<ClientIdentity, reqwest::Client>>,
    allow_private_networks: bool,
}

/// The id of a batch's set of events, the same on every attempt.
pub const DELIVERY_ID_HEADER: &str = "x-courier-delivery-id";
/// 1 on a batch's first attempt, counting up.
pub const ATTEMPT_HEADER: &str = "x-courier-attempt";
/// The number of events in the body.
pub const EVENT_COUNT_HEADER: &str = "x-courier-event-count";
/// Standard Webhooks: the delivery id again (docs/receiving.md, "Standard Webhooks").
pub const WEBHOOK_ID_HEADER: &str = "webhook-id";
/// Standard Webhooks: when this attempt was signed, Unix seconds.
pub const WEBHOOK_TIMESTAMP_HEADER: &str = "webhook-timestamp";
/// Standard Webhooks: `v1,<base64>`, one per key, space-separated.
pub const WEBHOOK_SIGNATURE_HEADER: &str = "webhook-signature";

static AGENT: &str = concat!("courier/", env!("CARGO_PKG_VERSION"));

impl Sender {
    /// Builds the clients for these settings and the client certificates of `accounts`.
    pub fn new<'a>(
        settings: &DeliverySettings,
        accounts: impl IntoIterator<Item = &'a Account>,
    ) -> Result<Self, reqwest::Error> {
        let mut identities = HashMap::new();
        for identity in accounts
            .into_iter()
            .filter_map(|a| a.client_identity.as_ref())
        {
            if !identities.contains_key(identity) {
                let client = Self::builder(settings)
                    .identity(identity.reqwest())
                    .build()?;
                identities.insert(identity.clone(), client);
            }
        }
        Ok(Self {
            client: Self::builder(settings).build()?,
            identities: Arc::new(identities),
            allow_private_networks: settings.allow_private_networks,
        })
    }

    fn builder(settings: &DeliverySettings) -> reqwest::ClientBuilder {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(5)))
            // Destinations often share a host: size the idle pool for every request in
            // flight, or connections churn (docs/performance.md).
            .pool_max_idle_per_host(settings.max_concurrency)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true);
        if !settings.allow_private_networks {
            builder = builder.dns_resolver(Arc::new(guard::GuardedResolver));
        }
        if let Some(ca) = &settings.ca {
            builder = builder.tls_certs_merge(ca.certificates());
        }
        builder
    }

    /// The client for `account`: its own when it has a client certificate.
    fn client_for(&self, account: &Account) -> &reqwest::Client {
        account
            .client_identity
            .as_ref()
            .and_then(|identity| self.identities.get(identity))
            .unwrap_or(&self.client)
    }

    /// Sends one request and classifies what came back.
    pub async fn send(&self, req: Request<'_>) -> Outcome {
        if !self.allow_private_networks
            && let Some(refused) = refuse_literal(req.url)
        {
            return Outcome::Retryable {
                status: None,
                error: refused,
                retry_after: None,
            };
        }
        let mut builder = self
            .client_for(req.account)
            .post(req.url.clone())
            .headers(req.account.headers.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(USER_AGENT, HeaderValue::from_static(AGENT))
            .header(DELIVERY_ID_HEADER, req.delivery_id)
            .header(ATTEMPT_HEADER, req.attempt)
            .header(EVENT_COUNT_HEADER, req.event_count);
        if let Some(signature) = req.signature {
            builder = builder.header(&req.account.signature_header, signature);
        }
        let keys = &req.account.standard_webhooks_keys;
        if !keys.is_empty() {
            // Signed per attempt: receivers refuse a timestamp older than a few minutes,
            // and a retry can come much later than the first attempt.
            let timestamp = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let signature = crate::sign::standard_webhooks_signature(
                keys.iter().map(|k| k.expose_secret()),
                req.delivery_id,
                timestamp,
                &req.body,
            );
            builder = builder
                .header(WEBHOOK_ID_HEADER, req.delivery_id)
                .header(WEBHOOK_TIMESTAMP_HEADER, timestamp)
                .header(WEBHOOK_SIGNATURE_HEADER, signature);
        }
        match builder.body(req.body).send().await {
            Ok(response) => {
                let retry_after = response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now()));
                let status = response.status();
                // Read a small body so the connection returns to the pool; past 64 KiB or
                // 1 s, drop it (and the connection) rather than buffer a receiver's page.
                let mut response = response;
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    let mut read = 0;
                    while let Ok(Some(chunk)) = response.chunk().await {
                        read += chunk.len();
                        if read > 64 * 1024 {
                            break;
                        }
                    }
                })
                .await;
                classify(status, retry_after)
            }
            Err(error) => Outcome::Retryable {
                status: None,
                error: describe(&error),
                retry_after: None,
            },
        }
    }
}

/// Refuses an IP-literal host that the guard does not allow.
fn refuse_literal(url: &Url) -> Option<String> {
    let ip: std::net::IpAddr = match url.host()? {
        url::Host::Ipv4(ip) => ip.into(),
        url::Host::Ipv6(ip) => ip.into(),
        url::Host::Domain(_) => return None,
    };
    let why = guard::refusal(ip)?;
    Some(guard::refused_message(
        &crate::config::redact_url(url),
        ip,
        why,
    ))
}

/// A transport error's text without its URL (paths and queries may carry tokens),
/// with the innermost cause.
fn describe(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return "timed out".into();
    }
    let kind = if error.is_connect() {
        "connection failed"
    } else if error.is_request() || error.is_body() {
        "request failed"
    } else {
        "transport error"
    };
    let mut cause: &dyn std::error::Error = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    let text = cause.to_string();
    // reqwest's own top-level text names the URL; the innermost cause does not.
    if std::ptr::addr_eq(cause, error as &dyn std::error::Error) {
        kind.to_owned()
    } else {
        format!("{kind}: {text}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_events_point_into_the_body_with_their_own_bytes() {
        let originals: Vec<Bytes> = [&b"{\"a\":1}"[..], b"{\"b\":\"\xc3\xa9\"}", b" {}"]
            .iter()
            .map(|e| Bytes::copy_from_slice(e))
            .collect();
        for (batch_size, n) in [(200, 3), (200, 1), (1, 1)] {
            let mut events = originals[..n].to_vec();
            let body = encode_body_shared(batch_size, events.iter_mut().collect());
            let expected = encode_body(batch_size, &originals[..n]);
            assert_eq!(body, expected, "batch {batch_size}, {n} events");
            let range = body.as_ptr_range();
            for (event, original) in events.iter().zip(&originals) {
                assert_eq!(event, original);
                assert!(
                    range.contains(&event.as_ptr()),
                    "batch {batch_size}: the event is not a slice of the body"
                );
            }
        }
    }

    #[test]
    fn classification_table() {
        let cases = [
            (200, "delivered"),
            (204, "delivered"),
            (299, "delivered"),
            (400, "rejected"),
            (413, "rejected"),
            (422, "rejected"),
            (301, "retryable"),
            (302, "retryable"),
            (401, "retryable"),
            (403, "retryable"),
            (404, "retryable"),
            (408, "retryable"),
            (409, "retryable"),
            (429, "retryable"),
            (500, "retryable"),
            (503, "retryable"),
        ];
        for (code, expected) in cases {
            let got = match classify(StatusCode::from_u16(code).unwrap(), None) {
                Outcome::Delivered { .. } => "delivered",
                Outcome::Rejected { .. } => "rejected",
                Outcome::Retryable { .. } => "retryable",
            };
            assert_eq!(got, expected, "status {code}");
        }
    }

    #[test]
    fn retry_after_only_on_429_and_503() {
        let two = Some(Duration::from_secs(2));
        for (code, expected) in [(429, two), (503, two), (500, None), (502, None)] {
            let Outcome::Retryable { retry_after, .. } =
                classify(StatusCode::from_u16(code).unwrap(), two)
            else {
                panic!("retryable");
            };
            assert_eq!(retry_after, expected, "status {code}");
        }
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:39 GMT", now),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:30 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn bodies_are_the_events_byte_for_byte() {
        let (a, b): (&[u8], &[u8]) = (br#"{"id":"a","n":1.0e3}"#, b"{\"id\":\"b\\u00e9\"}");
        let (ea, eb) = (Bytes::from_static(a), Bytes::from_static(b));
        assert_eq!(&encode_body(1, &[&ea])[..], a);
        assert_eq!(&encode_body(5, &[&ea])[..], [b"[", a, b"]"].concat());
        assert_eq!(
            &encode_body(5, &[&ea, &eb])[..],
            [b"[", a, b",", b, b"]"].concat()
        );
    }

    #[test]
    fn literal_hosts_are_guarded() {
        for url in [
            "http://127.0.0.1/x",
            "http://2130706433/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::1]:8080/",
        ] {
            let refused = refuse_literal(&Url::parse(url).unwrap());
            assert!(refused.is_some(), "{url}");
            assert!(!refused.unwrap().contains("/x"), "paths never appear");
        }
        assert!(refuse_literal(&Url::parse("http://8.8.8.8/").unwrap()).is_none());
        assert!(refuse_literal(&Url::parse("http://example.com/").unwrap()).is_none());
    }

    /// An account with a client certificate gets an HTTP client of its own, built like
    /// the shared one: with the guard on, a name that resolves to loopback is refused by
    /// the guard for both, before any connection; with it off, both try to connect.
    #[tokio::test]
    async fn a_client_certificate_keeps_the_private_network_guard() {
        let dir = std::env::temp_dir().join(format!("courier-http-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        crate::config::testing::self_signed(&dir, "client");
        let load = |allow: bool| {
            let text = format!(
                "[delivery]\nallow_private_networks = {allow}\n\
                 [broker]\nurl = \"amqp://127.0.0.1:5672/%2f\"\n\
                 [[account]]\nid = \"mtls\"\ncompanies_url = \"https://a.example/\"\n\
                 client_cert = \"client.pem\"\nclient_key = \"client.key\"\n\
                 [[account]]\nid = \"plain\"\ncompanies_url = \"https://b.example/\"\n"
            );
            crate::config::parse(&dir.join("courier.toml"), &text, &|_| None).expect("valid")
        };
        // Nothing listens on the discard port; only loopback is ever dialled.
        let url = Url::parse("https://localhost:9/hook").unwrap();
        for allow in [false, true] {
            let settings = load(allow);
            let sender = Sender::new(
                &settings.delivery,
                settings.accounts.values().map(|a| a.as_ref()),
            )
            .expect("clients build");
            assert_eq!(
                sender.identities.len(),
                1,
                "one client for the one certificate"
            );
            for id in ["mtls", "plain"] {
                let account = settings.accounts.get(id).unwrap();
                let request = Request {
                    account,
                    url: &url,
                    body: Bytes::from_static(b"{}"),
                    signature: None,
                    delivery_id: "d",
                    attempt: 1,
                    event_count: 1,
                };
                let Outcome::Retryable {
                    status: None,
                    error,
                    ..
                } = sender.send(request).await
                else {
                    panic!("{id}: nothing answers on localhost:9");
                };
                assert_eq!(
                    error.contains("refused by the private-network guard"),
                    !allow,
                    "{id}, allow_private_networks = {allow}: {error}"
                );
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
