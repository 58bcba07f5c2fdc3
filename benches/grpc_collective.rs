//! # grpc_collective: the network AllReduce next to a raw TCP round trip
//!
//! Measures `tp::transport::grpc` the way a worker drives it: each rank is a thread with its
//! own data-plane socket that calls the synchronous collective (which drives its own
//! connections). Next to it,
//! a TCP ping-pong between two threads moves the same number of bytes each way over the same
//! path (a round trip: the floor for any exchange of that size). The issue's target is an
//! AllReduce median at most 2× that round trip.
//!
//! ```sh
//! cargo bench --bench grpc_collective
//! cargo bench --bench grpc_collective -- --ranks 2 --sizes 576,16384 --host 127.0.0.1
//! ```
//!
//! `--host` picks the address every rank listens on (default 127.0.0.1, loopback). Across
//! network namespaces, run `tests/netns.rs`, whose report includes the same measurement.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use tp::transport::grpc::{GrpcCollective, GrpcSpec, Registry, SECRET_BYTES, SyncPrecision};
use tp::transport::{Collective, CollectiveLimits};

#[derive(Parser, Debug)]
#[command(name = "grpc_collective")]
struct Args {
    #[arg(long, value_delimiter = ',', default_values_t = [2usize, 3, 4])]
    ranks: Vec<usize>,
    /// Buffer lengths in f32 values.
    #[arg(long, value_delimiter = ',', default_values_t = [576usize, 896, 4096, 16384])]
    sizes: Vec<usize>,
    #[arg(long, default_value_t = 2000)]
    iters: usize,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Added by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

struct Stats {
    median_us: f64,
    p99_us: f64,
}

fn stats(mut ns: Vec<u64>) -> Stats {
    ns.sort_unstable();
    let p99 = ns[(ns.len() * 99).div_ceil(100).max(1) - 1];
    Stats {
        median_us: ns[ns.len() / 2] as f64 / 1e3,
        p99_us: p99 as f64 / 1e3,
    }
}

/// Round trips of `bytes` each way between two threads over TCP (no delay), the two threads
/// pinned to the CPUs given (the same one, or two).
fn tcp_ping_pong(host: &str, bytes: usize, iters: usize, cpus: [usize; 2]) -> Result<Stats> {
    let listener = TcpListener::bind((host, 0))?;
    let address = listener.local_addr()?;
    let allowed = tp::kernels::pool::allowed_cpus();
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        tp::kernels::pool::set_affinity(&[cpus[1]])?;
        let (mut stream, _) = listener.accept()?;
        stream.set_nodelay(true)?;
        let mut buffer = vec![0u8; bytes];
        loop {
            if stream.read_exact(&mut buffer).is_err() {
                return Ok(());
            }
            stream.write_all(&buffer)?;
        }
    });
    tp::kernels::pool::set_affinity(&[cpus[0]])?;
    let mut stream = TcpStream::connect(address)?;
    stream.set_nodelay(true)?;
    let mut buffer = vec![1u8; bytes];
    let mut samples = Vec::with_capacity(iters);
    for i in 0..iters + iters / 10 {
        let started = Instant::now();
        stream.write_all(&buffer)?;
        stream.read_exact(&mut buffer)?;
        if i >= iters / 10 {
            samples.push(started.elapsed().as_nanos() as u64);
        }
    }
    drop(stream);
    echo.join().expect("echo thread").context("echo")?;
    tp::kernels::pool::set_affinity(&allowed)?;
    Ok(stats(samples))
}

fn measure_allreduce(args: &Args, ranks: usize) -> Result<Vec<(usize, Stats)>> {
    let listeners: Vec<std::net::TcpListener> = (0..ranks)
        .map(|_| std::net::TcpListener::bind((args.host.as_str(), 0)))
        .collect::<std::io::Result<_>>()?;
    let addresses: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()))
        .collect::<std::io::Result<_>>()?;
    let threads: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let spec = GrpcSpec {
                members: (0..ranks as u32).collect(),
                group: (0..ranks as u32).collect(),
                previous: None,
                next: None,
                addresses: addresses.clone(),
                rank: rank as u32,
                secret: vec![1; SECRET_BYTES],
                generation: 1,
                precision: SyncPrecision::Full,
                limits: CollectiveLimits {
                    timeout: Duration::from_secs(10),
                    ..CollectiveLimits::default()
                },
                tls: None,
            };
            let sizes = args.sizes.clone();
            let iters = args.iters;
            std::thread::spawn(move || -> Result<Vec<(usize, Stats)>> {
                let counters = Arc::new((0..ranks).map(|_| AtomicU64::new(0)).collect());
                let registry = Arc::new(Registry::default());
                let mut c = GrpcCollective::connect(spec, registry, &listener, counters)?;
                let mut out = Vec::new();
                let mut step = 1;
                for &size in &sizes {
                    let mut buffer = vec![0f32; size];
                    let mut samples = Vec::with_capacity(iters);
                    for i in 0..iters + iters / 10 {
                        if i % 1000 == 0 {
                            c.begin_step(step);
                            step += 1;
                        }
                        let started = Instant::now();
                        c.all_reduce_sum(&mut buffer)?;
                        if i >= iters / 10 {
                            samples.push(started.elapsed().as_nanos() as u64);
                        }
                    }
                    out.push((size, stats(samples)));
                }
                Ok(out)
            })
        })
        .collect();
    let mut results = Vec::new();
    for (rank, thread) in threads.into_iter().enumerate() {
        let series = thread.join().expect("rank thread")?;
        if rank == 0 {
            results = series;
        }
    }
    Ok(results)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "# grpc_collective: tp::transport::grpc AllReduce (f32, full precision) on {}, {} timed \
         calls per series after {} warm-up calls; rank 0's latencies. nproc {cores}: one thread \
         per rank, so more ranks than cores share them.",
        args.host,
        args.iters,
        args.iters / 10
    );
    println!(
        "# TCP round trip: the same bytes each way between two threads over one TCP connection \
         (TCP_NODELAY), same address; threads pinned to two different CPUs (as peers on two \
         hosts run), and for reference to one CPU. AllReduce / TCP uses the former."
    );
    println!();
    println!(
        "| ranks | f32 values | bytes | AllReduce median µs | p99 µs | TCP round trip median µs (2 CPUs) | p99 µs | TCP median µs (1 CPU) | AllReduce / TCP |"
    );
    println!("|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    let cpus = tp::kernels::pool::allowed_cpus();
    let (first, second) = (cpus[0], *cpus.get(1).unwrap_or(&cpus[0]));
    let mut floors = Vec::new();
    for &size in &args.sizes {
        floors.push((
            tcp_ping_pong(&args.host, size * 4, args.iters, [first, second])?,
            tcp_ping_pong(&args.host, size * 4, args.iters, [first, first])?,
        ));
    }
    for &ranks in &args.ranks {
        let series = measure_allreduce(&args, ranks)
            .with_context(|| format!("AllReduce between {ranks} ranks"))?;
        for ((size, s), (floor, same_cpu)) in series.iter().zip(&floors) {
            println!(
                "| {ranks} | {size} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |",
                size * 4,
                s.median_us,
                s.p99_us,
                floor.median_us,
                floor.p99_us,
                same_cpu.median_us,
                s.median_us / floor.median_us
            );
        }
    }
    Ok(())
}
