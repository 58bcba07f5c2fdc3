//! The worker process: holds one shard of the model, runs its shard program on each step, and
//! exchanges partial results with its peers. It never sees text, only token ids.

pub mod backend;
pub mod executor;
pub mod kv;
pub mod model_cache;
pub mod moe;
pub mod shard;
pub mod slots;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::kernels::pool::ThreadPool;
use crate::model::arch::ModelConfig;
use crate::model::gguf::{GgufFile, MAX_SPLIT_COUNT};
use crate::proto;
use crate::shard::cache::{CacheType, CacheTypes, check_save_name};
use crate::shard::host::{boot_id, hostname, model_header_hash, network_namespace};
use crate::shard::plan::{LayerShard, RankShard, Stage, check_rank_shard};
use crate::transport::grpc::{
    BytesSent, GrpcCollective, GrpcSpec, Registry, SECRET_BYTES, SyncPrecision, Unconnected,
};
use crate::transport::hierarchical::Hierarchical;
use crate::transport::shm::{ShmCollective, ShmSegment};
use crate::transport::{AbortSignal, Collective, CollectiveLimits, Solo};
use crate::worker::kv::KvLayout;
use crate::worker::slots::SavedShard;
use backend::Backend;
use executor::{CpuBackend, OutputRequest};
use model_cache::CacheFile;

/// Limits a worker enforces on what a coordinator may ask.
pub const MAX_BATCH_LIMIT: u32 = 4096;
pub const MAX_SEQUENCES_LIMIT: u32 = 256;
/// Largest KV block (positions) a worker accepts.
pub const MAX_KV_BLOCK_SIZE: usize = 1 << 20;
pub use crate::limits::{MAX_MESSAGE_BYTES, MAX_TOP_K};

pub struct WorkerOptions {
    pub listen: SocketAddr,
    /// Compute threads; 0 means one per available core.
    pub threads: usize,
    /// CPUs to pin compute thread i to (`pin[i % len]`); None leaves placement to the OS.
    pub pin: Option<Vec<usize>>,
    /// Where model bytes received from a coordinator are kept (None: the default).
    pub cache_dir: Option<PathBuf>,
    /// Port of the data-plane socket (on the control plane's address); 0 picks a free one.
    pub data_port: u16,
    /// The token every control-plane request must carry; None accepts any caller.
    pub auth_token: Option<crate::auth::Token>,
    /// Mutual TLS on the control plane.
    pub tls: Option<crate::tls::TlsFiles>,
    /// The NUMA node this worker is bound to, reported to the coordinator.
    pub numa_node: Option<usize>,
    /// Where sequence slots are saved and restored from (`--slot-save-path`); None refuses.
    pub slot_save_path: Option<PathBuf>,
}

/// Most byte ranges one PrepareModel may list.
const MAX_RANGES: usize = 4 << 20;

/// How this worker's collective reaches its peers over the network, kept for reconnecting.
struct NetworkPlane {
    /// Ranks this worker links to over gRPC: its AllReduce group and its pipeline neighbours.
    members: Vec<u32>,
    /// Ranks that sum over gRPC: the stage's ranks (flat), each host's leader of the stage
    /// (hierarchical), or this worker alone (links to neighbouring stages only).
    group: Vec<u32>,
    previous: Option<u32>,
    next: Option<u32>,
    addresses: Vec<String>,
    secret: Vec<u8>,
    precision: SyncPrecision,
    limits: CollectiveLimits,
}

/// The data plane of a loaded shard.
enum Plane {
    /// One rank, or shared memory between every rank: built at load.
    Fixed(Box<dyn Collective>),
    /// gRPC between ranks, flat or between host leaders with shared memory inside each host
    /// (or shared memory and links to the neighbouring pipeline stages); the gRPC part is
    /// (re)built by ConnectPeers.
    Network {
        /// None on a hierarchical rank that is not its host's leader.
        net: Option<NetworkPlane>,
        local: Option<ShmCollective>,
        /// Whether sums go on between hosts after the host's own (hierarchical).
        cross_host: bool,
        /// The host's segment, owned (and removed on drop) by its leader.
        _segment: Option<ShmSegment>,
        grpc: Option<GrpcCollective>,
    },
}

impl Plane {
    fn with_collective<R>(
        &mut self,
        rank_index: usize,
        rank_count: usize,
        f: impl FnOnce(&mut dyn Collective) -> R,
    ) -> R {
        match self {
            Plane::Fixed(collective) => f(collective.as_mut()),
            Plane::Network {
                net,
                local,
                grpc,
                cross_host,
                ..
            } => {
                if net.is_some() && grpc.is_none() {
                    return f(&mut Unconnected(
                        "the gRPC data plane is not connected (ConnectPeers)".into(),
                    ));
                }
                match local {
                    Some(local) => f(&mut Hierarchical {
                        local,
                        leaders: grpc.as_mut(),
                        cross_host: *cross_host,
                        rank_index,
                        rank_count,
                    }),
                    None => f(grpc.as_mut().expect("checked above")),
                }
            }
        }
    }
}

struct Loaded {
    executor: Box<dyn Backend>,
    plane: Plane,
    rank_index: u32,
    rank_count: u32,
    /// Place and size of this worker's tensor-parallel group (its pipeline stage).
    group_index: usize,
    group_size: usize,
    pool: ThreadPool,
    weight_bytes: u64,
    steps: u64,
    compute_seconds: f64,
    /// The request the shard was loaded by, without its data plane (`shard_identity`): a later
    /// LoadShard asking for the same shard keeps it and only rebuilds the data plane.
    identity: Vec<u8>,
    config: ModelConfig,
    max_batch: usize,
    /// What a saved sequence must agree with to be restored into this shard.
    saved_shard: SavedShard,
}

/// What identifies a loaded shard: its LoadShard request without the data-plane fields, which
/// change with every re-formed cluster (segment, peers, secret) while the weights do not.
fn shard_identity(request: &proto::LoadShardRequest) -> Vec<u8> {
    use prost::Message;
    let mut weights_only = request.clone();
    weights_only.shm_path.clear();
    weights_only.collective_timeout_ms = 0;
    weights_only.transport.clear();
    weights_only.peer_addresses.clear();
    weights_only.cluster_secret.clear();
    weights_only.sync_precision.clear();
    weights_only.leader_ranks.clear();
    weights_only.host_ranks.clear();
    weights_only.encode_to_vec()
}

/// The last step finished on a worker, counted within one LoadShard.
#[derive(Clone, Copy, Debug, Default)]
struct Finished {
    load: u64,
    step: u64,
}

/// Locks the shard. A panic while it was held (a bug in a step) leaves the shard in an unknown
/// state: it is dropped, so that the next LoadShard starts clean instead of every later call
/// failing on a poisoned lock. (The tp-worker binary exits on any panic; this is for workers
/// run inside another program.)
fn lock_shard(state: &Mutex<Option<Loaded>>) -> std::sync::MutexGuard<'_, Option<Loaded>> {
    state.lock().unwrap_or_else(|poisoned| {
        tracing::error!("a panic interrupted work on the shard: dropping it");
        state.clear_poison();
        let mut guard = poisoned.into_inner();
        *guard = None;
        guard
    })
}

/// Locks a mutex whose value stays consistent even if a holder panicked (counters, the cache
/// file being received, which checks its own writes).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| {
        mutex.clear_poison();
        poisoned.into_inner()
    })
}

/// A panic's message, for the error a coordinator sees.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// A `VmHWM`/`VmRSS` style line of /proc/self/status, in bytes.
/// Bytes of a `KEY: N kB` line of a /proc file's text (`/proc/meminfo`, `/proc/PID/status`).
pub fn proc_kb_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// The host's available memory (`MemAvailable`), where the kernel reports it.
pub fn available_memory_bytes() -> Option<u64> {
    proc_kb_field(
        &std::fs::read_to_string("/proc/meminfo").ok()?,
        "MemAvailable:",
    )
}

fn proc_status_bytes(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    proc_kb_field(&status, key).unwrap_or(0)
}

pub struct WorkerService {
    state: Arc<Mutex<Option<Loaded>>>,
    /// Shards loaded by reading weights, and LoadShard calls that kept the shard held.
    shard_loads: Arc<std::sync::atomic::AtomicU64>,
    shard_kept: Arc<std::sync::atomic::AtomicU64>,
    /// Steps run since the worker started; with `panic_at_step` (a test hook, from
    /// `TP_TEST_PANIC_AT_STEP`) the step of that number panics.
    steps_started: Arc<std::sync::atomic::AtomicU64>,
    panic_at_step: Option<u64>,
    /// Steps the coordinator aborted (`Abort`); the collectives stop waiting on them.
    abort: AbortSignal,
    /// The latest step that finished here (well or not), with the LoadShard it belongs to (a
    /// new cluster numbers its steps anew): a pipelined step waits for the one it names in
    /// `after_step`.
    finished: tokio::sync::watch::Sender<Finished>,
    /// The data-plane socket; each gRPC collective serves it from its own runtime.
    data_listener: Arc<std::net::TcpListener>,
    cache_dir: PathBuf,
    /// `--slot-save-path`: where sequences are saved.
    slot_save_path: Option<PathBuf>,
    /// The cache file PrepareModel opened, which PushModel fills.
    receiving: Arc<Mutex<Option<CacheFile>>>,
    registry: Arc<Registry>,
    bytes_sent: Arc<Mutex<BytesSent>>,
    threads: usize,
    pin: Option<Vec<usize>>,
    shutdown: tokio::sync::mpsc::Sender<()>,
    /// TLS for the data plane as for the control plane.
    tls: Option<crate::tls::TlsFiles>,
    numa_node: Option<usize>,
}

/// The shared-memory collective of this rank's host in a hierarchical cluster. The host's
/// leader creates the segment; the others open it once it is there (loads run in parallel).
fn host_segment(
    request: &proto::LoadShardRequest,
    host_ranks: &[u32],
    config: &ModelConfig,
    max_batch: usize,
    limits: CollectiveLimits,
    abort: &AbortSignal,
) -> Result<(Option<ShmCollective>, Option<ShmSegment>), String> {
    let path = PathBuf::from(&request.shm_path);
    if !request.shm_path.starts_with("/dev/shm/tp-") || request.shm_path.contains("..") {
        return Err(format!(
            "shared-memory path {} is not a tp segment in /dev/shm",
            request.shm_path
        ));
    }
    let index = host_ranks
        .iter()
        .position(|&r| r == request.rank_index)
        .expect("checked by the caller");
    let segment = if index == 0 {
        Some(
            ShmSegment::create(
                &path,
                host_ranks.len(),
                max_batch * config.model_dim * size_of::<f64>(),
            )
            .map_err(|e| e.to_string())?,
        )
    } else {
        None
    };
    let deadline = Instant::now() + limits.timeout;
    loop {
        match ShmCollective::open(&path, index, host_ranks.len(), limits) {
            Ok(local) => return Ok((Some(local.with_abort(abort.clone())), segment)),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("host segment of rank {}: {e}", host_ranks[0]));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn load(
    request: proto::LoadShardRequest,
    default_threads: usize,
    pin: Option<&[usize]>,
    abort: &AbortSignal,
) -> Result<(Loaded, proto::LoadShardReply), String> {
    let started = Instant::now();
    let file = GgufFile::open(&request.model_path).map_err(|e| e.to_string())?;
    if file.part_sizes() != request.part_sizes
        || model_header_hash(&file) != request.model_header_hash
    {
        return Err(format!(
            "{} is not the coordinator's model (file sizes or header hash differ)",
            request.model_path
        ));
    }
    let config = ModelConfig::from_gguf(&file).map_err(|e| e.to_string())?;
    let stage = stage_of(&request, config.layer_count)?;
    let shard = RankShard {
        rank_index: request.rank_index as usize,
        rank_count: request.rank_count as usize,
        vocab_rows: request.vocab_start as usize..request.vocab_end as usize,
        embed_rows: request.embed_start as usize..request.embed_end as usize,
        stage,
        layers: request
            .layers
            .iter()
            .map(|l| LayerShard {
                q_heads: l.q_start as usize..l.q_end as usize,
                kv_heads: l.kv_start as usize..l.kv_end as usize,
                ffn_columns: l.ffn_start as usize..l.ffn_end as usize,
                experts: l.expert_start as usize..l.expert_end as usize,
                shared_columns: l.shared_start as usize..l.shared_end as usize,
            })
            .collect(),
    };
    check_rank_shard(&config, &shard).map_err(|e| format!("shard rejected: {e}"))?;
    let limit = |value: u32, max: u32, what: &str| {
        if value == 0 || value > max {
            Err(format!("{what} {value} is outside 1..={max}"))
        } else {
            Ok(value as usize)
        }
    };
    let max_batch = limit(request.max_batch, MAX_BATCH_LIMIT, "max batch")?;
    let max_sequences = limit(request.max_sequences, MAX_SEQUENCES_LIMIT, "max sequences")?;
    let max_context = limit(
        request.max_context,
        config.context_length as u32,
        "max context",
    )?;
    let cache_types = CacheTypes {
        k: CacheType::from_wire(&request.cache_type_k)?,
        v: CacheType::from_wire(&request.cache_type_v)?,
    };
    cache_types.check_head_dim(config.head_dim)?;
    let block_size = request.kv_block_size as usize;
    if !block_size.is_power_of_two() || block_size > MAX_KV_BLOCK_SIZE {
        return Err(format!(
            "KV block size {block_size} is not a power of two in 1..={MAX_KV_BLOCK_SIZE}"
        ));
    }
    let kv_layout = KvLayout {
        sequences: max_sequences,
        context: max_context,
        block_size,
        blocks: request.kv_blocks as usize,
        types: cache_types,
    };
    let kv_heads: Vec<usize> = shard.layers.iter().map(|l| l.kv_heads.len()).collect();
    let kv_bytes = kv_layout.bytes(&kv_heads, config.head_dim);
    if kv_layout.blocks == 0 {
        return Err("a KV pool of 0 blocks".into());
    }
    if let Some(available) = available_memory_bytes()
        && kv_bytes > available
    {
        return Err(format!(
            "the KV pool of {} blocks needs {:.2} GiB, more than this host's {:.2} GiB of \
             available memory: lower --kv-budget, --parallel or -c",
            kv_layout.blocks,
            kv_bytes as f64 / (1u64 << 30) as f64,
            available as f64 / (1u64 << 30) as f64
        ));
    }
    let threads = if request.threads > 0 {
        request.threads as usize
    } else {
        default_threads
    };
    let pool = ThreadPool::new(threads, pin)
        .map_err(|e| format!("cannot start {threads} compute threads: {e}"))?;
    let loaded = pool
        .install(|| shard::load_shard(&file, &config, &shard))
        .map_err(|e| e.to_string())?;
    let weight_bytes = loaded.weight_bytes;
    let notes = loaded.notes.clone();
    drop(file);
    let executor = CpuBackend::new(&config, &shard, loaded, max_batch, kv_layout)
        .map_err(|e| e.to_string())?;
    let executor: Box<dyn Backend> = Box::new(executor);
    let plane = data_plane(&request, &config, max_batch, abort)?;
    let (group_index, group_size) = (shard.group_index(), shard.group_size());
    let reply = proto::LoadShardReply {
        weight_bytes,
        kv_cache_bytes: executor.kv_cache_bytes(),
        load_seconds: started.elapsed().as_secs_f64(),
        notes,
        kept: false,
    };
    Ok((
        Loaded {
            executor,
            plane,
            rank_index: request.rank_index,
            rank_count: request.rank_count,
            group_index,
            group_size,
            pool,
            weight_bytes,
            steps: 0,
            compute_seconds: 0.0,
            identity: shard_identity(&request),
            saved_shard: SavedShard {
                model_header_hash: request.model_header_hash,
                rank_index: request.rank_index,
                rank_count: request.rank_count,
                kv_heads: shard
                    .layers
                    .iter()
                    .map(|l| (l.kv_heads.start as u32, l.kv_heads.end as u32))
                    .collect(),
                head_dim: config.head_dim as u32,
                cache_type_k: cache_types.k.name().into(),
                cache_type_v: cache_types.v.name().into(),
            },
            config,
            max_batch,
        },
        reply,
    ))
}

/// This worker's pipeline stage, from a LoadShard request (one stage of every rank when it
/// names none).
fn stage_of(request: &proto::LoadShardRequest, layer_count: usize) -> Result<Stage, String> {
    let (rank, ranks) = (request.rank_index, request.rank_count);
    if request.stage_starts.is_empty() {
        return Ok(Stage::whole(ranks as usize, layer_count));
    }
    let starts = &request.stage_starts;
    if starts.len() < 2
        || starts[0] != 0
        || starts[starts.len() - 1] != ranks
        || !starts.windows(2).all(|w| w[0] < w[1])
    {
        return Err(format!(
            "pipeline stages starting at ranks {starts:?} do not divide {ranks} ranks"
        ));
    }
    let index = starts
        .windows(2)
        .position(|w| (w[0]..w[1]).contains(&rank))
        .ok_or_else(|| format!("rank {rank} lies in no pipeline stage {starts:?}"))?;
    Ok(Stage {
        index,
        count: starts.len() - 1,
        ranks: starts[index] as usize..starts[index + 1] as usize,
        layers: request.layer_start as usize..request.layer_end as usize,
    })
}

/// The data plane a LoadShard asks for: built at every load, and alone when a worker keeps its
/// shard while the cluster re-forms around a restarted peer. With pipeline stages it serves
/// this worker's stage (its tensor-parallel group), plus, on a stage's first rank, the links
/// to the neighbouring stages' first ranks (always gRPC).
fn data_plane(
    request: &proto::LoadShardRequest,
    config: &ModelConfig,
    max_batch: usize,
    abort: &AbortSignal,
) -> Result<Plane, String> {
    let stage = stage_of(request, config.layer_count)?;
    let rank = request.rank_index;
    let (group_index, group_size) = (rank as usize - stage.ranks.start, stage.ranks.len());
    let first_rank = group_index == 0;
    let previous = (first_rank && !stage.is_first()).then(|| request.stage_starts[stage.index - 1]);
    let next = (first_rank && !stage.is_last()).then(|| request.stage_starts[stage.index + 1]);
    let piped = previous.is_some() || next.is_some();
    let limits = CollectiveLimits {
        timeout: Duration::from_millis(request.collective_timeout_ms.max(1) as u64),
        ..CollectiveLimits::default()
    };
    let stage_ranks: Vec<u32> = (stage.ranks.start as u32..stage.ranks.end as u32).collect();
    let network = |group: Vec<u32>| -> Result<NetworkPlane, String> {
        if request.peer_addresses.len() != request.rank_count as usize {
            return Err(format!(
                "{} peer addresses for {} ranks",
                request.peer_addresses.len(),
                request.rank_count
            ));
        }
        if request.cluster_secret.len() != SECRET_BYTES {
            return Err(format!("a cluster secret must be {SECRET_BYTES} bytes"));
        }
        let mut members: Vec<u32> = group.iter().copied().chain(previous).chain(next).collect();
        members.sort_unstable();
        members.dedup();
        Ok(NetworkPlane {
            members,
            group,
            previous,
            next,
            addresses: request.peer_addresses.clone(),
            secret: request.cluster_secret.clone(),
            precision: request.sync_precision.parse()?,
            limits,
        })
    };
    let shm = |index: usize, count: usize| -> Result<ShmCollective, String> {
        Ok(
            ShmCollective::open(&PathBuf::from(&request.shm_path), index, count, limits)
                .map_err(|e| e.to_string())?
                .with_abort(abort.clone()),
        )
    };
    let plane = match request.transport.as_str() {
        _ if group_size == 1 && !piped => Plane::Fixed(Box::new(Solo)),
        "" | "shm" if !piped => Plane::Fixed(Box::new(shm(group_index, group_size)?)),
        // A stage's first rank on one host: shared memory inside the stage, gRPC links to the
        // neighbouring stages.
        "" | "shm" => Plane::Network {
            net: Some(network(vec![rank])?),
            local: if group_size > 1 {
                Some(shm(group_index, group_size)?)
            } else {
                None
            },
            cross_host: false,
            _segment: None,
            grpc: None,
        },
        "grpc" => Plane::Network {
            net: Some(network(stage_ranks)?),
            local: None,
            cross_host: false,
            _segment: None,
            grpc: None,
        },
        "hierarchical" => {
            let ascending = |v: &[u32]| v.windows(2).all(|w| w[0] < w[1]);
            let (hosts, leaders) = (&request.host_ranks, &request.leader_ranks);
            if !hosts.contains(&rank)
                || !ascending(hosts)
                || !ascending(leaders)
                || !leaders.contains(&hosts[0])
                || leaders
                    .iter()
                    .chain(hosts)
                    .any(|&r| !stage.ranks.contains(&(r as usize)))
            {
                return Err(format!(
                    "bad hierarchical layout for rank {rank}: host ranks {hosts:?}, leaders {leaders:?} (stage ranks {:?})",
                    stage.ranks
                ));
            }
            let leader = hosts[0] == rank;
            if first_rank && !leader {
                return Err(format!(
                    "rank {rank} is its stage's first rank but not its host's leader"
                ));
            }
            let net = if leader {
                Some(network(leaders.clone())?)
            } else {
                None
            };
            let (local, segment) = if hosts.len() > 1 {
                host_segment(request, hosts, config, max_batch, limits, abort)?
            } else {
                (None, None)
            };
            Plane::Network {
                net,
                local,
                cross_host: leaders.len() > 1,
                _segment: segment,
                grpc: None,
            }
        }
        other => return Err(format!("unknown transport '{other}'")),
    };
    Ok(plane)
}

impl WorkerService {
    /// Runs `work` on the loaded shard with this rank's file of a saved sequence named
    /// `file_name` (checked: a plain name in `--slot-save-path`), off the async threads; returns
    /// its result and the seconds it took. Its errors are the request's fault.
    async fn with_save_file<T: Send + 'static>(
        &self,
        file_name: &str,
        work: impl FnOnce(&mut Loaded, &Path) -> Result<T, String> + Send + 'static,
    ) -> Result<(T, f64), Status> {
        let dir = self.save_dir()?;
        check_save_name(file_name).map_err(Status::invalid_argument)?;
        let file_name = file_name.to_string();
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut guard = lock_shard(&state);
            let loaded = guard
                .as_mut()
                .ok_or_else(|| Status::failed_precondition("no shard loaded"))?;
            let path = slots::file_path(&dir, &file_name, loaded.rank_index);
            let result = work(loaded, &path).map_err(Status::invalid_argument)?;
            Ok((result, started.elapsed().as_secs_f64()))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
    }

    /// The directory saved sequences go to, or why there is none.
    fn save_dir(&self) -> Result<PathBuf, Status> {
        let dir = self.slot_save_path.clone().ok_or_else(|| {
            Status::failed_precondition(
                "this worker was started without --slot-save-path: it does not save sequences",
            )
        })?;
        std::fs::create_dir_all(&dir).map_err(|e| {
            Status::failed_precondition(format!("cannot use {}: {e}", dir.display()))
        })?;
        Ok(dir)
    }
}

#[tonic::async_trait]
impl proto::worker_server::Worker for WorkerService {
    async fn hello(
        &self,
        _: Request<proto::HelloRequest>,
    ) -> Result<Response<proto::HelloReply>, Status> {
        Ok(Response::new(proto::HelloReply {
            version: env!("CARGO_PKG_VERSION").into(),
            hostname: hostname(),
            boot_id: boot_id(),
            pid: std::process::id(),
            threads: self.threads as u32,
            network_namespace: network_namespace(),
            data_plane_port: self
                .data_listener
                .local_addr()
                .map_or(0, |a| a.port() as u32),
            numa_node: self.numa_node.map(|n| n as u32),
            device: "cpu".into(),
            protocol: crate::PROTOCOL_VERSION,
            available_memory: available_memory_bytes().unwrap_or(0),
        }))
    }

    async fn prepare_model(
        &self,
        request: Request<proto::PrepareModelRequest>,
    ) -> Result<Response<proto::PrepareModelReply>, Status> {
        let request = request.into_inner();
        let sizes = request.part_sizes.clone();
        if sizes.is_empty() || sizes.len() > MAX_SPLIT_COUNT {
            return Err(Status::invalid_argument(format!(
                "a model of {} files (1 to {MAX_SPLIT_COUNT})",
                sizes.len()
            )));
        }
        if request.ranges.len() > MAX_RANGES {
            return Err(Status::invalid_argument(format!(
                "{} ranges exceed the limit of {MAX_RANGES}",
                request.ranges.len()
            )));
        }
        let mut wanted = vec![Vec::new(); sizes.len()];
        for r in &request.ranges {
            let size = sizes.get(r.part as usize).copied().unwrap_or(0);
            if r.start >= r.end || r.end > size {
                return Err(Status::invalid_argument(format!(
                    "range {}..{} of file {} is empty or outside that file (the model has {})",
                    r.start,
                    r.end,
                    r.part,
                    sizes.len()
                )));
            }
            wanted[r.part as usize].push(r.start..r.end);
        }
        let wanted: Vec<_> = wanted
            .into_iter()
            .map(crate::shard::tensors::merge_ranges)
            .collect();
        let cache_dir = self.cache_dir.clone();
        let receiving = self.receiving.clone();
        tokio::task::spawn_blocking(move || {
            let local = !request.model_path.is_empty()
                && match GgufFile::open(&request.model_path) {
                    Ok(file) => {
                        file.part_sizes() == sizes
                            && model_header_hash(&file) == request.model_header_hash
                    }
                    Err(e) => {
                        // Say why a copy that is there is not used (a split model's part missing).
                        if std::path::Path::new(&request.model_path).exists() {
                            tracing::warn!("{e}: using the cache instead");
                        }
                        false
                    }
                };
            if local {
                return Ok(Response::new(proto::PrepareModelReply {
                    path: request.model_path,
                    source: "local copy".into(),
                    missing: Vec::new(),
                }));
            }
            let (cache, missing) =
                CacheFile::open(&cache_dir, request.model_header_hash, &sizes, &wanted).map_err(
                    |e| Status::internal(format!("model cache in {}: {e}", cache_dir.display())),
                )?;
            let missing: Vec<proto::ByteRange> = missing
                .iter()
                .enumerate()
                .flat_map(|(part, ranges)| {
                    ranges.iter().map(move |r| proto::ByteRange {
                        start: r.start,
                        end: r.end,
                        part: part as u32,
                    })
                })
                .collect();
            let reply = proto::PrepareModelReply {
                path: cache.path.display().to_string(),
                source: if missing.is_empty() {
                    "cache".into()
                } else {
                    "cache (incomplete)".into()
                },
                missing,
            };
            tracing::info!(
                path = %reply.path,
                missing_mib = reply.missing.iter().map(|r| r.end - r.start).sum::<u64>() as f64 / (1 << 20) as f64,
                "no local copy of the model: using the cache"
            );
            *lock(&receiving) = Some(cache);
            Ok(Response::new(reply))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
    }

    async fn push_model(
        &self,
        request: Request<tonic::Streaming<proto::ModelChunk>>,
    ) -> Result<Response<proto::PushModelReply>, Status> {
        let mut stream = request.into_inner();
        let mut written = 0u64;
        while let Some(chunk) = stream.message().await? {
            let mut guard = lock(&self.receiving);
            let cache = guard
                .as_mut()
                .ok_or_else(|| Status::failed_precondition("PushModel without PrepareModel"))?;
            if chunk.model_header_hash != cache.header_hash {
                return Err(Status::invalid_argument(
                    "chunk of another model than the one prepared",
                ));
            }
            cache
                .write(chunk.part as usize, chunk.offset, &chunk.data)
                .map_err(Status::invalid_argument)?;
            written += chunk.data.len() as u64;
        }
        let receiving = self.receiving.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(cache) = lock(&receiving).as_mut() {
                cache
                    .commit()
                    .map_err(|e| Status::internal(e.to_string()))?;
            }
            Ok::<_, Status>(())
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        tracing::info!(
            mib = written as f64 / (1 << 20) as f64,
            "model bytes received and cached"
        );
        Ok(Response::new(proto::PushModelReply {
            bytes_written: written,
        }))
    }

    async fn load_shard(
        &self,
        request: Request<proto::LoadShardRequest>,
    ) -> Result<Response<proto::LoadShardReply>, Status> {
        let request = request.into_inner();
        let state = self.state.clone();
        let threads = self.threads;
        let pin = self.pin.clone();
        let (loads, kept) = (self.shard_loads.clone(), self.shard_kept.clone());
        let abort = self.abort.clone();
        // A new cluster: streams of the old one are refused from now on, and its coordinator
        // numbers its steps anew (a pipelined step waits for the one before it by number).
        self.registry.clear();
        self.finished.send_modify(|f| {
            f.load += 1;
            f.step = 0;
        });
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut guard = lock_shard(&state);
            // The new cluster counts its steps from the start.
            abort.reset();
            // The same shard again (the cluster re-forms around a restarted peer): keep the
            // weights, rebuild only the data plane. Reading tens of GB again would take minutes.
            if let Some(loaded) = guard.as_mut()
                && loaded.identity == shard_identity(&request)
            {
                // The old links and segment go first; a failed rebuild leaves an unconnected
                // plane, so steps fail clearly until the next LoadShard.
                loaded.plane = Plane::Fixed(Box::new(Unconnected(
                    "the data plane could not be rebuilt (see the worker's log)".into(),
                )));
                loaded.plane = data_plane(&request, &loaded.config, loaded.max_batch, &abort)
                    .map_err(Status::invalid_argument)?;
                kept.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!("same shard as loaded: kept its weights, rebuilt the data plane");
                return Ok(Response::new(proto::LoadShardReply {
                    weight_bytes: loaded.weight_bytes,
                    kv_cache_bytes: loaded.executor.kv_cache_bytes(),
                    load_seconds: started.elapsed().as_secs_f64(),
                    notes: Vec::new(),
                    kept: true,
                }));
            }
            // Drop any previous shard first so two never coexist in memory.
            *guard = None;
            let (loaded, reply) =
                load(request, threads, pin.as_deref(), &abort).map_err(Status::invalid_argument)?;
            loads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(
                weight_mib = reply.weight_bytes as f64 / (1 << 20) as f64,
                kv_mib = reply.kv_cache_bytes as f64 / (1 << 20) as f64,
                seconds = reply.load_seconds,
                "shard loaded"
            );
            for note in &reply.notes {
                tracing::info!("{note}");
            }
            *guard = Some(loaded);
            Ok(Response::new(reply))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
    }

    async fn step(
        &self,
        request: Request<proto::StepRequest>,
    ) -> Result<Response<proto::StepReply>, Status> {
        let request = request.into_inner();
        let state = self.state.clone();
        let number = 1 + self
            .steps_started
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let inject_panic = self.panic_at_step == Some(number);
        let abort = self.abort.clone();
        // Micro-batches of a pipeline arrive together; each runs after the one before it.
        let load = self.finished.borrow().load;
        if request.after_step != 0 && request.after_step < request.step {
            let mut finished = self.finished.subscribe();
            while {
                let f = *finished.borrow_and_update();
                f.load == load && f.step < request.after_step
            } {
                if abort.aborted(request.step) {
                    return Err(Status::aborted(format!(
                        "step {} was aborted by the coordinator before it ran",
                        request.step
                    )));
                }
                let _ = tokio::time::timeout(Duration::from_millis(20), finished.changed()).await;
            }
        }
        let step_number = request.step;
        let finished = self.finished.clone();
        let result = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut guard = lock_shard(&state);
            if abort.aborted(request.step) {
                return Err(Status::aborted(format!(
                    "step {} was aborted by the coordinator before it ran",
                    request.step
                )));
            }
            let Some(loaded) = guard.as_mut() else {
                return Err(Status::failed_precondition(
                    "no shard loaded (the worker restarted, or its shard was dropped after an \
                     error): the coordinator must load it again",
                ));
            };
            if request.top_k > MAX_TOP_K {
                return Err(Status::invalid_argument(format!(
                    "top_k {} exceeds {MAX_TOP_K}",
                    request.top_k
                )));
            }
            let output = OutputRequest {
                rows: request.output_rows.iter().map(|&r| r as usize).collect(),
                top_k: request.top_k as usize,
                full_logits: request.full_logits,
                targets: request.targets.clone(),
            };
            let Loaded {
                executor,
                plane,
                pool,
                steps,
                compute_seconds,
                group_index,
                group_size,
                ..
            } = loaded;
            for t in &request.tables {
                executor
                    .set_block_table(t.sequence as usize, t.first as usize, &t.blocks)
                    .map_err(Status::invalid_argument)?;
            }
            // A panic in a step leaves the shard in an unknown state: it is dropped and the
            // coordinator told (the tp-worker binary exits instead, for its supervisor).
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                plane.with_collective(*group_index, *group_size, |collective| {
                    collective.begin_step(request.step);
                    if inject_panic {
                        panic!("injected by TP_TEST_PANIC_AT_STEP at step {number}");
                    }
                    pool.install(|| {
                        executor.step(
                            collective,
                            &request.tokens,
                            &request.positions,
                            &request.sequences,
                            &output,
                        )
                    })
                })
            }));
            let rows = match run {
                Ok(rows) => rows,
                Err(payload) => {
                    let message = panic_message(payload.as_ref()).to_string();
                    *guard = None;
                    tracing::error!("step panicked: {message}; the shard is dropped");
                    return Err(Status::internal(format!(
                        "the worker panicked in a step ({message}) and dropped its shard"
                    )));
                }
            };
            let rows = rows.map_err(|e| match e {
                executor::StepError::Transport(t) => Status::aborted(t.to_string()),
                executor::StepError::Invalid(m) => Status::invalid_argument(m),
            })?;
            *steps += 1;
            *compute_seconds += started.elapsed().as_secs_f64();
            let (collective_seconds, collectives, collective_bytes) = executor.collective_stats();
            Ok(Response::new(proto::StepReply {
                rows: rows
                    .into_iter()
                    .map(|r| proto::RowOutput {
                        ids: r.ids,
                        logits: r.logits,
                        log_sum_exp: r.log_sum_exp,
                        full: r.full,
                        target_logit: r.target_logit,
                    })
                    .collect(),
                vocab_start: executor.vocab_start() as u32,
                compute_seconds: started.elapsed().as_secs_f64(),
                collective_seconds,
                collectives,
                collective_bytes,
                step: request.step,
            }))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        finished.send_modify(|f| {
            if f.load == load {
                f.step = f.step.max(step_number);
            }
        });
        result
    }

    async fn connect_peers(
        &self,
        request: Request<proto::ConnectPeersRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let generation = request.into_inner().generation;
        let state = self.state.clone();
        let registry = self.registry.clone();
        let counters = self.bytes_sent.clone();
        let listener = self.data_listener.clone();
        let tls = self.tls.clone();
        let abort = self.abort.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = lock_shard(&state);
            let Some(loaded) = guard.as_mut() else {
                return Err(Status::failed_precondition("no shard loaded"));
            };
            let Plane::Network {
                net: Some(network),
                grpc,
                ..
            } = &mut loaded.plane
            else {
                return Ok(Response::new(proto::Empty {}));
            };
            // Drop the old links first: their streams end, and peers see a clean round.
            *grpc = None;
            let bytes_sent: BytesSent = {
                let mut counters = lock(&counters);
                if counters.len() != loaded.rank_count as usize {
                    *counters = Arc::new(
                        (0..loaded.rank_count)
                            .map(|_| std::sync::atomic::AtomicU64::new(0))
                            .collect(),
                    );
                }
                counters.clone()
            };
            let spec = GrpcSpec {
                members: network.members.clone(),
                group: network.group.clone(),
                previous: network.previous,
                next: network.next,
                addresses: network.addresses.clone(),
                rank: loaded.rank_index,
                secret: network.secret.clone(),
                generation,
                precision: network.precision,
                limits: network.limits,
                tls: tls.clone(),
            };
            let collective = GrpcCollective::connect(spec, registry, &listener, bytes_sent)
                .map_err(|e| Status::unavailable(e.to_string()))?
                .with_abort(abort);
            tracing::info!(generation, "data plane connected");
            *grpc = Some(collective);
            Ok(Response::new(proto::Empty {}))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
    }

    async fn clear_sequence(
        &self,
        request: Request<proto::ClearSequenceRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let sequence = request.into_inner().sequence as usize;
        if let Some(loaded) = lock_shard(&self.state).as_mut() {
            loaded.executor.clear_sequence(sequence);
        }
        Ok(Response::new(proto::Empty {}))
    }

    async fn save_sequence(
        &self,
        request: Request<proto::SaveSequenceRequest>,
    ) -> Result<Response<proto::SaveSequenceReply>, Status> {
        let request = request.into_inner();
        self.with_save_file(&request.file_name, move |loaded, path| {
            let sequence = request.sequence as usize;
            loaded
                .executor
                .set_block_table(sequence, 0, &request.blocks)?;
            let bytes = loaded.executor.save_sequence(
                path,
                &loaded.saved_shard,
                sequence,
                &request.tokens,
            )?;
            tracing::info!(path = %path.display(), bytes, "sequence saved");
            Ok(proto::SaveSequenceReply {
                bytes,
                seconds: 0.0,
            })
        })
        .await
        .map(|(mut reply, seconds)| {
            reply.seconds = seconds;
            Response::new(reply)
        })
    }

    async fn restore_sequence(
        &self,
        request: Request<proto::RestoreSequenceRequest>,
    ) -> Result<Response<proto::RestoreSequenceReply>, Status> {
        let request = request.into_inner();
        self.with_save_file(&request.file_name, move |loaded, path| {
            let sequence = request.sequence as usize;
            if request.header_only {
                let tokens = slots::peek(path, &loaded.saved_shard)?;
                return Ok(proto::RestoreSequenceReply {
                    tokens,
                    bytes: 0,
                    seconds: 0.0,
                });
            }
            loaded
                .executor
                .set_block_table(sequence, 0, &request.blocks)?;
            let (tokens, bytes) =
                loaded
                    .executor
                    .restore_sequence(path, &loaded.saved_shard, sequence)?;
            tracing::info!(path = %path.display(), bytes, "sequence restored");
            Ok(proto::RestoreSequenceReply {
                tokens,
                bytes,
                seconds: 0.0,
            })
        })
        .await
        .map(|(mut reply, seconds)| {
            reply.seconds = seconds;
            Response::new(reply)
        })
    }

    async fn stats(&self, _: Request<proto::Empty>) -> Result<Response<proto::StatsReply>, Status> {
        let guard = lock_shard(&self.state);
        let loaded = guard.as_ref();
        Ok(Response::new(proto::StatsReply {
            peak_rss_bytes: proc_status_bytes("VmHWM:"),
            rss_bytes: proc_status_bytes("VmRSS:"),
            weight_bytes: loaded.map_or(0, |l| l.weight_bytes),
            kv_cache_bytes: loaded.map_or(0, |l| l.executor.kv_cache_bytes()),
            steps: loaded.map_or(0, |l| l.steps),
            compute_seconds: loaded.map_or(0.0, |l| l.compute_seconds),
            data_plane_bytes_sent: lock(&self.bytes_sent)
                .iter()
                .map(|b| b.load(std::sync::atomic::Ordering::Relaxed))
                .collect(),
            shard_loads: self.shard_loads.load(std::sync::atomic::Ordering::Relaxed),
            shard_kept: self.shard_kept.load(std::sync::atomic::Ordering::Relaxed),
        }))
    }

    async fn abort(
        &self,
        request: Request<proto::AbortRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let step = request.into_inner().step;
        self.abort.abort_through(step);
        tracing::debug!(step, "step aborted by the coordinator");
        Ok(Response::new(proto::Empty {}))
    }

    async fn shutdown(&self, _: Request<proto::Empty>) -> Result<Response<proto::Empty>, Status> {
        let _ = self.shutdown.try_send(());
        Ok(Response::new(proto::Empty {}))
    }
}

/// Serves until the shutdown future resolves or a coordinator asks it to exit. The bound
/// address is reported through `on_bound` (a worker started with port 0 prints it).
pub async fn run(
    options: WorkerOptions,
    on_bound: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(options.listen).await?;
    let address = listener.local_addr()?;
    let threads = if options.threads > 0 {
        options.threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    };
    match &options.pin {
        Some(cpus) => tracing::info!(?cpus, "compute threads pinned"),
        None => tracing::info!("compute threads not pinned (no CPU set given)"),
    }
    let (shutdown_tx, mut shutdown_rx) = tokio::sync::mpsc::channel(1);
    let registry = Arc::new(Registry::default());
    let data_listener =
        std::net::TcpListener::bind((address.ip(), options.data_port)).map_err(|e| {
            anyhow::anyhow!(
                "data-plane socket {}:{}: {e}",
                address.ip(),
                options.data_port
            )
        })?;
    tracing::info!(address = %data_listener.local_addr()?, "data plane listening");
    let panic_at_step =
        match std::env::var("TP_TEST_PANIC_AT_STEP") {
            Ok(value) => Some(value.parse::<u64>().map_err(|_| {
                anyhow::anyhow!("TP_TEST_PANIC_AT_STEP={value} is not a step number")
            })?),
            Err(_) => None,
        };
    if let Some(step) = panic_at_step {
        tracing::warn!(
            step,
            "TP_TEST_PANIC_AT_STEP: this worker will panic in that step"
        );
    }
    let service = WorkerService {
        state: Arc::new(Mutex::new(None)),
        shard_loads: Arc::default(),
        shard_kept: Arc::default(),
        steps_started: Arc::default(),
        panic_at_step,
        abort: AbortSignal::default(),
        finished: tokio::sync::watch::channel(Finished::default()).0,
        data_listener: Arc::new(data_listener),
        cache_dir: options
            .cache_dir
            .clone()
            .unwrap_or_else(model_cache::default_cache_dir),
        slot_save_path: options.slot_save_path.clone(),
        receiving: Arc::new(Mutex::new(None)),
        registry: registry.clone(),
        bytes_sent: Arc::new(Mutex::new(Arc::new(Vec::new()))),
        threads,
        pin: options.pin,
        shutdown: shutdown_tx,
        tls: options.tls.clone(),
        numa_node: options.numa_node,
    };
    on_bound(address);
    tracing::info!(%address, threads, "worker listening");
    let server = proto::worker_server::WorkerServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let gate = Arc::new(crate::auth::Gate::new(options.auth_token));
    let server =
        tonic::service::interceptor::InterceptedService::new(server, move |request: Request<()>| {
            gate.check(&request)?;
            Ok(request)
        });
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &options.tls {
        builder = builder
            .tls_config(tls.server())
            .map_err(|e| anyhow::anyhow!("TLS: {e}"))?;
    }
    builder
        .add_service(server)
        // No Nagle: a reply's trailing frame would otherwise wait ~40 ms for a delayed ACK.
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async {
                tokio::select! {
                    _ = shutdown => {}
                    _ = shutdown_rx.recv() => {}
                }
            },
        )
        .await?;
    tracing::info!("worker stopped");
    Ok(())
}
