//! Shared helpers of the integration tests: model paths, golden data, local clusters.
#![allow(dead_code)]

pub mod net;
pub mod server;
pub mod split;

use std::path::{Path, PathBuf};

use tp::coordinator::cluster::{Cluster, ClusterLimits};
use tp::coordinator::session::{Model, Session};
#[allow(unused_imports)]
pub use tp::shard::cache::{CacheType, CacheTypes, KvOptions};
pub use tp::shard::plan::MoeSplit;

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const QWEN05: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
/// The synthetic qwen3moe model (tests/data/golden/moe-synthetic), Q8_0 and F16 experts.
pub const MOE: &str = "moe-synthetic-q8_0.gguf";
pub const MOE_F16: &str = "moe-synthetic-f16exp.gguf";
/// The same weights in the qwen2moe layout, with Q/K/V biases and a shared expert.
pub const MOE_QWEN2: &str = "moe-synthetic-qwen2moe.gguf";
/// qwen3moe with heads of 64: queries 512 wide, twice d_model, as in real Qwen3-MoE models.
pub const MOE_HD64: &str = "moe-synthetic-hd64.gguf";
/// Gemma 3 270M Q4_K_M: gemma3, SentencePiece vocabulary, 4 query heads and 1 KV head.
pub const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";
/// Synthetic dense models (tests/data/golden/dense-synthetic), one per family or RoPE scaling.
pub const QWEN3_SYNTH: &str = "dense-synthetic-qwen3.gguf";
pub const LLAMA3_SYNTH: &str = "dense-synthetic-llama3.gguf";
pub const LLAMA_LINEAR_SYNTH: &str = "dense-synthetic-llama-linear.gguf";
pub const LLAMA_YARN_SYNTH: &str = "dense-synthetic-llama-yarn.gguf";
pub const MIXTRAL_SYNTH: &str = "dense-synthetic-mixtral.gguf";
pub const GEMMA3_SYNTH: &str = "dense-synthetic-gemma3.gguf";
/// The synthetic gpt-oss model (tests/data/golden/gptoss-synthetic).
pub const GPTOSS_SYNTH: &str = "gptoss-synthetic.gguf";

pub fn model_dir() -> PathBuf {
    match std::env::var_os("TP_MODEL_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/tp/models")
        }
    }
}

/// The model's path, or None (with a notice) when it is not fetched. Under CI a missing model
/// is a failure: `scripts/fetch-models.sh` must have run.
pub fn model(name: &str) -> Option<PathBuf> {
    let path = model_dir().join(name);
    if path.is_file() {
        return Some(path);
    }
    if std::env::var_os("CI").is_some() {
        panic!("{} is missing; run scripts/fetch-models.sh", path.display());
    }
    eprintln!(
        "skipping: {} is missing (run scripts/fetch-models.sh)",
        path.display()
    );
    None
}

pub fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden")
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn worker_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tp-worker"))
}

pub fn coordinator_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tp-coordinator"))
}

/// hosts.toml entries for running workers at `addresses`: equal weights, one thread each.
pub fn worker_entries(addresses: &[String]) -> Vec<tp::coordinator::cluster::WorkerEntry> {
    addresses
        .iter()
        .map(|a| tp::coordinator::cluster::WorkerEntry {
            address: a.clone(),
            weight: 1.0,
            threads: 1,
            model_path: None,
            device: None,
            numa_node: None,
            stage: None,
        })
        .collect()
}

/// Threads per worker so that all workers together use the machine's cores.
pub fn threads_for(workers: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / workers).max(1)
}

pub async fn session(path: &Path, weights: &[f64], context: usize, batch: usize) -> Session {
    session_with(path, weights, context, batch, MoeSplit::Tensor).await
}

/// A session whose mixture-of-experts layers are split as `split` says.
pub async fn session_with(
    path: &Path,
    weights: &[f64],
    context: usize,
    batch: usize,
    split: MoeSplit,
) -> Session {
    session_with_stages(path, weights, &[weights.len()], context, batch, split).await
}

/// A session on local workers formed into pipeline stages of `stages` workers each.
pub async fn session_with_stages(
    path: &Path,
    weights: &[f64],
    stages: &[usize],
    context: usize,
    batch: usize,
    split: MoeSplit,
) -> Session {
    session_with_cache(
        path,
        weights,
        stages,
        context,
        batch,
        split,
        CacheTypes::default(),
    )
    .await
}

/// As `session_with_stages`, with the KV cache stored in `cache_types`.
pub async fn session_with_cache(
    path: &Path,
    weights: &[f64],
    stages: &[usize],
    context: usize,
    batch: usize,
    split: MoeSplit,
    cache_types: CacheTypes,
) -> Session {
    session_with_kv(
        path,
        weights,
        stages,
        context,
        batch,
        split,
        cache_types,
        KvOptions::default(),
    )
    .await
}

/// As `session_with_cache`, with the paged KV cache's blocks and budget set by `kv`.
#[allow(clippy::too_many_arguments)]
pub async fn session_with_kv(
    path: &Path,
    weights: &[f64],
    stages: &[usize],
    context: usize,
    batch: usize,
    split: MoeSplit,
    cache_types: CacheTypes,
    kv: KvOptions,
) -> Session {
    let model = Model::open(path).unwrap();
    let mut cluster = Cluster::spawn_local(
        &worker_binary(),
        weights,
        threads_for(weights.len()),
        ClusterLimits::default(),
    )
    .await
    .unwrap();
    cluster.moe_split = split;
    cluster.cache_types = cache_types;
    cluster.kv = kv;
    cluster.pipeline = tp::coordinator::cluster::Pipeline::Sizes(stages.to_vec());
    Session::start(model, cluster, context, batch)
        .await
        .unwrap()
}

/// The greedy tokens `session` generates for `prompt` (sequence 0 from the start).
pub async fn greedy_tokens(
    session: &mut Session,
    prompt: &str,
    n: usize,
) -> anyhow::Result<Vec<u32>> {
    let prompt_tokens = session.model.tokenizer.encode(prompt, true).unwrap();
    let request = tp::coordinator::session::GenerateRequest {
        prompt_tokens,
        max_tokens: n,
        params: tp::coordinator::sampler::SamplingParams::greedy(),
        stop_strings: Vec::new(),
        logprobs: 0,
        on_text: None,
        cancelled: None,
    };
    Ok(session.generate(request).await?.tokens)
}

/// Normalized mean squared error of `other` against `reference`.
pub fn nmse(reference: &[f32], other: &[f32]) -> f64 {
    let error: f64 = reference
        .iter()
        .zip(other)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let power: f64 = reference.iter().map(|a| (*a as f64).powi(2)).sum();
    error / power
}
