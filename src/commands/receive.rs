//! `courier receive`: a local receiver for trying a setup. Accepts POST on any path,
//! verifies the signature when given a secret (200 or 401), prints one line per request.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use tokio_util::sync::CancellationToken;

use crate::sign;

struct ReceiveState {
    secret: Option<String>,
    header: String,
}

/// Serves until `stop` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    secret: Option<String>,
    header: String,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let state = Arc::new(ReceiveState {
        secret,
        header: header.to_ascii_lowercase(),
    });
    let app = Router::new().fallback(handle).with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

/// Binds `listen` and serves.
pub async fn run(
    listen: SocketAddr,
    secret: Option<String>,
    header: String,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!(
        "courier receive: listening on http://{} ({})",
        listener.local_addr()?,
        if secret.is_some() {
            "verifying signatures"
        } else {
            "signatures not checked"
        }
    );
    serve(listener, secret, header, stop).await
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
    body: Bytes,
) -> StatusCode {
    if method != Method::POST {
        return StatusCode::METHOD_NOT_ALLOWED;
    }
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
