//! Architectures tp runs: hyper-parameters from GGUF metadata and the tensors each layer needs,
//! checked against the file before anything is planned or loaded.

use crate::kernels::cpu::QuantType;
use crate::model::gguf::{GgufError, GgufFile};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Architecture {
    Llama,
    Qwen2,
}

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
        }
    }
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
    pub ffn_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_base: f32,
    pub rope_dim: usize,
    pub rope_style: RopeStyle,
    pub context_length: usize,
    pub qkv_bias: bool,
    /// No `output.weight`: the token embedding doubles as the output head.
    pub tied_output: bool,
    /// Block size (elements) of each layer's `ffn_down`: the FFN split granularity.
    pub ffn_down_block: Vec<usize>,
    /// Block size of each layer's `attn_output` (row-parallel over heads).
    pub attn_output_block: Vec<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: unsupported architecture '{name}' (supported: llama, qwen2)")]
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
        if model_dim % head_count != 0 {
            return Err(invalid(format!(
                "embedding length {model_dim} does not split into {head_count} heads"
            )));
        }
        let head_dim = model_dim / head_count;
        let ffn_dim = bounded("feed_forward_length", 1 << 20)?;
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
        let (rope_style, qkv_bias) = match architecture {
            Architecture::Llama => (RopeStyle::AdjacentPairs, false),
            Architecture::Qwen2 => (RopeStyle::Neox, true),
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
            config
                .ffn_down_block
                .push(block("ffn_down.weight").unwrap_or(1));
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
            out.push((t("attn_output.weight"), vec![q, d]));
            out.push((t("ffn_norm.weight"), vec![d]));
            out.push((t("ffn_gate.weight"), vec![d, self.ffn_dim]));
            out.push((t("ffn_up.weight"), vec![d, self.ffn_dim]));
            out.push((t("ffn_down.weight"), vec![self.ffn_dim, d]));
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
