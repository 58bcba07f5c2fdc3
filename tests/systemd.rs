//! The systemd units in `configs/systemd/`: `systemd-analyze verify` accepts them (with
//! ExecStart pointed at the built binaries), and every option their command lines pass is one
//! the binary knows.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn units() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/systemd");
    let mut units: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "service"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    units.sort();
    units
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let units = units();
    assert_eq!(units.len(), 2, "{units:?}");
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        if std::env::var_os("CI").is_some() {
            panic!("systemd-analyze is missing (Debian package systemd)");
        }
        eprintln!("skipping: systemd-analyze is missing (Debian package systemd)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("tp-units-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = worker_binary().parent().unwrap().to_path_buf();
    let mut paths = Vec::new();
    for (name, text) in &units {
        // An instance of the template, as systemd would start it.
        let name = name.replace("@.service", "@1.service");
        let path = dir.join(&name);
        let text = text.replace("/usr/local/bin/", &format!("{}/", bin.display()));
        std::fs::write(&path, text).unwrap();
        paths.push(path);
    }
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        output.status.success(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn unit_command_lines_use_real_options() {
    for (name, text) in units() {
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap_or_else(|| panic!("{name} has no ExecStart"));
        let binary = exec.split_whitespace().next().unwrap();
        let binary = if binary.ends_with("tp-worker") {
            worker_binary()
        } else {
            coordinator_binary()
        };
        let mut help_args = vec!["--help"];
        if exec.contains(" serve ") {
            help_args.insert(0, "serve");
        }
        let help = Command::new(&binary).args(&help_args).output().unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        for option in exec.split_whitespace().filter(|w| w.starts_with("--")) {
            assert!(
                help.contains(&format!("{option} ")) || help.contains(&format!("{option}\n")),
                "{name}: {option} is not an option of {}",
                binary.display()
            );
        }
    }
}
