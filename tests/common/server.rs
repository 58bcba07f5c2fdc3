//! A `tp-coordinator` server run by a test, and plain HTTP/1.1 requests to it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use super::{coordinator_binary, worker_binary};

/// A `tp-worker` started by a test, killed when dropped; its log goes to a file.
pub struct Worker {
    pub child: Child,
    pub address: String,
    pub log: std::path::PathBuf,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns a `tp-worker` command (its stdout piped here) and reads the address from the
/// "listening on ADDRESS" line it prints once it listens.
pub fn spawn_listening(command: &mut Command) -> (Child, String) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let address = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("worker said {line:?}"))
        .trim()
        .to_string();
    (child, address)
}

/// Starts a worker on `listen` (e.g. `127.0.0.1:0`) that needs the token in `token`, logging
/// at info level to `log`.
pub fn start_worker(listen: &str, token: &std::path::Path, log: &std::path::Path) -> Worker {
    start_worker_env(listen, token, log, &[])
}

/// `start_worker` with environment variables set for the worker.
pub fn start_worker_env(
    listen: &str,
    token: &std::path::Path,
    log: &std::path::Path,
    env: &[(&str, &str)],
) -> Worker {
    let (child, address) = spawn_listening(
        Command::new(worker_binary())
            .envs(env.iter().copied())
            .args(["--listen", listen, "--threads", "1", "--log", "info"])
            .arg("--auth-token-file")
            .arg(token)
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .unwrap(),
            ),
    );
    Worker {
        child,
        address,
        log: log.to_path_buf(),
    }
}

pub struct Server {
    pub child: Child,
    pub address: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM: the server drains and stops its workers.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

/// Starts `tp-coordinator` serving `model` on two local workers with `args` added, and waits
/// until it is ready.
pub fn start(model: &std::path::Path, args: &[&str]) -> Server {
    let mut all = vec!["--model", model.to_str().unwrap(), "--local", "2"];
    all.extend_from_slice(args);
    start_with(&all)
}

/// Starts `tp-coordinator` with exactly `args` (plus `--listen 127.0.0.1:0`) and waits until
/// it is ready.
pub fn start_with(args: &[&str]) -> Server {
    let mut child = Command::new(coordinator_binary())
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "server exited before serving"
        );
        if let Some(rest) = line.strip_prefix("serving on http://") {
            let address = rest.split('/').next().unwrap().to_string();
            // Keep draining stderr so that the server never blocks on it.
            std::thread::spawn(move || {
                let mut sink = String::new();
                while stderr.read_line(&mut sink).is_ok_and(|n| n > 0) {
                    sink.clear();
                }
            });
            let server = Server { child, address };
            wait_until_ready(&server);
            return server;
        }
    }
}

/// The server listens while it loads: /health is 503 `loading` until every shard is in place,
/// and generation requests are refused with 503 meanwhile.
pub fn wait_until_ready(server: &Server) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let (status, body) = http(server, "GET", "/health", "");
        if status == 200 {
            return;
        }
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("loading"), "{body}");
        assert!(
            std::time::Instant::now() < deadline,
            "not ready after 300 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// One request; returns the status and the body.
pub fn http(server: &Server, method: &str, path: &str, body: &str) -> (u16, String) {
    http_with(server, method, path, "", body)
}

/// `http` with extra header lines (each ending in `\r\n`).
pub fn http_with(
    server: &Server,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(&server.address).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    (
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    )
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

/// Generated tokens per second of one greedy stream of 64 tokens (the best of two) and of
/// eight at once (aggregate), and the eight texts.
pub fn load_speed(server: &Server) -> (f64, f64, Vec<String>) {
    let request = |i: usize| {
        let body = serde_json::json!({
            "prompt": format!("Chapter {i}. Once upon a time, in a small village by the sea,"),
            "max_tokens": 64,
            "temperature": 0,
        });
        let (status, text) = http(server, "POST", "/v1/completions", &body.to_string());
        assert_eq!(status, 200, "{text}");
        let body: serde_json::Value = serde_json::from_str(&text).unwrap();
        (
            body["choices"][0]["text"].as_str().unwrap().to_string(),
            body["usage"]["completion_tokens"].as_u64().unwrap() as f64,
        )
    };
    request(0);
    let mut one: f64 = 0.0;
    for _ in 0..2 {
        let started = std::time::Instant::now();
        let (_, tokens) = request(1);
        one = one.max(tokens / started.elapsed().as_secs_f64());
    }
    let started = std::time::Instant::now();
    let results: Vec<(String, f64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8).map(|i| scope.spawn(move || request(i))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let eight = results.iter().map(|(_, t)| t).sum::<f64>() / started.elapsed().as_secs_f64();
    (one, eight, results.into_iter().map(|(t, _)| t).collect())
}

/// Per worker process the server started (its children): current and peak resident bytes
/// (`VmRSS`, `VmHWM`).
pub fn worker_memory(server: &Server) -> Vec<(u64, u64)> {
    let parent = server.child.id().to_string();
    let field = |status: &str, key: &str| tp::worker::proc_kb_field(status, key).unwrap_or(0);
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let ppid = status.lines().find_map(|l| l.strip_prefix("PPid:"));
        if ppid.map(str::trim) == Some(parent.as_str()) {
            out.push((field(&status, "VmRSS:"), field(&status, "VmHWM:")));
        }
    }
    out
}
