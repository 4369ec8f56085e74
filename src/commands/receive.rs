//! `courier receive`: a local receiver for trying a setup. Accepts POST on any path,
//! verifies the signature when given a secret for the path (200 or 401), answers 413 to
//! a body over `--max-body`, prints one line per request and, with `--save DIR`, keeps
//! each request's headers and body (docs/receiving.md, "Trying it out").

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use tokio_util::sync::CancellationToken;

use crate::sign;

struct ReceiveState {
    secrets: Secrets,
    header: String,
    max_body: usize,
    save: Option<PathBuf>,
    /// Requests received: numbers the saved files.
    seen: AtomicU64,
}

/// Which secret verifies a request: that of the longest `--secret PATH=SECRET` prefix
/// of its path, else the plain `--secret SECRET`; with neither, it is not checked.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    default: Option<String>,
    by_path: Vec<(String, String)>,
}

impl Secrets {
    /// Reads `--secret` values: `SECRET`, or `/PREFIX=SECRET` (a value that starts with
    /// `/` and holds `=`). At most one plain secret, and one per prefix.
    pub fn parse(values: &[String]) -> Result<Self, String> {
        let mut secrets = Self::default();
        for value in values {
            match value.split_once('=').filter(|_| value.starts_with('/')) {
                Some((prefix, secret)) => {
                    if secrets.by_path.iter().any(|(p, _)| p == prefix) {
                        return Err(format!("--secret: the path prefix {prefix} is given twice"));
                    }
                    secrets.by_path.push((prefix.to_owned(), secret.to_owned()));
                }
                None if secrets.default.is_some() => {
                    return Err(
                        "--secret: more than one secret without a path (use PATH=SECRET for the others)"
                            .into(),
                    );
                }
                None => secrets.default = Some(value.clone()),
            }
        }
        Ok(secrets)
    }

    /// Whether any request is checked.
    pub fn any(&self) -> bool {
        self.default.is_some() || !self.by_path.is_empty()
    }

    /// The secret for a request to `path`.
    fn for_path(&self, path: &str) -> Option<&str> {
        self.by_path
            .iter()
            .filter(|(prefix, _)| path.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, secret)| secret.as_str())
            .or(self.default.as_deref())
    }
}

/// The default of `--max-body`: the default `delivery.max_body_bytes`, so that a batch
/// courier sends is never refused for its size.
pub const DEFAULT_MAX_BODY: usize = 5 << 20;

/// How `courier receive` answers.
pub struct ReceiveOptions {
    /// Verify signatures with these secrets.
    pub secrets: Secrets,
    /// The signature header.
    pub header: String,
    /// The largest body accepted, in bytes; a larger one is answered 413.
    pub max_body: usize,
    /// Keep each request's headers and body in this directory.
    pub save: Option<PathBuf>,
}

/// Serves until `stop` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    options: ReceiveOptions,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let state = Arc::new(ReceiveState {
        secrets: options.secrets,
        header: options.header.to_ascii_lowercase(),
        max_body: options.max_body,
        save: options.save,
        seen: AtomicU64::new(0),
    });
    let app = Router::new()
        .fallback(handle)
        .layer(DefaultBodyLimit::max(options.max_body))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

/// Binds `listen` and serves. The first line printed names the address bound.
pub async fn run(
    listen: SocketAddr,
    options: ReceiveOptions,
    stop: CancellationToken,
) -> std::io::Result<()> {
    if let Some(dir) = &options.save {
        std::fs::create_dir_all(dir)?;
    }
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!(
        "courier receive: listening on http://{} ({}{})",
        listener.local_addr()?,
        if options.secrets.any() {
            "verifying signatures"
        } else {
            "signatures not checked"
        },
        match &options.save {
            Some(dir) => format!(", saving requests in {}", dir.display()),
            None => String::new(),
        }
    );
    serve(listener, options, stop).await
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
}

async fn handle(
    State(state): State<Arc<ReceiveState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> StatusCode {
    if method != Method::POST {
        return StatusCode::METHOD_NOT_ALLOWED;
    }
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            let status = rejection.status();
            let why = if status == StatusCode::PAYLOAD_TOO_LARGE {
                format!("over the --max-body limit of {} bytes", state.max_body)
            } else {
                "the body could not be read".to_owned()
            };
            println!("POST {} {} {why}", uri.path(), status.as_u16());
            return status;
        }
    };
    let (status, sig) = match state.secrets.for_path(uri.path()) {
        None => (StatusCode::OK, "unchecked"),
        Some(secret) => {
            let given = headers
                .get(&state.header)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if sign::verify(secret.as_bytes(), &body, given) {
                (StatusCode::OK, "ok")
            } else {
                (StatusCode::UNAUTHORIZED, "bad")
            }
        }
    };
    let events = match body.first() {
        Some(b'[') => serde_json::from_slice::<Vec<serde::de::IgnoredAny>>(&body)
            .map(|v| v.len())
            .unwrap_or(0),
        Some(_) => 1,
        None => 0,
    };
    let number = state.seen.fetch_add(1, Ordering::Relaxed) + 1;
    let saved = match &state.save {
        Some(dir) => match save(dir, number, &uri, &headers, &body) {
            Ok(name) => format!(" saved={name}"),
            Err(e) => format!(" saved=failed ({e})"),
        },
        None => String::new(),
    };
    println!(
        "POST {} {} events={} bytes={} sig={} delivery={} attempt={}{saved}",
        uri.path(),
        status.as_u16(),
        events,
        body.len(),
        sig,
        header(&headers, "x-courier-delivery-id"),
        header(&headers, "x-courier-attempt"),
    );
    status
}

/// Writes `DIR/NNNNNN.body` (the bytes as received) and `DIR/NNNNNN.headers` (the
/// request line, then one `name: value` line per header); returns `NNNNNN`.
fn save(
    dir: &std::path::Path,
    number: u64,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> std::io::Result<String> {
    let name = format!("{number:06}");
    std::fs::write(dir.join(format!("{name}.body")), body)?;
    let mut text = format!("POST {uri}\n");
    for (key, value) in headers {
        text.push_str(&format!(
            "{key}: {}\n",
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    std::fs::write(dir.join(format!("{name}.headers")), text)?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_path_prefix_picks_the_secret() {
        let values = ["S1", "/globex/=S2", "/globex/contacts=S3"].map(String::from);
        let secrets = Secrets::parse(&values).unwrap();
        assert_eq!(secrets.for_path("/acme/companies"), Some("S1"));
        assert_eq!(secrets.for_path("/globex/companies"), Some("S2"));
        assert_eq!(secrets.for_path("/globex/contacts"), Some("S3"));
        let only = Secrets::parse(&["/globex/=S2".to_owned()]).unwrap();
        assert_eq!(only.for_path("/acme/"), None, "not checked");
        assert!(Secrets::parse(&["a".into(), "b".into()]).is_err());
        assert!(Secrets::parse(&["/x=a".into(), "/x=b".into()]).is_err());
        assert!(!Secrets::parse(&[]).unwrap().any());
    }
}
