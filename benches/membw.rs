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

use anyhow::{Result, ensure};
use clap::Parser;
use tp::kernels::membw::{SumKernel, buffer, gbps, measure, select_kernel, sum_portable};

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

    let words = buffer(bytes);
    let one = measure(&words, 1, args.passes, kernel)?;
    let all = measure(&words, threads, args.passes, kernel)?;

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
