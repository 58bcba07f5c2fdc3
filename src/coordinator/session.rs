//! A loaded model on a cluster: prompt processing, generation and perplexity, driven step by
//! step from the coordinator. Workers return, per position, their slice's best candidates and
//! log-sum-exp; merging those is exact for everything sampling needs.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};

use crate::coordinator::blocks::BlockPool;
use crate::coordinator::cluster::{Cluster, LoadSpec};
use crate::coordinator::sampler::SamplingParams;
use crate::coordinator::sequence::{Decoder, SequenceSpec, Stop};
use crate::model::arch::ModelConfig;
use crate::model::chat::ChatTemplate;
use crate::model::gguf::GgufFile;
use crate::model::tokenizer::Tokenizer;
use crate::proto;
use crate::shard::plan::{Plan, plan_stages};
use crate::shard::tensors::shard_weight_bytes;

/// Candidates each worker sends per position unless sampling needs more.
pub const DEFAULT_CANDIDATES: usize = 40;

pub struct Model {
    pub file: GgufFile,
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
}

impl Model {
    pub fn open(path: &std::path::Path) -> anyhow::Result<Model> {
        let file = GgufFile::open(path)?;
        let config = ModelConfig::from_gguf(&file)?;
        let tokenizer = Tokenizer::from_gguf(&file)
            .with_context(|| format!("{}: tokenizer", path.display()))?;
        if tokenizer.vocab_size() != config.vocab_size {
            bail!(
                "{}: tokenizer has {} tokens but the embedding has {} rows",
                path.display(),
                tokenizer.vocab_size(),
                config.vocab_size
            );
        }
        let chat_template = ChatTemplate::from_gguf(&file, &tokenizer)?;
        Ok(Model {
            file,
            config,
            tokenizer,
            chat_template,
        })
    }
}

/// The merged distribution at one position.
#[derive(Clone, Debug)]
pub struct Distribution {
    /// Best candidates over the whole vocabulary, best first (ties: lower id first).
    pub candidates: Vec<(u32, f32)>,
    /// log(sum(exp(logit))) over the whole vocabulary.
    pub log_sum_exp: f32,
    /// Whole logits, when asked for.
    pub full: Option<Vec<f32>>,
}

impl Distribution {
    pub fn logprob(&self, logit: f32) -> f32 {
        logit - self.log_sum_exp
    }
}

pub fn merge_rows(
    replies: &[proto::StepReply],
    row: usize,
    top: usize,
    vocab_size: usize,
    full: bool,
) -> Distribution {
    // Ranks outside the last pipeline stage return no rows.
    let replies: Vec<&proto::StepReply> = replies.iter().filter(|r| !r.rows.is_empty()).collect();
    let mut candidates: Vec<(u32, f32)> = Vec::new();
    let mut max = f32::NEG_INFINITY;
    for r in &replies {
        let out = &r.rows[row];
        candidates.extend(out.ids.iter().copied().zip(out.logits.iter().copied()));
        max = max.max(out.log_sum_exp);
    }
    let sum: f64 = replies
        .iter()
        .map(|r| ((r.rows[row].log_sum_exp - max) as f64).exp())
        .sum();
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    candidates.truncate(top);
    let full = if full {
        let mut full = vec![f32::NEG_INFINITY; vocab_size];
        let mut covered = 0;
        for r in &replies {
            let slice = &r.rows[row].full;
            let start = r.vocab_start as usize;
            if start + slice.len() <= vocab_size {
                full[start..start + slice.len()].copy_from_slice(slice);
                covered += slice.len();
            }
        }
        (covered == vocab_size).then_some(full)
    } else {
        None
    };
    Distribution {
        candidates,
        log_sum_exp: max + sum.ln() as f32,
        full,
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Timings {
    pub prompt_ms: f64,
    pub prompt_tokens_per_second: f64,
    pub generation_ms: f64,
    pub generated_tokens_per_second: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Generation {
    pub prompt_tokens: Vec<u32>,
    /// Generated ids, ending with the end-of-generation token when one stopped generation.
    pub tokens: Vec<u32>,
    pub text: String,
    /// "eos", "stop" (a stop string), "limit" or "cancelled".
    pub stop: &'static str,
    /// Per generated token, the best candidates and their log-probabilities.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    pub timings: Timings,
}

pub struct GenerateRequest<'a> {
    pub prompt_tokens: Vec<u32>,
    pub max_tokens: usize,
    pub params: SamplingParams,
    pub stop_strings: Vec<String>,
    /// Report this many top log-probabilities per generated token (0: none).
    pub logprobs: usize,
    pub on_text: Option<&'a mut (dyn FnMut(&str) + Send)>,
    /// Checked before every step: true stops generation (a client that went away).
    pub cancelled: Option<&'a (dyn Fn() -> bool + Send + Sync)>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Perplexity {
    pub context: usize,
    pub chunks: usize,
    pub scored_tokens: usize,
    pub ppl: f64,
    pub ppl_stderr: f64,
    pub running_ppl: Vec<f64>,
    pub seconds: f64,
}

pub struct Session {
    pub model: Arc<Model>,
    pub cluster: Cluster,
    pub plan: Plan,
    pub max_batch: usize,
    /// Per sequence.
    pub max_context: usize,
    /// KV-cache slots on every worker.
    pub sequences: usize,
    /// The paged KV cache's blocks: which sequence holds which (the same on every worker).
    pub kv: BlockPool,
    /// Per worker: bytes contributed to AllReduces since the session started.
    pub collective_bytes: Vec<u64>,
    /// Summed over steps: the busiest worker's work (compute outside AllReduce) and the
    /// workers' mean. Their ratio says how unevenly the split spreads the work step by step.
    pub work_seconds: WorkSeconds,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct WorkSeconds {
    pub busiest: f64,
    pub mean: f64,
}

/// One forward pass over tokens of any sequences: `tokens[i]` at `positions[i]` of
/// `sequences[i]`, with distributions wanted at `rows` (indices into `tokens`).
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    pub sequences: Vec<u32>,
    pub rows: Vec<u32>,
    /// Candidates per row each worker sends.
    pub top: usize,
    /// Whole logits rows as well.
    pub full_logits: bool,
}

impl Batch {
    pub fn push(&mut self, token: u32, position: usize, sequence: usize, row: bool) {
        if row {
            self.rows.push(self.tokens.len() as u32);
        }
        self.tokens.push(token);
        self.positions.push(position as u32);
        self.sequences.push(sequence as u32);
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// A batch launched on the cluster.
pub struct InFlight {
    pub batch: Batch,
    launched: crate::coordinator::cluster::Launched,
}

/// A launched batch's replies, to hand to `Session::land`.
pub struct Landed {
    batch: Batch,
    number: u64,
    result: anyhow::Result<Vec<proto::StepReply>>,
}

/// What one batched step returned.
pub struct BatchOutput {
    /// One per row of the batch, in its order.
    pub distributions: Vec<Distribution>,
    /// Per worker, in rank order: seconds computing the step, seconds inside AllReduce and
    /// the number of AllReduces.
    pub workers: Vec<WorkerStepTime>,
}

#[derive(Clone, Copy, Debug)]
pub struct WorkerStepTime {
    pub compute_seconds: f64,
    pub collective_seconds: f64,
    pub collectives: u32,
    pub collective_bytes: u64,
}

impl Session {
    pub async fn start(
        model: Model,
        cluster: Cluster,
        max_context: usize,
        max_batch: usize,
    ) -> anyhow::Result<Session> {
        Session::start_with_sequences(model, cluster, max_context, max_batch, 1).await
    }

    /// Loads the model with `sequences` KV-cache slots of `max_context` positions each.
    pub async fn start_with_sequences(
        model: Model,
        cluster: Cluster,
        max_context: usize,
        max_batch: usize,
        sequences: usize,
    ) -> anyhow::Result<Session> {
        let max_context = max_context.min(model.config.context_length);
        cluster
            .cache_types
            .check_head_dim(model.config.head_dim)
            .map_err(anyhow::Error::msg)?;
        let plan = plan_stages(
            &model.config,
            &cluster.weights(),
            cluster.moe_split,
            &cluster.stage_sizes()?,
        )?;
        let sequences = sequences.max(1);
        let kv = pool_for(&model, &cluster, &plan, sequences, max_context)?;
        let mut session = Session {
            model: Arc::new(model),
            cluster,
            plan,
            max_batch,
            max_context,
            sequences,
            kv,
            collective_bytes: Vec::new(),
            work_seconds: WorkSeconds::default(),
        };
        for (rank, reply) in session.load().await?.iter().enumerate() {
            tracing::info!(
                rank,
                weight_mib = format!("{:.1}", reply.weight_bytes as f64 / (1 << 20) as f64),
                kv_mib = format!("{:.1}", reply.kv_cache_bytes as f64 / (1 << 20) as f64),
                seconds = format!("{:.2}", reply.load_seconds),
                "shard loaded"
            );
        }
        Ok(session)
    }

    /// Loads this session's plan on every worker: at start, and again to re-form the cluster.
    async fn load(&mut self) -> anyhow::Result<Vec<proto::LoadShardReply>> {
        let spec = LoadSpec {
            file: &self.model.file,
            plan: &self.plan,
            max_sequences: self.sequences,
            max_context: self.max_context,
            max_batch: self.max_batch,
            kv_block_size: self.kv.page(),
            kv_blocks: self.kv.blocks(),
        };
        // Whatever the workers held is gone or unknown.
        self.kv.forget_all();
        self.cluster.load(&spec).await
    }

    /// Saves the KV of `tokens` (a slot's last conversation, its blocks found by prefix) on
    /// every worker, each its own shard, under `file_name`; returns the tokens saved (those
    /// still cached: the least recently used blocks may have been evicted), the bytes written,
    /// summed over the workers, and the slowest worker's seconds. Runs between steps, with
    /// `sequence` holding no blocks.
    pub async fn save_sequence(
        &mut self,
        sequence: usize,
        tokens: &[u32],
        file_name: &str,
    ) -> anyhow::Result<(usize, u64, f64)> {
        if tokens.is_empty() || tokens.len() > self.max_context || sequence >= self.sequences {
            bail!(
                "cannot save {} positions of slot {sequence} ({} slots of {} positions)",
                tokens.len(),
                self.sequences,
                self.max_context
            );
        }
        let held = self.kv.find(sequence, tokens, tokens.len());
        if held == 0 {
            self.kv.release(sequence, &[]);
            bail!("slot {sequence}'s cache was evicted (other requests needed its blocks)");
        }
        let blocks = self.kv.table(sequence).to_vec();
        let replies = self
            .cluster
            .save_sequence(sequence as u32, &tokens[..held], &blocks, file_name)
            .await;
        self.kv.mark_sent(sequence, replies.is_ok());
        self.kv.release(sequence, &tokens[..held]);
        let replies = replies?;
        Ok((
            held,
            replies.iter().map(|r| r.bytes).sum(),
            replies.iter().map(|r| r.seconds).fold(0.0, f64::max),
        ))
    }

    /// Reads a saved sequence into free KV blocks on every worker and registers them for the
    /// prefix cache; returns the tokens its positions hold, the bytes read (summed) and the
    /// slowest worker's seconds. The workers check their files against their shards; here the
    /// files are checked against each other and the vocabulary. Runs between steps, with
    /// `sequence` holding no blocks.
    pub async fn restore_sequence(
        &mut self,
        sequence: usize,
        file_name: &str,
    ) -> anyhow::Result<(Vec<u32>, u64, f64)> {
        if sequence >= self.sequences {
            bail!("no slot {sequence} ({} slots)", self.sequences);
        }
        let headers = self
            .cluster
            .restore_sequence(sequence as u32, file_name, &[], true)
            .await?;
        let tokens = headers[0].tokens.clone();
        if let Some(rank) = headers.iter().position(|r| r.tokens != tokens) {
            bail!(
                "the workers' files named '{file_name}' hold different sequences (worker 0's and worker {rank}'s): saved at different times?"
            );
        }
        let vocab = self.model.config.vocab_size as u32;
        if let Some(bad) = tokens.iter().find(|&&t| t >= vocab) {
            bail!("'{file_name}' holds token {bad}, outside this model's vocabulary of {vocab}");
        }
        if tokens.is_empty() || tokens.len() > self.max_context {
            bail!(
                "'{file_name}' holds {} positions; this cluster's context is {}",
                tokens.len(),
                self.max_context
            );
        }
        if !self.kv.reserve(sequence, tokens.len()) {
            bail!(
                "the KV cache has {} free blocks of {} positions; '{file_name}' needs {}",
                self.kv.available(),
                self.kv.page(),
                tokens.len().div_ceil(self.kv.page())
            );
        }
        let blocks = self.kv.table(sequence).to_vec();
        let replies = self
            .cluster
            .restore_sequence(sequence as u32, file_name, &blocks, false)
            .await;
        self.kv.mark_sent(sequence, replies.is_ok());
        let checked =
            replies.and_then(
                |replies| match replies.iter().position(|r| r.tokens != tokens) {
                    Some(rank) => bail!(
                        "worker {rank}'s file named '{file_name}' changed while it was restored"
                    ),
                    None => Ok(replies),
                },
            );
        // Registered only once every worker holds them.
        self.kv
            .release(sequence, if checked.is_ok() { &tokens } else { &[] });
        let replies = checked?;
        Ok((
            tokens,
            replies.iter().map(|r| r.bytes).sum(),
            replies.iter().map(|r| r.seconds).fold(0.0, f64::max),
        ))
    }

    /// Whether the cluster must be re-formed before the next step: a step failed, or the
    /// heartbeat found a worker restarted (it holds no shard).
    pub fn needs_recovery(&self) -> bool {
        self.cluster.health.needs_reform()
    }

    /// Re-forms the cluster: fails fast while a worker is missing; once all answer, sends every
    /// worker its shard again. Survivors holding that shard keep their weights and only rebuild
    /// their data plane; a restarted worker loads its shard. The sequences of a failed step are
    /// gone.
    pub async fn recover(&mut self) -> anyhow::Result<()> {
        self.cluster.probe().await?;
        let started = Instant::now();
        tracing::warn!("every worker answers: re-forming the cluster");
        let replies = self.load().await.context("re-forming the cluster")?;
        let loaded: Vec<usize> = (0..replies.len()).filter(|&r| !replies[r].kept).collect();
        tracing::warn!(
            seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
            loaded_shards = ?loaded,
            "cluster re-formed (the other workers kept their shards)"
        );
        Ok(())
    }

    /// One call on the cluster's step, with recovery before it after a failure.
    async fn cluster_step(
        &mut self,
        request: proto::StepRequest,
    ) -> anyhow::Result<Vec<proto::StepReply>> {
        if self.needs_recovery() {
            self.recover().await?;
        }
        let result = self.cluster.step(request).await;
        self.account(&result);
        result
    }

    /// Statistics of a step that came back, or the cluster's health after one that failed.
    fn account(&mut self, result: &anyhow::Result<Vec<proto::StepReply>>) {
        match result {
            Ok(replies) => {
                self.collective_bytes.resize(replies.len(), 0);
                for (total, reply) in self.collective_bytes.iter_mut().zip(replies) {
                    *total += reply.collective_bytes;
                }
                let work = replies
                    .iter()
                    .map(|r| (r.compute_seconds - r.collective_seconds).max(0.0));
                self.work_seconds.busiest += work.clone().fold(0.0, f64::max);
                self.work_seconds.mean += work.sum::<f64>() / replies.len().max(1) as f64;
            }
            Err(e) => {
                self.cluster
                    .health
                    .set_broken(format!("a step failed: {e:#}"));
                // The workers may or may not have applied the step's block tables.
                self.kv.forget_all();
            }
        }
    }

    /// Pipeline stages: how many batches may be in flight at once, each in another stage.
    pub fn in_flight_limit(&self) -> usize {
        self.cluster.in_flight_limit()
    }

    /// The request of one batch, checked against the session's limits; gives its sequences the
    /// KV blocks its positions need (the engine checks there are enough before it builds a
    /// batch) and carries their tables' changes.
    fn batch_request(&mut self, batch: &Batch) -> anyhow::Result<proto::StepRequest> {
        if batch.is_empty() || batch.len() > self.max_batch {
            bail!(
                "a batch of {} tokens is empty or over the maximum of {}",
                batch.len(),
                self.max_batch
            );
        }
        for (&p, &s) in batch.positions.iter().zip(&batch.sequences) {
            if p as usize >= self.max_context || s as usize >= self.sequences {
                bail!(
                    "position {p} of sequence {s} is outside {} sequences of {} positions",
                    self.sequences,
                    self.max_context
                );
            }
        }
        let tables = self.reserve(&batch.sequences, &batch.positions)?;
        Ok(proto::StepRequest {
            step: 0,
            tokens: batch.tokens.clone(),
            positions: batch.positions.clone(),
            sequences: batch.sequences.clone(),
            output_rows: batch.rows.clone(),
            top_k: batch.top as u32,
            full_logits: batch.full_logits,
            targets: Vec::new(),
            after_step: 0,
            tables,
        })
    }

    /// Gives each (sequence, position) a KV block; returns the tables' changes to send.
    fn reserve(
        &mut self,
        sequences: &[u32],
        positions: &[u32],
    ) -> anyhow::Result<Vec<proto::BlockTable>> {
        for (&s, &p) in sequences.iter().zip(positions) {
            if !self.kv.reserve(s as usize, p as usize + 1) {
                bail!(
                    "the KV cache is full: position {p} of sequence {s} finds none of its {} \
                     blocks free",
                    self.kv.blocks()
                );
            }
        }
        Ok(self.kv.updates(sequences))
    }

    /// The batch's distributions from its replies.
    fn batch_output(&self, batch: &Batch, replies: &[proto::StepReply]) -> BatchOutput {
        let vocab_size = self.model.config.vocab_size;
        let distributions = (0..batch.rows.len())
            .map(|i| merge_rows(replies, i, batch.top, vocab_size, batch.full_logits))
            .collect();
        let workers = replies
            .iter()
            .map(|r| WorkerStepTime {
                compute_seconds: r.compute_seconds,
                collective_seconds: r.collective_seconds,
                collectives: r.collectives,
                collective_bytes: r.collective_bytes,
            })
            .collect();
        BatchOutput {
            distributions,
            workers,
        }
    }

    /// Runs one batch mixing any sequences' tokens (continuous batching).
    pub async fn step(&mut self, batch: &Batch) -> anyhow::Result<BatchOutput> {
        if self.needs_recovery() {
            self.recover().await?;
        }
        let request = self.batch_request(batch)?;
        let replies = self.cluster_step(request).await?;
        Ok(self.batch_output(batch, &replies))
    }

    /// Starts one batch without waiting for it (pipelining: up to `in_flight_limit` at once).
    /// A cluster that must re-form refuses: the caller re-forms it (`recover`) with nothing in
    /// flight, knowing that the workers' KV caches are then gone.
    pub async fn launch(&mut self, batch: Batch) -> anyhow::Result<InFlight> {
        let request = self.batch_request(&batch)?;
        if self.needs_recovery() {
            bail!(
                "the cluster must re-form before the next step (a worker restarted or a step failed)"
            );
        }
        let launched = self.cluster.launch(request).await?;
        Ok(InFlight { batch, launched })
    }

    /// Waits for a launched batch's replies. Not `&mut self`: several are awaited together.
    pub async fn replies(flight: InFlight) -> Landed {
        let result = flight
            .launched
            .replies
            .await
            .unwrap_or_else(|e| Err(e.into()));
        Landed {
            batch: flight.batch,
            number: flight.launched.number,
            result,
        }
    }

    /// The outcome of a batch that came back.
    pub fn land(&mut self, landed: Landed) -> (Batch, anyhow::Result<BatchOutput>) {
        self.cluster.landed(landed.number, landed.result.is_ok());
        self.account(&landed.result);
        let output = landed
            .result
            .map(|replies| self.batch_output(&landed.batch, &replies));
        (landed.batch, output)
    }

    /// Runs `tokens` at positions `start..` of sequence 0 and returns the distributions at `rows`
    /// (indices into `tokens`).
    async fn forward(
        &mut self,
        tokens: &[u32],
        start: usize,
        rows: &[usize],
        top: usize,
        full_logits: bool,
        targets: &[u32],
    ) -> anyhow::Result<Vec<(Distribution, Option<f32>)>> {
        if start + tokens.len() > self.max_context {
            bail!(
                "{} tokens at position {start} exceed the context of {}",
                tokens.len(),
                self.max_context
            );
        }
        let mut results = Vec::with_capacity(rows.len());
        for (chunk_index, chunk) in tokens.chunks(self.max_batch).enumerate() {
            let offset = chunk_index * self.max_batch;
            let wanted: Vec<usize> = rows
                .iter()
                .copied()
                .filter(|&r| r >= offset && r < offset + chunk.len())
                .collect();
            let positions: Vec<u32> = (0..chunk.len())
                .map(|i| (start + offset + i) as u32)
                .collect();
            let sequences = vec![0; chunk.len()];
            if self.needs_recovery() {
                self.recover().await?;
            }
            let tables = self.reserve(&sequences, &positions)?;
            let request = proto::StepRequest {
                step: 0,
                tokens: chunk.to_vec(),
                positions,
                sequences,
                tables,
                output_rows: wanted.iter().map(|&r| (r - offset) as u32).collect(),
                top_k: top as u32,
                full_logits,
                targets: wanted
                    .iter()
                    .filter_map(|&r| targets.get(rows.iter().position(|&x| x == r)?))
                    .copied()
                    .collect(),
                after_step: 0,
            };
            let replies = self.cluster_step(request).await?;
            for (i, _) in wanted.iter().enumerate() {
                let distribution =
                    merge_rows(&replies, i, top, self.model.config.vocab_size, full_logits);
                let target = replies
                    .iter()
                    .find_map(|r| r.rows.get(i).and_then(|row| row.target_logit));
                results.push((distribution, target));
            }
        }
        Ok(results)
    }

    /// Empties the KV cache of sequence 0: its blocks go back to the pool, and the next step
    /// sends its table whole, which replaces what the workers hold (no call of its own).
    pub async fn clear(&mut self) -> anyhow::Result<()> {
        self.kv.release(0, &[]);
        self.kv.mark_sent(0, false);
        Ok(())
    }

    /// Runs `tokens` at positions `start..` of sequence 0, asking only for the last row's top
    /// token (what a benchmark or a cache fill needs).
    pub async fn process(&mut self, tokens: &[u32], start: usize) -> anyhow::Result<()> {
        if tokens.is_empty() {
            return Ok(());
        }
        self.forward(tokens, start, &[tokens.len() - 1], 1, false, &[])
            .await?;
        Ok(())
    }

    /// The distributions at `rows` of `tokens` (run from an empty cache), with `top` candidates each.
    pub async fn distributions(
        &mut self,
        tokens: &[u32],
        rows: &[usize],
        top: usize,
    ) -> anyhow::Result<Vec<Distribution>> {
        self.clear().await?;
        Ok(self
            .forward(tokens, 0, rows, top, false, &[])
            .await?
            .into_iter()
            .map(|(d, _)| d)
            .collect())
    }

    /// Whole logits at the last of `tokens`, run from an empty cache.
    pub async fn final_logits(&mut self, tokens: &[u32]) -> anyhow::Result<Vec<f32>> {
        if tokens.is_empty() {
            bail!("no tokens");
        }
        self.clear().await?;
        let mut results = self
            .forward(tokens, 0, &[tokens.len() - 1], 1, true, &[])
            .await?;
        results
            .pop()
            .and_then(|(d, _)| d.full)
            .context("workers returned no logits")
    }

    pub async fn generate(
        &mut self,
        mut request: GenerateRequest<'_>,
    ) -> anyhow::Result<Generation> {
        let prompt = request.prompt_tokens.clone();
        if prompt.is_empty() {
            bail!("the prompt is empty");
        }
        if prompt.len() + request.max_tokens > self.max_context {
            bail!(
                "{} prompt tokens + {} to generate exceed the context of {}",
                prompt.len(),
                request.max_tokens,
                self.max_context
            );
        }
        let mut decoder = Decoder::new(
            SequenceSpec {
                max_tokens: request.max_tokens,
                params: request.params.clone(),
                stop_strings: request.stop_strings.clone(),
                top_logprobs: request.logprobs,
            },
            &prompt,
        )?;
        let (candidates, full) = (decoder.candidates(), decoder.needs_full_logits());
        let mut tokens = Vec::new();
        let mut top_logprobs = Vec::new();
        self.clear().await?;

        let prompt_started = Instant::now();
        let mut next = self
            .forward(&prompt, 0, &[prompt.len() - 1], candidates, full, &[])
            .await?;
        let prompt_ms = prompt_started.elapsed().as_secs_f64() * 1e3;
        let generation_started = Instant::now();
        let stop = loop {
            if request.cancelled.is_some_and(|cancelled| cancelled()) {
                break Stop::Cancelled;
            }
            let (distribution, _) = next.pop().context("no logits returned")?;
            let sampled = decoder.next(&distribution, &self.model.tokenizer)?;
            if request.logprobs > 0 {
                top_logprobs.push(sampled.top);
            }
            tokens.push(sampled.token);
            if let Some(on_text) = request.on_text.as_mut()
                && !sampled.text.is_empty()
            {
                on_text(&sampled.text);
            }
            if let Some(stop) = sampled.stop {
                break stop;
            }
            let position = prompt.len() + tokens.len() - 1;
            next = self
                .forward(&[sampled.token], position, &[0], candidates, full, &[])
                .await?;
        };
        let generation_ms = generation_started.elapsed().as_secs_f64() * 1e3;
        let per_second = |n: usize, ms: f64| if ms > 0.0 { n as f64 * 1e3 / ms } else { 0.0 };
        Ok(Generation {
            prompt_tokens: prompt.clone(),
            timings: Timings {
                prompt_ms,
                prompt_tokens_per_second: per_second(prompt.len(), prompt_ms),
                generation_ms,
                // The first token came from prompt processing; the rest from decode steps.
                generated_tokens_per_second: per_second(
                    tokens.len().saturating_sub(1),
                    generation_ms,
                ),
            },
            tokens,
            text: decoder.text().to_string(),
            stop: stop.name(),
            top_logprobs,
        })
    }

    /// Perplexity as llama.cpp's `llama-perplexity` computes it: non-overlapping chunks of
    /// `context` tokens, each from an empty cache, scoring the second half of each chunk.
    pub async fn perplexity(
        &mut self,
        tokens: &[u32],
        context: usize,
        max_chunks: Option<usize>,
        mut on_chunk: impl FnMut(usize, f64),
    ) -> anyhow::Result<Perplexity> {
        if context < 4 || context > self.max_context {
            bail!("context {context} must be within 4..={}", self.max_context);
        }
        let mut chunks = tokens.len() / context;
        if chunks == 0 {
            bail!(
                "the text has {} tokens, fewer than one chunk of {context}",
                tokens.len()
            );
        }
        if let Some(max) = max_chunks {
            chunks = chunks.min(max);
        }
        let started = Instant::now();
        let first = context / 2;
        let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
        let mut running = Vec::new();
        // llama-perplexity starts every chunk with BOS where the vocabulary adds one.
        let bos = self
            .model
            .tokenizer
            .add_bos()
            .then(|| self.model.tokenizer.bos_id())
            .flatten();
        let mut window = Vec::with_capacity(context);
        for chunk in 0..chunks {
            window.clear();
            window.extend_from_slice(&tokens[chunk * context..(chunk + 1) * context]);
            if let Some(bos) = bos {
                window[0] = bos;
            }
            let window = &window[..];
            self.clear().await?;
            let rows: Vec<usize> = (first..context - 1).collect();
            let targets: Vec<u32> = rows.iter().map(|&j| window[j + 1]).collect();
            let results = self.forward(window, 0, &rows, 0, false, &targets).await?;
            for (distribution, target) in results {
                let logit = target.context("no worker returned the target's logit")?;
                let loss = -(distribution.logprob(logit) as f64);
                nll += loss;
                nll2 += loss * loss;
                count += 1;
            }
            let ppl = (nll / count as f64).exp();
            running.push(ppl);
            on_chunk(chunk, ppl);
        }
        let mean = nll / count as f64;
        let variance = (nll2 / count as f64 - mean * mean).max(0.0);
        let stderr = (variance / (count as f64 - 1.0).max(1.0)).sqrt();
        let ppl = mean.exp();
        Ok(Perplexity {
            context,
            chunks,
            scored_tokens: count,
            ppl,
            ppl_stderr: stderr * ppl,
            running_ppl: running,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// The KV block pool of a session: `--kv-block-size` positions per block, as many blocks as
/// `--kv-budget` buys on the rank whose positions take the most bytes (a share of available
/// memory counts, per worker, its host's available memory split among the workers on it, less
/// the shard's weights), or room for every sequence's whole context without a budget.
fn pool_for(
    model: &Model,
    cluster: &Cluster,
    plan: &Plan,
    sequences: usize,
    context: usize,
) -> anyhow::Result<BlockPool> {
    let config = &model.config;
    let heads = |r: &crate::shard::plan::RankShard| -> Vec<usize> {
        r.layers.iter().map(|l| l.kv_heads.len()).collect()
    };
    let per_position: Vec<u64> = plan
        .ranks
        .iter()
        .map(|r| {
            cluster
                .cache_types
                .bytes_per_position(&heads(r), config.head_dim)
        })
        .collect();
    let shares = cluster.host_shares();
    let available: Vec<u64> = plan
        .ranks
        .iter()
        .map(|r| {
            let (memory, sharing) = shares[r.rank_index];
            (memory / sharing.max(1) as u64).saturating_sub(shard_weight_bytes(
                &model.file,
                config,
                r,
            ))
        })
        .collect();
    let blocks = cluster
        .kv
        .pool_blocks(&per_position, &available, sequences, context)
        .map_err(anyhow::Error::msg)?;
    Ok(BlockPool::new(blocks, cluster.kv.block_size, sequences))
}
