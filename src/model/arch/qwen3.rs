//! `qwen3` (dense) and `qwen3moe`. llama.cpp's `src/models/qwen3.cpp` and `qwen3moe.cpp`:
//! per-head RMSNorm of queries and keys before NEOX RoPE, no biases, the head size from
//! `attention.key_length`; the mixture renormalizes the selected experts' weights.

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
        let moe = blocks::moe_config(meta, true, None)?;
        (
            meta.count("expert_feed_forward_length", 1 << 20)?,
            Some(moe),
        )
    } else {
        (meta.count("feed_forward_length", 1 << 20)?, None)
    };
    let options = AttentionOptions {
        qk_norm: true,
        ..AttentionOptions::plain(&c)
    };
    let rope = c.rope(meta, RopeStyle::Neox)?;
    blocks::uniform(meta, &c, &options, moe, ffn_dim, rope)
}
