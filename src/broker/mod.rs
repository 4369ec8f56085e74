//! Everything that talks AMQP: connecting (with the server version check), the topology
//! (docs/operations.md, "Broker topology"), confirmed publishing, acknowledgements by watermark,
//! and courier's own message headers.

pub mod acks;
pub mod headers;
pub mod parking;
pub mod publish;
pub mod topology;

use std::time::Duration;

use futures_util::io::{AsyncReadExt, AsyncWriteExt};
use lapin::tcp::{AMQPUriTcpExt, OwnedIdentity, OwnedTLSConfig};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};

use crate::config::BrokerUrl;

pub use publish::{PublishError, Publisher};
pub use topology::declare;

/// The oldest RabbitMQ courier runs against (quorum delivery limits, at-least-once
/// dead-lettering).
pub const MIN_VERSION: (u32, u32) = (3, 10);

/// A RabbitMQ server version (major, minor), read from its `connection.start`.
/// Declarations depend on it where the broker's defaults differ (docs/operations.md,
/// "Supported RabbitMQ versions").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion {
    pub major: u32,
    pub minor: u32,
}

impl ServerVersion {
    /// Parses a dotted version such as `3.10.8` or `4.1.0-rc.1`; `None` when it does not
    /// start with a number.
    pub fn parse(version: &str) -> Option<Self> {
        let mut parts = version
            .split(|c: char| !c.is_ascii_digit())
            .filter(|p| !p.is_empty());
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        Some(Self { major, minor })
    }

    /// RabbitMQ 4.0 and later: quorum queues get a default delivery limit, and a
    /// negative `x-delivery-limit` means unlimited.
    pub fn has_default_delivery_limit(self) -> bool {
        self.major >= 4
    }
}

impl std::fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// A broker error.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// No node of `broker.url` answered.
    #[error("cannot connect to the broker ({nodes}): {last}")]
    Connect { nodes: String, last: String },
    /// The server is older than [`MIN_VERSION`].
    #[error("RabbitMQ {version} at {node} is too old: courier needs 3.10 or newer")]
    TooOld { node: String, version: String },
    /// A queue exists with arguments other than courier's.
    #[error(
        "queue {queue} already exists with a different {argument}; the broker cannot change queue \
         arguments in place (see docs/operations.md, \"Migrating a queue\"): {detail}"
    )]
    QueueMismatch {
        queue: String,
        argument: String,
        detail: String,
    },
    /// Any other AMQP failure.
    #[error("{context}: {}", reason(.source))]
    Amqp {
        context: String,
        #[source]
        source: lapin::Error,
    },
}

impl BrokerError {
    /// Wraps a lapin error with what was being done.
    pub fn amqp(context: impl Into<String>) -> impl FnOnce(lapin::Error) -> Self {
        let context = context.into();
        move |source| BrokerError::Amqp { context, source }
    }

    /// Errors that no retry can fix: exit instead of reconnecting.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            BrokerError::TooOld { .. } | BrokerError::QueueMismatch { .. }
        )
    }
}

/// What a lapin error says, in one line: the broker's own reply (`NOT_FOUND - no queue
/// 'courier.dead' in vhost '/'`) rather than lapin's wrapping of it, and what to do about
/// a refused login: by password, or by client certificate with `?auth_mechanism=external`
/// (docs/configuration.md, "x509 authentication").
pub fn reason(error: &lapin::Error) -> String {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => {
            let text = amqp.get_message().to_string();
            if text.starts_with(
                "ACCESS_REFUSED - Login was refused using authentication mechanism EXTERNAL",
            ) {
                "the broker refused the client certificate's login (auth_mechanism=external): \
                 it needs a user named after the certificate's CN (ssl_cert_login_from = \
                 common_name) with permissions on the vhost"
                    .into()
            } else if text.starts_with("ACCESS_REFUSED - Login was refused") {
                "the broker refused the login: check the user and password of broker.url \
                 (or COURIER_AMQP_URL)"
                    .into()
            } else {
                text
            }
        }
        _ => error.to_string(),
    }
}

/// Connects to the first node that answers, after checking its version. `name` shows in
/// `rabbitmqctl list_connections`.
pub async fn connect(urls: &[BrokerUrl], name: &str) -> Result<Connection, BrokerError> {
    connect_versioned(urls, name).await.map(|(conn, _)| conn)
}

/// Connects as [`connect`] does; also returns the server's version (`None` when it does
/// not say one courier can read).
pub async fn connect_versioned(
    urls: &[BrokerUrl],
    name: &str,
) -> Result<(Connection, Option<ServerVersion>), BrokerError> {
    let mut last = String::from("no broker URL");
    for url in urls {
        match connect_one(url, name).await {
            Ok(connected) => return Ok(connected),
            Err(e) if e.is_fatal() => return Err(e),
            Err(e) => {
                let why = match e {
                    BrokerError::Connect { last, .. } => last,
                    e => e.to_string(),
                };
                if urls.len() > 1 {
                    tracing::warn!(node = %url.display, error = %why, "broker node did not answer");
                }
                last = why;
            }
        }
    }
    let nodes = urls
        .iter()
        .map(|u| u.display.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    Err(BrokerError::Connect { nodes, last })
}

/// Connects as [`connect`] does, then declares the topology for `schedule` on that
/// connection.
pub async fn connect_declared(
    broker: &crate::config::BrokerSettings,
    schedule: &[Duration],
    name: &str,
) -> Result<Connection, BrokerError> {
    let (conn, version) = connect_versioned(&broker.urls, name).await?;
    match declare(&conn, broker, schedule, version).await {
        Ok(()) => Ok(conn),
        Err(e) => {
            let _ = conn.close(200, "declaration failed".into()).await;
            Err(e)
        }
    }
}

/// Declares the topology on a short connection of its own (`courier setup`, a reload
/// that adds retry tiers).
pub async fn ensure_topology(
    broker: &crate::config::BrokerSettings,
    schedule: &[Duration],
    name: &str,
) -> Result<(), BrokerError> {
    let conn = connect_declared(broker, schedule, name).await?;
    let _ = conn.close(200, "declared".into()).await;
    Ok(())
}

async fn connect_one(
    url: &BrokerUrl,
    name: &str,
) -> Result<(Connection, Option<ServerVersion>), BrokerError> {
    let unreachable = |last: String| BrokerError::Connect {
        nodes: url.display.clone(),
        last,
    };
    let uri: AMQPUri = url
        .expose()
        .parse()
        .map_err(|e| unreachable(format!("not a valid AMQP URL: {e}")))?;
    let tls = tls_config(url);
    let version = probe_version(url, &uri, &tls).await?;
    let parsed = ServerVersion::parse(&version);
    tracing::debug!(node = %url.display, %version, "broker version");
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let runtime = lapin::runtime::default_runtime().map_err(|e| unreachable(e.to_string()))?;
    let conn = tokio::time::timeout(
        Duration::from_secs(15),
        Connection::connect_uri_with_config(uri, props, tls, runtime),
    )
    .await
    .map_err(|_| unreachable("timed out".into()))?
    .map_err(|e| unreachable(reason(&e)))?;
    Ok((conn, parsed))
}

/// The TLS settings of an `amqps` node: the system's trust store, plus `broker.ca_file`
/// and `broker.client_cert` / `client_key` when set (docs/configuration.md, "TLS").
fn tls_config(url: &BrokerUrl) -> OwnedTLSConfig {
    OwnedTLSConfig {
        cert_chain: url
            .tls
            .ca
            .as_ref()
            .map(|ca| String::from_utf8_lossy(ca.pem()).into_owned()),
        identity: url.tls.identity.as_ref().map(|id| OwnedIdentity::PKCS8 {
            pem: id.cert_pem().to_vec(),
            key: id.key_pem().to_vec(),
        }),
    }
}

/// Reads the server version from the broker's `connection.start` on a short probe
/// connection, TLS included for `amqps` (lapin does not expose the server properties),
/// and refuses a version older than [`MIN_VERSION`]. A TLS failure (unknown CA, another
/// name, a refused client certificate) shows here, with its reason, and so does a broker
/// that does not offer the login `?auth_mechanism=` asks for (docs/configuration.md,
/// "x509 authentication").
async fn probe_version(
    url: &BrokerUrl,
    uri: &AMQPUri,
    tls: &OwnedTLSConfig,
) -> Result<String, BrokerError> {
    let unreachable = |e: String| BrokerError::Connect {
        nodes: url.display.clone(),
        last: e,
    };
    let runtime = lapin::runtime::default_runtime().map_err(|e| unreachable(e.to_string()))?;
    let read = async {
        let mut stream = uri
            .connect_with_config_async(tls.as_ref(), &runtime)
            .await?;
        let mut buf = Vec::with_capacity(1024);
        if uri.scheme == lapin::uri::AMQPScheme::AMQPS {
            // With TLS 1.3 a broker that refuses the client certificate says so just
            // after the handshake; a header written before that alert is read meets a
            // reset instead, which hides the reason. A broker that accepts says nothing
            // until the header comes.
            let mut early = [0u8; 1024];
            if let Ok(read) =
                tokio::time::timeout(Duration::from_millis(250), stream.read(&mut early)).await
            {
                buf.extend_from_slice(&early[..read?]);
            }
        }
        stream.write_all(b"AMQP\x00\x00\x09\x01").await?;
        stream.flush().await?;
        loop {
            let mut chunk = [0u8; 1024];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::Error::other("the broker closed the connection"));
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(greeting) = greeting(&buf)? {
                let _ = stream.close().await;
                return Ok(greeting);
            }
        }
    };
    let Greeting {
        version,
        mechanisms,
    } = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .map_err(|_| unreachable("timed out reading the server greeting".into()))?
        .map_err(|e| unreachable(tls_reason(&e)))?;
    if let Some(missing) = unoffered_mechanism(uri, &mechanisms) {
        return Err(unreachable(missing));
    }
    if !version_at_least(&version, MIN_VERSION) {
        return Err(BrokerError::TooOld {
            node: url.display.clone(),
            version,
        });
    }
    Ok(version)
}

/// An I/O error's text with its innermost cause (rustls puts the reason there).
fn tls_reason(error: &std::io::Error) -> String {
    let mut text = error.to_string();
    let mut cause: &dyn std::error::Error = error;
    while let Some(source) = cause.source() {
        let inner = source.to_string();
        if !text.contains(&inner) {
            text = format!("{text}: {inner}");
        }
        cause = source;
    }
    text
}

/// What a broker's `connection.start` says that courier checks.
#[derive(Debug, PartialEq)]
struct Greeting {
    /// The `version` server property (`unknown` when there is none).
    version: String,
    /// The login mechanisms offered, space-separated (`PLAIN AMQPLAIN`, `EXTERNAL PLAIN`).
    mechanisms: String,
}

/// Why the broker cannot take the login the URL asks for (`?auth_mechanism=`, PLAIN
/// when unset): it does not offer that mechanism. lapin would try it anyway, and the
/// broker would close the connection without saying why. `None` when it is offered.
fn unoffered_mechanism(uri: &AMQPUri, offered: &str) -> Option<String> {
    use lapin::uri::SASLMechanism;
    let wanted = uri.query.auth_mechanism.unwrap_or_default();
    let name = wanted.name();
    if offered.split_whitespace().any(|m| m == name) {
        return None;
    }
    Some(match wanted {
        SASLMechanism::External => format!(
            "the broker does not offer x509 authentication (auth_mechanism=external) on this \
             connection, only {offered:?}: it needs the rabbitmq_auth_mechanism_ssl plugin, \
             EXTERNAL in auth_mechanisms, and an amqps listener that asks for the client \
             certificate"
        ),
        SASLMechanism::Plain => format!(
            "the broker does not offer password logins (PLAIN), only {offered:?}: to log in \
             with the client certificate add ?auth_mechanism=external to broker.url"
        ),
        _ => format!("the broker does not offer the login mechanism {name}, only {offered:?}"),
    })
}

/// The greeting in a complete `connection.start` frame in `buf`; `Ok(None)` while more
/// bytes are needed.
fn greeting(buf: &[u8]) -> std::io::Result<Option<Greeting>> {
    use amq_protocol::frame::{AMQPFrame, parse_frame};
    use amq_protocol::protocol::{AMQPClass, connection::AMQPMethod};
    use amq_protocol::types::AMQPValue;

    if buf.len() < 7 {
        return Ok(None);
    }
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    if buf.len() < 7 + size + 1 {
        return Ok(None);
    }
    let frame = parse_frame(&buf[..7 + size + 1])
        .map_err(|_| std::io::Error::other("not an AMQP 0-9-1 broker"))?
        .1;
    let AMQPFrame::Method(_, AMQPClass::Connection(AMQPMethod::Start(start))) = frame else {
        return Err(std::io::Error::other(
            "unexpected first frame from the broker",
        ));
    };
    let version = match start.server_properties.inner().get("version") {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(s)) => s.as_str().to_owned(),
        _ => String::from("unknown"),
    };
    Ok(Some(Greeting {
        version,
        mechanisms: start.mechanisms.to_string(),
    }))
}

/// Compares a dotted version with `(major, minor)`; an unparsable version passes
/// (the topology declaration then fails loudly on a broker that lacks a feature).
fn version_at_least(version: &str, min: (u32, u32)) -> bool {
    ServerVersion::parse(version).is_none_or(|v| (v.major, v.minor) >= min)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_mechanism_the_broker_does_not_offer_is_named_before_connecting() {
        let uri = |query: &str| -> AMQPUri {
            format!("amqps://127.0.0.1:5671/%2f{query}")
                .parse()
                .unwrap()
        };
        let external = uri("?auth_mechanism=external");
        assert_eq!(unoffered_mechanism(&external, "EXTERNAL PLAIN"), None);
        let why = unoffered_mechanism(&external, "PLAIN AMQPLAIN").unwrap();
        assert!(
            why.contains("rabbitmq_auth_mechanism_ssl") && why.contains("\"PLAIN AMQPLAIN\""),
            "{why}"
        );
        assert_eq!(unoffered_mechanism(&uri(""), "PLAIN AMQPLAIN"), None);
        let why = unoffered_mechanism(&uri(""), "EXTERNAL").unwrap();
        assert!(why.contains("add ?auth_mechanism=external"), "{why}");
        let why = unoffered_mechanism(&uri("?auth_mechanism=amqplain"), "PLAIN").unwrap();
        assert!(why.contains("mechanism AMQPLAIN"), "{why}");
    }

    #[test]
    fn version_comparison() {
        assert!(version_at_least("3.10.8", MIN_VERSION));
        assert!(version_at_least("3.13.0", MIN_VERSION));
        assert!(version_at_least("4.0.1", MIN_VERSION));
        assert!(!version_at_least("3.9.29", MIN_VERSION));
        assert!(!version_at_least("3.8", MIN_VERSION));
        assert!(version_at_least("unknown", MIN_VERSION));
    }

    #[test]
    fn versions_parse_with_suffixes() {
        let v = |major, minor| Some(ServerVersion { major, minor });
        assert_eq!(ServerVersion::parse("3.10.8"), v(3, 10));
        assert_eq!(ServerVersion::parse("4.1.0-rc.1"), v(4, 1));
        assert_eq!(ServerVersion::parse("4"), v(4, 0));
        assert_eq!(ServerVersion::parse("unknown"), None);
        assert!(
            !ServerVersion::parse("3.13.7")
                .unwrap()
                .has_default_delivery_limit()
        );
        assert!(
            ServerVersion::parse("4.0.0")
                .unwrap()
                .has_default_delivery_limit()
        );
    }
}
