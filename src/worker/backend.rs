//! What a worker asks of the device that runs its shard: one forward pass over a batch at a
//! time (the whole shard program, not one call per op, as ggml's backend interface works on
//! graphs), and the KV cache that lives with it. `CpuBackend` (the executor) is today's one
//! implementation; a GPU backend is another, chosen once when the shard is loaded.

use std::path::Path;

use crate::transport::Collective;
use crate::worker::executor::{OutputRequest, RowResult, StepError};
use crate::worker::slots::SavedShard;

pub trait Backend: Send {
    /// Runs the shard program over `tokens` at `positions` of `sequences`, exchanging partial
    /// sums through `collective`, and returns what `output` asks for per output row.
    fn step(
        &mut self,
        collective: &mut dyn Collective,
        tokens: &[u32],
        positions: &[u32],
        sequences: &[u32],
        output: &OutputRequest,
    ) -> Result<Vec<RowResult>, StepError>;

    /// Forgets a sequence slot's KV cache.
    fn clear_sequence(&mut self, sequence: usize);

    /// Replaces a sequence's block table from entry `first` on (see `worker::kv`).
    fn set_block_table(
        &mut self,
        sequence: usize,
        first: usize,
        blocks: &[u32],
    ) -> Result<(), String>;

    fn kv_cache_bytes(&self) -> u64;

    /// Writes positions `0..tokens.len()` of a sequence's KV cache to `path` (see
    /// `worker::slots`); returns the bytes written.
    fn save_sequence(
        &self,
        path: &Path,
        shard: &SavedShard,
        sequence: usize,
        tokens: &[u32],
    ) -> Result<u64, String>;

    /// Reads a saved sequence into a slot; returns its tokens and the bytes read.
    fn restore_sequence(
        &mut self,
        path: &Path,
        shard: &SavedShard,
        sequence: usize,
    ) -> Result<(Vec<u32>, u64), String>;

    /// Seconds inside AllReduce during the last step, how many AllReduces it ran, and the
    /// bytes this rank contributed to them.
    fn collective_stats(&self) -> (f64, u32, u64);

    /// The first vocabulary row of this rank's slice of the logits.
    fn vocab_start(&self) -> usize;

    /// The device, for logs: "cpu".
    fn device(&self) -> &'static str;
}
