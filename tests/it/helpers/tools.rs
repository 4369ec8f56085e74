//! The Python and Node packages some tests run (the Standard Webhooks library, the docs'
//! examples, the deploy checks), installed by scripts/ensure-tools.sh into target/tools.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The repository's root.
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs scripts/ensure-tools.sh once per test binary; `Err` says why it failed.
fn ensure_tools() -> &'static Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let out = Command::new("bash")
            .arg(repo_root().join("scripts/ensure-tools.sh"))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run scripts/ensure-tools.sh: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "scripts/ensure-tools.sh failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    })
}

/// The tools' directory, or `None` after saying loudly why the calling test is skipped.
/// In CI (`CI` set) a missing tool fails the test instead: CI runs as root and can
/// install everything.
fn tools_dir(test: &str) -> Option<PathBuf> {
    match ensure_tools() {
        Ok(()) => Some(repo_root().join("target/tools")),
        Err(why) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED {test}: the test's packages could not be installed: {why}");
            None
        }
        Err(why) => panic!("{test}: {why}"),
    }
}

/// The venv's Python, with tools/pytools/requirements.txt installed.
pub fn python(test: &str) -> Option<PathBuf> {
    tools_dir(test).map(|dir| dir.join("venv/bin/python"))
}

/// `node` with `NODE_PATH` set to the installed node_modules.
pub fn node(test: &str) -> Option<Command> {
    let dir = tools_dir(test)?;
    let mut cmd = Command::new("node");
    cmd.env("NODE_PATH", dir.join("node/node_modules"));
    Some(cmd)
}
