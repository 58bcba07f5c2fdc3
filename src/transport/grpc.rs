//! AllReduce between workers over the network: persistent gRPC streams (DESIGN section 4).
//!
//! Every pair of member ranks shares one bidirectional `DataPlane.Exchange` stream, opened by
//! the lower rank. Its first frame names the opener, carries the cluster's secret and the
//! connection round; the accepting worker checks all three against what its coordinator told it
//! (`Registry`), so only the peers of the current cluster get in.
//!
//! The collective is synchronous, like the executor that calls it between ops: frames leave
//! through a bounded tokio channel per peer (sends wait at most until the step's deadline) and
//! arrive through a std channel per peer, fed by a task that reads the stream. Each AllReduce
//! sends this rank's buffer to every peer in frames of at most `FRAME_VALUES` values and sums
//! all contributions in rank order, so every rank ends with the same bits, and at `full`
//! precision the same bits as the shared-memory transport. Frames carry the collective's epoch:
//! leftovers of an aborted step are recognised and dropped, never summed.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use half::{bf16, f16};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::{Collective, CollectiveLimits, TransportError};
use crate::kernels::cpu::{BlockQ8_0, QK, blocks_as_bytes, quantize_row_q8_0};
use crate::proto::{self, Encoding, Frame};

/// Values per frame: 512 KiB of f64, so that large buffers stream in pieces.
pub use crate::limits::FRAME_VALUES;
/// Largest data-plane message a worker accepts (a frame of FRAME_VALUES f64 plus headers).
pub use crate::limits::MAX_FRAME_BYTES;
/// HTTP/2 flow-control window of data-plane streams: several whole frames, so that a large
/// buffer never waits for a window update (the default 64 KiB would stall every 16k-float
/// exchange for a round trip). Servers carrying the data plane use it too.
pub use crate::limits::WINDOW_BYTES;
/// Frames queued per peer before a sender waits.
const CHANNEL_FRAMES: usize = 64;
/// Epochs of one step, as in the shared-memory transport.
const STEP_EPOCHS: u64 = 1 << 16;
/// Bytes of a cluster secret.
pub const SECRET_BYTES: usize = 32;

/// How values travel on the wire. `Full` keeps every buffer's own type (f64 partial sums as
/// f64), so the network changes no bits; the others convert on send and decode to the buffer's
/// type before the rank-order sum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncPrecision {
    Full,
    F32,
    Bf16,
    F16,
    Q8_0,
}

impl SyncPrecision {
    pub const NAMES: [&'static str; 5] = ["full", "f32", "bf16", "f16", "q8_0"];

    pub fn name(self) -> &'static str {
        match self {
            SyncPrecision::Full => "full",
            SyncPrecision::F32 => "f32",
            SyncPrecision::Bf16 => "bf16",
            SyncPrecision::F16 => "f16",
            SyncPrecision::Q8_0 => "q8_0",
        }
    }
}

impl std::str::FromStr for SyncPrecision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "full" | "" => SyncPrecision::Full,
            "f32" => SyncPrecision::F32,
            "bf16" => SyncPrecision::Bf16,
            "f16" => SyncPrecision::F16,
            "q8_0" => SyncPrecision::Q8_0,
            other => {
                return Err(format!(
                    "unknown sync precision '{other}' (expected one of {})",
                    Self::NAMES.join(", ")
                ));
            }
        })
    }
}

/// Element types the network collective sums.
pub trait WireValue: Copy + Default + std::ops::AddAssign + std::ops::Add<Output = Self> {
    const NATIVE: Encoding;
    const BYTES: usize;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    fn put(self, out: &mut Vec<u8>);
    fn get(bytes: &[u8]) -> Self;
}

impl WireValue for f32 {
    const NATIVE: Encoding = Encoding::F32;
    const BYTES: usize = 4;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> f32 {
        v
    }
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn get(bytes: &[u8]) -> f32 {
        f32::from_le_bytes(bytes.try_into().expect("4 bytes"))
    }
}

impl WireValue for f64 {
    const NATIVE: Encoding = Encoding::F64;
    const BYTES: usize = 8;
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn from_f32(v: f32) -> f64 {
        v as f64
    }
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn get(bytes: &[u8]) -> f64 {
        f64::from_le_bytes(bytes.try_into().expect("8 bytes"))
    }
}

/// Encodes `values` for the wire.
pub fn encode<T: WireValue>(values: &[T], precision: SyncPrecision) -> (Encoding, Vec<u8>) {
    match precision {
        SyncPrecision::Full => {
            let mut out = Vec::with_capacity(values.len() * T::BYTES);
            values.iter().for_each(|v| v.put(&mut out));
            (T::NATIVE, out)
        }
        SyncPrecision::F32 => {
            let mut out = Vec::with_capacity(values.len() * 4);
            values.iter().for_each(|v| v.to_f32().put(&mut out));
            (Encoding::F32, out)
        }
        SyncPrecision::Bf16 => (
            Encoding::Bf16,
            values
                .iter()
                .flat_map(|v| bf16::from_f32(v.to_f32()).to_le_bytes())
                .collect(),
        ),
        SyncPrecision::F16 => (
            Encoding::F16,
            values
                .iter()
                .flat_map(|v| f16::from_f32(v.to_f32()).to_le_bytes())
                .collect(),
        ),
        SyncPrecision::Q8_0 => {
            let mut padded: Vec<f32> = values.iter().map(|v| v.to_f32()).collect();
            padded.resize(values.len().div_ceil(QK) * QK, 0.0);
            let mut blocks = vec![BlockQ8_0::default(); padded.len() / QK];
            quantize_row_q8_0(&padded, &mut blocks);
            (Encoding::Q80, blocks_as_bytes(&blocks).to_vec())
        }
    }
}

/// Decodes a payload of `out.len()` values; a payload of the wrong size is an error (it comes
/// from the network).
pub fn decode<T: WireValue>(
    encoding: Encoding,
    payload: &[u8],
    out: &mut [T],
) -> Result<(), String> {
    let n = out.len();
    let expected = match encoding {
        Encoding::F32 => n * 4,
        Encoding::F64 => n * 8,
        Encoding::Bf16 | Encoding::F16 => n * 2,
        Encoding::Q80 => n.div_ceil(QK) * size_of::<BlockQ8_0>(),
    };
    if payload.len() != expected {
        return Err(format!(
            "{encoding:?} payload of {} bytes for {n} values (expected {expected})",
            payload.len()
        ));
    }
    match encoding {
        Encoding::F32 => {
            for (o, b) in out.iter_mut().zip(payload.chunks_exact(4)) {
                *o = T::from_f32(f32::get(b));
            }
        }
        Encoding::F64 => {
            if T::NATIVE != Encoding::F64 {
                return Err("f64 payload for an f32 buffer".into());
            }
            for (o, b) in out.iter_mut().zip(payload.chunks_exact(8)) {
                *o = T::get(b);
            }
        }
        Encoding::Bf16 => {
            for (o, b) in out.iter_mut().zip(payload.chunks_exact(2)) {
                *o = T::from_f32(bf16::from_le_bytes([b[0], b[1]]).to_f32());
            }
        }
        Encoding::F16 => {
            for (o, b) in out.iter_mut().zip(payload.chunks_exact(2)) {
                *o = T::from_f32(f16::from_le_bytes([b[0], b[1]]).to_f32());
            }
        }
        Encoding::Q80 => {
            let block_bytes = size_of::<BlockQ8_0>();
            for (chunk, block) in out.chunks_mut(QK).zip(payload.chunks_exact(block_bytes)) {
                let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
                for (o, &q) in chunk.iter_mut().zip(&block[2..]) {
                    *o = T::from_f32(d * (q as i8) as f32);
                }
            }
        }
    }
    Ok(())
}

/// One end of a peer stream, as the synchronous collective sees it.
pub struct Link {
    to: tokio::sync::mpsc::Sender<Frame>,
    from: Streaming<Frame>,
}

/// What a worker's coordinator told it about its data-plane peers.
#[derive(Clone)]
struct Expected {
    secret: Vec<u8>,
    rank: u32,
    /// Ranks allowed to open a stream to this worker.
    accept_from: Vec<u32>,
    generation: u64,
}

/// The accepting side's state, shared by the DataPlane service and the collective being built.
#[derive(Default)]
pub struct Registry {
    state: Mutex<RegistryState>,
}

#[derive(Default)]
struct RegistryState {
    expected: Option<Expected>,
    /// Streams accepted for the current round, by opening rank.
    links: HashMap<u32, Link>,
}

fn same_secret(a: &[u8], b: &[u8]) -> bool {
    // Length is public; compare every byte so timing does not reveal a prefix.
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Registry {
    /// Starts a connection round: from now on only these peers, with this secret and round,
    /// may open streams; links of earlier rounds are dropped.
    fn expect(&self, expected: Expected) {
        let mut state = self.state.lock().unwrap();
        state.links.clear();
        state.expected = Some(expected);
    }

    /// Forgets the cluster: every stream is refused until the next `expect`.
    pub fn clear(&self) {
        let mut state = self.state.lock().unwrap();
        state.links.clear();
        state.expected = None;
    }

    /// Checks an opening frame; on success returns the rank it came from.
    fn admit(&self, first: &Frame) -> Result<u32, String> {
        let state = self.state.lock().unwrap();
        let Some(expected) = &state.expected else {
            return Err("this worker belongs to no cluster".into());
        };
        if !same_secret(&first.secret, &expected.secret) {
            return Err("wrong cluster secret".into());
        }
        if !expected.accept_from.contains(&first.from_rank) {
            return Err(format!(
                "rank {} may not open a stream to rank {}",
                first.from_rank, expected.rank
            ));
        }
        if first.epoch != expected.generation {
            return Err(format!(
                "connection round {} is not the current round {}",
                first.epoch, expected.generation
            ));
        }
        Ok(first.from_rank)
    }

    fn offer(&self, rank: u32, generation: u64, link: Link) {
        let mut state = self.state.lock().unwrap();
        if state
            .expected
            .as_ref()
            .is_some_and(|e| e.generation == generation)
        {
            state.links.insert(rank, link);
        }
    }

    /// The stream `rank` opened for the current round, if it has.
    fn take_offered(&self, rank: u32) -> Option<Link> {
        self.state.lock().unwrap().links.remove(&rank)
    }
}

/// The worker-side `DataPlane` service: admits streams from the current cluster's peers.
pub struct DataPlaneService {
    pub registry: Arc<Registry>,
}

type FrameStream = Pin<Box<dyn Stream<Item = Result<Frame, Status>> + Send>>;

#[tonic::async_trait]
impl proto::data_plane_server::DataPlane for DataPlaneService {
    type ExchangeStream = FrameStream;

    async fn exchange(
        &self,
        request: Request<Streaming<Frame>>,
    ) -> Result<Response<FrameStream>, Status> {
        let remote = request
            .remote_addr()
            .map_or_else(|| "?".to_string(), |a| a.to_string());
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no opening frame within 10 s"))?
            .map_err(|s| Status::invalid_argument(s.message().to_string()))?
            .ok_or_else(|| Status::invalid_argument("stream closed before its opening frame"))?;
        let rank = match self.registry.admit(&first) {
            Ok(rank) => rank,
            Err(why) => {
                tracing::warn!(%remote, claimed_rank = first.from_rank, "data-plane stream refused: {why}");
                return Err(Status::unauthenticated(why));
            }
        };
        tracing::info!(%remote, rank, "data-plane stream accepted");
        let (to, outbound) = tokio::sync::mpsc::channel(CHANNEL_FRAMES);
        self.registry
            .offer(rank, first.epoch, Link { to, from: inbound });
        Ok(Response::new(Box::pin(
            ReceiverStream::new(outbound).map(Ok),
        )))
    }
}

/// Opens this rank's stream to a higher rank (on the collective's own runtime).
async fn open_link(
    address: &str,
    opening: Frame,
    timeout: Duration,
    tls: Option<&crate::tls::TlsFiles>,
) -> Result<Link, TransportError> {
    let fail = |what: String| TransportError::Link(format!("{address}: {what}"));
    // No HTTP/2 pings: the collective's runtime runs only inside collectives, so an idle
    // cluster could not answer them. Dead peers surface through the collectives' deadlines and
    // the control plane's pings.
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{address}"))
        .map_err(|e| fail(e.to_string()))?;
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.client(address))
            .map_err(|e| fail(format!("TLS: {e}")))?;
    }
    let endpoint = endpoint
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(WINDOW_BYTES))
        .initial_connection_window_size(Some(2 * WINDOW_BYTES));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| fail(format!("cannot connect: {e}")))?;
    let mut client = proto::data_plane_client::DataPlaneClient::new(channel)
        .max_decoding_message_size(MAX_FRAME_BYTES)
        .max_encoding_message_size(MAX_FRAME_BYTES);
    let (to, outbound) = tokio::sync::mpsc::channel(CHANNEL_FRAMES);
    to.send(opening).await.expect("receiver alive");
    let response = tokio::time::timeout(timeout, client.exchange(ReceiverStream::new(outbound)))
        .await
        .map_err(|_| fail("no answer to the opening frame".into()))?
        .map_err(|s| fail(format!("refused: {}", s.message())))?;
    Ok(Link {
        to,
        from: response.into_inner(),
    })
}

/// Serves `DataPlane` on `listener` from the current runtime.
pub fn spawn_data_plane_server(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    tls: Option<&crate::tls::TlsFiles>,
) -> tokio::task::JoinHandle<()> {
    let tls = tls.map(crate::tls::TlsFiles::server);
    let service = proto::data_plane_server::DataPlaneServer::new(DataPlaneService { registry })
        .max_decoding_message_size(MAX_FRAME_BYTES)
        .max_encoding_message_size(MAX_FRAME_BYTES);
    tokio::spawn(async move {
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = match builder.tls_config(tls) {
                Ok(builder) => builder,
                Err(e) => {
                    tracing::warn!("data-plane TLS: {e}");
                    return;
                }
            };
        }
        let served = builder
            .initial_stream_window_size(Some(WINDOW_BYTES))
            .initial_connection_window_size(Some(2 * WINDOW_BYTES))
            .add_service(service)
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            )
            .await;
        if let Err(e) = served {
            tracing::warn!("data-plane server stopped: {e}");
        }
    })
}

/// Who takes part in a gRPC collective and how to reach them.
pub struct GrpcSpec {
    /// Global ranks of the members, ascending; this worker is one of them. A link joins this
    /// worker to each.
    pub members: Vec<u32>,
    /// The members that sum together in an AllReduce (ascending, this worker among them; the
    /// others are pipeline neighbours only).
    pub group: Vec<u32>,
    /// Pipeline neighbours: the previous stage's first rank, which sends this worker its
    /// residual stream, and the next stage's, which this worker sends it to.
    pub previous: Option<u32>,
    pub next: Option<u32>,
    /// Data-plane address of every global rank (only members' are used).
    pub addresses: Vec<String>,
    pub rank: u32,
    pub secret: Vec<u8>,
    pub generation: u64,
    pub precision: SyncPrecision,
    pub limits: CollectiveLimits,
    /// Mutual TLS between workers (the worker's own certificate and the cluster's CA).
    pub tls: Option<crate::tls::TlsFiles>,
}

/// Per-peer counters of bytes sent, shared with the worker's statistics.
pub type BytesSent = Arc<Vec<AtomicU64>>;

/// The collective's network state, driven only by the thread calling the collective.
struct Links {
    /// One link per member, None for this worker.
    links: Vec<Option<Link>>,
    /// Frames that arrived ahead of the collective waiting for them, per member.
    early: Vec<VecDeque<Frame>>,
}

pub struct GrpcCollective {
    /// Position of this worker among the members.
    me: usize,
    net: Links,
    members: Vec<u32>,
    /// Positions (among the members) of the AllReduce group, ascending; `me` is one.
    group: Vec<usize>,
    /// Positions of the pipeline neighbours.
    previous: Option<usize>,
    next: Option<usize>,
    epoch: u64,
    /// The epoch base of the current step (the handoff's epoch is derived from it).
    step_epoch: u64,
    precision: SyncPrecision,
    limits: CollectiveLimits,
    /// A current-thread runtime of this collective alone: it holds the data-plane server and
    /// the connections, and runs only while a collective (or `connect`) drives it from the
    /// calling thread, so frames go from the socket to the caller without a thread hand-off.
    /// (Shut down in the background on drop: a worker drops its collective inside async
    /// code, where a runtime may not block to stop.)
    runtime: std::mem::ManuallyDrop<tokio::runtime::Runtime>,
    bytes_sent: BytesSent,
    /// Set when a link failed; every later collective fails at once until reconnected.
    broken: Option<String>,
    abort: super::AbortSignal,
    /// AllReduces wait with the stage deadline (`Collective::set_patient`).
    patient: bool,
}

impl Drop for GrpcCollective {
    fn drop(&mut self) {
        // SAFETY: the runtime is taken once, here, and the field is not used afterwards.
        let runtime = unsafe { std::mem::ManuallyDrop::take(&mut self.runtime) };
        runtime.shutdown_background();
    }
}

/// Why a collective failed: a timeout names the missing peer, anything else breaks the link.
enum Failure {
    Timeout(u32),
    Broken(String),
    Aborted,
}

impl GrpcCollective {
    /// Builds the collective from a synchronous context: serves `DataPlane` on `listener`
    /// (this worker's data-plane socket), tells `registry` whom to accept, opens streams to the
    /// higher members and waits for the lower ones, all within `limits.timeout`.
    pub fn connect(
        spec: GrpcSpec,
        registry: Arc<Registry>,
        listener: &std::net::TcpListener,
        bytes_sent: BytesSent,
    ) -> Result<GrpcCollective, TransportError> {
        let position = |rank: u32| {
            spec.members
                .iter()
                .position(|&r| r == rank)
                .ok_or_else(|| TransportError::Link(format!("rank {rank} is no member")))
        };
        let me = position(spec.rank)?;
        let group = spec
            .group
            .iter()
            .map(|&r| position(r))
            .collect::<Result<Vec<usize>, _>>()?;
        if !group.contains(&me) || !group.windows(2).all(|w| w[0] < w[1]) {
            return Err(TransportError::Link(format!(
                "rank {} is not in its AllReduce group {:?} (ascending)",
                spec.rank, spec.group
            )));
        }
        let previous = spec.previous.map(position).transpose()?;
        let next = spec.next.map(position).transpose()?;
        let io = |e: std::io::Error| TransportError::Link(format!("data-plane socket: {e}"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io)?;
        let listener = listener.try_clone().map_err(io)?;
        listener.set_nonblocking(true).map_err(io)?;
        registry.expect(Expected {
            secret: spec.secret.clone(),
            rank: spec.rank,
            accept_from: spec.members[..me].to_vec(),
            generation: spec.generation,
        });
        let deadline = Instant::now() + spec.limits.timeout;
        let links = runtime.block_on(async {
            let listener = tokio::net::TcpListener::from_std(listener).map_err(io)?;
            spawn_data_plane_server(listener, registry.clone(), spec.tls.as_ref());
            let mut links: Vec<Option<Link>> = (0..spec.members.len()).map(|_| None).collect();
            // Open upwards; the peers' registries were primed before this round started.
            for (i, &peer) in spec.members.iter().enumerate().skip(me + 1) {
                let address = spec
                    .addresses
                    .get(peer as usize)
                    .ok_or_else(|| TransportError::Link(format!("no address for rank {peer}")))?;
                let opening = Frame {
                    from_rank: spec.rank,
                    secret: spec.secret.clone(),
                    epoch: spec.generation,
                    ..Frame::default()
                };
                let mut last = None;
                // The peer may still be busy with its previous round; retry until the deadline.
                while Instant::now() < deadline {
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    match open_link(address, opening.clone(), remaining, spec.tls.as_ref()).await {
                        Ok(link) => {
                            links[i] = Some(link);
                            break;
                        }
                        Err(e) => {
                            last = Some(e);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                if links[i].is_none() {
                    return Err(last.unwrap_or_else(|| {
                        TransportError::Link(format!("rank {peer} ({address}): no time left"))
                    }));
                }
            }
            // Lower members connect to us; the server above admits them while we wait here.
            for (i, &peer) in spec.members.iter().enumerate().take(me) {
                loop {
                    if let Some(link) = registry.take_offered(peer) {
                        links[i] = Some(link);
                        break;
                    }
                    if Instant::now() >= deadline {
                        return Err(TransportError::Link(format!(
                            "rank {peer} did not connect within the deadline"
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            Ok(links)
        })?;
        Ok(GrpcCollective {
            me,
            net: Links {
                early: (0..spec.members.len()).map(|_| VecDeque::new()).collect(),
                links,
            },
            members: spec.members,
            group,
            previous,
            next,
            epoch: 0,
            step_epoch: 0,
            precision: spec.precision,
            limits: spec.limits,
            runtime: std::mem::ManuallyDrop::new(runtime),
            bytes_sent,
            broken: None,
            abort: super::AbortSignal::default(),
            patient: false,
        })
    }

    /// Stops waiting for frames as soon as the coordinator aborts the step.
    pub fn with_abort(mut self, abort: super::AbortSignal) -> GrpcCollective {
        self.abort = abort;
        self
    }

    fn fail(&mut self, failure: Failure, epoch: u64) -> TransportError {
        match failure {
            Failure::Timeout(peer) => TransportError::Timeout {
                epoch,
                missing: vec![peer as usize],
                timeout_ms: self.limits.timeout.as_millis() as u64,
            },
            Failure::Broken(why) => {
                self.broken.get_or_insert(why.clone());
                TransportError::Link(why)
            }
            Failure::Aborted => TransportError::Aborted {
                step: epoch / STEP_EPOCHS,
            },
        }
    }

    /// Fails at once while a link is broken (until the next connection round).
    fn check_links(&self) -> Result<(), TransportError> {
        match &self.broken {
            None => Ok(()),
            Some(why) => Err(TransportError::Link(format!(
                "data plane down since an earlier failure ({why}); waiting for reconnection"
            ))),
        }
    }

    fn all_reduce<T: WireValue>(&mut self, buffer: &mut [T]) -> Result<(), TransportError> {
        self.check_links()?;
        self.epoch += 1;
        let epoch = self.epoch;
        // A group of one sums nothing (and must not round through the wire encoding).
        if self.group.len() == 1 {
            return Ok(());
        }
        let timeout = if self.patient {
            self.limits.stage_timeout
        } else {
            self.limits.timeout
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let len = buffer.len();
        let members = self.members.len();
        let me = self.me;
        let group = &self.group;
        // This rank's contribution exactly as its peers will decode it (one per member; only
        // the group's are filled and summed).
        let mut contributions: Vec<Vec<T>> = (0..members)
            .map(|i| {
                if group.contains(&i) {
                    vec![T::default(); len]
                } else {
                    Vec::new()
                }
            })
            .collect();
        let mut frames: Vec<Frame> = Vec::with_capacity(len.div_ceil(FRAME_VALUES));
        for start in (0..len).step_by(FRAME_VALUES) {
            let end = (start + FRAME_VALUES).min(len);
            let (encoding, payload) = encode(&buffer[start..end], self.precision);
            decode(encoding, &payload, &mut contributions[me][start..end])
                .map_err(TransportError::Link)?;
            frames.push(Frame {
                epoch,
                offset: start as u32,
                count: (end - start) as u32,
                encoding: encoding as i32,
                payload,
                ..Frame::default()
            });
        }
        let net = &mut self.net;
        let peers = &self.members;
        let bytes_sent = &self.bytes_sent;
        let abort = (&self.abort, epoch / STEP_EPOCHS);
        let exchanged: Result<(), Failure> = self.runtime.block_on(async {
            // Every peer but the last gets copies; the last one takes the frames themselves.
            let last_peer = group.iter().rev().copied().find(|&i| i != me);
            for i in group.iter().copied().filter(|&i| i != me) {
                let link = net.links[i].as_ref().expect("a peer");
                let outgoing = if Some(i) == last_peer {
                    std::mem::take(&mut frames)
                } else {
                    frames.clone()
                };
                for frame in outgoing {
                    let payload_bytes = frame.payload.len() as u64;
                    match tokio::time::timeout_at(deadline, link.to.send(frame)).await {
                        Ok(Ok(())) => {
                            bytes_sent[peers[i] as usize]
                                .fetch_add(payload_bytes + 32, Ordering::Relaxed);
                        }
                        Ok(Err(_)) => {
                            return Err(Failure::Broken(format!(
                                "link to rank {} closed",
                                peers[i]
                            )));
                        }
                        Err(_) => return Err(Failure::Timeout(peers[i])),
                    }
                }
            }
            // Only this thread runs the connections: let them take the frames and write them
            // out before waiting (a peer's frames may already be here, and this collective
            // could return before its own were sent).
            flush(net).await;
            for i in group.iter().copied().filter(|&i| i != me) {
                let peer = peers[i];
                let mut received = 0;
                while received < len {
                    let frame = next_frame(net, i, peer, epoch, deadline, abort).await?;
                    let (offset, count) = (frame.offset as usize, frame.count as usize);
                    let encoding = Encoding::try_from(frame.encoding)
                        .ok()
                        .filter(|_| offset == received && count > 0 && offset + count <= len);
                    let Some(encoding) = encoding else {
                        return Err(Failure::Broken(format!(
                            "rank {peer} sent a malformed frame (values {offset}..{} of {len}, encoding {})",
                            offset + count,
                            frame.encoding
                        )));
                    };
                    decode(
                        encoding,
                        &frame.payload,
                        &mut contributions[i][offset..offset + count],
                    )
                    .map_err(|why| Failure::Broken(format!("rank {peer}: {why}")))?;
                    received += count;
                }
            }
            Ok(())
        });
        if let Err(failure) = exchanged {
            return Err(self.fail(failure, epoch));
        }
        // Rank order, like the shared-memory transport.
        buffer.copy_from_slice(&contributions[self.group[0]]);
        for &i in &self.group[1..] {
            for (b, v) in buffer.iter_mut().zip(&contributions[i]) {
                *b += *v;
            }
        }
        Ok(())
    }

    /// The epoch of this step's pipeline handoff: the last of the step's epochs, which its
    /// AllReduces never reach.
    fn handoff_epoch(&self) -> u64 {
        self.step_epoch + STEP_EPOCHS - 1
    }

    /// Sends `buffer` (f32, exact) to the next stage's first rank and waits for its receipt:
    /// this collective's connections run only while it is driven, so returning before the
    /// peer has the frames could leave them in this worker's buffers.
    fn send_stage_values(&mut self, buffer: &[f32]) -> Result<(), TransportError> {
        let next = self
            .next
            .ok_or_else(|| TransportError::Protocol("no next pipeline stage".into()))?;
        self.check_links()?;
        let epoch = self.handoff_epoch();
        let deadline = tokio::time::Instant::now() + self.limits.stage_timeout;
        let peer = self.members[next];
        let frames: Vec<Frame> = (0..buffer.len())
            .step_by(FRAME_VALUES)
            .map(|start| {
                let end = (start + FRAME_VALUES).min(buffer.len());
                let (encoding, payload) = encode(&buffer[start..end], SyncPrecision::Full);
                Frame {
                    epoch,
                    offset: start as u32,
                    count: (end - start) as u32,
                    encoding: encoding as i32,
                    payload,
                    ..Frame::default()
                }
            })
            .collect();
        let net = &mut self.net;
        let bytes_sent = &self.bytes_sent;
        let abort = (&self.abort, epoch / STEP_EPOCHS);
        let sent: Result<(), Failure> = self.runtime.block_on(async {
            let link = net.links[next].as_ref().expect("a peer");
            for frame in frames {
                let payload_bytes = frame.payload.len() as u64;
                match tokio::time::timeout_at(deadline, link.to.send(frame)).await {
                    Ok(Ok(())) => {
                        bytes_sent[peer as usize].fetch_add(payload_bytes + 32, Ordering::Relaxed);
                    }
                    Ok(Err(_)) => {
                        return Err(Failure::Broken(format!("link to rank {peer} closed")));
                    }
                    Err(_) => return Err(Failure::Timeout(peer)),
                }
            }
            flush(net).await;
            // The receipt: an empty frame of the same epoch.
            next_frame(net, next, peer, epoch, deadline, abort).await?;
            Ok(())
        });
        sent.map_err(|failure| self.fail(failure, epoch))
    }

    /// Receives the previous stage's residual stream into `buffer` and acknowledges it.
    fn receive_stage_values(&mut self, buffer: &mut [f32]) -> Result<(), TransportError> {
        let previous = self
            .previous
            .ok_or_else(|| TransportError::Protocol("no previous pipeline stage".into()))?;
        self.check_links()?;
        let epoch = self.handoff_epoch();
        let deadline = tokio::time::Instant::now() + self.limits.stage_timeout;
        let peer = self.members[previous];
        let len = buffer.len();
        let net = &mut self.net;
        let abort = (&self.abort, epoch / STEP_EPOCHS);
        let received: Result<(), Failure> = self.runtime.block_on(async {
            let mut received = 0;
            while received < len {
                let frame = next_frame(net, previous, peer, epoch, deadline, abort).await?;
                let (offset, count) = (frame.offset as usize, frame.count as usize);
                let encoding = Encoding::try_from(frame.encoding)
                    .ok()
                    .filter(|_| offset == received && count > 0 && offset + count <= len);
                let Some(encoding) = encoding else {
                    return Err(Failure::Broken(format!(
                        "rank {peer} sent a malformed stage frame (values {offset}..{} of {len})",
                        offset + count
                    )));
                };
                decode(
                    encoding,
                    &frame.payload,
                    &mut buffer[offset..offset + count],
                )
                .map_err(|why| Failure::Broken(format!("rank {peer}: {why}")))?;
                received += count;
            }
            let link = net.links[previous].as_ref().expect("a peer");
            let receipt = Frame {
                epoch,
                ..Frame::default()
            };
            match tokio::time::timeout_at(deadline, link.to.send(receipt)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Failure::Broken(format!("link to rank {peer} closed"))),
                Err(_) => return Err(Failure::Timeout(peer)),
            }
            flush(net).await;
            Ok(())
        });
        received.map_err(|failure| self.fail(failure, epoch))
    }
}

/// Runs the connection tasks until every outgoing frame has left its channel, then a little
/// more so that they reach the socket.
async fn flush(net: &Links) {
    for _ in 0..1000 {
        let drained = net
            .links
            .iter()
            .flatten()
            .all(|l| l.to.capacity() == l.to.max_capacity());
        if drained {
            break;
        }
        tokio::task::yield_now().await;
    }
    for _ in 0..2 {
        tokio::task::yield_now().await;
    }
}

/// The next frame of `epoch` from member `i`, dropping leftovers of earlier epochs.
async fn next_frame(
    net: &mut Links,
    i: usize,
    peer: u32,
    epoch: u64,
    deadline: tokio::time::Instant,
    (abort, step): (&super::AbortSignal, u64),
) -> Result<Frame, Failure> {
    if let Some(position) = net.early[i].iter().position(|f| f.epoch == epoch) {
        return Ok(net.early[i].remove(position).expect("found"));
    }
    net.early[i].retain(|f| f.epoch > epoch);
    let link = net.links[i].as_mut().expect("a peer");
    loop {
        // Wake now and then to see whether the coordinator gave up on the step (receiving a
        // message is cancel-safe: a frame half read stays in the stream).
        let wake = deadline.min(tokio::time::Instant::now() + ABORT_POLL);
        match tokio::time::timeout_at(wake, link.from.message()).await {
            Ok(Ok(Some(frame))) if frame.epoch == epoch => return Ok(frame),
            Ok(Ok(Some(frame))) if frame.epoch < epoch => continue,
            Ok(Ok(Some(frame))) => net.early[i].push_back(frame),
            Ok(Ok(None)) => return Err(Failure::Broken(format!("rank {peer} closed its stream"))),
            Ok(Err(status)) => {
                return Err(Failure::Broken(format!(
                    "stream to rank {peer} failed: {}",
                    status.message()
                )));
            }
            Err(_) if abort.aborted(step) => return Err(Failure::Aborted),
            Err(_) if tokio::time::Instant::now() >= deadline => {
                return Err(Failure::Timeout(peer));
            }
            Err(_) => continue,
        }
    }
}

/// How often a rank waiting for a peer's frames looks for an abort of its step.
const ABORT_POLL: Duration = Duration::from_millis(20);

impl Collective for GrpcCollective {
    fn rank_index(&self) -> usize {
        self.group
            .iter()
            .position(|&i| i == self.me)
            .expect("checked at connect")
    }

    fn rank_count(&self) -> usize {
        self.group.len()
    }

    fn begin_step(&mut self, step: u64) {
        self.epoch = step * STEP_EPOCHS;
        self.step_epoch = self.epoch;
        self.patient = false;
    }

    fn set_patient(&mut self, patient: bool) {
        self.patient = patient;
    }

    fn receive_stage(&mut self, buffer: &mut [f32]) -> Result<(), TransportError> {
        self.receive_stage_values(buffer)
    }

    fn send_stage(&mut self, buffer: &[f32]) -> Result<(), TransportError> {
        self.send_stage_values(buffer)
    }

    fn all_reduce_sum(&mut self, buffer: &mut [f32]) -> Result<(), TransportError> {
        self.all_reduce(buffer)
    }

    fn all_reduce_sum_f64(&mut self, buffer: &mut [f64]) -> Result<(), TransportError> {
        self.all_reduce(buffer)
    }
}

/// A collective whose data plane is not connected (yet): every call fails clearly.
pub struct Unconnected(pub String);

impl Collective for Unconnected {
    fn rank_index(&self) -> usize {
        0
    }
    fn rank_count(&self) -> usize {
        0
    }
    fn begin_step(&mut self, _step: u64) {}
    fn all_reduce_sum(&mut self, _buffer: &mut [f32]) -> Result<(), TransportError> {
        Err(TransportError::Link(self.0.clone()))
    }
    fn all_reduce_sum_f64(&mut self, _buffer: &mut [f64]) -> Result<(), TransportError> {
        Err(TransportError::Link(self.0.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One data-plane socket and registry per rank, on loopback.
    fn sockets(ranks: usize) -> (Vec<Arc<Registry>>, Vec<std::net::TcpListener>, Vec<String>) {
        let listeners: Vec<_> = (0..ranks)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addresses = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect();
        let registries = (0..ranks).map(|_| Arc::new(Registry::default())).collect();
        (registries, listeners, addresses)
    }

    fn spec(rank: u32, ranks: u32, addresses: &[String], precision: SyncPrecision) -> GrpcSpec {
        GrpcSpec {
            members: (0..ranks).collect(),
            group: (0..ranks).collect(),
            previous: None,
            next: None,
            addresses: addresses.to_vec(),
            rank,
            secret: vec![7; SECRET_BYTES],
            generation: 1,
            precision,
            limits: CollectiveLimits {
                timeout: Duration::from_secs(5),
                ..CollectiveLimits::default()
            },
            tls: None,
        }
    }

    fn partial(rank: usize, i: usize) -> f64 {
        let x = (rank * 7919 + i * 31) as f64;
        (x * 0.618_033_988_7).sin() * 10f64.powi((i % 9) as i32 - 4)
    }

    /// Every rank in a thread of its own, as workers would be.
    fn run_ranks<R: Send + 'static>(
        ranks: usize,
        precision: SyncPrecision,
        body: impl Fn(usize, &mut GrpcCollective) -> R + Send + Sync + Clone + 'static,
    ) -> Vec<R> {
        let (registries, listeners, addresses) = sockets(ranks);
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let registry = registries[rank].clone();
                let addresses = addresses.clone();
                let body = body.clone();
                std::thread::spawn(move || {
                    let spec = spec(rank as u32, ranks as u32, &addresses, precision);
                    let counters = Arc::new((0..ranks).map(|_| AtomicU64::new(0)).collect());
                    let mut c =
                        GrpcCollective::connect(spec, registry, &listener, counters).unwrap();
                    body(rank, &mut c)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn sums_are_rank_ordered_and_identical_on_every_rank() {
        for ranks in [2usize, 3] {
            let results = run_ranks(ranks, SyncPrecision::Full, |rank, c| {
                let mut out = Vec::new();
                for step in 1..=2u64 {
                    c.begin_step(step);
                    for len in [1usize, 576, FRAME_VALUES + 17] {
                        let mut wide: Vec<f64> = (0..len).map(|i| partial(rank, i)).collect();
                        c.all_reduce_sum_f64(&mut wide).unwrap();
                        let mut narrow: Vec<f32> =
                            (0..len).map(|i| partial(rank, i) as f32).collect();
                        c.all_reduce_sum(&mut narrow).unwrap();
                        out.push((wide, narrow));
                    }
                }
                out
            });
            for (k, (wide, narrow)) in results[0].iter().enumerate() {
                let len = wide.len();
                for i in 0..len {
                    let mut sum = partial(0, i);
                    let mut sum32 = partial(0, i) as f32;
                    for r in 1..ranks {
                        sum += partial(r, i);
                        sum32 += partial(r, i) as f32;
                    }
                    assert_eq!(wide[i].to_bits(), sum.to_bits(), "f64 #{k} value {i}");
                    assert_eq!(narrow[i].to_bits(), sum32.to_bits(), "f32 #{k} value {i}");
                }
                for other in &results[1..] {
                    assert!(
                        other[k]
                            .0
                            .iter()
                            .zip(wide)
                            .all(|(a, b)| a.to_bits() == b.to_bits())
                    );
                    assert!(
                        other[k]
                            .1
                            .iter()
                            .zip(narrow)
                            .all(|(a, b)| a.to_bits() == b.to_bits())
                    );
                }
            }
        }
    }

    #[test]
    fn lossy_precisions_stay_close_and_agree_across_ranks() {
        for (precision, bound) in [
            (SyncPrecision::F32, 1e-6),
            (SyncPrecision::Bf16, 1e-2),
            (SyncPrecision::F16, 2e-3),
            (SyncPrecision::Q8_0, 2e-2),
        ] {
            let results = run_ranks(2, precision, |rank, c| {
                c.begin_step(1);
                let mut v: Vec<f64> = (0..1000).map(|i| partial(rank, i)).collect();
                c.all_reduce_sum_f64(&mut v).unwrap();
                v
            });
            assert_eq!(results[0], results[1], "{precision:?}: ranks disagree");
            let exact: Vec<f64> = (0..1000).map(|i| partial(0, i) + partial(1, i)).collect();
            let err: f64 = exact
                .iter()
                .zip(&results[0])
                .map(|(a, b)| (a - b).powi(2))
                .sum();
            let power: f64 = exact.iter().map(|a| a * a).sum();
            assert!(err / power < bound, "{precision:?}: NMSE {}", err / power);
        }
    }

    #[test]
    fn a_wrong_secret_or_rank_is_refused() {
        let (registries, listeners, addresses) = sockets(1);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = listeners.into_iter().next().unwrap();
        listener.set_nonblocking(true).unwrap();
        runtime.block_on(async {
            spawn_data_plane_server(
                tokio::net::TcpListener::from_std(listener).unwrap(),
                registries[0].clone(),
                None,
            );
        });
        registries[0].expect(Expected {
            secret: vec![7; SECRET_BYTES],
            rank: 1,
            accept_from: vec![0],
            generation: 3,
        });
        let opening = |rank: u32, secret: Vec<u8>, generation: u64| Frame {
            from_rank: rank,
            secret,
            epoch: generation,
            ..Frame::default()
        };
        let timeout = Duration::from_secs(5);
        for (frame, why) in [
            (opening(0, vec![8; SECRET_BYTES], 3), "wrong cluster secret"),
            (opening(2, vec![7; SECRET_BYTES], 3), "may not open"),
            (opening(0, vec![7; SECRET_BYTES], 2), "connection round"),
        ] {
            let err = runtime
                .block_on(open_link(&addresses[0], frame, timeout, None))
                .err()
                .expect("refused");
            assert!(err.to_string().contains(why), "{err}");
        }
        assert!(
            runtime
                .block_on(open_link(
                    &addresses[0],
                    opening(0, vec![7; SECRET_BYTES], 3),
                    timeout,
                    None
                ))
                .is_ok()
        );
        runtime.shutdown_background();
    }

    #[test]
    fn a_silent_peer_is_a_timeout_and_a_malformed_payload_an_error() {
        let results = run_ranks(2, SyncPrecision::Full, |rank, c| {
            c.begin_step(1);
            if rank == 0 {
                c.limits.timeout = Duration::from_millis(300);
                let started = Instant::now();
                let err = c.all_reduce_sum(&mut [1.0; 8]).unwrap_err();
                assert!(
                    matches!(err, TransportError::Timeout { ref missing, .. } if missing == &vec![1]),
                    "{err}"
                );
                assert!(started.elapsed() < Duration::from_secs(2));
            }
            // Both ranks meet again in the next step; the stale frame of step 1 is dropped.
            std::thread::sleep(Duration::from_millis(500));
            c.begin_step(2);
            let mut v = [rank as f32 + 1.0; 4];
            c.all_reduce_sum(&mut v).unwrap();
            v
        });
        assert_eq!(results[0], [3.0; 4]);
        assert_eq!(results[1], [3.0; 4]);
        let mut out = [0f32; 4];
        assert!(decode(Encoding::F32, &[0u8; 15], &mut out).is_err());
        assert!(decode(Encoding::F64, &[0u8; 32], &mut out).is_err());
        assert!(decode(Encoding::Q80, &[0u8; 33], &mut out).is_err());
    }
}
