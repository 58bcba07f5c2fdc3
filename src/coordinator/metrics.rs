//! What the server's `/metrics` reports, in Prometheus text format: request and token
//! counters, the queue and the slots, and latency histograms (time to first token, between
//! tokens, per-step time of each worker, AllReduce latency by transport).

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Upper bounds (seconds) of request-level latency buckets.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Upper bounds (seconds) of AllReduce latency buckets: microseconds to tens of milliseconds.
pub const COLLECTIVE_BUCKETS: &[f64] = &[
    1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3, 2e-2,
];

pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            count: 0,
            sum: 0.0,
        }
    }

    pub fn observe(&mut self, seconds: f64) {
        for (bound, count) in self.bounds.iter().zip(&mut self.counts) {
            if seconds <= *bound {
                *count += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    /// The series of this histogram; `labels` is empty or `key="value",…` without braces.
    fn render_series(&self, name: &str, labels: &str, out: &mut String) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), self.sum);
        let _ = writeln!(out, "{name}_count{} {}", braces(labels), self.count);
    }
}

fn header(name: &str, kind: &str, help: &str, out: &mut String) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Error responses by status class, counted where responses are built (one server per process).
pub static ERRORS_4XX: AtomicU64 = AtomicU64::new(0);
pub static ERRORS_5XX: AtomicU64 = AtomicU64::new(0);

pub struct Metrics {
    pub completions: AtomicU64,
    pub chat_completions: AtomicU64,
    pub cancelled: AtomicU64,
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens the KV cache already held (the prefix cache), not computed again.
    pub prompt_tokens_cached: AtomicU64,
    /// Sequences that gave their KV blocks back when the pool ran dry, to be recomputed.
    pub preempted: AtomicU64,
    /// Requests that waited for KV blocks before starting.
    pub waited_for_kv: AtomicU64,
    /// KV blocks in the pool, and those no sequence holds (free or cached for reuse).
    pub kv_blocks: AtomicUsize,
    pub kv_blocks_free: AtomicUsize,
    /// Sequences waiting for KV blocks (preempted, or admitted only when blocks free up).
    pub kv_waiting: AtomicUsize,
    pub completion_tokens: AtomicU64,
    /// Requests accepted and not finished: waiting for a slot or holding one.
    pub pending: AtomicUsize,
    /// Slots holding a sequence.
    pub busy: AtomicUsize,
    pub slots: AtomicUsize,
    pub steps: AtomicU64,
    pub time_to_first_token: Mutex<Histogram>,
    pub inter_token_latency: Mutex<Histogram>,
    /// Per worker (rank order): wall time of each step on that worker.
    pub worker_step: Mutex<Vec<Histogram>>,
    /// Per transport name: mean AllReduce latency of each step.
    pub collective: Mutex<Vec<(&'static str, Histogram)>>,
    /// Pipeline stages, each worker's stage, batches in flight now, and launches made while
    /// another batch was in flight (pipelining at work).
    pub stages: AtomicUsize,
    pub rank_stage: Mutex<Vec<usize>>,
    pub in_flight: AtomicUsize,
    pub pipelined_launches: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            completions: AtomicU64::new(0),
            chat_completions: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            prompt_tokens_cached: AtomicU64::new(0),
            preempted: AtomicU64::new(0),
            waited_for_kv: AtomicU64::new(0),
            kv_blocks: AtomicUsize::new(0),
            kv_blocks_free: AtomicUsize::new(0),
            kv_waiting: AtomicUsize::new(0),
            completion_tokens: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            slots: AtomicUsize::new(0),
            steps: AtomicU64::new(0),
            time_to_first_token: Mutex::new(Histogram::new(LATENCY_BUCKETS)),
            inter_token_latency: Mutex::new(Histogram::new(LATENCY_BUCKETS)),
            worker_step: Mutex::new(Vec::new()),
            collective: Mutex::new(Vec::new()),
            stages: AtomicUsize::new(1),
            rank_stage: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            pipelined_launches: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// Records one step's time on each worker and its mean AllReduce latency.
    pub fn observe_step(&self, transport: &'static str, workers: &[(f64, f64, u32)]) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        let mut steps = self.worker_step.lock().unwrap();
        if steps.len() < workers.len() {
            steps.resize_with(workers.len(), || Histogram::new(LATENCY_BUCKETS));
        }
        for (histogram, &(seconds, _, _)) in steps.iter_mut().zip(workers) {
            histogram.observe(seconds);
        }
        drop(steps);
        let mut collective = self.collective.lock().unwrap();
        let index = match collective.iter().position(|(t, _)| *t == transport) {
            Some(i) => i,
            None => {
                collective.push((transport, Histogram::new(COLLECTIVE_BUCKETS)));
                collective.len() - 1
            }
        };
        for &(_, seconds, count) in workers {
            if count > 0 {
                collective[index].1.observe(seconds / count as f64);
            }
        }
    }

    pub fn render(&self) -> String {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        let o = &mut out;
        header(
            "tp_requests_total",
            "counter",
            "Generation requests accepted, by endpoint.",
            o,
        );
        let _ = writeln!(
            o,
            "tp_requests_total{{endpoint=\"completions\"}} {}\n\
             tp_requests_total{{endpoint=\"chat_completions\"}} {}",
            load(&self.completions),
            load(&self.chat_completions)
        );
        header(
            "tp_request_errors_total",
            "counter",
            "Error responses, by status class.",
            o,
        );
        let _ = writeln!(
            o,
            "tp_request_errors_total{{class=\"4xx\"}} {}\n\
             tp_request_errors_total{{class=\"5xx\"}} {}",
            load(&ERRORS_4XX),
            load(&ERRORS_5XX)
        );
        let counters = [
            (
                "tp_requests_cancelled_total",
                "Generations stopped because the client went away.",
                &self.cancelled,
            ),
            (
                "tp_prompt_tokens_total",
                "Prompt tokens of accepted requests (computed or reused).",
                &self.prompt_tokens,
            ),
            (
                "tp_prompt_tokens_cached_total",
                "Prompt tokens found in the KV cache (prefix cache) and not computed again.",
                &self.prompt_tokens_cached,
            ),
            (
                "tp_kv_preemptions_total",
                "Sequences that gave their KV blocks back when the pool ran dry (recomputed later).",
                &self.preempted,
            ),
            (
                "tp_kv_admission_waits_total",
                "Requests that waited for free KV blocks before starting.",
                &self.waited_for_kv,
            ),
            (
                "tp_completion_tokens_total",
                "Tokens generated.",
                &self.completion_tokens,
            ),
            ("tp_steps_total", "Forward passes run.", &self.steps),
            (
                "tp_pipelined_launches_total",
                "Batches launched while another was still on the workers.",
                &self.pipelined_launches,
            ),
        ];
        for (name, help, value) in counters {
            header(name, "counter", help, o);
            let _ = writeln!(o, "{name} {}", load(value));
        }
        let gauges = [
            (
                "tp_queue_depth",
                "Requests accepted and not finished (waiting for a slot or holding one).",
                self.pending.load(Ordering::Relaxed),
            ),
            (
                "tp_slots_busy",
                "Sequence slots holding a request.",
                self.busy.load(Ordering::Relaxed),
            ),
            (
                "tp_slots_total",
                "Sequence slots (--parallel).",
                self.slots.load(Ordering::Relaxed),
            ),
            (
                "tp_kv_blocks_total",
                "Blocks of the paged KV cache on every worker (--kv-budget, --kv-block-size).",
                self.kv_blocks.load(Ordering::Relaxed),
            ),
            (
                "tp_kv_blocks_free",
                "KV blocks no sequence holds (unused, or cached for a later prompt).",
                self.kv_blocks_free.load(Ordering::Relaxed),
            ),
            (
                "tp_kv_waiting",
                "Sequences waiting for KV blocks (preempted, or held back until blocks free up).",
                self.kv_waiting.load(Ordering::Relaxed),
            ),
            (
                "tp_pipeline_stages",
                "Pipeline stages of the loaded model (1: tensor parallel only).",
                self.stages.load(Ordering::Relaxed),
            ),
            (
                "tp_batches_in_flight",
                "Batches on the workers now (up to one per pipeline stage).",
                self.in_flight.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in gauges {
            header(name, "gauge", help, o);
            let _ = writeln!(o, "{name} {value}");
        }
        header(
            "tp_time_to_first_token_seconds",
            "histogram",
            "From accepting a request to its first generated token.",
            o,
        );
        self.time_to_first_token.lock().unwrap().render_series(
            "tp_time_to_first_token_seconds",
            "",
            o,
        );
        header(
            "tp_inter_token_latency_seconds",
            "histogram",
            "Between consecutive generated tokens of one request.",
            o,
        );
        self.inter_token_latency.lock().unwrap().render_series(
            "tp_inter_token_latency_seconds",
            "",
            o,
        );
        header(
            "tp_worker_step_seconds",
            "histogram",
            "Time each worker spent on a forward pass, by rank and pipeline stage.",
            o,
        );
        let rank_stage = self.rank_stage.lock().unwrap().clone();
        for (rank, h) in self.worker_step.lock().unwrap().iter().enumerate() {
            let stage = rank_stage.get(rank).copied().unwrap_or(0);
            h.render_series(
                "tp_worker_step_seconds",
                &format!("rank=\"{rank}\",stage=\"{stage}\""),
                o,
            );
        }
        header(
            "tp_allreduce_seconds",
            "histogram",
            "Mean AllReduce latency of a worker in one step, by transport.",
            o,
        );
        for (transport, h) in self.collective.lock().unwrap().iter() {
            h.render_series(
                "tp_allreduce_seconds",
                &format!("transport=\"{transport}\""),
                o,
            );
        }
        out
    }
}
