//! Predicting a plan's decode speed (`tp-coordinator plan --simulate`): per-token time and
//! throughput from the stages, the hosts, a measured decode time of one worker, and each
//! link's latency and bandwidth. Decode reads every weight once per step, so a stage's share
//! of the time is its share of the weight bytes, divided among its ranks; a step waits for
//! each AllReduce (two per layer and one more at the start) and each handoff between stages,
//! and for the coordinator's request and reply. With several streams, up to one batch per
//! stage is in flight (DESIGN section 5): a cycle lasts as long as one batch's trip through
//! every stage, or the busiest stage's work on all the batches, whichever is longer.

use std::ops::Range;

/// What a step costs on this hardware (seconds, bytes per second).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Costs {
    /// One worker's compute for one token through the whole model (all layers and the
    /// output head), as `bench` measures its tg rate.
    pub token: f64,
    /// How much more a batch of b tokens costs than one, per extra token (decode is bound by
    /// reading weights, so a batch costs little more: t(b) = t(1) (1 + slope (b - 1))).
    pub batch_slope: f64,
    /// An AllReduce of a few KiB among the ranks of one host (shared memory).
    pub shm_allreduce: f64,
    /// A handoff between two stages on one host (a loopback gRPC stream).
    pub local_handoff: f64,
    /// One-way latency and bandwidth of a link between hosts.
    pub link_latency: f64,
    pub link_bandwidth: f64,
    /// The coordinator's request to the workers and their replies: one-way latency to a host
    /// (0 for workers on the coordinator's host).
    pub coordinator_latency: f64,
}

/// The cluster being predicted.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Host of every rank.
    pub host_of: Vec<usize>,
    /// Ranks and layers of each stage.
    pub stages: Vec<(Range<usize>, Range<usize>)>,
    pub layer_count: usize,
    pub model_dim: usize,
    /// Share of one token's compute in each layer (by weight bytes) and in the output head;
    /// together 1.
    pub layer_share: f64,
    pub head_share: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Prediction {
    pub streams: usize,
    /// Seconds from a step's request to its tokens, for one batch.
    pub step_seconds: f64,
    /// Generated tokens per second over all streams.
    pub tokens_per_second: f64,
    /// Batches in flight at once.
    pub in_flight: usize,
}

impl Layout {
    fn spans_hosts(&self, ranks: &Range<usize>) -> bool {
        ranks
            .clone()
            .any(|r| self.host_of[r] != self.host_of[ranks.start])
    }

    /// One AllReduce of `batch` rows among a stage's ranks.
    fn allreduce(&self, costs: &Costs, ranks: &Range<usize>, batch: usize) -> f64 {
        if ranks.len() < 2 {
            return 0.0;
        }
        if !self.spans_hosts(ranks) {
            return costs.shm_allreduce;
        }
        // Hierarchical: the host's sum (where a host has several of the ranks), the leaders'
        // exchange (f64 partial sums), the host's sum again.
        let shared_host = ranks
            .clone()
            .any(|r| r > ranks.start && self.host_of[r] == self.host_of[r - 1]);
        let bytes = (self.model_dim * 8 * batch) as f64;
        let local = if shared_host {
            2.0 * costs.shm_allreduce
        } else {
            0.0
        };
        local + costs.link_latency + bytes / costs.link_bandwidth
    }

    /// A stage's work on one batch: its layers' (and the head's) compute split among its
    /// ranks, and its AllReduces.
    fn stage(&self, costs: &Costs, stage: usize, batch: usize) -> f64 {
        let (ranks, layers) = &self.stages[stage];
        let last = stage + 1 == self.stages.len();
        let share =
            layers.len() as f64 * self.layer_share + if last { self.head_share } else { 0.0 };
        let compute = costs.token * (1.0 + costs.batch_slope * (batch as f64 - 1.0)) * share
            / ranks.len() as f64;
        compute + (2 * layers.len() + 1) as f64 * self.allreduce(costs, ranks, batch)
    }

    fn handoff(&self, costs: &Costs, from: usize, batch: usize) -> f64 {
        let (a, b) = (self.stages[from].0.start, self.stages[from + 1].0.start);
        if self.host_of[a] == self.host_of[b] {
            costs.local_handoff
        } else {
            costs.link_latency + (self.model_dim * 4 * batch) as f64 / costs.link_bandwidth
        }
    }

    /// One batch's trip: request, every stage in turn with the handoffs between them, reply.
    fn trip(&self, costs: &Costs, batch: usize) -> f64 {
        let stages = self.stages.len();
        2.0 * costs.coordinator_latency
            + (0..stages)
                .map(|s| self.stage(costs, s, batch))
                .sum::<f64>()
            + (0..stages - 1)
                .map(|s| self.handoff(costs, s, batch))
                .sum::<f64>()
    }

    /// Decode speed with `streams` sequences generating together.
    pub fn predict(&self, costs: &Costs, streams: usize) -> Prediction {
        self.predict_requests(costs, streams, 0, 1)
    }

    /// The generated tokens per second of `streams` requests arriving together, each with a
    /// prompt of `prompt` tokens (read in one batch of all of them, as the server's engine
    /// does when they fit) and `generated` tokens to generate; `prompt` 0 is steady decode.
    pub fn predict_requests(
        &self,
        costs: &Costs,
        streams: usize,
        prompt: usize,
        generated: usize,
    ) -> Prediction {
        let streams = streams.max(1);
        let in_flight = self.stages.len().min(streams);
        let batch = streams.div_ceil(in_flight);
        let trip = self.trip(costs, batch);
        let busiest = (0..self.stages.len())
            .map(|s| self.stage(costs, s, batch))
            .fold(0.0, f64::max);
        let cycle = trip.max(in_flight as f64 * busiest);
        let prefill = if prompt > 0 {
            self.trip(costs, streams * prompt)
        } else {
            0.0
        };
        let generated = generated.max(1) as f64;
        Prediction {
            streams,
            step_seconds: trip,
            tokens_per_second: streams as f64 * generated / (prefill + generated * cycle),
            in_flight,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs() -> Costs {
        Costs {
            token: 0.010,
            batch_slope: 0.05,
            shm_allreduce: 5e-6,
            local_handoff: 100e-6,
            link_latency: 1e-3,
            link_bandwidth: 125e6,
            coordinator_latency: 0.0,
        }
    }

    fn layout(hosts: &[usize], stages: &[usize], layers: usize) -> Layout {
        let host_of: Vec<usize> = hosts
            .iter()
            .enumerate()
            .flat_map(|(h, &n)| std::iter::repeat_n(h, n))
            .collect();
        let weights = vec![1.0; stages.len()];
        let layer_ranges = crate::shard::plan::split_units(layers, &weights, 0);
        let mut start = 0;
        let stages = stages
            .iter()
            .zip(layer_ranges)
            .map(|(&n, l)| {
                start += n;
                (start - n..start, l)
            })
            .collect();
        Layout {
            host_of,
            stages,
            layer_count: layers,
            model_dim: 576,
            layer_share: 0.9 / layers as f64,
            head_share: 0.1,
        }
    }

    #[test]
    fn one_worker_takes_the_measured_time() {
        let p = layout(&[1], &[1], 30).predict(&costs(), 1);
        assert!((p.step_seconds - 0.010).abs() < 1e-9);
        assert!((p.tokens_per_second - 100.0).abs() < 1e-6);
    }

    #[test]
    fn across_a_slow_link_stages_beat_tensor_parallel() {
        // Two hosts of one worker: TP waits 61 link latencies per token, PP one handoff.
        let tp = layout(&[1, 1], &[2], 30).predict(&costs(), 1);
        let pp = layout(&[1, 1], &[1, 1], 30).predict(&costs(), 1);
        assert!(tp.step_seconds > 0.061, "{tp:?}");
        assert!(pp.step_seconds < 0.0115, "{pp:?}");
        // Eight streams keep both stages busy: more than one stream's rate.
        let pp8 = layout(&[1, 1], &[1, 1], 30).predict(&costs(), 8);
        assert_eq!(pp8.in_flight, 2);
        assert!(
            pp8.tokens_per_second > 1.5 * pp.tokens_per_second,
            "{pp8:?}"
        );
    }

    #[test]
    fn sixty_four_workers_on_eight_hosts() {
        let hosts = [8; 8];
        let tp = layout(&hosts, &[64], 80).predict(&costs(), 1);
        let pp = layout(&hosts, &[8; 8], 80).predict(&costs(), 1);
        assert!(pp.tokens_per_second > tp.tokens_per_second);
    }
}
