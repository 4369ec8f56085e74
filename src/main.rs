//! The `courier` binary: parse the command line, load the configuration, set up logging
//! and dispatch. Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use courier::cli::{Cli, Command, DlqCommand};
use courier::config::{self, LogFormat, Settings};
use courier::{commands, pipeline, telemetry};

/// mimalloc instead of glibc's malloc: fewer CPU cycles per allocation and far less
/// fragmentation across the runtime's threads (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc v3's `mimalloc.h` (the Rust bindings do not name
/// it). At 0, freed pages go back to the OS at once instead of after a second, which
/// lowers peak RSS with many destinations (docs/performance.md). An operator's
/// `MIMALLOC_PURGE_DELAY` still wins.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

const RUNTIME_FAILURE: u8 = 1;
const CONFIG_ERROR: u8 = 2;

fn main() -> ExitCode {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; mimalloc's options may be set at any time.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // On a worker thread, not the main one: the consumer loop and lapin's I/O thread
    // then wake each other without a third thread in between.
    let code =
        runtime.block_on(async { tokio::spawn(dispatch(cli)).await.unwrap_or(RUNTIME_FAILURE) });
    // Don't wait for stray blocking tasks (stdin readers) on the way out.
    runtime.shutdown_background();
    ExitCode::from(code)
}

/// What a command prints: `stdout` on standard output, each note on standard error.
#[derive(Default)]
struct Report {
    stdout: String,
    notes: Vec<String>,
}

impl From<String> for Report {
    fn from(stdout: String) -> Self {
        Self {
            stdout,
            notes: Vec::new(),
        }
    }
}

/// A command's failure, with its exit code; printed as `courier: <message>`.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn runtime(error: impl std::fmt::Display) -> Self {
        Self {
            code: RUNTIME_FAILURE,
            message: error.to_string(),
        }
    }
}

async fn dispatch(cli: Cli) -> u8 {
    let result = match &cli.command {
        Command::Receive {
            listen,
            secret,
            header,
            max_body,
            save,
        } => match commands::receive::Secrets::parse(secret) {
            Ok(secrets) => {
                let options = commands::receive::ReceiveOptions {
                    secrets,
                    header: header.clone(),
                    max_body: *max_body,
                    save: save.clone(),
                };
                receive(*listen, options).await
            }
            Err(message) => Err(Failure {
                code: CONFIG_ERROR,
                message,
            }),
        },
        command => match load(&cli) {
            Ok(settings) => {
                match command {
                    Command::Check { .. } => {}
                    Command::Run => telemetry::init(&settings.log.level, settings.log.format),
                    _ => telemetry::init_command(&settings.log.level, settings.log.format),
                }
                run_command(command, settings).await
            }
            Err(failure) => Err(failure),
        },
    };
    match result {
        Ok(report) => {
            for note in &report.notes {
                eprintln!("{note}");
            }
            print!("{}", report.stdout);
            0
        }
        Err(failure) => {
            eprintln!("courier: {}", failure.message);
            failure.code
        }
    }
}

/// Loads the configuration once, for every command that has one.
fn load(cli: &Cli) -> Result<Settings, Failure> {
    let path = config::resolve_path(cli.config.as_deref());
    config::load(&path).map_err(|e| Failure {
        code: CONFIG_ERROR,
        message: format!("configuration error: {e}"),
    })
}

async fn run_command(command: &Command, settings: Settings) -> Result<Report, Failure> {
    match command {
        Command::Check { offline } => {
            let warnings = commands::check::warnings(&settings, *offline).await;
            Ok(Report {
                stdout: commands::check_summary(&settings),
                notes: warnings.iter().map(|w| format!("warning: {w}")).collect(),
            })
        }
        Command::Setup => commands::setup(&settings)
            .await
            .map(Report::from)
            .map_err(Failure::runtime),
        Command::Run => run(settings).await,
        Command::Publish { file, skip_invalid } => {
            publish(&settings, file.as_deref(), *skip_invalid).await
        }
        Command::Dlq { command } => dlq(&settings, command).await,
        Command::Receive { .. } => unreachable!("receive needs no configuration"),
    }
}

async fn run(settings: Settings) -> Result<Report, Failure> {
    tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %settings.source.display(), accounts = settings.accounts.len(), "courier starting");
    let shutdown = CancellationToken::new();
    tokio::spawn(on_signal(shutdown.clone()));
    let worker = pipeline::Worker::new(settings);
    tokio::spawn(on_hangup(worker.reloader()));
    worker.run(shutdown).await.map_err(Failure::runtime)?;
    tracing::info!("courier stopped");
    Ok(Report::default())
}

async fn publish(
    settings: &Settings,
    file: Option<&std::path::Path>,
    skip_invalid: bool,
) -> Result<Report, Failure> {
    let input: Box<dyn BufRead + Send> = match file {
        Some(path) if path.as_os_str() != "-" => {
            let file = std::fs::File::open(path)
                .map_err(|e| Failure::runtime(format!("cannot open {}: {e}", path.display())))?;
            Box::new(std::io::BufReader::new(file))
        }
        _ => Box::new(std::io::BufReader::new(std::io::stdin())),
    };
    let summary = commands::publish::publish(settings, input, skip_invalid)
        .await
        .map_err(Failure::runtime)?;
    Ok(Report {
        stdout: format!(
            "published {} event(s), skipped {} invalid line(s)\n",
            summary.published, summary.skipped
        ),
        notes: summary
            .report
            .iter()
            .map(|l| format!("skipped {l}"))
            .collect(),
    })
}

async fn dlq(settings: &Settings, command: &DlqCommand) -> Result<Report, Failure> {
    match command {
        DlqCommand::List { samples } => {
            let listing = commands::dlq::list(settings, *samples)
                .await
                .map_err(Failure::runtime)?;
            Ok(listing.render(&settings.broker.dead_queue()).into())
        }
        DlqCommand::Replay {
            filter,
            limit,
            dry_run,
        } => {
            let filter = dlq_filter(filter, *limit);
            let done = commands::dlq::replay(settings, &filter, *dry_run)
                .await
                .map_err(Failure::runtime)?;
            let verb = if *dry_run { "would replay" } else { "replayed" };
            let mut out = format!(
                "{verb} {} of {} dead letter(s) examined to {}\n",
                done.replayed,
                done.examined,
                settings.broker.deliver_queue()
            );
            if done.invalid_left > 0 {
                out.push_str(&format!(
                    "left {} invalid_event dead letter(s): they would fail again \
                     (see them with `courier dlq show --reason invalid_event`, remove them \
                     with `courier dlq discard --reason invalid_event`)\n",
                    done.invalid_left
                ));
            }
            Ok(out.into())
        }
        DlqCommand::Show { filter, limit } => {
            let filter = dlq_filter(filter, Some(*limit));
            let shown = commands::dlq::show(settings, &filter)
                .await
                .map_err(Failure::runtime)?;
            let mut out = shown.letters.concat();
            out.push_str(&format!(
                "{} of {} matching dead letter(s) shown ({} examined in {}; none removed)\n",
                shown.letters.len(),
                shown.matched,
                shown.examined,
                settings.broker.dead_queue()
            ));
            Ok(out.into())
        }
        DlqCommand::Discard {
            filter,
            limit,
            dry_run,
            yes,
        } => discard(settings, dlq_filter(filter, *limit), *dry_run, *yes).await,
    }
}

fn dlq_filter(filter: &courier::cli::DlqFilter, limit: Option<usize>) -> commands::dlq::Filter {
    commands::dlq::Filter {
        account: filter.account.clone(),
        kind: filter.kind.clone(),
        reason: filter.reason.clone(),
        limit,
    }
}

/// `courier dlq discard`: prints what matches, then removes it with `--yes`, or after a
/// "y" at the prompt when stdin is a terminal; otherwise removes nothing.
async fn discard(
    settings: &Settings,
    filter: commands::dlq::Filter,
    dry_run: bool,
    yes: bool,
) -> Result<Report, Failure> {
    let queue = settings.broker.dead_queue();
    let confirm = |matched: &commands::dlq::Listing| {
        print!(
            "{}",
            matched.table(format!(
                "{} dead letter(s) in {queue} match:\n",
                matched.total
            ))
        );
        if dry_run {
            return false;
        }
        if yes {
            return true;
        }
        if !std::io::stdin().is_terminal() {
            return false;
        }
        print!("remove them? [y/N] ");
        let _ = std::io::stdout().flush();
        let mut answer = String::new();
        let read = tokio::task::block_in_place(|| std::io::stdin().read_line(&mut answer));
        read.is_ok() && matches!(answer.trim(), "y" | "Y" | "yes")
    };
    let done = commands::dlq::discard(settings, &filter, confirm)
        .await
        .map_err(Failure::runtime)?;
    let out = if done.removed > 0 {
        format!("removed {} dead letter(s) from {queue}\n", done.removed)
    } else if done.matched.total == 0 {
        format!(
            "no dead letter matches ({} examined in {queue}); nothing removed\n",
            done.examined
        )
    } else if dry_run {
        "dry run: nothing removed\n".to_owned()
    } else if yes || std::io::stdin().is_terminal() {
        "nothing removed\n".to_owned()
    } else {
        "nothing removed: pass --yes to remove them (stdin is not a terminal to ask)\n".to_owned()
    };
    Ok(out.into())
}

/// `courier receive`: needs no configuration.
async fn receive(
    listen: std::net::SocketAddr,
    options: commands::receive::ReceiveOptions,
) -> Result<Report, Failure> {
    telemetry::init("info", LogFormat::Text);
    let stop = CancellationToken::new();
    tokio::spawn(on_signal(stop.clone()));
    commands::receive::run(listen, options, stop)
        .await
        .map_err(|e| Failure::runtime(format!("receive: {e}")))?;
    Ok(Report::default())
}

/// Reloads the configuration on every SIGHUP.
async fn on_hangup(reloader: pipeline::Reloader) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the configuration");
        // The outcome is logged and counted by the reloader.
        let _ = reloader.reload().await;
    }
}

/// Cancels `token` on SIGTERM or SIGINT.
async fn on_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    token.cancel();
}
