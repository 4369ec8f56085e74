//! Test helpers: a real local receiver, a worker on its own random queues, publishing
//! and inspecting through a real RabbitMQ (zero2prod's `spawn_app`, Svix's receiver).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use courier::config::{self, Settings};
use courier::metrics::Metrics;
use courier::worker::Worker;

/// The broker the tests use.
pub fn amqp_url() -> String {
    std::env::var("COURIER_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A random suffix for names.
pub fn suffix() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..10)
        .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
        .collect()
}

/// Logs for `TEST_LOG=1`.
pub fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        courier::telemetry::init("debug", courier::config::LogFormat::Text);
    }
}

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

/// The `id` field of an event.
pub fn event_id(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).expect("JSON");
    v["id"].as_str().expect("an id").to_owned()
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
    delay: Mutex<Option<Duration>>,
}

/// A real HTTP receiver on loopback that records requests and answers as told.
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
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
        let state = Arc::new(ReceiverState {
            status: AtomicU16::new(200),
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
            state,
            _stop: Arc::new(stop.drop_guard()),
        }
    }

    /// `http://ADDR/path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
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

    /// Answers `status` to any body longer than `max` bytes.
    pub fn reject_bodies_larger_than(&self, max: usize, status: u16) {
        *self.state.too_large.lock().unwrap() = Some((max, status));
    }

    /// Answers `status` to any body that contains `needle`.
    pub fn reject_bodies_with(&self, needle: &str, status: u16) {
        *self.state.reject.lock().unwrap() = Some((needle.to_owned(), status));
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
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
    let status = rejected
        .or(too_large)
        .or_else(|| state.script.lock().unwrap().pop_front())
        .unwrap_or_else(|| state.status.load(Ordering::SeqCst));
    state.requests.lock().unwrap().push(Recorded {
        path: uri.path().to_owned(),
        headers,
        body,
        status,
        at: std::time::Instant::now(),
        answered: false,
    });
    let index = state.requests.lock().unwrap().len() - 1;
    // Recorded on arrival, answered after the delay.
    let delay = *state.delay.lock().unwrap();
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    state.requests.lock().unwrap()[index].answered = true;
    let mut response = StatusCode::from_u16(status).unwrap().into_response();
    if let Some(retry_after) = state.retry_after.lock().unwrap().clone() {
        response
            .headers_mut()
            .insert("retry-after", retry_after.parse().unwrap());
    }
    response
}

/// Extra lines for the sections of a test configuration.
#[derive(Default, Clone)]
pub struct ConfigSpec {
    pub broker: String,
    pub delivery: String,
    pub retry: String,
    pub top: String,
    /// `[[account]]` tables.
    pub accounts: String,
}

/// The names one test owns on the broker.
#[derive(Clone)]
pub struct Names {
    pub prefix: String,
    pub exchange: String,
}

impl Names {
    pub fn new() -> Self {
        let s = suffix();
        Self {
            prefix: format!("test-{s}"),
            exchange: format!("test-x-{s}"),
        }
    }

    pub fn deliver(&self) -> String {
        format!("{}.deliver", self.prefix)
    }

    pub fn dead(&self) -> String {
        format!("{}.dead", self.prefix)
    }
}

/// A full configuration text for `spec` on `names`.
pub fn config_text(names: &Names, spec: &ConfigSpec) -> String {
    format!(
        r#"{top}
[broker]
url = "{url}"
exchange = "{exchange}"
queue_prefix = "{prefix}"
{broker}

[delivery]
allow_private_networks = true
{delivery}

[retry]
initial_interval = "50ms"
{schedule}
{retry}

[admin]
listen = "127.0.0.1:0"

{accounts}
"#,
        top = spec.top,
        url = amqp_url(),
        exchange = names.exchange,
        prefix = names.prefix,
        broker = spec.broker,
        delivery = default_unless(&spec.delivery, "timeout", "timeout = \"2s\""),
        retry = default_unless(&spec.retry, "max_interval", "max_interval = \"200ms\""),
        schedule = if spec.retry.contains("schedule") {
            ""
        } else {
            "schedule = [\"30s\"]"
        },
        accounts = spec.accounts,
    )
}

/// `section` with `default` added unless it sets `key` itself.
fn default_unless(section: &str, key: &str, default: &str) -> String {
    if section.contains(key) {
        section.to_owned()
    } else {
        format!("{default}\n{section}")
    }
}

/// A configuration text for a courier subprocess, with its admin endpoints on a free
/// port of their own; returns the text and the port.
pub fn config_with_admin(names: &Names, spec: &ConfigSpec) -> (String, u16) {
    let admin = free_port();
    let text = config_text(names, spec).replace("127.0.0.1:0", &format!("127.0.0.1:{admin}"));
    (text, admin)
}

/// Waits (up to 20 s) until the courier subprocess with this admin port is ready.
pub async fn wait_ready(admin: u16) -> bool {
    eventually_async(Duration::from_secs(20), || async {
        http_get(admin, "/readyz").await.0 == 200
    })
    .await
}

/// Parses a test configuration with the process environment.
pub fn settings(names: &Names, spec: &ConfigSpec) -> Settings {
    let text = config_text(names, spec);
    config::parse(Path::new("test.toml"), &text, &|name| {
        std::env::var(name).ok()
    })
    .unwrap_or_else(|e| panic!("test config invalid: {e}\n{text}"))
}

/// A broker connection for the test's own publishing and inspection; deletes the test's
/// queues and exchange when dropped (even when the test panics).
pub struct Broker {
    pub names: Names,
    pub conn: Connection,
    channel: lapin::Channel,
    queues: Vec<String>,
}

impl Broker {
    pub async fn connect(names: &Names, schedule: &[&str]) -> Self {
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("broker");
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let mut queues = vec![names.deliver(), names.dead()];
        queues.extend(
            schedule
                .iter()
                .map(|d| format!("{}.retry.{d}", names.prefix)),
        );
        Self {
            names: names.clone(),
            conn,
            channel,
            queues,
        }
    }

    /// Publishes bodies to the test exchange with routing key `<account>.<type>`, confirmed.
    pub async fn publish(&self, bodies: &[Vec<u8>]) {
        self.publish_with(bodies, BasicProperties::default().with_delivery_mode(2))
            .await;
    }

    pub async fn publish_with(&self, bodies: &[Vec<u8>], properties: BasicProperties) {
        let mut confirms = Vec::with_capacity(bodies.len());
        for body in bodies {
            let key = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .map(|v| {
                    format!(
                        "{}.{}",
                        v["account"].as_str().unwrap_or("x"),
                        v["type"].as_str().unwrap_or("y")
                    )
                })
                .unwrap_or_else(|| "bad.event".into());
            let confirm = self
                .channel
                .basic_publish(
                    self.names.exchange.as_str().into(),
                    key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body,
                    properties.clone(),
                )
                .await
                .unwrap();
            confirms.push(confirm);
            if confirms.len() >= 500 {
                for c in confirms.drain(..) {
                    assert_eq!(
                        c.await.unwrap(),
                        lapin::Confirmation::Ack(None),
                        "publish not confirmed"
                    );
                }
            }
        }
        for c in confirms {
            assert_eq!(
                c.await.unwrap(),
                lapin::Confirmation::Ack(None),
                "publish not confirmed"
            );
        }
    }

    /// Publishes bodies straight into `queue` through the default exchange, confirmed.
    pub async fn publish_to_queue(&self, queue: &str, bodies: &[Vec<u8>]) {
        let mut confirms = Vec::with_capacity(bodies.len());
        for body in bodies {
            let confirm = self
                .channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap();
            confirms.push(confirm);
        }
        for c in confirms {
            assert_eq!(
                c.await.unwrap(),
                lapin::Confirmation::Ack(None),
                "publish not confirmed"
            );
        }
    }

    /// Takes every message of `queue` (acking them): body and headers.
    pub async fn drain(&self, queue: &str) -> Vec<(Vec<u8>, FieldTable)> {
        let channel = self.conn.create_channel().await.unwrap();
        let mut out = Vec::new();
        while let Some(msg) = channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            let headers = msg
                .delivery
                .properties
                .headers()
                .clone()
                .unwrap_or_default();
            msg.delivery.ack(BasicAckOptions::default()).await.unwrap();
            out.push((msg.delivery.data.clone(), headers));
        }
        out
    }

    /// Messages ready in `queue`.
    pub async fn depth(&self, queue: &str) -> u32 {
        let channel = self.conn.create_channel().await.unwrap();
        channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map(|q| q.message_count())
            .unwrap_or(0)
    }

    /// Waits until `queue` holds at least `n` messages.
    pub async fn wait_for_depth(&self, queue: &str, n: u32, timeout: Duration) -> u32 {
        let deadline = Instant::now() + timeout;
        loop {
            let depth = self.depth(queue).await;
            if depth >= n || Instant::now() >= deadline {
                return depth;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let queues = self.queues.clone();
        let exchange = self.names.exchange.clone();
        // Drop cannot await: clean up on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let Ok(conn) =
                    Connection::connect(&amqp_url(), ConnectionProperties::default()).await
                else {
                    return;
                };
                let Ok(channel) = conn.create_channel().await else {
                    return;
                };
                for q in queues {
                    let _ = channel
                        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
                let _ = channel
                    .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
                let _ = conn.close(200, "cleanup".into()).await;
            });
        })
        .join();
    }
}

/// A header's value as text or integer.
pub fn header_str(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        AMQPValue::LongInt(n) => Some(n.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// A worker running in-process on its own queues.
pub struct TestWorker {
    pub metrics: Arc<Metrics>,
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), courier::worker::RunError>>,
}

impl TestWorker {
    pub async fn spawn(settings: Settings) -> Self {
        init_logs();
        let worker = Worker::new(settings);
        let metrics = worker.metrics();
        let ready = worker.ready();
        let stop = CancellationToken::new();
        let handle = tokio::spawn(worker.run(stop.clone()));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready.load(Ordering::SeqCst) {
            assert!(!handle.is_finished(), "worker exited during start-up");
            assert!(Instant::now() < deadline, "worker not ready in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            metrics,
            stop,
            handle,
        }
    }

    /// A metric's value summed over the label sets whose rendering contains every
    /// `label="value"` of `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics.render(), name, labels)
    }

    /// Stops the worker (as SIGTERM would) and waits for it.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.handle.await.expect("worker task").expect("worker run");
    }
}

/// Sums the samples of `name` in Prometheus text that carry all `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let (metric, _) = l.split_once(' ').unwrap_or((l, ""));
            let base = metric.split('{').next().unwrap();
            base == name
                && labels
                    .iter()
                    .all(|(k, v)| metric.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// An event body.
pub fn event(id: &str, account: &str, kind: &str) -> Vec<u8> {
    format!(
        r#"{{"id":"{id}","account":"{account}","type":"{kind}","action":"created","record_id":"rec-{id}","occurred_at":"2026-11-28T10:00:00Z","record":{{"name":"Company {id}","employees":42}}}}"#
    )
    .into_bytes()
}

/// Waits until `f` holds.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// --- the binary, as a subprocess

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_courier");

pub fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("courier-it-{}", suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn write_config(text: &str) -> PathBuf {
    let path = temp_dir().join("courier.toml");
    std::fs::write(&path, text).unwrap();
    path
}

pub fn courier(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("COURIER_AMQP_URL")
        .env_remove("COURIER_ADMIN_LISTEN")
        .env_remove("RUST_LOG");
    cmd
}

pub fn output(cmd: &mut Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.stdin(Stdio::null()).output().expect("courier runs");
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn sighup(child: &Child) {
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
}

pub fn sigterm(child: &Child) {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
}

pub async fn wait_exit(child: &mut Child, timeout: Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn http_get(port: u16, path: &str) -> (u16, String) {
    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .send()
        .await;
    match response {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

pub async fn eventually_async<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
