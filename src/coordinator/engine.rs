//! Continuous batching: the server's requests share the cluster's sequence slots (`--parallel`).
//!
//! Between forward passes, waiting requests take free slots and finished or abandoned ones
//! leave. Each pass carries one token for every sequence that is generating, then as many
//! prompt tokens of sequences still reading their prompt as the batch has room for (at most
//! `chunk` while others generate, so long prompts do not stall their streams). Rows are
//! independent in every kernel, so a sequence's tokens do not depend on its batch-mates.

use std::collections::VecDeque;
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
}

impl Active {
    /// Position of `pending` in the sequence.
    fn position(&self) -> usize {
        self.job.prompt.len() + self.decoder.generated() - 1
    }
}

/// Runs jobs until every sender of `jobs` is gone and the last job has finished; returns the
/// session.
pub async fn run(
    mut session: Session,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    metrics: Arc<Metrics>,
    options: EngineOptions,
) -> Session {
    let slots = session.sequences;
    metrics.slots.store(slots, Ordering::Relaxed);
    let mut free: Vec<usize> = (0..slots).rev().collect();
    let mut active: Vec<Active> = Vec::new();
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let transport = match session.cluster.active_transport() {
        Some(t) if session.cluster.weights().len() > 1 => t.name(),
        _ => "none",
    };
    loop {
        // Take in what arrived; block only when there is nothing to run.
        while let Ok(job) = jobs.try_recv() {
            waiting.push_back(job);
        }
        if active.is_empty() && waiting.is_empty() {
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
                Some(job) => waiting.push_back(job),
                None => break,
            }
        }
        // Leave: clients that went away.
        active.retain(|a| {
            let gone = a.job.events.is_closed();
            if gone {
                metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                metrics
                    .completion_tokens
                    .fetch_add(a.decoder.generated() as u64, Ordering::Relaxed);
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
        // Join: waiting jobs take free slots in arrival order.
        while !free.is_empty()
            && let Some(job) = waiting.pop_front()
        {
            match Decoder::new(job.spec.clone(), &job.prompt) {
                Ok(decoder) => active.push(Active {
                    sequence: free.pop().expect("a free slot"),
                    job,
                    fed: 0,
                    decoder,
                    pending: None,
                    last_token_at: None,
                }),
                Err(e) => {
                    let _ = job.events.send(JobEvent::Failed(format!("{e:#}")));
                }
            }
        }
        metrics.busy.store(active.len(), Ordering::Relaxed);
        if active.is_empty() {
            continue;
        }

        let (batch, owners) = build_batch(&mut active, session.max_batch, options.chunk);
        let started = Instant::now();
        let output = session.step(&batch).await;
        let output = match output {
            Ok(output) => output,
            Err(e) => {
                // The step is lost for every sequence in it; the cluster reconnects before the
                // next one if it can.
                let message = format!("{e:#}");
                tracing::warn!(error = %message, sequences = active.len(), "step failed");
                metrics.busy.store(0, Ordering::Relaxed);
                for a in active.drain(..) {
                    let _ = a.job.events.send(JobEvent::Failed(message.clone()));
                    free.push(a.sequence);
                }
                continue;
            }
        };
        let worker_times: Vec<(f64, f64, u32)> = output
            .workers
            .iter()
            .map(|w| (w.compute_seconds, w.collective_seconds, w.collectives))
            .collect();
        metrics.observe_step(transport, &worker_times);
        tracing::trace!(
            tokens = batch.len(),
            rows = owners.len(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "step"
        );

        let mut finished = Vec::new();
        for (mut distribution, &owner) in output.distributions.into_iter().zip(&owners) {
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
        for &index in finished.iter().rev() {
            free.push(active.remove(index).sequence);
        }
        metrics.busy.store(active.len(), Ordering::Relaxed);
    }
    metrics.busy.store(0, Ordering::Relaxed);
    session
}

/// The next forward pass: one token per generating sequence, then prompt chunks. Returns the
/// batch and, per output row, the index of the sequence in `active` it belongs to.
/// Prompt tokens put in the batch count as run (a failed pass ends every sequence anyway).
fn build_batch(active: &mut [Active], max_batch: usize, chunk: usize) -> (Batch, Vec<usize>) {
    let mut batch = Batch::default();
    let mut owners = Vec::new();
    for (i, a) in active.iter().enumerate() {
        if let Some(token) = a.pending {
            batch.push(token, a.position(), a.sequence, true);
            owners.push(i);
        }
    }
    let mut room = max_batch.saturating_sub(batch.len());
    if !batch.is_empty() {
        room = room.min(chunk.max(1));
    }
    for (i, a) in active.iter_mut().enumerate() {
        let prompt = &a.job.prompt;
        if a.fed == prompt.len() || room == 0 {
            continue;
        }
        let n = (prompt.len() - a.fed).min(room);
        for position in a.fed..a.fed + n {
            batch.push(
                prompt[position],
                position,
                a.sequence,
                position == prompt.len() - 1,
            );
        }
        if a.fed + n == prompt.len() {
            owners.push(i);
        }
        a.fed += n;
        room -= n;
    }
    let rows: Vec<&Active> = owners.iter().map(|&i| &active[i]).collect();
    batch.top = rows
        .iter()
        .map(|a| a.decoder.candidates())
        .max()
        .unwrap_or(1);
    batch.full_logits = rows.iter().any(|a| a.decoder.needs_full_logits());
    (batch, owners)
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
            },
            sequence,
            fed,
            decoder,
            pending,
            last_token_at: None,
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
        let (batch, owners) = build_batch(&mut list, 512, 64);
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
        let (batch, owners) = build_batch(&mut alone, 512, 64);
        assert_eq!(batch.len(), 300);
        assert_eq!(batch.rows, vec![299]);
        assert_eq!(owners, vec![0]);
        assert_eq!(alone[0].fed, 300);

        // The batch limit bounds prompt tokens even without generating sequences.
        let mut two = vec![active(0, 300, 0, None), active(1, 300, 0, None)];
        let (batch, owners) = build_batch(&mut two, 512, 64);
        assert_eq!(batch.len(), 512);
        assert_eq!((two[0].fed, two[1].fed), (300, 212));
        assert_eq!(owners, vec![0]);
    }
}
