//! `tp-coordinator bench`: prompt-processing and generation speed, measured the way llama.cpp's
//! `llama-bench` measures it, so the two can be put side by side.
//!
//! For every TP size and thread count a fresh local cluster is started. Each test repetition
//! clears the KV cache, fills `depth` tokens of context (not timed), then times either one batch
//! of `n_prompt` tokens (pp) or `n_gen` single-token decode steps (tg). One untimed warm-up run
//! precedes the repetitions of each test. Tokens are drawn at random from the vocabulary.
//!
//! Generation rows also give the effective weight-read bandwidth (the bytes of the weights one
//! token reads, times tokens/s) next to the machine's measured sequential read bandwidth with
//! as many threads (`kernels::membw`), so the distance to the physical limit is visible.

use crate::shard::cache::CacheType;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;

use crate::coordinator::cli::{ClusterArgs, Format, start_cluster_with};
use crate::coordinator::sampler::Rng;
use crate::coordinator::session::{Model, Session};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The GGUF model file.
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    /// Prompt sizes to time as one batch (comma-separated; 0 skips the pp test).
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "512"
    )]
    pub n_prompt: Vec<usize>,
    /// Generation lengths to time one token at a time (comma-separated; 0 skips the tg test).
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "128"
    )]
    pub n_gen: Vec<usize>,
    /// Context depths: tokens already in the KV cache when the timed part starts.
    #[arg(
        short = 'd',
        long = "n-depth",
        value_delimiter = ',',
        default_value = "0"
    )]
    pub depth: Vec<usize>,
    /// Numbers of local workers (tensor-parallel sizes) to start, one cluster each.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub tp: Vec<u32>,
    /// Compute threads per worker (comma-separated; default: the cores divided among the workers).
    #[arg(short = 't', long, value_delimiter = ',')]
    pub threads: Vec<usize>,
    /// Timed repetitions of each test.
    #[arg(short = 'r', long, default_value_t = 5)]
    pub repetitions: usize,
    /// Largest batch sent to the workers at once.
    #[arg(short = 'b', long, default_value_t = 512)]
    pub batch: usize,
    /// Seed for the random tokens.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// Seconds a worker waits for its peers in an AllReduce before failing the step.
    #[arg(long, default_value_t = crate::limits::COLLECTIVE_TIMEOUT.as_secs_f64(), value_parser = crate::coordinator::cli::parse_seconds)]
    pub collective_timeout: f64,
    /// Data plane between the local workers: auto (shared memory), shm or grpc (loopback
    /// streams, to measure the network transport's cost).
    #[arg(long, value_enum)]
    pub transport: Option<crate::coordinator::cluster::TransportChoice>,
    /// Mixture-of-experts models: how experts are divided, one cluster per choice
    /// (comma-separated: tensor, expert). Dense models ignore it.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "tensor")]
    pub moe_split: Vec<crate::shard::plan::MoeSplit>,
    /// Pipeline stages to split each cluster's workers into (see `generate --help`).
    #[arg(long, value_name = "N")]
    pub pp: Option<u32>,
    /// Wire precision of the gRPC data plane (full, f32, bf16, f16, q8_0).
    #[arg(long, default_value = "full", value_parser = |s: &str| s.parse::<crate::transport::grpc::SyncPrecision>())]
    pub sync_precision: crate::transport::grpc::SyncPrecision,
    /// KV cache key type (f16, bf16, q8_0, q4_0), as llama-bench's -ctk (which works too).
    #[arg(long = "cache-type-k", default_value = "f16", value_parser = |s: &str| s.parse::<CacheType>())]
    pub cache_type_k: CacheType,
    /// KV cache value type, as llama-bench's -ctv (which works too).
    #[arg(long = "cache-type-v", default_value = "f16", value_parser = |s: &str| s.parse::<CacheType>())]
    pub cache_type_v: CacheType,
}

/// One row of results, with llama-bench's field names where it has them.
#[derive(Serialize, Debug)]
pub struct BenchResult {
    pub model_filename: String,
    pub model_size: u64,
    pub tp: u32,
    /// Pipeline stages the workers formed (1: tensor parallel only).
    pub pp: usize,
    pub n_threads: usize,
    pub n_prompt: usize,
    pub n_gen: usize,
    pub n_depth: usize,
    pub n_batch: usize,
    /// Mixture-of-experts models only: "tensor" or "expert".
    pub moe_split: Option<String>,
    /// KV cache types, llama-bench's names.
    pub type_k: &'static str,
    pub type_v: &'static str,
    pub test: String,
    pub avg_ns: f64,
    pub stddev_ns: f64,
    pub avg_ts: f64,
    pub stddev_ts: f64,
    pub samples_ns: Vec<f64>,
    pub samples_ts: Vec<f64>,
    /// Bytes the busiest worker contributed to AllReduces per token of the timed runs.
    pub allreduce_bytes_per_token: f64,
    /// Over the timed steps: the busiest worker's work (outside AllReduce) over the workers'
    /// mean, step by step; 1.0 is an even split.
    pub work_imbalance: f64,
    /// Bytes of weights one token reads (all matrices, the active share of the experts, the
    /// output head; not the embedding rows).
    pub weight_bytes_per_token: u64,
    /// Generation only: weight_bytes_per_token x avg_ts / 1e9.
    pub effective_read_gbps: Option<f64>,
    /// The machine's sequential read bandwidth with tp x n_threads threads (GB/s).
    pub memory_read_gbps: Option<f64>,
    /// The CPU kernel set (TP_KERNELS or the best this CPU runs; local workers inherit both).
    pub kernels: &'static str,
}

/// Sequential read bandwidth with `threads` threads, measured once per count (GB/s; None when
/// the measurement fails, e.g. out of memory).
fn memory_gbps(
    cache: &mut std::collections::HashMap<usize, Option<f64>>,
    threads: usize,
) -> Option<f64> {
    *cache.entry(threads).or_insert_with(|| {
        crate::kernels::membw::read_gbps(256, threads, 3)
            .map_err(|e| tracing::warn!("memory bandwidth measurement failed: {e:#}"))
            .ok()
    })
}

#[derive(Clone, Copy)]
enum Test {
    Prompt(usize),
    Generate(usize),
}

impl Test {
    fn tokens(self) -> usize {
        match self {
            Test::Prompt(n) | Test::Generate(n) => n,
        }
    }
    fn name(self, depth: usize) -> String {
        let base = match self {
            Test::Prompt(n) => format!("pp{n}"),
            Test::Generate(n) => format!("tg{n}"),
        };
        if depth > 0 {
            format!("{base} @ d{depth}")
        } else {
            base
        }
    }
}

fn mean_sd(samples: &[f64]) -> (f64, f64) {
    let n = samples.len() as f64;
    let mean = samples.iter().sum::<f64>() / n;
    if samples.len() < 2 {
        return (mean, 0.0);
    }
    let var = samples.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

pub async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if args.repetitions == 0 {
        bail!("--repetitions must be at least 1");
    }
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let max = crate::limits::MAX_RANKS as u32;
    if let Some(&tp) = args.tp.iter().find(|&&tp| !(1..=max).contains(&tp)) {
        bail!("--tp {tp}: between 1 and {max} workers");
    }
    if args.threads.contains(&0) {
        bail!("--threads must be at least 1");
    }
    let mut tests: Vec<Test> = args
        .n_prompt
        .iter()
        .filter(|&&n| n > 0)
        .map(|&n| Test::Prompt(n))
        .collect();
    tests.extend(
        args.n_gen
            .iter()
            .filter(|&&n| n > 0)
            .map(|&n| Test::Generate(n)),
    );
    if tests.is_empty() {
        bail!("nothing to measure: every -p and -n is 0");
    }
    let probe = Model::open(&args.model)
        .with_context(|| format!("cannot read {}", args.model.display()))?;
    // Every part of a split model counts.
    let model_size: u64 = probe.file.part_sizes().iter().sum();
    let is_moe = probe.config.moe.is_some();
    let weight_bytes = probe.config.weight_bytes_per_token(&probe.file);
    let mut bandwidth = std::collections::HashMap::new();
    drop(probe);
    let model_filename = args.model.display().to_string();
    let longest = tests.iter().map(|t| t.tokens()).max().unwrap_or(0);
    let deepest = args.depth.iter().copied().max().unwrap_or(0);
    let context = deepest + longest;

    let text = args.format == Format::Text;
    if text {
        println!(
            "| model | size | TP | threads/worker | test | t/s | AllReduce bytes/token/worker | busiest/mean worker | weights read GB/s | memory GB/s | read / memory |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
    }
    let mut results = Vec::new();
    let splits = if is_moe {
        args.moe_split.clone()
    } else {
        vec![Default::default()]
    };
    for (&tp, &moe_split) in args
        .tp
        .iter()
        .flat_map(|tp| splits.iter().map(move |s| (tp, s)))
    {
        let thread_counts = if args.threads.is_empty() {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            vec![(cores / tp as usize).max(1)]
        } else {
            args.threads.clone()
        };
        for &threads in &thread_counts {
            let model = Model::open(&args.model)?;
            if context > model.config.context_length {
                bail!(
                    "depth {deepest} + {longest} tokens exceed the model's context of {}",
                    model.config.context_length
                );
            }
            let vocab = model.config.vocab_size as u64;
            let cluster_args = ClusterArgs {
                model: args.model.clone(),
                local: Some(tp),
                workers: None,
                threads: Some(threads),
                collective_timeout: args.collective_timeout,
                transport: args.transport,
                sync_precision: args.sync_precision,
                auth_token_file: None,
                tls_cert: None,
                tls_key: None,
                tls_ca: None,
                moe_split: Some(moe_split),
                pp: args.pp,
                cache_type_k: args.cache_type_k,
                cache_type_v: args.cache_type_v,
                kv_budget: None,
                kv_block_size: crate::shard::cache::DEFAULT_KV_BLOCK_SIZE,
            };
            // Measured before the workers start, so that nothing else competes for memory.
            let memory = memory_gbps(&mut bandwidth, tp as usize * threads);
            let cluster = start_cluster_with(&cluster_args).await?;
            let mut session =
                Session::start(model, cluster, context, args.batch.min(context)).await?;
            let mut rng = Rng::new(args.seed);
            let mut random = |n: usize| -> Vec<u32> {
                (0..n).map(|_| (rng.next_u64() % vocab) as u32).collect()
            };
            let runs = args.depth.len() * tests.len() * (args.repetitions + 1);
            let progress = crate::progress::counter(runs as u64, format!("bench tp={tp}"));
            let outcome: anyhow::Result<()> = async {
                for &depth in &args.depth {
                    for &test in &tests {
                        let mut samples_ns = Vec::with_capacity(args.repetitions);
                        let mut bytes = vec![0u64; tp as usize];
                        let (mut busiest, mut mean) = (0f64, 0f64);
                        for rep in 0..=args.repetitions {
                            session.clear().await?;
                            if depth > 0 {
                                session.process(&random(depth), 0).await?;
                            }
                            let bytes_before = session.collective_bytes.clone();
                            let work_before = session.work_seconds;
                            let started = Instant::now();
                            match test {
                                Test::Prompt(n) => session.process(&random(n), depth).await?,
                                Test::Generate(n) => {
                                    let tokens = random(n);
                                    for (i, &token) in tokens.iter().enumerate() {
                                        session.process(&[token], depth + i).await?;
                                    }
                                }
                            }
                            progress.inc(1);
                            // Repetition 0 warms caches and page tables; it is not counted.
                            if rep > 0 {
                                samples_ns.push(started.elapsed().as_nanos() as f64);
                                busiest += session.work_seconds.busiest - work_before.busiest;
                                mean += session.work_seconds.mean - work_before.mean;
                                for (i, total) in bytes.iter_mut().enumerate() {
                                    *total += session.collective_bytes.get(i).copied().unwrap_or(0)
                                        - bytes_before.get(i).copied().unwrap_or(0);
                                }
                            }
                        }
                        let samples_ts: Vec<f64> = samples_ns
                            .iter()
                            .map(|ns| test.tokens() as f64 * 1e9 / ns)
                            .collect();
                        let (avg_ns, stddev_ns) = mean_sd(&samples_ns);
                        let (avg_ts, stddev_ts) = mean_sd(&samples_ts);
                        let result = BenchResult {
                            model_filename: model_filename.clone(),
                            model_size,
                            tp,
                            pp: session.plan.stages.len(),
                            n_threads: threads,
                            n_prompt: if let Test::Prompt(n) = test { n } else { 0 },
                            n_gen: if let Test::Generate(n) = test { n } else { 0 },
                            n_depth: depth,
                            n_batch: args.batch,
                            moe_split: is_moe.then(|| moe_split.name().to_string()),
                            type_k: args.cache_type_k.name(),
                            type_v: args.cache_type_v.name(),
                            test: test.name(depth),
                            avg_ns,
                            stddev_ns,
                            avg_ts,
                            stddev_ts,
                            samples_ns,
                            samples_ts,
                            allreduce_bytes_per_token: bytes.iter().copied().max().unwrap_or(0)
                                as f64
                                / (test.tokens() * args.repetitions) as f64,
                            work_imbalance: if mean > 0.0 { busiest / mean } else { 1.0 },
                            weight_bytes_per_token: weight_bytes,
                            effective_read_gbps: matches!(test, Test::Generate(_))
                                .then(|| weight_bytes as f64 * avg_ts / 1e9),
                            memory_read_gbps: memory,
                            kernels: crate::kernels::cpu::kernel_name(),
                        };
                        if text {
                            let name = args.model.file_name().map_or(model_filename.clone(), |n| {
                                n.to_string_lossy().into_owned()
                            });
                            let mut split = if is_moe {
                                format!(" ({} split)", moe_split.name())
                            } else {
                                String::new()
                            };
                            if result.pp > 1 {
                                split.push_str(&format!(" ({} stages)", result.pp));
                            }
                            let read = result
                                .effective_read_gbps
                                .map_or("—".to_string(), |g| format!("{g:.1}"));
                            let mem = memory.map_or("—".to_string(), |g| format!("{g:.1}"));
                            let share = match (result.effective_read_gbps, memory) {
                                (Some(r), Some(m)) if m > 0.0 => format!("{:.0}%", 100.0 * r / m),
                                _ => "—".to_string(),
                            };
                            println!(
                                "| {name}{split} | {:.1} MiB | {tp} | {threads} | {} | {:.2} ± {:.2} | {:.0} | {:.2} | {read} | {mem} | {share} |",
                                model_size as f64 / (1 << 20) as f64,
                                result.test,
                                avg_ts,
                                stddev_ts,
                                result.allreduce_bytes_per_token,
                                result.work_imbalance
                            );
                        }
                        results.push(result);
                    }
                }
                Ok(())
            }
            .await;
            progress.finish_and_clear();
            session.cluster.shutdown().await;
            outcome?;
        }
    }
    if !text {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    Ok(())
}
