//! Control-plane authentication between real processes on loopback: the shared token
//! (right, missing, wrong), a worker on a non-loopback address without one, a second
//! coordinator refused while the first serves, and a new coordinator taking over the workers
//! of one that was killed.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::server::start_worker;
use common::*;

fn generate(model: &Path, hosts: &Path, extra: &[&str]) -> Output {
    Command::new(coordinator_binary())
        .arg("generate")
        .arg("--model")
        .arg(model)
        .arg("--workers")
        .arg(hosts)
        .args([
            "-p",
            "The capital of France is",
            "-n",
            "6",
            "--temperature",
            "0",
        ])
        .args(extra)
        .output()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn tokens_and_one_coordinator_at_a_time() {
    let Some(model) = model(SMOLLM2) else { return };
    let dir = std::env::temp_dir().join(format!("tp-auth-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "correct-horse-battery-staple-42\n").unwrap();
    let wrong = dir.join("wrong");
    std::fs::write(&wrong, "correct-horse-battery-staple-43\n").unwrap();

    // A worker reachable from other hosts needs a token (or --no-auth).
    let exposed = Command::new(worker_binary())
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!exposed.status.success());
    assert!(
        text(&exposed).contains("--auth-token-file"),
        "{}",
        text(&exposed)
    );

    let workers = [
        start_worker("127.0.0.1:0", &token, &dir.join("w0.log")),
        start_worker("127.0.0.1:0", &token, &dir.join("w1.log")),
    ];
    let entries: String = workers
        .iter()
        .map(|w| format!("[[worker]]\naddress = \"{}\"\nthreads = 1\n", w.address))
        .collect();
    let hosts = dir.join("hosts.toml");
    // The token file is named relative to hosts.toml.
    std::fs::write(&hosts, format!("auth_token_file = \"token\"\n{entries}")).unwrap();
    let bare = dir.join("bare.toml");
    std::fs::write(&bare, &entries).unwrap();

    let alone = generate(&model, &hosts, &[]);
    assert!(alone.status.success(), "{}", text(&alone));
    let reference = String::from_utf8_lossy(&alone.stdout).to_string();
    assert!(!reference.trim().is_empty());

    // No token, then a wrong one: refused with a clear error, and the worker logs it.
    let missing = generate(&model, &bare, &[]);
    assert!(!missing.status.success());
    assert!(
        text(&missing).contains("refused this coordinator"),
        "{}",
        text(&missing)
    );
    let bad = generate(
        &model,
        &bare,
        &["--auth-token-file", wrong.to_str().unwrap()],
    );
    assert!(!bad.status.success());
    assert!(text(&bad).contains("wrong token"), "{}", text(&bad));
    let log = std::fs::read_to_string(&workers[0].log).unwrap();
    assert!(
        log.contains("refused a control-plane request with no token"),
        "{log}"
    );
    assert!(
        log.contains("refused a control-plane request with a wrong token"),
        "{log}"
    );

    // A serving coordinator keeps its workers: a second one is refused after waiting out
    // the lease it cannot get.
    let mut first = Command::new(coordinator_binary())
        .arg("--model")
        .arg(&model)
        .arg("--workers")
        .arg(&hosts)
        .args(["--listen", "127.0.0.1:0", "-c", "256", "--parallel", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(first.stderr.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("ready") {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "the first coordinator exited"
        );
    }
    std::thread::spawn(move || {
        let mut sink = String::new();
        while stderr.read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    });
    let second = generate(&model, &hosts, &[]);
    assert!(!second.status.success());
    assert!(
        text(&second).contains("serves another coordinator"),
        "{}",
        text(&second)
    );

    // Killed, the first coordinator stops calling; a new one takes over within the lease
    // and generates what the first run did.
    first.kill().unwrap();
    first.wait().unwrap();
    let started = Instant::now();
    let takeover = generate(&model, &hosts, &[]);
    assert!(takeover.status.success(), "{}", text(&takeover));
    assert_eq!(String::from_utf8_lossy(&takeover.stdout), reference);
    assert!(started.elapsed() < Duration::from_secs(30));
    eprintln!(
        "a new coordinator took over and generated {:.2} s after the first was killed",
        started.elapsed().as_secs_f64()
    );
    // The second coordinator met worker 0 first (workers are greeted in order).
    let log = std::fs::read_to_string(&workers[0].log).unwrap();
    assert!(log.contains("refused a second coordinator"), "{log}");
    assert!(log.contains("a new coordinator takes over"), "{log}");
    drop(workers);
    let _ = std::fs::remove_dir_all(&dir);
}
