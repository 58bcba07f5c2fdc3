//! Architectures tp runs, as data.
//!
//! Each family has one small file here (as llama.cpp has one graph builder per architecture)
//! that reads its hyper-parameters from GGUF metadata and describes every layer: the attention
//! (heads, RoPE table, window, scale, QK-norm, biases, post-norm), the FFN (gated with its
//! activation, or a mixture of experts) and the tensors with their shapes. The planner derives
//! the split and the shard program from that description, and the loader, the shard byte
//! ranges and `plan` derive the tensor list from the program, so nothing outside this folder
//! names a tensor.
//!
//! Adding an architecture is a file here and a line in `FAMILIES`.

mod blocks;
mod gemma3;
mod gptoss;
mod llama;
mod qwen2;
mod qwen3;

use crate::kernels::cpu::QuantType;
use crate::model::gguf::{GgufError, GgufFile};

/// The architectures tp reads, by `general.architecture`, each with the function that
/// describes it.
const FAMILIES: &[(&str, Describe)] = &[
    ("llama", llama::describe),
    ("qwen2", qwen2::describe),
    ("qwen2moe", qwen2::describe_moe),
    ("qwen3", qwen3::describe),
    ("qwen3moe", qwen3::describe_moe),
    ("gemma3", gemma3::describe),
    ("gpt-oss", gptoss::describe),
];

type Describe = fn(&Metadata) -> Result<ModelConfig, ArchError>;

/// The names `FAMILIES` accepts, for error messages and `--help`.
pub fn supported_architectures() -> Vec<&'static str> {
    FAMILIES.iter().map(|(name, _)| *name).collect()
}

/// The routed experts of a mixture-of-experts layer, as llama.cpp computes them for the
/// architecture: softmax over every expert's router logit, the `expert_used` largest, their
/// probabilities as weights (renormalized to sum to one where the architecture says so), each
/// expert a SwiGLU FFN of `ModelConfig::ffn_dim` columns, and the weighted sum of their outputs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MoeConfig {
    pub expert_count: usize,
    pub expert_used: usize,
    pub normalize_selected: bool,
    /// gpt-oss: the `expert_used` largest raw logits, weighted by a softmax over those alone
    /// (instead of a softmax over every expert first).
    pub softmax_selected: bool,
    /// The experts' gated activation (SwiGLU, or gpt-oss's clamped form).
    pub activation: Activation,
    /// Width of the shared expert that every token also goes through (qwen2moe), whose output
    /// is scaled by `sigmoid(ffn_gate_inp_shexp · x)`.
    pub shared_ffn_dim: Option<usize>,
    /// Block size of each layer's shared `ffn_down`: the shared expert's split granularity.
    pub shared_down_block: Vec<usize>,
}

/// How RoPE pairs dimensions, as llama.cpp applies it per architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum RopeStyle {
    /// Dimension 2i rotates with 2i+1 (llama: the converter permuted Q/K rows for this).
    AdjacentPairs,
    /// Dimension i rotates with i + n_rot/2 (qwen2, gemma3, HF `rotate_half`).
    Neox,
}

/// One table of RoPE rotations. Layers share tables (gemma3 has two: local and global).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RopeSpec {
    pub style: RopeStyle,
    pub base: f32,
    /// Dimensions rotated per head (the first `dim` of each head).
    pub dim: usize,
    /// Positions are scaled by this: 1 / factor under linear scaling.
    pub freq_scale: f32,
    /// A vector of `dim / 2` divisors of each pair's frequency (llama3 scaling's
    /// `rope_freqs.weight`), loaded by every rank.
    pub freq_factors: Option<String>,
    /// YaRN's blend of interpolated and extrapolated frequencies, where the file asks for it.
    pub yarn: Option<Yarn>,
}

/// YaRN scaling as ggml applies it (`rope_yarn`): dimensions between the two correction
/// bounds ramp from extrapolated to interpolated frequencies, and both cos and sin are scaled
/// by `1 + 0.1 ln(factor)`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Yarn {
    pub original_context: usize,
    pub beta_fast: f32,
    pub beta_slow: f32,
}

/// A linear layer's weight and optional bias.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LinearSpec {
    pub weight: String,
    pub bias: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Activation {
    /// SwiGLU: silu(gate) * up.
    Silu,
    /// GeGLU with the tanh approximation of GELU (ggml_gelu): gelu(gate) * up.
    GeluTanh,
    /// gpt-oss's clamped SwiGLU (ggml_swiglu_oai): with g = min(gate, 7) and
    /// u = clamp(up, -7, 7), g * sigmoid(1.702 g) * (u + 1).
    SwigluOai,
}

/// The attention half of a layer.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct AttentionSpec {
    /// RMSNorm of the residual stream before the projections.
    pub norm: String,
    pub q: LinearSpec,
    pub k: LinearSpec,
    pub v: LinearSpec,
    pub output: LinearSpec,
    /// Per-head RMSNorm of queries and keys before RoPE (query weights, key weights).
    pub qk_norm: Option<(String, String)>,
    /// Index into `ModelConfig::ropes`.
    pub rope: usize,
    /// Sliding window: a query sees the last `window` positions, itself included.
    pub window: Option<usize>,
    /// Multiplies the query-key products.
    pub scale: f32,
    /// RMSNorm of the attention output (after its AllReduce) before the residual add.
    pub post_norm: Option<String>,
    /// `[heads]`: one learned logit per query head that joins its softmax (gpt-oss), with no
    /// value: it takes a share of the attention and gives nothing back.
    pub sinks: Option<String>,
}

/// The tensors of a mixture-of-experts FFN.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct MoeTensors {
    /// `[d_model, experts]`: the router, whole on every rank.
    pub router: String,
    /// `[d_model, width, experts]` / `[width, d_model, experts]`.
    pub gate: String,
    pub up: String,
    pub down: String,
    pub shared: Option<SharedExpertTensors>,
    /// Biases (gpt-oss): `[experts]` on the router logits, `[width, experts]` on gate and up,
    /// `[d_model, experts]` on each expert's output (added after the layer's AllReduce, as the
    /// weighted sum of the selected experts' biases).
    pub router_bias: Option<String>,
    pub gate_bias: Option<String>,
    pub up_bias: Option<String>,
    pub down_bias: Option<String>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SharedExpertTensors {
    /// `[d_model]`: the sigmoid gate's weights.
    pub gate_input: String,
    pub gate: String,
    pub up: String,
    pub down: String,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub enum FfnSpec {
    /// `down(act(gate · x) * (up · x))`, `ModelConfig::ffn_dim` wide.
    Gated {
        activation: Activation,
        gate: String,
        up: String,
        down: String,
    },
    /// Routed experts (`ModelConfig::moe`), and a shared expert where the tensors name one.
    Moe(MoeTensors),
}

/// One transformer block: what llama.cpp's graph builder does for layer `il`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LayerSpec {
    pub attention: AttentionSpec,
    /// RMSNorm of the residual stream before the FFN.
    pub ffn_norm: String,
    pub ffn: FfnSpec,
    /// RMSNorm of the FFN output (after its AllReduce) before the residual add.
    pub ffn_post_norm: Option<String>,
}

/// A tensor the architecture reads, with its shape in ggml order.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TensorShape {
    pub name: String,
    pub dims: Vec<usize>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ModelConfig {
    /// `general.architecture`.
    pub architecture: &'static str,
    pub layer_count: usize,
    pub model_dim: usize,
    pub head_count: usize,
    pub kv_head_count: usize,
    pub head_dim: usize,
    /// The FFN's width: of the dense FFN, or of each routed expert in a mixture of experts.
    pub ffn_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub context_length: usize,
    /// Mixture-of-experts layers (every layer), or None for a dense FFN.
    pub moe: Option<MoeConfig>,
    /// `token_embd`: `[d_model, vocab]`, split by vocabulary rows.
    pub embedding: String,
    /// The embeddings are multiplied by this (gemma: √d_model).
    pub embedding_scale: Option<f32>,
    pub layers: Vec<LayerSpec>,
    pub ropes: Vec<RopeSpec>,
    pub output_norm: String,
    /// The output head: `output.weight`, or the embedding where the file ties them.
    pub output: String,
    /// Every tensor the description reads, with its shape, checked against the file.
    pub tensors: Vec<TensorShape>,
    /// Block size (elements) of each layer's FFN down projection (the experts' for a mixture
    /// of experts): the FFN split granularity.
    pub ffn_down_block: Vec<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: unsupported architecture '{name}' (supported: {})", supported_architectures().join(", "))]
    Unsupported { path: String, name: String },
    #[error("{path}: {what}")]
    Invalid { path: String, what: String },
}

/// GGUF metadata of one architecture, read with bounds: a crafted file cannot ask for absurd
/// buffers, and every error names the key.
pub struct Metadata<'a> {
    pub file: &'a GgufFile,
    pub arch: &'static str,
    path: String,
}

impl<'a> Metadata<'a> {
    pub fn invalid(&self, what: impl Into<String>) -> ArchError {
        ArchError::Invalid {
            path: self.path.clone(),
            what: what.into(),
        }
    }

    pub fn key(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.arch)
    }

    /// A required count in `1..=max`.
    pub fn count(&self, suffix: &str, max: u64) -> Result<usize, ArchError> {
        let value = self.file.require_u64(&self.key(suffix))?;
        self.check_count(suffix, value, max)
    }

    /// An optional count in `1..=max`.
    pub fn optional_count(&self, suffix: &str, max: u64) -> Result<Option<usize>, ArchError> {
        match self.file.get_u64(&self.key(suffix))? {
            None => Ok(None),
            Some(value) => self.check_count(suffix, value, max).map(Some),
        }
    }

    fn check_count(&self, suffix: &str, value: u64, max: u64) -> Result<usize, ArchError> {
        if value == 0 || value > max {
            return Err(self.invalid(format!(
                "{}: {value} is outside 1..={max}",
                self.key(suffix)
            )));
        }
        Ok(value as usize)
    }

    /// An optional positive finite number.
    pub fn optional_f32(&self, suffix: &str) -> Result<Option<f32>, ArchError> {
        match self.file.get_f64(&self.key(suffix))? {
            None => Ok(None),
            Some(v) if v.is_finite() && v > 0.0 && v < 1e30 => Ok(Some(v as f32)),
            Some(v) => Err(self.invalid(format!(
                "{}: {v} is not a positive finite number",
                self.key(suffix)
            ))),
        }
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.file.tensor(name).is_some()
    }
}

/// The hyper-parameters every family reads the same way.
pub struct Common {
    pub layer_count: usize,
    pub model_dim: usize,
    pub head_count: usize,
    pub kv_head_count: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub context_length: usize,
    /// RoPE base and rotated dimensions as the file states them.
    pub rope_base: f32,
    pub rope_dim: usize,
    pub tied_output: bool,
}

impl Common {
    pub fn read(meta: &Metadata, default_eps: f32) -> Result<Common, ArchError> {
        let layer_count = meta.count("block_count", 1024)?;
        let model_dim = meta.count("embedding_length", 1 << 16)?;
        let head_count = meta.count("attention.head_count", 1024)?;
        let kv_head_count = meta
            .optional_count("attention.head_count_kv", head_count as u64)?
            .unwrap_or(head_count);
        if head_count % kv_head_count != 0 {
            return Err(meta.invalid(format!(
                "{head_count} query heads are not a multiple of {kv_head_count} KV heads"
            )));
        }
        // The head size is the embedding split into heads unless the file states it (Qwen3
        // and Gemma 3 heads are wider or narrower than that).
        let head_dim = match meta.optional_count("attention.key_length", 4096)? {
            Some(k) => k,
            None if model_dim % head_count != 0 => {
                return Err(meta.invalid(format!(
                    "embedding length {model_dim} does not split into {head_count} heads"
                )));
            }
            None => model_dim / head_count,
        };
        if let Some(v) = meta.file.get_u64(&meta.key("attention.value_length"))?
            && v as usize != head_dim
        {
            return Err(meta.invalid(format!(
                "value heads of {v} differ from key heads of {head_dim} (not supported)"
            )));
        }
        let rms_norm_eps = match meta
            .file
            .get_f64(&meta.key("attention.layer_norm_rms_epsilon"))?
        {
            None => default_eps,
            Some(e) if e.is_finite() && (0.0..1.0).contains(&e) => e as f32,
            Some(e) => {
                return Err(meta.invalid(format!(
                    "{}: {e} is outside [0, 1)",
                    meta.key("attention.layer_norm_rms_epsilon")
                )));
            }
        };
        let rope_base = meta.optional_f32("rope.freq_base")?.unwrap_or(10000.0);
        let rope_dim = meta
            .file
            .get_u64(&meta.key("rope.dimension_count"))?
            .map_or(head_dim, |v| v as usize);
        if rope_dim == 0 || rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(meta.invalid(format!(
                "rope dimension {rope_dim} is not an even number up to the head size {head_dim}"
            )));
        }
        let context_length = meta
            .file
            .get_u64(&meta.key("context_length"))?
            .unwrap_or(2048)
            .clamp(1, 1 << 20) as usize;
        Ok(Common {
            layer_count,
            model_dim,
            head_count,
            kv_head_count,
            head_dim,
            rms_norm_eps,
            context_length,
            rope_base,
            rope_dim,
            tied_output: !meta.has_tensor("output.weight"),
        })
    }

    /// `attention.sliding_window`: positions a windowed layer sees, within 1..=the context
    /// length (a window wider than the context the model was made for is a broken file).
    pub fn sliding_window(&self, meta: &Metadata) -> Result<Option<usize>, ArchError> {
        let key = meta.key("attention.sliding_window");
        match meta.file.get_u64(&key)? {
            None => Ok(None),
            Some(0) => Err(meta.invalid(format!("{key} is 0: every key would be masked"))),
            Some(w) if w > self.context_length as u64 => Err(meta.invalid(format!(
                "{key}: a window of {w} positions is larger than the context length {} ({})",
                self.context_length,
                meta.key("context_length")
            ))),
            Some(w) => Ok(Some(w as usize)),
        }
    }

    /// The default RoPE table: the file's base and dimensions, with the scaling its metadata
    /// asks for (`rope.scaling.factor` divides the frequencies whatever the type, as in
    /// llama.cpp; `rope.scaling.type` yarn adds YaRN's blend). llama3's frequency factors are
    /// the llama family's own (`llama.rs`).
    pub fn rope(&self, meta: &Metadata, style: RopeStyle) -> Result<RopeSpec, ArchError> {
        let kind = meta.file.get_str(&meta.key("rope.scaling.type"))?;
        // A factor of 0 means none, as llama.cpp reads it; older files state a linear factor
        // under its own key.
        let stated = |suffix: &str| -> Result<Option<f32>, ArchError> {
            match meta.file.get_f64(&meta.key(suffix))? {
                Some(v) if v == 0.0 => Ok(None),
                _ => meta.optional_f32(suffix),
            }
        };
        let factor = match stated("rope.scaling.factor")? {
            Some(f) => Some(f),
            None => stated("rope.scale_linear")?,
        };
        let mut rope = RopeSpec {
            style,
            base: self.rope_base,
            dim: self.rope_dim,
            freq_scale: 1.0,
            freq_factors: None,
            yarn: None,
        };
        match kind {
            None | Some("linear") | Some("none") => {
                rope.freq_scale = factor.map_or(1.0, |f| 1.0 / f)
            }
            Some("yarn") => {
                let factor = factor.ok_or_else(|| {
                    meta.invalid(format!(
                        "{} is yarn but {} is missing",
                        meta.key("rope.scaling.type"),
                        meta.key("rope.scaling.factor")
                    ))
                })?;
                rope.freq_scale = 1.0 / factor;
                rope.yarn = Some(Yarn {
                    original_context: meta
                        .optional_count("rope.scaling.original_context_length", 1 << 24)?
                        .unwrap_or(self.context_length),
                    beta_fast: meta
                        .optional_f32("rope.scaling.yarn_beta_fast")?
                        .unwrap_or(32.0),
                    beta_slow: meta
                        .optional_f32("rope.scaling.yarn_beta_slow")?
                        .unwrap_or(1.0),
                });
            }
            Some(other) => {
                return Err(meta.invalid(format!(
                    "{}: unknown RoPE scaling type '{other}' (supported: none, linear, yarn)",
                    meta.key("rope.scaling.type")
                )));
            }
        }
        Ok(rope)
    }
}

/// The tensor list a description builds as it names tensors.
#[derive(Default)]
pub struct Tensors {
    list: Vec<TensorShape>,
}

impl Tensors {
    /// Registers `name` with its shape (ggml order) and returns the name.
    pub fn add(&mut self, name: String, dims: &[usize]) -> String {
        if !self.list.iter().any(|t| t.name == name) {
            self.list.push(TensorShape {
                name: name.clone(),
                dims: dims.to_vec(),
            });
        }
        name
    }

    /// `blk.{layer}.{name}.weight`.
    pub fn layer(&mut self, layer: usize, name: &str, dims: &[usize]) -> String {
        self.add(format!("blk.{layer}.{name}.weight"), dims)
    }

    /// `blk.{layer}.{name}.bias`.
    pub fn layer_bias(&mut self, layer: usize, name: &str, len: usize) -> String {
        self.add(format!("blk.{layer}.{name}.bias"), &[len])
    }
}

impl ModelConfig {
    /// Bytes of weights one token reads in `file`: every described matrix of every layer (the
    /// attention, the dense FFN or the router and shared expert), the active share
    /// (used / count) of the routed experts, and the output head; not the embedding rows a
    /// token looks up.
    pub fn weight_bytes_per_token(&self, file: &GgufFile) -> u64 {
        self.head_bytes(file)
            + (0..self.layers.len())
                .map(|layer| self.layer_bytes_per_token(file, layer))
                .sum::<u64>()
    }

    /// The output head's bytes in `file`.
    pub fn head_bytes(&self, file: &GgufFile) -> u64 {
        file.tensor(&self.output).map_or(0, |t| t.size_bytes)
    }

    /// What `weight_bytes_per_token` counts of one layer.
    pub fn layer_bytes_per_token(&self, file: &GgufFile, layer: usize) -> u64 {
        let bytes = |name: &str| file.tensor(name).map_or(0, |t| t.size_bytes);
        let share = self
            .moe
            .as_ref()
            .map_or(1.0, |m| m.expert_used as f64 / m.expert_count.max(1) as f64);
        let layer = &self.layers[layer];
        let a = &layer.attention;
        let attention = [&a.q, &a.k, &a.v, &a.output]
            .iter()
            .map(|l| bytes(&l.weight))
            .sum::<u64>();
        attention
            + match &layer.ffn {
                FfnSpec::Gated { gate, up, down, .. } => bytes(gate) + bytes(up) + bytes(down),
                FfnSpec::Moe(m) => {
                    let experts = bytes(&m.gate) + bytes(&m.up) + bytes(&m.down);
                    let shared = m.shared.as_ref().map_or(0, |s| {
                        bytes(&s.gate_input) + bytes(&s.gate) + bytes(&s.up) + bytes(&s.down)
                    });
                    bytes(&m.router) + (experts as f64 * share) as u64 + shared
                }
            }
    }

    pub fn from_gguf(file: &GgufFile) -> Result<ModelConfig, ArchError> {
        let path = file.path.display().to_string();
        let name = file.require_str("general.architecture")?;
        let Some(&(arch, describe)) = FAMILIES.iter().find(|(n, _)| *n == name) else {
            return Err(ArchError::Unsupported {
                path,
                name: name.into(),
            });
        };
        let meta = Metadata { file, arch, path };
        let mut config = describe(&meta)?;
        config.check_against(&meta)?;
        Ok(config)
    }

    /// Checks every tensor of the description against the file (presence, shape, F32 for
    /// vectors) and reads the block sizes that set the split granularity.
    fn check_against(&mut self, meta: &Metadata) -> Result<(), ArchError> {
        if self.layers.len() != self.layer_count {
            return Err(meta.invalid(format!(
                "the description has {} layers, the file {}",
                self.layers.len(),
                self.layer_count
            )));
        }
        for TensorShape { name, dims } in &self.tensors {
            let info = meta
                .file
                .tensor(name)
                .ok_or_else(|| meta.invalid(format!("missing tensor '{name}'")))?;
            // GGUF drops trailing dimensions of 1 (a one-expert tensor is 2-D): compare
            // without them on either side.
            let trimmed = |mut d: Vec<u64>| {
                while d.len() > 1 && d.last() == Some(&1) {
                    d.pop();
                }
                d
            };
            if trimmed(info.dims.clone()) != trimmed(dims.iter().map(|&d| d as u64).collect()) {
                return Err(meta.invalid(format!(
                    "tensor '{name}' has shape {:?}, expected {dims:?}",
                    info.dims
                )));
            }
            if dims.len() == 1 && info.quant_type != QuantType::F32 {
                return Err(meta.invalid(format!(
                    "tensor '{name}' is {}, expected F32",
                    info.quant_type.name()
                )));
            }
        }
        // llama.cpp refuses a file with tensors its graph does not use (a bias this
        // description lacks would otherwise be dropped silently and give wrong logits).
        let described: std::collections::HashSet<&str> =
            self.tensors.iter().map(|t| t.name.as_str()).collect();
        if let Some(extra) = meta
            .file
            .tensors
            .iter()
            .find(|t| !described.contains(t.name.as_str()))
        {
            return Err(meta.invalid(format!(
                "tensor '{}' is not part of the {} layout tp reads ({} tensors expected, the file has {})",
                extra.name,
                self.architecture,
                self.tensors.len(),
                meta.file.tensors.len()
            )));
        }
        let block = |name: &str| {
            meta.file
                .tensor(name)
                .map_or(1, |t| t.quant_type.block_elements())
        };
        self.ffn_down_block.clear();
        let mut shared_blocks = Vec::new();
        for layer in &self.layers {
            let down = match &layer.ffn {
                FfnSpec::Gated { down, .. } => down,
                FfnSpec::Moe(m) => {
                    if let Some(s) = &m.shared {
                        shared_blocks.push(block(&s.down));
                    }
                    &m.down
                }
            };
            self.ffn_down_block.push(block(down));
        }
        if let Some(moe) = &mut self.moe {
            moe.shared_down_block = shared_blocks;
        }
        Ok(())
    }

    /// One line on what the layers are, for `plan`: e.g. "gemma3: GeGLU FFN, QK-norm, post-norms,
    /// embeddings x25.3; attention: 15 layers sliding window 512 (RoPE base 10000), 3 global
    /// (RoPE base 1000000)".
    pub fn summary(&self) -> String {
        let mut traits = Vec::new();
        let first = &self.layers[0];
        traits.push(match &first.ffn {
            FfnSpec::Gated {
                activation: Activation::Silu,
                ..
            } => "SwiGLU FFN".to_string(),
            FfnSpec::Gated {
                activation: Activation::GeluTanh,
                ..
            } => "GeGLU FFN".to_string(),
            FfnSpec::Gated {
                activation: Activation::SwigluOai,
                ..
            } => "clamped SwiGLU FFN".to_string(),
            FfnSpec::Moe(m) if m.shared.is_some() => "experts + shared expert".to_string(),
            FfnSpec::Moe(m) if m.down_bias.is_some() => {
                "experts with biases, clamped SwiGLU, softmax over the selected".to_string()
            }
            FfnSpec::Moe(_) => "experts".to_string(),
        });
        if first.attention.sinks.is_some() {
            traits.push("attention sinks".into());
        }
        if first.attention.output.bias.is_some() {
            traits.push("output-projection bias".into());
        }
        if first.attention.q.bias.is_some() {
            traits.push("QKV biases".into());
        }
        if first.attention.qk_norm.is_some() {
            traits.push("QK-norm".into());
        }
        if first.attention.post_norm.is_some() || first.ffn_post_norm.is_some() {
            traits.push("post-norms".into());
        }
        if let Some(scale) = self.embedding_scale {
            traits.push(format!("embeddings x{scale:.1}"));
        }
        // Layers grouped by (window, RoPE table), in order of first appearance.
        let mut kinds: Vec<((Option<usize>, usize), usize)> = Vec::new();
        for layer in &self.layers {
            let key = (layer.attention.window, layer.attention.rope);
            match kinds.iter_mut().find(|(k, _)| *k == key) {
                Some((_, n)) => *n += 1,
                None => kinds.push((key, 1)),
            }
        }
        let attention: Vec<String> = kinds
            .iter()
            .map(|&((window, rope), n)| {
                let r = &self.ropes[rope];
                let mut rope_text = format!("RoPE base {}", r.base);
                if r.freq_scale != 1.0 {
                    rope_text.push_str(&format!(", scale 1/{}", 1.0 / r.freq_scale));
                }
                if r.yarn.is_some() {
                    rope_text.push_str(", YaRN");
                }
                if r.freq_factors.is_some() {
                    rope_text.push_str(", llama3 frequency factors");
                }
                let layers = if n == 1 { "layer" } else { "layers" };
                match window {
                    Some(w) => format!("{n} {layers} sliding window {w} ({rope_text})"),
                    None => format!("{n} {layers} global ({rope_text})"),
                }
            })
            .collect();
        format!(
            "{}: {}; attention: {}",
            self.architecture,
            traits.join(", "),
            attention.join(", ")
        )
    }

    pub fn group_size(&self) -> usize {
        self.head_count / self.kv_head_count
    }
}

/// A llama-style description built without a file, for the planner's property tests.
#[cfg(test)]
pub(crate) fn test_config(
    heads: usize,
    kv: usize,
    ffn: usize,
    vocab: usize,
    layers: usize,
    moe: Option<MoeConfig>,
) -> ModelConfig {
    let c = Common {
        layer_count: layers,
        model_dim: heads * 64,
        head_count: heads,
        kv_head_count: kv,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        context_length: 128,
        rope_base: 10000.0,
        rope_dim: 64,
        tied_output: true,
    };
    let mut t = Tensors::default();
    let options = blocks::AttentionOptions::plain(&c);
    let specs = blocks::uniform_layers(&mut t, &c, &options, moe.as_ref(), ffn);
    let mut config = blocks::finish_named(
        "llama",
        &c,
        vocab,
        t,
        blocks::Model {
            layers: specs,
            ropes: vec![RopeSpec {
                style: RopeStyle::AdjacentPairs,
                base: 10000.0,
                dim: 64,
                freq_scale: 1.0,
                freq_factors: None,
                yarn: None,
            }],
            ffn_dim: ffn,
            moe,
            embedding_scale: None,
        },
    );
    config.ffn_down_block = vec![1; layers];
    config
}
