//! The courier binary as a subprocess: config files, signals, exit codes, admin requests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use super::suffix;

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

/// `courier ARGS` without the environment's `COURIER_*` and `RUST_LOG`: the config a test
/// writes is the whole config (a test that wants one sets it on the command).
pub fn courier(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("COURIER_") || name == "RUST_LOG" {
            cmd.env_remove(name.as_ref());
        }
    }
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

/// Runs `courier ARGS` with a pseudo-terminal as its stdin, as an operator at a terminal
/// would; stdout and stderr are captured. Once stdout shows `prompt`, types `answer` and
/// Enter. Returns the exit code, stdout and stderr; a command that never shows the
/// prompt is left to finish (or killed after 20 s) and its output returned as it is.
pub fn answer_on_terminal(args: &[&str], prompt: &str, answer: &str) -> (i32, String, String) {
    use std::io::{Read, Write};
    use std::sync::mpsc;

    let (mut terminal, line) = pseudo_terminal();
    let stderr_path = temp_dir().join("stderr");
    let mut cmd = courier(args);
    cmd.stdin(Stdio::from(line))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap());
    let mut proc = Proc(cmd.spawn().expect("courier runs"));
    // The command holds the terminal's other end until it is dropped.
    drop(cmd);
    let mut stdout = proc.0.stdout.take().unwrap();
    let (chunks, received) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            if chunks.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut out = Vec::new();
    let mut answered = false;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match received.recv_timeout(left) {
            Ok(chunk) => out.extend(chunk),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = proc.0.kill();
                break;
            }
        }
        if !answered && String::from_utf8_lossy(&out).contains(prompt) {
            terminal
                .write_all(format!("{answer}\n").as_bytes())
                .unwrap();
            answered = true;
        }
    }
    let status = proc.0.wait().unwrap();
    reader.join().unwrap();
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out).into_owned(),
        std::fs::read_to_string(&stderr_path).unwrap_or_default(),
    )
}

/// A new pseudo-terminal: its controlling side, and the line a program reads as its
/// terminal.
fn pseudo_terminal() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::OpenOptionsExt;

    // SAFETY: plain libc calls on a descriptor this function owns; `name` is a
    // NUL-terminated buffer that `ptsname_r` fills.
    unsafe {
        let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(fd >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
        let terminal = std::fs::File::from_raw_fd(fd);
        assert_eq!(libc::grantpt(fd), 0, "grantpt");
        assert_eq!(libc::unlockpt(fd), 0, "unlockpt");
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(
            libc::ptsname_r(fd, name.as_mut_ptr(), name.len()),
            0,
            "ptsname_r"
        );
        let path = std::ffi::CStr::from_ptr(name.as_ptr())
            .to_str()
            .unwrap()
            .to_owned();
        let line = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        (terminal, line)
    }
}

/// A loopback port for a server that must be told its port before it starts (prefer
/// binding `127.0.0.1:0` and learning the port, as `start_courier` does).
///
/// Drawn below the kernel's ephemeral range, so no implicit bind (a `:0` listener, an
/// outgoing connection) can take it between this check and its use; only another test
/// drawing the same number from the same ~20,000 could.
pub fn free_port() -> u16 {
    use rand::Rng;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let low = 10_000;
    let high = ephemeral_low.max(low + 1000);
    // Ports RabbitMQ nodes use by default stay out of it.
    let reserved = [15672, 15692, 25672];
    let mut rng = rand::rng();
    loop {
        let port = rng.random_range(low..high);
        if !reserved.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A `courier run` subprocess and the admin port it bound.
pub struct Running {
    pub proc: Proc,
    pub admin: u16,
}

/// Starts `courier run --config CONFIG` (whose `admin.listen` is `127.0.0.1:0`) with its
/// log in `log`, learns the admin port it bound from the log and waits until it is ready.
pub async fn start_courier(config: &Path, log: &Path) -> Running {
    start_run(
        &mut courier(&["run", "--config", config.to_str().unwrap()]),
        log,
    )
    .await
}

/// `start_courier` for a `courier run` command the test has prepared (environment).
pub async fn start_run(cmd: &mut Command, log: &Path) -> Running {
    let proc = Proc(
        cmd.stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut running = Running { proc, admin: 0 };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(port) = admin_port_in_log(&text) {
            running.admin = port;
            break;
        }
        if let Some(status) = running.proc.0.try_wait().unwrap() {
            panic!("courier exited ({status}) before its admin endpoints were up:\n{text}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no \"admin endpoints up\" line in the log:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        super::wait_ready(running.admin).await,
        "courier never ready:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    running
}

/// The port of the `admin endpoints up` line: `listen=ADDR` in text logs,
/// `"listen":"ADDR"` in JSON logs.
fn admin_port_in_log(text: &str) -> Option<u16> {
    let line = text.lines().find(|l| l.contains("admin endpoints up"))?;
    let (_, rest) = line
        .split_once("listen=")
        .or_else(|| line.split_once("\"listen\":\""))?;
    let addr: String = rest
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"')
        .collect();
    addr.parse::<std::net::SocketAddr>().ok().map(|a| a.port())
}

/// Publishes with `courier publish` through the configuration `text`; asserts that every
/// event was published. Returns what it logged.
pub fn publish_with_cli(text: &str, bodies: &[Vec<u8>]) -> String {
    let config = write_config(text);
    let events = config.with_file_name("events.ndjson");
    std::fs::write(&events, bodies.join(&b'\n')).unwrap();
    let (code, stdout, stderr) = output(&mut courier(&[
        "publish",
        "--config",
        config.to_str().unwrap(),
        events.to_str().unwrap(),
    ]));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(&format!("published {}", bodies.len())),
        "{stdout}"
    );
    stderr
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

#[test]
fn the_admin_port_is_read_from_text_and_json_logs() {
    let text = "2026-12-01T00:00:00.000000Z  INFO courier::pipeline: admin endpoints up listen=127.0.0.1:41234\n";
    let json = r#"{"timestamp":"2026-12-01T00:00:00Z","level":"INFO","message":"admin endpoints up","listen":"127.0.0.1:41235","target":"courier::pipeline"}"#;
    assert_eq!(admin_port_in_log(text), Some(41234));
    assert_eq!(admin_port_in_log(json), Some(41235));
    assert_eq!(admin_port_in_log("INFO consuming queue=x\n"), None);
}
