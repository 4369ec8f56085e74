//! The real local receiver: records every request and answers as the test tells it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::event_id;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub status: u16,
    /// When the request arrived.
    pub at: std::time::Instant,
    /// Whether the answer was sent (false while a delayed answer waits).
    pub answered: bool,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The events of the body, each as the exact bytes it had in the body.
    pub fn events(&self) -> Vec<String> {
        match self.body.first() {
            Some(b'[') => serde_json::from_slice::<Vec<&serde_json::value::RawValue>>(&self.body)
                .expect("a JSON array")
                .into_iter()
                .map(|raw| raw.get().to_owned())
                .collect(),
            _ => vec![String::from_utf8(self.body.to_vec()).expect("UTF-8")],
        }
    }

    /// The ids of the body's events.
    pub fn ids(&self) -> Vec<String> {
        self.events()
            .iter()
            .map(|e| event_id(e.as_bytes()))
            .collect()
    }
}

#[derive(Default)]
struct ReceiverState {
    requests: Mutex<Vec<Recorded>>,
    /// Statuses to answer next, in order; then `status`.
    script: Mutex<VecDeque<u16>>,
    status: AtomicU16,
    retry_after: Mutex<Option<String>>,
    /// Bodies containing this text get this status.
    reject: Mutex<Option<(String, u16)>>,
    /// Bodies longer than this get this status.
    too_large: Mutex<Option<(usize, u16)>>,
    /// Every n-th request gets this status.
    every: Mutex<Option<(usize, u16)>>,
    delay: Mutex<Option<Duration>>,
    /// True while answers are held back (`hold`, `release`).
    held: tokio::sync::watch::Sender<bool>,
}

/// A real HTTP receiver on loopback that records requests and answers as told.
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    /// `http`, or `https` for `start_tls`.
    scheme: &'static str,
    /// TLS handshakes the receiver refused or that failed (`start_tls`).
    pub tls_failures: Arc<std::sync::atomic::AtomicUsize>,
    state: Arc<ReceiverState>,
    /// Stops the server when the last clone is dropped.
    _stop: Arc<tokio_util::sync::DropGuard>,
}

impl Receiver {
    /// Listens on `127.0.0.1:0`.
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0").await
    }

    /// Listens on `addr`.
    pub async fn start_on(addr: &str) -> Self {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().unwrap();
        Self::serve(listener, addr, "http", Default::default())
    }

    /// An HTTPS receiver on `127.0.0.1:0` with this TLS configuration (e.g.
    /// `TestCerts::server_config`); failed handshakes are counted in `tls_failures`.
    pub async fn start_tls(config: rustls::ServerConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().unwrap();
        let failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let counted = failures.clone();
        tokio::spawn(async move {
            while let Ok((socket, peer)) = listener.accept().await {
                let (acceptor, tx, counted) = (acceptor.clone(), tx.clone(), counted.clone());
                tokio::spawn(async move {
                    match acceptor.accept(socket).await {
                        Ok(stream) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Err(_) => {
                            counted.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        Self::serve(TlsListener { rx, addr }, addr, "https", failures)
    }

    fn serve<L>(
        listener: L,
        addr: SocketAddr,
        scheme: &'static str,
        tls_failures: Arc<std::sync::atomic::AtomicUsize>,
    ) -> Self
    where
        L: axum::serve::Listener<Addr = SocketAddr>,
    {
        let state = Arc::new(ReceiverState {
            status: AtomicU16::new(200),
            held: tokio::sync::watch::Sender::new(false),
            ..Default::default()
        });
        let stop = CancellationToken::new();
        let app = Router::new().fallback(record).with_state(state.clone());
        let token = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await
                .unwrap();
        });
        Self {
            addr,
            scheme,
            tls_failures,
            state,
            _stop: Arc::new(stop.drop_guard()),
        }
    }

    /// `http://ADDR/path` (`https://` for `start_tls`).
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.addr)
    }

    /// The status answered from now on.
    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    /// Statuses answered next, before the standing one.
    pub fn script(&self, statuses: &[u16]) {
        self.state.script.lock().unwrap().extend(statuses);
    }

    /// `Retry-After` on every answer from now on.
    pub fn set_retry_after(&self, value: Option<&str>) {
        *self.state.retry_after.lock().unwrap() = value.map(str::to_owned);
    }

    /// Waits this long before answering each request.
    pub fn set_delay(&self, delay: Duration) {
        *self.state.delay.lock().unwrap() = Some(delay);
    }

    /// Holds every answer, of requests waiting now and arriving later, until `release`.
    pub fn hold(&self) {
        self.state.held.send_replace(true);
    }

    /// Lets the held answers go.
    pub fn release(&self) {
        self.state.held.send_replace(false);
    }

    /// Answers `status` to any body longer than `max` bytes.
    pub fn reject_bodies_larger_than(&self, max: usize, status: u16) {
        *self.state.too_large.lock().unwrap() = Some((max, status));
    }

    /// Answers `status` instead of a 2xx to every `n`-th request (counting every request
    /// so far).
    pub fn fail_every(&self, n: usize, status: u16) {
        *self.state.every.lock().unwrap() = Some((n, status));
    }

    /// Answers `status` to any body that contains `needle`.
    pub fn reject_bodies_with(&self, needle: &str, status: u16) {
        *self.state.reject.lock().unwrap() = Some((needle.to_owned(), status));
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Requests that arrived and wait for their answer.
    pub fn in_flight(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| !r.answered)
            .collect()
    }

    /// Requests answered 2xx.
    pub fn accepted(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.answered && (200..300).contains(&r.status))
            .collect()
    }

    /// Ids of the events in 2xx-answered requests.
    pub fn delivered_ids(&self) -> Vec<String> {
        self.accepted().iter().flat_map(Recorded::ids).collect()
    }

    /// Waits until at least `n` events were accepted; returns how many were.
    pub async fn wait_for_events(&self, n: usize, timeout: Duration) -> usize {
        self.wait_until(n, timeout, |ids| ids.len()).await
    }

    /// Waits until at least `n` distinct event ids were accepted (after a fault, a
    /// redelivered duplicate must not stand in for an event still on its way).
    pub async fn wait_for_distinct(&self, n: usize, timeout: Duration) -> usize {
        self.wait_until(n, timeout, |ids| {
            ids.iter().collect::<std::collections::HashSet<_>>().len()
        })
        .await
    }

    async fn wait_until(
        &self,
        n: usize,
        timeout: Duration,
        count: impl Fn(&[String]) -> usize,
    ) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let got = count(&self.delivered_ids());
            if got >= n || Instant::now() >= deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn record(
    State(state): State<Arc<ReceiverState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let rejected = state
        .reject
        .lock()
        .unwrap()
        .as_ref()
        .and_then(|(needle, status)| {
            let body = String::from_utf8_lossy(&body);
            body.contains(needle.as_str()).then_some(*status)
        });
    let too_large = state
        .too_large
        .lock()
        .unwrap()
        .and_then(|(max, status)| (body.len() > max).then_some(status));
    let mut status = rejected
        .or(too_large)
        .or_else(|| state.script.lock().unwrap().pop_front())
        .unwrap_or_else(|| state.status.load(Ordering::SeqCst));
    let every = *state.every.lock().unwrap();
    // The index is taken under the lock of the push: concurrent requests must each mark
    // their own entry answered.
    let index = {
        let mut requests = state.requests.lock().unwrap();
        if let Some((n, failed)) = every
            && (requests.len() + 1).is_multiple_of(n)
            && (200..300).contains(&status)
        {
            status = failed;
        }
        requests.push(Recorded {
            path: uri.path().to_owned(),
            headers,
            body,
            status,
            at: std::time::Instant::now(),
            answered: false,
        });
        requests.len() - 1
    };
    // Recorded on arrival, answered after the delay.
    let delay = *state.delay.lock().unwrap();
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let _ = state.held.subscribe().wait_for(|held| !held).await;
    state.requests.lock().unwrap()[index].answered = true;
    let mut response = StatusCode::from_u16(status).unwrap().into_response();
    if let Some(retry_after) = state.retry_after.lock().unwrap().clone() {
        response
            .headers_mut()
            .insert("retry-after", retry_after.parse().unwrap());
    }
    response
}

/// The TLS connections of `Receiver::start_tls`, handshake done.
struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        SocketAddr,
    )>,
    addr: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The acceptor ended: wait for the graceful shutdown.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}
