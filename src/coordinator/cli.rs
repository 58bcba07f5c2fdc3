//! `tp-coordinator`'s command line: subcommands that tokenize, plan, generate and measure
//! perplexity on a cluster of workers.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::auth::Token;
use crate::coordinator::bench::BenchArgs;
use crate::coordinator::cluster::{
    Cluster, ClusterLimits, HostsFile, Pipeline, TransportChoice, stage_sizes,
};
use crate::coordinator::sampler::SamplingParams;
use crate::coordinator::session::{GenerateRequest, Model, Session};
use crate::model::chat::{ChatMessage, ChatTemplate};
use crate::shard::cache::{CacheType, CacheTypes, DEFAULT_KV_BLOCK_SIZE, KvBudget, KvOptions};
use crate::shard::plan::{AttentionUnit, MoeSplit};
use crate::shard::tensors::{shard_byte_ranges, shard_expert_bytes, shard_weight_bytes};
use crate::transport::grpc::SyncPrecision;

#[derive(Parser, Debug)]
#[command(
    name = "tp-coordinator",
    version,
    about = "Runs a GGUF language model split across tp-worker processes (tensor parallelism).",
    long_about = "Runs a GGUF language model split across tp-worker processes (tensor parallelism).\n\n\
        Every worker holds a slice of every layer; workers sum partial results with AllReduce.\n\
        Start workers yourself and list them in a hosts.toml (--workers), or let the coordinator\n\
        start N of them on this machine (--local N).\n\n\
        Examples:\n  \
        tp-coordinator generate --model SmolLM2.gguf --local 2 --prompt 'The capital of France is'\n  \
        tp-coordinator generate --model m.gguf --workers configs/local-2.toml --chat --prompt 'Hi!'\n  \
        tp-coordinator perplexity --model m.gguf --local 2 --file text.txt -c 128\n  \
        tp-coordinator plan --model m.gguf --local 3\n  \
        tp-coordinator bench -m m.gguf -p 512 -n 128 --tp 1,2 -t 1,2 -r 5\n  \
        tp-coordinator --model m.gguf --workers hosts.toml   # serves the OpenAI API on 127.0.0.1:8080\n\n\
        Environment: TP_KERNELS=scalar|avx2|avx512|neon forces a CPU kernel set here and in the\n\
        workers started with --local (default: the best the CPU runs)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log level filter (error, warn, info, debug, trace), like RUST_LOG.
    #[arg(long, global = true, default_value = "warn")]
    pub log: String,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate text from a prompt, streaming it to stdout.
    Generate(GenerateArgs),
    /// Print the token ids of a text.
    Tokenize(TokenizeArgs),
    /// Compute perplexity over a text file as llama.cpp's llama-perplexity does.
    Perplexity(PerplexityArgs),
    /// Print how the model would be split across the workers, without loading weights.
    Plan(PlanArgs),
    /// Measure prompt-processing and generation speed like llama.cpp's llama-bench.
    Bench(BenchArgs),
    /// Serve an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models,
    /// /health); also what runs without a subcommand.
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Address to serve HTTP on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// Context window per request (prompt + generated tokens), at most the model's. Every
    /// slot has its own, so the KV cache holds --parallel × --ctx-size positions.
    #[arg(short = 'c', long = "ctx-size", default_value_t = crate::limits::CONTEXT)]
    pub context: usize,
    /// Sequence slots: requests generated together, one token each per forward pass.
    #[arg(long, visible_alias = "np", default_value_t = crate::limits::PARALLEL)]
    pub parallel: usize,
    /// Most tokens in one forward pass (prompt tokens plus one per generating slot).
    #[arg(short = 'b', long = "batch-size", default_value_t = crate::limits::BATCH)]
    pub batch_size: usize,
    /// Prompt tokens per forward pass while other requests are generating: smaller keeps
    /// their tokens flowing while a long prompt is read, larger reads it sooner.
    #[arg(long, default_value_t = crate::limits::PROMPT_CHUNK)]
    pub prompt_chunk: usize,
    /// Requests that may wait for a slot; beyond that the server answers 503.
    #[arg(long, default_value_t = crate::limits::QUEUE)]
    pub queue: usize,
    /// Compute every prompt in full. By default a request whose prompt starts with what a
    /// free slot's KV cache holds (the previous turns of a chat, a shared system prompt) takes
    /// that slot and computes only the rest; a request matching none takes the least
    /// recently used slot.
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// Directory where `POST /slots/{id}?action=save` writes a slot's KV cache and
    /// `?action=restore` reads it back (as llama-server's): each --local worker writes its own
    /// shard there as NAME.rankR. Workers of --workers save to their own --slot-save-path.
    #[arg(long, value_name = "DIR")]
    pub slot_save_path: Option<PathBuf>,
    /// The model id clients name (default: the model file's name without .gguf).
    #[arg(long)]
    pub model_id: Option<String>,
    /// A Jinja chat template to use instead of the model's tokenizer.chat_template (as
    /// llama-server's --chat-template-file). A harmony template (gpt-oss) makes chat replies
    /// show the analysis channel as reasoning_content and the final one as content.
    #[arg(long, value_name = "FILE")]
    pub chat_template_file: Option<PathBuf>,
    /// File holding the API key (its first line, 16 or more printable characters): every
    /// request but /health must send it as 'Authorization: Bearer KEY' (OpenAI clients'
    /// api_key). Needed to listen on an address other hosts can reach.
    #[arg(long, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Listen on a non-loopback address without an API key (anyone who can reach it may use
    /// the API).
    #[arg(long, conflicts_with = "api_key_file")]
    pub no_api_key: bool,
    /// Serve HTTPS with this certificate chain (PEM); needs --api-tls-key.
    #[arg(long, value_name = "FILE", requires = "api_tls_key")]
    pub api_tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --api-tls-cert.
    #[arg(long, value_name = "FILE", requires = "api_tls_cert")]
    pub api_tls_key: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum Format {
    Text,
    Json,
}

#[derive(Args, Debug)]
pub struct ClusterArgs {
    /// The GGUF model file.
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    /// Start N workers on this machine.
    #[arg(long, conflicts_with = "workers", value_parser = clap::value_parser!(u32).range(1..=crate::limits::MAX_RANKS as i64))]
    pub local: Option<u32>,
    /// Use running workers listed in a hosts.toml file.
    #[arg(long)]
    pub workers: Option<PathBuf>,
    /// Compute threads per local worker (default: the machine's cores divided among the workers).
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// Seconds a worker waits for its peers in an AllReduce before failing the step (a
    /// fraction is allowed: 2.5). It bounds how soon a dead peer or a cut link is noticed.
    #[arg(long, default_value_t = crate::limits::COLLECTIVE_TIMEOUT.as_secs_f64(), value_parser = parse_seconds)]
    pub collective_timeout: f64,
    /// How workers exchange activations (overrides hosts.toml's `transport`): auto uses
    /// shared memory when every worker shares this host and gRPC otherwise.
    #[arg(long, value_enum)]
    pub transport: Option<TransportChoice>,
    /// Wire precision of the gRPC data plane: full (each buffer's own type, exact), f32,
    /// bf16, f16 or q8_0 (fewer bytes, small rounding error).
    #[arg(long, default_value = "full", value_parser = parse_precision)]
    pub sync_precision: SyncPrecision,
    /// File holding the workers' shared token (the file each tp-worker got with
    /// --auth-token-file); overrides auth_token_file in hosts.toml. --local workers get a fresh
    /// token of their own.
    #[arg(long, value_name = "FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// This coordinator's TLS certificate (PEM, signed by --tls-ca); with --tls-key and
    /// --tls-ca, workers are reached over mutual TLS. Overrides tls_cert in hosts.toml.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// The CA certificate (PEM) that signs the workers' certificates.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Mixture-of-experts models: tensor gives every worker a slice of the columns of every
    /// expert (even work for any routing); expert gives each worker whole experts (no expert
    /// is cut, but a token's work lands where its experts live). Overrides hosts.toml's
    /// moe_split; dense models ignore it.
    #[arg(long, value_enum)]
    pub moe_split: Option<MoeSplit>,
    /// Pipeline stages: split the workers, in order, into N groups that run consecutive
    /// layers, tensor parallel inside each (a slow link between hosts then carries one
    /// handoff per step instead of two AllReduces per layer). Overrides hosts.toml's
    /// `stage` and `parallelism`.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=crate::limits::MAX_RANKS as i64))]
    pub pp: Option<u32>,
    /// Storage type of the KV cache's keys: f16, bf16, q8_0 (about half of f16's bytes) or
    /// q4_0 (about a quarter), as llama.cpp's --cache-type-k (-ctk works too). Attention
    /// reads them directly.
    #[arg(long = "cache-type-k", default_value = "f16", value_parser = parse_cache_type)]
    pub cache_type_k: CacheType,
    /// Storage type of the KV cache's values (as --cache-type-k; -ctv works too).
    #[arg(long = "cache-type-v", default_value = "f16", value_parser = parse_cache_type)]
    pub cache_type_v: CacheType,
    /// Memory for each worker's KV cache: bytes ("6G", "512MiB") or a share of the memory its
    /// host has available beyond its weights ("0.5", "50%"; workers on one machine split it).
    /// The cache is a pool of blocks that all requests share: -c stays the limit of one
    /// request, and many short requests fit where few long ones would. Without it, the pool
    /// holds --parallel whole contexts. Requests wait when the pool is full.
    #[arg(long, value_name = "BYTES|SHARE")]
    pub kv_budget: Option<KvBudget>,
    /// Positions per KV block (a power of two): the unit of allocation and of prefix sharing.
    #[arg(long, default_value_t = DEFAULT_KV_BLOCK_SIZE, value_parser = parse_block_size)]
    pub kv_block_size: usize,
}

impl ClusterArgs {
    pub fn cache_types(&self) -> CacheTypes {
        CacheTypes {
            k: self.cache_type_k,
            v: self.cache_type_v,
        }
    }

    pub fn kv_options(&self) -> KvOptions {
        KvOptions {
            block_size: self.kv_block_size,
            budget: self.kv_budget,
        }
    }
}

fn parse_block_size(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n.is_power_of_two() && n <= 1 << 16 => Ok(n),
        _ => Err(format!("'{s}' is not a power of two in 1..=65536")),
    }
}

fn parse_cache_type(s: &str) -> Result<CacheType, String> {
    s.parse()
}

fn parse_precision(s: &str) -> Result<SyncPrecision, String> {
    s.parse()
}

/// A positive number of seconds, at most an hour ("2.5").
pub fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.001..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "'{s}' is not a number of seconds within 0.001..=3600"
        )),
    }
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// The prompt (or the user message with --chat).
    #[arg(long, short = 'p')]
    pub prompt: String,
    /// Tokens to generate at most.
    #[arg(short = 'n', long = "n-predict", default_value_t = 64)]
    pub n_predict: usize,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat (otherwise the template's default, if any).
    #[arg(long)]
    pub system: Option<String>,
    /// A Jinja chat template for --chat instead of the model's own.
    #[arg(long, value_name = "FILE", requires = "chat")]
    pub chat_template_file: Option<PathBuf>,
    /// 0 samples greedily.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// 1.0 disables the penalty.
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Lowers a token's logit by this much per occurrence in the last --repeat-last-n tokens.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// Lowers a token's logit by this much if it occurs in the last --repeat-last-n tokens.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    /// How many recent tokens the penalties look at.
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when this string appears (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Report the N most likely tokens and their log-probabilities at each step (JSON output).
    #[arg(long, default_value_t = 0)]
    pub logprobs: usize,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    /// The text to tokenize.
    pub text: String,
    /// Treat special-token text such as <|im_start|> as plain text.
    #[arg(long)]
    pub no_parse_special: bool,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// The text file.
    #[arg(long, short = 'f')]
    pub file: PathBuf,
    /// Tokens per chunk.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512)]
    pub context: usize,
    /// Evaluate at most this many chunks.
    #[arg(long)]
    pub chunks: Option<usize>,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    #[arg(long, conflicts_with = "workers", value_parser = clap::value_parser!(u32).range(1..=crate::limits::MAX_RANKS as i64))]
    pub local: Option<u32>,
    #[arg(long)]
    pub workers: Option<PathBuf>,
    /// Context length to size the KV cache for.
    #[arg(long, short = 'c', default_value_t = crate::limits::CONTEXT)]
    pub ctx_size: usize,
    /// Sequence slots to size the KV cache for (`serve --parallel`; generate and perplexity
    /// use one).
    #[arg(long, short = 'p', default_value_t = crate::limits::PARALLEL as u64, value_parser = clap::value_parser!(u64).range(1..=crate::limits::MAX_PARALLEL as u64))]
    pub parallel: u64,
    /// How mixture-of-experts layers are divided (see `generate --help`).
    #[arg(long, value_enum)]
    pub moe_split: Option<MoeSplit>,
    /// Pipeline stages (see `generate --help`); hosts.toml's `stage` and `parallelism` apply
    /// otherwise (`auto` is decided when the workers' round trips are measured, at start).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub pp: Option<u32>,
    /// KV cache key type to size the cache for (see `serve --help`).
    #[arg(long = "cache-type-k", default_value = "f16", value_parser = parse_cache_type)]
    pub cache_type_k: CacheType,
    /// KV cache value type to size the cache for.
    #[arg(long = "cache-type-v", default_value = "f16", value_parser = parse_cache_type)]
    pub cache_type_v: CacheType,
    /// KV cache memory per worker (see `serve --help`): the pool's blocks are sized from it.
    #[arg(long, value_name = "BYTES|SHARE")]
    pub kv_budget: Option<KvBudget>,
    /// Positions per KV block.
    #[arg(long, default_value_t = DEFAULT_KV_BLOCK_SIZE, value_parser = parse_block_size)]
    pub kv_block_size: usize,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// Connect to the workers of --workers and measure each link's round trip (a Hello
    /// from here): shown per worker, and used to settle `parallelism = "auto"`. The workers
    /// are held for this coordinator meanwhile, as by any command that connects.
    #[arg(long, requires = "workers")]
    pub probe: bool,
    /// The workers' token for --probe (else hosts.toml's auth_token_file).
    #[arg(long, value_name = "FILE", requires = "probe")]
    pub auth_token_file: Option<PathBuf>,
    /// A cluster to imagine instead of --local or --workers: this many hosts of
    /// --workers-per-host workers each (with --simulate; up to 64 workers).
    #[arg(long, value_name = "N", requires = "simulate", conflicts_with_all = ["local", "workers"])]
    pub hosts: Option<usize>,
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub workers_per_host: usize,
    /// Predict decode speed: per-token time and throughput of this plan (and of tensor
    /// parallelism alone on the same workers), from one worker's measured time per token
    /// (--token-ms, or --calibrate to measure it here) and the links' latency and bandwidth.
    #[arg(long)]
    pub simulate: bool,
    /// One worker's decode time per token (ms), as `bench -n` reports its rate.
    #[arg(long, value_name = "MS")]
    pub token_ms: Option<f64>,
    /// Measure --token-ms (and the batch slope) with one local worker of --threads threads.
    #[arg(long, conflicts_with = "token_ms")]
    pub calibrate: bool,
    /// Threads of the calibrating worker (default: every core).
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// Extra cost of each more token in a decode batch, as a fraction of one token's.
    #[arg(long, default_value_t = 0.03)]
    pub batch_slope: f64,
    /// One-way latency between hosts (ms) and their bandwidth (Gbit/s).
    #[arg(long, default_value_t = 1.0)]
    pub link_latency_ms: f64,
    #[arg(long, default_value_t = 1.0)]
    pub link_gbps: f64,
    /// One-way latency from the coordinator to the workers (ms).
    #[arg(long, default_value_t = 0.0)]
    pub coordinator_latency_ms: f64,
    /// A shared-memory AllReduce inside a host, and a handoff between stages on one host (µs).
    #[arg(long, default_value_t = 5.0)]
    pub shm_allreduce_us: f64,
    #[arg(long, default_value_t = 150.0)]
    pub local_handoff_us: f64,
    /// Streams generating together, for the throughput prediction.
    #[arg(long, default_value_t = 8)]
    pub streams: usize,
    /// Predict whole requests instead of steady decode: each stream first reads a prompt of
    /// this many tokens (all streams' prompts in one batch), then generates --gen-tokens.
    #[arg(long, default_value_t = 0)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
}

fn worker_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let path = me.with_file_name("tp-worker");
    if !path.exists() {
        bail!(
            "tp-worker not found next to {} (build it with `cargo build --release`)",
            me.display()
        );
    }
    Ok(path)
}

fn default_threads(workers: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / workers).max(1)
}

/// Starts or connects to the workers that `args` names.
pub async fn start_cluster_with(args: &ClusterArgs) -> anyhow::Result<Cluster> {
    start_cluster_saving(args, None).await
}

/// `start_cluster_with`, local workers saving sequence slots in `slot_save_path`.
async fn start_cluster_saving(
    args: &ClusterArgs,
    slot_save_path: Option<PathBuf>,
) -> anyhow::Result<Cluster> {
    let limits = ClusterLimits {
        collective_timeout: std::time::Duration::from_secs_f64(args.collective_timeout),
        slot_save_path,
        ..ClusterLimits::default()
    };
    match (&args.local, &args.workers) {
        (Some(n), _) => {
            let n = *n as usize;
            let threads = args.threads.unwrap_or_else(|| default_threads(n));
            let mut cluster =
                Cluster::spawn_local(&worker_binary()?, &vec![1.0; n], threads, limits).await?;
            cluster.transport = args.transport.unwrap_or_default();
            cluster.sync_precision = args.sync_precision;
            cluster.moe_split = args.moe_split.unwrap_or_default();
            cluster.cache_types = args.cache_types();
            cluster.kv = args.kv_options();
            cluster.pipeline = args
                .pp
                .map_or(Pipeline::Tensor, |n| Pipeline::Even(n as usize));
            Ok(cluster)
        }
        (None, Some(path)) => {
            let hosts = HostsFile::read(path)?;
            let token_file = args
                .auth_token_file
                .as_ref()
                .or(hosts.auth_token_file.as_ref());
            let tls = crate::tls::TlsFiles::from_paths(
                args.tls_cert.as_ref().or(hosts.tls_cert.as_ref()),
                args.tls_key.as_ref().or(hosts.tls_key.as_ref()),
                args.tls_ca.as_ref().or(hosts.tls_ca.as_ref()),
            )?;
            let limits = ClusterLimits {
                auth_token: token_file.map(|f| Token::read(f)).transpose()?,
                tls,
                ..limits
            };
            let mut cluster = Cluster::connect(&hosts.workers, limits).await?;
            cluster.transport = args.transport.unwrap_or(hosts.transport);
            cluster.sync_precision = args.sync_precision;
            cluster.moe_split = args.moe_split.unwrap_or(hosts.moe_split);
            cluster.cache_types = args.cache_types();
            cluster.kv = args.kv_options();
            cluster.pipeline = match args.pp {
                Some(n) => Pipeline::Even(n as usize),
                None => hosts.pipeline(),
            };
            Ok(cluster)
        }
        (None, None) => bail!("say where the workers are: --local N or --workers hosts.toml"),
    }
}

/// `tp-coordinator --model M --workers hosts.toml` (options but no subcommand) serves, as
/// `tp-coordinator serve ...` does: the arguments with `serve` inserted in that case.
pub fn default_to_serve(
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> Vec<std::ffi::OsString> {
    // llama.cpp's two-letter short options, which clap cannot declare.
    let mut args: Vec<std::ffi::OsString> = args
        .into_iter()
        .map(|a| match a.to_str() {
            Some("-ctk") => "--cache-type-k".into(),
            Some("-ctv") => "--cache-type-v".into(),
            _ => a,
        })
        .collect();
    let first = args.get(1).and_then(|a| a.to_str()).unwrap_or("");
    let asks_for_help = ["-h", "--help", "-V", "--version"].contains(&first);
    if first.starts_with('-') && !asks_for_help {
        args.insert(1, "serve".into());
    }
    args
}

/// Runs a command; the cluster it starts is shut down on success, error and Ctrl-C alike.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            // Who may use the API is settled before the (long) load.
            let api_key = crate::coordinator::api_access::api_key(
                args.listen,
                args.api_key_file.as_deref(),
                args.no_api_key,
            )?;
            let tls = match (&args.api_tls_cert, &args.api_tls_key) {
                (Some(cert), Some(key)) => {
                    Some(crate::coordinator::api_access::tls_config(cert, key)?)
                }
                _ => None,
            };
            let mut model = Model::open(&args.cluster.model)?;
            use_template_file(&mut model, args.chat_template_file.as_deref())?;
            let model_id = args.model_id.clone().unwrap_or_else(|| {
                args.cluster
                    .model
                    .file_stem()
                    .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
            });
            if args.parallel == 0 || args.parallel > crate::limits::MAX_PARALLEL {
                bail!(
                    "--parallel must be within 1..={}",
                    crate::limits::MAX_PARALLEL
                );
            }
            let context = args.context.clamp(2, model.config.context_length);
            let batch = args.batch_size.clamp(args.parallel, 4096);
            let options = crate::coordinator::server::ServerOptions {
                listen: args.listen,
                model_id,
                queue: args.queue,
                chunk: args.prompt_chunk.max(1),
                prefix_cache: !args.no_prefix_cache,
                api_key,
                tls,
            };
            let load = async {
                if args.slot_save_path.is_some() && args.cluster.workers.is_some() {
                    eprintln!(
                        "note: --slot-save-path applies to --local workers; listed workers save where their own --slot-save-path says"
                    );
                }
                let cluster =
                    start_cluster_saving(&args.cluster, args.slot_save_path.clone()).await?;
                Session::start_with_sequences(model, cluster, context, batch, args.parallel).await
            };
            let session = crate::coordinator::server::serve(options, load).await?;
            session.cluster.shutdown().await;
            Ok(())
        }
        Command::Tokenize(args) => tokenize(args),
        Command::Plan(args) => plan_command(args).await,
        Command::Bench(args) => tokio::select! {
            r = crate::coordinator::bench::bench(args) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        },
        Command::Generate(args) => {
            sampling_params(&args)
                .validate()
                .map_err(|e| anyhow::anyhow!(e))?;
            let mut model = Model::open(&args.cluster.model)?;
            use_template_file(&mut model, args.chat_template_file.as_deref())?;
            let prompt = prompt_tokens(&model, &args)?;
            let context = (prompt.len() + args.n_predict).min(model.config.context_length);
            let mut session = start_session(&args.cluster, model, context).await?;
            let result = tokio::select! {
                r = generate(&mut session, prompt, &args) => r,
                _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            };
            session.cluster.shutdown().await;
            result
        }
        Command::Perplexity(args) => {
            let model = Model::open(&args.cluster.model)?;
            let context = args.context;
            let mut session = start_session(&args.cluster, model, context).await?;
            let result = tokio::select! {
                r = perplexity(&mut session, &args) => r,
                _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            };
            session.cluster.shutdown().await;
            result
        }
    }
}

async fn start_session(
    args: &ClusterArgs,
    model: Model,
    context: usize,
) -> anyhow::Result<Session> {
    let cluster = start_cluster_with(args).await?;
    let batch = context.clamp(1, 512);
    tokio::select! {
        session = Session::start(model, cluster, context, batch) => session,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    }
}

/// Replaces the model's chat template with the one in `path`, if given.
fn use_template_file(model: &mut Model, path: Option<&std::path::Path>) -> anyhow::Result<()> {
    let Some(path) = path else {
        return Ok(());
    };
    let source = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the chat template {}", path.display()))?;
    let template = ChatTemplate::for_tokenizer(source, &model.tokenizer)
        .with_context(|| path.display().to_string())?;
    model.chat_template = Some(template);
    Ok(())
}

fn prompt_tokens(model: &Model, args: &GenerateArgs) -> anyhow::Result<Vec<u32>> {
    let text = if args.chat {
        let template = model
            .chat_template
            .as_ref()
            .context("the model has no chat template; drop --chat")?;
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::new("system", system.clone()));
        }
        messages.push(ChatMessage::new("user", args.prompt.clone()));
        template.render(&messages, true)?
    } else {
        args.prompt.clone()
    };
    Ok(model.tokenizer.encode_prompt(&text, true)?)
}

fn sampling_params(args: &GenerateArgs) -> SamplingParams {
    SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repeat_penalty: args.repeat_penalty,
        frequency_penalty: args.frequency_penalty,
        presence_penalty: args.presence_penalty,
        repeat_last_n: args.repeat_last_n,
        seed: args.seed,
    }
}

async fn generate(
    session: &mut Session,
    prompt: Vec<u32>,
    args: &GenerateArgs,
) -> anyhow::Result<()> {
    let params = sampling_params(args);
    let text_mode = args.format == Format::Text;
    let mut stdout = std::io::stdout();
    let mut print = |piece: &str| {
        if text_mode {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        }
    };
    let result = session
        .generate(GenerateRequest {
            prompt_tokens: prompt,
            max_tokens: args.n_predict,
            params,
            stop_strings: args.stop.clone(),
            logprobs: args.logprobs,
            on_text: Some(&mut print),
            cancelled: None,
        })
        .await?;
    let stats = session.cluster.stats().await?;
    if text_mode {
        println!();
        let t = &result.timings;
        eprintln!(
            "[{} workers] prompt: {} tokens, {:.1} tokens/s | generated: {} tokens, {:.1} tokens/s | stop: {}",
            session.cluster.rank_count(),
            result.prompt_tokens.len(),
            t.prompt_tokens_per_second,
            result.tokens.len(),
            t.generated_tokens_per_second,
            result.stop
        );
        for (rank, s) in stats.iter().enumerate() {
            eprintln!(
                "  worker {rank}: weights {:.1} MiB, KV cache {:.1} MiB, peak RSS {:.1} MiB",
                s.weight_bytes as f64 / (1 << 20) as f64,
                s.kv_cache_bytes as f64 / (1 << 20) as f64,
                s.peak_rss_bytes as f64 / (1 << 20) as f64
            );
        }
    } else {
        let mut json = serde_json::to_value(&result)?;
        json["workers"] = stats
            .iter()
            .enumerate()
            .map(|(rank, s)| {
                serde_json::json!({
                    "rank": rank,
                    "weight_bytes": s.weight_bytes,
                    "kv_cache_bytes": s.kv_cache_bytes,
                    "peak_rss_bytes": s.peak_rss_bytes,
                    "rss_bytes": s.rss_bytes,
                    "steps": s.steps,
                    "compute_seconds": s.compute_seconds,
                })
            })
            .collect();
        println!("{json}");
    }
    Ok(())
}

async fn perplexity(session: &mut Session, args: &PerplexityArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    // llama-perplexity drops one trailing newline.
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let tokens = session.model.tokenizer.encode_prompt(text, false)?;
    let text_mode = args.format == Format::Text;
    if text_mode {
        eprintln!(
            "perplexity: {} tokens, {} chunks of {}",
            tokens.len(),
            args.chunks.map_or(tokens.len() / args.context, |c| c
                .min(tokens.len() / args.context)),
            args.context
        );
    }
    let chunks = args.chunks.map_or(tokens.len() / args.context, |c| {
        c.min(tokens.len() / args.context)
    });
    // On a terminal a bar with the running estimate; elsewhere llama-perplexity's "[1]x.xx,".
    let progress = crate::progress::counter(chunks as u64, "perplexity");
    let result = session
        .perplexity(&tokens, args.context, args.chunks, |chunk, ppl| {
            if !progress.is_hidden() {
                progress.set_message(format!("perplexity {ppl:.4}"));
                progress.inc(1);
            } else if text_mode {
                eprint!("[{}]{ppl:.4},", chunk + 1);
            }
        })
        .await;
    progress.finish_and_clear();
    let result = result?;
    if text_mode {
        eprintln!();
        println!(
            "Final estimate: PPL = {:.4} +/- {:.5} ({} chunks of {}, {} scored tokens, {:.1} s)",
            result.ppl,
            result.ppl_stderr,
            result.chunks,
            result.context,
            result.scored_tokens,
            result.seconds
        );
    } else {
        println!("{}", serde_json::to_string(&result)?);
    }
    Ok(())
}

fn tokenize(args: TokenizeArgs) -> anyhow::Result<()> {
    let file = crate::model::gguf::GgufFile::open(&args.model)?;
    let tokenizer = crate::model::tokenizer::Tokenizer::from_gguf(&file)?;
    let ids = tokenizer.encode_prompt(&args.text, !args.no_parse_special)?;
    match args.format {
        Format::Json => println!("{}", serde_json::to_string(&ids)?),
        Format::Text => {
            for id in ids {
                println!("{id:>7} -> {:?}", tokenizer.token_text(id).unwrap_or(""));
            }
        }
    }
    Ok(())
}

async fn plan_command(args: PlanArgs) -> anyhow::Result<()> {
    let file = crate::model::gguf::GgufFile::open(&args.model)?;
    let config = crate::model::arch::ModelConfig::from_gguf(&file)?;
    let (weights, addresses, transport, hosts_moe_split, pipeline): (
        Vec<f64>,
        Vec<String>,
        &str,
        _,
        _,
    ) = match (&args.local, &args.workers) {
        _ if args.hosts.is_some() => {
            let (hosts, per_host) = (args.hosts.unwrap_or(1), args.workers_per_host);
            if hosts == 0 || per_host == 0 || hosts * per_host > 64 {
                bail!("--hosts {hosts} x --workers-per-host {per_host}: between 1 and 64 workers");
            }
            (
                vec![1.0; hosts * per_host],
                (0..hosts * per_host)
                    .map(|r| format!("host{}:{}", r / per_host, 7070 + r % per_host))
                    .collect(),
                "auto",
                MoeSplit::default(),
                Pipeline::Tensor,
            )
        }
        (Some(n), _) => (
            vec![1.0; *n as usize],
            (0..*n).map(|i| format!("local worker {i}")).collect(),
            "shm",
            MoeSplit::default(),
            Pipeline::Tensor,
        ),
        (None, Some(path)) => {
            let hosts = HostsFile::read(path)?;
            let same_host = hosts.workers.iter().all(|w| is_loopback(&w.address));
            (
                hosts.workers.iter().map(|w| w.weight).collect(),
                hosts.workers.iter().map(|w| w.address.clone()).collect(),
                match hosts.transport {
                    TransportChoice::Auto if same_host => "shm",
                    chosen => chosen.name(),
                },
                hosts.moe_split,
                hosts.pipeline(),
            )
        }
        (None, None) => bail!("say where the workers are: --local N or --workers hosts.toml"),
    };
    let moe_split = args.moe_split.unwrap_or(hosts_moe_split);
    let pipeline = args.pp.map_or(pipeline, |n| Pipeline::Even(n as usize));
    // Hosts told apart by address here (a running cluster uses what workers report).
    let local = args.local.is_some();
    let host_of = |rank: usize| {
        if local {
            return "this host".to_string();
        }
        let address = &addresses[rank];
        address
            .rsplit_once(':')
            .map_or(address.as_str(), |(h, _)| h)
            .to_string()
    };
    let mut host_groups: Vec<Vec<usize>> = Vec::new();
    for rank in 0..weights.len() {
        match host_groups
            .iter_mut()
            .find(|g| host_of(g[0]) == host_of(rank))
        {
            Some(group) => group.push(rank),
            None => host_groups.push(vec![rank]),
        }
    }
    // Measured round trips, and hosts as the workers report them, with --probe.
    let mut round_trips: Vec<std::time::Duration> = Vec::new();
    if args.probe
        && let Some(path) = &args.workers
    {
        let hosts = HostsFile::read(path)?;
        let token_file = args
            .auth_token_file
            .as_ref()
            .or(hosts.auth_token_file.as_ref());
        let limits = ClusterLimits {
            auth_token: token_file.map(|f| Token::read(f)).transpose()?,
            tls: crate::tls::TlsFiles::from_paths(
                hosts.tls_cert.as_ref(),
                hosts.tls_key.as_ref(),
                hosts.tls_ca.as_ref(),
            )?,
            ..ClusterLimits::default()
        };
        let cluster = Cluster::connect(&hosts.workers, limits).await?;
        round_trips = cluster.workers.iter().map(|w| w.round_trip).collect();
        host_groups = cluster.hosts();
        cluster.shutdown().await;
    }
    let sizes = stage_sizes(&pipeline, weights.len(), &host_groups, &round_trips)?;
    let p = crate::shard::plan::plan_stages_up_to(&config, &weights, moe_split, &sizes, 64)?;
    if args.simulate {
        return simulate(&args, &file, &config, &p, &host_groups).await;
    }
    if weights.len() > crate::limits::MAX_RANKS {
        bail!(
            "{} workers: a cluster runs up to {} (only --simulate goes further)",
            weights.len(),
            crate::limits::MAX_RANKS
        );
    }
    let context = args.ctx_size.min(config.context_length);
    let cache_types = CacheTypes {
        k: args.cache_type_k,
        v: args.cache_type_v,
    };
    cache_types
        .check_head_dim(config.head_dim)
        .map_err(anyhow::Error::msg)?;
    // The KV pool: a share of available memory is judged by this host's for local workers;
    // listed workers report theirs when they join, so `serve` may size it otherwise.
    let kv = KvOptions {
        block_size: args.kv_block_size,
        budget: args.kv_budget,
    };
    let per_position: Vec<u64> = p
        .ranks
        .iter()
        .map(|r| {
            let heads: Vec<usize> = r.layers.iter().map(|l| l.kv_heads.len()).collect();
            cache_types.bytes_per_position(&heads, config.head_dim)
        })
        .collect();
    let here = crate::worker::available_memory_bytes().unwrap_or(0) / p.ranks.len().max(1) as u64;
    let available: Vec<u64> = p
        .ranks
        .iter()
        .map(|r| here.saturating_sub(shard_weight_bytes(&file, &config, r)))
        .collect();
    let pool_blocks = kv
        .pool_blocks(&per_position, &available, args.parallel as usize, context)
        .map_err(anyhow::Error::msg)?;
    let pool_positions = pool_blocks * kv.block_size;
    #[derive(serde::Serialize)]
    struct RankRow {
        rank: usize,
        worker: String,
        stage: usize,
        /// The measured Hello round trip to the worker, ms (`--probe`).
        #[serde(skip_serializing_if = "Option::is_none")]
        round_trip_ms: Option<f64>,
        weight: f64,
        q_heads: usize,
        kv_heads: usize,
        ffn_columns: usize,
        /// Expert-layers x experts this rank computes (mixture of experts).
        experts: usize,
        vocab_rows: std::ops::Range<usize>,
        embed_rows: std::ops::Range<usize>,
        weight_bytes: u64,
        expert_bytes: u64,
        kv_cache_bytes: u64,
        /// KV cache bytes of one position (token) of one sequence on this rank.
        kv_bytes_per_token: u64,
        layers: Vec<crate::shard::plan::LayerShard>,
        /// Split models: the parts whose tensor data this rank reads (headers aside).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        parts_read: Vec<PartRead>,
    }
    #[derive(serde::Serialize)]
    struct PartRead {
        /// 1-based, as in the file names.
        part: usize,
        file: String,
        bytes: u64,
    }
    let split = file.parts.len() > 1;
    let rows: Vec<RankRow> = p
        .ranks
        .iter()
        .map(|r| {
            let kv_heads: usize = r.layers.iter().map(|l| l.kv_heads.len()).sum();
            let kv_heads_per_layer: Vec<usize> =
                r.layers.iter().map(|l| l.kv_heads.len()).collect();
            let mut parts_read = Vec::new();
            if split {
                let ranges = shard_byte_ranges(&file, &config, r)?;
                for (number, (part, ranges)) in file.parts.iter().zip(&ranges).enumerate() {
                    let covered: u64 = ranges.iter().map(|r| r.end - r.start).sum();
                    // The header is in every part's ranges; the rest is tensor data.
                    let bytes = covered.saturating_sub(part.header_bytes);
                    if bytes > 0 {
                        parts_read.push(PartRead {
                            part: number + 1,
                            file: part.path.display().to_string(),
                            bytes,
                        });
                    }
                }
            }
            Ok(RankRow {
                rank: r.rank_index,
                worker: addresses[r.rank_index].clone(),
                stage: r.stage.index,
                round_trip_ms: round_trips.get(r.rank_index).map(|t| t.as_secs_f64() * 1e3),
                weight: weights[r.rank_index],
                q_heads: r.layers.iter().map(|l| l.q_heads.len()).sum(),
                kv_heads,
                ffn_columns: r.layers.iter().map(|l| l.ffn_columns.len()).sum(),
                experts: r.layers.iter().map(|l| l.experts.len()).sum(),
                vocab_rows: r.vocab_rows.clone(),
                embed_rows: r.embed_rows.clone(),
                weight_bytes: shard_weight_bytes(&file, &config, r),
                expert_bytes: shard_expert_bytes(&file, &config, r),
                kv_cache_bytes: cache_types
                    .bytes_per_position(&kv_heads_per_layer, config.head_dim)
                    * pool_positions as u64,
                kv_bytes_per_token: cache_types
                    .bytes_per_position(&kv_heads_per_layer, config.head_dim),
                layers: r.layers.clone(),
                parts_read,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    // Per pair of ranks of a stage: how they sum; between stages, the first ranks' handoff.
    let ranks = weights.len();
    let stage_of = |rank: usize| p.ranks[rank].stage.index;
    let leader_of = |rank: usize| {
        (0..ranks)
            .find(|&r| host_of(r) == host_of(rank) && stage_of(r) == stage_of(rank))
            .unwrap()
    };
    let hierarchical = transport == "hierarchical"
        || (transport == "auto" && (0..ranks).any(|r| leader_of(r) != r));
    let handoffs = p.stages.windows(2).map(|w| {
        let (a, b) = (w[0].ranks.start, w[1].ranks.start);
        let how = if host_of(a) == host_of(b) {
            "grpc, same host"
        } else {
            "grpc"
        };
        (
            a,
            b,
            format!(
                "pipeline handoff, stage {} -> {} ({how})",
                w[0].index, w[1].index
            ),
        )
    });
    let links: Vec<(usize, usize, String)> = (0..ranks)
        .flat_map(|a| (a + 1..ranks).map(move |b| (a, b)))
        .filter(|&(a, b)| stage_of(a) == stage_of(b))
        .map(|(a, b)| {
            let t = if transport != "auto" && transport != "hierarchical" {
                transport.to_string()
            } else if host_of(a) == host_of(b) {
                "shm".to_string()
            } else if !hierarchical {
                "grpc".to_string()
            } else if leader_of(a) == a && leader_of(b) == b {
                "grpc (host leaders)".to_string()
            } else {
                format!("via leaders {} and {}", leader_of(a), leader_of(b))
            };
            (a, b, t)
        })
        .chain(handoffs)
        .collect();
    if args.format == Format::Json {
        let json = serde_json::json!({
            "model": file.path.display().to_string(),
            "architecture": config.architecture,
            "layers": config.summary(),
            "moe_split": config.moe.as_ref().map(|_| moe_split.name()),
            "attention_unit": match p.attention_unit { AttentionUnit::KvGroup => "kv_group", AttentionUnit::QueryHead => "query_head" },
            "stages": p.stages,
            "ranks": rows,
            "kv_pool": serde_json::json!({"blocks": pool_blocks, "block_size": kv.block_size, "positions": pool_positions}),
            "links": links.iter().map(|(a, b, t)| serde_json::json!({"a": a, "b": b, "transport": t})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    println!(
        "{}: {} layers, d_model {}, {} heads / {} KV heads, FFN {}, vocab {}",
        file.path.display(),
        config.layer_count,
        config.model_dim,
        config.head_count,
        config.kv_head_count,
        config.ffn_dim,
        config.vocab_size
    );
    println!("{}", config.summary());
    println!(
        "attention split by {}; FFN in blocks of {}; KV cache: a pool of {pool_positions} positions ({}/{})\n",
        match p.attention_unit {
            AttentionUnit::KvGroup => "KV group",
            AttentionUnit::QueryHead => "query head (KV heads replicated where shared)",
        },
        config.ffn_down_block.first().copied().unwrap_or(1),
        cache_types.k,
        cache_types.v
    );
    if let Some(moe) = &config.moe {
        println!(
            "mixture of experts: {} experts of {} columns per layer, {} used per token{}; split by {}\n",
            moe.expert_count,
            config.ffn_dim,
            moe.expert_used,
            moe.shared_ffn_dim
                .map_or(String::new(), |w| format!(", shared expert of {w} columns")),
            match moe_split {
                MoeSplit::Tensor => "tensor (a slice of the columns of every expert on every rank)",
                MoeSplit::Expert => "expert (whole experts per rank)",
            }
        );
    }
    if p.stages.len() > 1 {
        println!("pipeline: {} stages", p.stages.len());
        for stage in &p.stages {
            let bytes: u64 = rows[stage.ranks.clone()]
                .iter()
                .map(|r| r.weight_bytes)
                .sum();
            println!(
                "  stage {}: ranks {}..{} (tensor parallel over {}), layers {}..{} ({} of {}){}, {:.1} MiB of weights",
                stage.index,
                stage.ranks.start,
                stage.ranks.end,
                stage.ranks.len(),
                stage.layers.start,
                stage.layers.end,
                stage.layers.len(),
                config.layer_count,
                match (stage.is_first(), stage.is_last()) {
                    (true, _) => ", embeds the tokens",
                    (_, true) => ", holds the output head",
                    _ => "",
                },
                bytes as f64 / (1 << 20) as f64
            );
        }
        println!();
    } else if matches!(pipeline, Pipeline::Auto { .. }) && host_groups.len() > 1 {
        println!(
            "parallelism auto: one pipeline stage per host if a host's measured round trip exceeds {:?} (measured when the cluster starts); shown here as one stage\n",
            crate::coordinator::cluster::PIPELINE_ROUND_TRIP
        );
    }
    let moe_header = if config.moe.is_some() {
        format!(" {:>14} {:>11}", "experts (all)", "of which experts")
    } else {
        String::new()
    };
    println!(
        "{:>4}  {:<22} {:>5} {:>6} {:>14} {:>14} {:>16} {:>18} {:>11} {:>10} {:>12}{moe_header}",
        "rank",
        "worker",
        "stage",
        "weight",
        "q heads (all)",
        "kv heads (all)",
        "FFN cols (all)",
        "vocab rows",
        "weights",
        "KV cache",
        "KV per token"
    );
    for r in &rows {
        let moe_columns = if config.moe.is_some() {
            format!(
                " {:>14} {:>12.1} MiB",
                r.experts,
                r.expert_bytes as f64 / (1 << 20) as f64
            )
        } else {
            String::new()
        };
        println!(
            "{:>4}  {:<22} {:>5} {:>6.2} {:>14} {:>14} {:>16} {:>18} {:>8.1} MiB {:>6.1} MiB {:>8.1} KiB{moe_columns}",
            r.rank,
            r.worker,
            r.stage,
            r.weight,
            r.q_heads,
            r.kv_heads,
            r.ffn_columns,
            format!("{}..{}", r.vocab_rows.start, r.vocab_rows.end),
            r.weight_bytes as f64 / (1 << 20) as f64,
            r.kv_cache_bytes as f64 / (1 << 20) as f64,
            r.kv_bytes_per_token as f64 / 1024.0
        );
    }
    println!(
        "\nKV cache: keys {}, values {}; {:.1} KiB per token over all workers; a pool of {pool_blocks} blocks of {} positions ({pool_positions} positions{}) shared by {} slot(s) of up to {context}",
        cache_types.k,
        cache_types.v,
        rows.iter().map(|r| r.kv_bytes_per_token).sum::<u64>() as f64 / 1024.0,
        kv.block_size,
        match kv.budget {
            Some(KvBudget::Fraction(_)) if args.workers.is_some() =>
                ", judged by this host's memory; serve sizes it by each worker's",
            Some(_) => ", from --kv-budget",
            None => "",
        },
        args.parallel
    );
    if split {
        println!(
            "\nmodel files read (split model of {} parts, {}):",
            file.parts.len(),
            file.path.display()
        );
        for r in &rows {
            let parts: Vec<String> = r
                .parts_read
                .iter()
                .map(|p| {
                    format!(
                        "part {} {:.1} MiB",
                        p.part,
                        p.bytes as f64 / (1 << 20) as f64
                    )
                })
                .collect();
            println!("  rank {}: {}", r.rank, parts.join(", "));
        }
    }
    if !round_trips.is_empty() {
        println!("\nmeasured round trips (a Hello from this host):");
        for r in &rows {
            println!(
                "  rank {} ({}): {:.2} ms",
                r.rank,
                r.worker,
                r.round_trip_ms.unwrap_or(0.0)
            );
        }
    }
    if links.is_empty() {
        println!("\nlinks: none (one rank: no collectives)");
    } else {
        println!("\nlinks:");
        for (a, b, t) in links {
            println!("  rank {a} <-> rank {b}: {t}");
        }
    }
    Ok(())
}

/// `plan --simulate`: the predicted decode speed of the plan and of tensor parallelism alone.
async fn simulate(
    args: &PlanArgs,
    file: &crate::model::gguf::GgufFile,
    config: &crate::model::arch::ModelConfig,
    plan: &crate::shard::plan::Plan,
    hosts: &[Vec<usize>],
) -> anyhow::Result<()> {
    use crate::coordinator::simulate::{Costs, Layout};
    let (token, batch_slope, measured) = match (args.token_ms, args.calibrate) {
        (Some(ms), _) if ms.is_finite() && ms > 0.0 => (ms / 1e3, args.batch_slope, false),
        (Some(ms), _) => bail!("--token-ms {ms} is not a positive number"),
        (None, true) => {
            let (token, slope) = calibrate(&args.model, args.threads).await?;
            (token, slope, true)
        }
        (None, false) => bail!(
            "--simulate needs one worker's time per token: --token-ms MS (from `bench -n`), or --calibrate to measure it here"
        ),
    };
    let costs = Costs {
        token,
        batch_slope,
        shm_allreduce: args.shm_allreduce_us / 1e6,
        local_handoff: args.local_handoff_us / 1e6,
        link_latency: args.link_latency_ms / 1e3,
        link_bandwidth: args.link_gbps * 1e9 / 8.0,
        coordinator_latency: args.coordinator_latency_ms / 1e3,
    };
    // Shares of a token's compute by the weight bytes it reads: the layers' and the head's.
    let head_bytes = config.head_bytes(file);
    let total_bytes = config.weight_bytes_per_token(file).max(1);
    let layer_bytes = total_bytes - head_bytes.min(total_bytes);
    let total = total_bytes as f64;
    let mut host_of = vec![0; plan.ranks.len()];
    for (h, ranks) in hosts.iter().enumerate() {
        for &r in ranks {
            host_of[r] = h;
        }
    }
    let layout = |stages: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>| Layout {
        host_of: host_of.clone(),
        stages,
        layer_count: config.layer_count,
        model_dim: config.model_dim,
        layer_share: layer_bytes as f64 / total / config.layer_count as f64,
        head_share: head_bytes as f64 / total,
    };
    let planned = layout(
        plan.stages
            .iter()
            .map(|s| (s.ranks.clone(), s.layers.clone()))
            .collect(),
    );
    let tensor_only = layout(vec![(0..plan.ranks.len(), 0..config.layer_count)]);
    let rows: Vec<(&str, crate::coordinator::simulate::Prediction)> = [
        ("plan", &planned, 1),
        ("plan", &planned, args.streams),
        ("tensor parallel only", &tensor_only, 1),
        ("tensor parallel only", &tensor_only, args.streams),
    ]
    .into_iter()
    .map(|(name, layout, streams)| {
        (
            name,
            layout.predict_requests(&costs, streams, args.prompt_tokens, args.gen_tokens),
        )
    })
    .collect();
    if args.format == Format::Json {
        let json = serde_json::json!({
            "costs": costs,
            "token_measured": measured,
            "workers": plan.ranks.len(),
            "hosts": hosts.len(),
            "stages": plan.stages,
            "predictions": rows.iter().map(|(name, p)| serde_json::json!({"layout": name, "prediction": p})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    println!(
        "{}: {} workers on {} host(s), {} pipeline stage(s) of {:?} workers",
        file.path.display(),
        plan.ranks.len(),
        hosts.len(),
        plan.stages.len(),
        plan.stages
            .iter()
            .map(|s| s.ranks.len())
            .collect::<Vec<_>>()
    );
    println!(
        "costs: one worker {:.2} ms per token ({}), batch slope {:.3}; links {} ms one way, {} Gbit/s; shm AllReduce {} µs; local handoff {} µs; coordinator {} ms one way",
        token * 1e3,
        if measured { "measured here" } else { "given" },
        batch_slope,
        args.link_latency_ms,
        args.link_gbps,
        args.shm_allreduce_us,
        args.local_handoff_us,
        args.coordinator_latency_ms
    );
    if args.prompt_tokens > 0 {
        println!(
            "requests: a prompt of {} tokens each (read together), then {} generated; tokens/s over the whole request",
            args.prompt_tokens, args.gen_tokens
        );
    }
    println!(
        "\n{:<22} {:>8} {:>14} {:>16} {:>10}",
        "layout", "streams", "ms per step", "tokens/s (all)", "in flight"
    );
    for (name, p) in rows {
        println!(
            "{:<22} {:>8} {:>14.2} {:>16.1} {:>10}",
            name,
            p.streams,
            p.step_seconds * 1e3,
            p.tokens_per_second,
            p.in_flight
        );
    }
    Ok(())
}

/// One worker's decode time per token and the batch slope, measured: 24 steps of one token,
/// then 24 steps of eight sequences' tokens.
async fn calibrate(model: &std::path::Path, threads: Option<usize>) -> anyhow::Result<(f64, f64)> {
    let threads = threads.unwrap_or_else(|| default_threads(1));
    let cluster =
        Cluster::spawn_local(&worker_binary()?, &[1.0], threads, ClusterLimits::default()).await?;
    let model = Model::open(model)?;
    let mut session = Session::start_with_sequences(model, cluster, 64, 8, 8).await?;
    let one = time_steps(&mut session, 1).await?;
    let eight = time_steps(&mut session, 8).await?;
    session.cluster.shutdown().await;
    Ok((one, ((eight / one - 1.0) / 7.0).max(0.0)))
}

/// The best of three rounds' mean time of a decode step of `batch` sequences' tokens.
async fn time_steps(session: &mut Session, batch: usize) -> anyhow::Result<f64> {
    use crate::coordinator::session::Batch;
    let mut best = f64::INFINITY;
    for round in 0..3 {
        let started = std::time::Instant::now();
        for position in 0..8 {
            let mut b = Batch {
                top: 1,
                ..Batch::default()
            };
            for sequence in 0..batch {
                b.push(1, round * 8 + position, sequence, true);
            }
            session.step(&b).await?;
        }
        best = best.min(started.elapsed().as_secs_f64() / 8.0);
    }
    Ok(best)
}

fn is_loopback(address: &str) -> bool {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host == "localhost" || host.starts_with("127.") || host == "[::1]"
}
