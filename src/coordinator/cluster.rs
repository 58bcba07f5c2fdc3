//! Cluster membership: the workers of one model, spawned locally or listed in hosts.toml, and the
//! control-plane calls that drive them.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::auth::{BUSY_WITH_ANOTHER, ClientAuth, OWNER_LEASE, Token};

use crate::limits::MAX_MESSAGE_BYTES;
use crate::model::gguf::GgufFile;
use crate::proto;
use crate::proto::worker_client::WorkerClient;
use crate::shard::cache::{CacheTypes, KvOptions};
use crate::shard::host::model_header_hash;
use crate::shard::plan::{MoeSplit, Plan, RankShard, split_units};
use crate::shard::tensors::shard_byte_ranges;
use crate::transport::grpc::{SECRET_BYTES, SyncPrecision};
use crate::transport::shm::ShmSegment;

/// Limits of a cluster, with defaults; all waits are bounded.
#[derive(Clone, Debug)]
pub struct ClusterLimits {
    pub connect_timeout: Duration,
    pub worker_start_timeout: Duration,
    pub load_timeout: Duration,
    pub step_timeout: Duration,
    pub collective_timeout: Duration,
    /// HTTP/2 ping interval on the control plane, and how long a ping may go unanswered.
    pub keep_alive_interval: Duration,
    pub keep_alive_timeout: Duration,
    /// How often an idle coordinator calls each worker, keeping its claim on them
    /// (`auth::OWNER_LEASE`) and noticing a lost one between requests.
    pub heartbeat_interval: Duration,
    /// The control plane's shared token (`--auth-token-file`); None where workers accept anyone.
    pub auth_token: Option<Token>,
    /// Mutual TLS to the workers (`--tls-cert`, `--tls-key`, `--tls-ca`).
    pub tls: Option<crate::tls::TlsFiles>,
    /// Where workers started here (`--local`) save sequence slots (`--slot-save-path`).
    pub slot_save_path: Option<PathBuf>,
}

impl Default for ClusterLimits {
    fn default() -> Self {
        use crate::limits;
        ClusterLimits {
            connect_timeout: limits::CONNECT_TIMEOUT,
            worker_start_timeout: limits::WORKER_START_TIMEOUT,
            load_timeout: limits::LOAD_TIMEOUT,
            step_timeout: limits::STEP_TIMEOUT,
            collective_timeout: limits::COLLECTIVE_TIMEOUT,
            keep_alive_interval: limits::KEEP_ALIVE_INTERVAL,
            keep_alive_timeout: limits::KEEP_ALIVE_TIMEOUT,
            heartbeat_interval: limits::HEARTBEAT_INTERVAL,
            auth_token: None,
            tls: None,
            slot_save_path: None,
        }
    }
}

#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostsFile {
    /// How workers exchange activations: "auto" (shared memory when every worker shares this
    /// host, gRPC otherwise), "shm" or "grpc".
    #[serde(default)]
    pub transport: TransportChoice,
    /// File holding the workers' shared token (relative paths are from this file's directory);
    /// `--auth-token-file` overrides it.
    #[serde(default)]
    pub auth_token_file: Option<PathBuf>,
    /// Mutual TLS to the workers: this coordinator's certificate and key, and the CA that
    /// signs every certificate of the cluster (PEM files; relative to this file's directory).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// How mixture-of-experts layers are divided: "tensor" (columns of every expert on every
    /// worker) or "expert" (whole experts per worker); `--moe-split` overrides it.
    #[serde(default)]
    pub moe_split: MoeSplit,
    /// Tensor parallel across every worker ("tensor"), one pipeline stage per host
    /// ("pipeline"), or stages across hosts with slow links ("auto"). Workers that name their
    /// `stage` set the stages themselves.
    #[serde(default)]
    pub parallelism: Parallelism,
    #[serde(rename = "worker", default)]
    pub workers: Vec<WorkerEntry>,
}

impl HostsFile {
    /// The pipeline this file asks for.
    pub fn pipeline(&self) -> Pipeline {
        if self.workers.iter().any(|w| w.stage.is_some()) {
            let mut sizes: Vec<usize> = Vec::new();
            for w in &self.workers {
                let stage = w.stage.unwrap_or(0) as usize;
                if sizes.len() <= stage {
                    sizes.resize(stage + 1, 0);
                }
                sizes[stage] += 1;
            }
            return Pipeline::Sizes(sizes);
        }
        match self.parallelism {
            Parallelism::Tensor => Pipeline::Tensor,
            Parallelism::Pipeline => Pipeline::PerHost,
            Parallelism::Auto => Pipeline::Auto {
                threshold: PIPELINE_ROUND_TRIP,
            },
        }
    }
}

/// How the workers of a cluster form pipeline stages (each a tensor-parallel group).
#[derive(Clone, Debug, PartialEq)]
pub enum Pipeline {
    /// One stage: every worker in one tensor-parallel group.
    Tensor,
    /// This many stages of consecutive workers, as even as the count allows (`--pp N`).
    Even(usize),
    /// Stage sizes in worker order (hosts.toml `stage = N`).
    Sizes(Vec<usize>),
    /// One stage per host (hosts.toml `parallelism = "pipeline"`).
    PerHost,
    /// One stage per host when some host's round trip is above `threshold`, else one stage
    /// (hosts.toml `parallelism = "auto"`).
    Auto { threshold: Duration },
}

/// The round trip above which `parallelism = "auto"` pipelines across hosts: a tensor-parallel
/// step waits for two AllReduces per layer, a pipeline step for one handoff per stage.
pub const PIPELINE_ROUND_TRIP: Duration = Duration::from_millis(1);

/// Stage sizes for `rank_count` workers grouped by host (`hosts`: ranks per host, ascending,
/// in order of their first rank) with their measured round trips (empty when not measured).
pub fn stage_sizes(
    pipeline: &Pipeline,
    rank_count: usize,
    hosts: &[Vec<usize>],
    round_trips: &[Duration],
) -> anyhow::Result<Vec<usize>> {
    // Per host, when each host's workers are consecutive ranks (the stages' requirement).
    let per_host = || -> Option<Vec<usize>> {
        let mut next = 0;
        for host in hosts {
            if host.iter().enumerate().any(|(i, &r)| r != next + i) {
                return None;
            }
            next += host.len();
        }
        Some(hosts.iter().map(Vec::len).collect())
    };
    Ok(match pipeline {
        Pipeline::Tensor => vec![rank_count],
        Pipeline::Even(0) => bail!("--pp 0: a pipeline needs at least one stage"),
        Pipeline::Even(n) => split_units(rank_count, &vec![1.0; *n], 0)
            .iter()
            .map(|r| r.len())
            .collect(),
        Pipeline::Sizes(sizes) => sizes.clone(),
        Pipeline::PerHost => per_host().ok_or_else(|| {
            anyhow::anyhow!(
                "one pipeline stage per host needs each host's workers listed together (hosts by rank: {hosts:?})"
            )
        })?,
        Pipeline::Auto { threshold } => {
            let slow = round_trips.iter().any(|rtt| rtt > threshold);
            match per_host() {
                Some(sizes) if slow && sizes.len() > 1 => sizes,
                _ => vec![rank_count],
            }
        }
    })
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parallelism {
    /// Every worker in one tensor-parallel group (unless workers name their `stage`).
    #[default]
    Tensor,
    /// One pipeline stage per host, tensor parallel inside each.
    Pipeline,
    /// Pipeline stages across hosts whose round trip from the coordinator exceeds 1 ms,
    /// tensor parallel otherwise.
    Auto,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TransportChoice {
    /// Shared memory when every worker runs on this host, else gRPC.
    #[default]
    Auto,
    /// Shared memory (every worker on one host).
    Shm,
    /// gRPC streams between every pair of workers.
    Grpc,
    /// Shared memory inside each host, gRPC between one leader per host.
    Hierarchical,
}

impl TransportChoice {
    pub fn name(self) -> &'static str {
        match self {
            TransportChoice::Auto => "auto",
            TransportChoice::Shm => "shm",
            TransportChoice::Grpc => "grpc",
            TransportChoice::Hierarchical => "hierarchical",
        }
    }

    /// Whether activations cross the network (a gRPC data plane to connect and keep up).
    pub fn networked(self) -> bool {
        matches!(self, TransportChoice::Grpc | TransportChoice::Hierarchical)
    }
}

#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerEntry {
    /// host:port of a running `tp-worker`.
    pub address: String,
    /// Share of the model relative to the other workers (like llama.cpp's --tensor-split).
    #[serde(default = "one")]
    pub weight: f64,
    /// Compute threads for this worker; 0 lets the worker decide.
    #[serde(default)]
    pub threads: usize,
    /// Where the worker finds its copy of the model, when its path differs from the
    /// coordinator's (it must be the same file: size and header hash are checked).
    #[serde(default)]
    pub model_path: Option<String>,
    /// What the worker computes on: "cpu" (the default; GPU workers are not built yet).
    #[serde(default)]
    pub device: Option<String>,
    /// The NUMA node the worker was started on (`tp-worker --numa-node`); when given, the
    /// coordinator checks that the worker reports the same.
    #[serde(default)]
    pub numa_node: Option<u32>,
    /// The pipeline stage (0, 1, ...) this worker belongs to: workers of a stage share its
    /// layers tensor-parallel; stages follow one another. Given for one worker, it must be
    /// given for all, in order.
    #[serde(default)]
    pub stage: Option<u32>,
}

fn one() -> f64 {
    1.0
}

impl HostsFile {
    pub fn read(path: &Path) -> anyhow::Result<HostsFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        HostsFile::parse(&text, path)
    }

    /// Parses the text of a hosts file; `path` names it in errors (which give the line and
    /// column) and anchors a relative `auth_token_file`.
    pub fn parse(text: &str, path: &Path) -> anyhow::Result<HostsFile> {
        let mut hosts: HostsFile =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if hosts.workers.is_empty() {
            bail!("{}: no [[worker]] entries", path.display());
        }
        for (i, worker) in hosts.workers.iter().enumerate() {
            match worker.device.as_deref() {
                None | Some("cpu") => {}
                Some(other) => bail!(
                    "{}: worker {i} ({}): device \"{other}\" is not supported by this build (only \"cpu\")",
                    path.display(),
                    worker.address
                ),
            }
            if !(worker.weight.is_finite() && worker.weight > 0.0) {
                bail!(
                    "{}: worker {i} ({}): weight must be a positive number, not {}",
                    path.display(),
                    worker.address,
                    worker.weight
                );
            }
        }
        // Stages: all or none, starting at 0, never going back, none skipped.
        if hosts.workers.iter().any(|w| w.stage.is_some()) {
            let mut previous: Option<u32> = None;
            for (i, worker) in hosts.workers.iter().enumerate() {
                let Some(stage) = worker.stage else {
                    bail!(
                        "{}: worker {i} ({}) has no stage, but others do: give every worker its stage",
                        path.display(),
                        worker.address
                    );
                };
                let expected = previous.map_or(0..=0, |p| p..=p + 1);
                if !expected.contains(&stage) {
                    bail!(
                        "{}: worker {i} ({}): stage {stage} after {}: list workers stage by stage, numbering stages 0, 1, 2 ... without gaps",
                        path.display(),
                        worker.address,
                        previous.map_or_else(|| "the start".to_string(), |p| format!("stage {p}"))
                    );
                }
                previous = Some(stage);
            }
        }
        let base = path.parent().unwrap_or(Path::new("."));
        for file in [
            &mut hosts.auth_token_file,
            &mut hosts.tls_cert,
            &mut hosts.tls_key,
            &mut hosts.tls_ca,
        ] {
            if let Some(f) = file
                && f.is_relative()
            {
                *f = base.join(&*f);
            }
        }
        Ok(hosts)
    }
}

pub struct WorkerHandle {
    pub address: String,
    /// The fastest of a few Hello round trips at connect.
    pub round_trip: Duration,
    pub weight: f64,
    pub threads: usize,
    pub model_path: Option<String>,
    pub client: Client,
    pub hello: proto::HelloReply,
}

pub struct Cluster {
    pub workers: Vec<WorkerHandle>,
    children: Vec<Child>,
    /// Shared-memory segments of the loaded model: one per stage of several ranks (shm).
    segments: Vec<ShmSegment>,
    /// How the workers form pipeline stages.
    pub pipeline: Pipeline,
    next_step: u64,
    pub limits: ClusterLimits,
    /// The data plane asked for, and the one the loaded model uses.
    pub transport: TransportChoice,
    pub sync_precision: SyncPrecision,
    /// How mixture-of-experts layers are divided among the workers.
    pub moe_split: MoeSplit,
    /// Storage types of the workers' KV caches.
    pub cache_types: CacheTypes,
    /// The paged KV cache: positions per block and how much memory the pool may take.
    pub kv: KvOptions,
    active_transport: Option<TransportChoice>,
    /// Whether the loaded model uses gRPC links (networked transport, or pipeline stages).
    networked: bool,
    /// Connection rounds of the gRPC data plane; a failed step asks for a new round.
    generation: u64,
    reconnect: bool,
    streamed_bytes: Vec<u64>,
    /// Per rank, the vocabulary rows of the loaded plan, and whether the rank returns logits
    /// (the last stage's ranks): step replies are checked against them.
    vocab_slices: Vec<Range<usize>>,
    outputs: Vec<bool>,
    /// Pipeline stages of the loaded plan.
    stage_count: usize,
    /// Steps launched and not landed.
    outstanding: std::collections::BTreeSet<u64>,
    /// What the heartbeat and the steps know of the workers (`/health`).
    pub health: std::sync::Arc<Health>,
    heartbeat: tokio::task::AbortHandle,
}

/// What the coordinator knows of its workers between steps, for `/health` and for re-forming
/// the cluster without waiting for a request: the heartbeat records which workers answer and
/// whether one is a new process, a failed step that the cluster must re-form.
#[derive(Debug)]
pub struct Health {
    /// Each rank's address, for naming it.
    addresses: Vec<String>,
    state: std::sync::Mutex<HealthState>,
}

#[derive(Debug, Default)]
struct HealthState {
    /// Per rank: what the last heartbeat found wrong (None: it answered, as the process that
    /// holds its shard).
    problems: Vec<Option<Problem>>,
    /// Per rank: the process that holds its shard (0: none loaded yet).
    pids: Vec<u32>,
    /// Why the cluster must be re-formed (a step failed), until it is.
    broken: Option<String>,
}

/// What the heartbeat found wrong with a worker.
#[derive(Clone, Debug)]
enum Problem {
    /// It did not answer, or refused.
    Silent(String),
    /// Another process answers on its address: it restarted and holds no shard.
    Restarted { pid: u32, was: u32 },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Silent(why) => f.write_str(why),
            Problem::Restarted { pid, was } => write!(
                f,
                "restarted (process {pid}, was {was}): the cluster re-forms once every worker \
                 answers"
            ),
        }
    }
}

/// One worker that is not ready, for `/health`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WorkerProblem {
    pub rank: usize,
    pub address: String,
    pub problem: String,
}

impl Health {
    fn new(addresses: Vec<String>) -> Health {
        Health {
            addresses,
            state: Default::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cluster was (re-)formed on these worker processes.
    fn formed(&self, pids: Vec<u32>) {
        let mut state = self.state();
        state.problems = vec![None; pids.len()];
        state.pids = pids;
        state.broken = None;
    }

    pub fn set_broken(&self, why: String) {
        self.state().broken = Some(why);
    }

    /// Records a heartbeat's answer from `rank`.
    fn observe(&self, rank: usize, answer: Result<u32, String>) {
        let mut state = self.state();
        let expected = state.pids.get(rank).copied().unwrap_or(0);
        let problem = match answer {
            Ok(pid) if expected != 0 && pid != expected => {
                Some(Problem::Restarted { pid, was: expected })
            }
            Ok(_) => None,
            Err(e) => Some(Problem::Silent(e)),
        };
        if state.problems.len() <= rank {
            state.problems.resize(rank + 1, None);
        }
        state.problems[rank] = problem;
    }

    /// Why the cluster cannot serve now, if it cannot: a failed step not yet re-formed, or
    /// workers that do not answer or restarted.
    pub fn unready(&self) -> Option<(String, Vec<WorkerProblem>)> {
        let state = self.state();
        let workers: Vec<WorkerProblem> = state
            .problems
            .iter()
            .enumerate()
            .filter_map(|(rank, p)| {
                Some(WorkerProblem {
                    rank,
                    address: self.addresses.get(rank).cloned().unwrap_or_default(),
                    problem: p.as_ref()?.to_string(),
                })
            })
            .collect();
        match (&state.broken, workers.is_empty()) {
            (None, true) => None,
            (Some(why), _) => Some((why.clone(), workers)),
            (None, false) => Some(("the cluster is incomplete".into(), workers)),
        }
    }

    /// Whether the cluster must be re-formed before its next step: a step failed, or a worker
    /// is a new process (restarted between steps, so it holds no shard).
    pub fn needs_reform(&self) -> bool {
        let state = self.state();
        state.broken.is_some()
            || state
                .problems
                .iter()
                .flatten()
                .any(|p| matches!(p, Problem::Restarted { .. }))
    }
}

/// Refuses a worker that speaks another protocol than this coordinator.
fn check_protocol(address: &str, hello: &proto::HelloReply) -> anyhow::Result<()> {
    if hello.protocol != crate::PROTOCOL_VERSION {
        bail!(
            "worker at {address} speaks protocol {} (tp-worker {}), this coordinator protocol {} \
             (tp {}): run the same tp version on every node",
            hello.protocol,
            if hello.version.is_empty() {
                "of unknown version"
            } else {
                &hello.version
            },
            crate::PROTOCOL_VERSION,
            env!("CARGO_PKG_VERSION")
        );
    }
    Ok(())
}

/// What a step's replies must look like: the request's step number, row count and candidates.
#[derive(Clone, Copy, Debug)]
pub struct ReplyShape {
    pub step: u64,
    pub rows: usize,
    pub top_k: u32,
    pub full_logits: bool,
}

impl ReplyShape {
    /// The reply a rank owes `request`: rows only from a rank that `outputs` logits (the last
    /// pipeline stage's).
    pub fn of(request: &proto::StepRequest, outputs: bool) -> ReplyShape {
        ReplyShape {
            step: request.step,
            rows: if outputs {
                request.output_rows.len()
            } else {
                0
            },
            top_k: request.top_k,
            full_logits: request.full_logits,
        }
    }
}

/// Checks a worker's step reply against the request and the plan, so that a worker of
/// another build or a faulty one is an error naming it, never an out-of-bounds index.
pub fn check_step_reply(
    reply: &proto::StepReply,
    request: &ReplyShape,
    vocab: &Range<usize>,
) -> Result<(), String> {
    if reply.step != request.step {
        return Err(format!(
            "answered step {} when asked for step {}",
            reply.step, request.step
        ));
    }
    if reply.rows.len() != request.rows {
        return Err(format!(
            "returned {} rows for {} asked",
            reply.rows.len(),
            request.rows
        ));
    }
    if reply.vocab_start as usize != vocab.start {
        return Err(format!(
            "reports vocabulary rows from {}, but its shard starts at {}",
            reply.vocab_start, vocab.start
        ));
    }
    for (i, row) in reply.rows.iter().enumerate() {
        if row.ids.len() != row.logits.len() || row.ids.len() > request.top_k as usize {
            return Err(format!(
                "row {i}: {} ids and {} logits for top {}",
                row.ids.len(),
                row.logits.len(),
                request.top_k
            ));
        }
        if let Some(id) = row.ids.iter().find(|&&id| !vocab.contains(&(id as usize))) {
            return Err(format!(
                "row {i}: candidate {id} is outside its vocabulary rows {vocab:?}"
            ));
        }
        let full = if request.full_logits { vocab.len() } else { 0 };
        if row.full.len() != full {
            return Err(format!(
                "row {i}: {} whole logits where {full} belong",
                row.full.len()
            ));
        }
    }
    Ok(())
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

/// A step in flight on the workers (`Cluster::launch`).
pub struct Launched {
    pub number: u64,
    /// The replies in rank order, or the first failure.
    pub replies: tokio::task::JoinHandle<anyhow::Result<Vec<proto::StepReply>>>,
}

/// What the cluster needs to load a model.
pub struct LoadSpec<'a> {
    pub file: &'a GgufFile,
    pub plan: &'a Plan,
    pub max_sequences: usize,
    pub max_context: usize,
    pub max_batch: usize,
    pub kv_block_size: usize,
    pub kv_blocks: usize,
}

/// A worker's control-plane client; every request carries the coordinator's credentials.
pub type Client = WorkerClient<InterceptedService<Channel, ClientAuth>>;

async fn connect(
    address: &str,
    limits: &ClusterLimits,
    auth: &ClientAuth,
) -> anyhow::Result<(Client, proto::HelloReply)> {
    let scheme = if limits.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{address}"))
        .with_context(|| format!("bad worker address '{address}'"))?;
    if let Some(tls) = &limits.tls {
        endpoint = endpoint
            .tls_config(tls.client(address))
            .with_context(|| format!("TLS for worker {address}"))?;
    }
    let endpoint = endpoint
        .connect_timeout(limits.connect_timeout)
        .tcp_nodelay(true)
        // HTTP/2 pings while a call is in flight: a worker cut off from this coordinator fails
        // its call within a few seconds instead of at the step deadline.
        .http2_keep_alive_interval(limits.keep_alive_interval)
        .keep_alive_timeout(limits.keep_alive_timeout);
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach worker at {address}"))?;
    let mut client = WorkerClient::with_interceptor(channel, auth.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // A worker still claimed by a coordinator that stopped is free after its lease.
    let deadline = tokio::time::Instant::now() + OWNER_LEASE + Duration::from_secs(2);
    let mut told = false;
    loop {
        let hello =
            tokio::time::timeout(limits.connect_timeout, client.hello(proto::HelloRequest {}))
                .await
                .with_context(|| format!("worker at {address} did not answer Hello"))?;
        match hello {
            Ok(hello) => return Ok((client, hello.into_inner())),
            Err(status)
                if status.code() == tonic::Code::FailedPrecondition
                    && status.message().contains(BUSY_WITH_ANOTHER)
                    && tokio::time::Instant::now() < deadline =>
            {
                if !told {
                    tracing::warn!(%address, "{}; waiting", status.message());
                    told = true;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(status) if status.code() == tonic::Code::Unauthenticated => bail!(
                "worker at {address} refused this coordinator: {} (give the coordinator the workers' token with --auth-token-file or auth_token_file in hosts.toml)",
                status.message()
            ),
            Err(status) => {
                let hint = if limits.tls.is_some() {
                    " (with TLS: does the worker's --tls-ca sign this coordinator's certificate?)"
                } else {
                    " (if the worker runs with --tls-cert, give the coordinator --tls-cert, --tls-key and --tls-ca too)"
                };
                bail!(
                    "worker at {address} refused Hello: {}{hint}",
                    status.message()
                )
            }
        }
    }
}

impl Cluster {
    pub async fn connect(
        entries: &[WorkerEntry],
        limits: ClusterLimits,
    ) -> anyhow::Result<Cluster> {
        let auth = ClientAuth::new(limits.auth_token.as_ref())?;
        let mut workers: Vec<WorkerHandle> = Vec::new();
        for entry in entries {
            let (client, hello) = connect(&entry.address, &limits, &auth).await?;
            check_protocol(&entry.address, &hello)?;
            if let Some(node) = entry.numa_node
                && hello.numa_node != Some(node)
            {
                bail!(
                    "worker at {} is bound to NUMA node {}, but hosts.toml says numa_node = {node}",
                    entry.address,
                    hello
                        .numa_node
                        .map_or_else(|| "none".to_string(), |n| n.to_string())
                );
            }
            // The link's round trip: the fastest of a few Hellos (the first paid for setup).
            let mut round_trip = Duration::MAX;
            for _ in 0..5 {
                let started = std::time::Instant::now();
                let mut probe = client.clone();
                if tokio::time::timeout(limits.connect_timeout, probe.hello(proto::HelloRequest {}))
                    .await
                    .is_ok_and(|r| r.is_ok())
                {
                    round_trip = round_trip.min(started.elapsed());
                }
            }
            tracing::info!(
                address = %entry.address,
                round_trip_ms = round_trip.as_secs_f64() * 1e3,
                "worker connected"
            );
            workers.push(WorkerHandle {
                address: entry.address.clone(),
                round_trip,
                weight: entry.weight,
                threads: entry.threads,
                model_path: entry.model_path.clone(),
                client,
                hello,
            });
        }
        // Calls each worker every heartbeat_interval, so that an idle coordinator keeps them,
        // and records who answers (and as which process) for /health.
        let clients: Vec<Client> = workers.iter().map(|w| w.client.clone()).collect();
        let interval = limits.heartbeat_interval;
        let health = std::sync::Arc::new(Health::new(
            workers.iter().map(|w| w.address.clone()).collect(),
        ));
        let watched = health.clone();
        let heartbeat = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            let wait = interval.max(Duration::from_secs(2));
            loop {
                tick.tick().await;
                let mut calls = tokio::task::JoinSet::new();
                for (rank, client) in clients.iter().enumerate() {
                    let mut client = client.clone();
                    calls.spawn(async move {
                        let answer =
                            match tokio::time::timeout(wait, client.hello(proto::HelloRequest {}))
                                .await
                            {
                                Ok(Ok(hello)) => Ok(hello.into_inner().pid),
                                Ok(Err(status)) => {
                                    Err(format!("unavailable: {}", status.message()))
                                }
                                Err(_) => Err(format!("does not answer within {wait:?}")),
                            };
                        (rank, answer)
                    });
                }
                while let Some(Ok((rank, answer))) = calls.join_next().await {
                    watched.observe(rank, answer);
                }
            }
        })
        .abort_handle();
        Ok(Cluster {
            workers,
            children: Vec::new(),
            segments: Vec::new(),
            pipeline: Pipeline::Tensor,
            next_step: 1,
            limits,
            transport: TransportChoice::Auto,
            sync_precision: SyncPrecision::Full,
            moe_split: MoeSplit::Tensor,
            cache_types: CacheTypes::default(),
            kv: KvOptions::default(),
            active_transport: None,
            networked: false,
            generation: 0,
            reconnect: false,
            streamed_bytes: Vec::new(),
            vocab_slices: Vec::new(),
            outputs: Vec::new(),
            stage_count: 1,
            outstanding: Default::default(),
            health,
            heartbeat,
        })
    }

    /// Starts `count` workers on this host; they exit with this process (also when it is killed).
    pub async fn spawn_local(
        worker_binary: &Path,
        weights: &[f64],
        threads_per_worker: usize,
        mut limits: ClusterLimits,
    ) -> anyhow::Result<Cluster> {
        // A token of their own, handed over in a file only this user can read.
        let token = Token::generate()?;
        let token_file = token.write_private(&std::env::temp_dir())?;
        let _remove = RemoveOnDrop(token_file.parent().map(Path::to_path_buf));
        limits.auth_token = Some(token);
        let mut children = Vec::new();
        let mut entries = Vec::new();
        // Give each worker its own cores when they go round, so that pinned threads of
        // different workers never share one; otherwise leave placement to the OS.
        let cpus = crate::kernels::pool::allowed_cpus();
        let disjoint = weights.len() * threads_per_worker <= cpus.len();
        let (placements, topology_xml) = numa_placements(weights.len());
        for (rank, &weight) in weights.iter().enumerate() {
            let mut command = Command::new(worker_binary);
            command
                .args([
                    "--listen",
                    "127.0.0.1:0",
                    "--log",
                    "warn",
                    "--threads",
                    &threads_per_worker.to_string(),
                ])
                .arg("--auth-token-file")
                .arg(&token_file)
                .args(
                    limits.slot_save_path.iter().flat_map(|dir| {
                        [std::ffi::OsStr::new("--slot-save-path"), dir.as_os_str()]
                    }),
                )
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true);
            if let Some(placement) = placements.get(rank) {
                command.args(["--numa-node", &placement.node.to_string()]);
                let mine = &placement.cpus[..threads_per_worker.min(placement.cpus.len())];
                let list: Vec<String> = mine.iter().map(|c| c.to_string()).collect();
                match &topology_xml {
                    Some(xml) => {
                        command.arg("--topology-xml").arg(xml);
                    }
                    None => {
                        command.args(["--cpus", &list.join(",")]);
                    }
                }
                eprintln!(
                    "worker {rank} -> NUMA node {} (CPUs {})",
                    placement.node,
                    list.join(",")
                );
            } else if disjoint {
                let mine = &cpus[rank * threads_per_worker..(rank + 1) * threads_per_worker];
                let list: Vec<String> = mine.iter().map(|c| c.to_string()).collect();
                command.args(["--cpus", &list.join(",")]);
            }
            // SAFETY: prctl is async-signal-safe; it makes the kernel signal the worker when this
            // process dies, so no worker outlives a coordinator killed with SIGKILL.
            unsafe {
                command.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
            let mut child = command
                .spawn()
                .with_context(|| format!("cannot start worker {}", worker_binary.display()))?;
            let stdout = child.stdout.take().expect("piped");
            let mut lines = BufReader::new(stdout).lines();
            let line = tokio::time::timeout(limits.worker_start_timeout, lines.next_line())
                .await
                .with_context(|| {
                    format!(
                        "worker {rank} did not start within {:?}",
                        limits.worker_start_timeout
                    )
                })??;
            let Some(address) = line
                .as_deref()
                .and_then(|l| l.strip_prefix("listening on "))
            else {
                bail!("worker {rank} exited before listening (got {line:?})");
            };
            entries.push(WorkerEntry {
                address: address.trim().to_string(),
                weight,
                threads: threads_per_worker,
                model_path: None,
                device: None,
                numa_node: placements.get(rank).map(|p| p.node as u32),
                stage: None,
            });
            children.push(child);
        }
        let mut cluster = Cluster::connect(&entries, limits).await?;
        cluster.children = children;
        Ok(cluster)
    }

    pub fn weights(&self) -> Vec<f64> {
        self.workers.iter().map(|w| w.weight).collect()
    }

    /// Workers per pipeline stage, in rank order (one stage: tensor parallel only).
    pub fn stage_sizes(&self) -> anyhow::Result<Vec<usize>> {
        let round_trips: Vec<Duration> = self.workers.iter().map(|w| w.round_trip).collect();
        stage_sizes(
            &self.pipeline,
            self.workers.len(),
            &self.hosts(),
            &round_trips,
        )
    }

    pub fn rank_count(&self) -> usize {
        self.workers.len()
    }

    /// Whether every worker runs on this host (same boot id, hostname and network namespace
    /// as this process): shared memory serves them all.
    pub fn single_host(&self) -> bool {
        let me = host_identity_here();
        self.workers.iter().all(|w| host_identity(&w.hello) == me)
    }

    /// Per rank: the memory its host reported available when the worker joined, and how many
    /// workers share that machine (the same boot id), which share that memory.
    pub fn host_shares(&self) -> Vec<(u64, usize)> {
        self.workers
            .iter()
            .map(|w| {
                let same = |o: &&WorkerHandle| o.hello.boot_id == w.hello.boot_id;
                (
                    w.hello.available_memory,
                    self.workers.iter().filter(same).count(),
                )
            })
            .collect()
    }

    /// Ranks grouped by host (boot id, hostname, network namespace), each group ascending,
    /// groups in the order of their first rank.
    pub fn hosts(&self) -> Vec<Vec<usize>> {
        let mut groups: Vec<(HostIdentity, Vec<usize>)> = Vec::new();
        for (rank, worker) in self.workers.iter().enumerate() {
            let id = host_identity(&worker.hello);
            match groups.iter_mut().find(|(g, _)| *g == id) {
                Some((_, ranks)) => ranks.push(rank),
                None => groups.push((id, vec![rank])),
            }
        }
        groups.into_iter().map(|(_, ranks)| ranks).collect()
    }

    pub async fn load(
        &mut self,
        spec: &LoadSpec<'_>,
    ) -> anyhow::Result<Vec<proto::LoadShardReply>> {
        let rank_count = self.workers.len();
        let model_dim = crate::model::arch::ModelConfig::from_gguf(spec.file)?.model_dim;
        let hosts = self.hosts();
        let transport = match self.transport {
            _ if rank_count == 1 => TransportChoice::Shm,
            TransportChoice::Auto if self.single_host() => TransportChoice::Shm,
            TransportChoice::Auto if hosts.iter().all(|h| h.len() == 1) => TransportChoice::Grpc,
            TransportChoice::Auto => TransportChoice::Hierarchical,
            TransportChoice::Shm if !self.single_host() => bail!(
                "transport shm needs every worker on this host, but they report other hosts \
                 (boot id / hostname); use transport = \"grpc\" or \"auto\""
            ),
            chosen => chosen,
        };
        self.active_transport = None;
        let stages = &spec.plan.stages;
        let piped = stages.len() > 1;
        // One segment per stage of several ranks; each stage's ranks sum among themselves.
        self.segments.clear();
        let mut stage_shm_paths = vec![String::new(); stages.len()];
        if transport == TransportChoice::Shm {
            for (stage, path) in stages.iter().zip(&mut stage_shm_paths) {
                if stage.ranks.len() < 2 {
                    continue;
                }
                let name = format!(
                    "tp-shm-{}-{}-{}",
                    std::process::id(),
                    unique_suffix(),
                    stage.index
                );
                let dir = if Path::new("/dev/shm").is_dir() {
                    PathBuf::from("/dev/shm")
                } else {
                    std::env::temp_dir()
                };
                // Row-parallel partials are reduced in f64: 8 bytes per value.
                let segment = ShmSegment::create(
                    &dir.join(name),
                    stage.ranks.len(),
                    spec.max_batch * model_dim * 8,
                )?;
                *path = segment.path().display().to_string();
                self.segments.push(segment);
            }
        }
        // Stages always link their first ranks over gRPC.
        let networked = transport.networked() || piped;
        let secret = if networked {
            cluster_secret()?
        } else {
            Vec::new()
        };
        let peer_addresses: Vec<String> = if networked {
            self.workers
                .iter()
                .map(|w| {
                    let host = w
                        .address
                        .rsplit_once(':')
                        .map_or(w.address.as_str(), |(h, _)| h);
                    format!("{host}:{}", w.hello.data_plane_port)
                })
                .collect()
        } else {
            Vec::new()
        };
        let stage_starts: Vec<u32> = if piped {
            stages
                .iter()
                .map(|s| s.ranks.start as u32)
                .chain([rank_count as u32])
                .collect()
        } else {
            Vec::new()
        };
        let tag: String = secret.iter().take(6).map(|b| format!("{b:02x}")).collect();
        let header_hash = model_header_hash(spec.file);
        let model_path = std::fs::canonicalize(&spec.file.path)?
            .display()
            .to_string();
        let worker_paths = self.prepare_models(spec, &model_path, header_hash).await?;
        let progress = crate::progress::counter(rank_count as u64, "workers loaded");
        let mut tasks = tokio::task::JoinSet::new();
        for (rank, worker) in self.workers.iter().enumerate() {
            let shard: &RankShard = &spec.plan.ranks[rank];
            let stage = &shard.stage;
            // Hierarchical: the hosts of this rank's stage, each its ranks there.
            let stage_hosts: Vec<Vec<u32>> = hosts
                .iter()
                .map(|h| {
                    h.iter()
                        .filter(|&&r| stage.ranks.contains(&r))
                        .map(|&r| r as u32)
                        .collect::<Vec<u32>>()
                })
                .filter(|h| !h.is_empty())
                .collect();
            let (host_ranks, leader_ranks, shm_path) = if transport == TransportChoice::Hierarchical
            {
                let host = stage_hosts
                    .iter()
                    .find(|h| h.contains(&(rank as u32)))
                    .expect("every rank has a host");
                let mut leaders: Vec<u32> = stage_hosts.iter().map(|h| h[0]).collect();
                leaders.sort_unstable();
                (
                    host.clone(),
                    leaders,
                    format!("/dev/shm/tp-{tag}-{}", host[0]),
                )
            } else {
                (Vec::new(), Vec::new(), stage_shm_paths[stage.index].clone())
            };
            let request = proto::LoadShardRequest {
                model_path: worker_paths[rank].clone(),
                part_sizes: spec.file.part_sizes(),
                model_header_hash: header_hash,
                rank_index: rank as u32,
                rank_count: rank_count as u32,
                vocab_start: shard.vocab_rows.start as u32,
                vocab_end: shard.vocab_rows.end as u32,
                layers: shard
                    .layers
                    .iter()
                    .map(|l| proto::LayerShard {
                        q_start: l.q_heads.start as u32,
                        q_end: l.q_heads.end as u32,
                        kv_start: l.kv_heads.start as u32,
                        kv_end: l.kv_heads.end as u32,
                        ffn_start: l.ffn_columns.start as u32,
                        ffn_end: l.ffn_columns.end as u32,
                        expert_start: l.experts.start as u32,
                        expert_end: l.experts.end as u32,
                        shared_start: l.shared_columns.start as u32,
                        shared_end: l.shared_columns.end as u32,
                    })
                    .collect(),
                shm_path,
                max_sequences: spec.max_sequences as u32,
                max_context: spec.max_context as u32,
                max_batch: spec.max_batch as u32,
                kv_block_size: spec.kv_block_size as u32,
                kv_blocks: spec.kv_blocks as u32,
                threads: worker.threads as u32,
                collective_timeout_ms: self.limits.collective_timeout.as_millis() as u32,
                transport: transport.name().into(),
                peer_addresses: peer_addresses.clone(),
                cluster_secret: secret.clone(),
                sync_precision: self.sync_precision.name().into(),
                leader_ranks,
                host_ranks,
                stage_starts: stage_starts.clone(),
                layer_start: stage.layers.start as u32,
                layer_end: stage.layers.end as u32,
                embed_start: shard.embed_rows.start as u32,
                embed_end: shard.embed_rows.end as u32,
                cache_type_k: self.cache_types.k.name().into(),
                cache_type_v: self.cache_types.v.name().into(),
            };
            let mut client = worker.client.clone();
            let address = worker.address.clone();
            let timeout = self.limits.load_timeout;
            let progress = progress.clone();
            tasks.spawn(async move {
                let reply = tokio::time::timeout(timeout, client.load_shard(request))
                    .await
                    .map_err(|_| {
                        anyhow::anyhow!("worker {rank} ({address}) did not load within {timeout:?}")
                    })?
                    .map_err(|s| {
                        anyhow::anyhow!("worker {rank} ({address}) failed to load: {}", s.message())
                    })?;
                progress.inc(1);
                Ok::<_, anyhow::Error>((rank, reply.into_inner()))
            });
        }
        let replies = collect_ranked(tasks, rank_count).await;
        progress.finish_and_clear();
        let replies = replies?;
        self.networked = networked;
        if networked {
            self.connect_peers().await?;
        }
        self.active_transport = Some(transport);
        self.vocab_slices = spec
            .plan
            .ranks
            .iter()
            .map(|r| r.vocab_rows.clone())
            .collect();
        self.outputs = spec.plan.ranks.iter().map(|r| r.stage.is_last()).collect();
        self.stage_count = spec.plan.stages.len();
        self.health
            .formed(self.workers.iter().map(|w| w.hello.pid).collect());
        Ok(replies)
    }

    /// Asks every worker where its copy of the model is, and streams the byte ranges of its
    /// shard to those that lack them (into their cache). Returns each worker's model path.
    async fn prepare_models(
        &mut self,
        spec: &LoadSpec<'_>,
        model_path: &str,
        header_hash: u64,
    ) -> anyhow::Result<Vec<String>> {
        let config = crate::model::arch::ModelConfig::from_gguf(spec.file)?;
        let mut tasks = tokio::task::JoinSet::new();
        for (rank, worker) in self.workers.iter().enumerate() {
            let ranges = shard_byte_ranges(spec.file, &config, &spec.plan.ranks[rank])?;
            let request = proto::PrepareModelRequest {
                model_path: worker
                    .model_path
                    .clone()
                    .unwrap_or_else(|| model_path.to_string()),
                part_sizes: spec.file.part_sizes(),
                model_header_hash: header_hash,
                ranges: ranges
                    .iter()
                    .enumerate()
                    .flat_map(|(part, ranges)| {
                        ranges.iter().map(move |r| proto::ByteRange {
                            start: r.start,
                            end: r.end,
                            part: part as u32,
                        })
                    })
                    .collect(),
            };
            let mut client = worker.client.clone();
            let address = worker.address.clone();
            let timeout = self.limits.load_timeout;
            let source_paths: Vec<PathBuf> =
                spec.file.parts.iter().map(|p| p.path.clone()).collect();
            tasks.spawn(async move {
                let fail = |what: String| anyhow::anyhow!("worker {rank} ({address}): {what}");
                let reply = tokio::time::timeout(timeout, client.prepare_model(request))
                    .await
                    .map_err(|_| fail(format!("no answer to PrepareModel within {timeout:?}")))?
                    .map_err(|s| fail(format!("cannot prepare the model: {}", s.message())))?
                    .into_inner();
                // The worker names the files by index: one it cannot mean is an error, not a panic.
                if let Some(bad) = reply
                    .missing
                    .iter()
                    .find(|r| r.start >= r.end || source_paths.len() <= r.part as usize)
                {
                    return Err(fail(format!(
                        "asked for range {}..{} of file {} of a model of {}",
                        bad.start,
                        bad.end,
                        bad.part,
                        source_paths.len()
                    )));
                }
                let missing: Vec<(usize, Range<u64>)> = reply
                    .missing
                    .iter()
                    .map(|r| (r.part as usize, r.start..r.end))
                    .collect();
                let total: u64 = missing.iter().map(|(_, r)| r.end - r.start).sum();
                if total > 0 {
                    tracing::info!(
                        rank,
                        %address,
                        mib = total as f64 / (1 << 20) as f64,
                        "worker has no copy of the model: streaming its shard"
                    );
                    let progress = crate::progress::bytes(total, format!("shard to worker {rank}"));
                    let chunks =
                        stream_ranges(source_paths, missing, header_hash, rank, total, progress);
                    let written = tokio::time::timeout(timeout, client.push_model(chunks))
                        .await
                        .map_err(|_| fail(format!("shard not sent within {timeout:?}")))?
                        .map_err(|s| fail(format!("receiving its shard: {}", s.message())))?
                        .into_inner()
                        .bytes_written;
                    // A stream cut short by a read error here must not load as a whole shard.
                    if written != total {
                        return Err(fail(format!(
                            "received {written} of the {total} bytes of its shard (reading the \
                             model failed: see this log)"
                        )));
                    }
                } else {
                    tracing::info!(rank, %address, source = %reply.source, "worker has the model");
                }
                Ok::<_, anyhow::Error>((rank, (reply.path, total)))
            });
        }
        let prepared = collect_ranked(tasks, self.workers.len()).await?;
        self.streamed_bytes = prepared.iter().map(|(_, bytes)| *bytes).collect();
        Ok(prepared.into_iter().map(|(path, _)| path).collect())
    }

    /// Model bytes streamed to each worker by the last load (0: it had them).
    pub fn streamed_bytes(&self) -> &[u64] {
        &self.streamed_bytes
    }

    /// The data plane of the loaded model ("shm" or "grpc"), once loaded.
    pub fn active_transport(&self) -> Option<TransportChoice> {
        self.active_transport
    }

    /// Asks every worker to open a new round of data-plane links (gRPC).
    async fn connect_peers(&mut self) -> anyhow::Result<()> {
        self.generation += 1;
        let generation = self.generation;
        let timeout = self.limits.collective_timeout + self.limits.connect_timeout;
        let mut tasks = tokio::task::JoinSet::new();
        for (rank, worker) in self.workers.iter().enumerate() {
            let mut client = worker.client.clone();
            let address = worker.address.clone();
            tasks.spawn(async move {
                tokio::time::timeout(
                    timeout,
                    client.connect_peers(proto::ConnectPeersRequest { generation }),
                )
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "worker {rank} ({address}) did not connect to its peers within {timeout:?}"
                    )
                })?
                .map_err(|s| {
                    anyhow::anyhow!(
                        "worker {rank} ({address}) cannot reach its peers: {}",
                        s.message()
                    )
                })?;
                Ok::<_, anyhow::Error>((rank, ()))
            });
        }
        collect_ranked(tasks, self.workers.len()).await?;
        tracing::info!(
            generation,
            workers = self.workers.len(),
            "gRPC data plane connected"
        );
        Ok(())
    }

    /// One forward pass on every worker; replies in rank order.
    pub async fn step(
        &mut self,
        request: proto::StepRequest,
    ) -> anyhow::Result<Vec<proto::StepReply>> {
        let step = self.launch(request).await?;
        let number = step.number;
        let result = step.replies.await.unwrap_or_else(|e| Err(e.into()));
        self.landed(number, result.is_ok());
        result
    }

    /// Starts a forward pass on every worker without waiting for it; several may be in flight
    /// (pipeline micro-batches): each worker runs them in the order they were launched. Every
    /// launched step must be reported back through `landed`.
    pub async fn launch(&mut self, mut request: proto::StepRequest) -> anyhow::Result<Launched> {
        if self.reconnect {
            self.connect_peers()
                .await
                .context("the data plane is down since the last failed step")?;
            self.reconnect = false;
        }
        if self.vocab_slices.len() != self.workers.len() {
            bail!("no model is loaded on the cluster");
        }
        request.step = self.next_step;
        // Behind a step still in flight, the workers must run this one after it. (A step
        // that landed has finished everywhere; one a restarted worker never saw must not be
        // waited for.)
        let previous = self.next_step - 1;
        request.after_step = if self.outstanding.contains(&previous) {
            previous
        } else {
            0
        };
        self.outstanding.insert(request.step);
        self.next_step += 1;
        let mut tasks = tokio::task::JoinSet::new();
        for (rank, worker) in self.workers.iter().enumerate() {
            let mut client = worker.client.clone();
            let request = request.clone();
            let address = worker.address.clone();
            let timeout = self.limits.step_timeout;
            let vocab = self.vocab_slices[rank].clone();
            let shape = ReplyShape::of(&request, self.outputs[rank]);
            tasks.spawn(async move {
                let reply = tokio::time::timeout(timeout, client.step(request))
                    .await
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "worker {rank} ({address}) did not finish the step within {timeout:?}"
                        )
                    })?
                    .map_err(|s| worker_failed(rank, &address, &s))?
                    .into_inner();
                check_step_reply(&reply, &shape, &vocab).map_err(|e| {
                    anyhow::anyhow!("worker {rank} ({address}) sent a bad step reply: {e}")
                })?;
                Ok::<_, anyhow::Error>((rank, reply))
            });
        }
        let count = self.workers.len();
        Ok(Launched {
            number: request.step,
            replies: tokio::spawn(collect_step(tasks, count)),
        })
    }

    /// A launched step came back: after a failure, the workers are told to give up on it and
    /// the data plane reconnects before the next launch.
    pub fn landed(&mut self, step: u64, ok: bool) {
        self.outstanding.remove(&step);
        if !ok {
            self.abort_step(step);
            // Links may be broken or hold frames of the failed step: start a new round.
            self.reconnect = self.networked;
        }
    }

    /// Pipeline stages of the loaded plan's workers (1 without pipelining).
    pub fn in_flight_limit(&self) -> usize {
        self.stage_count.max(1)
    }

    /// Tells every worker that this coordinator gave up on `step`, so that survivors waiting
    /// in its collectives stop now rather than at their deadline (and can be re-formed at once).
    /// Best effort and in the background: the worker that failed may not answer.
    fn abort_step(&self, step: u64) {
        for worker in &self.workers {
            let mut client = worker.client.clone();
            tokio::spawn(async move {
                let abort = client.abort(proto::AbortRequest { step });
                let _ = tokio::time::timeout(Duration::from_secs(1), abort).await;
            });
        }
    }

    /// Greets every worker again (a restarted one may have a new data-plane port), failing
    /// fast with the first that does not answer.
    pub async fn probe(&mut self) -> anyhow::Result<()> {
        let timeout = self.limits.connect_timeout.min(Duration::from_secs(2));
        for (rank, worker) in self.workers.iter_mut().enumerate() {
            let hello = tokio::time::timeout(timeout, worker.client.hello(proto::HelloRequest {}))
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "worker {rank} ({}) does not answer: the cluster is incomplete",
                        worker.address
                    )
                })?
                .map_err(|s| {
                    anyhow::anyhow!(
                        "worker {rank} ({}) is unavailable: the cluster is incomplete ({})",
                        worker.address,
                        s.message()
                    )
                })?
                .into_inner();
            check_protocol(&worker.address, &hello)?;
            worker.hello = hello;
        }
        Ok(())
    }

    /// Every worker writes its shard of a sequence slot's KV cache (positions
    /// `0..tokens.len()`, in `blocks`) to its save directory as `file_name`; replies in rank
    /// order.
    pub async fn save_sequence(
        &mut self,
        sequence: u32,
        tokens: &[u32],
        blocks: &[u32],
        file_name: &str,
    ) -> anyhow::Result<Vec<proto::SaveSequenceReply>> {
        let request = proto::SaveSequenceRequest {
            sequence,
            tokens: tokens.to_vec(),
            file_name: file_name.to_string(),
            blocks: blocks.to_vec(),
        };
        self.call_every_worker("save", move |mut client| {
            let request = request.clone();
            async move { client.save_sequence(request).await }
        })
        .await
    }

    /// Every worker reads its shard of a saved sequence into a slot's `blocks` (or, with
    /// `header_only`, only checks the file and says its tokens); replies in rank order.
    pub async fn restore_sequence(
        &mut self,
        sequence: u32,
        file_name: &str,
        blocks: &[u32],
        header_only: bool,
    ) -> anyhow::Result<Vec<proto::RestoreSequenceReply>> {
        let request = proto::RestoreSequenceRequest {
            sequence,
            file_name: file_name.to_string(),
            header_only,
            blocks: blocks.to_vec(),
        };
        self.call_every_worker("restore", move |mut client| {
            let request = request.clone();
            async move { client.restore_sequence(request).await }
        })
        .await
    }

    /// Makes one call on every worker at once (within the load timeout; `what` names it in
    /// errors); replies in rank order, or the first failure.
    async fn call_every_worker<T, F, Fut>(
        &self,
        what: &'static str,
        call: F,
    ) -> anyhow::Result<Vec<T>>
    where
        T: Send + 'static,
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>
            + Send
            + 'static,
    {
        let mut tasks = tokio::task::JoinSet::new();
        let timeout = self.limits.load_timeout;
        for (rank, worker) in self.workers.iter().enumerate() {
            let reply = call(worker.client.clone());
            let address = worker.address.clone();
            tasks.spawn(async move {
                let reply = tokio::time::timeout(timeout, reply)
                    .await
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "worker {rank} ({address}) did not {what} within {timeout:?}"
                        )
                    })?
                    .map_err(|s| anyhow::anyhow!("worker {rank} ({address}): {}", s.message()))?;
                Ok::<_, anyhow::Error>((rank, reply.into_inner()))
            });
        }
        collect_ranked(tasks, self.workers.len()).await
    }

    pub async fn stats(&mut self) -> anyhow::Result<Vec<proto::StatsReply>> {
        let mut replies = Vec::new();
        for worker in &mut self.workers {
            replies.push(worker.client.stats(proto::Empty {}).await?.into_inner());
        }
        Ok(replies)
    }

    /// Stops workers this coordinator started; workers it only connected to keep running.
    pub async fn shutdown(mut self) {
        if self.children.is_empty() {
            return;
        }
        for worker in &mut self.workers {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                worker.client.shutdown(proto::Empty {}),
            )
            .await;
        }
        for child in &mut self.children {
            if tokio::time::timeout(Duration::from_secs(3), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}

/// The results of one task per rank, in rank order. Returns at the first error: a rank that
/// failed makes the whole call fail, and waiting for the others (which may be cut off from
/// this coordinator) would only delay the error. The remaining tasks are aborted.
async fn collect_ranked<T: 'static>(
    mut tasks: tokio::task::JoinSet<anyhow::Result<(usize, T)>>,
    count: usize,
) -> anyhow::Result<Vec<T>> {
    let mut results: Vec<Option<T>> = (0..count).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (rank, value) = joined??;
        results[rank] = Some(value);
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("every rank answered"))
        .collect())
}

/// How long a failed step waits for the other ranks' answers, to name the worker that was lost
/// rather than a survivor that saw its link to it break.
const FAILURE_GRACE: Duration = Duration::from_millis(300);

/// `collect_ranked` for a step: after the first failure, the others get `FAILURE_GRACE` to
/// answer, and a lost worker's error wins over its peers' (their data plane to it broke).
async fn collect_step(
    mut tasks: tokio::task::JoinSet<anyhow::Result<(usize, proto::StepReply)>>,
    count: usize,
) -> anyhow::Result<Vec<proto::StepReply>> {
    let mut results: Vec<Option<proto::StepReply>> = (0..count).map(|_| None).collect();
    let mut first_error: Option<anyhow::Error> = None;
    let mut grace_until: Option<tokio::time::Instant> = None;
    loop {
        let next = match grace_until {
            None => tasks.join_next().await,
            Some(until) => match tokio::time::timeout_at(until, tasks.join_next()).await {
                Ok(next) => next,
                Err(_) => break,
            },
        };
        let Some(joined) = next else { break };
        match joined.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok((rank, reply)) => results[rank] = Some(reply),
            Err(e) if e.downcast_ref::<LostWorker>().is_some() => return Err(e),
            Err(e) => {
                if first_error.is_none() {
                    first_error = Some(e);
                    grace_until = Some(tokio::time::Instant::now() + FAILURE_GRACE);
                }
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("every rank answered"))
        .collect())
}

/// Bytes of one streamed chunk of model data.
const MODEL_CHUNK_BYTES: u64 = 1 << 20;

/// The chunks of `ranges` (each in the model file `paths[part]`), read on a blocking thread,
/// with progress in the log every tenth of the way.
fn stream_ranges(
    paths: Vec<PathBuf>,
    ranges: Vec<(usize, Range<u64>)>,
    header_hash: u64,
    rank: usize,
    total: u64,
    progress: indicatif::ProgressBar,
) -> tokio_stream::wrappers::ReceiverStream<proto::ModelChunk> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt;
        let mut files: Vec<Option<std::fs::File>> = paths.iter().map(|_| None).collect();
        let (mut sent, mut reported) = (0u64, 0u64);
        for (part, range) in ranges {
            let path = &paths[part];
            let file = match &mut files[part] {
                Some(file) => file,
                slot => match std::fs::File::open(path) {
                    Ok(file) => slot.insert(file),
                    Err(e) => {
                        tracing::error!(
                            path = %path.display(),
                            "cannot reopen the model to stream it: {e}"
                        );
                        return;
                    }
                },
            };
            let mut offset = range.start;
            while offset < range.end {
                let n = (range.end - offset).min(MODEL_CHUNK_BYTES);
                let mut data = vec![0u8; n as usize];
                if let Err(e) = file.read_exact_at(&mut data, offset) {
                    tracing::error!(path = %path.display(), "reading the model: {e}");
                    return;
                }
                let chunk = proto::ModelChunk {
                    model_header_hash: header_hash,
                    offset,
                    data,
                    part: part as u32,
                };
                if tx.blocking_send(chunk).is_err() {
                    return;
                }
                offset += n;
                sent += n;
                progress.inc(n);
                if sent * 10 / total > reported {
                    reported = sent * 10 / total;
                    tracing::info!(
                        rank,
                        "streaming shard: {:.1} of {:.1} MiB ({}%)",
                        sent as f64 / (1 << 20) as f64,
                        total as f64 / (1 << 20) as f64,
                        reported * 10
                    );
                }
            }
        }
        progress.finish_and_clear();
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A failed call's error, saying plainly when the connection itself was lost.
/// A worker the coordinator cannot reach any more: the root cause when others report a peer
/// that went silent.
#[derive(Debug)]
struct LostWorker(String);

impl std::fmt::Display for LostWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LostWorker {}

fn worker_failed(rank: usize, address: &str, status: &tonic::Status) -> anyhow::Error {
    let lost = matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    ) && !status.message().contains("AllReduce");
    if lost {
        anyhow::Error::new(LostWorker(format!(
            "lost contact with worker {rank} ({address}): {} (it stopped answering the control \
             plane's pings, or its connection broke)",
            status.message()
        )))
    } else {
        anyhow::anyhow!("worker {rank} ({address}): {}", status.message())
    }
}

/// What tells hosts apart: boot id, hostname and network namespace.
type HostIdentity = (String, String, String);

pub fn host_identity(hello: &proto::HelloReply) -> HostIdentity {
    (
        hello.boot_id.clone(),
        hello.hostname.clone(),
        hello.network_namespace.clone(),
    )
}

fn host_identity_here() -> HostIdentity {
    (
        crate::shard::host::boot_id(),
        crate::shard::host::hostname(),
        crate::shard::host::network_namespace(),
    )
}

/// One NUMA node per `--local` worker when this host has several (`TP_TOPOLOGY_XML` names an
/// hwloc XML file to use instead of this machine, for testing); empty otherwise.
fn numa_placements(workers: usize) -> (Vec<crate::numa::Placement>, Option<PathBuf>) {
    let xml = std::env::var_os("TP_TOPOLOGY_XML").map(PathBuf::from);
    if !crate::numa::SUPPORTED {
        return (Vec::new(), None);
    }
    match crate::numa::nodes(xml.as_deref()) {
        Ok(nodes) if nodes.len() > 1 => (crate::numa::place_local(&nodes, workers), xml),
        Ok(_) => (Vec::new(), None),
        Err(e) => {
            tracing::warn!("no NUMA placement: {e:#}");
            (Vec::new(), None)
        }
    }
}

/// Removes a directory when dropped.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A fresh secret for a cluster's data plane, from the kernel's random source.
fn cluster_secret() -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let mut secret = vec![0u8; SECRET_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut secret))
        .context("cannot read /dev/urandom for the cluster secret")?;
    Ok(secret)
}

fn unique_suffix() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    nanos as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_follow_the_pipeline_asked_for() {
        let ms = Duration::from_millis;
        let hosts = vec![vec![0, 1], vec![2, 3], vec![4]];
        let sizes = |p: &Pipeline, trips: &[Duration]| stage_sizes(p, 5, &hosts, trips).unwrap();
        assert_eq!(sizes(&Pipeline::Tensor, &[]), vec![5]);
        assert_eq!(sizes(&Pipeline::Even(2), &[]), vec![3, 2]);
        assert_eq!(sizes(&Pipeline::Sizes(vec![1, 4]), &[]), vec![1, 4]);
        assert_eq!(sizes(&Pipeline::PerHost, &[]), vec![2, 2, 1]);
        // auto: stages per host only when some host is slower than the threshold.
        let auto = Pipeline::Auto {
            threshold: PIPELINE_ROUND_TRIP,
        };
        assert_eq!(sizes(&auto, &[ms(0); 5]), vec![5]);
        assert_eq!(
            sizes(&auto, &[ms(0), ms(0), ms(3), ms(3), ms(3)]),
            vec![2, 2, 1]
        );
        // A host whose workers are not listed together cannot be a stage.
        let scattered = vec![vec![0, 2], vec![1]];
        let err = stage_sizes(&Pipeline::PerHost, 3, &scattered, &[]).unwrap_err();
        assert!(err.to_string().contains("listed together"), "{err}");
        assert_eq!(
            stage_sizes(&auto, 3, &scattered, &[ms(5); 3]).unwrap(),
            vec![3]
        );
        assert!(stage_sizes(&Pipeline::Even(0), 3, &scattered, &[]).is_err());
    }

    #[test]
    fn hosts_files_name_stages_in_order() {
        let parse = |text: &str| HostsFile::parse(text, Path::new("hosts.toml"));
        let hosts = parse(
            "[[worker]]\naddress = \"a:1\"\nstage = 0\n[[worker]]\naddress = \"b:1\"\nstage = 1\n[[worker]]\naddress = \"c:1\"\nstage = 1\n",
        )
        .unwrap();
        assert_eq!(hosts.pipeline(), Pipeline::Sizes(vec![1, 2]));
        let hosts = parse("parallelism = \"auto\"\n[[worker]]\naddress = \"a:1\"\n").unwrap();
        assert!(matches!(hosts.pipeline(), Pipeline::Auto { .. }));
        let err = parse("parallelism = \"layers\"\n[[worker]]\naddress = \"a:1\"\n").unwrap_err();
        assert!(err.to_string().contains("parallelism"), "{err}");
    }

    #[test]
    fn the_example_hosts_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/hosts.example.toml");
        let hosts = HostsFile::read(&path).unwrap();
        assert_eq!(hosts.transport, TransportChoice::Auto);
        assert_eq!(hosts.moe_split, MoeSplit::Tensor);
        assert_eq!(hosts.workers.len(), 3);
        assert_eq!(hosts.workers[2].weight, 0.5);
        assert!(hosts.workers[1].model_path.is_some());
        assert_eq!(hosts.workers[0].numa_node, Some(0));
        assert_eq!(
            hosts.auth_token_file.as_deref(),
            Some(Path::new("/etc/tp/token"))
        );
    }

    #[test]
    fn bad_hosts_files_say_where_and_what() {
        let path = Path::new("/etc/tp/hosts.toml");
        let error = |text: &str| HostsFile::parse(text, path).unwrap_err().to_string();
        let e = error("[[worker]]\naddress = \"a:1\"\nweight = \"heavy\"\n");
        assert!(e.contains("line 3, column 10"), "{e}");
        let e = error("[[worker]]\naddress = \"a:1\"\ndevice = \"cuda:0\"\n");
        assert!(e.contains("device \"cuda:0\" is not supported"), "{e}");
        let e = error("[[worker]]\naddress = \"a:1\"\nweight = -1.0\n");
        assert!(e.contains("weight must be a positive number"), "{e}");
        let e = error("[[worker]]\naddress = \"a:1\"\nnuma = 1\n");
        assert!(e.contains("unknown field"), "{e}");
        assert!(error("transport = \"auto\"\n").contains("no [[worker]] entries"));
        let e = error("moe_split = \"layer\"\n[[worker]]\naddress = \"a:1\"\n");
        assert!(
            e.contains("unknown variant `layer`, expected `tensor` or `expert`"),
            "{e}"
        );
        let hosts = HostsFile::parse(
            "moe_split = \"expert\"\n[[worker]]\naddress = \"a:1\"\n",
            path,
        )
        .unwrap();
        assert_eq!(hosts.moe_split, MoeSplit::Expert);
        // A relative token file is read from beside the hosts file.
        let hosts = HostsFile::parse(
            "auth_token_file = \"token\"\n[[worker]]\naddress = \"a:1\"\n",
            path,
        )
        .unwrap();
        assert_eq!(
            hosts.auth_token_file.as_deref(),
            Some(Path::new("/etc/tp/token"))
        );
    }
}
