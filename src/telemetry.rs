//! Logging through `tracing`: text or JSON on stderr.
//!
//! Third-party crates are capped at `info`: the broker client's and HTTP stack's debug
//! and trace output can carry credentials and full URLs, which must never be logged.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

const CAPPED: &[&str] = &[
    "lapin",
    "amq_protocol",
    "reqwest",
    "hyper",
    "hyper_util",
    "h2",
    "rustls",
    "axum",
    "tower",
];

/// Installs the global subscriber for the worker. `RUST_LOG` overrides `level`.
pub fn init(level: &str, format: LogFormat) {
    install(level, format, "info");
}

/// Installs the global subscriber for a command other than `run`: the command prints
/// one line for an error it reports, so the libraries' own lines (the broker client's
/// channel errors, returned messages) show only when asked for with a `debug` level.
pub fn init_command(level: &str, format: LogFormat) {
    let spec = spec(level);
    let libraries = if spec.contains("debug") || spec.contains("trace") {
        "info"
    } else {
        "off"
    };
    install(level, format, libraries);
}

fn spec(level: &str) -> String {
    std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| level.to_owned())
}

/// `libraries` caps the crates of [`CAPPED`]: never above `info`.
fn install(level: &str, format: LogFormat, libraries: &str) {
    let spec = spec(level);
    let mut filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"));
    for target in CAPPED {
        filter = filter.add_directive(
            format!("{target}={libraries}")
                .parse()
                .expect("valid directive"),
        );
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
