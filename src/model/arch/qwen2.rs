//! `qwen2` (Qwen2, Qwen2.5) and `qwen2moe` (Qwen1.5-MoE, Qwen2-MoE). llama.cpp's
//! `src/models/qwen2.cpp` and `qwen2moe.cpp`: biases on Q, K and V, NEOX RoPE; the mixture
//! does not renormalize its routing weights and adds a shared expert behind a sigmoid gate.

use super::blocks::{self, AttentionOptions};
use super::{ArchError, Common, Metadata, ModelConfig, RopeStyle};

pub fn describe(meta: &Metadata) -> Result<ModelConfig, ArchError> {
    build(meta, false)
}

pub fn describe_moe(meta: &Metadata) -> Result<ModelConfig, ArchError> {
    build(meta, true)
}

fn build(meta: &Metadata, is_moe: bool) -> Result<ModelConfig, ArchError> {
    let c = Common::read(meta, 1e-5)?;
    let (ffn_dim, moe) = if is_moe {
        let shared = match meta.optional_count("expert_shared_feed_forward_length", 1 << 20)? {
            Some(width) => Some(width),
            // Older files state no width: the shared expert's tensors do.
            None => meta
                .file
                .tensor("blk.0.ffn_gate_shexp.weight")
                .and_then(|t| t.dims.get(1).map(|&d| d as usize)),
        };
        // llama.cpp sizes experts from expert_feed_forward_length; feed_forward_length, which
        // MoE files also carry, describes something else there and is not used.
        let moe = blocks::moe_config(meta, false, shared)?;
        (
            meta.count("expert_feed_forward_length", 1 << 20)?,
            Some(moe),
        )
    } else {
        (meta.count("feed_forward_length", 1 << 20)?, None)
    };
    let options = AttentionOptions {
        qkv_bias: true,
        ..AttentionOptions::plain(&c)
    };
    let rope = c.rope(meta, RopeStyle::Neox)?;
    blocks::uniform(meta, &c, &options, moe, ffn_dim, rope)
}
