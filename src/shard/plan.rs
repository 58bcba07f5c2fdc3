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

/// One rank's share of the model: what it loads and computes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RankShard {
    pub rank_index: usize,
    pub rank_count: usize,
    pub vocab_rows: Range<usize>,
    pub layers: Vec<LayerShard>,
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub ranks: Vec<RankShard>,
    /// Attention splits by KV group, or by query head when ranks outnumber KV heads.
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
    let rank_count = weights.len();
    if rank_count == 0 || rank_count > MAX_RANKS {
        return Err(PlanError::RankCount(rank_count));
    }
    if let Some(&w) = weights.iter().find(|w| !(w.is_finite() && **w > 0.0)) {
        return Err(PlanError::Weight(w));
    }
    let group = config.group_size();
    let attention_unit = if rank_count <= config.kv_head_count {
        AttentionUnit::KvGroup
    } else {
        AttentionUnit::QueryHead
    };
    let mut ranks: Vec<RankShard> = (0..rank_count)
        .map(|rank_index| RankShard {
            rank_index,
            rank_count,
            vocab_rows: 0..0,
            layers: Vec::new(),
        })
        .collect();
    for layer in 0..config.layer_count {
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
        let rank_count = weights.len();
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
        for (rank, ((q_heads, kv_heads), ((ffn_columns, experts), shared_columns))) in heads
            .into_iter()
            .zip(ffn.into_iter().zip(experts).zip(shared))
            .enumerate()
        {
            ranks[rank].layers.push(LayerShard {
                q_heads,
                kv_heads,
                ffn_columns,
                experts,
                shared_columns,
            });
        }
    }
    for (rank, rows) in split_units(config.vocab_size, weights, config.layer_count)
        .into_iter()
        .enumerate()
    {
        ranks[rank].vocab_rows = rows;
    }
    let plan = Plan {
        ranks,
        attention_unit,
    };
    check_plan(config, &plan).map_err(PlanError::Invalid)?;
    Ok(plan)
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
    check_cover(
        plan.ranks.iter().map(|r| r.vocab_rows.clone()),
        config.vocab_size,
        1,
    )?;
    for layer in 0..config.layer_count {
        let shards: Vec<&LayerShard> = plan.ranks.iter().map(|r| &r.layers[layer]).collect();
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
                check_expert_cover(&shards, m.expert_count, config.ffn_dim)
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
        for shard in &shards {
            check_layer_shard(config, layer, shard)?;
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
    if shard.rank_count == 0 || shard.rank_index >= shard.rank_count || shard.rank_count > MAX_RANKS
    {
        return Err(format!(
            "rank {} of {} is not a valid rank",
            shard.rank_index, shard.rank_count
        ));
    }
    if shard.vocab_rows.start > shard.vocab_rows.end || shard.vocab_rows.end > config.vocab_size {
        return Err(format!(
            "vocab rows {:?} exceed the vocabulary of {}",
            shard.vocab_rows, config.vocab_size
        ));
    }
    if shard.layers.len() != config.layer_count {
        return Err(format!(
            "shard has {} layers, the model {}",
            shard.layers.len(),
            config.layer_count
        ));
    }
    for (layer, s) in shard.layers.iter().enumerate() {
        check_layer_shard(config, layer, s)?;
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
    let distributed = shard.rank_count > 1;
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
    push(
        &mut ops,
        OpKind::Embed {
            tensor: config.embedding.clone(),
            scale: config.embedding_scale,
        },
        partial.clone(),
    );
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
            let p = plan_with(&cfg, &weights, split).unwrap_or_else(|e| panic!("{context}: {e}"));
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
                let expected = if ranks == 1 { 0 } else { 1 + 2 * layers };
                assert_eq!(collective_count(&program), expected, "{context}");
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
