//! The pieces the architecture files build layers from (llama.cpp's `build_attn`,
//! `build_ffn`, `build_moe_ffn`), naming tensors by the GGUF convention.

use super::{
    Activation, ArchError, AttentionSpec, Common, FfnSpec, LayerSpec, LinearSpec, Metadata,
    ModelConfig, MoeConfig, MoeTensors, RopeSpec, SharedExpertTensors, Tensors,
};

/// What differs between the families' attention blocks.
pub struct AttentionOptions {
    /// Biases on Q, K and V.
    pub qkv_bias: bool,
    pub qk_norm: bool,
    pub rope: usize,
    pub window: Option<usize>,
    pub scale: f32,
    /// The name of the norm applied to the attention output before the residual add.
    pub post_norm: Option<&'static str>,
    /// A bias on the attention output (added once, after the AllReduce).
    pub output_bias: bool,
    /// Attention sinks (`attn_sinks`, one logit per query head).
    pub sinks: bool,
}

impl AttentionOptions {
    /// Plain attention: no biases, no QK-norm, the first RoPE table, global, 1/√head_dim.
    pub fn plain(c: &Common) -> AttentionOptions {
        AttentionOptions {
            qkv_bias: false,
            qk_norm: false,
            rope: 0,
            window: None,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
            post_norm: None,
            output_bias: false,
            sinks: false,
        }
    }
}

pub fn attention(t: &mut Tensors, c: &Common, layer: usize, o: &AttentionOptions) -> AttentionSpec {
    let d = c.model_dim;
    let q = c.head_count * c.head_dim;
    let kv = c.kv_head_count * c.head_dim;
    let mut linear = |name: &str, rows: usize, bias: bool| LinearSpec {
        weight: t.layer(layer, name, &[d, rows]),
        bias: bias.then(|| t.layer_bias(layer, name, rows)),
    };
    let q_proj = linear("attn_q", q, o.qkv_bias);
    let k_proj = linear("attn_k", kv, o.qkv_bias);
    let v_proj = linear("attn_v", kv, o.qkv_bias);
    AttentionSpec {
        norm: t.layer(layer, "attn_norm", &[d]),
        q: q_proj,
        k: k_proj,
        v: v_proj,
        output: LinearSpec {
            weight: t.layer(layer, "attn_output", &[q, d]),
            bias: o.output_bias.then(|| t.layer_bias(layer, "attn_output", d)),
        },
        qk_norm: o.qk_norm.then(|| {
            (
                t.layer(layer, "attn_q_norm", &[c.head_dim]),
                t.layer(layer, "attn_k_norm", &[c.head_dim]),
            )
        }),
        rope: o.rope,
        window: o.window,
        scale: o.scale,
        post_norm: o.post_norm.map(|n| t.layer(layer, n, &[d])),
        sinks: o
            .sinks
            .then(|| t.layer(layer, "attn_sinks", &[c.head_count])),
    }
}

/// A gated FFN of `width` columns.
pub fn gated_ffn(
    t: &mut Tensors,
    c: &Common,
    layer: usize,
    activation: Activation,
    width: usize,
) -> FfnSpec {
    let d = c.model_dim;
    FfnSpec::Gated {
        activation,
        gate: t.layer(layer, "ffn_gate", &[d, width]),
        up: t.layer(layer, "ffn_up", &[d, width]),
        down: t.layer(layer, "ffn_down", &[width, d]),
    }
}

/// Routed experts of `width` columns, and the shared expert where `moe` has one.
pub fn moe_ffn(
    t: &mut Tensors,
    c: &Common,
    layer: usize,
    moe: &MoeConfig,
    width: usize,
) -> FfnSpec {
    let (d, e) = (c.model_dim, moe.expert_count);
    FfnSpec::Moe(MoeTensors {
        router: t.layer(layer, "ffn_gate_inp", &[d, e]),
        gate: t.layer(layer, "ffn_gate_exps", &[d, width, e]),
        up: t.layer(layer, "ffn_up_exps", &[d, width, e]),
        down: t.layer(layer, "ffn_down_exps", &[width, d, e]),
        shared: moe.shared_ffn_dim.map(|s| SharedExpertTensors {
            gate_input: t.layer(layer, "ffn_gate_inp_shexp", &[d]),
            gate: t.layer(layer, "ffn_gate_shexp", &[d, s]),
            up: t.layer(layer, "ffn_up_shexp", &[d, s]),
            down: t.layer(layer, "ffn_down_shexp", &[s, d]),
        }),
        router_bias: None,
        gate_bias: None,
        up_bias: None,
        down_bias: None,
    })
}

/// `moe_ffn` with gpt-oss's biases on the router and on every expert's gate, up and down.
pub fn biased_moe_ffn(
    t: &mut Tensors,
    c: &Common,
    layer: usize,
    moe: &MoeConfig,
    width: usize,
) -> FfnSpec {
    let (d, e) = (c.model_dim, moe.expert_count);
    let FfnSpec::Moe(mut tensors) = moe_ffn(t, c, layer, moe, width) else {
        unreachable!("moe_ffn builds a mixture")
    };
    tensors.router_bias = Some(t.layer_bias(layer, "ffn_gate_inp", e));
    tensors.gate_bias = Some(t.add(format!("blk.{layer}.ffn_gate_exps.bias"), &[width, e]));
    tensors.up_bias = Some(t.add(format!("blk.{layer}.ffn_up_exps.bias"), &[width, e]));
    tensors.down_bias = Some(t.add(format!("blk.{layer}.ffn_down_exps.bias"), &[d, e]));
    FfnSpec::Moe(tensors)
}

/// The routed experts' hyper-parameters: `expert_count`, `expert_used_count`.
pub fn moe_config(
    meta: &Metadata,
    normalize_selected: bool,
    shared_ffn_dim: Option<usize>,
) -> Result<MoeConfig, ArchError> {
    let expert_count = meta.count("expert_count", 4096)?;
    let expert_used = meta.count("expert_used_count", expert_count as u64)?;
    Ok(MoeConfig {
        expert_count,
        expert_used,
        normalize_selected,
        softmax_selected: false,
        activation: Activation::Silu,
        shared_ffn_dim,
        shared_down_block: Vec::new(),
    })
}

/// Pre-norm layers, all alike: `options`' attention, then a SwiGLU FFN of `ffn_dim` columns or,
/// where `moe` says, routed experts of that width (llama, Mixtral, qwen2, qwen3 and their
/// mixtures).
pub fn uniform_layers(
    t: &mut Tensors,
    c: &Common,
    options: &AttentionOptions,
    moe: Option<&MoeConfig>,
    ffn_dim: usize,
) -> Vec<LayerSpec> {
    (0..c.layer_count)
        .map(|index| {
            let attention = attention(t, c, index, options);
            let ffn = match moe {
                Some(m) => moe_ffn(t, c, index, m, ffn_dim),
                None => gated_ffn(t, c, index, Activation::Silu, ffn_dim),
            };
            layer(t, c, index, attention, ffn)
        })
        .collect()
}

/// A whole model of `uniform_layers` with one RoPE table: the description of llama, qwen2,
/// qwen3 and their mixtures once their files have read what differs.
pub fn uniform(
    meta: &Metadata,
    c: &Common,
    options: &AttentionOptions,
    moe: Option<MoeConfig>,
    ffn_dim: usize,
    rope: RopeSpec,
) -> Result<ModelConfig, ArchError> {
    let mut t = Tensors::default();
    let layers = uniform_layers(&mut t, c, options, moe.as_ref(), ffn_dim);
    finish(
        meta,
        c,
        t,
        Model {
            layers,
            ropes: vec![rope],
            ffn_dim,
            moe,
            embedding_scale: None,
        },
    )
}

/// A pre-norm layer: the attention, then the FFN, each with its norm.
pub fn layer(
    t: &mut Tensors,
    c: &Common,
    layer: usize,
    attention: AttentionSpec,
    ffn: FfnSpec,
) -> LayerSpec {
    layer_with_ffn_norm(t, c, layer, attention, ffn, "ffn_norm")
}

/// `layer` whose pre-FFN norm has another name (gpt-oss: `post_attention_norm`).
pub fn layer_with_ffn_norm(
    t: &mut Tensors,
    c: &Common,
    layer: usize,
    attention: AttentionSpec,
    ffn: FfnSpec,
    ffn_norm: &str,
) -> LayerSpec {
    LayerSpec {
        attention,
        ffn_norm: t.layer(layer, ffn_norm, &[c.model_dim]),
        ffn,
        ffn_post_norm: None,
    }
}

/// The parts around the layers: the embedding, the final norm and the output head (the
/// embedding where the file ties them).
pub struct Model {
    pub layers: Vec<LayerSpec>,
    pub ropes: Vec<RopeSpec>,
    pub ffn_dim: usize,
    pub moe: Option<MoeConfig>,
    pub embedding_scale: Option<f32>,
}

/// Reads the vocabulary size from `token_embd.weight` (after the architecture's own keys, so
/// that a file's metadata errors come first).
pub fn finish(meta: &Metadata, c: &Common, t: Tensors, m: Model) -> Result<ModelConfig, ArchError> {
    let embedding = meta
        .file
        .tensor("token_embd.weight")
        .ok_or_else(|| meta.invalid("missing tensor 'token_embd.weight'"))?;
    if embedding.dims.len() != 2 || embedding.dims[0] as usize != c.model_dim {
        return Err(meta.invalid(format!(
            "token_embd.weight has shape {:?}, expected [{}, vocab]",
            embedding.dims, c.model_dim
        )));
    }
    let vocab = usize::try_from(embedding.dims[1])
        .ok()
        .filter(|&v| v >= 1)
        .ok_or_else(|| meta.invalid("token_embd.weight has no rows"))?;
    Ok(finish_named(meta.arch, c, vocab, t, m))
}

pub fn finish_named(
    arch: &'static str,
    c: &Common,
    vocab: usize,
    mut t: Tensors,
    m: Model,
) -> ModelConfig {
    let d = c.model_dim;
    let embedding = t.add("token_embd.weight".into(), &[d, vocab]);
    let output_norm = t.add("output_norm.weight".into(), &[d]);
    let output = if c.tied_output {
        embedding.clone()
    } else {
        t.add("output.weight".into(), &[d, vocab])
    };
    for rope in &m.ropes {
        if let Some(f) = &rope.freq_factors {
            t.add(f.clone(), &[rope.dim / 2]);
        }
    }
    ModelConfig {
        architecture: arch,
        layer_count: c.layer_count,
        model_dim: d,
        head_count: c.head_count,
        kv_head_count: c.kv_head_count,
        head_dim: c.head_dim,
        ffn_dim: m.ffn_dim,
        vocab_size: vocab,
        rms_norm_eps: c.rms_norm_eps,
        context_length: c.context_length,
        moe: m.moe,
        embedding,
        embedding_scale: m.embedding_scale,
        layers: m.layers,
        ropes: m.ropes,
        output_norm,
        output,
        tensors: t.list,
        ffn_down_block: Vec::new(),
    }
}
