//! # collective: the shared-memory AllReduce between worker processes
//!
//! Measures `tp::transport::shm` the way the runtime drives it: one process per rank, steps
//! opened with `begin_step`, f32 and f64 sums of activation-sized buffers (576 and 896 are the
//! model widths of SmolLM2-135M and Qwen2-0.5B). Two baselines share each table: a plain memcpy
//! of the same bytes in one process (moving the data with no peer at all) and a two-process
//! ping-pong of one cache line each way (one synchronisation between cores with no data).
//!
//! ```sh
//! cargo bench --bench collective
//! cargo bench --bench collective -- --ranks 2 --sizes 576,896 --iters 20000
//! ```
//!
//! Rank 0 is this process and does all the timing; ranks 1.. are this same executable run again
//! with hidden `--child` arguments. Children die with their parent (PR_SET_PDEATHSIG), and every
//! file in /dev/shm is removed as soon as all processes have mapped it, so a run interrupted
//! while measuring leaves nothing behind.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, ValueEnum};
use memmap2::MmapMut;
use tp::transport::shm::{ShmCollective, ShmSegment};
use tp::transport::{Collective, CollectiveLimits, TransportError};

/// The runtime opens a step per forward pass; a step may hold up to 65536 collectives.
const COLLECTIVES_PER_STEP: u64 = 1000;
/// Timed iterations of one series, whatever the time budget says: fewer make p99 meaningless,
/// more only cost time.
const ITERATIONS_MIN: u64 = 100;
const ITERATIONS_MAX: u64 = 20_000;
/// Warm-up moves about this many bytes per series, within the bounds below.
const WARMUP_BYTES: usize = 64 << 20;
const WARMUP_ITERATIONS_MIN: usize = 10;
const WARMUP_ITERATIONS_MAX: usize = 2000;
const PING_PONG_WARMUP_ROUNDS: u64 = 10_000;
const PING_PONG_TIMED_ROUNDS: u64 = 100_000;
/// The ping-pong counters sit 128 bytes apart: separate cache lines, and not a pair that the
/// adjacent-line prefetcher would fetch together.
const PING_OFFSET_BYTES: usize = 0;
const PONG_OFFSET_BYTES: usize = 128;
const PING_PONG_FILE_BYTES: u64 = 4096;
/// The most ranks the runtime supports (README).
const RANK_COUNT_MAX: usize = 16;
const PAGE_BYTES: usize = 4096;

/// Latency and bandwidth of the shared-memory AllReduce between 2..N worker processes.
#[derive(Parser, Debug)]
#[command(name = "collective")]
struct Args {
    /// Process counts to measure; 1 is the protocol's local cost alone (copies, flags, no peer).
    #[arg(long, value_delimiter = ',', default_values_t = [2usize, 3, 4])]
    ranks: Vec<usize>,
    /// Buffer lengths in elements.
    #[arg(long, value_delimiter = ',', default_values_t = [576usize, 896, 4096, 16384, 1 << 20])]
    sizes: Vec<usize>,
    /// Element types to sum; f32-staged and f64-staged sum through shared staging
    /// (`stage_f32`, `stage_f64`).
    #[arg(long, value_delimiter = ',', default_values = ["f32", "f64", "f32-staged", "f64-staged"])]
    types: Vec<ElementType>,
    /// Timed iterations per series (and memcpy size); default: what fits in --series-ms.
    #[arg(long)]
    iters: Option<u64>,
    /// Where each rank's buffer starts within a page, in bytes (a multiple of 8). The default,
    /// 16, is where glibc places a large Vec such as the executor's `partial` (max_batch rows),
    /// and memcpy speed on some CPUs depends on it.
    #[arg(long, default_value_t = 16)]
    buffer_page_offset: usize,
    /// Spins before a waiting rank starts yielding its core (CollectiveLimits::spin_count); also
    /// used by the ping-pong.
    #[arg(long, default_value_t = CollectiveLimits::default().spin_count)]
    spin_count: u32,
    /// Time budget of one series when --iters is not given.
    #[arg(long, default_value_t = 250)]
    series_ms: u64,
    /// Added by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    /// Internal: this process is a child of the bench, in this role.
    #[arg(long, hide = true)]
    child: Option<ChildRole>,
    #[arg(long, hide = true, default_value_t = 0)]
    rank: usize,
    #[arg(long, hide = true, default_value_t = 0)]
    rank_count: usize,
    #[arg(long, hide = true)]
    segment: Option<PathBuf>,
    #[arg(long, hide = true)]
    parent_pid: Option<u32>,
}

impl Args {
    fn limits(&self) -> CollectiveLimits {
        CollectiveLimits {
            spin_count: self.spin_count,
            // Every size of an f64-staged series is staged, to show where staging pays.
            staged_min_elements: 0,
            ..CollectiveLimits::default()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ElementType {
    F32,
    F64,
    F32Staged,
    F64Staged,
}

impl ElementType {
    fn name(self) -> &'static str {
        match self {
            ElementType::F32 => f32::NAME,
            ElementType::F64 => f64::NAME,
            ElementType::F32Staged => "f32-staged",
            ElementType::F64Staged => "f64-staged",
        }
    }

    fn method(self) -> &'static str {
        match self {
            ElementType::F32 => f32::METHOD,
            ElementType::F64 => f64::METHOD,
            ElementType::F32Staged => "stage_f32 + all_reduce_staged_f32",
            ElementType::F64Staged => "stage_f64 + all_reduce_staged_f64",
        }
    }

    fn element_bytes(self) -> usize {
        match self {
            ElementType::F32 | ElementType::F32Staged => size_of::<f32>(),
            ElementType::F64 | ElementType::F64Staged => size_of::<f64>(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ChildRole {
    /// One rank of the AllReduce.
    Rank,
    /// The answering side of the ping-pong.
    PingPong,
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.child {
        Some(role) => run_child(role, &args),
        None => run_parent(&args),
    }
}

fn run_parent(args: &Args) -> Result<()> {
    ensure!(
        !args.ranks.is_empty() && !args.sizes.is_empty() && !args.types.is_empty(),
        "--ranks, --sizes and --types each need at least one value"
    );
    for &ranks in &args.ranks {
        ensure!(
            (1..=RANK_COUNT_MAX).contains(&ranks),
            "--ranks {ranks}: must be 1..={RANK_COUNT_MAX}"
        );
    }
    ensure!(
        args.sizes.iter().all(|&s| s > 0),
        "--sizes: every size must be at least 1 element"
    );
    ensure!(
        args.iters != Some(0) && args.series_ms > 0,
        "--iters and --series-ms must be positive"
    );
    ensure!(
        args.buffer_page_offset < PAGE_BYTES
            && args.buffer_page_offset.is_multiple_of(size_of::<f64>()),
        "--buffer-page-offset {}: must be a multiple of 8 below {PAGE_BYTES}",
        args.buffer_page_offset
    );
    let budget = Budget {
        iterations: args.iters,
        series: Duration::from_millis(args.series_ms),
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into());

    println!(
        "# collective: shared-memory AllReduce (tp::transport::shm) between {} worker processes, \
         against memcpy in one process and a two-process ping-pong",
        join(&args.ranks, ", ")
    );
    println!(
        "# nproc: {cores}, load average at start: {load}. More ranks than cores oversubscribe them \
         (expected on a small machine): such rows, marked *, measure the scheduler as much as the \
         transport."
    );
    println!(
        "# method: after a warm-up rank 0 times every call on its own (all ranks run the same \
         count); begin_step every {COLLECTIVES_PER_STEP} collectives; buffers hold zeros, and \
         one round of exact integer sums checked on every rank ends each series. Each rank's \
         buffer starts {} bytes into a page; memcpy copies between page-aligned buffers; waits \
         spin {} times, then yield. GB/s = bytes of one rank's buffer / median. *-staged: \
         each rank writes its partials into its shm slot (the producer's own write, not timed) \
         and the sum is left in the slots for the consumer to read in place; timed: the wait \
         for the slot, both barriers and the reduction.",
        args.buffer_page_offset, args.spin_count
    );

    let mut byte_counts: Vec<usize> = Vec::new();
    for ty in &args.types {
        for &elements in &args.sizes {
            byte_counts.push(elements * ty.element_bytes());
        }
    }
    byte_counts.sort_unstable();
    byte_counts.dedup();
    let memcpy: BTreeMap<usize, Samples> = byte_counts
        .iter()
        .map(|&bytes| (bytes, measure_memcpy(bytes, &budget)))
        .collect();

    eprintln!("collective: ping-pong");
    let ping_pong = ping_pong(args).context("ping-pong")?;

    let mut series = Vec::new();
    for &ranks in &args.ranks {
        eprintln!("collective: {ranks} ranks");
        series.extend(
            measure_cluster(ranks, args, &budget)
                .with_context(|| format!("AllReduce between {ranks} processes"))?,
        );
    }

    for &ty in &args.types {
        print_table(ty, &series, &memcpy, &ping_pong, cores);
    }
    Ok(())
}

fn run_child(role: ChildRole, args: &Args) -> Result<()> {
    die_with_parent(args.parent_pid.context("a child needs --parent-pid")?)?;
    let path = args.segment.as_deref().context("a child needs --segment")?;
    match role {
        ChildRole::PingPong => answer_ping_pong(path, args.limits()),
        ChildRole::Rank => {
            let collective = ShmCollective::open(path, args.rank, args.rank_count, args.limits())?;
            run_rank(Box::new(collective), args, None, None)?;
            Ok(())
        }
    }
}

/// Makes the kernel kill this process when the parent exits, so that a parent that crashed or
/// was interrupted does not leave ranks spinning.
fn die_with_parent(parent_pid: u32) -> Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and touches no memory. The signal follows
    // the thread that spawned us: the parent's main thread, which lives until the parent exits.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    ensure!(
        rc == 0,
        "prctl(PR_SET_PDEATHSIG): {}",
        std::io::Error::last_os_error()
    );
    // The parent may have exited before the prctl above took effect.
    // SAFETY: getppid has no preconditions.
    let current_parent = unsafe { libc::getppid() } as u32;
    ensure!(
        current_parent == parent_pid,
        "parent {parent_pid} already exited"
    );
    Ok(())
}

/// How many timed iterations a series runs: fixed, or what fits in a time budget.
struct Budget {
    iterations: Option<u64>,
    series: Duration,
}

impl Budget {
    fn iterations(&self, per_call: Duration) -> u64 {
        self.iterations.unwrap_or_else(|| {
            let per_call_ns = per_call.as_nanos().max(1);
            let fitting = self.series.as_nanos() / per_call_ns;
            (fitting.min(u64::MAX as u128) as u64).clamp(ITERATIONS_MIN, ITERATIONS_MAX)
        })
    }
}

/// Warm-up calls for a buffer of `bytes`; a pure function of the size, so that every rank
/// computes the same count without being told.
fn warmup_iterations(bytes: usize) -> usize {
    (WARMUP_BYTES / bytes.max(1)).clamp(WARMUP_ITERATIONS_MIN, WARMUP_ITERATIONS_MAX)
}

/// Latencies of one series, sorted.
struct Samples {
    sorted_ns: Vec<u64>,
}

impl Samples {
    fn new(mut ns: Vec<u64>) -> Samples {
        assert!(!ns.is_empty());
        ns.sort_unstable();
        Samples { sorted_ns: ns }
    }

    fn count(&self) -> usize {
        self.sorted_ns.len()
    }

    fn median_ns(&self) -> u64 {
        self.sorted_ns[self.sorted_ns.len() / 2]
    }

    fn p99_ns(&self) -> u64 {
        let rank = (self.sorted_ns.len() * 99).div_ceil(100);
        self.sorted_ns[rank.max(1) - 1]
    }
}

/// The element types `Collective` can sum, with what the bench needs to know about each.
trait Element: Copy + PartialEq + std::fmt::Display {
    const NAME: &'static str;
    const METHOD: &'static str;
    const ZERO: Self;
    /// Exact for the small integers the check uses.
    fn from_u32(value: u32) -> Self;
    fn all_reduce(
        collective: &mut dyn Collective,
        buffer: &mut [Self],
    ) -> Result<(), TransportError>;
    fn stage(
        collective: &mut dyn Collective,
        len: usize,
    ) -> Result<Option<&mut [Self]>, TransportError>;
    fn all_reduce_staged(
        collective: &mut dyn Collective,
        len: usize,
        read: &mut dyn FnMut(usize, &[Self]),
    ) -> Result<(), TransportError>;
}

impl Element for f32 {
    const NAME: &'static str = "f32";
    const METHOD: &'static str = "all_reduce_sum";
    const ZERO: f32 = 0.0;
    fn from_u32(value: u32) -> f32 {
        value as f32
    }
    fn all_reduce(
        collective: &mut dyn Collective,
        buffer: &mut [f32],
    ) -> Result<(), TransportError> {
        collective.all_reduce_sum(buffer)
    }
    fn stage(
        collective: &mut dyn Collective,
        len: usize,
    ) -> Result<Option<&mut [f32]>, TransportError> {
        collective.stage_f32(len)
    }
    fn all_reduce_staged(
        collective: &mut dyn Collective,
        len: usize,
        read: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<(), TransportError> {
        collective.all_reduce_staged_f32(len, read)
    }
}

impl Element for f64 {
    const NAME: &'static str = "f64";
    const METHOD: &'static str = "all_reduce_sum_f64";
    const ZERO: f64 = 0.0;
    fn from_u32(value: u32) -> f64 {
        value as f64
    }
    fn all_reduce(
        collective: &mut dyn Collective,
        buffer: &mut [f64],
    ) -> Result<(), TransportError> {
        collective.all_reduce_sum_f64(buffer)
    }
    fn stage(
        collective: &mut dyn Collective,
        len: usize,
    ) -> Result<Option<&mut [f64]>, TransportError> {
        collective.stage_f64(len)
    }
    fn all_reduce_staged(
        collective: &mut dyn Collective,
        len: usize,
        read: &mut dyn FnMut(usize, &[f64]),
    ) -> Result<(), TransportError> {
        collective.all_reduce_staged_f64(len, read)
    }
}

/// A collective driven as the runtime drives it: every call belongs to a step opened with
/// `begin_step`, and steps are numbered upwards from 1.
struct Stepped {
    collective: Box<dyn Collective>,
    step: u64,
    calls_in_step: u64,
}

impl Stepped {
    fn new(collective: Box<dyn Collective>) -> Stepped {
        Stepped {
            collective,
            step: 0,
            calls_in_step: COLLECTIVES_PER_STEP,
        }
    }

    fn reduce<T: Element>(&mut self, buffer: &mut [T]) -> Result<(), TransportError> {
        self.next_call();
        T::all_reduce(&mut *self.collective, buffer)
    }
}

impl Stepped {
    fn next_call(&mut self) {
        if self.calls_in_step == COLLECTIVES_PER_STEP {
            self.step += 1;
            self.collective.begin_step(self.step);
            self.calls_in_step = 0;
        }
        self.calls_in_step += 1;
    }

    /// One staged sum of `input`, written into the stage untimed; the result goes to `output`
    /// when given (untimed too). Returns the time spent in the collective.
    fn reduce_staged<T: Element>(
        &mut self,
        input: &[T],
        output: Option<&mut [T]>,
    ) -> Result<Duration> {
        self.next_call();
        let len = input.len();
        let started = Instant::now();
        let stage = T::stage(&mut *self.collective, len)?
            .with_context(|| format!("{len} values were not staged"))?;
        let waited = started.elapsed();
        stage.copy_from_slice(input);
        let mut copied = Duration::ZERO;
        let started = Instant::now();
        match output {
            Some(output) => {
                T::all_reduce_staged(&mut *self.collective, len, &mut |offset, piece| {
                    let copy = Instant::now();
                    output[offset..offset + piece.len()].copy_from_slice(piece);
                    copied += copy.elapsed();
                })?
            }
            None => T::all_reduce_staged(&mut *self.collective, len, &mut |_, _| {})?,
        }
        Ok(waited + started.elapsed() - copied)
    }
}

fn run_series_staged<T: Element>(
    stepped: &mut Stepped,
    elements: usize,
    budget: Option<&Budget>,
) -> Result<Samples> {
    let mut input = vec![T::ZERO; elements];
    let warmup = warmup_iterations(elements * size_of::<T>());
    let mut spent = Duration::ZERO;
    for _ in 0..warmup {
        spent += stepped.reduce_staged(&input, None)?;
    }
    let per_call = spent / warmup as u32;
    let mut count = [budget.map_or(0.0, |b| b.iterations(per_call) as f64)];
    stepped.reduce(&mut count)?;
    let iterations = count[0] as u64;
    ensure!(iterations > 0, "rank 0 broadcast {} iterations", count[0]);
    let mut samples_ns = Vec::with_capacity(iterations as usize);
    for _ in 0..iterations {
        samples_ns.push(stepped.reduce_staged(&input, None)?.as_nanos() as u64);
    }
    // The same exact-integer check as the one-shot series.
    let rank_index = stepped.collective.rank_index();
    let rank_count = stepped.collective.rank_count();
    let pattern = |i: usize| (i % 7) as u32 + 1;
    for (i, value) in input.iter_mut().enumerate() {
        *value = T::from_u32((rank_index as u32 + 1) * pattern(i));
    }
    let mut output = vec![T::ZERO; elements];
    stepped.reduce_staged(&input, Some(&mut output))?;
    let rank_sum = (rank_count * (rank_count + 1) / 2) as u32;
    for (i, &value) in output.iter().enumerate() {
        let expected = T::from_u32(rank_sum * pattern(i));
        ensure!(
            value == expected,
            "rank {rank_index} of {rank_count}: staged {} element {i} of {elements} is {value}, expected {expected}",
            T::NAME
        );
    }
    Ok(Samples::new(samples_ns))
}

/// One measured (rank count, element type, size), as seen by rank 0.
struct Series {
    rank_count: usize,
    element: &'static str,
    elements: usize,
    bytes: usize,
    samples: Samples,
}

/// Rank 0's side of one cluster: creates the segment, starts the other ranks, runs its own.
fn measure_cluster(rank_count: usize, args: &Args, budget: &Budget) -> Result<Vec<Series>> {
    let path = unique_shm_path("collective");
    let max_elements = *args.sizes.iter().max().expect("checked non-empty");
    let segment = ShmSegment::create(&path, rank_count, max_elements * size_of::<f64>())?;
    let sizes = join(&args.sizes, ",");
    let types = join(
        &args.types.iter().map(|t| t.name()).collect::<Vec<_>>(),
        ",",
    );
    let children = Children::spawn(rank_count - 1, |index| {
        let mut command = child_command(ChildRole::Rank, &path, args);
        command
            .arg(format!("--rank={}", index + 1))
            .arg(format!("--rank-count={rank_count}"))
            .arg(format!("--sizes={sizes}"))
            .arg(format!("--types={types}"))
            .arg(format!("--buffer-page-offset={}", args.buffer_page_offset));
        command
    })?;
    let collective = ShmCollective::open(&path, 0, rank_count, args.limits())?;
    let series = run_rank(Box::new(collective), args, Some(segment), Some(budget))?;
    children.wait()?;
    Ok(series)
}

/// Every rank's schedule, from the same `args` on all ranks, so that their collectives pair up.
/// Rank 0 passes the segment (removed once all ranks have mapped it) and the budget (it decides
/// each series' iteration count and broadcasts it); it alone returns series.
fn run_rank(
    collective: Box<dyn Collective>,
    args: &Args,
    segment: Option<ShmSegment>,
    budget: Option<&Budget>,
) -> Result<Vec<Series>> {
    let rank_index = collective.rank_index();
    let rank_count = collective.rank_count();
    let mut stepped = Stepped::new(collective);
    // The first collective completes only once every rank has mapped the segment.
    let mut hello = [1.0f64];
    stepped.reduce(&mut hello)?;
    ensure!(
        hello[0] == rank_count as f64,
        "hello: {} ranks answered, expected {rank_count}",
        hello[0]
    );
    drop(segment);

    let mut all_series = Vec::new();
    let offset = args.buffer_page_offset;
    for &ty in &args.types {
        for &elements in &args.sizes {
            let samples = match ty {
                ElementType::F32 => run_series::<f32>(&mut stepped, elements, offset, budget)?,
                ElementType::F64 => run_series::<f64>(&mut stepped, elements, offset, budget)?,
                ElementType::F32Staged => run_series_staged::<f32>(&mut stepped, elements, budget)?,
                ElementType::F64Staged => run_series_staged::<f64>(&mut stepped, elements, budget)?,
            };
            if rank_index == 0 {
                all_series.push(Series {
                    rank_count,
                    element: ty.name(),
                    elements,
                    bytes: elements * ty.element_bytes(),
                    samples,
                });
            }
        }
    }
    Ok(all_series)
}

fn run_series<T: Element>(
    stepped: &mut Stepped,
    elements: usize,
    page_offset_bytes: usize,
    budget: Option<&Budget>,
) -> Result<Samples> {
    // Zeros sum to zeros: values never grow, overflow or go subnormal however often we sum.
    let mut storage = Vec::new();
    let buffer = placed(&mut storage, T::ZERO, elements, page_offset_bytes);
    let warmup = warmup_iterations(elements * size_of::<T>());
    let started = Instant::now();
    for _ in 0..warmup {
        stepped.reduce(buffer)?;
    }
    let per_call = started.elapsed() / warmup as u32;

    // Rank 0 picks the count; the others contribute 0, so the sum broadcasts it exactly.
    let mut count = [budget.map_or(0.0, |b| b.iterations(per_call) as f64)];
    stepped.reduce(&mut count)?;
    let iterations = count[0] as u64;
    ensure!(iterations > 0, "rank 0 broadcast {} iterations", count[0]);

    let mut samples_ns = Vec::with_capacity(iterations as usize);
    for _ in 0..iterations {
        let started = Instant::now();
        stepped.reduce(buffer)?;
        samples_ns.push(started.elapsed().as_nanos() as u64);
    }
    check_sums(stepped, buffer)?;
    Ok(Samples::new(samples_ns))
}

/// One round of small integers after the timed ones: their sums are exact in any order, so every
/// rank must hold exactly the expected values.
fn check_sums<T: Element>(stepped: &mut Stepped, buffer: &mut [T]) -> Result<()> {
    let rank_index = stepped.collective.rank_index() as u32;
    let rank_count = stepped.collective.rank_count() as u32;
    let pattern = |i: usize| (i % 7) as u32 + 1;
    for (i, value) in buffer.iter_mut().enumerate() {
        *value = T::from_u32((rank_index + 1) * pattern(i));
    }
    stepped.reduce(buffer)?;
    let rank_sum = rank_count * (rank_count + 1) / 2;
    for (i, &value) in buffer.iter().enumerate() {
        let expected = T::from_u32(rank_sum * pattern(i));
        if value != expected {
            bail!(
                "rank {rank_index} of {rank_count}: {} element {i} of {} is {value}, expected {expected}",
                T::NAME,
                buffer.len()
            );
        }
    }
    Ok(())
}

/// `len` values of `storage`, starting `page_offset_bytes` into a page.
fn placed<T: Copy>(
    storage: &mut Vec<T>,
    fill: T,
    len: usize,
    page_offset_bytes: usize,
) -> &mut [T] {
    assert!(page_offset_bytes < PAGE_BYTES && page_offset_bytes.is_multiple_of(size_of::<T>()));
    *storage = vec![fill; len + PAGE_BYTES / size_of::<T>()];
    let misalignment_bytes = storage.as_ptr() as usize % PAGE_BYTES;
    // A whole number of elements, since a Vec is aligned to its element type.
    let start_bytes = (PAGE_BYTES + page_offset_bytes - misalignment_bytes) % PAGE_BYTES;
    &mut storage[start_bytes / size_of::<T>()..][..len]
}

/// A plain copy of `bytes` in this process, timed per copy like the collective. Source and
/// target both start a page: memcpy on some CPUs is many times slower for some distances
/// between the two modulo 4096, and the baseline should not depend on where malloc put them.
fn measure_memcpy(bytes: usize, budget: &Budget) -> Samples {
    let (mut source_storage, mut target_storage) = (Vec::new(), Vec::new());
    let source: &[u8] = placed(&mut source_storage, 1, bytes, 0);
    let target = placed(&mut target_storage, 0, bytes, 0);
    let warmup = warmup_iterations(bytes);
    let started = Instant::now();
    for _ in 0..warmup {
        target.copy_from_slice(std::hint::black_box(source));
        std::hint::black_box(&mut *target);
    }
    let iterations = budget.iterations(started.elapsed() / warmup as u32);
    let mut samples_ns = Vec::with_capacity(iterations as usize);
    for _ in 0..iterations {
        let started = Instant::now();
        target.copy_from_slice(std::hint::black_box(source));
        std::hint::black_box(&mut *target);
        samples_ns.push(started.elapsed().as_nanos() as u64);
    }
    Samples::new(samples_ns)
}

/// Two counters on separate cache lines of a shared file: the parent writes `ping`, the child
/// answers on `pong`.
struct PingPongLines {
    map: MmapMut,
}

impl PingPongLines {
    fn open(path: &Path) -> Result<PingPongLines> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: the file is shared on purpose, and both processes access it only through the
        // atomics below.
        let map = unsafe { MmapMut::map_mut(&file) }?;
        ensure!(
            map.len() as u64 == PING_PONG_FILE_BYTES,
            "{} has {} bytes, expected {PING_PONG_FILE_BYTES}",
            path.display(),
            map.len()
        );
        Ok(PingPongLines { map })
    }

    fn atomic(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: in bounds (length checked at open), 8-byte aligned (the map is page-aligned),
        // and only ever accessed atomically by both processes.
        unsafe { &*(self.map.as_ptr().add(offset) as *const AtomicU64) }
    }

    fn ping(&self) -> &AtomicU64 {
        self.atomic(PING_OFFSET_BYTES)
    }

    fn pong(&self) -> &AtomicU64 {
        self.atomic(PONG_OFFSET_BYTES)
    }
}

/// Waits until `counter` reaches `value`, with the collective's own waiting policy (spin, then
/// yield), so that the ping-pong is the collective's synchronisation without its data.
fn wait_for(counter: &AtomicU64, value: u64, limits: CollectiveLimits) -> Result<()> {
    let started = Instant::now();
    let mut spins = 0u32;
    while counter.load(Ordering::Acquire) < value {
        spins = spins.wrapping_add(1);
        if spins < limits.spin_count {
            std::hint::spin_loop();
            continue;
        }
        std::thread::yield_now();
        if spins.is_multiple_of(64) && started.elapsed() > limits.timeout {
            bail!(
                "the peer did not reach {value} within {} ms",
                limits.timeout.as_millis()
            );
        }
    }
    Ok(())
}

/// Round trips between this process and a child: median and p99 of each, timed one by one.
fn ping_pong(args: &Args) -> Result<Samples> {
    let path = unique_shm_path("pingpong");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let removal = RemoveOnDrop(path.clone());
    file.set_len(PING_PONG_FILE_BYTES)?;
    let lines = PingPongLines::open(&path)?;
    let children = Children::spawn(1, |_| child_command(ChildRole::PingPong, &path, args))?;

    let round_trip = |round: u64| -> Result<()> {
        lines.ping().store(round, Ordering::Release);
        wait_for(lines.pong(), round, args.limits())
    };
    // The first round trip is the handshake: after it the child has mapped the file.
    round_trip(1)?;
    drop(removal);
    for round in 2..=PING_PONG_WARMUP_ROUNDS {
        round_trip(round)?;
    }
    let first_timed = PING_PONG_WARMUP_ROUNDS + 1;
    let mut samples_ns = Vec::with_capacity(PING_PONG_TIMED_ROUNDS as usize);
    for round in first_timed..first_timed + PING_PONG_TIMED_ROUNDS {
        let started = Instant::now();
        round_trip(round)?;
        samples_ns.push(started.elapsed().as_nanos() as u64);
    }
    children.wait()?;
    Ok(Samples::new(samples_ns))
}

/// The child's side of `ping_pong`: echoes every round.
fn answer_ping_pong(path: &Path, limits: CollectiveLimits) -> Result<()> {
    let lines = PingPongLines::open(path)?;
    for round in 1..=PING_PONG_WARMUP_ROUNDS + PING_PONG_TIMED_ROUNDS {
        wait_for(lines.ping(), round, limits)?;
        lines.pong().store(round, Ordering::Release);
    }
    Ok(())
}

/// Child processes of this bench; any still running when this is dropped (rank 0 failed) are
/// killed, so an error never leaves ranks spinning.
struct Children(Vec<Child>);

impl Children {
    fn spawn(count: usize, command: impl Fn(usize) -> Command) -> Result<Children> {
        let mut children = Children(Vec::with_capacity(count));
        for index in 0..count {
            let child = command(index)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .context("starting a child process")?;
            children.0.push(child);
        }
        Ok(children)
    }

    /// Waits for every child in order; each must exit successfully.
    fn wait(mut self) -> Result<()> {
        while !self.0.is_empty() {
            let mut child = self.0.remove(0);
            let status = child.wait()?;
            ensure!(status.success(), "child {} {status}", child.id());
        }
        Ok(())
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn child_command(role: ChildRole, path: &Path, args: &Args) -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let role = role.to_possible_value().expect("no skipped variants");
    let mut command = Command::new(exe);
    command
        .arg(format!("--child={}", role.get_name()))
        .arg("--segment")
        .arg(path)
        .arg(format!("--parent-pid={}", std::process::id()))
        .arg(format!("--spin-count={}", args.spin_count));
    command
}

/// Removes a file when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A path in /dev/shm (the temporary directory where there is none) that no other run uses.
fn unique_shm_path(what: &str) -> PathBuf {
    let directory = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    directory.join(format!("tp-bench-{what}-{}-{nanos:09}", std::process::id()))
}

fn print_table(
    ty: ElementType,
    series: &[Series],
    memcpy: &BTreeMap<usize, Samples>,
    ping_pong: &Samples,
    cores: usize,
) {
    let us = |ns: u64| format!("{:.2}", ns as f64 / 1e3);
    let gbps = |bytes: usize, ns: u64| format!("{:.2}", bytes as f64 / ns.max(1) as f64);
    println!();
    println!("## {} ({})", ty.name(), ty.method());
    println!();
    println!(
        "| measured | processes | elements | bytes | iterations | median µs | p99 µs | GB/s | memcpy median µs | memcpy GB/s |"
    );
    println!("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    println!(
        "| ping-pong round trip | 2 | – | 8 | {} | {} | {} | – | – | – |",
        ping_pong.count(),
        us(ping_pong.median_ns()),
        us(ping_pong.p99_ns())
    );
    println!(
        "| ping-pong one way (half) | 2 | – | 8 | {} | {} | {} | – | – | – |",
        ping_pong.count(),
        us(ping_pong.median_ns() / 2),
        us(ping_pong.p99_ns() / 2)
    );
    for s in series.iter().filter(|s| s.element == ty.name()) {
        let copy = &memcpy[&s.bytes];
        let oversubscribed = if s.rank_count > cores { "*" } else { "" };
        println!(
            "| {} | {}{oversubscribed} | {} | {} | {} | {} | {} | {} | {} | {} |",
            ty.method(),
            s.rank_count,
            s.elements,
            s.bytes,
            s.samples.count(),
            us(s.samples.median_ns()),
            us(s.samples.p99_ns()),
            gbps(s.bytes, s.samples.median_ns()),
            us(copy.median_ns()),
            gbps(s.bytes, copy.median_ns()),
        );
    }
}

fn join<T: std::fmt::Display>(values: &[T], separator: &str) -> String {
    values
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(separator)
}
