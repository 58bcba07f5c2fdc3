//! The split-state planner (DESIGN sections 2 and 3).
//!
//! Every op of the dense transformer graph gets a split state from small propagation rules;
//! an op that needs whole values on a `Partial` input forces an AllReduce. The partition gives
//! each rank its extents along every split axis, and `shard_program` turns both into the op list
//! a worker executes.

use std::ops::Range;

use crate::model::arch::{Activation, FfnSpec, ModelConfig};

pub use crate::limits::MAX_RANKS;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("rank count {0} is outside 1..={MAX_RANKS}")]
    RankCount(usize),
    #[error("rank weight {0} is not a positive finite number")]
    Weight(f64),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Clone, Debug, PartialEq)]
pub enum SplitState {
    Mirrored,
    Split {
        axis: Axis,
        extents: Vec<Range<usize>>,
    },
    Partial,
}

/// The axes a tensor can be split along.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Axis {
    QueryHeads,
    KvHeads,
    FfnColumns,
    Vocab,
}

/// One rank's share of one layer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LayerShard {
    pub q_heads: Range<usize>,
    pub kv_heads: Range<usize>,
    /// Columns of the dense FFN, or of every expert this rank computes.
    pub ffn_columns: Range<usize>,
    /// Routed experts this rank computes (`ffn_columns` of each); empty for a dense layer.
    pub experts: Range<usize>,
    /// Columns of the shared expert (qwen2moe); empty where there is none.
    pub shared_columns: Range<usize>,
}

/// How a mixture-of-experts layer is divided among ranks.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum MoeSplit {
    /// Every rank holds a slice of the columns of every expert, like a dense FFN: each token's
    /// experts are computed by all ranks, so work and memory follow the weights exactly.
    #[default]
    Tensor,
    /// Every rank holds whole experts (split by weight): no expert is cut, but a token's work
    /// lands on the ranks that own its experts, which can leave others idle.
    Expert,
}

impl MoeSplit {
    pub fn name(self) -> &'static str {
        match self {
            MoeSplit::Tensor => "tensor",
            MoeSplit::Expert => "expert",
        }
    }
}

/// A pipeline stage: a tensor-parallel group of consecutive ranks running consecutive layers.
/// The first stage embeds the tokens, the last one holds the output head; each hands its
/// residual stream to the next (DESIGN section 5).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Stage {
    pub index: usize,
    pub count: usize,
    /// Global ranks of the stage's group.
    pub ranks: Range<usize>,
    pub layers: Range<usize>,
}

impl Stage {
    /// The one stage of a plan without pipelining.
    pub fn whole(rank_count: usize, layer_count: usize) -> Stage {
        Stage {
            index: 0,
            count: 1,
            ranks: 0..rank_count,
            layers: 0..layer_count,
        }
    }

    pub fn is_first(&self) -> bool {
        self.index == 0
    }

    pub fn is_last(&self) -> bool {
        self.index + 1 == self.count
    }
}

/// One rank's share of the model: what it loads and computes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RankShard {
    pub rank_index: usize,
    pub rank_count: usize,
    /// Rows of the output head (the last stage's ranks; empty elsewhere).
    pub vocab_rows: Range<usize>,
    /// Rows of the embedding (the first stage's ranks; empty elsewhere).
    pub embed_rows: Range<usize>,
    /// Every layer of the model; those outside the rank's stage are empty.
    pub layers: Vec<LayerShard>,
    pub stage: Stage,
}

impl RankShard {
    /// This rank's place in its stage's tensor-parallel group, and the group's size.
    pub fn group_index(&self) -> usize {
        self.rank_index - self.stage.ranks.start
    }

    pub fn group_size(&self) -> usize {
        self.stage.ranks.len()
    }
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub ranks: Vec<RankShard>,
    pub stages: Vec<Stage>,
    /// Attention splits by KV group, or by query head when a stage's ranks outnumber the KV
    /// heads (QueryHead if any stage does).
    pub attention_unit: AttentionUnit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum AttentionUnit {
    KvGroup,
    QueryHead,
}

/// Splits `unit_count` units by weight. Remainders go to the largest fractional shares, ties broken
/// in an order rotated by `rotation` so that they do not always land on the same rank.
pub fn split_units(unit_count: usize, weights: &[f64], rotation: usize) -> Vec<Range<usize>> {
    let n = weights.len();
    let total: f64 = weights.iter().sum();
    let ideal: Vec<f64> = weights
        .iter()
        .map(|w| unit_count as f64 * w / total)
        .collect();
    let mut counts: Vec<usize> = ideal.iter().map(|x| x.floor() as usize).collect();
    let assigned: usize = counts.iter().sum();
    let mut order: Vec<usize> = (0..n).map(|i| (i + rotation) % n).collect();
    order.sort_by(|&a, &b| {
        let fa = ideal[a] - ideal[a].floor();
        let fb = ideal[b] - ideal[b].floor();
        // Equal weights give equal fractions; a stable sort keeps the rotated order for those.
        fb.partial_cmp(&fa).unwrap_or(std::cmp::Ordering::Equal)
    });
    for &rank in order.iter().take(unit_count.saturating_sub(assigned)) {
        counts[rank] += 1;
    }
    let mut start = 0;
    counts
        .into_iter()
        .map(|c| {
            let r = start..start + c;
            start += c;
            r
        })
        .collect()
}

pub fn plan(config: &ModelConfig, weights: &[f64]) -> Result<Plan, PlanError> {
    plan_with(config, weights, MoeSplit::Tensor)
}

/// The plan, with mixture-of-experts layers divided as `moe` says (dense models ignore it).
pub fn plan_with(config: &ModelConfig, weights: &[f64], moe: MoeSplit) -> Result<Plan, PlanError> {
    plan_stages(config, weights, moe, &[weights.len()])
}

/// The plan of a pipeline: `stage_sizes` ranks per stage, in rank order (one stage: tensor
/// parallel only). Layers go to stages by the sum of their ranks' weights; inside a stage they
/// are split as without stages, among its ranks by their weights.
pub fn plan_stages(
    config: &ModelConfig,
    weights: &[f64],
    moe: MoeSplit,
    stage_sizes: &[usize],
) -> Result<Plan, PlanError> {
    plan_stages_up_to(config, weights, moe, stage_sizes, MAX_RANKS)
}

/// `plan_stages` for up to `max_ranks` ranks: a running cluster has at most `MAX_RANKS`; a
/// simulated one (`plan --simulate`) may have more.
pub fn plan_stages_up_to(
    config: &ModelConfig,
    weights: &[f64],
    moe: MoeSplit,
    stage_sizes: &[usize],
    max_ranks: usize,
) -> Result<Plan, PlanError> {
    let rank_count = weights.len();
    if rank_count == 0 || rank_count > max_ranks {
        return Err(PlanError::RankCount(rank_count));
    }
    if let Some(&w) = weights.iter().find(|w| !(w.is_finite() && **w > 0.0)) {
        return Err(PlanError::Weight(w));
    }
    let stage_count = stage_sizes.len();
    if stage_count == 0 || stage_count > rank_count {
        return Err(PlanError::Invalid(format!(
            "{stage_count} pipeline stages need between 1 and {rank_count} (the workers)"
        )));
    }
    if let Some(empty) = stage_sizes.iter().position(|&n| n == 0) {
        return Err(PlanError::Invalid(format!(
            "pipeline stage {empty} has no workers"
        )));
    }
    if stage_sizes.iter().sum::<usize>() != rank_count {
        return Err(PlanError::Invalid(format!(
            "pipeline stages of {stage_sizes:?} workers do not add up to the {rank_count} workers"
        )));
    }
    if stage_count > config.layer_count {
        return Err(PlanError::Invalid(format!(
            "{stage_count} pipeline stages for a model of {} layers: every stage needs a layer",
            config.layer_count
        )));
    }
    let mut first = 0;
    let rank_ranges: Vec<Range<usize>> = stage_sizes
        .iter()
        .map(|&n| {
            first += n;
            first - n..first
        })
        .collect();
    let stage_weights: Vec<f64> = rank_ranges
        .iter()
        .map(|r| weights[r.clone()].iter().sum())
        .collect();
    let layer_ranges = split_units(config.layer_count, &stage_weights, 0);
    if let Some(i) = layer_ranges.iter().position(|l| l.is_empty()) {
        return Err(PlanError::Invalid(format!(
            "pipeline stage {i} (weight {:.3} of {:.3}) gets no layer of the {}: give it more \
             weight or use fewer stages",
            stage_weights[i],
            stage_weights.iter().sum::<f64>(),
            config.layer_count
        )));
    }
    let stages: Vec<Stage> = rank_ranges
        .into_iter()
        .zip(layer_ranges)
        .enumerate()
        .map(|(index, (ranks, layers))| Stage {
            index,
            count: stage_count,
            ranks,
            layers,
        })
        .collect();
    let empty = LayerShard {
        q_heads: 0..0,
        kv_heads: 0..0,
        ffn_columns: 0..0,
        experts: 0..0,
        shared_columns: 0..0,
    };
    let mut ranks: Vec<RankShard> = (0..rank_count)
        .map(|rank_index| RankShard {
            rank_index,
            rank_count,
            vocab_rows: 0..0,
            embed_rows: 0..0,
            layers: vec![empty.clone(); config.layer_count],
            stage: stages
                .iter()
                .find(|s| s.ranks.contains(&rank_index))
                .expect("the stages cover the ranks")
                .clone(),
        })
        .collect();
    let mut attention_unit = AttentionUnit::KvGroup;
    for stage in &stages {
        let stage_weights = &weights[stage.ranks.clone()];
        let unit = if stage.ranks.len() <= config.kv_head_count {
            AttentionUnit::KvGroup
        } else {
            AttentionUnit::QueryHead
        };
        if unit == AttentionUnit::QueryHead {
            attention_unit = unit;
        }
        for layer in stage.layers.clone() {
            let shards = split_layer(config, layer, stage_weights, unit, moe)?;
            for (rank, shard) in stage.ranks.clone().zip(shards) {
                ranks[rank].layers[layer] = shard;
            }
        }
    }
    let first = &stages[0];
    let last = &stages[stage_count - 1];
    for (rank, rows) in first.ranks.clone().zip(split_units(
        config.vocab_size,
        &weights[first.ranks.clone()],
        config.layer_count,
    )) {
        ranks[rank].embed_rows = rows;
    }
    for (rank, rows) in last.ranks.clone().zip(split_units(
        config.vocab_size,
        &weights[last.ranks.clone()],
        config.layer_count,
    )) {
        ranks[rank].vocab_rows = rows;
    }
    let plan = Plan {
        ranks,
        stages,
        attention_unit,
    };
    check_plan(config, &plan).map_err(PlanError::Invalid)?;
    Ok(plan)
}

/// One layer's shards for the ranks of one stage, with their weights.
fn split_layer(
    config: &ModelConfig,
    layer: usize,
    weights: &[f64],
    attention_unit: AttentionUnit,
    moe: MoeSplit,
) -> Result<Vec<LayerShard>, PlanError> {
    let group = config.group_size();
    let rank_count = weights.len();
    let heads: Vec<(Range<usize>, Range<usize>)> = match attention_unit {
        AttentionUnit::KvGroup => split_units(config.kv_head_count, weights, layer)
            .into_iter()
            .map(|kv| (kv.start * group..kv.end * group, kv))
            .collect(),
        AttentionUnit::QueryHead => split_units(config.head_count, weights, layer)
            .into_iter()
            .map(|q| {
                let kv = if q.is_empty() {
                    0..0
                } else {
                    q.start / group..q.end.div_ceil(group)
                };
                (q, kv)
            })
            .collect(),
    };
    let block = config.ffn_down_block[layer];
    if !config.ffn_dim.is_multiple_of(block) {
        return Err(PlanError::Invalid(format!(
            "layer {layer}: FFN size {} is not a multiple of its down projection's block of {block}",
            config.ffn_dim
        )));
    }
    let columns_in_blocks = |units: Vec<Range<usize>>| -> Vec<Range<usize>> {
        units
            .into_iter()
            .map(|u| u.start * block..u.end * block)
            .collect()
    };
    // Per rank: FFN (or expert) columns, routed experts, shared-expert columns.
    type Extents = Vec<Range<usize>>;
    let (ffn, experts, shared): (Extents, Extents, Extents) = match &config.moe {
        None => (
            columns_in_blocks(split_units(config.ffn_dim / block, weights, layer)),
            vec![0..0; rank_count],
            vec![0..0; rank_count],
        ),
        Some(m) => {
            let shared = match m.shared_ffn_dim {
                None => vec![0..0; rank_count],
                Some(width) => {
                    let b = m.shared_down_block[layer];
                    if width % b != 0 {
                        return Err(PlanError::Invalid(format!(
                            "layer {layer}: shared expert width {width} is not a multiple of its down projection's block of {b}"
                        )));
                    }
                    split_units(width / b, weights, layer)
                        .into_iter()
                        .map(|u| u.start * b..u.end * b)
                        .collect()
                }
            };
            match moe {
                MoeSplit::Tensor => (
                    columns_in_blocks(split_units(config.ffn_dim / block, weights, layer)),
                    vec![0..m.expert_count; rank_count],
                    shared,
                ),
                MoeSplit::Expert => {
                    let owned = split_units(m.expert_count, weights, layer);
                    let columns = owned
                        .iter()
                        .map(|e| {
                            if e.is_empty() {
                                0..0
                            } else {
                                0..config.ffn_dim
                            }
                        })
                        .collect();
                    (columns, owned, shared)
                }
            }
        }
    };
    Ok(heads
        .into_iter()
        .zip(ffn.into_iter().zip(experts).zip(shared))
        .map(
            |((q_heads, kv_heads), ((ffn_columns, experts), shared_columns))| LayerShard {
                q_heads,
                kv_heads,
                ffn_columns,
                experts,
                shared_columns,
            },
        )
        .collect())
}

fn check_cover(
    ranges: impl Iterator<Item = Range<usize>>,
    total: usize,
    granularity: usize,
) -> Result<(), String> {
    let mut next = 0;
    for r in ranges {
        if r.start != next || r.end < r.start {
            return Err(format!("extent {r:?} does not continue at {next}"));
        }
        if r.start % granularity != 0 || r.end % granularity != 0 {
            return Err(format!("extent {r:?} is not a multiple of {granularity}"));
        }
        next = r.end;
    }
    if next != total {
        return Err(format!("extents end at {next}, the axis has {total}"));
    }
    Ok(())
}

/// The invariants of DESIGN section 2, asserted by the planner and again by each worker.
pub fn check_plan(config: &ModelConfig, plan: &Plan) -> Result<(), String> {
    // Stages: consecutive ranks and layers, together all of both.
    check_cover(
        plan.stages.iter().map(|s| s.ranks.clone()),
        plan.ranks.len(),
        1,
    )
    .map_err(|e| format!("stage ranks: {e}"))?;
    check_cover(
        plan.stages.iter().map(|s| s.layers.clone()),
        config.layer_count,
        1,
    )
    .map_err(|e| format!("stage layers: {e}"))?;
    let (first, last) = (&plan.stages[0], &plan.stages[plan.stages.len() - 1]);
    check_cover(
        plan.ranks[first.ranks.clone()]
            .iter()
            .map(|r| r.embed_rows.clone()),
        config.vocab_size,
        1,
    )
    .map_err(|e| format!("embedding rows: {e}"))?;
    check_cover(
        plan.ranks[last.ranks.clone()]
            .iter()
            .map(|r| r.vocab_rows.clone()),
        config.vocab_size,
        1,
    )
    .map_err(|e| format!("output rows: {e}"))?;
    for stage in &plan.stages {
        for layer in stage.layers.clone() {
            let shards: Vec<&LayerShard> = plan.ranks[stage.ranks.clone()]
                .iter()
                .map(|r| &r.layers[layer])
                .collect();
            check_layer_cover(config, layer, &shards)?;
        }
    }
    for rank in &plan.ranks {
        if plan.stages.get(rank.stage.index) != Some(&rank.stage) {
            return Err(format!(
                "rank {} names a stage of another plan",
                rank.rank_index
            ));
        }
        check_rank_shard_up_to(config, rank, plan.ranks.len().max(MAX_RANKS))?;
    }
    Ok(())
}

/// The shards of one layer, over the ranks of the stage that runs it, cover the layer.
fn check_layer_cover(
    config: &ModelConfig,
    layer: usize,
    shards: &[&LayerShard],
) -> Result<(), String> {
    check_cover(
        shards.iter().map(|s| s.q_heads.clone()),
        config.head_count,
        1,
    )
    .map_err(|e| format!("layer {layer} query heads: {e}"))?;
    match &config.moe {
        None => check_cover(
            shards.iter().map(|s| s.ffn_columns.clone()),
            config.ffn_dim,
            config.ffn_down_block[layer],
        )
        .map_err(|e| format!("layer {layer} FFN columns: {e}"))?,
        Some(m) => {
            check_expert_cover(shards, m.expert_count, config.ffn_dim)
                .map_err(|e| format!("layer {layer} experts: {e}"))?;
            if let Some(width) = m.shared_ffn_dim {
                check_cover(
                    shards.iter().map(|s| s.shared_columns.clone()),
                    width,
                    m.shared_down_block[layer],
                )
                .map_err(|e| format!("layer {layer} shared expert columns: {e}"))?;
            }
        }
    }
    Ok(())
}

/// Every (expert, column) pair is computed by exactly one rank: each rank's experts x columns
/// rectangle is disjoint from the others', and together they have the area of the whole.
fn check_expert_cover(
    shards: &[&LayerShard],
    expert_count: usize,
    width: usize,
) -> Result<(), String> {
    let area = |s: &LayerShard| s.experts.len() * s.ffn_columns.len();
    let overlaps = |a: &Range<usize>, b: &Range<usize>| a.start < b.end && b.start < a.end;
    for (i, a) in shards.iter().enumerate() {
        for b in &shards[i + 1..] {
            if area(a) > 0
                && area(b) > 0
                && overlaps(&a.experts, &b.experts)
                && overlaps(&a.ffn_columns, &b.ffn_columns)
            {
                return Err(format!(
                    "experts {:?} x columns {:?} overlap experts {:?} x columns {:?}",
                    a.experts, a.ffn_columns, b.experts, b.ffn_columns
                ));
            }
        }
    }
    let total: usize = shards.iter().map(|s| area(s)).sum();
    if total != expert_count * width {
        return Err(format!(
            "ranks cover {total} expert columns of {expert_count} x {width}"
        ));
    }
    Ok(())
}

/// What a single worker can check of its own shard on receipt (the paired assertion).
pub fn check_rank_shard(config: &ModelConfig, shard: &RankShard) -> Result<(), String> {
    check_rank_shard_up_to(config, shard, MAX_RANKS)
}

fn check_rank_shard_up_to(
    config: &ModelConfig,
    shard: &RankShard,
    max_ranks: usize,
) -> Result<(), String> {
    if shard.rank_count == 0 || shard.rank_index >= shard.rank_count || shard.rank_count > max_ranks
    {
        return Err(format!(
            "rank {} of {} is not a valid rank",
            shard.rank_index, shard.rank_count
        ));
    }
    let stage = &shard.stage;
    if stage.count == 0
        || stage.index >= stage.count
        || stage.count > shard.rank_count
        || !stage.ranks.contains(&shard.rank_index)
        || stage.ranks.end > shard.rank_count
        || stage.layers.is_empty()
        || stage.layers.end > config.layer_count
        || (stage.is_first() && stage.layers.start != 0)
        || (stage.is_last() && stage.layers.end != config.layer_count)
    {
        return Err(format!(
            "rank {}: stage {stage:?} does not fit {} ranks and {} layers",
            shard.rank_index, shard.rank_count, config.layer_count
        ));
    }
    for (rows, wanted, what) in [
        (&shard.vocab_rows, stage.is_last(), "output"),
        (&shard.embed_rows, stage.is_first(), "embedding"),
    ] {
        if rows.start > rows.end || rows.end > config.vocab_size || (!wanted && !rows.is_empty()) {
            return Err(format!(
                "{what} rows {rows:?} do not fit the vocabulary of {} in stage {} of {}",
                config.vocab_size, stage.index, stage.count
            ));
        }
    }
    if shard.layers.len() != config.layer_count {
        return Err(format!(
            "shard has {} layers, the model {}",
            shard.layers.len(),
            config.layer_count
        ));
    }
    for (layer, s) in shard.layers.iter().enumerate() {
        if stage.layers.contains(&layer) {
            check_layer_shard(config, layer, s)?;
        } else if !(s.q_heads.is_empty()
            && s.kv_heads.is_empty()
            && s.ffn_columns.is_empty()
            && s.experts.is_empty()
            && s.shared_columns.is_empty())
        {
            return Err(format!(
                "layer {layer} lies outside stage {} (layers {:?}) but has a shard",
                stage.index, stage.layers
            ));
        }
    }
    Ok(())
}

fn check_layer_shard(config: &ModelConfig, layer: usize, s: &LayerShard) -> Result<(), String> {
    let group = config.group_size();
    let ok_q = s.q_heads.start <= s.q_heads.end && s.q_heads.end <= config.head_count;
    let needed_kv = if s.q_heads.is_empty() {
        0..0
    } else {
        s.q_heads.start / group..s.q_heads.end.div_ceil(group)
    };
    let aligned = |r: &Range<usize>, total: usize, block: usize| {
        r.start <= r.end
            && r.end <= total
            && r.start.is_multiple_of(block)
            && r.end.is_multiple_of(block)
    };
    let ok_ffn = aligned(&s.ffn_columns, config.ffn_dim, config.ffn_down_block[layer])
        && match &config.moe {
            None => s.experts.is_empty() && s.shared_columns.is_empty(),
            Some(m) => {
                s.experts.start <= s.experts.end
                    && s.experts.end <= m.expert_count
                    && match m.shared_ffn_dim {
                        None => s.shared_columns.is_empty(),
                        Some(width) => {
                            aligned(&s.shared_columns, width, m.shared_down_block[layer])
                        }
                    }
            }
        };
    let ok_kv = if s.q_heads.is_empty() {
        s.kv_heads.is_empty()
    } else {
        s.kv_heads == needed_kv
    };
    if !ok_q || !ok_kv || !ok_ffn {
        return Err(format!(
            "layer {layer}: shard {s:?} is inconsistent with {} heads, {} KV heads, FFN {} in blocks of {}",
            config.head_count, config.kv_head_count, config.ffn_dim, config.ffn_down_block[layer]
        ));
    }
    Ok(())
}

/// Named activation buffers of the shard program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Buffer {
    /// The residual stream, `model_dim` per position.
    Residual,
    Normed,
    Q,
    K,
    V,
    Attention,
    /// A row-parallel output before its AllReduce.
    Partial,
    Gate,
    Up,
    Logits,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub enum Parallel {
    /// Split on the output dimension: `Mirrored` input, `Split` output.
    Column,
    /// Split on the input dimension: `Split` input, `Partial` output.
    Row,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub enum OpKind {
    /// Vocab-parallel lookup of the rows this rank owns, times `scale`; zeros elsewhere.
    Embed {
        tensor: String,
        scale: Option<f32>,
    },
    RmsNorm {
        tensor: String,
        input: Buffer,
        output: Buffer,
    },
    Linear {
        tensor: String,
        bias: Option<String>,
        parallel: Parallel,
        /// This rank's range of the split dimension: output rows (column-parallel) or input
        /// columns (row-parallel).
        extent: Range<usize>,
        input: Buffer,
        output: Buffer,
    },
    /// Per-head RMSNorm of this rank's queries and keys (QK-norm), before RoPE.
    HeadNorm {
        layer: usize,
        q_tensor: String,
        k_tensor: String,
    },
    /// RoPE of this rank's queries and keys with the layer's table; `freq_factors` names the
    /// vector of per-pair frequency divisors where the table has one.
    Rope {
        layer: usize,
        freq_factors: Option<String>,
    },
    Attention {
        layer: usize,
    },
    /// `Gate = act(Gate) * Up`.
    Glu {
        activation: Activation,
    },
    /// A mixture-of-experts FFN on `Normed`: the router on the whole (mirrored) input, then
    /// this rank's part of every selected expert (and of the shared expert), the weighted
    /// outputs summed into `Partial` before the layer's one AllReduce (DESIGN section 2).
    Moe {
        layer: usize,
    },
    /// Residual += Partial (now Mirrored), RMS-normed first where `norm` names the weights
    /// (gemma's post-attention and post-FFN norms). A bias of the row-parallel projection
    /// (`bias`), or the selected experts' weighted output biases (`routed_bias`, gpt-oss), is
    /// added here: once, after the AllReduce, on every rank alike.
    AddResidual {
        norm: Option<String>,
        bias: Option<String>,
        routed_bias: bool,
    },
    AllReduce {
        buffer: Buffer,
        index: usize,
    },
    /// This rank's slice of the output logits, returned to the coordinator for sampling.
    EmitLogits,
    /// A later pipeline stage's start: the residual stream of the previous stage, received by
    /// the stage's first rank (the others start from zeros; the AllReduce that follows hands
    /// it to every rank of the stage, exactly).
    Receive,
    /// The end of a stage before the last: its first rank sends the residual stream (whole on
    /// every rank of the stage) to the next stage's first rank.
    Send,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Op {
    pub kind: OpKind,
    /// Split state of the op's output.
    #[serde(skip)]
    pub output_state: SplitState,
}

/// The op list of one rank, from the model's layer descriptions. The graph and its split
/// states are the same for every rank; only the extents differ, and with one rank every state
/// is whole, so no collective is emitted.
pub fn shard_program(config: &ModelConfig, shard: &RankShard) -> Vec<Op> {
    let distributed = shard.group_size() > 1;
    let stage = &shard.stage;
    let mut ops = Vec::new();
    let mut collectives = 0;
    let split = |axis: Axis| {
        if distributed {
            SplitState::Split {
                axis,
                extents: Vec::new(),
            }
        } else {
            SplitState::Mirrored
        }
    };
    let partial = if distributed {
        SplitState::Partial
    } else {
        SplitState::Mirrored
    };
    // Propagation rule: an op needing whole values on a Partial input forces an AllReduce.
    let mut reduce = |ops: &mut Vec<Op>, buffer: Buffer| {
        if ops
            .last()
            .is_some_and(|op: &Op| op.output_state == SplitState::Partial)
        {
            ops.push(Op {
                kind: OpKind::AllReduce {
                    buffer,
                    index: collectives,
                },
                output_state: SplitState::Mirrored,
            });
            collectives += 1;
        }
    };
    let push = |ops: &mut Vec<Op>, kind: OpKind, output_state: SplitState| {
        ops.push(Op { kind, output_state })
    };
    // Both starts leave each rank a part of the residual stream (its vocabulary rows' embeddings,
    // or the previous stage's residual on the first rank and zeros elsewhere): one AllReduce
    // makes it whole.
    let start = if stage.is_first() {
        OpKind::Embed {
            tensor: config.embedding.clone(),
            scale: config.embedding_scale,
        }
    } else {
        OpKind::Receive
    };
    push(&mut ops, start, partial.clone());
    reduce(&mut ops, Buffer::Residual);
    // A row-parallel sum joins the residual stream: its AllReduce (with several ranks), then
    // the add, normed first where the layer has a post-norm.
    let mut add_to_residual =
        |ops: &mut Vec<Op>, norm: &Option<String>, bias: &Option<String>, routed_bias: bool| {
            reduce(ops, Buffer::Partial);
            ops.push(Op {
                kind: OpKind::AddResidual {
                    norm: norm.clone(),
                    bias: bias.clone(),
                    routed_bias,
                },
                output_state: SplitState::Mirrored,
            });
        };
    for (layer, spec) in config.layers.iter().enumerate() {
        if !stage.layers.contains(&layer) {
            continue;
        }
        let a = &spec.attention;
        push(
            &mut ops,
            OpKind::RmsNorm {
                tensor: a.norm.clone(),
                input: Buffer::Residual,
                output: Buffer::Normed,
            },
            SplitState::Mirrored,
        );
        let hd = config.head_dim;
        let s = &shard.layers[layer];
        let (q_dims, kv_dims) = (
            s.q_heads.start * hd..s.q_heads.end * hd,
            s.kv_heads.start * hd..s.kv_heads.end * hd,
        );
        for (linear, out, axis, extent) in [
            (&a.q, Buffer::Q, Axis::QueryHeads, q_dims.clone()),
            (&a.k, Buffer::K, Axis::KvHeads, kv_dims.clone()),
            (&a.v, Buffer::V, Axis::KvHeads, kv_dims),
        ] {
            push(
                &mut ops,
                OpKind::Linear {
                    tensor: linear.weight.clone(),
                    bias: linear.bias.clone(),
                    parallel: Parallel::Column,
                    extent,
                    input: Buffer::Normed,
                    output: out,
                },
                split(axis),
            );
        }
        if let Some((q_norm, k_norm)) = &a.qk_norm {
            push(
                &mut ops,
                OpKind::HeadNorm {
                    layer,
                    q_tensor: q_norm.clone(),
                    k_tensor: k_norm.clone(),
                },
                split(Axis::QueryHeads),
            );
        }
        push(
            &mut ops,
            OpKind::Rope {
                layer,
                freq_factors: config.ropes[a.rope].freq_factors.clone(),
            },
            split(Axis::QueryHeads),
        );
        push(
            &mut ops,
            OpKind::Attention { layer },
            split(Axis::QueryHeads),
        );
        push(
            &mut ops,
            OpKind::Linear {
                tensor: a.output.weight.clone(),
                bias: None,
                parallel: Parallel::Row,
                extent: q_dims,
                input: Buffer::Attention,
                output: Buffer::Partial,
            },
            partial.clone(),
        );
        add_to_residual(&mut ops, &a.post_norm, &a.output.bias, false);
        push(
            &mut ops,
            OpKind::RmsNorm {
                tensor: spec.ffn_norm.clone(),
                input: Buffer::Residual,
                output: Buffer::Normed,
            },
            SplitState::Mirrored,
        );
        match &spec.ffn {
            // The experts' weighted sum stays Partial: one AllReduce, as for a dense FFN.
            FfnSpec::Moe(_) => push(&mut ops, OpKind::Moe { layer }, partial.clone()),
            FfnSpec::Gated {
                activation,
                gate,
                up,
                down,
            } => {
                for (tensor, out) in [(gate, Buffer::Gate), (up, Buffer::Up)] {
                    push(
                        &mut ops,
                        OpKind::Linear {
                            tensor: tensor.clone(),
                            bias: None,
                            parallel: Parallel::Column,
                            extent: s.ffn_columns.clone(),
                            input: Buffer::Normed,
                            output: out,
                        },
                        split(Axis::FfnColumns),
                    );
                }
                push(
                    &mut ops,
                    OpKind::Glu {
                        activation: *activation,
                    },
                    split(Axis::FfnColumns),
                );
                push(
                    &mut ops,
                    OpKind::Linear {
                        tensor: down.clone(),
                        bias: None,
                        parallel: Parallel::Row,
                        extent: s.ffn_columns.clone(),
                        input: Buffer::Gate,
                        output: Buffer::Partial,
                    },
                    partial.clone(),
                );
            }
        }
        let routed_bias = matches!(&spec.ffn, FfnSpec::Moe(m) if m.down_bias.is_some());
        add_to_residual(&mut ops, &spec.ffn_post_norm, &None, routed_bias);
    }
    if !stage.is_last() {
        push(&mut ops, OpKind::Send, SplitState::Mirrored);
        return ops;
    }
    push(
        &mut ops,
        OpKind::RmsNorm {
            tensor: config.output_norm.clone(),
            input: Buffer::Residual,
            output: Buffer::Normed,
        },
        SplitState::Mirrored,
    );
    push(
        &mut ops,
        OpKind::Linear {
            tensor: config.output.clone(),
            bias: None,
            parallel: Parallel::Column,
            extent: shard.vocab_rows.clone(),
            input: Buffer::Normed,
            output: Buffer::Logits,
        },
        split(Axis::Vocab),
    );
    // Sampling needs whole logits; the coordinator merges the vocab slices (DESIGN section 5).
    push(&mut ops, OpKind::EmitLogits, SplitState::Mirrored);
    ops
}

/// Number of AllReduces one forward pass performs.
pub fn collective_count(program: &[Op]) -> usize {
    program
        .iter()
        .filter(|op| matches!(op.kind, OpKind::AllReduce { .. }))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::arch::{MoeConfig, test_config};

    fn config(
        heads: usize,
        kv: usize,
        ffn: usize,
        block: usize,
        vocab: usize,
        layers: usize,
    ) -> ModelConfig {
        with_moe(heads, kv, ffn, block, vocab, layers, None)
    }

    fn with_moe(
        heads: usize,
        kv: usize,
        ffn: usize,
        block: usize,
        vocab: usize,
        layers: usize,
        moe: Option<MoeConfig>,
    ) -> ModelConfig {
        let mut c = test_config(heads, kv, ffn, vocab, layers, moe);
        c.ffn_down_block = vec![block; layers];
        c
    }

    /// A small xorshift generator: failures print the seed that replays them.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn invariants_hold_for_many_shapes_and_rank_counts() {
        let seed = 0x7e57_5eed_u64;
        let mut rng = Rng(seed);
        for case in 0..2000 {
            let kv = 1 + rng.below(8);
            let heads = kv * (1 + rng.below(8));
            let block = [1, 32, 256][rng.below(3)];
            let ffn = block * (1 + rng.below(64));
            let vocab = 1 + rng.below(100_000);
            let layers = 1 + rng.below(6);
            let ranks = 1 + rng.below(MAX_RANKS);
            let weights: Vec<f64> = (0..ranks)
                .map(|_| [1.0, 1.0, 2.0, 0.5, 3.0][rng.below(5)])
                .collect();
            // Half the cases are mixtures of experts, split either way, some with a shared
            // expert.
            let split = [MoeSplit::Tensor, MoeSplit::Expert][rng.below(2)];
            let moe = (rng.below(2) == 1).then(|| {
                let expert_count = 1 + rng.below(64);
                MoeConfig {
                    expert_count,
                    expert_used: 1 + rng.below(expert_count),
                    normalize_selected: true,
                    softmax_selected: false,
                    activation: crate::model::arch::Activation::Silu,
                    shared_ffn_dim: (rng.below(2) == 1).then(|| block * (1 + rng.below(16))),
                    shared_down_block: vec![block; layers],
                }
            });
            let cfg = with_moe(heads, kv, ffn, block, vocab, layers, moe);
            let context = format!(
                "seed {seed:#x} case {case}: {heads}h/{kv}kv ffn {ffn}/{block} x{ranks} {weights:?} moe {:?} {split:?}",
                cfg.moe
            );
            // A third of the cases are pipelines: consecutive ranks cut into stages.
            let stage_count = if rng.below(3) == 0 {
                1 + rng.below(ranks.min(layers))
            } else {
                1
            };
            let mut cuts: Vec<usize> = (1..ranks).collect();
            while cuts.len() > stage_count - 1 {
                cuts.remove(rng.below(cuts.len()));
            }
            let bounds: Vec<usize> = std::iter::once(0).chain(cuts).chain([ranks]).collect();
            let stages: Vec<usize> = bounds.windows(2).map(|w| w[1] - w[0]).collect();
            let context = format!("{context} stages {stages:?}");
            let p = match plan_stages(&cfg, &weights, split, &stages) {
                Ok(p) => p,
                // Weights may leave a stage no layer: the only refusal allowed.
                Err(PlanError::Invalid(e)) if e.contains("gets no layer") => continue,
                Err(e) => panic!("{context}: {e}"),
            };
            check_plan(&cfg, &p).unwrap_or_else(|e| panic!("{context}: {e}"));
            for shard in &p.ranks {
                check_rank_shard(&cfg, shard).unwrap_or_else(|e| panic!("{context}: {e}"));
                let program = shard_program(&cfg, shard);
                // Every Partial is consumed by exactly one AllReduce, and nothing else reduces.
                for (i, op) in program.iter().enumerate() {
                    if op.output_state == SplitState::Partial {
                        assert!(
                            matches!(program[i + 1].kind, OpKind::AllReduce { .. }),
                            "{context}: Partial at op {i} not reduced"
                        );
                    }
                    if matches!(op.kind, OpKind::AllReduce { .. }) {
                        assert_eq!(
                            program[i - 1].output_state,
                            SplitState::Partial,
                            "{context}"
                        );
                    }
                }
                let expected = if shard.group_size() == 1 {
                    0
                } else {
                    1 + 2 * shard.stage.layers.len()
                };
                assert_eq!(collective_count(&program), expected, "{context}");
                let sends = program.iter().filter(|op| op.kind == OpKind::Send).count();
                let receives = program
                    .iter()
                    .filter(|op| op.kind == OpKind::Receive)
                    .count();
                assert_eq!(sends, usize::from(!shard.stage.is_last()), "{context}");
                assert_eq!(receives, usize::from(!shard.stage.is_first()), "{context}");
            }
        }
    }

    #[test]
    fn uneven_split_follows_weights_and_rotates_remainders() {
        assert_eq!(split_units(19, &[1.0, 1.0], 0), vec![0..10, 10..19]);
        assert_eq!(split_units(19, &[1.0, 1.0], 1), vec![0..9, 9..19]);
        assert_eq!(split_units(3, &[2.0, 1.0], 0), vec![0..2, 2..3]);
        assert_eq!(
            split_units(9, &[1.0, 1.0, 1.0, 1.0], 2),
            vec![0..2, 2..4, 4..7, 7..9]
        );
        // SmolLM2's 3 KV heads over 2 ranks alternate 2/1 and 1/2 across layers.
        let cfg = config(9, 3, 1536, 32, 49152, 4);
        let p = plan(&cfg, &[1.0, 1.0]).unwrap();
        let kv: Vec<usize> = p.ranks[0].layers.iter().map(|l| l.kv_heads.len()).collect();
        assert_eq!(kv, vec![2, 1, 2, 1]);
        // Qwen2.5-0.5B's FFN of 4864 with K-quant ffn_down is 19 blocks: 10 and 9.
        let cfg = config(14, 2, 4864, 256, 151936, 1);
        let p = plan(&cfg, &[1.0, 1.0]).unwrap();
        assert_eq!(p.ranks[0].layers[0].ffn_columns, 0..2560);
        assert_eq!(p.ranks[1].layers[0].ffn_columns, 2560..4864);
        // Three ranks outnumber 2 KV heads: split by query head, KV heads replicated where shared.
        let p = plan(&cfg, &[1.0, 1.0, 1.0]).unwrap();
        assert_eq!(p.attention_unit, AttentionUnit::QueryHead);
        assert_eq!(p.ranks[1].layers[0].kv_heads, 0..2);
    }

    #[test]
    fn stages_take_layers_by_weight_and_split_inside() {
        let cfg = config(9, 3, 1536, 32, 49152, 30);
        // PP 2 x TP 2: 15 layers each; inside a stage, layer l splits as two ranks do.
        let p = plan_stages(&cfg, &[1.0; 4], MoeSplit::Tensor, &[2, 2]).unwrap();
        assert_eq!(p.stages[0].layers, 0..15);
        assert_eq!(p.stages[1].layers, 15..30);
        let two = plan(&cfg, &[1.0, 1.0]).unwrap();
        for layer in 0..30 {
            let (a, b) = if layer < 15 { (0, 1) } else { (2, 3) };
            assert_eq!(p.ranks[a].layers[layer], two.ranks[0].layers[layer]);
            assert_eq!(p.ranks[b].layers[layer], two.ranks[1].layers[layer]);
        }
        // The first stage embeds, the last holds the output head.
        assert_eq!(p.ranks[0].embed_rows, two.ranks[0].vocab_rows);
        assert!(p.ranks[2].embed_rows.is_empty() && p.ranks[0].vocab_rows.is_empty());
        assert_eq!(p.ranks[3].vocab_rows, two.ranks[1].vocab_rows);
        // Stage weights: 3 : 1 gives 23 and 7 layers (22.5 rounds up for the first).
        let p = plan_stages(&cfg, &[2.0, 1.0, 1.0], MoeSplit::Tensor, &[2, 1]).unwrap();
        assert_eq!(p.stages[0].layers.len() + p.stages[1].layers.len(), 30);
        assert!(p.stages[0].layers.len() >= 22);
    }

    #[test]
    fn bad_stages_are_errors() {
        let cfg = config(9, 3, 1536, 32, 49152, 2);
        let err = |weights: &[f64], stages: &[usize]| {
            plan_stages(&cfg, weights, MoeSplit::Tensor, stages)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&[1.0; 2], &[1, 1, 0]).contains("need between 1 and 2"));
        assert!(err(&[1.0; 3], &[1, 1, 1]).contains("every stage needs a layer"));
        assert!(err(&[1.0; 3], &[2, 0, 1]).contains("stage 1 has no workers"));
        assert!(err(&[1.0; 3], &[1, 1]).contains("do not add up"));
        assert!(err(&[100.0, 1.0], &[1, 1]).contains("gets no layer"));
    }

    #[test]
    fn bad_rank_counts_and_weights_are_errors() {
        let cfg = config(9, 3, 1536, 32, 49152, 2);
        assert!(matches!(plan(&cfg, &[]), Err(PlanError::RankCount(0))));
        assert!(matches!(
            plan(&cfg, &[1.0; 17]),
            Err(PlanError::RankCount(17))
        ));
        assert!(matches!(plan(&cfg, &[1.0, 0.0]), Err(PlanError::Weight(_))));
        assert!(matches!(
            plan(&cfg, &[1.0, f64::NAN]),
            Err(PlanError::Weight(_))
        ));
    }
}
