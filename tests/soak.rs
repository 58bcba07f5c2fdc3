//! A soak: the server on two workers in two network namespaces (gRPC between them), under
//! streamed and plain requests from several clients at once, while a fault thread SIGKILLs and
//! restarts workers and takes links down and up at random intervals. Every request must end
//! (an answer or a clear error, never a hang), every answer must equal the reference text, the
//! cluster must re-form after every fault (`/health` 200 again, then a request equal to the
//! reference), and the coordinator's memory must stay flat.
//!
//! CI runs a short form (`TP_SOAK_SECONDS`, default 40); run it by hand for longer:
//! `TP_SOAK_SECONDS=600 cargo test --release --test soak -- --nocapture`. Needs root and
//! iproute2, as tests/netns.rs does.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::net::Net;
use common::server::start_with;
use common::*;
use serde_json::{Value, json};

const WORKER_PORT: u16 = 7070;
const CLIENTS: usize = 4;
/// A request that takes longer than this has hung.
const HANG: Duration = Duration::from_secs(60);
/// After a fault is undone, the cluster must be serving again within this.
const RECOVERY_BOUND: Duration = Duration::from_secs(30);

/// A xorshift generator: the soak's choices are reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn millis(&mut self, range: std::ops::Range<u64>) -> Duration {
        Duration::from_millis(range.start + self.next() % (range.end - range.start))
    }
}

/// How a request ended.
enum Outcome {
    Answer(String),
    /// An error the server reported: its kind.
    Error(String),
    Hang,
}

/// The kind of a server error, from its message: what an operator would count.
fn error_kind(status: u16, message: &str) -> String {
    let kind = if message.contains("not ready") {
        "refused while re-forming"
    } else if message.contains("lost contact") {
        "worker lost"
    } else if message.contains("did not arrive") || message.contains("aborted") {
        "peer timed out"
    } else if message.contains("incomplete") || message.contains("unavailable") {
        "cluster incomplete"
    } else if message.contains("data plane") || message.contains("peers") {
        "data plane down"
    } else if message.contains("queue") {
        "queue full"
    } else {
        "other"
    };
    format!("{status} {kind}")
}

fn send(address: &str, body: &Value) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&address.parse().unwrap(), Duration::from_secs(5))?;
    stream.set_read_timeout(Some(HANG))?;
    let body = body.to_string();
    write!(
        &stream,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(stream)
}

/// A plain request.
fn plain(address: &str, prompt: &str) -> Outcome {
    let body = json!({"prompt": prompt, "max_tokens": 24, "temperature": 0});
    let mut response = String::new();
    match send(address, &body).and_then(|mut s| s.read_to_string(&mut response)) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Outcome::Hang,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Outcome::Hang,
        Err(e) => return Outcome::Error(format!("connection: {e}")),
    }
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        return Outcome::Error("no HTTP answer".into());
    };
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let value: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    if status == 200 {
        Outcome::Answer(
            value["choices"][0]["text"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        )
    } else {
        Outcome::Error(error_kind(
            status,
            value["error"]["message"].as_str().unwrap_or(""),
        ))
    }
}

/// A streamed request: its text, or the error event that ended it.
fn streamed(address: &str, prompt: &str) -> Outcome {
    let body = json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": true});
    let stream = match send(address, &body) {
        Ok(s) => s,
        Err(e) => return Outcome::Error(format!("connection: {e}")),
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let mut status = 0u16;
    let mut text = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return Outcome::Error("stream ended without [DONE]".into()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Outcome::Hang;
            }
            Err(e) => return Outcome::Error(format!("connection: {e}")),
        }
        if status == 0 && line.starts_with("HTTP/1.1") {
            status = line
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if status != 200 {
                let mut rest = String::new();
                let _ = reader.read_to_string(&mut rest);
                let body = rest.split_once("\r\n\r\n").map_or("", |(_, b)| b);
                let value: Value = serde_json::from_str(body).unwrap_or(Value::Null);
                return Outcome::Error(error_kind(
                    status,
                    value["error"]["message"].as_str().unwrap_or(""),
                ));
            }
            continue;
        }
        let Some(data) = line.trim().strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            return Outcome::Answer(text);
        }
        let event: Value = serde_json::from_str(data).unwrap_or(Value::Null);
        if let Some(message) = event["error"]["message"].as_str() {
            return Outcome::Error(format!("stream: {}", error_kind(500, message)));
        }
        text.push_str(event["choices"][0]["text"].as_str().unwrap_or(""));
    }
}

fn health(address: &str) -> u16 {
    let Ok(mut stream) =
        TcpStream::connect_timeout(&address.parse().unwrap(), Duration::from_secs(5))
    else {
        return 0;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(
        stream,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

#[derive(Default)]
struct Tally {
    requests: usize,
    answers: usize,
    streamed: usize,
    wrong: Vec<String>,
    errors: BTreeMap<String, usize>,
    hangs: usize,
}

#[test]
fn soak_under_worker_kills_and_link_cuts() {
    let Some(path) = model(SMOLLM2) else { return };
    let Some(mut net) = Net::new(7, 2) else {
        return;
    };
    let seconds: u64 = std::env::var("TP_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let addresses: Vec<String> = (0..2).map(|h| net.start_worker(h, WORKER_PORT)).collect();
    let dir = std::env::temp_dir().join(format!("tp-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let hosts = dir.join("hosts.toml");
    let workers: String = addresses
        .iter()
        .map(|a| format!("[[worker]]\naddress = \"{a}\"\nthreads = 1\n"))
        .collect();
    std::fs::write(&hosts, workers).unwrap();
    let server = start_with(&[
        "--model",
        path.to_str().unwrap(),
        "--workers",
        hosts.to_str().unwrap(),
        "-c",
        "512",
        "--parallel",
        "4",
    ]);
    let address = server.address.clone();
    let prompt = "The history of the world";
    let Outcome::Answer(reference) = plain(&address, prompt) else {
        panic!("the reference request failed");
    };
    let coordinator_start = rss_mib(server.child.id());
    let workers_start: Vec<f64> = net.workers.iter().map(|w| rss_mib(w.id())).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (stop, tally) = (stop.clone(), tally.clone());
            let (address, reference) = (address.clone(), reference.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (c as u64 + 1));
                while !stop.load(Ordering::Relaxed) {
                    let stream = rng.next() % 2 == 0;
                    let outcome = if stream {
                        streamed(&address, prompt)
                    } else {
                        plain(&address, prompt)
                    };
                    let mut tally = tally.lock().unwrap();
                    tally.requests += 1;
                    match outcome {
                        Outcome::Answer(text) if text == reference => {
                            tally.answers += 1;
                            tally.streamed += stream as usize;
                        }
                        Outcome::Answer(text) => tally.wrong.push(text),
                        Outcome::Error(kind) => {
                            *tally.errors.entry(kind).or_default() += 1;
                            // As a client honouring Retry-After would.
                            drop(tally);
                            std::thread::sleep(rng.millis(200..1000));
                            continue;
                        }
                        Outcome::Hang => tally.hangs += 1,
                    }
                    drop(tally);
                    if rng.next() % 4 == 0 {
                        std::thread::sleep(rng.millis(10..200));
                    }
                }
            })
        })
        .collect();

    // Faults until the time is up; each is undone, then the cluster must serve again.
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let started = Instant::now();
    let mut faults: BTreeMap<&str, usize> = BTreeMap::new();
    let mut recoveries = Vec::new();
    let mut checks = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(rng.millis(1500..4000));
        let host = (rng.next() % 2) as usize;
        if rng.next() % 2 == 0 {
            net.kill_worker(host);
            std::thread::sleep(rng.millis(200..2000));
            net.restart_worker(host, host, WORKER_PORT);
            *faults.entry("worker SIGKILLed, restarted").or_default() += 1;
        } else {
            net.set_link(host, false);
            std::thread::sleep(rng.millis(500..3000));
            net.set_link(host, true);
            *faults.entry("link down, up").or_default() += 1;
        }
        let undone = Instant::now();
        while health(&address) != 200 {
            assert!(
                undone.elapsed() < RECOVERY_BOUND,
                "the cluster did not re-form within {RECOVERY_BOUND:?} of the fault's end"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        recoveries.push(undone.elapsed());
        // Served again: an answer equal to the reference (clients may race it into an error
        // only if another fault came, which it cannot here).
        match plain(&address, prompt) {
            Outcome::Answer(text) => assert_eq!(text, reference, "after a recovery"),
            Outcome::Error(kind) => panic!("the first request after a recovery failed: {kind}"),
            Outcome::Hang => panic!("the first request after a recovery hung"),
        }
        checks += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().unwrap();
    }
    let coordinator_end = rss_mib(server.child.id());
    let workers_end: Vec<f64> = net.workers.iter().map(|w| rss_mib(w.id())).collect();
    let tally = tally.lock().unwrap();
    let mut ms: Vec<f64> = recoveries.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    println!(
        "soak: {:.0} s, {} clients, {} requests ({} answers equal to the reference, {} of them \
         streamed), {} hangs, {} wrong answers",
        started.elapsed().as_secs_f64(),
        CLIENTS,
        tally.requests,
        tally.answers,
        tally.streamed,
        tally.hangs,
        tally.wrong.len()
    );
    println!(
        "faults injected: {faults:?}; re-formed after each, then a request equal to the reference: {checks}"
    );
    if !ms.is_empty() {
        println!(
            "fault undone -> /health 200: median {:.0} ms, max {:.0} ms",
            ms[ms.len() / 2],
            ms[ms.len() - 1]
        );
    }
    println!("errors by kind: {:?}", tally.errors);
    println!(
        "RSS (MiB): coordinator {coordinator_start:.1} -> {coordinator_end:.1}; workers \
         {workers_start:.1?} -> {workers_end:.1?} (a restarted worker is a new process)"
    );
    assert_eq!(tally.hangs, 0, "requests hung");
    assert!(tally.wrong.is_empty(), "wrong answers: {:?}", tally.wrong);
    assert!(!faults.is_empty(), "no fault was injected");
    assert!(tally.answers > 0, "nothing was answered");
    assert!(
        coordinator_end < coordinator_start * 1.25 + 32.0,
        "the coordinator grew from {coordinator_start:.1} to {coordinator_end:.1} MiB"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
