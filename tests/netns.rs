//! Across hosts, on one machine: network namespaces joined to a bridge by veth pairs play the
//! hosts, a worker runs in each, and the coordinator (this process) stays outside.
//!
//! Needs root and iproute2 (`ip netns`, `ip link`); without them the tests say so and pass,
//! except under CI, where they fail. Each test uses its own subnet and names derived from the
//! process id, and removes everything it made when it ends (also on panic).

mod common;

use std::time::{Duration, Instant};

use common::net::{Net, run};
use common::*;
use tp::coordinator::cluster::{Cluster, ClusterLimits, TransportChoice};
use tp::coordinator::sampler::SamplingParams;
use tp::coordinator::session::{GenerateRequest, Model, Session};
use tp::transport::grpc::SyncPrecision;

const WORKER_PORT: u16 = 7070;

async fn remote_session(
    path: &std::path::Path,
    addresses: &[String],
    precision: SyncPrecision,
    limits: ClusterLimits,
) -> Session {
    remote_session_over(path, addresses, precision, limits, TransportChoice::Grpc).await
}

async fn remote_session_over(
    path: &std::path::Path,
    addresses: &[String],
    precision: SyncPrecision,
    limits: ClusterLimits,
    expected: TransportChoice,
) -> Session {
    let mut cluster = Cluster::connect(&worker_entries(addresses), limits)
        .await
        .unwrap();
    cluster.sync_precision = precision;
    let session = Session::start(Model::open(path).unwrap(), cluster, 256, 64)
        .await
        .unwrap();
    assert_eq!(
        session.cluster.active_transport(),
        Some(expected),
        "the transport chosen by topology"
    );
    session
}

const PROMPT: &str = "The quick brown fox jumps over the lazy dog because";

/// Data-plane bytes rank 0 sends to rank 1 per generated token: two generations of
/// different lengths, so the prompt's step cancels out.
async fn bytes_per_token(session: &mut Session) -> f64 {
    let mut sent = Vec::new();
    for n in [8usize, 24] {
        let before = session.cluster.stats().await.unwrap()[0].data_plane_bytes_sent[1];
        greedy(session, n).await.unwrap();
        let after = session.cluster.stats().await.unwrap()[0].data_plane_bytes_sent[1];
        sent.push((after - before) as f64);
    }
    (sent[1] - sent[0]) / 16.0
}

async fn greedy(session: &mut Session, n: usize) -> anyhow::Result<(Vec<u32>, f64)> {
    let prompt_tokens = session.model.tokenizer.encode(PROMPT, true).unwrap();
    session.clear().await?;
    let generation = session
        .generate(GenerateRequest {
            prompt_tokens,
            max_tokens: n,
            params: SamplingParams::greedy(),
            stop_strings: Vec::new(),
            logprobs: 0,
            on_text: None,
            cancelled: None,
        })
        .await?;
    Ok((
        generation.tokens,
        generation.timings.generated_tokens_per_second,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_across_namespaces_matches_one_host() {
    let Some(path) = model(SMOLLM2) else { return };
    let Some(mut net) = Net::new(1, 2) else {
        return;
    };
    let addresses: Vec<String> = (0..2).map(|h| net.start_worker(h, WORKER_PORT)).collect();

    let mut local = session(&path, &[1.0, 1.0], 256, 64).await;
    let (expected, local_speed) = greedy(&mut local, 24).await.unwrap();
    let prompt = local.model.tokenizer.encode(PROMPT, true).unwrap();
    let local_logits = local.final_logits(&prompt).await.unwrap();
    local.cluster.shutdown().await;

    let mut remote = remote_session(
        &path,
        &addresses,
        SyncPrecision::Full,
        ClusterLimits::default(),
    )
    .await;
    let (tokens, speed) = greedy(&mut remote, 24).await.unwrap();
    assert_eq!(
        tokens, expected,
        "full-precision wire must give one host's tokens"
    );
    let logits = remote.final_logits(&prompt).await.unwrap();
    assert_eq!(
        nmse(&local_logits, &logits),
        0.0,
        "full precision changes no bits"
    );
    let per_token = bytes_per_token(&mut remote).await;
    println!(
        "2 namespaces, full wire: {speed:.1} generated tokens/s (one host, shm: {local_speed:.1}); \
         {per_token:.0} bytes per generated token on the link 0 -> 1"
    );
    drop(remote);

    // Lossy wires, on both models (a worker loads whichever model its cluster asks for).
    for name in [SMOLLM2, QWEN05] {
        let Some(path) = model(name) else { return };
        let mut local = session(&path, &[1.0, 1.0], 256, 64).await;
        let prompt = local.model.tokenizer.encode(PROMPT, true).unwrap();
        let local_logits = local.final_logits(&prompt).await.unwrap();
        local.cluster.shutdown().await;
        for precision in [SyncPrecision::F32, SyncPrecision::Bf16, SyncPrecision::Q8_0] {
            let mut lossy =
                remote_session(&path, &addresses, precision, ClusterLimits::default()).await;
            let logits = lossy.final_logits(&prompt).await.unwrap();
            let e = nmse(&local_logits, &logits);
            let (_, speed) = greedy(&mut lossy, 24).await.unwrap();
            let per_token = bytes_per_token(&mut lossy).await;
            println!(
                "{name}, 2 namespaces, {} wire: final-logit NMSE vs one host {e:.2e}, {speed:.1} \
                 generated tokens/s, {per_token:.0} bytes per generated token on the link 0 -> 1",
                precision.name()
            );
            assert!(
                e < LOSSY_NMSE_BOUND,
                "{name}, {} wire: NMSE {e:.3e}",
                precision.name()
            );
        }
    }
}

/// Lossy wires perturb the partial sums; the next op re-quantizes its input to 8 bits, where
/// any perturbation flips some roundings, so even the f32 wire lands near the activation
/// quantizer's own noise (see docs/PERFORMANCE.md). The bound is that noise level.
const LOSSY_NMSE_BOUND: f64 = 1e-2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_taken_down_fails_the_step_then_the_cluster_recovers() {
    let Some(path) = model(SMOLLM2) else { return };
    let Some(mut net) = Net::new(2, 2) else {
        return;
    };
    let addresses: Vec<String> = (0..2).map(|h| net.start_worker(h, WORKER_PORT)).collect();
    // Every deadline at its default: a worker cut off from the coordinator is noticed by the
    // control plane's HTTP/2 pings, a peer cut off from the other by the collective deadline.
    let limits = ClusterLimits::default();
    let mut session = remote_session(&path, &addresses, SyncPrecision::Full, limits).await;
    let (expected, _) = greedy(&mut session, 16).await.unwrap();

    // Take host 1's link down while a long generation runs.
    let veth = net.veths[1].clone();
    let downer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let downed = Instant::now();
        run(&["ip", "link", "set", &veth, "down"]).unwrap();
        downed
    });
    let started = Instant::now();
    let failed = greedy(&mut session, 200).await;
    let ended = Instant::now();
    let downed = downer.join().unwrap();
    let err = failed.expect_err("a generation across a downed link must fail");
    let detection = ended.duration_since(downed);
    println!(
        "link down after {:?}: error after {detection:?}: {err:#}",
        downed.duration_since(started)
    );
    assert!(
        detection < Duration::from_secs(3),
        "the error took {detection:?} with the default deadlines (collective 2.5 s, \
         control-plane pings 0.5 s + 1.5 s)"
    );

    net.set_link(1, true);
    let mut recovered = None;
    let retry_started = Instant::now();
    for _ in 0..10 {
        match greedy(&mut session, 16).await {
            Ok((tokens, _)) => {
                recovered = Some(tokens);
                break;
            }
            Err(e) => {
                eprintln!("not yet: {e:#}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    let tokens = recovered.expect("the cluster works again once the link is back");
    println!(
        "recovered {:?} after the link came back",
        retry_started.elapsed()
    );
    assert_eq!(tokens, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_here_and_one_there_run_hierarchically() {
    let Some(path) = model(SMOLLM2) else { return };
    let Some(mut net) = Net::new(3, 2) else {
        return;
    };
    let addresses = vec![
        net.start_worker(0, WORKER_PORT),
        net.start_worker(0, WORKER_PORT + 1),
        net.start_worker(1, WORKER_PORT),
    ];
    let mut local = session(&path, &[1.0, 1.0, 1.0], 256, 64).await;
    let (expected, local_speed) = greedy(&mut local, 24).await.unwrap();
    local.cluster.shutdown().await;

    let mut remote = remote_session_over(
        &path,
        &addresses,
        SyncPrecision::Full,
        ClusterLimits::default(),
        TransportChoice::Hierarchical,
    )
    .await;
    assert_eq!(remote.cluster.hosts(), vec![vec![0, 1], vec![2]]);
    let (tokens, speed) = greedy(&mut remote, 24).await.unwrap();
    let sent = remote.cluster.stats().await.unwrap();
    println!(
        "hierarchical (2 + 1 workers): {speed:.1} generated tokens/s (3 workers on one host: \
         {local_speed:.1}); data-plane bytes sent per worker and peer: {:?}",
        sent.iter()
            .map(|s| s.data_plane_bytes_sent.clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(
        tokens, expected,
        "hierarchical sums keep rank order for 2 + 1 workers"
    );
    // Only the leaders (ranks 0 and 2) send over the network.
    assert!(sent[1].data_plane_bytes_sent.iter().all(|&b| b == 0));
    assert!(sent[0].data_plane_bytes_sent[2] > 0 && sent[2].data_plane_bytes_sent[0] > 0);
}

/// Addresses that reach the workers at `direct` (data planes on `data_ports`) through delay
/// proxies on the bridge. The coordinator reaches worker h through a proxy on the bridge's
/// address, and so do the peers' data planes: a worker's data-plane address is its control
/// address's host with its data port, so each data port gets a proxy on that port as well.
async fn delayed_addresses(
    net: &Net,
    direct: &[String],
    data_ports: &[u16],
    delay: Duration,
) -> Vec<String> {
    let mut proxied = Vec::new();
    for (h, target) in direct.iter().enumerate() {
        let listener = tokio::net::TcpListener::bind(format!("{}.1:0", net.subnet))
            .await
            .unwrap();
        proxied.push(listener.local_addr().unwrap().to_string());
        tokio::spawn(delay_proxy(listener, target.clone(), delay));
        let data = tokio::net::TcpListener::bind(format!("{}.1:{}", net.subnet, data_ports[h]))
            .await
            .unwrap();
        let data_target = format!("{}:{}", net.host_ip(h), data_ports[h]);
        tokio::spawn(delay_proxy(data, data_target, delay));
    }
    proxied
}

/// Forwards every connection to `listener` on to `target`, holding each chunk for `delay`
/// in both directions: a one-way delay on the path, for kernels without netem.
async fn delay_proxy(listener: tokio::net::TcpListener, target: String, delay: Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        delay: Duration,
    ) {
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
        let writer = tokio::spawn(async move {
            while let Some((due, chunk)) = rx.recv().await {
                tokio::time::sleep_until(due).await;
                if to.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
        let mut buffer = vec![0u8; 64 * 1024];
        while let Ok(n) = from.read(&mut buffer).await {
            if n == 0
                || tx
                    .send((tokio::time::Instant::now() + delay, buffer[..n].to_vec()))
                    .is_err()
            {
                break;
            }
        }
        drop(tx);
        let _ = writer.await;
    }
    while let Ok((inbound, _)) = listener.accept().await {
        let target = target.clone();
        tokio::spawn(async move {
            let Ok(outbound) = tokio::net::TcpStream::connect(&target).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (in_read, in_write) = inbound.into_split();
            let (out_read, out_write) = outbound.into_split();
            tokio::join!(
                pipe(in_read, out_write, delay),
                pipe(out_read, in_write, delay)
            );
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_completes_with_1ms_link_delay() {
    let Some(path) = model(SMOLLM2) else { return };
    let Some(mut net) = Net::new(4, 2) else {
        return;
    };
    // Fixed, distinct data-plane ports, so that the proxies below can stand in for them.
    let data_ports = [WORKER_PORT + 100, WORKER_PORT + 101];
    let direct: Vec<String> = (0..2)
        .map(|h| {
            let port = data_ports[h].to_string();
            net.start_worker_with(h, WORKER_PORT, &["--data-port", &port])
        })
        .collect();
    let mut speeds = Vec::new();
    let mut session = remote_session(
        &path,
        &direct,
        SyncPrecision::Full,
        ClusterLimits::default(),
    )
    .await;
    let (expected, speed) = greedy(&mut session, 32).await.unwrap();
    speeds.push(("no delay", "full", speed));
    drop(session);

    // 1 ms each way on every worker's link: netem where the kernel has it, else a proxy in
    // the root namespace that every connection to a worker goes through.
    let netem = net.veths.iter().all(|veth| {
        run(&[
            "tc", "qdisc", "add", "dev", veth, "root", "netem", "delay", "1ms",
        ])
        .is_ok()
    });
    let addresses: Vec<String> = if netem {
        direct.clone()
    } else {
        delayed_addresses(&net, &direct, &data_ports, Duration::from_millis(1)).await
    };
    let method = if netem {
        "netem delay 1ms"
    } else {
        "1 ms delay proxy (no netem in this kernel)"
    };
    for precision in [SyncPrecision::Full, SyncPrecision::F32, SyncPrecision::Q8_0] {
        let mut delayed =
            remote_session(&path, &addresses, precision, ClusterLimits::default()).await;
        let (tokens, speed) = greedy(&mut delayed, 32).await.unwrap();
        if precision == SyncPrecision::Full {
            assert_eq!(tokens, expected, "a slow link changes no tokens");
        }
        speeds.push(("1 ms each way", precision.name(), speed));
    }
    for (delay, wire, speed) in speeds {
        println!("2 namespaces, {delay} ({method}), {wire} wire: {speed:.1} generated tokens/s");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_the_model_gets_its_shard_streamed_then_cached() {
    let Some(path) = model(SMOLLM2) else { return };
    let Some(mut net) = Net::new(5, 2) else {
        return;
    };
    let cache = std::env::temp_dir().join(format!("tp-netns-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let cache_arg = cache.display().to_string();

    let mut local = session(&path, &[1.0, 1.0], 256, 64).await;
    let (expected, _) = greedy(&mut local, 16).await.unwrap();
    local.cluster.shutdown().await;

    let file_size = std::fs::metadata(&path).unwrap().len();
    let mut streamed = Vec::new();
    for round in 0..2 {
        // Host 1 has no copy of the model: its worker is told a path that does not exist.
        let addresses = vec![
            net.start_worker(0, WORKER_PORT + round),
            net.start_worker_with(1, WORKER_PORT + round, &["--cache-dir", &cache_arg]),
        ];
        let mut entries = worker_entries(&addresses);
        entries[1].model_path = Some("/nonexistent/model.gguf".into());
        let cluster = Cluster::connect(&entries, ClusterLimits::default())
            .await
            .unwrap();
        let mut session = Session::start(Model::open(&path).unwrap(), cluster, 256, 64)
            .await
            .unwrap();
        let sent = session.cluster.streamed_bytes().to_vec();
        let (tokens, _) = greedy(&mut session, 16).await.unwrap();
        assert_eq!(
            tokens, expected,
            "round {round}: a streamed shard gives the same tokens"
        );
        println!(
            "round {round}: model bytes streamed per worker {sent:?} (file: {file_size} bytes)"
        );
        streamed.push(sent);
        drop(session);
        // Restart the workers: the second round starts from the cache alone.
        for child in &mut net.workers {
            let _ = child.kill();
            let _ = child.wait();
        }
        net.workers.clear();
    }
    assert_eq!(streamed[0][0], 0, "host 0 has the file");
    assert!(
        streamed[0][1] > 0 && streamed[0][1] < file_size * 3 / 4,
        "host 1 gets its shard's bytes only: {}",
        streamed[0][1]
    );
    assert_eq!(streamed[1], vec![0, 0], "the restart loads from the cache");
    std::fs::remove_dir_all(&cache).unwrap();
}

/// Moves the calling thread into network namespace `name` (made by `ip netns add`).
fn enter_namespace(name: &str) {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(format!("/var/run/netns/{name}")).unwrap();
    // SAFETY: setns takes a namespace file descriptor we own; it changes only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {name}: {}", std::io::Error::last_os_error());
}

fn median_us(mut ns: Vec<u64>) -> (f64, f64) {
    ns.sort_unstable();
    let p99 = ns[(ns.len() * 99).div_ceil(100) - 1];
    (ns[ns.len() / 2] as f64 / 1e3, p99 as f64 / 1e3)
}

/// The gRPC AllReduce between ranks in different namespaces (one thread per rank, each moved
/// into its namespace), next to a TCP round trip of the same bytes between two namespaces.
/// A benchmark, run on demand:
/// `cargo test --release --test netns -- --ignored --nocapture latency_across_namespaces`
#[test]
#[ignore]
fn grpc_allreduce_latency_across_namespaces() {
    use std::io::{Read, Write};
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;
    use tp::transport::Collective;
    use tp::transport::CollectiveLimits;
    use tp::transport::grpc::{GrpcCollective, GrpcSpec, Registry, SECRET_BYTES};
    const SIZES: [usize; 4] = [576, 896, 4096, 16384];
    const ITERS: usize = 2000;
    println!(
        "| ranks | f32 values | AllReduce median / p99 µs | TCP round trip median / p99 µs | ratio |"
    );
    println!("|--:|--:|--:|--:|--:|");
    for ranks in [2usize, 3, 4] {
        let Some(net) = Net::new(10 + ranks as u8, ranks) else {
            return;
        };
        // TCP floor: a client in namespace 0, an echo server in namespace 1.
        let mut floors = Vec::new();
        for &size in &SIZES {
            let (ns0, ns1, ip1) = (
                net.namespaces[0].clone(),
                net.namespaces[1].clone(),
                net.host_ip(1),
            );
            let (tx, rx) = std::sync::mpsc::channel();
            let echo = std::thread::spawn(move || {
                enter_namespace(&ns1);
                let listener = std::net::TcpListener::bind((ip1.as_str(), 0)).unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let (mut s, _) = listener.accept().unwrap();
                s.set_nodelay(true).unwrap();
                let mut buffer = vec![0u8; size * 4];
                while s.read_exact(&mut buffer).is_ok() {
                    s.write_all(&buffer).unwrap();
                }
            });
            let address = rx.recv().unwrap();
            let client = std::thread::spawn(move || {
                enter_namespace(&ns0);
                let mut s = std::net::TcpStream::connect(address).unwrap();
                s.set_nodelay(true).unwrap();
                let mut buffer = vec![1u8; size * 4];
                let mut samples = Vec::new();
                for i in 0..ITERS + ITERS / 10 {
                    let started = Instant::now();
                    s.write_all(&buffer).unwrap();
                    s.read_exact(&mut buffer).unwrap();
                    if i >= ITERS / 10 {
                        samples.push(started.elapsed().as_nanos() as u64);
                    }
                }
                median_us(samples)
            });
            floors.push(client.join().unwrap());
            echo.join().unwrap();
        }
        // The collective: rank r in namespace r.
        let (address_tx, address_rx) = std::sync::mpsc::channel();
        let mut go = Vec::new();
        let mut threads = Vec::new();
        for rank in 0..ranks {
            let (ns, ip) = (net.namespaces[rank].clone(), net.host_ip(rank));
            let address_tx = address_tx.clone();
            let (go_tx, go_rx) = std::sync::mpsc::channel::<Vec<String>>();
            go.push(go_tx);
            threads.push(std::thread::spawn(move || {
                enter_namespace(&ns);
                let listener = std::net::TcpListener::bind((ip.as_str(), 0)).unwrap();
                address_tx
                    .send((rank, listener.local_addr().unwrap().to_string()))
                    .unwrap();
                let addresses = go_rx.recv().unwrap();
                let spec = GrpcSpec {
                    members: (0..ranks as u32).collect(),
                    group: (0..ranks as u32).collect(),
                    previous: None,
                    next: None,
                    addresses,
                    rank: rank as u32,
                    secret: vec![3; SECRET_BYTES],
                    generation: 1,
                    precision: SyncPrecision::Full,
                    limits: CollectiveLimits {
                        timeout: Duration::from_secs(10),
                        ..CollectiveLimits::default()
                    },
                    tls: None,
                };
                let counters = Arc::new((0..ranks).map(|_| AtomicU64::new(0)).collect());
                let mut c = GrpcCollective::connect(
                    spec,
                    Arc::new(Registry::default()),
                    &listener,
                    counters,
                )
                .unwrap();
                let mut out = Vec::new();
                let mut step = 1;
                for &size in &SIZES {
                    let mut buffer = vec![0f32; size];
                    let mut samples = Vec::new();
                    for i in 0..ITERS + ITERS / 10 {
                        if i % 1000 == 0 {
                            c.begin_step(step);
                            step += 1;
                        }
                        let started = Instant::now();
                        c.all_reduce_sum(&mut buffer).unwrap();
                        if i >= ITERS / 10 {
                            samples.push(started.elapsed().as_nanos() as u64);
                        }
                    }
                    out.push(median_us(samples));
                }
                out
            }));
        }
        let mut addresses = vec![String::new(); ranks];
        for _ in 0..ranks {
            let (rank, address) = address_rx.recv().unwrap();
            addresses[rank] = address;
        }
        for g in &go {
            g.send(addresses.clone()).unwrap();
        }
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        for ((&size, (median, p99)), (floor, floor_p99)) in
            SIZES.iter().zip(&results[0]).zip(&floors)
        {
            println!(
                "| {ranks} | {size} | {median:.1} / {p99:.1} | {floor:.1} / {floor_p99:.1} | {:.2} |",
                median / floor
            );
        }
    }
}

/// PP = 2 across two namespaces (one worker each, a stage per host): the handoff crosses the
/// link, and the logits and greedy tokens are one worker's, bit for bit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_stages_across_namespaces_match_one_worker() {
    let Some(path) = model(SMOLLM2) else { return };
    let Some(mut net) = Net::new(20, 2) else {
        return;
    };
    let addresses: Vec<String> = (0..2).map(|h| net.start_worker(h, WORKER_PORT)).collect();
    let mut local = session(&path, &[1.0], 256, 64).await;
    let (expected, _) = greedy(&mut local, 24).await.unwrap();
    let prompt = local.model.tokenizer.encode(PROMPT, true).unwrap();
    let local_logits = local.final_logits(&prompt).await.unwrap();
    local.cluster.shutdown().await;

    let mut cluster = Cluster::connect(&worker_entries(&addresses), ClusterLimits::default())
        .await
        .unwrap();
    cluster.pipeline = tp::coordinator::cluster::Pipeline::PerHost;
    let mut piped = Session::start(Model::open(&path).unwrap(), cluster, 256, 64)
        .await
        .unwrap();
    assert_eq!(piped.plan.stages.len(), 2, "one stage per namespace");
    let (tokens, speed) = greedy(&mut piped, 24).await.unwrap();
    assert_eq!(tokens, expected);
    let logits = piped.final_logits(&prompt).await.unwrap();
    let differing = local_logits
        .iter()
        .zip(&logits)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(differing, 0, "stages across hosts change no bits");
    // The handoff is the only traffic: rank 0 sends rank 1 one residual row per token.
    let per_token = bytes_per_token(&mut piped).await;
    println!(
        "2 namespaces, PP = 2: {speed:.1} generated tokens/s, {per_token:.0} bytes per generated token on the link 0 -> 1"
    );
    assert!(
        per_token < 4.0 * 576.0 + 200.0,
        "one residual row per token crosses the boundary, not {per_token} bytes"
    );
}

/// Pipeline stages against tensor parallelism across two namespaces, with and without 1 ms
/// of delay each way on every link (the delay proxy: this kernel may lack netem), through the
/// server: one stream, and eight at once. A benchmark; by hand:
/// `cargo test --release --test netns pipeline_speed -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark (minutes): run by hand with --ignored --nocapture"]
async fn pipeline_speed_across_namespaces() {
    let mut table = Vec::new();
    for (index, name) in [SMOLLM2, QWEN05].into_iter().enumerate() {
        let Some(path) = model(name) else { return };
        let Some(mut net) = Net::new(21 + index as u8, 2) else {
            return;
        };
        let data_ports = [WORKER_PORT + 200, WORKER_PORT + 201];
        let direct: Vec<String> = (0..2)
            .map(|h| {
                let port = data_ports[h].to_string();
                net.start_worker_with(h, WORKER_PORT, &["--data-port", &port])
            })
            .collect();
        let proxied = delayed_addresses(&net, &direct, &data_ports, Duration::from_millis(1)).await;
        let dir = std::env::temp_dir().join(format!("tp-pp-speed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (delay, addresses) in [("none", &direct), ("1 ms each way", &proxied)] {
            // The links' round trip as the coordinator measures it (the simulator's input).
            let probe = Cluster::connect(&worker_entries(addresses), ClusterLimits::default())
                .await
                .unwrap();
            let trips: Vec<f64> = probe
                .workers
                .iter()
                .map(|w| w.round_trip.as_secs_f64() * 1e3)
                .collect();
            println!("{name}, link delay {delay}: Hello round trips {trips:.2?} ms");
            drop(probe);
            let mut texts: Option<Vec<String>> = None;
            for parallelism in ["tensor", "pipeline"] {
                let mut toml = format!("parallelism = \"{parallelism}\"\n");
                for a in addresses.iter() {
                    toml.push_str(&format!("\n[[worker]]\naddress = \"{a}\"\nthreads = 1\n"));
                }
                let file = dir.join(format!("{parallelism}.toml"));
                std::fs::write(&file, toml).unwrap();
                let args = [
                    "--model".to_string(),
                    path.display().to_string(),
                    "--workers".into(),
                    file.display().to_string(),
                    "--parallel".into(),
                    "8".into(),
                    "-c".into(),
                    "512".into(),
                ];
                let (one, eight, outputs) = tokio::task::spawn_blocking(move || {
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    let server = common::server::start_with(&args);
                    common::server::load_speed(&server)
                })
                .await
                .unwrap();
                match &texts {
                    None => texts = Some(outputs),
                    Some(expected) => assert_eq!(&outputs, expected, "{name} {delay}"),
                }
                println!("{name} | {delay} | {parallelism} | {one:.1} | {eight:.1}");
                table.push((name, delay, parallelism, one, eight));
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }
    println!("| model | link delay | parallelism | 1 stream t/s | 8 streams t/s (aggregate) |");
    println!("|---|---|---|--:|--:|");
    for (name, delay, parallelism, one, eight) in table {
        println!("| {name} | {delay} | {parallelism} | {one:.1} | {eight:.1} |");
    }
}
