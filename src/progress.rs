//! Progress of long operations (indicatif): loading shards, streaming a shard to a worker,
//! perplexity, the benchmark. Bars go to stderr and are drawn only when it is a terminal, so
//! logs, pipes and tests see nothing of them.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar counting `len` things ("3/8 chunks").
pub fn counter(len: u64, message: impl Into<String>) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>22} [{bar:30}] {pos}/{len} {elapsed_precise}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message.into());
    bar
}

/// A bar over `len` bytes, with the rate and the time left.
pub fn bytes(len: u64, message: impl Into<String>) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>22} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message(message.into());
    bar
}
