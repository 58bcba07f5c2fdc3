//! Faults a coordinator must survive without crashing or hanging, and what operators rely on:
//! a worker that panics in a step (it exits; the cluster re-forms once it is back, and only
//! that worker reads its weights again), workers that lie (another protocol, replies that do
//! not fit the request or the plan), `plan`'s KV figure against the workers' own, and the
//! HTTP API's key and HTTPS.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::server::{Server, http_with, start_with, start_worker, start_worker_env};
use common::*;
use tonic::{Request, Response, Status};
use tp::auth::Token;
use tp::coordinator::cluster::{Cluster, ClusterLimits};
use tp::coordinator::session::{Model, Session};
use tp::proto;

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn greedy(session: &mut Session, n: usize) -> anyhow::Result<Vec<u32>> {
    greedy_tokens(session, "Once upon a time", n).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_panics_exits_and_only_it_loads_again() {
    let Some(path) = model(SMOLLM2) else { return };
    let dir = scratch("panic");
    let token = dir.join("token");
    std::fs::write(&token, "panic-test-token-0123456789\n").unwrap();
    let logs = [dir.join("w0.log"), dir.join("w1.log")];
    // 16 tokens from a one-step prompt are 16 steps; worker 1 panics in the 20th, inside the
    // second generation.
    let survivor = start_worker("127.0.0.1:0", &token, &logs[0]);
    let mut victim = start_worker_env(
        "127.0.0.1:0",
        &token,
        &logs[1],
        &[("TP_TEST_PANIC_AT_STEP", "20")],
    );
    let addresses = vec![survivor.address.clone(), victim.address.clone()];
    let limits = ClusterLimits {
        auth_token: Some(Token::read(&token).unwrap()),
        ..ClusterLimits::default()
    };
    let cluster = Cluster::connect(&worker_entries(&addresses), limits)
        .await
        .unwrap();
    let mut session = Session::start(Model::open(&path).unwrap(), cluster, 256, 64)
        .await
        .unwrap();
    let reference = greedy(&mut session, 16).await.unwrap();

    // The panic ends the worker process; the step fails naming it.
    let mut child = std::mem::replace(&mut victim.child, Command::new("true").spawn().unwrap());
    let exited = Arc::new(Mutex::new(None));
    let watcher = {
        let exited = exited.clone();
        std::thread::spawn(move || {
            let status = child.wait().unwrap();
            *exited.lock().unwrap() = Some(Instant::now());
            status
        })
    };
    let error = greedy(&mut session, 16)
        .await
        .expect_err("a generation across a panicking worker fails");
    let failed_at = Instant::now();
    let status = watcher.join().unwrap();
    let exited = exited.lock().unwrap().expect("the worker exited");
    assert_eq!(
        status.code(),
        Some(101),
        "the worker exits with 101 on a panic"
    );
    let detection = failed_at.saturating_duration_since(exited);
    println!("worker panicked: process exit -> coordinator error in {detection:?}: {error:#}");
    assert!(
        detection < Duration::from_secs(1),
        "the coordinator reported the worker {detection:?} after it exited"
    );
    assert!(format!("{error:#}").contains("worker 1"), "{error:#}");
    let log = std::fs::read_to_string(&logs[1]).unwrap();
    assert!(log.contains("TP_TEST_PANIC_AT_STEP"), "{log}");

    // The heartbeat names the missing worker (what /health reports).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let unready = session.cluster.health.unready();
        let (_, workers) = unready.expect("the cluster is not ready while a worker is gone");
        if workers.iter().any(|w| w.rank == 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the heartbeat never named worker 1"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        session.recover().await.is_err(),
        "no re-forming without worker 1"
    );

    // Restarted on its address: the cluster re-forms; the survivor keeps its shard.
    let _restarted = start_worker(&addresses[1], &token, &logs[1]);
    let started = Instant::now();
    while let Err(e) = session.recover().await {
        assert!(started.elapsed() < Duration::from_secs(30), "{e:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("re-formed {:?} after the restart", started.elapsed());
    let stats = session.cluster.stats().await.unwrap();
    assert_eq!(
        (stats[0].shard_loads, stats[0].shard_kept),
        (1, 1),
        "the survivor read its weights once and kept them when the cluster re-formed"
    );
    assert_eq!(
        (stats[1].shard_loads, stats[1].shard_kept),
        (1, 0),
        "the restarted worker loaded its shard"
    );
    assert_eq!(greedy(&mut session, 16).await.unwrap(), reference);
    assert!(session.cluster.health.unready().is_none());
    drop(survivor);
    let _ = std::fs::remove_dir_all(&dir);
}

/// How a fake worker lies.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Lie {
    Nothing,
    Protocol,
    RowCount,
    Epoch,
    VocabStart,
    CandidateOutsideSlice,
    LogitsWithoutIds,
}

/// A worker that answers every call as a real one would, except for its lie.
struct Liar {
    lie: Lie,
}

#[tonic::async_trait]
impl proto::worker_server::Worker for Liar {
    async fn hello(
        &self,
        _: Request<proto::HelloRequest>,
    ) -> Result<Response<proto::HelloReply>, Status> {
        Ok(Response::new(proto::HelloReply {
            version: "0.0.1-liar".into(),
            hostname: "liar".into(),
            pid: 1,
            protocol: if self.lie == Lie::Protocol {
                tp::PROTOCOL_VERSION + 1
            } else {
                tp::PROTOCOL_VERSION
            },
            device: "cpu".into(),
            ..Default::default()
        }))
    }

    async fn prepare_model(
        &self,
        request: Request<proto::PrepareModelRequest>,
    ) -> Result<Response<proto::PrepareModelReply>, Status> {
        Ok(Response::new(proto::PrepareModelReply {
            path: request.into_inner().model_path,
            source: "local copy".into(),
            missing: Vec::new(),
        }))
    }

    async fn push_model(
        &self,
        _: Request<tonic::Streaming<proto::ModelChunk>>,
    ) -> Result<Response<proto::PushModelReply>, Status> {
        Err(Status::unimplemented("not asked"))
    }

    async fn load_shard(
        &self,
        _: Request<proto::LoadShardRequest>,
    ) -> Result<Response<proto::LoadShardReply>, Status> {
        Ok(Response::new(proto::LoadShardReply::default()))
    }

    async fn step(
        &self,
        request: Request<proto::StepRequest>,
    ) -> Result<Response<proto::StepReply>, Status> {
        let request = request.into_inner();
        let row = proto::RowOutput {
            ids: vec![7],
            logits: vec![1.0],
            log_sum_exp: 2.0,
            ..Default::default()
        };
        let mut reply = proto::StepReply {
            rows: vec![row; request.output_rows.len()],
            step: request.step,
            ..Default::default()
        };
        match self.lie {
            Lie::Nothing | Lie::Protocol => {}
            Lie::RowCount => {
                reply.rows.pop();
            }
            Lie::Epoch => reply.step += 3,
            Lie::VocabStart => reply.vocab_start = 5,
            Lie::CandidateOutsideSlice => reply.rows[0].ids[0] = u32::MAX,
            Lie::LogitsWithoutIds => reply.rows[0].ids.clear(),
        }
        Ok(Response::new(reply))
    }

    async fn clear_sequence(
        &self,
        _: Request<proto::ClearSequenceRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        Ok(Response::new(proto::Empty {}))
    }

    async fn save_sequence(
        &self,
        _: Request<proto::SaveSequenceRequest>,
    ) -> Result<Response<proto::SaveSequenceReply>, Status> {
        Err(Status::unimplemented("a liar saves nothing"))
    }

    async fn restore_sequence(
        &self,
        _: Request<proto::RestoreSequenceRequest>,
    ) -> Result<Response<proto::RestoreSequenceReply>, Status> {
        Err(Status::unimplemented("a liar restores nothing"))
    }

    async fn stats(&self, _: Request<proto::Empty>) -> Result<Response<proto::StatsReply>, Status> {
        Ok(Response::new(proto::StatsReply::default()))
    }

    async fn shutdown(&self, _: Request<proto::Empty>) -> Result<Response<proto::Empty>, Status> {
        Ok(Response::new(proto::Empty {}))
    }

    async fn abort(
        &self,
        _: Request<proto::AbortRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        Ok(Response::new(proto::Empty {}))
    }

    async fn connect_peers(
        &self,
        _: Request<proto::ConnectPeersRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        Ok(Response::new(proto::Empty {}))
    }
}

async fn start_liar(lie: Lie) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(proto::worker_server::WorkerServer::new(Liar { lie }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_that_lie_get_clear_errors() {
    let Some(path) = model(SMOLLM2) else { return };
    // Told apart from the lies: an honest fake is served, so each error below is the lie's.
    let honest = start_liar(Lie::Nothing).await;
    let cluster = Cluster::connect(&worker_entries(&[honest]), ClusterLimits::default())
        .await
        .unwrap();
    let mut session = Session::start(Model::open(&path).unwrap(), cluster, 128, 32)
        .await
        .unwrap();
    let tokens = greedy(&mut session, 3).await.unwrap();
    assert_eq!(
        tokens,
        vec![7, 7, 7],
        "the honest fake's candidate is sampled"
    );

    let liar = start_liar(Lie::Protocol).await;
    let error = Cluster::connect(
        &worker_entries(std::slice::from_ref(&liar)),
        ClusterLimits::default(),
    )
    .await
    .err()
    .expect("a worker of another protocol is refused");
    let message = format!("{error:#}");
    println!("protocol: {message}");
    assert!(
        message.contains(&liar) && message.contains("protocol") && message.contains("0.0.1-liar"),
        "{message}"
    );

    for (lie, words) in [
        (Lie::RowCount, "rows"),
        (Lie::Epoch, "answered step"),
        (Lie::VocabStart, "vocabulary rows from 5"),
        (Lie::CandidateOutsideSlice, "outside its vocabulary rows"),
        (Lie::LogitsWithoutIds, "0 ids and 1 logits"),
    ] {
        let liar = start_liar(lie).await;
        let cluster = Cluster::connect(
            &worker_entries(std::slice::from_ref(&liar)),
            ClusterLimits::default(),
        )
        .await
        .unwrap();
        let mut session = Session::start(Model::open(&path).unwrap(), cluster, 128, 32)
            .await
            .unwrap();
        let error = greedy(&mut session, 3)
            .await
            .expect_err("a lying reply fails the step");
        let message = format!("{error:#}");
        println!("{lie:?}: {message}");
        assert!(
            message.contains("worker 0")
                && message.contains("bad step reply")
                && message.contains(words),
            "{lie:?}: {message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_reports_the_kv_cache_the_workers_allocate() {
    let Some(path) = model(SMOLLM2) else { return };
    let (context, slots) = (256, 3);
    let out = Command::new(coordinator_binary())
        .args(["plan", "--model", path.to_str().unwrap(), "--local", "2"])
        .args(["-c", &context.to_string(), "--parallel", &slots.to_string()])
        .args(["--format", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let planned: Vec<u64> = plan["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kv_cache_bytes"].as_u64().unwrap())
        .collect();

    let cluster = Cluster::spawn_local(&worker_binary(), &[1.0, 1.0], 1, ClusterLimits::default())
        .await
        .unwrap();
    let mut session =
        Session::start_with_sequences(Model::open(&path).unwrap(), cluster, context, 64, slots)
            .await
            .unwrap();
    let reported: Vec<u64> = session
        .cluster
        .stats()
        .await
        .unwrap()
        .iter()
        .map(|s| s.kv_cache_bytes)
        .collect();
    println!("KV cache per worker: plan {planned:?}, workers {reported:?}");
    assert_eq!(planned, reported);
    // 30 layers x 3 KV heads of 64, keys and values, F16, over both workers.
    assert_eq!(
        reported.iter().sum::<u64>(),
        30 * 3 * 64 * 2 * 2 * (context * slots) as u64
    );
    session.cluster.shutdown().await;
}

#[test]
fn the_api_key_guards_every_endpoint_but_health() {
    let Some(path) = model(SMOLLM2) else { return };
    let dir = scratch("api-key");
    let key_file = dir.join("api-key");
    let key = "sk-test-0123456789abcdef";
    std::fs::write(&key_file, format!("{key}\n")).unwrap();

    // Reachable from other hosts without a key: refused before loading anything.
    let out = Command::new(coordinator_binary())
        .args(["serve", "--model", path.to_str().unwrap(), "--local", "1"])
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--api-key-file") && stderr.contains("--no-api-key"),
        "{stderr}"
    );

    let server = start_with(&[
        "--model",
        path.to_str().unwrap(),
        "--local",
        "1",
        "-c",
        "256",
        "--api-key-file",
        key_file.to_str().unwrap(),
    ]);
    let body = r#"{"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}"#;
    let right = format!("Authorization: Bearer {key}\r\n");
    for (headers, expected) in [
        ("", 401),
        ("Authorization: Bearer sk-test-0123456789abcdeX\r\n", 401),
        ("Authorization: Bearer sk-test\r\n", 401),
        (&format!("Authorization: {key}\r\n"), 401),
        (right.as_str(), 200),
    ] {
        for (method, endpoint, body) in [
            ("POST", "/v1/completions", body),
            ("GET", "/v1/models", ""),
            ("GET", "/metrics", ""),
        ] {
            let (status, text) = http_with(&server, method, endpoint, headers, body);
            assert_eq!(
                status, expected,
                "{method} {endpoint} with {headers:?}: {text}"
            );
            if expected == 401 {
                let error: serde_json::Value = serde_json::from_str(&text).unwrap();
                assert_eq!(error["error"]["code"], "invalid_api_key", "{text}");
                assert_eq!(error["error"]["type"], "invalid_request_error", "{text}");
            }
        }
    }
    let (status, text) = http_with(&server, "GET", "/health", "", "");
    assert_eq!(status, 200, "/health needs no key: {text}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_api_serves_https() {
    let Some(path) = model(SMOLLM2) else { return };
    let dir = scratch("api-tls");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is installed (CI installs it)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let key_file = dir.join("api-key");
    std::fs::write(&key_file, "sk-tls-0123456789abcdef\n").unwrap();

    let mut child = Command::new(coordinator_binary())
        .args(["serve", "--model", path.to_str().unwrap(), "--local", "1"])
        .args(["--listen", "127.0.0.1:0", "-c", "256"])
        .arg("--api-key-file")
        .arg(&key_file)
        .arg("--api-tls-cert")
        .arg(&cert)
        .arg("--api-tls-key")
        .arg(&key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let address = loop {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "server exited");
        if let Some(rest) = line.strip_prefix("serving on https://") {
            break rest.split('/').next().unwrap().to_string();
        }
    };
    std::thread::spawn(move || {
        let mut sink = String::new();
        while stderr.read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    });
    let server = Server { child, address };
    // A plain-HTTP client gets no answer it could take for one.
    let mut plain = TcpStream::connect(&server.address).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let _ = plain.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/1.1 200"),
        "plain HTTP was served"
    );

    // Python's TLS client, trusting only this certificate.
    let client = r#"
import json, ssl, sys, time, urllib.request
base, cafile = sys.argv[1], sys.argv[2]
context = ssl.create_default_context(cafile=cafile)
for _ in range(600):
    try:
        with urllib.request.urlopen(base + "/health", context=context) as r:
            if r.status == 200:
                break
    except urllib.error.HTTPError as e:
        if e.code != 503:
            raise
    time.sleep(0.1)
body = json.dumps({"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}).encode()
request = urllib.request.Request(base + "/v1/completions", data=body, headers={
    "Content-Type": "application/json", "Authorization": "Bearer sk-tls-0123456789abcdef"})
with urllib.request.urlopen(request, context=context) as r:
    print(r.status, json.load(r)["choices"][0]["text"])
"#;
    let out = Command::new("python3")
        .args(["-c", client, &format!("https://{}", server.address)])
        .arg(&cert)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("200 "),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("over HTTPS: {stdout}");
    drop(server);
    let _ = std::fs::remove_dir_all(Path::new(&dir));
}
