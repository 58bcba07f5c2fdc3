//! Shared-memory AllReduce between worker processes on one host.
//!
//! Segment layout: a 4 KiB header (magic, rank count, slot size, then one sequence flag per rank
//! on its own cache line), followed by two parities of per-rank slots. A rank copies its buffer
//! into its slot of the current parity, publishes the epoch in its flag (release), waits until
//! every flag has reached the epoch (acquire), then sums all slots in rank order, so every rank
//! gets bit-identical results. Slots alternate parity by epoch: a rank can only write parity p
//! again after every rank has published the next epoch, which each does only after it finished
//! reading parity p. Steps start their epochs at fresh bases, so two consecutive rounds can
//! share a parity at a step boundary; each rank therefore also publishes how far it has read, and
//! a writer checks that every rank has read the last round of the parity it is about to reuse
//! (in the alternating case that check passes at once).
//!
//! Large sums can skip the copies: `stage_f64` / `stage_f32` hand the caller its slot to write partials
//! into; after the arrival barrier each rank sums its 1/N portion of every slot (rank order,
//! so the bits equal the one-shot sum) into that portion of its own slot, publishes a
//! "reduced" flag, and after a second barrier reads the result where it lies: portion r in
//! rank r's slot. Each rank moves about 1.5 S bytes instead of 5 S (N = 2).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use memmap2::MmapMut;

use super::{Collective, CollectiveLimits, TransportError};

const MAGIC: u64 = 0x7470_5f73_686d_0002; // "tp_shm" v2
const HEADER_BYTES: usize = 4096;
const FLAG_STRIDE_BYTES: usize = 64;
/// Where the "read up to epoch" flags start; the arrival flags precede them.
const READ_FLAGS_OFFSET: usize = 2048;
/// Where the "reduced my portion of epoch" flags of staged sums start.
const REDUCED_FLAGS_OFFSET: usize = 3072;
/// The header holds one flag line per rank in each of its 1 KiB flag areas.
pub const RANK_COUNT_MAX: usize = (HEADER_BYTES - REDUCED_FLAGS_OFFSET) / FLAG_STRIDE_BYTES;
// Every cluster the planner accepts fits one segment.
const _: () = assert!(crate::limits::MAX_RANKS <= RANK_COUNT_MAX);
/// Staged portions start on cache lines.
const PORTION_ALIGN_BYTES: usize = 64;
/// Epochs of one step live in `step * STEP_EPOCHS ..`; more than any program's collective count.
const STEP_EPOCHS: u64 = 1 << 16;

fn segment_bytes(rank_count: usize, slot_bytes: usize) -> usize {
    HEADER_BYTES + 2 * rank_count * slot_bytes
}

/// Element types the segment can sum.
trait Summable: Copy + std::ops::AddAssign + std::ops::Add<Output = Self> {}
impl Summable for f32 {}
impl Summable for f64 {}

/// The segment's owner: creates it and removes the file when dropped.
pub struct ShmSegment {
    path: PathBuf,
}

impl ShmSegment {
    /// A segment whose slots hold `slot_bytes` each: the largest buffer one AllReduce sums.
    pub fn create(
        path: &Path,
        rank_count: usize,
        slot_bytes: usize,
    ) -> Result<ShmSegment, TransportError> {
        let slot_bytes = slot_bytes.div_ceil(64) * 64;
        assert!((1..=RANK_COUNT_MAX).contains(&rank_count));
        let err = |source| TransportError::Segment {
            path: path.display().to_string(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(err)?;
        file.set_len(segment_bytes(rank_count, slot_bytes) as u64)
            .map_err(err)?;
        // SAFETY: a fresh file only this process knows about yet.
        let mut map = unsafe { MmapMut::map_mut(&file) }.map_err(err)?;
        map[8..16].copy_from_slice(&(rank_count as u64).to_le_bytes());
        map[16..24].copy_from_slice(&(slot_bytes as u64).to_le_bytes());
        map[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        map.flush().map_err(err)?;
        Ok(ShmSegment {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ShmSegment {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub struct ShmCollective {
    map: MmapMut,
    rank_index: usize,
    rank_count: usize,
    slot_bytes: usize,
    epoch: u64,
    /// The last epoch this rank used each parity for.
    last_epoch: [u64; 2],
    limits: CollectiveLimits,
    /// (length, element bytes) of a staged sum handed out by `stage` and not yet reduced.
    staged: Option<(usize, usize)>,
    abort: super::AbortSignal,
    /// Waits use the stage deadline (`Collective::set_patient`).
    patient: bool,
}

impl ShmCollective {
    pub fn open(
        path: &Path,
        rank_index: usize,
        rank_count: usize,
        limits: CollectiveLimits,
    ) -> Result<ShmCollective, TransportError> {
        let name = path.display().to_string();
        let err = |source| TransportError::Segment {
            path: name.clone(),
            source,
        };
        let bad = |what: String| TransportError::BadSegment {
            path: name.clone(),
            what,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(err)?;
        // SAFETY: the segment is shared on purpose; all cross-process access below goes through
        // atomics (flags) or through slots that the protocol hands to exactly one writer at a time.
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(err)?;
        if map.len() < HEADER_BYTES {
            return Err(bad(format!(
                "{} bytes is smaller than its header",
                map.len()
            )));
        }
        let word = |i: usize| u64::from_le_bytes(map[i * 8..i * 8 + 8].try_into().unwrap());
        if word(0) != MAGIC {
            return Err(bad("not a tp segment (bad magic)".into()));
        }
        let (segment_ranks, slot_bytes) = (word(1) as usize, word(2) as usize);
        if segment_ranks != rank_count || rank_index >= rank_count || rank_count > RANK_COUNT_MAX {
            return Err(bad(format!(
                "made for {segment_ranks} ranks, opened as rank {rank_index} of {rank_count}"
            )));
        }
        if slot_bytes % 64 != 0 || map.len() != segment_bytes(rank_count, slot_bytes) {
            return Err(bad(format!(
                "size {} does not match {rank_count} ranks of {slot_bytes} bytes",
                map.len()
            )));
        }
        Ok(ShmCollective {
            map,
            rank_index,
            rank_count,
            slot_bytes,
            epoch: 0,
            last_epoch: [0; 2],
            limits,
            staged: None,
            abort: super::AbortSignal::default(),
            patient: false,
        })
    }

    /// Stops waiting as soon as the coordinator aborts the step.
    pub fn with_abort(mut self, abort: super::AbortSignal) -> ShmCollective {
        self.abort = abort;
        self
    }

    /// The epoch up to which `rank` has published its slot.
    fn flag(&self, rank: usize) -> &AtomicU64 {
        self.atomic(FLAG_STRIDE_BYTES * (1 + rank))
    }

    /// The epoch up to which `rank` has finished reading the others' slots.
    fn read_flag(&self, rank: usize) -> &AtomicU64 {
        self.atomic(READ_FLAGS_OFFSET + FLAG_STRIDE_BYTES * rank)
    }

    /// The epoch up to which `rank` has written its reduced portion of a staged sum.
    fn reduced_flag(&self, rank: usize) -> &AtomicU64 {
        self.atomic(REDUCED_FLAGS_OFFSET + FLAG_STRIDE_BYTES * rank)
    }

    fn atomic(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: in bounds (checked at open), 8-byte aligned (page-aligned map), and only ever
        // accessed atomically by every process.
        unsafe { &*(self.map.as_ptr().add(offset) as *const AtomicU64) }
    }

    fn slot_ptr<T>(&self, parity: usize, rank: usize) -> *mut T {
        let offset = HEADER_BYTES + (parity * self.rank_count + rank) * self.slot_bytes;
        // SAFETY: in bounds by the size check at open; slots are 64-byte aligned.
        unsafe { self.map.as_ptr().add(offset) as *mut T }
    }

    /// Opens the next round: checks the size and that no staged sum is pending, takes the next
    /// epoch, and waits until every rank has read the last round of its parity, so this rank
    /// may write its slot there. Returns (epoch, parity).
    fn open_round(
        &mut self,
        len: usize,
        element_bytes: usize,
    ) -> Result<(u64, usize), TransportError> {
        let capacity = self.slot_bytes / element_bytes;
        if len > capacity {
            return Err(TransportError::TooLarge { got: len, capacity });
        }
        if let Some((pending, _)) = self.staged {
            return Err(TransportError::Protocol(format!(
                "a staged sum of {pending} values is still open"
            )));
        }
        self.epoch += 1;
        let epoch = self.epoch;
        let parity = (epoch & 1) as usize;
        if self.last_epoch[parity] > 0 {
            self.wait_for_all(self.last_epoch[parity], Self::read_flag)?;
        }
        Ok((epoch, parity))
    }

    /// Rank `rank`'s portion of a staged sum of `len` values of `element_bytes`: `start..end`.
    fn portion(&self, len: usize, element_bytes: usize, rank: usize) -> (usize, usize) {
        let align = PORTION_ALIGN_BYTES / element_bytes;
        let size = len.div_ceil(self.rank_count).div_ceil(align) * align;
        let start = (rank * size).min(len);
        (start, (start + size).min(len))
    }

    fn all_reduce<T: Summable>(&mut self, buffer: &mut [T]) -> Result<(), TransportError> {
        let (epoch, parity) = self.open_round(buffer.len(), size_of::<T>())?;
        // SAFETY: this rank is the only writer of its slot, and every rank has finished reading
        // what it last wrote there (checked just above).
        unsafe {
            std::ptr::copy_nonoverlapping(
                buffer.as_ptr(),
                self.slot_ptr(parity, self.rank_index),
                buffer.len(),
            );
        }
        self.flag(self.rank_index).store(epoch, Ordering::Release);
        self.wait_for_all(epoch, Self::flag)?;
        // SAFETY: every rank published this epoch after writing its slot (acquire above), and no
        // rank writes this parity again before we publish the next epoch.
        // Summed in one pass, in rank order, chunk by chunk so the partial sums stay in L1.
        // (A plain memcpy of the first slot is avoided on purpose: glibc's copy is many times
        // slower when source and target sit at nearby page offsets, as a page-aligned slot and a
        // heap buffer often do.)
        unsafe {
            const CHUNK: usize = 512;
            let len = buffer.len();
            let mut start = 0;
            while start < len {
                let end = (start + CHUNK).min(len);
                let target = &mut buffer[start..end];
                let first = std::slice::from_raw_parts(
                    self.slot_ptr::<T>(parity, 0).add(start),
                    end - start,
                );
                for rank in 1..self.rank_count {
                    let slot = std::slice::from_raw_parts(
                        self.slot_ptr::<T>(parity, rank).add(start),
                        end - start,
                    );
                    if rank == 1 {
                        for ((t, a), b) in target.iter_mut().zip(first).zip(slot) {
                            *t = *a + *b;
                        }
                    } else {
                        for (t, b) in target.iter_mut().zip(slot) {
                            *t += *b;
                        }
                    }
                }
                if self.rank_count == 1 {
                    target.copy_from_slice(first);
                }
                start = end;
            }
        }
        self.read_flag(self.rank_index)
            .store(epoch, Ordering::Release);
        self.last_epoch[parity] = epoch;
        Ok(())
    }

    fn stage<T: Summable>(&mut self, len: usize) -> Result<Option<&mut [T]>, TransportError> {
        if self.rank_count == 1
            || len < self.limits.staged_min_elements
            || len * size_of::<T>() > self.slot_bytes
        {
            return Ok(None);
        }
        let (_, parity) = self.open_round(len, size_of::<T>())?;
        self.staged = Some((len, size_of::<T>()));
        // SAFETY: this rank's slot of the round's parity, which every rank has finished reading
        // (open_round); only this rank writes it until it publishes its arrival.
        Ok(Some(unsafe {
            std::slice::from_raw_parts_mut(self.slot_ptr(parity, self.rank_index), len)
        }))
    }

    fn all_reduce_staged<T: Summable>(
        &mut self,
        len: usize,
        read: &mut dyn FnMut(usize, &[T]),
    ) -> Result<(), TransportError> {
        match self.staged.take() {
            Some(staged) if staged == (len, size_of::<T>()) => {}
            other => {
                return Err(TransportError::Protocol(format!(
                    "staged sum of {len} values of {} bytes, but {other:?} were staged",
                    size_of::<T>()
                )));
            }
        }
        let epoch = self.epoch;
        let parity = (epoch & 1) as usize;
        self.flag(self.rank_index).store(epoch, Ordering::Release);
        self.wait_for_all(epoch, Self::flag)?;
        // Sum this rank's portion of every slot in rank order into the same portion of its own
        // slot. Only this rank touches that portion of any slot until it publishes `reduced`.
        let (start, end) = self.portion(len, size_of::<T>(), self.rank_index);
        const CHUNK_BYTES: usize = 4096;
        let chunk = CHUNK_BYTES / size_of::<T>();
        let mut sum: Vec<T> = Vec::with_capacity(chunk);
        let mut at = start;
        while at < end {
            let n = (end - at).min(chunk);
            // SAFETY: every rank published this epoch after writing its slot (acquire above);
            // the ranges lie inside the slots (len fits, checked in stage).
            unsafe {
                let slot = |rank: usize| {
                    std::slice::from_raw_parts(self.slot_ptr::<T>(parity, rank).add(at), n)
                };
                sum.clear();
                sum.extend_from_slice(slot(0));
                for rank in 1..self.rank_count {
                    for (s, v) in sum.iter_mut().zip(slot(rank)) {
                        *s += *v;
                    }
                }
                std::ptr::copy_nonoverlapping(
                    sum.as_ptr(),
                    self.slot_ptr::<T>(parity, self.rank_index).add(at),
                    n,
                );
            }
            at += n;
        }
        self.reduced_flag(self.rank_index)
            .store(epoch, Ordering::Release);
        self.wait_for_all(epoch, Self::reduced_flag)?;
        for rank in 0..self.rank_count {
            let (start, end) = self.portion(len, size_of::<T>(), rank);
            if start < end {
                // SAFETY: rank `rank` wrote its reduced portion before publishing `reduced`
                // (acquire above), and nobody writes this parity before we publish `read`.
                let values = unsafe {
                    std::slice::from_raw_parts(
                        self.slot_ptr::<T>(parity, rank).add(start),
                        end - start,
                    )
                };
                read(start, values);
            }
        }
        self.read_flag(self.rank_index)
            .store(epoch, Ordering::Release);
        self.last_epoch[parity] = epoch;
        Ok(())
    }

    fn wait_for_all(
        &self,
        epoch: u64,
        flag: fn(&Self, usize) -> &AtomicU64,
    ) -> Result<(), TransportError> {
        let started = Instant::now();
        let timeout = if self.patient {
            self.limits.stage_timeout
        } else {
            self.limits.timeout
        };
        let mut spins = 0u32;
        loop {
            if (0..self.rank_count).all(|r| flag(self, r).load(Ordering::Acquire) >= epoch) {
                return Ok(());
            }
            spins = spins.wrapping_add(1);
            if spins < self.limits.spin_count {
                std::hint::spin_loop();
                continue;
            }
            // On an oversubscribed host a peer may need this core to make progress.
            std::thread::yield_now();
            if spins % 64 == 0 && self.abort.aborted(self.epoch / STEP_EPOCHS) {
                return Err(TransportError::Aborted {
                    step: self.epoch / STEP_EPOCHS,
                });
            }
            if spins % 64 == 0 && started.elapsed() > timeout {
                let missing = (0..self.rank_count)
                    .filter(|&r| flag(self, r).load(Ordering::Acquire) < epoch)
                    .collect();
                return Err(TransportError::Timeout {
                    epoch,
                    missing,
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
        }
    }
}

impl Collective for ShmCollective {
    fn rank_index(&self) -> usize {
        self.rank_index
    }

    fn rank_count(&self) -> usize {
        self.rank_count
    }

    fn begin_step(&mut self, step: u64) {
        self.epoch = step * STEP_EPOCHS;
        // A staged sum left open by an aborted step was never published; drop it.
        self.staged = None;
        self.patient = false;
    }

    fn set_patient(&mut self, patient: bool) {
        self.patient = patient;
    }

    fn all_reduce_sum(&mut self, buffer: &mut [f32]) -> Result<(), TransportError> {
        self.all_reduce(buffer)
    }

    fn all_reduce_sum_f64(&mut self, buffer: &mut [f64]) -> Result<(), TransportError> {
        self.all_reduce(buffer)
    }

    fn stage_f32(&mut self, len: usize) -> Result<Option<&mut [f32]>, TransportError> {
        self.stage(len)
    }

    fn all_reduce_staged_f32(
        &mut self,
        len: usize,
        read: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<(), TransportError> {
        self.all_reduce_staged(len, read)
    }

    fn stage_f64(&mut self, len: usize) -> Result<Option<&mut [f64]>, TransportError> {
        self.stage(len)
    }

    fn all_reduce_staged_f64(
        &mut self,
        len: usize,
        read: &mut dyn FnMut(usize, &[f64]),
    ) -> Result<(), TransportError> {
        self.all_reduce_staged(len, read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn segment_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("tp-shm-test-{tag}-{}", std::process::id()))
    }

    #[test]
    fn ranks_in_threads_agree_on_the_sum() {
        for rank_count in [2usize, 3, 4] {
            let path = segment_path(&format!("sum{rank_count}"));
            let _ = std::fs::remove_file(&path);
            let segment = ShmSegment::create(&path, rank_count, 1024 * 4).unwrap();
            let handles: Vec<_> = (0..rank_count)
                .map(|rank| {
                    let path = segment.path().to_path_buf();
                    std::thread::spawn(move || {
                        let mut c = ShmCollective::open(
                            &path,
                            rank,
                            rank_count,
                            CollectiveLimits::default(),
                        )
                        .unwrap();
                        let mut results = Vec::new();
                        for step in 1..=3u64 {
                            c.begin_step(step);
                            for round in 0..50 {
                                let len = 1 + (round * 37) % 1024;
                                let mut buffer: Vec<f32> = (0..len)
                                    .map(|i| (rank * 1000 + i + round) as f32 * 0.5)
                                    .collect();
                                c.all_reduce_sum(&mut buffer).unwrap();
                                results.push(buffer);
                            }
                            let mut wide: Vec<f64> =
                                (0..512).map(|i| (rank + i) as f64 * 0.1).collect();
                            c.all_reduce_sum_f64(&mut wide).unwrap();
                            for (i, v) in wide.iter().enumerate() {
                                let expected: f64 =
                                    (0..rank_count).map(|r| (r + i) as f64 * 0.1).sum();
                                assert!((v - expected).abs() < 1e-12);
                            }
                        }
                        results
                    })
                })
                .collect();
            let results: Vec<Vec<Vec<f32>>> =
                handles.into_iter().map(|h| h.join().unwrap()).collect();
            for (k, buffer) in results[0].iter().enumerate() {
                let round = k % 50;
                for (i, &v) in buffer.iter().enumerate() {
                    let expected: f32 = (0..rank_count)
                        .map(|r| (r * 1000 + i + round) as f32 * 0.5)
                        .sum();
                    assert_eq!(v, expected);
                }
                for other in &results[1..] {
                    assert_eq!(&other[k], buffer, "ranks disagree bitwise");
                }
            }
        }
    }

    /// Partials that sum inexactly in f64, so the summation order shows in the bits.
    fn partial(rank: usize, round: usize, i: usize) -> f64 {
        let x = (rank * 7919 + round * 104_729 + i * 31) as f64;
        (x * 0.618_033_988_7).sin() * 10f64.powi((i % 9) as i32 - 4)
    }

    #[test]
    fn staged_sums_equal_one_shot_sums_bitwise() {
        for rank_count in [2usize, 3, 4] {
            let path = segment_path(&format!("staged{rank_count}"));
            let _ = std::fs::remove_file(&path);
            let segment = ShmSegment::create(&path, rank_count, 5000 * 8).unwrap();
            let handles: Vec<_> = (0..rank_count)
                .map(|rank| {
                    let path = segment.path().to_path_buf();
                    std::thread::spawn(move || {
                        let limits = CollectiveLimits {
                            staged_min_elements: 64,
                            ..CollectiveLimits::default()
                        };
                        let mut c = ShmCollective::open(&path, rank, rank_count, limits).unwrap();
                        let mut results = Vec::new();
                        for step in 1..=3u64 {
                            c.begin_step(step);
                            for round in 0..20 {
                                let len = [64, 65, 1000, 4999, 5000, 7][round % 6];
                                let values: Vec<f64> =
                                    (0..len).map(|i| partial(rank, round, i)).collect();
                                let mut staged = vec![f64::NAN; len];
                                match c.stage_f64(len).unwrap() {
                                    Some(stage) => {
                                        stage.copy_from_slice(&values);
                                        let mut next = 0;
                                        c.all_reduce_staged_f64(len, &mut |offset, piece| {
                                            assert_eq!(offset, next, "pieces out of order");
                                            staged[offset..offset + piece.len()]
                                                .copy_from_slice(piece);
                                            next = offset + piece.len();
                                        })
                                        .unwrap();
                                        assert_eq!(next, len);
                                    }
                                    None => {
                                        assert!(len < 64, "{len} values were not staged");
                                        staged.copy_from_slice(&values);
                                        c.all_reduce_sum_f64(&mut staged).unwrap();
                                    }
                                }
                                let mut one_shot = values;
                                c.all_reduce_sum_f64(&mut one_shot).unwrap();
                                let same = staged
                                    .iter()
                                    .zip(&one_shot)
                                    .all(|(a, b)| a.to_bits() == b.to_bits());
                                assert!(same, "staged and one-shot sums differ ({len} values)");
                                // f32 too; its rounds share the slots' parities with f64's.
                                let narrow: Vec<f32> = one_shot
                                    .iter()
                                    .map(|&v| (v + partial(rank, round, 1)) as f32)
                                    .collect();
                                let mut staged32 = vec![f32::NAN; len];
                                if let Some(stage) = c.stage_f32(len).unwrap() {
                                    stage.copy_from_slice(&narrow);
                                    c.all_reduce_staged_f32(len, &mut |offset, piece| {
                                        staged32[offset..offset + piece.len()]
                                            .copy_from_slice(piece);
                                    })
                                    .unwrap();
                                } else {
                                    staged32.copy_from_slice(&narrow);
                                    c.all_reduce_sum(&mut staged32).unwrap();
                                }
                                let mut one_shot32 = narrow;
                                c.all_reduce_sum(&mut one_shot32).unwrap();
                                assert!(
                                    staged32
                                        .iter()
                                        .zip(&one_shot32)
                                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                                    "staged and one-shot f32 sums differ ({len} values)"
                                );
                                results.push(staged);
                            }
                        }
                        results
                    })
                })
                .collect();
            let results: Vec<Vec<Vec<f64>>> =
                handles.into_iter().map(|h| h.join().unwrap()).collect();
            for other in &results[1..] {
                for (a, b) in other.iter().zip(&results[0]) {
                    assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
                }
            }
        }
    }

    #[test]
    fn staged_calls_out_of_order_are_errors() {
        let path = segment_path("staged-order");
        let _ = std::fs::remove_file(&path);
        let _segment = ShmSegment::create(&path, 2, 1 << 20).unwrap();
        let mut c = ShmCollective::open(&path, 0, 2, CollectiveLimits::default()).unwrap();
        c.begin_step(1);
        assert!(
            c.stage_f64(100).unwrap().is_none(),
            "small sums are one-shot"
        );
        let err = c
            .all_reduce_staged_f64(100_000, &mut |_, _| {})
            .unwrap_err();
        assert!(matches!(err, TransportError::Protocol(_)), "{err}");
        assert!(c.stage_f64(100_000).unwrap().is_some());
        let err = c.all_reduce_sum(&mut [0.0; 4]).unwrap_err();
        assert!(matches!(err, TransportError::Protocol(_)), "{err}");
        let err = c
            .all_reduce_staged_f32(100_000, &mut |_, _| {})
            .unwrap_err();
        assert!(matches!(err, TransportError::Protocol(_)), "{err}");
        assert!(c.stage_f64(100_000).unwrap().is_some());
        let err = c.all_reduce_staged_f64(99_999, &mut |_, _| {}).unwrap_err();
        assert!(matches!(err, TransportError::Protocol(_)), "{err}");
        assert!(
            c.stage_f64((1 << 17) + 1).unwrap().is_none(),
            "over capacity"
        );
    }

    #[test]
    fn a_missing_peer_is_a_timeout_not_a_hang() {
        let path = segment_path("timeout");
        let _ = std::fs::remove_file(&path);
        let _segment = ShmSegment::create(&path, 2, 64).unwrap();
        let limits = CollectiveLimits {
            timeout: Duration::from_millis(200),
            spin_count: 100,
            ..CollectiveLimits::default()
        };
        let mut c = ShmCollective::open(&path, 0, 2, limits).unwrap();
        c.begin_step(1);
        let started = Instant::now();
        let err = c.all_reduce_sum(&mut [1.0; 4]).unwrap_err();
        assert!(
            matches!(err, TransportError::Timeout { ref missing, .. } if missing == &vec![1]),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(matches!(
            c.all_reduce_sum(&mut [0.0; 17]),
            Err(TransportError::TooLarge { .. })
        ));
        assert!(matches!(
            c.all_reduce_sum_f64(&mut [0.0; 9]),
            Err(TransportError::TooLarge { .. })
        ));
        assert!(ShmCollective::open(&path, 0, 3, limits).is_err());
    }
}
