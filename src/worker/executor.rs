//! Runs a rank's shard program over a batch of positions.
//!
//! Buffers are sized at load from the configured maximum batch, and the program is resolved
//! once into ops that hold their tensors directly, so a step does no lookups and no allocation
//! beyond its reply.

use std::sync::Arc;

use std::cell::RefCell;

use half::f16;

use crate::kernels::cpu::{
    AttendScratch, PreparedActivations, QuantType, attend, attend_typed, hadamard_rotate, matmul,
    matmul_f64, sum_exp,
};
use crate::kernels::pool;
use crate::model::arch::{Activation, FfnSpec, ModelConfig, RopeSpec, RopeStyle};
use crate::shard::plan::{Buffer, OpKind, RankShard, shard_program};
use crate::transport::{Collective, TransportError};
use crate::worker::backend::Backend;
use crate::worker::kv::{KvCache, KvLayout};
use crate::worker::moe::{MoeLayer, MoeScratch, SharedExpert};
use crate::worker::shard::{LoadedShard, Weight};
use crate::worker::slots::{self, SavedShard};

thread_local! {
    /// Per-thread attention scratch: the query in f16 and the scores (f16 cache), and the
    /// scratch of the other cache types.
    static SCRATCH: RefCell<(Vec<f16>, Vec<f32>, TypedScratch)> =
        RefCell::new((Vec::new(), Vec::new(), TypedScratch::default()));
}

/// The output of a parallel op; tasks write disjoint parts of it.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: only used by tasks that write disjoint elements (see each use).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}
impl SharedOut {
    /// The element at `index` (a method, so closures capture the whole wrapper).
    fn at(self, index: usize) -> *mut f32 {
        self.0.wrapping_add(index)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("{0}")]
    Invalid(String),
}

enum Exec {
    Embed {
        weight: Arc<Weight>,
        scale: Option<f32>,
    },
    RmsNorm {
        weight: Vec<f32>,
        input: Buffer,
        output: Buffer,
    },
    Linear {
        weight: Arc<Weight>,
        bias: Option<Vec<f32>>,
        input: Buffer,
        output: Buffer,
    },
    HeadNorm {
        q_weight: Vec<f32>,
        k_weight: Vec<f32>,
        q_heads: usize,
        kv_heads: usize,
    },
    Rope {
        table: usize,
        q_heads: usize,
        kv_heads: usize,
    },
    Attention(AttentionExec),
    Glu {
        width: usize,
        activation: Activation,
    },
    Moe(Box<MoeLayer>),
    /// Residual += the reduced partial sum, RMS-normed first with `norm` where given; plus a
    /// bias added once, after the AllReduce (the attention output's), or the weighted sum of
    /// the selected experts' output biases the MoE op left (`routed_bias`).
    AddResidual {
        norm: Option<Vec<f32>>,
        bias: Option<Vec<f32>>,
        routed_bias: bool,
    },
    /// `keep`: the sum must stay in `partial` for a normed residual add, rather than being
    /// added to the residual stream straight from the transport's staging.
    AllReduce {
        buffer: Buffer,
        keep: bool,
    },
    /// The AllReduce that hands a later stage's input to its ranks: it waits as long as the
    /// previous stage computes.
    PatientAllReduce {
        buffer: Buffer,
    },
    /// The vocab-parallel output head, applied only to the rows whose logits are wanted.
    OutputHead {
        weight: Arc<Weight>,
    },
    EmitLogits,
    /// A later stage's start: the previous stage's residual stream (on the stage's first rank;
    /// zeros on the others, the AllReduce that follows completes it).
    Receive {
        first: bool,
    },
    /// A stage's end before the last: the first rank sends the residual stream on.
    Send {
        first: bool,
    },
}

#[derive(Clone, Copy)]
struct AttentionExec {
    layer: usize,
    q_start: usize,
    q_heads: usize,
    kv_start: usize,
    kv_heads: usize,
    window: Option<usize>,
    scale: f32,
    /// Index into `CpuBackend::sinks`: this rank's heads' sink logits.
    sinks: Option<usize>,
}

/// One RoPE table's parameters and this step's rotations, per (position, pair).
struct RopeTable {
    spec: RopeSpec,
    /// Some layer rotates with this table; an unused one is not computed.
    used: bool,
    factors: Option<Vec<f32>>,
    rotations: Vec<(f32, f32)>,
}

/// What the coordinator asked for, per output row.
pub struct OutputRequest {
    pub rows: Vec<usize>,
    pub top_k: usize,
    pub full_logits: bool,
    pub targets: Vec<u32>,
}

pub struct RowResult {
    pub ids: Vec<u32>,
    pub logits: Vec<f32>,
    pub log_sum_exp: f32,
    pub full: Vec<f32>,
    pub target_logit: Option<f32>,
}

/// The CPU backend: the shard program resolved into ops over CPU kernels.
pub struct CpuBackend {
    config: ModelConfig,
    /// The output head's vocabulary rows (last stage).
    vocab_start: usize,
    /// The embedding's rows (first stage).
    embed_start: usize,
    embed_rows: usize,
    program: Vec<Exec>,
    buffers: Vec<Vec<f32>>,
    prepared: PreparedActivations,
    /// What `prepared` holds: Q/K/V (and gate/up) read the same normed input with the same
    /// weight type, so it is quantized once for all of them.
    prepared_key: Option<(Buffer, QuantType, usize)>,
    kv: KvCache,
    max_batch: usize,
    ropes: Vec<RopeTable>,
    /// Gathered final-norm rows whose logits are wanted.
    logits_input: Vec<f32>,
    /// Row-parallel outputs, accumulated and reduced in f64 so that the f32 residual does not
    /// depend on how the row was split across ranks.
    partial: Vec<f64>,
    /// The last op that feeds an AllReduce (embedding, row-parallel linear) wrote into the
    /// collective's staging: the planner puts the AllReduce right after it.
    staged: bool,
    /// The staged AllReduce already added its sum to the residual stream.
    residual_added: bool,
    /// Time inside AllReduce during the last step, and how many it ran.
    collective_time: std::time::Duration,
    collectives: u32,
    /// Bytes this rank contributed to the last step's AllReduces.
    collective_bytes: u64,
    moe_scratch: MoeScratch,
    /// One row of a reduced sum being normed before the residual add.
    norm_row: Vec<f32>,
    /// Attention sink logits of this rank's query heads, per layer that has them.
    sinks: Vec<Vec<f32>>,
}

/// Per-thread scratch of attention over a cache stored in other types than f16.
#[derive(Default)]
struct TypedScratch {
    scratch: AttendScratch,
    /// The query, rotated for a quantized key cache.
    rotated_query: Vec<f32>,
}

fn slot(buffer: Buffer) -> usize {
    buffer as usize
}

impl CpuBackend {
    pub fn new(
        config: &ModelConfig,
        shard: &RankShard,
        mut loaded: LoadedShard,
        max_batch: usize,
        kv_layout: KvLayout,
    ) -> Result<CpuBackend, StepError> {
        let hd = config.head_dim;
        kv_layout
            .types
            .check_head_dim(hd)
            .map_err(StepError::Invalid)?;
        let missing = |name: &str| StepError::Invalid(format!("shard lacks tensor '{name}'"));
        let mut weights: std::collections::HashMap<String, Arc<Weight>> = loaded
            .weights
            .drain()
            .map(|(k, v)| (k, Arc::new(v)))
            .collect();
        let mut program = Vec::new();
        let mut sinks: Vec<Vec<f32>> = Vec::new();
        let mut max_width = [0usize; 10];
        max_width[slot(Buffer::Residual)] = config.model_dim;
        max_width[slot(Buffer::Normed)] = config.model_dim;
        for op in shard_program(config, shard) {
            program.push(match op.kind {
                OpKind::Embed { tensor, scale } => Exec::Embed {
                    weight: weights
                        .get(&tensor)
                        .cloned()
                        .ok_or_else(|| missing(&tensor))?,
                    scale,
                },
                OpKind::RmsNorm {
                    tensor,
                    input,
                    output,
                } => Exec::RmsNorm {
                    weight: loaded
                        .vectors
                        .remove(&tensor)
                        .ok_or_else(|| missing(&tensor))?,
                    input,
                    output,
                },
                OpKind::Linear {
                    tensor,
                    output: Buffer::Logits,
                    ..
                } => Exec::OutputHead {
                    weight: weights
                        .get(&tensor)
                        .cloned()
                        .ok_or_else(|| missing(&tensor))?,
                },
                OpKind::Linear {
                    tensor,
                    bias,
                    input,
                    output,
                    ..
                } => {
                    let weight = weights
                        .get(&tensor)
                        .cloned()
                        .ok_or_else(|| missing(&tensor))?;
                    let bias = match bias {
                        Some(b) => Some(loaded.vectors.remove(&b).ok_or_else(|| missing(&b))?),
                        None => None,
                    };
                    max_width[slot(output)] = max_width[slot(output)].max(weight.rows);
                    max_width[slot(input)] = max_width[slot(input)].max(weight.cols);
                    Exec::Linear {
                        weight,
                        bias,
                        input,
                        output,
                    }
                }
                OpKind::HeadNorm {
                    layer,
                    q_tensor,
                    k_tensor,
                } => {
                    let s = &shard.layers[layer];
                    let mut vector =
                        |name: &str| loaded.vectors.remove(name).ok_or_else(|| missing(name));
                    Exec::HeadNorm {
                        q_weight: vector(&q_tensor)?,
                        k_weight: vector(&k_tensor)?,
                        q_heads: s.q_heads.len(),
                        kv_heads: s.kv_heads.len(),
                    }
                }
                OpKind::Moe { layer } => {
                    let (Some(moe), FfnSpec::Moe(tensors)) =
                        (config.moe.as_ref(), &config.layers[layer].ffn)
                    else {
                        return Err(StepError::Invalid(
                            "a mixture-of-experts op in a dense model".into(),
                        ));
                    };
                    let weight =
                        |name: &String| weights.get(name).cloned().ok_or_else(|| missing(name));
                    let s = &shard.layers[layer];
                    let shared = match &tensors.shared {
                        None => None,
                        Some(t) => Some(SharedExpert {
                            gate_input: loaded
                                .vectors
                                .remove(&t.gate_input)
                                .ok_or_else(|| missing(&t.gate_input))?,
                            gate: weight(&t.gate)?,
                            up: weight(&t.up)?,
                            down: weight(&t.down)?,
                        }),
                    };
                    // Bias matrices (F32) as values: this rank's columns of its experts, or
                    // every expert's output bias.
                    let f32_matrix =
                        |name: &Option<String>| -> Result<Option<Vec<f32>>, StepError> {
                            let Some(name) = name else { return Ok(None) };
                            let w = weight(name)?;
                            if w.ty != QuantType::F32 {
                                return Err(StepError::Invalid(format!("{name} is not F32")));
                            }
                            Ok(Some(
                                w.data
                                    .chunks_exact(4)
                                    .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                                    .collect(),
                            ))
                        };
                    let index = layer;
                    let layer = MoeLayer {
                        router: weight(&tensors.router)?,
                        gate: weight(&tensors.gate)?,
                        up: weight(&tensors.up)?,
                        down: weight(&tensors.down)?,
                        experts: s.experts.clone(),
                        width: s.ffn_columns.len(),
                        expert_used: moe.expert_used,
                        normalize_selected: moe.normalize_selected,
                        shared,
                        softmax_selected: moe.softmax_selected,
                        activation: moe.activation,
                        router_bias: match &tensors.router_bias {
                            Some(n) => {
                                Some(loaded.vectors.get(n).cloned().ok_or_else(|| missing(n))?)
                            }
                            None => None,
                        },
                        gate_bias: f32_matrix(&tensors.gate_bias)?,
                        up_bias: f32_matrix(&tensors.up_bias)?,
                        down_bias: f32_matrix(&tensors.down_bias)?,
                    };
                    let local = layer.experts.len();
                    if layer.router.rows != moe.expert_count
                        || layer.gate.rows != local * layer.width
                        || layer.up.rows != layer.gate.rows
                        || (layer.width > 0 && layer.down.rows != local * config.model_dim)
                    {
                        return Err(StepError::Invalid(format!(
                            "layer {index}: expert slices do not match the shard (experts {:?}, \
                             {} columns each)",
                            s.experts, layer.width
                        )));
                    }
                    Exec::Moe(Box::new(layer))
                }
                OpKind::Rope { layer, .. } => {
                    let s = &shard.layers[layer];
                    Exec::Rope {
                        table: config.layers[layer].attention.rope,
                        q_heads: s.q_heads.len(),
                        kv_heads: s.kv_heads.len(),
                    }
                }
                OpKind::Attention { layer } => {
                    let s = &shard.layers[layer];
                    let spec = &config.layers[layer].attention;
                    max_width[slot(Buffer::Attention)] =
                        max_width[slot(Buffer::Attention)].max(s.q_heads.len() * hd);
                    let sink_index = match &spec.sinks {
                        Some(name) => {
                            let values =
                                loaded.vectors.remove(name).ok_or_else(|| missing(name))?;
                            if values.len() != s.q_heads.len() {
                                return Err(StepError::Invalid(format!(
                                    "{name}: {} sink logits for {} query heads",
                                    values.len(),
                                    s.q_heads.len()
                                )));
                            }
                            sinks.push(values);
                            Some(sinks.len() - 1)
                        }
                        None => None,
                    };
                    Exec::Attention(AttentionExec {
                        layer,
                        q_start: s.q_heads.start,
                        q_heads: s.q_heads.len(),
                        kv_start: s.kv_heads.start,
                        kv_heads: s.kv_heads.len(),
                        window: spec.window,
                        scale: spec.scale,
                        sinks: sink_index,
                    })
                }
                OpKind::Glu { activation } => Exec::Glu {
                    width: 0,
                    activation,
                },
                OpKind::AddResidual {
                    norm,
                    bias,
                    routed_bias,
                } => {
                    if norm.is_some() && (bias.is_some() || routed_bias) {
                        return Err(StepError::Invalid(
                            "a bias on a sum that is normed before the residual add".into(),
                        ));
                    }
                    let vector = |name: Option<String>| match name {
                        Some(n) => loaded
                            .vectors
                            .get(&n)
                            .cloned()
                            .map(Some)
                            .ok_or_else(|| missing(&n)),
                        None => Ok(None),
                    };
                    Exec::AddResidual {
                        norm: vector(norm)?,
                        bias: vector(bias)?,
                        routed_bias,
                    }
                }
                OpKind::AllReduce { buffer, .. } => Exec::AllReduce {
                    buffer,
                    keep: false,
                },
                OpKind::EmitLogits => Exec::EmitLogits,
                OpKind::Receive => Exec::Receive {
                    first: shard.group_index() == 0,
                },
                OpKind::Send => Exec::Send {
                    first: shard.group_index() == 0,
                },
            });
        }
        // A GLU's width is the FFN slice of the linear before it; an AllReduce before a normed
        // residual add keeps its sum.
        for i in 0..program.len() {
            if let Exec::Glu { activation, .. } = program[i]
                && let Exec::Linear { weight, .. } = &program[i - 1]
            {
                program[i] = Exec::Glu {
                    width: weight.rows,
                    activation,
                };
            }
            if let Exec::AllReduce { buffer, .. } = program[i]
                && matches!(program[i - 1], Exec::Receive { .. })
            {
                program[i] = Exec::PatientAllReduce { buffer };
            }
            if let Exec::AllReduce { buffer, .. } = program[i]
                && let Some(Exec::AddResidual {
                    norm,
                    bias,
                    routed_bias,
                }) = program.get(i + 1)
                && (norm.is_some() || bias.is_some() || *routed_bias)
            {
                program[i] = Exec::AllReduce { buffer, keep: true };
            }
        }
        let mut ropes = Vec::with_capacity(config.ropes.len());
        for (index, spec) in config.ropes.iter().enumerate() {
            // Only this stage's layers count.
            let used = config.layers[shard.stage.layers.clone()]
                .iter()
                .any(|l| l.attention.rope == index);
            let factors = match &spec.freq_factors {
                // A table no layer uses has no Rope op, so its factors were not loaded.
                _ if !used => None,
                // Shared by every layer with this table: read, not taken.
                Some(name) => {
                    let f = loaded
                        .vectors
                        .get(name)
                        .cloned()
                        .ok_or_else(|| missing(name))?;
                    if f.len() != spec.dim / 2 || f.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
                        return Err(StepError::Invalid(format!(
                            "'{name}' must hold {} positive frequency factors",
                            spec.dim / 2
                        )));
                    }
                    Some(f)
                }
                None => None,
            };
            ropes.push(RopeTable {
                spec: spec.clone(),
                used,
                factors,
                rotations: Vec::new(),
            });
        }
        weights.clear();
        let buffers = max_width
            .iter()
            .map(|&w| vec![0f32; w * max_batch])
            .collect();
        let kv_heads: Vec<usize> = shard.layers.iter().map(|l| l.kv_heads.len()).collect();
        let kv = KvCache::new(&kv_heads, hd, kv_layout);
        Ok(CpuBackend {
            config: config.clone(),
            vocab_start: shard.vocab_rows.start,
            embed_start: shard.embed_rows.start,
            embed_rows: shard.embed_rows.len(),
            program,
            buffers,
            prepared: PreparedActivations::new(),
            prepared_key: None,
            kv,
            max_batch,
            ropes,
            logits_input: vec![0f32; config.model_dim * max_batch],
            partial: vec![0f64; config.model_dim * max_batch],
            staged: false,
            residual_added: false,
            collective_time: std::time::Duration::ZERO,
            collectives: 0,
            collective_bytes: 0,
            moe_scratch: MoeScratch::default(),
            norm_row: vec![0f32; config.model_dim],
            sinks,
        })
    }
}

impl Backend for CpuBackend {
    fn kv_cache_bytes(&self) -> u64 {
        self.kv.bytes()
    }

    fn save_sequence(
        &self,
        path: &std::path::Path,
        shard: &SavedShard,
        sequence: usize,
        tokens: &[u32],
    ) -> Result<u64, String> {
        slots::save(path, shard, &self.kv, sequence, tokens)
    }

    fn restore_sequence(
        &mut self,
        path: &std::path::Path,
        shard: &SavedShard,
        sequence: usize,
    ) -> Result<(Vec<u32>, u64), String> {
        slots::restore(path, shard, &mut self.kv, sequence)
    }

    fn clear_sequence(&mut self, sequence: usize) {
        self.kv.clear(sequence);
    }

    fn set_block_table(
        &mut self,
        sequence: usize,
        first: usize,
        blocks: &[u32],
    ) -> Result<(), String> {
        self.kv.set_table(sequence, first, blocks)
    }

    fn collective_stats(&self) -> (f64, u32, u64) {
        (
            self.collective_time.as_secs_f64(),
            self.collectives,
            self.collective_bytes,
        )
    }

    fn vocab_start(&self) -> usize {
        self.vocab_start
    }

    fn step(
        &mut self,
        collective: &mut dyn Collective,
        tokens: &[u32],
        positions: &[u32],
        sequences: &[u32],
        output: &OutputRequest,
    ) -> Result<Vec<RowResult>, StepError> {
        let batch = tokens.len();
        if batch == 0
            || batch > self.max_batch
            || positions.len() != batch
            || sequences.len() != batch
        {
            return Err(StepError::Invalid(format!(
                "batch of {batch} tokens ({} positions, {} sequences) is empty or exceeds the maximum of {}",
                positions.len(),
                sequences.len(),
                self.max_batch
            )));
        }
        for (&p, &s) in positions.iter().zip(sequences) {
            self.kv
                .check(s as usize, p as usize)
                .map_err(StepError::Invalid)?;
        }
        if let Some(&t) = tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(StepError::Invalid(format!(
                "token {t} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        if let Some(&r) = output.rows.iter().find(|&&r| r >= batch) {
            return Err(StepError::Invalid(format!(
                "output row {r} is outside the batch of {batch}"
            )));
        }
        self.compute_rope(positions);
        let d = self.config.model_dim;
        let program = std::mem::take(&mut self.program);
        let result = (|| {
            let mut results = Vec::new();
            self.prepared_key = None;
            self.staged = false;
            self.residual_added = false;
            self.collective_time = std::time::Duration::ZERO;
            self.collectives = 0;
            self.collective_bytes = 0;
            for op in &program {
                let reduce_started =
                    matches!(op, Exec::AllReduce { .. } | Exec::PatientAllReduce { .. })
                        .then(std::time::Instant::now);
                if !matches!(op, Exec::Linear { .. }) {
                    // Any other op may rewrite the buffer the activations were prepared from.
                    self.prepared_key = None;
                }
                match op {
                    Exec::Embed { weight, scale } => {
                        self.embed(collective, weight, *scale, tokens)?
                    }
                    Exec::RmsNorm {
                        weight,
                        input,
                        output,
                    } => self.rms_norm(weight, *input, *output, batch),
                    Exec::Linear {
                        weight,
                        input,
                        output: Buffer::Partial,
                        ..
                    } => self.linear_partial(collective, weight, *input, batch)?,
                    Exec::Linear {
                        weight,
                        bias,
                        input,
                        output,
                    } => self.linear(weight, bias.as_deref(), *input, *output, batch),
                    Exec::HeadNorm {
                        q_weight,
                        k_weight,
                        q_heads,
                        kv_heads,
                    } => {
                        self.head_norm(Buffer::Q, q_weight, *q_heads, batch);
                        self.head_norm(Buffer::K, k_weight, *kv_heads, batch);
                    }
                    &Exec::Rope {
                        table,
                        q_heads,
                        kv_heads,
                    } => self.rope(table, q_heads, kv_heads, batch),
                    Exec::Moe(layer) => {
                        let n = d * batch;
                        let out = match collective.stage_f64(n)? {
                            Some(stage) => {
                                self.staged = true;
                                stage
                            }
                            None => &mut self.partial[..n],
                        };
                        out.fill(0.0);
                        layer.forward(
                            &self.buffers[slot(Buffer::Normed)][..n],
                            batch,
                            d,
                            out,
                            &mut self.moe_scratch,
                        );
                    }
                    Exec::Attention(a) => self.attention(a, positions, sequences),
                    &Exec::Glu { width, activation } => {
                        let n = width * batch;
                        let (gate, up) =
                            two_buffers(&mut self.buffers, slot(Buffer::Gate), slot(Buffer::Up));
                        crate::worker::moe::glu(activation, &mut gate[..n], &up[..n]);
                    }
                    Exec::AddResidual {
                        norm: Some(weight), ..
                    } => {
                        self.add_normed_residual(weight, batch);
                    }
                    Exec::AddResidual { norm: None, .. } if self.residual_added => {
                        self.residual_added = false
                    }
                    Exec::AddResidual {
                        norm: None,
                        bias,
                        routed_bias,
                    } => {
                        let residual = &mut self.buffers[slot(Buffer::Residual)];
                        let partial = &mut self.partial[..d * batch];
                        // Biases join the reduced sum once, after the AllReduce: the experts'
                        // weighted output biases in f64, the projection's bias as llama.cpp adds
                        // it, to the f32 output before the residual add.
                        if *routed_bias {
                            for (p, b) in partial
                                .iter_mut()
                                .zip(&self.moe_scratch.routed_bias[..d * batch])
                            {
                                *p += b;
                            }
                        }
                        match bias {
                            Some(bias) => {
                                for (rows, sums) in residual[..d * batch]
                                    .chunks_exact_mut(d)
                                    .zip(partial.chunks_exact(d))
                                {
                                    for ((r, p), b) in rows.iter_mut().zip(sums).zip(bias) {
                                        *r += *p as f32 + b;
                                    }
                                }
                            }
                            None => {
                                for (r, p) in residual[..d * batch].iter_mut().zip(&*partial) {
                                    *r = (*r as f64 + p) as f32;
                                }
                            }
                        }
                    }
                    Exec::AllReduce {
                        buffer: Buffer::Partial,
                        keep: true,
                    } if self.staged => {
                        // The normed residual add (the next op) reads the sum from `partial`.
                        self.staged = false;
                        let partial = &mut self.partial;
                        collective.all_reduce_staged_f64(d * batch, &mut |offset, piece| {
                            partial[offset..offset + piece.len()].copy_from_slice(piece);
                        })?;
                    }
                    Exec::AllReduce {
                        buffer: Buffer::Partial,
                        ..
                    } if self.staged => {
                        // The sum stays in shared memory; the residual add (the next op, by
                        // the planner's construction) reads it there.
                        self.staged = false;
                        let residual = &mut self.buffers[slot(Buffer::Residual)];
                        collective.all_reduce_staged_f64(d * batch, &mut |offset, piece| {
                            for (r, p) in residual[offset..].iter_mut().zip(piece) {
                                *r = (*r as f64 + p) as f32;
                            }
                        })?;
                        self.residual_added = true;
                    }
                    Exec::AllReduce {
                        buffer: Buffer::Partial,
                        ..
                    } => {
                        collective.all_reduce_sum_f64(&mut self.partial[..d * batch])?;
                    }
                    Exec::AllReduce { buffer, .. } if self.staged => {
                        self.staged = false;
                        let target = &mut self.buffers[slot(*buffer)];
                        collective.all_reduce_staged_f32(d * batch, &mut |offset, piece| {
                            target[offset..offset + piece.len()].copy_from_slice(piece);
                        })?;
                    }
                    Exec::AllReduce { buffer, .. } => {
                        collective.all_reduce_sum(&mut self.buffers[slot(*buffer)][..d * batch])?;
                    }
                    Exec::PatientAllReduce { buffer } => {
                        collective.set_patient(true);
                        let result = collective
                            .all_reduce_sum(&mut self.buffers[slot(*buffer)][..d * batch]);
                        collective.set_patient(false);
                        result?;
                    }
                    Exec::OutputHead { weight } => results = self.output_head(weight, output),
                    Exec::EmitLogits => {}
                    &Exec::Receive { first } => {
                        let residual = &mut self.buffers[slot(Buffer::Residual)][..d * batch];
                        if first {
                            collective.receive_stage(residual)?;
                        } else {
                            residual.fill(0.0);
                        }
                    }
                    &Exec::Send { first } => {
                        if first {
                            collective
                                .send_stage(&self.buffers[slot(Buffer::Residual)][..d * batch])?;
                        }
                    }
                }
                if let Some(started) = reduce_started {
                    self.collective_time += started.elapsed();
                    self.collectives += 1;
                    // The residual-sized sums are f64 (row-parallel partials), the embedding's
                    // f32.
                    let width = match op {
                        Exec::AllReduce {
                            buffer: Buffer::Partial,
                            ..
                        } => 8,
                        _ => 4,
                    };
                    self.collective_bytes += (d * batch * width) as u64;
                }
            }
            Ok(results)
        })();
        self.program = program;
        result
    }

    fn device(&self) -> &'static str {
        "cpu"
    }
}

impl CpuBackend {
    /// The embedding rows of this rank's vocabulary slice (zeros elsewhere), into the
    /// transport's staging when it offers it for this size, else into the residual stream;
    /// the AllReduce that follows completes them.
    fn embed(
        &mut self,
        collective: &mut dyn Collective,
        weight: &Weight,
        scale: Option<f32>,
        tokens: &[u32],
    ) -> Result<(), TransportError> {
        let d = self.config.model_dim;
        let n = d * tokens.len();
        let out = match collective.stage_f32(n)? {
            Some(stage) => {
                self.staged = true;
                stage
            }
            None => &mut self.buffers[slot(Buffer::Residual)][..n],
        };
        for (target, &token) in out.chunks_exact_mut(d).zip(tokens) {
            let local = (token as usize).wrapping_sub(self.embed_start);
            if local < self.embed_rows {
                crate::kernels::cpu::dequantize_row(weight.ty, weight.row(local), target);
                if let Some(scale) = scale {
                    target.iter_mut().for_each(|v| *v *= scale);
                }
            } else {
                target.fill(0.0);
            }
        }
        Ok(())
    }

    fn rms_norm(&mut self, weight: &[f32], input: Buffer, output: Buffer, batch: usize) {
        let d = self.config.model_dim;
        let eps = self.config.rms_norm_eps;
        let (x, y) = two_buffers(&mut self.buffers, slot(input), slot(output));
        for b in 0..batch {
            let row = &x[b * d..(b + 1) * d];
            let mean = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let scale = 1.0 / (mean + eps).sqrt();
            for ((o, v), w) in y[b * d..(b + 1) * d].iter_mut().zip(row).zip(weight) {
                *o = v * scale * w;
            }
        }
    }

    fn linear(
        &mut self,
        weight: &Weight,
        bias: Option<&[f32]>,
        input: Buffer,
        output: Buffer,
        batch: usize,
    ) {
        let (rows, cols) = (weight.rows, weight.cols);
        if rows == 0 {
            return;
        }
        if cols == 0 {
            // A rank without heads or columns in this layer contributes zeros.
            self.buffers[slot(output)][..rows * batch].fill(0.0);
            return;
        }
        self.prepare_input(weight, input, batch);
        let y = &mut self.buffers[slot(output)][..rows * batch];
        matmul(weight.ty, &weight.data, rows, cols, &self.prepared, y);
        if let Some(bias) = bias {
            for row in y.chunks_exact_mut(rows) {
                for (v, b) in row.iter_mut().zip(bias) {
                    *v += b;
                }
            }
        }
    }

    /// Quantizes the linear's input for its weight type, unless the last linear already did.
    fn prepare_input(&mut self, weight: &Weight, input: Buffer, batch: usize) {
        let cols = weight.cols;
        let key = (input, weight.ty, cols);
        if self.prepared_key != Some(key) {
            self.prepared.prepare(
                weight.ty,
                &self.buffers[slot(input)][..cols * batch],
                cols,
                batch,
            );
            self.prepared_key = Some(key);
        }
    }

    /// A row-parallel linear, whose f64 partial sums go to the AllReduce that follows: into
    /// the transport's shared staging when it offers it for this size (large batches), which
    /// saves copying them in and out, else into `partial`.
    fn linear_partial(
        &mut self,
        collective: &mut dyn Collective,
        weight: &Weight,
        input: Buffer,
        batch: usize,
    ) -> Result<(), TransportError> {
        let (rows, cols) = (weight.rows, weight.cols);
        let n = rows * batch;
        if cols > 0 {
            self.prepare_input(weight, input, batch);
        }
        let out = match collective.stage_f64(n)? {
            Some(stage) => {
                self.staged = true;
                stage
            }
            None => &mut self.partial[..n],
        };
        if cols == 0 {
            // A rank without heads or columns in this layer contributes zeros.
            out.fill(0.0);
        } else {
            matmul_f64(weight.ty, &weight.data, rows, cols, &self.prepared, out);
        }
        Ok(())
    }

    /// cos/sin per (position, pair) of every RoPE table, computed the way ggml does: theta
    /// multiplied by base^(-2/n_rot) pair after pair, in f32, divided by the pair's frequency
    /// factor, scaled and YaRN-blended where the table says so (`rope_yarn`).
    fn compute_rope(&mut self, positions: &[u32]) {
        for table in self.ropes.iter_mut().filter(|t| t.used) {
            let spec = &table.spec;
            let pairs = spec.dim / 2;
            let theta_scale = spec.base.powf(-2.0 / spec.dim as f32);
            table.rotations.clear();
            let plain = table.factors.is_none() && spec.freq_scale == 1.0 && spec.yarn.is_none();
            let corrections = spec.yarn.map(|y| {
                yarn_corrections(
                    spec.dim,
                    y.original_context,
                    spec.base,
                    y.beta_fast,
                    y.beta_slow,
                )
            });
            for &p in positions {
                let mut theta = p as f32;
                for i in 0..pairs {
                    if plain {
                        table.rotations.push((theta.cos(), theta.sin()));
                    } else {
                        let factor = table.factors.as_ref().map_or(1.0, |f| f[i]);
                        let extrapolated = theta / factor;
                        let interpolated = spec.freq_scale * extrapolated;
                        let (angle, magnitude) = match corrections {
                            None => (interpolated, 1.0),
                            Some((low, high)) => {
                                let y = (i as f32 - low) / (high - low).max(0.001);
                                let mix = 1.0 - y.clamp(0.0, 1.0);
                                (
                                    interpolated * (1.0 - mix) + extrapolated * mix,
                                    1.0 + 0.1 * (1.0 / spec.freq_scale).ln(),
                                )
                            }
                        };
                        table
                            .rotations
                            .push((angle.cos() * magnitude, angle.sin() * magnitude));
                    }
                    theta *= theta_scale;
                }
            }
        }
    }

    /// Residual += RMSNorm(partial) * weight: the reduced sum of a row-parallel op, rounded
    /// to f32 as an unnormed add would, then normed.
    fn add_normed_residual(&mut self, weight: &[f32], batch: usize) {
        let d = self.config.model_dim;
        let eps = self.config.rms_norm_eps;
        let residual = &mut self.buffers[slot(Buffer::Residual)];
        let row = &mut self.norm_row;
        for b in 0..batch {
            for (x, p) in row.iter_mut().zip(&self.partial[b * d..(b + 1) * d]) {
                *x = *p as f32;
            }
            let mean = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let scale = 1.0 / (mean + eps).sqrt();
            for ((r, x), w) in residual[b * d..(b + 1) * d]
                .iter_mut()
                .zip(row.iter())
                .zip(weight)
            {
                *r += x * scale * w;
            }
        }
    }

    /// RMSNorm of each head of `buffer` (QK-norm), with the same weights for every head.
    fn head_norm(&mut self, buffer: Buffer, weight: &[f32], heads: usize, batch: usize) {
        let hd = self.config.head_dim;
        let eps = self.config.rms_norm_eps;
        for head in self.buffers[slot(buffer)][..batch * heads * hd].chunks_exact_mut(hd) {
            let mean = head.iter().map(|v| v * v).sum::<f32>() / hd as f32;
            let scale = 1.0 / (mean + eps).sqrt();
            for (v, w) in head.iter_mut().zip(weight) {
                *v = *v * scale * w;
            }
        }
    }

    fn rope(&mut self, table: usize, q_heads: usize, kv_heads: usize, batch: usize) {
        let hd = self.config.head_dim;
        let table = &self.ropes[table];
        let pairs = table.spec.dim / 2;
        let style = table.spec.style;
        for (buffer, heads) in [(Buffer::Q, q_heads), (Buffer::K, kv_heads)] {
            let data = &mut self.buffers[slot(buffer)];
            for b in 0..batch {
                let rot = &table.rotations[b * pairs..(b + 1) * pairs];
                for h in 0..heads {
                    let head = &mut data[(b * heads + h) * hd..(b * heads + h + 1) * hd];
                    for (i, &(cos, sin)) in rot.iter().enumerate() {
                        let (a, c) = match style {
                            RopeStyle::AdjacentPairs => (2 * i, 2 * i + 1),
                            RopeStyle::Neox => (i, i + pairs),
                        };
                        let (x0, x1) = (head[a], head[c]);
                        head[a] = x0 * cos - x1 * sin;
                        head[c] = x0 * sin + x1 * cos;
                    }
                }
            }
        }
    }

    fn attention(&mut self, a: &AttentionExec, positions: &[u32], sequences: &[u32]) {
        let AttentionExec {
            layer,
            q_start,
            q_heads,
            kv_start,
            kv_heads,
            window,
            scale,
            sinks,
        } = *a;
        let sinks: Option<&[f32]> = sinks.map(|i| &self.sinks[i][..]);
        let hd = self.config.head_dim;
        let group = self.config.group_size();
        let batch = positions.len();
        if q_heads == 0 {
            return;
        }
        let types = self.kv.types();
        let (key_rotation, value_rotation) = (types.key_rotation(hd), types.value_rotation(hd));
        {
            // A quantized cache stores keys and values rotated (see `CacheTypes::key_rotation`).
            for (buffer, rotation) in [(Buffer::K, key_rotation), (Buffer::V, value_rotation)] {
                if let Some(n) = rotation {
                    hadamard_rotate(&mut self.buffers[slot(buffer)][..batch * kv_heads * hd], n);
                }
            }
            let k = &self.buffers[slot(Buffer::K)];
            let v = &self.buffers[slot(Buffer::V)];
            for b in 0..batch {
                let range = b * kv_heads * hd..(b + 1) * kv_heads * hd;
                self.kv.write(
                    layer,
                    sequences[b] as usize,
                    positions[b] as usize,
                    &k[range.clone()],
                    &v[range],
                );
            }
        }
        let kv = &self.kv;
        let mut out = std::mem::take(&mut self.buffers[slot(Buffer::Attention)]);
        let q = &self.buffers[slot(Buffer::Q)];
        let target = SharedOut(out.as_mut_ptr());
        // One task per (row, query head); each writes its own head_dim slice of `out`.
        pool::for_each(batch * q_heads, |index| {
            let (b, h) = (index / q_heads, index % q_heads);
            let kv_head = (q_start + h) / group - kv_start;
            let (sequence, position) = (sequences[b] as usize, positions[b] as usize);
            // A sliding window sees the last `window` positions, this one included.
            let first = window.map_or(0, |w| (position + 1).saturating_sub(w));
            let sink = sinks.map_or(f32::NEG_INFINITY, |s| s[h]);
            let query = &q[index * hd..(index + 1) * hd];
            // SAFETY: task `index` alone writes out[index * hd..(index + 1) * hd], which is
            // within batch * q_heads * hd <= out.len().
            let dst = unsafe { std::slice::from_raw_parts_mut(target.at(index * hd), hd) };
            SCRATCH.with_borrow_mut(|(query16, scores, typed)| {
                if let Some((keys, values, rows)) =
                    kv.head_rows_f16(layer, sequence, kv_head, first)
                {
                    query16.clear();
                    query16.extend(query.iter().map(|&x| f16::from_f32(x)));
                    attend(
                        query16,
                        keys,
                        values,
                        &rows,
                        position + 1 - first,
                        scale,
                        sink,
                        scores,
                        dst,
                    );
                } else {
                    let rows = kv.head_rows(layer, sequence, kv_head, first);
                    let mut rotated = std::mem::take(&mut typed.rotated_query);
                    let query = match key_rotation {
                        Some(n) => {
                            rotated.clear();
                            rotated.extend_from_slice(query);
                            hadamard_rotate(&mut rotated, n);
                            &rotated[..]
                        }
                        None => query,
                    };
                    attend_typed(
                        types.k.quant_type(),
                        types.v.quant_type(),
                        query,
                        rows.keys,
                        rows.values,
                        &rows.key_rows,
                        &rows.value_rows,
                        position + 1 - first,
                        scale,
                        sink,
                        &mut typed.scratch,
                        dst,
                    );
                    typed.rotated_query = rotated;
                    // The values were rotated: so is their weighted sum, until rotated back.
                    if let Some(n) = value_rotation {
                        hadamard_rotate(dst, n);
                    }
                }
            });
        });
        self.buffers[slot(Buffer::Attention)] = out;
    }

    fn output_head(&mut self, weight: &Weight, output: &OutputRequest) -> Vec<RowResult> {
        let d = self.config.model_dim;
        let n = output.rows.len();
        // The final norm ran on every row; only the requested ones go through the output head.
        let normed = &self.buffers[slot(Buffer::Normed)];
        for (i, &r) in output.rows.iter().enumerate() {
            self.logits_input[i * d..(i + 1) * d].copy_from_slice(&normed[r * d..(r + 1) * d]);
        }
        let rows = weight.rows;
        let mut results = Vec::with_capacity(n);
        let mut logits = vec![0f32; rows * n.min(self.max_batch)];
        for (chunk_index, chunk) in output.rows.chunks(self.max_batch).enumerate() {
            let count = chunk.len();
            let first = chunk_index * self.max_batch;
            if rows > 0 {
                self.prepared.prepare(
                    weight.ty,
                    &self.logits_input[first * d..(first + count) * d],
                    d,
                    count,
                );
                matmul(
                    weight.ty,
                    &weight.data,
                    rows,
                    d,
                    &self.prepared,
                    &mut logits[..rows * count],
                );
            }
            for i in 0..count {
                let row = &logits[i * rows..(i + 1) * rows];
                let target = output.targets.get(first + i).copied();
                results.push(summarize_row(
                    row,
                    self.vocab_start,
                    output.top_k,
                    output.full_logits,
                    target,
                ));
            }
        }
        results
    }
}

fn summarize_row(
    row: &[f32],
    vocab_start: usize,
    top_k: usize,
    full: bool,
    target: Option<u32>,
) -> RowResult {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum_exp = if row.is_empty() {
        f32::NEG_INFINITY
    } else {
        max + sum_exp(row, max).ln() as f32
    };
    let order = top_k_indices(row, top_k);
    RowResult {
        ids: order.iter().map(|&i| i + vocab_start as u32).collect(),
        logits: order.iter().map(|&i| row[i as usize]).collect(),
        log_sum_exp,
        full: if full { row.to_vec() } else { Vec::new() },
        target_logit: target
            .and_then(|t| (t as usize).checked_sub(vocab_start))
            .filter(|&t| t < row.len())
            .map(|t| row[t]),
    }
}

/// A logit with its index, ordered from worse to better: lower logit first, and among equal
/// logits the higher index first (so the lower index wins ties).
#[derive(Clone, Copy, PartialEq)]
struct Candidate(f32, u32);
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0).then(other.1.cmp(&self.1))
    }
}

/// Indices of the `k` largest values of `row`, best first, ties to the lower index. One pass
/// with a k-element heap: a 49,152-entry vocabulary slice needs no index array or sort.
fn top_k_indices(row: &[f32], k: usize) -> Vec<u32> {
    let k = k.min(row.len());
    if k == 0 {
        return Vec::new();
    }
    let mut heap = std::collections::BinaryHeap::with_capacity(k + 1);
    for (i, &v) in row.iter().enumerate() {
        let c = std::cmp::Reverse(Candidate(v, i as u32));
        if heap.len() < k {
            heap.push(c);
        } else if heap.peek().is_some_and(|worst| c.0 > worst.0) {
            heap.pop();
            heap.push(c);
        }
    }
    let mut best: Vec<Candidate> = heap.into_iter().map(|c| c.0).collect();
    best.sort_by(|a, b| b.cmp(a));
    best.into_iter().map(|c| c.1).collect()
}

/// YaRN's correction range in pairs (ggml_rope_yarn_corr_dims): the pairs whose wavelength
/// fits the original context `beta_fast` times keep extrapolated frequencies, those fitting
/// `beta_slow` times or fewer are interpolated, and the pairs between ramp.
fn yarn_corrections(
    dim: usize,
    original_context: usize,
    base: f32,
    beta_fast: f32,
    beta_slow: f32,
) -> (f32, f32) {
    let corr = |rotations: f32| {
        dim as f32 * (original_context as f32 / (rotations * 2.0 * std::f32::consts::PI)).ln()
            / (2.0 * base.ln())
    };
    (
        corr(beta_fast).floor().max(0.0),
        corr(beta_slow).ceil().min(dim as f32 - 1.0),
    )
}

/// GELU in ggml's tanh form: 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³))).
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x)).tanh())
}

fn two_buffers(buffers: &mut [Vec<f32>], a: usize, b: usize) -> (&mut Vec<f32>, &mut Vec<f32>) {
    assert_ne!(a, b);
    if a < b {
        let (x, y) = buffers.split_at_mut(b);
        (&mut x[a], &mut y[0])
    } else {
        let (x, y) = buffers.split_at_mut(a);
        (&mut y[0], &mut x[b])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The heap selection against a full sort, with many ties and NaN-free random values.
    #[test]
    fn top_k_matches_a_full_sort() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for n in [1usize, 5, 40, 1000] {
            let row: Vec<f32> = (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state % 50) as f32 * 0.25 - 6.0
                })
                .collect();
            let mut all: Vec<u32> = (0..n as u32).collect();
            all.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
            for k in [0usize, 1, 3, 40, n, n + 5] {
                assert_eq!(top_k_indices(&row, k), all[..k.min(n)], "n {n} k {k}");
            }
        }
    }
}
