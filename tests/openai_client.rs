//! The server driven by the official `openai` Python package (`tests/openai/client.py test`):
//! completions, chat, streaming, logprobs, stop strings, usage, penalties and seeds; 16
//! concurrent greedy streams that must each return exactly their tokens alone; 8 streams
//! cancelled mid-way that must free their slots; 64 requests, 8 at a time, without an error.
//!
//! The package comes from `scripts/python-deps.sh` (run by `scripts/test.sh`) under
//! `~/.cache/tp/python`; without it the test is skipped with a notice, and fails under CI.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::server::start;
use common::*;

fn python_path() -> PathBuf {
    match std::env::var_os("TP_PYTHONPATH") {
        Some(dir) => PathBuf::from(dir),
        None => {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/tp/python")
        }
    }
}

/// Whether `python3` can import `openai` (from the cache directory or the system).
fn openai_available() -> bool {
    Command::new("python3")
        .args(["-c", "import openai"])
        .env("PYTHONPATH", python_path())
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn official_openai_client() {
    let Some(path) = model(SMOLLM2) else { return };
    if !openai_available() {
        if std::env::var_os("CI").is_some() {
            panic!("the openai Python package is missing; run scripts/python-deps.sh");
        }
        eprintln!("skipping: the openai Python package is missing (run scripts/python-deps.sh)");
        return;
    }
    let server = start(&path, &["-c", "256", "--parallel", "16", "--queue", "64"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai/client.py");
    let output = Command::new("python3")
        .arg(&script)
        .args([
            "test",
            "--base-url",
            &format!("http://{}/v1", server.address),
        ])
        .env("PYTHONPATH", python_path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(output.status.success(), "the openai client checks failed");
    assert!(stdout.contains("all checks passed"));
}
