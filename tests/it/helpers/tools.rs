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

/// Runs a receiver example of docs/examples with `interpreter`: exit code, stdout,
/// stderr. A missing interpreter fails the test in CI (`CI=true`) and wherever it is
/// `required`, and skips the example elsewhere.
pub fn run_example(
    interpreter: &str,
    script: &str,
    args: &[&str],
    required: bool,
) -> Option<(i32, String, String)> {
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    match Command::new(interpreter)
        .arg(repo_root().join("docs/examples").join(script))
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => Some((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !(required || in_ci) => {
            eprintln!("{interpreter} not installed: {script} not run");
            None
        }
        Err(e) => panic!("{interpreter} {script}: {e}"),
    }
}
