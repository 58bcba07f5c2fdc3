//! Sequential memory read bandwidth: sums the u64 words of a buffer far larger than the caches,
//! split over threads. Decoding a model is bound by reading its weights, so this is the ceiling
//! that `bench` judges tokens/s against (`benches/membw.rs` prints it on its own).

use std::time::{Duration, Instant};

/// A summing kernel over a slice of words.
pub type SumKernel = fn(&[u64]) -> u64;

/// A buffer of `bytes` (rounded down to whole words) with every page mapped, ready to be read.
pub fn buffer(bytes: usize) -> Vec<u64> {
    // Writing every word maps every page now, so no pass pays for page faults; the values give
    // the passes a known sum to check.
    (0..(bytes / size_of::<u64>()) as u64).collect()
}

/// Times `passes` reads of all of `words` (from [`buffer`]) split over `threads`; returns the
/// pass times sorted, fastest first. Every pass's total is checked.
pub fn measure(
    words: &[u64],
    threads: usize,
    passes: usize,
    kernel: SumKernel,
) -> anyhow::Result<Vec<Duration>> {
    let expected = expected_sum(words.len() as u64);
    let part_words = words.len().div_ceil(threads.max(1)).max(1);
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
        anyhow::ensure!(
            std::hint::black_box(total) == expected,
            "{threads} threads summed {total}, expected {expected}"
        );
    }
    times.sort_unstable();
    Ok(times)
}

/// Best read bandwidth in GB/s (1e9 bytes/s) of `threads` threads over a `mib` MiB buffer.
pub fn read_gbps(mib: usize, threads: usize, passes: usize) -> anyhow::Result<f64> {
    let words = buffer(mib << 20);
    let times = measure(&words, threads, passes, select_kernel().1)?;
    Ok(gbps(words.len() * size_of::<u64>(), times[0]))
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

pub fn gbps(bytes: usize, time: Duration) -> f64 {
    bytes as f64 / time.as_secs_f64() / 1e9
}

/// The fastest kernel this CPU runs.
pub fn select_kernel() -> (&'static str, SumKernel) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        return ("AVX2", avx2::sum);
    }
    ("portable", sum_portable)
}

/// The portable twin of the AVX2 kernel: independent accumulators, which the compiler
/// vectorizes with whatever the baseline target allows.
pub fn sum_portable(words: &[u64]) -> u64 {
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

#[cfg(test)]
mod tests {
    #[test]
    fn every_kernel_sums_exactly() {
        let words = super::buffer(1 << 16);
        for kernel in [
            super::sum_portable as super::SumKernel,
            super::select_kernel().1,
        ] {
            for threads in [1, 3] {
                assert_eq!(super::measure(&words, threads, 1, kernel).unwrap().len(), 1);
            }
        }
    }
}
