//! A private RabbitMQ node for tests that stop or block a broker (the shared one is never
//! stopped or blocked), and `rabbitmqctl` inspection of any node: connections by name,
//! unacked counts.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use courier::config::Settings;

use super::{
    ConfigSpec, Names, TestCerts, amqp_url, config_with_admin, eventually_async, free_port, suffix,
};

/// A RabbitMQ node of the test's own, on ports no other test uses; stopped and removed
/// when dropped, even when the test panics.
pub struct PrivateNode {
    /// The Erlang node name, for `rabbitmqctl -n`.
    pub name: String,
    pub port: u16,
    /// The TLS listener's port (`prepare_tls`), on 127.0.0.1 and 127.0.0.2.
    pub tls_port: Option<u16>,
    dist: u16,
    dir: PathBuf,
}

impl PrivateNode {
    /// Starts the node and waits until it accepts connections (a few seconds).
    pub async fn start() -> Self {
        let node = Self::prepare();
        node.boot().await;
        node
    }

    /// A node with its directory, name and ports, not started yet (`boot` starts it):
    /// for a worker that starts before its broker.
    pub fn prepare() -> Self {
        Self::prepare_with(None)
    }

    /// A node as `prepare` makes it, with a TLS listener too: its certificate is
    /// `certs`' `server` (127.0.0.1 and localhost), and a client must present a
    /// certificate signed by their CA. Clients log in with a password (PLAIN) or with
    /// their certificate (EXTERNAL, the `rabbitmq_auth_mechanism_ssl` plugin) as the user
    /// named by its CN (`add_certificate_user`): the setup docs/configuration.md ("x509
    /// authentication") describes.
    pub fn prepare_tls(certs: &TestCerts) -> Self {
        Self::prepare_with(Some(certs))
    }

    fn prepare_with(certs: Option<&TestCerts>) -> Self {
        let dir = std::env::temp_dir().join(format!("courier-node-{}", suffix()));
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let (port, dist) = (free_port(), free_port());
        let plugins = if certs.is_some() {
            "[rabbitmq_auth_mechanism_ssl].\n"
        } else {
            "[].\n"
        };
        std::fs::write(dir.join("enabled_plugins"), plugins).unwrap();
        let mut conf = format!("listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n");
        let tls_port = certs.map(|certs| {
            let tls_port = free_port();
            // The server script runs as the rabbitmq user: it reads copies in `dir`.
            for file in ["ca.pem", "server.pem", "server.key"] {
                std::fs::copy(certs.path(file), dir.join(file)).unwrap();
            }
            let file = |name: &str| dir.join(name).to_str().unwrap().to_owned();
            conf.push_str(&format!(
                "listeners.ssl.1 = 127.0.0.1:{tls_port}\n\
                 listeners.ssl.2 = 127.0.0.2:{tls_port}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_peer\n\
                 ssl_options.fail_if_no_peer_cert = true\n\
                 auth_mechanisms.1 = EXTERNAL\n\
                 auth_mechanisms.2 = PLAIN\n\
                 ssl_cert_login_from = common_name\n",
                file("ca.pem"),
                file("server.pem"),
                file("server.key"),
            ));
            tls_port
        });
        std::fs::write(dir.join("rabbitmq.conf"), conf).unwrap();
        // A quorum queue's dead-letter worker sends again the forwards that failed after
        // this long; RabbitMQ's default of 3 min is longer than a test waits
        // (docs/scaling.md, "Retries held after a node loss").
        std::fs::write(
            dir.join("advanced.config"),
            "[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, 15000}]}].\n",
        )
        .unwrap();
        let node = Self {
            name: format!("courier-it-{}@localhost", suffix()),
            port,
            tls_port,
            dist,
            dir,
        };
        node.stop_when_the_test_process_ends();
        node
    }

    /// Starts the prepared (or stopped) node, with the messages of its durable queues,
    /// and waits until it accepts connections.
    pub async fn boot(&self) {
        // The server script runs as the rabbitmq user.
        let owned = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&self.dir)
            .status()
            .expect("chown");
        assert!(
            owned.success(),
            "cannot hand {:?} to the rabbitmq user",
            self.dir
        );
        let started = tokio::process::Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env("RABBITMQ_PID_FILE", self.dir.join("pid"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                self.dir.join("advanced.config"),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .expect("rabbitmq-server");
        assert!(started.success(), "rabbitmq-server -detached failed");
        let pid = self.dir.join("pid");
        let waited = self
            .ctl(&["wait", pid.to_str().unwrap(), "--timeout", "60"])
            .await;
        assert!(waited, "private node {} did not start", self.name);
    }

    /// A watchdog in a session of its own stops the node once this process is gone, for
    /// when the test is killed before `Drop` can run (a timeout in the test runner).
    fn stop_when_the_test_process_ends(&self) {
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; rabbitmqctl -n {name} stop; rm -rf {dir}",
            pid = std::process::id(),
            name = self.name,
            dir = self.dir.display(),
        );
        let watchdog = Command::new("setsid")
            .args(["--fork", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("setsid");
        assert!(watchdog.success(), "no watchdog for {}", self.name);
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `amqps://guest:guest@HOST:TLS_PORT/%2f` (`prepare_tls`).
    pub fn tls_url(&self, host: &str) -> String {
        let port = self.tls_port.expect("a node prepared with TLS");
        format!("amqps://guest:guest@{host}:{port}/%2f")
    }

    /// `amqps://HOST:TLS_PORT/%2f?auth_mechanism=external` (`prepare_tls`): no user or
    /// password, the client certificate logs in.
    pub fn external_url(&self, host: &str) -> String {
        let port = self.tls_port.expect("a node prepared with TLS");
        format!("amqps://{host}:{port}/%2f?auth_mechanism=external")
    }

    /// Adds the user `name` without a password and with every permission on `/`, for a
    /// client certificate whose CN is `name` (`prepare_tls`).
    pub async fn add_certificate_user(&self, name: &str) {
        let node = Some(self.name.as_str());
        rabbitmqctl(node, &["add_user", name, &format!("unused-{}", suffix())]).await;
        rabbitmqctl(node, &["clear_password", name]).await;
        rabbitmqctl(
            node,
            &["set_permissions", "-p", "/", name, ".*", ".*", ".*"],
        )
        .await;
    }

    /// The user and the authentication mechanism of each of the node's connections, e.g.
    /// `("courier-client", "EXTERNAL")`.
    pub async fn connection_logins(&self) -> Vec<(String, String)> {
        let listing = rabbitmqctl(
            Some(&self.name),
            &[
                "list_connections",
                "-q",
                "--no-table-headers",
                "user",
                "auth_mechanism",
            ],
        )
        .await;
        listing
            .lines()
            .filter_map(|line| {
                let (user, mechanism) = line.split_once('\t')?;
                Some((user.trim().to_owned(), mechanism.trim().to_owned()))
            })
            .collect()
    }

    /// The test's configuration with this node as the only broker, and its admin port.
    pub fn settings(&self, names: &Names, spec: &ConfigSpec) -> (Settings, u16) {
        let (text, admin) = config_with_admin(names, spec);
        let text = text.replace(&amqp_url(), &self.url());
        let settings = courier::config::parse(std::path::Path::new("test.toml"), &text, &|_| None)
            .unwrap_or_else(|e| panic!("test config invalid: {e}\n{text}"));
        (settings, admin)
    }

    /// Stops the node (the test's connections to it break).
    pub async fn stop(&self) {
        assert!(self.ctl(&["stop"]).await, "cannot stop {}", self.name);
    }

    /// Makes this (running, fresh) node a member of `seed`'s cluster.
    pub async fn join(&self, seed: &PrivateNode) {
        for args in [
            &["stop_app"][..],
            &["join_cluster", &seed.name][..],
            &["start_app"][..],
        ] {
            assert!(
                self.ctl(args).await,
                "{}: rabbitmqctl {args:?} failed",
                self.name
            );
        }
    }

    /// `rabbitmqctl -n NODE list_queues name COLUMN`: the column's value for `queue`.
    pub async fn queue_info(&self, queue: &str, column: &str) -> Option<String> {
        let listing = rabbitmqctl(
            Some(&self.name),
            &["list_queues", "-q", "--no-table-headers", "name", column],
        )
        .await;
        listing.lines().find_map(|line| {
            let (name, value) = line.split_once('\t')?;
            (name == queue).then(|| value.trim().to_owned())
        })
    }

    /// Sets the node's memory high watermark, a fraction of the machine's memory: a tiny
    /// one (`0.0000001`) raises the memory alarm, which blocks every connection that
    /// publishes; `0.4`, the default, lifts it.
    pub async fn set_memory_watermark(&self, fraction: &str) {
        assert!(
            self.ctl(&["set_vm_memory_high_watermark", fraction]).await,
            "cannot set the memory watermark of {}",
            self.name
        );
    }

    /// How many of the node's connections an alarm holds blocked (state `blocked` or
    /// `blocking`).
    pub async fn blocked_connections(&self) -> usize {
        let listing = rabbitmqctl(
            Some(&self.name),
            &["list_connections", "-q", "--no-table-headers", "state"],
        )
        .await;
        listing
            .lines()
            .filter(|state| matches!(state.trim(), "blocked" | "blocking"))
            .count()
    }

    /// The node's queues with their ready and unacknowledged counts, one per line: for
    /// a failing test's message.
    pub async fn queue_depths(&self) -> String {
        rabbitmqctl(
            Some(&self.name),
            &[
                "list_queues",
                "-q",
                "--no-table-headers",
                "name",
                "messages_ready",
                "messages_unacknowledged",
            ],
        )
        .await
    }

    /// Runs `rabbitmqctl -n NODE ARGS`; returns whether it succeeded.
    pub async fn ctl(&self, args: &[&str]) -> bool {
        tokio::process::Command::new("rabbitmqctl")
            .args(["-n", &self.name])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

impl Drop for PrivateNode {
    fn drop(&mut self) {
        // Stopping a stopped node fails quietly.
        let _ = Command::new("rabbitmqctl")
            .args(["-n", &self.name, "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `rabbitmqctl [-n node] ARGS` without blocking the test's runtime; its stdout.
pub async fn rabbitmqctl(node: Option<&str>, args: &[&str]) -> String {
    let mut cmd = tokio::process::Command::new("rabbitmqctl");
    if let Some(node) = node {
        cmd.args(["-n", node]);
    }
    let out = cmd.args(args).output().await.expect("rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The pids of the connections named `name` on `node` (the shared node: `None`).
pub async fn connections_named(node: Option<&str>, name: &str) -> Vec<String> {
    column_of_connections_named(node, "pid", name).await
}

/// The broker ports that connections named `name` reached, as `node` sees them (the
/// listing covers its whole cluster): which node of a cluster each one is on.
pub async fn ports_of_connections_named(node: &str, name: &str) -> Vec<u16> {
    column_of_connections_named(Some(node), "port", name)
        .await
        .iter()
        .filter_map(|port| port.parse().ok())
        .collect()
}

/// `column` of each connection named `name`.
async fn column_of_connections_named(node: Option<&str>, column: &str, name: &str) -> Vec<String> {
    let listing = rabbitmqctl(
        node,
        &[
            "list_connections",
            "-q",
            "--no-table-headers",
            column,
            "client_properties",
        ],
    )
    .await;
    let quoted = format!("\"{name}\"");
    listing
        .lines()
        .filter(|line| line.contains(&quoted))
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Closes the connections named `name` from the broker side; returns their pids.
pub async fn close_named(node: Option<&str>, name: &str) -> Vec<String> {
    let pids = connections_named(node, name).await;
    for pid in &pids {
        rabbitmqctl(
            node,
            &["close_connection", pid, "test: closed by the broker"],
        )
        .await;
    }
    pids
}

/// Waits until a connection named `name` exists on the shared node that is none of
/// `old`: the client connected again.
pub async fn wait_for_new_connection(name: &str, old: &[String], timeout: Duration) -> bool {
    eventually_async(timeout, || async {
        connections_named(None, name)
            .await
            .iter()
            .any(|pid| !old.contains(pid))
    })
    .await
}

/// Messages of `queue` on the shared node delivered to a consumer and not yet
/// acknowledged; `None` when the queue does not exist.
pub async fn unacked(queue: &str) -> Option<u64> {
    let listing = rabbitmqctl(
        None,
        &[
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages_unacknowledged",
        ],
    )
    .await;
    listing.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        (fields.next() == Some(queue)).then(|| fields.next()?.parse().ok())?
    })
}
