//! `courier receive`: a local receiver for trying a setup. Accepts POST on any path,
//! verifies the signature when given a secret (200 or 401), answers 413 to a body over
//! `--max-body`, prints one line per request (docs/operations.md).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use tokio_util::sync::CancellationToken;

use crate::sign;

struct ReceiveState {
    secret: Option<String>,
    header: String,
    max_body: usize,
}

/// The default of `--max-body`: the default `delivery.max_body_bytes`, so that a batch
/// courier sends is never refused for its size.
pub const DEFAULT_MAX_BODY: usize = 5 << 20;

/// How `courier receive` answers.
pub struct ReceiveOptions {
    /// Verify signatures with this secret.
    pub secret: Option<String>,
    /// The signature header.
    pub header: String,
    /// The largest body accepted, in bytes; a larger one is answered 413.
    pub max_body: usize,
}

/// Serves until `stop` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    options: ReceiveOptions,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let state = Arc::new(ReceiveState {
        secret: options.secret,
        header: options.header.to_ascii_lowercase(),
        max_body: options.max_body,
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
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!(
        "courier receive: listening on http://{} ({})",
        listener.local_addr()?,
        if options.secret.is_some() {
            "verifying signatures"
        } else {
            "signatures not checked"
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
    let (status, sig) = match &state.secret {
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
    println!(
        "POST {} {} events={} bytes={} sig={} delivery={} attempt={}",
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
