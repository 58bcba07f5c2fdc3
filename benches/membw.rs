//! # membw: the machine's sequential memory read bandwidth
//!
//! Sums the u64 words of a buffer far larger than the caches, with one thread and with one
//! thread per core (each summing its own contiguous part). Decoding a model is bound by reading
//! its weights, so this is the ceiling that tokens/s and the AllReduce's large sizes are judged
//! against.
//!
//! ```sh
//! cargo bench --bench membw
//! cargo bench --bench membw -- --mib 1024 --passes 9
//! ```
//!
//! Ends with one JSON line for scripts, holding the best pass of each:
//! `{"read_gbps_1thread": x, "read_gbps_all": y, "threads": n}`.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use clap::Parser;

/// Sequential memory read bandwidth, one thread and all cores.
#[derive(Parser, Debug)]
#[command(name = "membw")]
struct Args {
    /// Buffer size in MiB; keep it well beyond the last-level cache.
    #[arg(long, default_value_t = 512)]
    mib: usize,
    /// Timed passes over the buffer per thread count.
    #[arg(long, default_value_t = 5)]
    passes: usize,
    /// Threads of the all-cores measurement (default: the available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Use the portable kernel even where AVX2 is available.
    #[arg(long)]
    portable: bool,
    /// Added by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// A summing kernel over a slice of words.
type SumKernel = fn(&[u64]) -> u64;

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.mib > 0 && args.passes > 0,
        "--mib and --passes must be positive"
    );
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    ensure!(threads > 0, "--threads must be positive");
    let (kernel_name, kernel) = if args.portable {
        ("portable", sum_portable as SumKernel)
    } else {
        select_kernel()
    };
    let bytes = args.mib << 20;

    println!(
        "# membw: sequential read bandwidth, summing the u64 words of a {} MiB buffer ({kernel_name} \
         kernel), 1 thread and {threads} threads (nproc {}); {} passes each; GB/s = 1e9 bytes/s",
        args.mib,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        args.passes
    );

    // Writing every word maps every page now, so no pass pays for page faults; the values give
    // the passes a known sum to check.
    let words: Vec<u64> = (0..(bytes / size_of::<u64>()) as u64).collect();
    let expected = expected_sum(words.len() as u64);

    let one = measure(&words, 1, args.passes, kernel, expected)?;
    let all = measure(&words, threads, args.passes, kernel, expected)?;

    println!();
    println!("| threads | best GB/s | median GB/s |");
    println!("|--:|--:|--:|");
    for (thread_count, passes) in [(1, &one), (threads, &all)] {
        println!(
            "| {thread_count} | {:.2} | {:.2} |",
            gbps(bytes, passes[0]),
            gbps(bytes, passes[passes.len() / 2])
        );
    }
    println!();
    println!(
        "{{\"read_gbps_1thread\": {:.2}, \"read_gbps_all\": {:.2}, \"threads\": {threads}}}",
        gbps(bytes, one[0]),
        gbps(bytes, all[0])
    );
    Ok(())
}

/// Times `passes` reads of all of `words` split over `threads`; returns the pass times sorted,
/// fastest first. Every pass's total is checked against `expected`.
fn measure(
    words: &[u64],
    threads: usize,
    passes: usize,
    kernel: SumKernel,
    expected: u64,
) -> Result<Vec<Duration>> {
    let part_words = words.len().div_ceil(threads);
    let mut times = Vec::with_capacity(passes);
    for _ in 0..passes {
        // Timed around the whole scope: starting and joining a few threads costs tens of
        // microseconds against tens of milliseconds of reading.
        let started = Instant::now();
        let total = std::thread::scope(|scope| {
            let handles: Vec<_> = words
                .chunks(part_words)
                .map(|part| scope.spawn(move || kernel(std::hint::black_box(part))))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a summing thread panicked"))
                .fold(0u64, u64::wrapping_add)
        });
        times.push(started.elapsed());
        ensure!(
            std::hint::black_box(total) == expected,
            "{threads} threads summed {total}, expected {expected}"
        );
    }
    times.sort_unstable();
    Ok(times)
}

/// 0 + 1 + .. + (n - 1), wrapping like the kernels.
fn expected_sum(n: u64) -> u64 {
    let (a, b) = if n.is_multiple_of(2) {
        (n / 2, n.wrapping_sub(1))
    } else {
        (n, (n - 1) / 2)
    };
    a.wrapping_mul(b)
}

fn gbps(bytes: usize, time: Duration) -> f64 {
    bytes as f64 / time.as_secs_f64() / 1e9
}

/// The fastest kernel this CPU runs, chosen once.
fn select_kernel() -> (&'static str, SumKernel) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        return ("AVX2", avx2::sum);
    }
    ("portable", sum_portable)
}

/// The portable twin of the AVX2 kernel: independent accumulators, which the compiler
/// vectorizes with whatever the baseline target allows.
fn sum_portable(words: &[u64]) -> u64 {
    let mut lanes = [0u64; 8];
    let chunks = words.chunks_exact(lanes.len());
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &word) in lanes.iter_mut().zip(chunk) {
            *lane = lane.wrapping_add(word);
        }
    }
    lanes
        .iter()
        .chain(tail)
        .fold(0u64, |sum, &word| sum.wrapping_add(word))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Words per iteration: four independent 256-bit accumulators, so that the loop is bound by
    /// loads rather than by the latency of one add chain.
    const WORDS_PER_ITERATION: usize = 16;

    /// Safe to call only on a CPU with AVX2: `select_kernel` hands it out only after detecting
    /// the feature, and it is not reachable any other way.
    pub(super) fn sum(words: &[u64]) -> u64 {
        // SAFETY: AVX2 was detected before this kernel was selected (see above).
        unsafe { sum_avx2(words) }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn sum_avx2(words: &[u64]) -> u64 {
        let mut acc = [_mm256_setzero_si256(); 4];
        let chunks = words.chunks_exact(WORDS_PER_ITERATION);
        let tail = chunks.remainder();
        for chunk in chunks {
            let p = chunk.as_ptr() as *const __m256i;
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: the chunk holds 16 words, four 256-bit vectors; loadu needs no
                // alignment.
                *a = _mm256_add_epi64(*a, unsafe { _mm256_loadu_si256(p.add(k)) });
            }
        }
        let sum = _mm256_add_epi64(
            _mm256_add_epi64(acc[0], acc[1]),
            _mm256_add_epi64(acc[2], acc[3]),
        );
        let mut lanes = [0u64; 4];
        // SAFETY: `lanes` is 32 bytes; storeu needs no alignment.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, sum) };
        lanes
            .iter()
            .chain(tail)
            .fold(0u64, |sum, &word| sum.wrapping_add(word))
    }
}
