//! `llama`: Llama 1–3.x, Mistral, and Mixtral (llama with routed experts). llama.cpp's
//! `src/models/llama.cpp`. Adjacent-pair RoPE (the converter permuted Q and K), with llama3
//! frequency factors (`rope_freqs.weight`), linear or YaRN scaling where the file asks.

use super::blocks::{self, AttentionOptions};
use super::{ArchError, Common, Metadata, ModelConfig, RopeStyle};

pub fn describe(meta: &Metadata) -> Result<ModelConfig, ArchError> {
    let c = Common::read(meta, 1e-5)?;
    let ffn_dim = meta.count("feed_forward_length", 1 << 20)?;
    // Mixtral is llama with experts: softmax routing, the selected weights renormalized.
    let moe = match meta.optional_count("expert_count", 4096)? {
        Some(_) => Some(blocks::moe_config(meta, true, None)?),
        None => None,
    };
    let mut options = AttentionOptions::plain(&c);
    options.qkv_bias = meta.has_tensor("blk.0.attn_q.bias");
    if let Some(scale) = meta.optional_f32("attention.scale")? {
        options.scale = scale;
    }
    let mut rope = c.rope(meta, RopeStyle::AdjacentPairs)?;
    // llama3 scaling: per-pair frequency divisors in a tensor of their own.
    if meta.has_tensor("rope_freqs.weight") {
        rope.freq_factors = Some("rope_freqs.weight".into());
    }
    blocks::uniform(meta, &c, &options, moe, ffn_dim, rope)
}
