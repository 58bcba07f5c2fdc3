//! `gemma3` (Gemma 3 text models). llama.cpp's `src/models/gemma3.cpp` and its hyper-parameter
//! loader:
//! - embeddings scaled by √d_model; GeGLU (GELU, tanh form); NEOX RoPE; QK-norm;
//! - RMSNorm with the stored weights as they are (the converter already folded Gemma's
//!   `1 + w` into them);
//! - a norm after the attention and after the FFN, applied to the reduced output before the
//!   residual add;
//! - five sliding-window layers to one global layer (`il % 6 < 5` is local), the local ones
//!   with RoPE base 10,000 and no scaling, the global ones with the file's base and scaling;
//! - queries scaled by 1/√head_dim, except the 27B (62 layers): 1/√(d_model / heads).

use super::blocks::{self, AttentionOptions};
use super::{Activation, ArchError, Common, Metadata, ModelConfig, RopeSpec, RopeStyle, Tensors};

/// One layer in this many attends globally, the others through the sliding window.
const SWA_PATTERN: usize = 6;
const LOCAL_ROPE_BASE: f32 = 10_000.0;

pub fn describe(meta: &Metadata) -> Result<ModelConfig, ArchError> {
    let c = Common::read(meta, 1e-6)?;
    let ffn_dim = meta.count("feed_forward_length", 1 << 20)?;
    if let Some(cap) = meta.optional_f32("final_logit_softcapping")? {
        return Err(meta.invalid(format!(
            "{}: {cap}: final logit soft-capping is not supported",
            meta.key("final_logit_softcapping")
        )));
    }
    let window = c.sliding_window(meta)?;
    let global = c.rope(meta, RopeStyle::Neox)?;
    let local = RopeSpec {
        base: LOCAL_ROPE_BASE,
        freq_scale: 1.0,
        freq_factors: None,
        yarn: None,
        ..global.clone()
    };
    let scale = if c.layer_count == 62 {
        1.0 / ((c.model_dim / c.head_count) as f32).sqrt()
    } else {
        1.0 / (c.head_dim as f32).sqrt()
    };
    let mut t = Tensors::default();
    let layers = (0..c.layer_count)
        .map(|layer| {
            // Without a window every layer is global, as llama.cpp's newer loader reads such a
            // file (the pinned one requires the key).
            let is_local = window.is_some() && layer % SWA_PATTERN < SWA_PATTERN - 1;
            let options = AttentionOptions {
                qk_norm: true,
                rope: if is_local { 1 } else { 0 },
                window: if is_local { window } else { None },
                scale,
                post_norm: Some("post_attention_norm"),
                ..AttentionOptions::plain(&c)
            };
            let attention = blocks::attention(&mut t, &c, layer, &options);
            let ffn = blocks::gated_ffn(&mut t, &c, layer, Activation::GeluTanh, ffn_dim);
            let mut spec = blocks::layer(&mut t, &c, layer, attention, ffn);
            spec.ffn_post_norm = Some(t.layer(layer, "post_ffw_norm", &[c.model_dim]));
            spec
        })
        .collect();
    blocks::finish(
        meta,
        &c,
        t,
        blocks::Model {
            layers,
            ropes: vec![global, local],
            ffn_dim,
            moe: None,
            embedding_scale: Some((c.model_dim as f32).sqrt()),
        },
    )
}
