//! Architectures tp runs: hyper-parameters from GGUF metadata and the tensors each layer needs,
//! checked against the file before anything is planned or loaded.

use crate::kernels::cpu::QuantType;
use crate::model::gguf::{GgufError, GgufFile};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Architecture {
    Llama,
    Qwen2,
    /// Qwen1.5/Qwen2 mixture of experts: qwen2's attention, routed experts whose weights are
    /// not renormalized, and a shared expert behind a sigmoid gate.
    Qwen2Moe,
    /// Qwen3 mixture of experts: QK-norm, no biases, routed experts renormalized over the
    /// selected ones, no shared expert.
    Qwen3Moe,
}

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen2Moe => "qwen2moe",
            Architecture::Qwen3Moe => "qwen3moe",
        }
    }
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
    /// Width of the shared expert that every token also goes through (qwen2moe), whose output
    /// is scaled by `sigmoid(ffn_gate_inp_shexp · x)`.
    pub shared_ffn_dim: Option<usize>,
    /// Block size of each layer's `ffn_down_shexp`: the shared expert's split granularity.
    pub shared_down_block: Vec<usize>,
}

/// How RoPE pairs dimensions, as llama.cpp applies it per architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum RopeStyle {
    /// Dimension 2i rotates with 2i+1 (llama: the converter permuted Q/K rows for this).
    AdjacentPairs,
    /// Dimension i rotates with i + n_rot/2 (qwen2, HF `rotate_half`).
    Neox,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub layer_count: usize,
    pub model_dim: usize,
    pub head_count: usize,
    pub kv_head_count: usize,
    pub head_dim: usize,
    /// The FFN's width: of the dense FFN, or of each routed expert in a mixture of experts.
    pub ffn_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_base: f32,
    pub rope_dim: usize,
    pub rope_style: RopeStyle,
    pub context_length: usize,
    pub qkv_bias: bool,
    /// Per-head RMSNorm of queries and keys (with learned weights) before RoPE.
    pub qk_norm: bool,
    /// Mixture-of-experts layers (every layer), or None for a dense FFN.
    pub moe: Option<MoeConfig>,
    /// No `output.weight`: the token embedding doubles as the output head.
    pub tied_output: bool,
    /// Block size (elements) of each layer's `ffn_down` (`ffn_down_exps` for experts): the FFN
    /// split granularity.
    pub ffn_down_block: Vec<usize>,
    /// Block size of each layer's `attn_output` (row-parallel over heads).
    pub attn_output_block: Vec<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(
        "{path}: unsupported architecture '{name}' (supported: llama, qwen2, qwen2moe, qwen3moe)"
    )]
    Unsupported { path: String, name: String },
    #[error("{path}: {what}")]
    Invalid { path: String, what: String },
}

pub fn layer_tensor(layer: usize, name: &str) -> String {
    format!("blk.{layer}.{name}")
}

impl ModelConfig {
    pub fn from_gguf(file: &GgufFile) -> Result<ModelConfig, ArchError> {
        let path = file.path.display().to_string();
        let invalid = |what: String| ArchError::Invalid {
            path: path.clone(),
            what,
        };
        let name = file.require_str("general.architecture")?;
        let architecture = match name {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            "qwen2moe" => Architecture::Qwen2Moe,
            "qwen3moe" => Architecture::Qwen3Moe,
            other => {
                return Err(ArchError::Unsupported {
                    path: path.clone(),
                    name: other.into(),
                });
            }
        };
        let key = |suffix: &str| format!("{name}.{suffix}");
        // Hyper-parameters are bounded so a crafted file cannot ask for absurd buffers.
        let bounded = |suffix: &str, max: u64| -> Result<usize, ArchError> {
            let value = file.require_u64(&key(suffix))?;
            if value == 0 || value > max {
                return Err(invalid(format!(
                    "{}: {value} is outside 1..={max}",
                    key(suffix)
                )));
            }
            Ok(value as usize)
        };
        let layer_count = bounded("block_count", 1024)?;
        let model_dim = bounded("embedding_length", 1 << 16)?;
        let head_count = bounded("attention.head_count", 1024)?;
        let kv_head_count = match file.get_u64(&key("attention.head_count_kv"))? {
            None => head_count,
            Some(v) if v >= 1 && v as usize <= head_count => v as usize,
            Some(v) => {
                return Err(invalid(format!(
                    "{}: {v} is outside 1..={head_count}",
                    key("attention.head_count_kv")
                )));
            }
        };
        if head_count % kv_head_count != 0 {
            return Err(invalid(format!(
                "{head_count} query heads are not a multiple of {kv_head_count} KV heads"
            )));
        }
        // The head size is the embedding split into heads unless the file states it (Qwen3
        // models may have wider or narrower heads than that).
        let head_dim = match file.get_u64(&key("attention.key_length"))? {
            Some(k) if (1..=4096).contains(&k) => k as usize,
            Some(k) => {
                return Err(invalid(format!(
                    "{}: {k} is outside 1..=4096",
                    key("attention.key_length")
                )));
            }
            None if model_dim % head_count != 0 => {
                return Err(invalid(format!(
                    "embedding length {model_dim} does not split into {head_count} heads"
                )));
            }
            None => model_dim / head_count,
        };
        if let Some(v) = file.get_u64(&key("attention.value_length"))?
            && v as usize != head_dim
        {
            return Err(invalid(format!(
                "value heads of {v} differ from key heads of {head_dim} (not supported)"
            )));
        }
        let is_moe = matches!(
            architecture,
            Architecture::Qwen2Moe | Architecture::Qwen3Moe
        );
        let moe = if is_moe {
            let expert_count = bounded("expert_count", 4096)?;
            let expert_used = bounded("expert_used_count", expert_count as u64)?;
            let shared_ffn_dim = match architecture {
                Architecture::Qwen2Moe => {
                    match file.get_u64(&key("expert_shared_feed_forward_length"))? {
                        Some(_) => Some(bounded("expert_shared_feed_forward_length", 1 << 20)?),
                        // Older files state no width: the shared expert's tensors do.
                        None => file
                            .tensor(&layer_tensor(0, "ffn_gate_shexp.weight"))
                            .and_then(|t| t.dims.get(1).map(|&d| d as usize)),
                    }
                }
                _ => None,
            };
            Some(MoeConfig {
                expert_count,
                expert_used,
                normalize_selected: architecture == Architecture::Qwen3Moe,
                shared_ffn_dim,
                shared_down_block: Vec::new(),
            })
        } else {
            None
        };
        // llama.cpp sizes experts from expert_feed_forward_length; feed_forward_length, which
        // MoE files also carry, describes something else there and is not used.
        let ffn_dim = if is_moe {
            bounded("expert_feed_forward_length", 1 << 20)?
        } else {
            bounded("feed_forward_length", 1 << 20)?
        };
        let rms_norm_eps = file
            .get_f64(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5) as f32;
        let rope_base = file.get_f64(&key("rope.freq_base"))?.unwrap_or(10000.0) as f32;
        let rope_dim = file
            .get_u64(&key("rope.dimension_count"))?
            .map_or(head_dim, |v| v as usize);
        if rope_dim == 0 || rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(invalid(format!(
                "rope dimension {rope_dim} is not an even number up to the head size {head_dim}"
            )));
        }
        let context_length = file
            .get_u64(&key("context_length"))?
            .unwrap_or(2048)
            .clamp(1, 1 << 20) as usize;
        let (rope_style, qkv_bias, qk_norm) = match architecture {
            Architecture::Llama => (RopeStyle::AdjacentPairs, false, false),
            Architecture::Qwen2 | Architecture::Qwen2Moe => (RopeStyle::Neox, true, false),
            Architecture::Qwen3Moe => (RopeStyle::Neox, false, true),
        };

        let embedding = file
            .tensor("token_embd.weight")
            .ok_or_else(|| invalid("missing tensor 'token_embd.weight'".into()))?;
        if embedding.dims.len() != 2 || embedding.dims[0] as usize != model_dim {
            return Err(invalid(format!(
                "token_embd.weight has shape {:?}, expected [{model_dim}, vocab]",
                embedding.dims
            )));
        }
        let vocab_size = embedding.dims[1] as usize;
        let tied_output = file.tensor("output.weight").is_none();

        let mut config = ModelConfig {
            architecture,
            layer_count,
            model_dim,
            head_count,
            kv_head_count,
            head_dim,
            ffn_dim,
            vocab_size,
            rms_norm_eps,
            rope_base,
            rope_dim,
            rope_style,
            context_length,
            qkv_bias,
            qk_norm,
            moe,
            tied_output,
            ffn_down_block: Vec::new(),
            attn_output_block: Vec::new(),
        };
        for (name, dims) in config.expected_tensors() {
            let info = file
                .tensor(&name)
                .ok_or_else(|| invalid(format!("missing tensor '{name}'")))?;
            let mut actual = info.dims.clone();
            while actual.len() > dims.len() && actual.last() == Some(&1) {
                actual.pop();
            }
            if actual != dims.iter().map(|&d| d as u64).collect::<Vec<_>>() {
                return Err(invalid(format!(
                    "tensor '{name}' has shape {:?}, expected {dims:?}",
                    info.dims
                )));
            }
            if dims.len() == 1 && info.quant_type != QuantType::F32 {
                return Err(invalid(format!(
                    "tensor '{name}' is {}, expected F32",
                    info.quant_type.name()
                )));
            }
        }
        for layer in 0..layer_count {
            let block = |n: &str| {
                file.tensor(&layer_tensor(layer, n))
                    .map(|t| t.quant_type.block_elements())
            };
            let down = if config.moe.is_some() {
                "ffn_down_exps.weight"
            } else {
                "ffn_down.weight"
            };
            config.ffn_down_block.push(block(down).unwrap_or(1));
            if let Some(moe) = &mut config.moe {
                moe.shared_down_block
                    .push(block("ffn_down_shexp.weight").unwrap_or(1));
            }
            config
                .attn_output_block
                .push(block("attn_output.weight").unwrap_or(1));
        }
        Ok(config)
    }

    /// Every tensor the architecture reads, with its shape in ggml order.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let d = self.model_dim;
        let q = self.head_count * self.head_dim;
        let kv = self.kv_head_count * self.head_dim;
        let mut out = vec![("token_embd.weight".to_string(), vec![d, self.vocab_size])];
        for layer in 0..self.layer_count {
            let t = |n: &str| layer_tensor(layer, n);
            out.push((t("attn_norm.weight"), vec![d]));
            out.push((t("attn_q.weight"), vec![d, q]));
            out.push((t("attn_k.weight"), vec![d, kv]));
            out.push((t("attn_v.weight"), vec![d, kv]));
            if self.qkv_bias {
                out.push((t("attn_q.bias"), vec![q]));
                out.push((t("attn_k.bias"), vec![kv]));
                out.push((t("attn_v.bias"), vec![kv]));
            }
            if self.qk_norm {
                out.push((t("attn_q_norm.weight"), vec![self.head_dim]));
                out.push((t("attn_k_norm.weight"), vec![self.head_dim]));
            }
            out.push((t("attn_output.weight"), vec![q, d]));
            out.push((t("ffn_norm.weight"), vec![d]));
            let f = self.ffn_dim;
            match &self.moe {
                None => {
                    out.push((t("ffn_gate.weight"), vec![d, f]));
                    out.push((t("ffn_up.weight"), vec![d, f]));
                    out.push((t("ffn_down.weight"), vec![f, d]));
                }
                Some(moe) => {
                    let e = moe.expert_count;
                    out.push((t("ffn_gate_inp.weight"), vec![d, e]));
                    out.push((t("ffn_gate_exps.weight"), vec![d, f, e]));
                    out.push((t("ffn_up_exps.weight"), vec![d, f, e]));
                    out.push((t("ffn_down_exps.weight"), vec![f, d, e]));
                    if let Some(s) = moe.shared_ffn_dim {
                        out.push((t("ffn_gate_inp_shexp.weight"), vec![d]));
                        out.push((t("ffn_gate_shexp.weight"), vec![d, s]));
                        out.push((t("ffn_up_shexp.weight"), vec![d, s]));
                        out.push((t("ffn_down_shexp.weight"), vec![s, d]));
                    }
                }
            }
        }
        out.push(("output_norm.weight".to_string(), vec![d]));
        if !self.tied_output {
            out.push(("output.weight".to_string(), vec![d, self.vocab_size]));
        }
        out
    }

    pub fn group_size(&self) -> usize {
        self.head_count / self.kv_head_count
    }

    pub fn output_tensor(&self) -> &'static str {
        if self.tied_output {
            "token_embd.weight"
        } else {
            "output.weight"
        }
    }
}
