//! deploy/ checked offline (no container engine or cluster runs here; docs/deploying.md):
//! tests/py/check_deploy.py for YAML, compose, Dockerfile and Kubernetes schemas, then
//! `courier check` on every configuration it found, and `systemd-analyze verify` on the
//! systemd unit.

use std::process::Command;

use crate::helpers::*;

#[test]
fn deploy_files_pass_their_offline_checks() {
    let Some(python) = python("deploy_files_pass_their_offline_checks") else {
        return;
    };
    let out_dir = temp_dir();
    let out = Command::new(python)
        .arg(repo_root().join("tests/py/check_deploy.py"))
        .arg(repo_root())
        .arg(&out_dir)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for kind in [
        "Deployment",
        "ScaledObject",
        "ServiceMonitor",
        "PrometheusRule",
    ] {
        assert!(stdout.contains(&format!(": {kind} passes")), "{stdout}");
    }

    let configs: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(out_dir.join("configs.json")).unwrap()).unwrap();
    assert!(configs.len() >= 4, "{configs:?}");
    // Resolve no names, reach no broker: these configs name hosts of other networks.
    let (_, help, _) = output(&mut courier(&["check", "--help"]));
    let offline = help.contains("--offline");
    for config in &configs {
        let origin = config["origin"].as_str().unwrap();
        let path = out_dir.join(origin.replace('/', "_"));
        std::fs::write(&path, config["text"].as_str().unwrap()).unwrap();
        let mut cmd = courier(&["check", "--config", path.to_str().unwrap()]);
        if offline {
            cmd.arg("--offline");
        }
        for (name, value) in config["env"].as_object().unwrap() {
            cmd.env(name, value.as_str().unwrap());
        }
        let (code, stdout, stderr) = output(&mut cmd);
        assert_eq!(
            code, 0,
            "courier check on the config of {origin}:\n{stdout}{stderr}"
        );
    }
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze is missing"
        );
        eprintln!("SKIPPED the_systemd_unit_passes_systemd_analyze_verify: no systemd-analyze");
        return;
    }
    // verify insists that ExecStart's binary exists: point it at the one just built.
    let unit = std::fs::read_to_string(repo_root().join("deploy/systemd/courier.service"))
        .unwrap()
        .replace("/usr/local/bin/courier", BIN);
    let path = temp_dir().join("courier.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // A misspelt directive or value is only a warning, with exit 0: none may appear.
    assert!(stderr.trim().is_empty(), "{stderr}");
}
