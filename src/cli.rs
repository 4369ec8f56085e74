//! The command line (docs/operations.md and README.md).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::builder::PossibleValuesParser;
use clap::{Args, Parser, Subcommand};

use crate::commands::dlq::REASONS;

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
    /// Validate the configuration and print a summary, with warnings about what cannot
    /// work as it stands (exit 0 all the same).
    Check {
        /// Resolve no names and leave the broker alone (the checks that need them are
        /// skipped).
        #[arg(long)]
        offline: bool,
    },
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
    /// Needs no configuration file (--config does not apply).
    Receive {
        /// Address to listen on, e.g. 127.0.0.1:8787.
        #[arg(long)]
        listen: SocketAddr,
        /// Verify signatures with this secret (answer 401 when they do not match).
        /// `/PREFIX=SECRET` applies to paths starting with /PREFIX (the longest prefix
        /// wins) and may be repeated beside one plain SECRET for the other paths.
        #[arg(
            long,
            env = "COURIER_RECEIVE_SECRET",
            hide_env_values = true,
            value_name = "[/PREFIX=]SECRET"
        )]
        secret: Vec<String>,
        /// The signature header to verify (an account's `signature_header`).
        #[arg(long, env = "COURIER_RECEIVE_HEADER", default_value = DEFAULT_SIGNATURE_HEADER)]
        header: String,
        /// The largest body accepted, in bytes (a larger one is answered 413); the default
        /// is the default `delivery.max_body_bytes`, 5 MiB.
        #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_BODY)]
        max_body: usize,
        /// Keep each request: DIR/NNNNNN.body (the bytes received) and
        /// DIR/NNNNNN.headers.
        #[arg(long, value_name = "DIR")]
        save: Option<PathBuf>,
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
    /// Without --reason, invalid_event letters stay (they cannot succeed).
    Replay {
        #[command(flatten)]
        filter: DlqFilter,
        /// Replay at most this many.
        #[arg(long)]
        limit: Option<usize>,
        /// Say what would be replayed; move nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print matching dead letters: every x-courier-* header, the broker's x-death
    /// entries, the body. None is removed.
    Show {
        #[command(flatten)]
        filter: DlqFilter,
        /// Print at most this many (all matching ones are counted).
        #[arg(long, default_value_t = 10)]
        limit: usize,
    },
    /// Remove matching dead letters: says what it would remove, then asks (or --yes).
    Discard {
        #[command(flatten)]
        filter: DlqFilter,
        /// Remove at most this many.
        #[arg(long)]
        limit: Option<usize>,
        /// Say what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Remove without asking.
        #[arg(long)]
        yes: bool,
    },
}

/// Which dead letters a `dlq` command takes; given filters must all match.
#[derive(Debug, Args)]
pub struct DlqFilter {
    /// The account in the event's body.
    #[arg(long, value_parser = account_id)]
    pub account: Option<String>,
    /// Record type: company or contact.
    #[arg(long = "type", value_name = "TYPE", value_parser = ["company", "contact"])]
    pub kind: Option<String>,
    /// The reason, as `dlq list` shows it.
    #[arg(long, value_parser = PossibleValuesParser::new(REASONS))]
    pub reason: Option<String>,
}

/// An account id as the event rules allow it.
fn account_id(value: &str) -> Result<String, String> {
    if crate::event::valid_account(value) {
        Ok(value.to_owned())
    } else {
        Err("an account id matches [A-Za-z0-9_.-]{1,64}".into())
    }
}
