//! Fault handling between real processes: a worker killed (SIGKILL) in the middle of a
//! streamed generation, for 20 rounds, each on a random worker. Every round: the stream ends
//! with an error within 2 s, the server answers errors (not hangs) while the worker is gone
//! and `/health` says 503, and once the worker is restarted on its address the cluster
//! re-forms by itself (`/health` 200) and the next request returns exactly the reference
//! text. Every deadline is at its default. Then SIGTERM drains a request in flight.
//!
//! Prints the fault table (detection and recovery times) for docs/PERFORMANCE.md.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::server::{Server, http, start_with, start_worker};
use common::*;
use serde_json::{Value, json};

const ROUNDS: usize = 20;

fn post(server: &Server, body: &Value) -> (u16, Value, Duration) {
    let started = Instant::now();
    let (status, text) = http(server, "POST", "/v1/completions", &body.to_string());
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
        started.elapsed(),
    )
}

/// Opens a streamed completion and returns a reader positioned after the response head.
fn open_stream(server: &Server, body: &Value) -> BufReader<TcpStream> {
    let mut stream = TcpStream::connect(&server.address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let body = body.to_string();
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains(" 200 "), "{line}");
    reader
}

/// The next `data:` payload of a stream, or None at its end.
fn next_event(reader: &mut BufReader<TcpStream>) -> Option<String> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if let Some(data) = line.trim_end().strip_prefix("data: ") {
            return Some(data.to_string());
        }
    }
}

#[test]
fn killed_workers_fail_fast_and_the_cluster_re_forms() {
    let Some(model) = model(SMOLLM2) else { return };
    let dir = std::env::temp_dir().join(format!("tp-faults-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "fault-test-token-0123456789\n").unwrap();
    let logs = [dir.join("w0.log"), dir.join("w1.log")];
    let mut workers = vec![
        start_worker("127.0.0.1:0", &token, &logs[0]),
        start_worker("127.0.0.1:0", &token, &logs[1]),
    ];
    let addresses: Vec<String> = workers.iter().map(|w| w.address.clone()).collect();
    let hosts = dir.join("hosts.toml");
    let entries: String = addresses
        .iter()
        .map(|a| format!("[[worker]]\naddress = \"{a}\"\nthreads = 1\n"))
        .collect();
    std::fs::write(&hosts, format!("auth_token_file = \"token\"\n{entries}")).unwrap();
    let server = start_with(&[
        "--model",
        model.to_str().unwrap(),
        "--workers",
        hosts.to_str().unwrap(),
        "-c",
        "512",
        "--parallel",
        "2",
    ]);

    let reference_request = json!({
        "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0
    });
    let (status, reference, _) = post(&server, &reference_request);
    assert_eq!(status, 200, "{reference}");
    let reference = reference["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();

    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut detections = Vec::new();
    let mut refusals = Vec::new();
    let mut recoveries = Vec::new();
    let mut healthy = Vec::new();
    for round in 0..ROUNDS {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let victim = (rng % 2) as usize;
        let mut stream = open_stream(
            &server,
            &json!({"prompt": "The history of the world", "max_tokens": 400,
                    "temperature": 0, "stream": true}),
        );
        for _ in 0..3 {
            let event = next_event(&mut stream).expect("the stream produced tokens");
            assert!(event.contains("\"text\""), "{event}");
        }
        workers[victim].child.kill().unwrap();
        workers[victim].child.wait().unwrap();
        let killed = Instant::now();
        let mut failed = false;
        while let Some(event) = next_event(&mut stream) {
            if event.contains("\"error\"") {
                failed = true;
            }
            if event == "[DONE]" {
                break;
            }
        }
        let detection = killed.elapsed();
        assert!(failed, "round {round}: the stream did not report an error");
        assert!(
            detection < Duration::from_secs(2),
            "round {round}: the failure took {detection:?} to reach the client"
        );
        detections.push(detection);

        // While the worker is gone, requests get an error at once.
        let (status, body, took) = post(&server, &reference_request);
        assert!(status >= 500, "round {round}: {status} {body}");
        assert!(
            took < Duration::from_secs(2),
            "round {round}: an error took {took:?}"
        );
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("worker")),
            "{body}"
        );
        refusals.push(took);

        // /health tells a load balancer, naming the worker.
        let (status, body) = http(&server, "GET", "/health", "");
        assert_eq!(status, 503, "round {round}: {body}");
        let health: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(health["status"], "unavailable", "{body}");

        // Back on its address (as systemd would restart it): the cluster re-forms by itself
        // (no request comes while /health says 503), and the next request is correct.
        workers[victim] = start_worker(&addresses[victim], &token, &logs[victim]);
        let restarted = Instant::now();
        loop {
            let (status, body) = http(&server, "GET", "/health", "");
            if status == 200 {
                break;
            }
            assert!(
                restarted.elapsed() < Duration::from_secs(30),
                "round {round}: not re-formed 30 s after the restart: {body}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        healthy.push(restarted.elapsed());
        let (status, body, _) = post(&server, &reference_request);
        assert_eq!(status, 200, "round {round}: {body}");
        assert_eq!(
            body["choices"][0]["text"],
            reference.as_str(),
            "round {round}"
        );
        recoveries.push(restarted.elapsed());
    }
    let stats = |d: &[Duration]| {
        let mut ms: Vec<f64> = d.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        (ms[ms.len() / 2], ms[ms.len() - 1])
    };
    let (d50, dmax) = stats(&detections);
    let (r50, rmax) = stats(&refusals);
    let (c50, cmax) = stats(&recoveries);
    let (h50, hmax) = stats(&healthy);
    eprintln!(
        "| scenario | median (ms) | max (ms) | result |\n|---|--:|--:|---|\n\
         | worker SIGKILLed mid-stream: error reaches the client | {d50:.0} | {dmax:.0} | {ROUNDS}/{ROUNDS} streams ended with an error |\n\
         | request while the worker is down | {r50:.0} | {rmax:.0} | {ROUNDS}/{ROUNDS} answered 5xx |\n\
         | worker restarted: /health 200 again (re-formed without a request) | {h50:.0} | {hmax:.0} | {ROUNDS}/{ROUNDS} |\n\
         | then the first request | {c50:.0} | {cmax:.0} | {ROUNDS}/{ROUNDS} equal to the reference |"
    );

    // SIGTERM drains: a stream in flight finishes, then the server exits cleanly.
    let mut stream = open_stream(
        &server,
        &json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0,
                "stream": true}),
    );
    next_event(&mut stream).expect("a first token");
    unsafe {
        libc::kill(server.child.id() as i32, libc::SIGTERM);
    }
    let mut finish = None;
    while let Some(event) = next_event(&mut stream) {
        if event == "[DONE]" {
            break;
        }
        let value: Value = serde_json::from_str(&event).unwrap();
        if let Some(reason) = value["choices"][0]["finish_reason"].as_str() {
            finish = Some(reason.to_string());
        }
    }
    assert_eq!(
        finish.as_deref(),
        Some("length"),
        "the drained stream finished"
    );
    let mut server = server;
    let status = server.child.wait().unwrap();
    assert!(status.success(), "the server exited with {status}");
    // Reaped already: its Drop must not signal the (possibly reused) pid.
    std::mem::forget(server);
    drop(workers);
    let _ = std::fs::remove_dir_all(&dir);
}
