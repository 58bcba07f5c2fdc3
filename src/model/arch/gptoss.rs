//! `gpt-oss` (OpenAI's gpt-oss-20b and -120b). llama.cpp's `src/models/openai-moe.cpp` and its
//! hyper-parameter loader:
//! - layers alternate a sliding window (even layers, `attention.sliding_window` positions) and
//!   full causal attention (odd layers), with one RoPE table (NEOX, YaRN) for both;
//! - biases on Q, K, V and the attention output; one learned sink logit per query head joins
//!   each softmax;
//! - the pre-FFN norm is `post_attention_norm`; every layer is a mixture of experts: the top
//!   `expert_used_count` of the biased router logits, weighted by a softmax over those alone,
//!   each expert a clamped SwiGLU (alpha 1.702, limit 7) with biases on gate, up and down.

use super::blocks::{self, AttentionOptions};
use super::{Activation, ArchError, Common, Metadata, ModelConfig, RopeStyle, Tensors};

/// One layer in this many attends globally; the others (the even ones) through the window.
const SWA_PATTERN: usize = 2;

pub fn describe(meta: &Metadata) -> Result<ModelConfig, ArchError> {
    let c = Common::read(meta, 1e-5)?;
    let ffn_dim = meta.count("expert_feed_forward_length", 1 << 20)?;
    let window = c.sliding_window(meta)?.ok_or_else(|| {
        meta.invalid(format!(
            "missing metadata key '{}'",
            meta.key("attention.sliding_window")
        ))
    })?;
    let mut moe = blocks::moe_config(meta, false, None)?;
    moe.softmax_selected = true;
    moe.activation = Activation::SwigluOai;
    let rope = c.rope(meta, RopeStyle::Neox)?;
    let mut t = Tensors::default();
    let layers = (0..c.layer_count)
        .map(|layer| {
            let windowed = layer % SWA_PATTERN < SWA_PATTERN - 1;
            let options = AttentionOptions {
                qkv_bias: true,
                output_bias: true,
                sinks: true,
                window: windowed.then_some(window),
                ..AttentionOptions::plain(&c)
            };
            let attention = blocks::attention(&mut t, &c, layer, &options);
            let ffn = blocks::biased_moe_ffn(&mut t, &c, layer, &moe, ffn_dim);
            blocks::layer_with_ffn_norm(&mut t, &c, layer, attention, ffn, "post_attention_norm")
        })
        .collect();
    blocks::finish(
        meta,
        &c,
        t,
        blocks::Model {
            layers,
            ropes: vec![rope],
            ffn_dim,
            moe: Some(moe),
            embedding_scale: None,
        },
    )
}
