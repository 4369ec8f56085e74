//! The command line (docs/operations.md and README.md).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::commands::receive::DEFAULT_MAX_BODY;
use crate::config::DEFAULT_SIGNATURE_HEADER;

/// courier: durable webhook delivery from RabbitMQ.
#[derive(Debug, Parser)]
#[command(name = "courier", version, about)]
pub struct Cli {
    /// Configuration file (else $COURIER_CONFIG, else ./courier.toml).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the worker: declare topology, consume, batch, sign, deliver, dead-letter, serve admin.
    Run,
    /// Validate the configuration and print a summary.
    Check,
    /// Declare the broker topology only.
    Setup,
    /// Publish NDJSON events (a file, or stdin) with publisher confirms.
    Publish {
        /// NDJSON file; stdin when omitted or `-`.
        file: Option<PathBuf>,
        /// Publish the valid lines and count the invalid ones instead of refusing the file.
        #[arg(long)]
        skip_invalid: bool,
    },
    /// Inspect or replay the dead-letter queue.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// A local receiver for trying a setup: accepts POST on any path, prints a line each.
    Receive {
        /// Address to listen on, e.g. 127.0.0.1:8787.
        #[arg(long)]
        listen: SocketAddr,
        /// Verify signatures with this secret (answer 401 when they do not match).
        #[arg(long, env = "COURIER_RECEIVE_SECRET", hide_env_values = true)]
        secret: Option<String>,
        /// The signature header to verify.
        #[arg(long, default_value = DEFAULT_SIGNATURE_HEADER)]
        header: String,
        /// The largest body accepted, in bytes (a larger one is answered 413); the default
        /// is the default `delivery.max_body_bytes`, 5 MiB.
        #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_BODY)]
        max_body: usize,
    },
}

/// `courier dlq ...`.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Count dead letters by reason, account and type, with samples; every message stays.
    List {
        /// Event ids shown per group.
        #[arg(long, default_value_t = 3)]
        samples: usize,
    },
    /// Move matching dead letters back to delivery, retry headers reset; the rest stay.
    Replay {
        #[arg(long)]
        account: Option<String>,
        /// Record type: company or contact.
        #[arg(long = "type", value_name = "TYPE")]
        kind: Option<String>,
        /// A reason such as retries_exhausted, rejected_400 or delivery_limit.
        #[arg(long)]
        reason: Option<String>,
        /// Replay at most this many.
        #[arg(long)]
        limit: Option<usize>,
    },
}
