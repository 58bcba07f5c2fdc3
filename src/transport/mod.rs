//! Collectives between the workers of one cluster (DESIGN section 4).
//!
//! `shm` serves ranks on one host, `grpc` ranks on different hosts. A single-rank cluster uses
//! `Solo`, which never communicates.

pub mod grpc;
pub mod hierarchical;
pub mod shm;

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(
        "AllReduce {epoch}: rank(s) {missing:?} did not arrive within {timeout_ms} ms (dead or stuck peer)"
    )]
    Timeout {
        epoch: u64,
        missing: Vec<usize>,
        timeout_ms: u64,
    },
    #[error("buffer of {got} floats exceeds the collective's capacity of {capacity}")]
    TooLarge { got: usize, capacity: usize },
    #[error("shared memory segment {path}: {source}")]
    Segment {
        path: String,
        source: std::io::Error,
    },
    #[error("shared memory segment {path}: {what}")]
    BadSegment { path: String, what: String },
    #[error("collective used out of order: {0}")]
    Protocol(String),
    #[error("data plane: {0}")]
    Link(String),
    #[error("step {step} was aborted by the coordinator (a peer failed)")]
    Aborted { step: u64 },
}

/// Steps the coordinator gave up on. A collective of such a step stops waiting at once (its
/// peers may be dead) instead of at its deadline, so a survivor is free for the re-formed
/// cluster within milliseconds. The worker's control plane records aborts; its collectives
/// check while they wait. Reset when a shard is loaded (a new coordinator counts steps anew).
#[derive(Clone, Debug, Default)]
pub struct AbortSignal(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl AbortSignal {
    /// Aborts every step up to and including `step`.
    pub fn abort_through(&self, step: u64) {
        self.0.fetch_max(step, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn reset(&self) {
        self.0.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn aborted(&self, step: u64) -> bool {
        step != 0 && self.0.load(std::sync::atomic::Ordering::Relaxed) >= step
    }
}

pub trait Collective: Send {
    fn rank_index(&self) -> usize;
    fn rank_count(&self) -> usize;
    /// Sums `buffer` across ranks; every rank ends with bit-identical values.
    fn all_reduce_sum(&mut self, buffer: &mut [f32]) -> Result<(), TransportError>;
    /// The same for f64 partial sums: row-parallel outputs are reduced in f64 so that the f32
    /// result does not depend on how the row was split (DESIGN section 4).
    fn all_reduce_sum_f64(&mut self, buffer: &mut [f64]) -> Result<(), TransportError>;
    /// Shared staging for a large f64 sum, or `None` when this transport sums `len` values
    /// better through `all_reduce_sum_f64` (small buffers, one rank, no shared memory).
    ///
    /// The caller writes its partial sums into the returned area (instead of a buffer of its
    /// own) and then calls `all_reduce_staged_f64` with the same `len`, which reads the sum in
    /// place. This saves the copies in and out of shared memory that dominate large sums.
    fn stage_f64(&mut self, _len: usize) -> Result<Option<&mut [f64]>, TransportError> {
        Ok(None)
    }
    /// Sums the staged partials across ranks and hands the result to `read` as consecutive
    /// pieces `(offset, values)` that together cover `0..len`, in order. The values are
    /// bit-identical to what `all_reduce_sum_f64` gives for the same partials.
    fn all_reduce_staged_f64(
        &mut self,
        _len: usize,
        _read: &mut dyn FnMut(usize, &[f64]),
    ) -> Result<(), TransportError> {
        Err(TransportError::Protocol(
            "all_reduce_staged_f64 without stage_f64".into(),
        ))
    }
    /// The same for f32 (the embedding's sum of a prompt batch).
    fn stage_f32(&mut self, _len: usize) -> Result<Option<&mut [f32]>, TransportError> {
        Ok(None)
    }
    fn all_reduce_staged_f32(
        &mut self,
        _len: usize,
        _read: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<(), TransportError> {
        Err(TransportError::Protocol(
            "all_reduce_staged_f32 without stage_f32".into(),
        ))
    }
    /// Tags the collectives of the next step, so that flags left by an aborted step cannot be
    /// mistaken for this step's.
    fn begin_step(&mut self, step: u64);
    /// While set, collectives wait as long as a pipeline stage computes (`stage_timeout`):
    /// the AllReduce that hands a later stage's input to its ranks waits for its first rank,
    /// which waits for the previous stage.
    fn set_patient(&mut self, _patient: bool) {}
    /// Pipeline stages: the previous stage's residual stream, into `buffer` (on a stage's
    /// first rank). Waits as long as the previous stage computes (the step's deadline), not
    /// just the collective's.
    fn receive_stage(&mut self, _buffer: &mut [f32]) -> Result<(), TransportError> {
        Err(TransportError::Protocol(
            "this rank has no link to a previous pipeline stage".into(),
        ))
    }
    /// Sends this stage's residual stream to the next stage's first rank.
    fn send_stage(&mut self, _buffer: &[f32]) -> Result<(), TransportError> {
        Err(TransportError::Protocol(
            "this rank has no link to a next pipeline stage".into(),
        ))
    }
}

/// The collective of a one-rank cluster.
pub struct Solo;

impl Collective for Solo {
    fn rank_index(&self) -> usize {
        0
    }
    fn rank_count(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _buffer: &mut [f32]) -> Result<(), TransportError> {
        Ok(())
    }
    fn all_reduce_sum_f64(&mut self, _buffer: &mut [f64]) -> Result<(), TransportError> {
        Ok(())
    }
    fn begin_step(&mut self, _step: u64) {}
}

/// Where staging starts to pay (`cargo bench --bench collective`, docs/PERFORMANCE.md).
pub const STAGED_MIN_ELEMENTS: usize = 4096;

/// Limits that bound every wait of a collective.
#[derive(Clone, Copy, Debug)]
pub struct CollectiveLimits {
    pub timeout: Duration,
    /// Spins before a waiting rank starts yielding its core.
    pub spin_count: u32,
    /// The smallest sum (elements) that goes through shared staging (`stage_f64`); smaller
    /// ones use the one-shot sum, which has one barrier instead of two.
    pub staged_min_elements: usize,
    /// A pipeline stage waiting for the previous one's residual stream: that stage computes
    /// meanwhile, so this is the step's deadline, not the collective's (an abort still ends
    /// the wait at once).
    pub stage_timeout: Duration,
}

impl Default for CollectiveLimits {
    fn default() -> Self {
        CollectiveLimits {
            timeout: crate::limits::COLLECTIVE_TIMEOUT,
            // About 5 µs of spinning: enough for a peer on its own core to arrive; after that
            // the waiter yields, which costs little when nobody else wants the core and lets a
            // peer sharing it run (each yield-free spin phase there costs its full length).
            spin_count: 200,
            staged_min_elements: STAGED_MIN_ELEMENTS,
            stage_timeout: crate::limits::STEP_TIMEOUT,
        }
    }
}
