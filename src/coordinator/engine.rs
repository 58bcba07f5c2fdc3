//! Continuous batching: the server's requests share the cluster's sequence slots (`--parallel`).
//!
//! Between forward passes, waiting requests take free slots and finished or abandoned ones
//! leave. Each pass carries one token for every sequence that is generating, then as many
//! prompt tokens of sequences still reading their prompt as the batch has room for (at most
//! `chunk` while others generate, so long prompts do not stall their streams). Rows are
//! independent in every kernel, so a sequence's tokens do not depend on its batch-mates.
//!
//! KV memory is a pool of blocks (`coordinator::blocks`): a request starts only when the pool
//! can hold its prompt (beyond the blocks it shares with cached prefixes), and waits in arrival
//! order otherwise. A generating sequence takes a block each time it crosses one; when none is
//! left and nothing is in flight, the most recently started sequence gives its blocks back and
//! waits, to be recomputed from its tokens when blocks free up (vLLM's preemption by
//! recomputation): no request fails for want of KV memory.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::coordinator::metrics::Metrics;
use crate::coordinator::sequence::{Decoder, Sampled, SequenceSpec, Stop};
use crate::coordinator::session::{Batch, Session};

/// A request for the engine.
pub struct Job {
    pub prompt: Vec<u32>,
    pub spec: SequenceSpec,
    /// Where the job's events go; a closed channel (the client went away) cancels it.
    pub events: mpsc::UnboundedSender<JobEvent>,
    /// When the server accepted it, for the time to first token.
    pub accepted: Instant,
    /// Another choice of the request before it (`n > 1`), with the same prompt: it starts once
    /// that one's prompt is in a batch, so that it shares the prompt's KV blocks.
    pub follows: bool,
}

/// What the engine is asked to do: generate, or act on a sequence slot's KV cache.
pub enum Work {
    Generate(Job),
    Slot(SlotJob),
}

/// `POST /slots/{id}?action=...`: run between steps, on a slot no request holds.
pub struct SlotJob {
    pub slot: usize,
    pub action: SlotAction,
    pub reply: tokio::sync::oneshot::Sender<Result<SlotOutcome, String>>,
}

pub enum SlotAction {
    /// Save what the slot's KV cache holds under a file name, on every worker.
    Save(String),
    /// Read a saved sequence into the slot: the next prompt starting with its tokens reuses
    /// them (the prefix cache).
    Restore(String),
    /// Forget what the slot holds.
    Erase,
}

pub struct SlotOutcome {
    /// Tokens saved, restored or erased.
    pub tokens: usize,
    /// Bytes written or read, summed over the workers.
    pub bytes: u64,
    pub seconds: f64,
}

pub enum JobEvent {
    Token(Sampled),
    Done {
        stop: Stop,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
}

/// How often an idle engine tries to re-form a cluster that lost a worker.
const RECOVERY_POLL: std::time::Duration = std::time::Duration::from_millis(200);

pub struct EngineOptions {
    /// Prompt tokens per forward pass while other sequences are generating.
    pub chunk: usize,
    /// Reuse what a free slot's KV cache holds when a prompt starts with it (`--no-prefix-cache`
    /// turns it off).
    pub prefix_cache: bool,
}

/// What a slot's last conversation left in the KV cache: its tokens, whose blocks stay cached
/// (shared with any prompt that starts the same way) until the pool needs them.
#[derive(Default)]
struct SlotMemory {
    tokens: Vec<u32>,
}

/// A job holding a sequence slot.
struct Active {
    job: Job,
    sequence: usize,
    /// Prompt tokens already run.
    fed: usize,
    decoder: Decoder,
    /// The last sampled token, to run in the next pass.
    pending: Option<u32>,
    last_token_at: Option<Instant>,
    /// A batch with this sequence's tokens is in flight: it waits for that batch.
    busy: bool,
    /// Every token run for this sequence so far, by position: what its KV blocks hold.
    history: Vec<u32>,
    /// Order of starting (the most recent gives its blocks back first).
    started: u64,
    /// Gave its KV blocks back (or lost them to a re-formed cluster): waits for blocks, then
    /// runs its tokens again.
    parked: bool,
    /// After parking with tokens generated: the tokens to run again before `pending` (the
    /// prompt and what was generated), without output rows.
    replay: Vec<u32>,
    /// No KV block for the next token this round.
    stalled: bool,
}

impl Active {
    /// Position of `pending` in the sequence.
    fn position(&self) -> usize {
        self.job.prompt.len() + self.decoder.generated() - 1
    }

    /// The tokens read before generating: the prompt, or after parking, everything to replay.
    fn source(&self) -> &[u32] {
        if self.replay.is_empty() {
            &self.job.prompt
        } else {
            &self.replay
        }
    }

    /// Generating now: every token before `pending` has been run.
    fn generating(&self) -> bool {
        self.pending.is_some() && self.replay.is_empty()
    }

    /// Gives the sequence's blocks back (keeping them cached under its tokens) and parks it.
    fn park(&mut self, session: &mut Session) {
        session.kv.release(self.sequence, &self.history);
        if self.pending.is_some() && self.replay.is_empty() {
            self.replay = std::mem::take(&mut self.history);
        }
        self.history.clear();
        self.fed = 0;
        self.parked = true;
        self.stalled = false;
    }

    /// Takes blocks for a parked sequence's tokens (sharing what is cached), leaving at least
    /// `headroom` available; false, holding nothing, when the pool has too few.
    fn unpark(&mut self, session: &mut Session, headroom: usize) -> bool {
        let source = self.source().to_vec();
        // A prompt's last token runs again for its logits; replayed tokens need none.
        let limit = if self.replay.is_empty() {
            source.len() - 1
        } else {
            source.len()
        };
        let reused = session.kv.attach(self.sequence, &source, limit);
        if !session.kv.reserve(self.sequence, source.len()) || session.kv.available() < headroom {
            session.kv.release(self.sequence, &source[..reused]);
            return false;
        }
        self.fed = reused;
        self.history = source[..reused].to_vec();
        self.parked = false;
        self.end_replay();
        true
    }

    /// A replay that has run every token is over: the sequence generates again.
    fn end_replay(&mut self) {
        if !self.replay.is_empty() && self.fed == self.replay.len() {
            self.replay.clear();
            self.fed = self.job.prompt.len();
        }
    }
}

/// A batch in flight: the slots of its output rows, in row order, and every slot it carries.
struct Flight {
    owners: Vec<usize>,
    members: Vec<usize>,
    started: Instant,
}

/// Runs jobs until every sender of `jobs` is gone and the last job has finished; returns the
/// session.
///
/// With pipeline stages, up to one batch per stage is in flight, each from other sequences:
/// while stage k works on one batch, stage k+1 works on the one before. Generating sequences
/// are dealt into as many batches as there are stages; a lone sequence still works, its
/// batches taking the stages in turn.
pub async fn run(
    mut session: Session,
    mut jobs: mpsc::UnboundedReceiver<Work>,
    metrics: Arc<Metrics>,
    options: EngineOptions,
) -> Session {
    let slots = session.sequences;
    metrics.slots.store(slots, Ordering::Relaxed);
    let mut free: Vec<usize> = (0..slots).rev().collect();
    let mut memory: Vec<SlotMemory> = (0..slots).map(|_| SlotMemory::default()).collect();
    session.kv.set_sharing(options.prefix_cache);
    metrics
        .kv_blocks
        .store(session.kv.blocks(), Ordering::Relaxed);
    let mut started = 0u64;
    // The request at the head of the queue was counted as waiting for KV blocks.
    let mut head_waits = false;
    let mut active: Vec<Active> = Vec::new();
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut slot_jobs: VecDeque<SlotJob> = VecDeque::new();
    let transport = match session.cluster.active_transport() {
        Some(t) if session.cluster.weights().len() > 1 => t.name(),
        _ => "none",
    };
    metrics
        .stages
        .store(session.in_flight_limit(), Ordering::Relaxed);
    *metrics.rank_stage.lock().unwrap() =
        session.plan.ranks.iter().map(|r| r.stage.index).collect();
    let mut flights: HashMap<u64, Flight> = HashMap::new();
    let mut in_flight = tokio::task::JoinSet::new();
    let mut next_flight = 0u64;
    loop {
        // A worker restarted (or a step failed): the KV caches hold nothing reusable.
        if session.needs_recovery() {
            memory.iter_mut().for_each(|m| m.tokens.clear());
        }
        metrics
            .kv_blocks_free
            .store(session.kv.available(), Ordering::Relaxed);
        // Take in what arrived; block only when there is nothing to run.
        while let Ok(work) = jobs.try_recv() {
            match work {
                Work::Generate(job) => waiting.push_back(job),
                Work::Slot(job) => slot_jobs.push_back(job),
            }
        }
        if active.is_empty() && waiting.is_empty() && in_flight.is_empty() && slot_jobs.is_empty() {
            let job = if session.needs_recovery() {
                // Re-form as soon as every worker answers, not at the next request: /health
                // says 503 until then, so a load balancer would never send that request.
                tokio::select! {
                    job = jobs.recv() => job,
                    _ = tokio::time::sleep(RECOVERY_POLL) => {
                        if let Err(e) = session.recover().await {
                            tracing::debug!("not re-formed yet: {e:#}");
                        }
                        continue;
                    }
                }
            } else {
                jobs.recv().await
            };
            match job {
                Some(Work::Generate(job)) => waiting.push_back(job),
                Some(Work::Slot(job)) => slot_jobs.push_back(job),
                None => break,
            }
        }
        // Leave: clients that went away (once no batch of theirs is in flight).
        active.retain_mut(|a| {
            let gone = !a.busy && a.job.events.is_closed();
            if gone {
                metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                metrics
                    .completion_tokens
                    .fetch_add(a.decoder.generated() as u64, Ordering::Relaxed);
                session.kv.release(a.sequence, &a.history);
                memory[a.sequence] = SlotMemory {
                    tokens: std::mem::take(&mut a.history),
                };
                free.push(a.sequence);
            }
            !gone
        });
        waiting.retain(|job| {
            let gone = job.events.is_closed();
            if gone {
                metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            !gone
        });
        if waiting.is_empty() {
            head_waits = false;
        }
        // Slot actions, between steps (a restore lands before the requests waiting now).
        if in_flight.is_empty() {
            for job in std::mem::take(&mut slot_jobs) {
                let outcome = slot_action(&mut session, &active, &mut memory, &job).await;
                let _ = job.reply.send(outcome);
            }
        }
        // Parked sequences take blocks again first, oldest first.
        // Not while a sequence waits for its next block (it would take them back at once);
        // each leaves a block per generating sequence free, so that they do not park again.
        let mut parked: Vec<usize> = (0..active.len()).filter(|&i| active[i].parked).collect();
        parked.sort_by_key(|&i| active[i].started);
        if !active.iter().any(|a| a.stalled) {
            for i in parked {
                let headroom = active.iter().filter(|a| a.generating()).count();
                if !active[i].unpark(&mut session, headroom) {
                    break;
                }
            }
        }
        // Join: waiting jobs take free slots in arrival order, once the pool holds their
        // prompts (beyond what they share with cached prefixes).
        while !free.is_empty()
            && !active.iter().any(|a| a.parked)
            && let Some(job) = waiting.pop_front()
        {
            let sibling_reading = job.follows
                && active
                    .iter()
                    .any(|a| a.job.prompt == job.prompt && a.fed < a.job.prompt.len());
            if sibling_reading {
                waiting.push_front(job);
                break;
            }
            if job.prompt.is_empty() {
                let _ = job
                    .events
                    .send(JobEvent::Failed("the prompt has no tokens".into()));
                continue;
            }
            let decoder = match Decoder::new(job.spec.clone(), &job.prompt) {
                Ok(decoder) => decoder,
                Err(e) => {
                    let _ = job.events.send(JobEvent::Failed(format!("{e:#}")));
                    continue;
                }
            };
            let sequence = *free.last().expect("a free slot");
            let reused = session
                .kv
                .attach(sequence, &job.prompt, job.prompt.len() - 1);
            let headroom = active.iter().filter(|a| a.generating()).count();
            if !session.kv.reserve(sequence, job.prompt.len()) || session.kv.available() < headroom
            {
                session.kv.release(sequence, &job.prompt[..reused]);
                if !head_waits {
                    metrics.waited_for_kv.fetch_add(1, Ordering::Relaxed);
                    head_waits = true;
                }
                waiting.push_front(job);
                break;
            }
            head_waits = false;
            free.pop();
            metrics
                .prompt_tokens_cached
                .fetch_add(reused as u64, Ordering::Relaxed);
            started += 1;
            active.push(Active {
                sequence,
                history: job.prompt[..reused].to_vec(),
                job,
                fed: reused,
                decoder,
                pending: None,
                last_token_at: None,
                busy: false,
                started,
                parked: false,
                replay: Vec::new(),
                stalled: false,
            });
        }
        metrics.kv_waiting.store(
            active.iter().filter(|a| a.parked).count() + usize::from(head_waits),
            Ordering::Relaxed,
        );
        metrics.busy.store(active.len(), Ordering::Relaxed);

        // A worker restarted while the engine waited: re-form before running anything. Its KV
        // cache is gone (the others' too, for all the engine knows): prompts start again,
        // sequences that had generated fail.
        if in_flight.is_empty() && session.needs_recovery() {
            memory.iter_mut().for_each(|m| m.tokens.clear());
            let recovered = session.recover().await;
            // The pool was forgotten with the workers' caches: nothing to release.
            session.kv.forget_all();
            for a in std::mem::take(&mut active) {
                let restart = recovered.is_ok() && a.decoder.generated() == 0;
                if restart {
                    active.push(Active {
                        fed: 0,
                        history: Vec::new(),
                        parked: true,
                        ..a
                    });
                    continue;
                }
                let why = match &recovered {
                    Ok(()) => "the cluster re-formed (a worker restarted) and this sequence's cache is gone".to_string(),
                    Err(e) => format!("{e:#}"),
                };
                let _ = a.job.events.send(JobEvent::Failed(why));
                free.push(a.sequence);
            }
            metrics.busy.store(active.len(), Ordering::Relaxed);
            if recovered.is_err() {
                continue;
            }
        }
        // A block for the next token of each generating sequence.
        for a in active.iter_mut().filter(|a| !a.busy && !a.parked) {
            a.stalled = a.generating() && !session.kv.reserve(a.sequence, a.position() + 1);
        }
        // Launch: a batch per free stage, from sequences not already in flight.
        let limit = session.in_flight_limit();
        let generating = active.iter().filter(|a| a.generating()).count();
        let share = generating.div_ceil(limit).max(1);
        let mut failed = None;
        // A slot action waits for the batches in flight to land: none is launched meanwhile.
        while in_flight.len() < limit && slot_jobs.is_empty() {
            let (batch, owners, members) =
                build_batch(&mut active, session.max_batch, options.chunk, share);
            if batch.is_empty() {
                break;
            }
            for &i in &members {
                active[i].busy = true;
                // Blocks these tokens fill are shared from now on: later steps run after.
                session
                    .kv
                    .register_full(active[i].sequence, &active[i].history);
            }
            let slot_of = |i: &usize| active[*i].sequence;
            let flight = Flight {
                owners: owners.iter().map(slot_of).collect(),
                members: members.iter().map(slot_of).collect(),
                started: Instant::now(),
            };
            match session.launch(batch).await {
                Ok(launched) => {
                    if !in_flight.is_empty() {
                        metrics.pipelined_launches.fetch_add(1, Ordering::Relaxed);
                    }
                    let id = next_flight;
                    next_flight += 1;
                    flights.insert(id, flight);
                    in_flight.spawn(async move { (id, Session::replies(launched).await) });
                }
                Err(e) => {
                    for slot in flight.members {
                        if let Some(a) = active.iter_mut().find(|a| a.sequence == slot) {
                            a.busy = false;
                        }
                    }
                    failed = Some(format!("{e:#}"));
                    break;
                }
            }
        }
        metrics.in_flight.store(in_flight.len(), Ordering::Relaxed);
        if failed.is_none() && in_flight.is_empty() {
            // Nothing could run for want of KV blocks: the most recently started sequence
            // gives its blocks back (the oldest alone always fits: the pool holds a context).
            if slot_jobs.is_empty()
                && active.iter().any(|a| a.stalled)
                && let Some(victim) = active
                    .iter_mut()
                    .filter(|a| !a.parked)
                    .max_by_key(|a| a.started)
            {
                victim.park(&mut session);
                metrics.preempted.fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }

        // Land: the next batch back.
        let failure = match failed {
            Some(message) => Some(message),
            None => {
                let (id, landed) = in_flight
                    .join_next()
                    .await
                    .expect("a batch in flight")
                    .expect("the waiting task does not panic");
                metrics.in_flight.store(in_flight.len(), Ordering::Relaxed);
                let flight = flights.remove(&id).expect("launched");
                let (batch, output) = session.land(landed);
                match output {
                    Ok(output) => {
                        let worker_times: Vec<(f64, f64, u32)> = output
                            .workers
                            .iter()
                            .map(|w| (w.compute_seconds, w.collective_seconds, w.collectives))
                            .collect();
                        metrics.observe_step(transport, &worker_times);
                        tracing::trace!(
                            tokens = batch.len(),
                            rows = flight.owners.len(),
                            ms = flight.started.elapsed().as_secs_f64() * 1e3,
                            "step"
                        );
                        for slot in &flight.members {
                            if let Some(a) = active.iter_mut().find(|a| a.sequence == *slot) {
                                a.busy = false;
                            }
                        }
                        for (slot, history) in deliver(
                            &mut active,
                            &mut free,
                            &flight.owners,
                            output.distributions,
                            &session,
                            &metrics,
                        ) {
                            session.kv.release(slot, &history);
                            memory[slot] = SlotMemory { tokens: history };
                        }
                        None
                    }
                    Err(e) => Some(format!("{e:#}")),
                }
            }
        };
        if let Some(message) = failure {
            // The step is lost for every sequence; the others in flight fail with it (the
            // workers abort them). Wait for them all, so that the cluster is re-formed with
            // nothing running.
            while let Some(Ok((id, landed))) = in_flight.join_next().await {
                flights.remove(&id);
                let _ = session.land(landed);
            }
            tracing::warn!(error = %message, sequences = active.len(), "step failed");
            metrics.busy.store(0, Ordering::Relaxed);
            memory.iter_mut().for_each(|m| m.tokens.clear());
            session.kv.forget_all();
            for a in active.drain(..) {
                let _ = a.job.events.send(JobEvent::Failed(message.clone()));
                free.push(a.sequence);
            }
            continue;
        }
        metrics.busy.store(active.len(), Ordering::Relaxed);
    }
    metrics.busy.store(0, Ordering::Relaxed);
    session
}

/// Runs one slot action on a slot no request holds.
async fn slot_action(
    session: &mut Session,
    active: &[Active],
    memory: &mut [SlotMemory],
    job: &SlotJob,
) -> Result<SlotOutcome, String> {
    let slot = job.slot;
    if slot >= memory.len() {
        return Err(format!("no slot {slot}: this server has {}", memory.len()));
    }
    if active.iter().any(|a| a.sequence == slot) {
        return Err(format!("slot {slot} is busy with a request"));
    }
    if session.needs_recovery() {
        return Err("the cluster is re-forming (a worker restarted); try again".into());
    }
    match &job.action {
        SlotAction::Save(name) => {
            let tokens = &memory[slot].tokens;
            if tokens.is_empty() {
                return Err(format!("slot {slot} holds nothing to save"));
            }
            let (saved, bytes, seconds) = session
                .save_sequence(slot, tokens, name)
                .await
                .map_err(|e| format!("{e:#}"))?;
            Ok(SlotOutcome {
                tokens: saved,
                bytes,
                seconds,
            })
        }
        SlotAction::Restore(name) => {
            // Whatever the slot held is being overwritten: forget it first, so that a failed
            // restore leaves nothing the prefix cache would trust.
            memory[slot].tokens.clear();
            let (tokens, bytes, seconds) = session
                .restore_sequence(slot, name)
                .await
                .map_err(|e| format!("{e:#}"))?;
            let count = tokens.len();
            memory[slot].tokens = tokens;
            Ok(SlotOutcome {
                tokens: count,
                bytes,
                seconds,
            })
        }
        SlotAction::Erase => {
            let count = std::mem::take(&mut memory[slot].tokens).len();
            Ok(SlotOutcome {
                tokens: count,
                bytes: 0,
                seconds: 0.0,
            })
        }
    }
}

/// Samples each output row's token for its sequence (`owners`: slots, in row order) and
/// tells its client; sequences that finished leave their slots, returned with what their KV
/// caches hold.
fn deliver(
    active: &mut Vec<Active>,
    free: &mut Vec<usize>,
    owners: &[usize],
    distributions: Vec<crate::coordinator::session::Distribution>,
    session: &Session,
    metrics: &Metrics,
) -> Vec<(usize, Vec<u32>)> {
    let mut finished = Vec::new();
    for (mut distribution, &slot) in distributions.into_iter().zip(owners) {
        let Some(owner) = active.iter().position(|a| a.sequence == slot) else {
            continue;
        };
        let a = &mut active[owner];
        if !a.decoder.needs_full_logits() {
            // Another sequence asked for whole rows; this one samples from candidates.
            distribution.full = None;
        }
        let sampled = match a.decoder.next(&distribution, &session.model.tokenizer) {
            Ok(s) => s,
            Err(e) => {
                metrics.busy.fetch_sub(1, Ordering::Relaxed);
                let _ = a.job.events.send(JobEvent::Failed(format!("{e:#}")));
                finished.push(owner);
                continue;
            }
        };
        let now = Instant::now();
        match a.last_token_at {
            None => metrics
                .time_to_first_token
                .lock()
                .unwrap()
                .observe((now - a.job.accepted).as_secs_f64()),
            Some(last) => metrics
                .inter_token_latency
                .lock()
                .unwrap()
                .observe((now - last).as_secs_f64()),
        }
        a.last_token_at = Some(now);
        let stop = sampled.stop;
        a.pending = Some(sampled.token);
        let _ = a.job.events.send(JobEvent::Token(sampled));
        if let Some(stop) = stop {
            metrics
                .completion_tokens
                .fetch_add(a.decoder.generated() as u64, Ordering::Relaxed);
            // The slot is free before the client hears it is done, so that /metrics read
            // after the answer never counts it busy.
            metrics.busy.fetch_sub(1, Ordering::Relaxed);
            let _ = a.job.events.send(JobEvent::Done {
                stop,
                prompt_tokens: a.job.prompt.len(),
                completion_tokens: a.decoder.generated(),
            });
            finished.push(owner);
        }
    }
    finished.sort_unstable();
    finished.dedup();
    let mut left = Vec::with_capacity(finished.len());
    for &index in finished.iter().rev() {
        let a = active.remove(index);
        free.push(a.sequence);
        left.push((a.sequence, a.history));
    }
    left
}

/// The next forward pass from sequences not in flight (nor parked, nor waiting for a block):
/// one token per generating sequence (at most `share` of them), then prompt chunks (or tokens
/// replayed after parking). Returns the batch, per output row the index of its sequence in
/// `active`, and the indices of every sequence with tokens in it. Prompt tokens put in the
/// batch count as run (a failed pass ends every sequence anyway).
fn build_batch(
    active: &mut [Active],
    max_batch: usize,
    chunk: usize,
    share: usize,
) -> (Batch, Vec<usize>, Vec<usize>) {
    let mut batch = Batch::default();
    let mut owners = Vec::new();
    let mut members = Vec::new();
    for (i, a) in active.iter_mut().enumerate() {
        if owners.len() == share || batch.len() == max_batch {
            break;
        }
        if a.busy || a.parked || a.stalled || !a.generating() {
            continue;
        }
        let token = a.pending.expect("generating");
        batch.push(token, a.position(), a.sequence, true);
        a.history.truncate(a.position());
        a.history.push(token);
        owners.push(i);
        members.push(i);
    }
    let mut room = max_batch.saturating_sub(batch.len());
    if !batch.is_empty() {
        room = room.min(chunk.max(1));
    }
    for (i, a) in active.iter_mut().enumerate() {
        let reading = a.pending.is_none() || !a.replay.is_empty();
        if a.busy || a.parked || !reading || room == 0 || members.contains(&i) {
            continue;
        }
        let replaying = !a.replay.is_empty();
        let source = if replaying { &a.replay } else { &a.job.prompt };
        if a.fed >= source.len() {
            continue;
        }
        let n = (source.len() - a.fed).min(room);
        for position in a.fed..a.fed + n {
            let row = !replaying && position == source.len() - 1;
            batch.push(source[position], position, a.sequence, row);
        }
        a.history.truncate(a.fed);
        a.history.extend_from_slice(&source[a.fed..a.fed + n]);
        if !replaying && a.fed + n == source.len() {
            owners.push(i);
        }
        members.push(i);
        a.fed += n;
        room -= n;
        a.end_replay();
    }
    let rows: Vec<&Active> = owners.iter().map(|&i| &active[i]).collect();
    batch.top = rows
        .iter()
        .map(|a| a.decoder.candidates())
        .max()
        .unwrap_or(1);
    batch.full_logits = rows.iter().any(|a| a.decoder.needs_full_logits());
    (batch, owners, members)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::sampler::SamplingParams;

    fn active(sequence: usize, prompt: usize, fed: usize, pending: Option<u32>) -> Active {
        let (events, _) = mpsc::unbounded_channel();
        let spec = SequenceSpec {
            max_tokens: 8,
            params: SamplingParams::greedy(),
            stop_strings: Vec::new(),
            top_logprobs: 0,
        };
        let prompt: Vec<u32> = (0..prompt as u32).collect();
        let mut decoder = Decoder::new(spec.clone(), &prompt).unwrap();
        if pending.is_some() {
            // One token sampled already: its position is the prompt's length.
            let d = crate::coordinator::session::Distribution {
                candidates: vec![(7, 1.0)],
                log_sum_exp: 1.0,
                full: None,
            };
            if let Some(tokenizer) = crate::model::tokenizer::tests::smollm2() {
                decoder.next(&d, tokenizer).unwrap();
            }
        }
        Active {
            job: Job {
                prompt,
                spec,
                events,
                accepted: Instant::now(),
                follows: false,
            },
            sequence,
            fed,
            decoder,
            pending,
            last_token_at: None,
            busy: false,
            history: Vec::new(),
            started: sequence as u64,
            parked: false,
            replay: Vec::new(),
            stalled: false,
        }
    }

    #[test]
    fn generating_sequences_go_first_and_long_prompts_come_in_chunks() {
        if crate::model::tokenizer::tests::smollm2().is_none() {
            return;
        }
        // Two sequences generating, one with a 300-token prompt not yet read.
        let mut list = vec![
            active(3, 5, 5, Some(11)),
            active(0, 300, 0, None),
            active(1, 9, 9, Some(12)),
        ];
        let (batch, owners, _) = build_batch(&mut list, 512, 64, usize::MAX);
        // One token each for the generating ones, at their next positions, then 64 prompt
        // tokens; no output row for the prompt until its last chunk.
        assert_eq!(batch.len(), 2 + 64);
        assert_eq!(&batch.tokens[..2], &[11, 12]);
        assert_eq!(&batch.positions[..2], &[5, 9]);
        assert_eq!(&batch.sequences[..2], &[3, 1]);
        assert_eq!(batch.rows, vec![0, 1]);
        assert_eq!(owners, vec![0, 2]);
        assert_eq!(batch.positions[2..], (0..64).collect::<Vec<u32>>());
        assert!(batch.sequences[2..].iter().all(|&s| s == 0));
        assert_eq!(list[1].fed, 64);

        // Alone, a prompt takes the whole batch; its last token is the output row.
        let mut alone = vec![active(2, 300, 0, None)];
        let (batch, owners, _) = build_batch(&mut alone, 512, 64, usize::MAX);
        assert_eq!(batch.len(), 300);
        assert_eq!(batch.rows, vec![299]);
        assert_eq!(owners, vec![0]);
        assert_eq!(alone[0].fed, 300);

        // The batch limit bounds prompt tokens even without generating sequences.
        let mut two = vec![active(0, 300, 0, None), active(1, 300, 0, None)];
        let (batch, owners, _) = build_batch(&mut two, 512, 64, usize::MAX);
        assert_eq!(batch.len(), 512);
        assert_eq!((two[0].fed, two[1].fed), (300, 212));
        assert_eq!(owners, vec![0]);
    }
}
