#!/usr/bin/env python3
"""Deterministic synthetic GGUF files for the dense families and RoPE scalings without a small real model.

Variants (each a small random-weight model, 4 layers, d_model 256, the SmolLM2 vocabulary copied from a donor GGUF):
  qwen3        llama.cpp `qwen3`: QK-norm, NEOX RoPE, no biases, heads of 64 (queries 512 wide, twice d_model, so the
               head size must come from `attention.key_length`), SwiGLU FFN of 512, untied output
  llama3       llama.cpp `llama` with llama3 RoPE scaling: `rope_freqs.weight` holds per-pair frequency divisors made
               with the llama3 formula (factor 8, low/high frequency factors 1 and 4) for an original context of 64
               positions, so that most pairs are scaled within the prompts used; adjacent-pair RoPE, GQA 8:2
  llama-linear `llama` with `rope.scaling.type = linear`, factor 4
  llama-yarn   `llama` with `rope.scaling.type = yarn`, factor 4, original context 256
  gemma3       llama.cpp `gemma3` with 6 layers (5 sliding-window layers of 32 positions, then 1 global), heads of 64,
               QK-norm, post-attention and post-FFN norms, GeGLU, embeddings scaled by sqrt(d_model)
  mixtral      `llama` with 8 routed experts of 128 columns, 2 used per token (Mixtral's layout: softmax routing,
               the two weights renormalized)
Every variant has an untied output head (`output.weight`), whose rows are scaled so that next-token distributions are
peaked but not certain.

Every random number comes from numpy's legacy `RandomState(seed)` in a fixed order; Q8_0 is implemented bit-exactly
(see ../moe-synthetic/make_moe_gguf.py, whose helpers this script uses), so the bytes depend only on this script, numpy
and the `gguf` package's writer. `--check` compares the written file's sha256 with the pinned value.
"""
import argparse
import hashlib
import math
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "moe-synthetic"))
from make_moe_gguf import printable_mask, quantize_q8_0, read_tokenizer, write_tokenizer  # noqa: E402

SEED = 20261205
VARIANTS = {
    "qwen3": dict(arch="qwen3", head_dim=64, qk_norm=True, tied=False),
    "llama3": dict(arch="llama", head_dim=32, rope_freqs=True, tied=False, rope_base=500000.0),
    "llama-linear": dict(arch="llama", head_dim=32, tied=False, scaling=("linear", 4.0, None)),
    "llama-yarn": dict(arch="llama", head_dim=32, tied=False, scaling=("yarn", 4.0, 256)),
    "mixtral": dict(arch="llama", head_dim=32, tied=False, experts=(8, 2)),
    # gemma3 multiplies the embeddings by sqrt(256) = 16: drawn 16 times smaller, so that the residual stream has the
    # other variants' scale. The output head is untied: a tied one, with the residual stream dominated by the token's
    # own embedding, would predict that token with certainty and pin nothing of the distribution.
    "gemma3": dict(arch="gemma3", head_dim=64, qk_norm=True, tied=False, layers=6, window=32, post_norms=True,
                   embd=3.0 / 16.0),
}
D, H, HKV, FF, FF_EXP = 256, 8, 2, 512, 128


def llama3_factors(head_dim, base, factor=8.0, low=1.0, high=4.0, original=64):
    """The per-pair divisors convert_hf_to_gguf writes for llama3 rope scaling."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / base ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def build(v, n_vocab, printable, seed):
    rs = np.random.RandomState(seed)
    hd = v["head_dim"]
    L = v.get("layers", 4)

    def normal(shape, scale):
        return (rs.standard_normal(size=shape) * scale).astype(np.float32)

    def unif(shape, lo=0.5, hi=1.5):
        return rs.uniform(lo, hi, size=shape).astype(np.float32)

    W = [("token_embd.weight", normal((n_vocab, D), v.get("embd", 3.0)), "q8")]
    for il in range(L):
        p = f"blk.{il}."
        W.append((p + "attn_norm.weight", unif((D,)), "f32"))
        W.append((p + "attn_q.weight", normal((H * hd, D), 1.0 / 16.0), "q8"))
        W.append((p + "attn_k.weight", normal((HKV * hd, D), 1.0 / 16.0), "q8"))
        W.append((p + "attn_v.weight", normal((HKV * hd, D), 1.0 / 16.0), "q8"))
        W.append((p + "attn_output.weight", normal((D, H * hd), 1.0 / 16.0), "q8"))
        if v.get("qk_norm"):
            W.append((p + "attn_q_norm.weight", unif((hd,), 0.75, 1.5), "f32"))
            W.append((p + "attn_k_norm.weight", unif((hd,), 0.75, 1.5), "f32"))
        if v.get("post_norms"):
            W.append((p + "post_attention_norm.weight", unif((D,)), "f32"))
        W.append((p + "ffn_norm.weight", unif((D,)), "f32"))
        if "experts" in v:
            e = v["experts"][0]
            W.append((p + "ffn_gate_inp.weight", normal((e, D), 2.5 / 16.0), "f32"))
            W.append((p + "ffn_gate_exps.weight", normal((e, FF_EXP, D), 1.0 / 16.0), "q8"))
            W.append((p + "ffn_up_exps.weight", normal((e, FF_EXP, D), 1.0 / 16.0), "q8"))
            W.append((p + "ffn_down_exps.weight", normal((e, D, FF_EXP), 1.0 / math.sqrt(FF_EXP)), "q8"))
        else:
            W.append((p + "ffn_gate.weight", normal((FF, D), 1.0 / 16.0), "q8"))
            W.append((p + "ffn_up.weight", normal((FF, D), 1.0 / 16.0), "q8"))
            W.append((p + "ffn_down.weight", normal((D, FF), 1.0 / math.sqrt(FF)), "q8"))
        if v.get("post_norms"):
            W.append((p + "post_ffw_norm.weight", unif((D,)), "f32"))
    W.append(("output_norm.weight", unif((D,)), "f32"))
    if not v["tied"]:
        row = np.exp(0.3 * rs.standard_normal(size=(n_vocab,)))
        row = np.where(printable, row, row * 0.5)
        W.append(("output.weight", (normal((n_vocab, D), 3.0 / 16.0) * row[:, None]).astype(np.float32), "q8"))
    if v.get("rope_freqs"):
        W.append(("rope_freqs.weight", llama3_factors(hd, v["rope_base"]), "f32"))
    return W


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    ap.add_argument("--tokenizer-from", required=True, help="donor GGUF (SmolLM2-135M-Instruct.Q4_1.gguf)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    v = VARIANTS[args.variant]
    tok = read_tokenizer(args.tokenizer_from)
    tokens, ttypes = tok["tokenizer.ggml.tokens"], tok["tokenizer.ggml.token_type"]
    W = build(v, len(tokens), printable_mask(tokens, ttypes), SEED)

    w = gguf.GGUFWriter(args.out, v["arch"])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(f"dense-synthetic {args.variant} seed {SEED}")
    w.add_block_count(v.get("layers", 4))
    w.add_context_length(4096)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FF_EXP if "experts" in v else FF)
    w.add_head_count(H)
    w.add_head_count_kv(HKV)
    w.add_rope_freq_base(v.get("rope_base", 1_000_000.0 if v["arch"] in ("qwen3", "gemma3") else 10000.0))
    w.add_layer_norm_rms_eps(1e-6 if v["arch"] in ("qwen3", "gemma3") else 1e-5)
    if "window" in v:
        w.add_sliding_window(v["window"])
    if v["arch"] in ("qwen3", "gemma3"):
        w.add_key_length(v["head_dim"])
        w.add_value_length(v["head_dim"])
    else:
        w.add_rope_dimension_count(v["head_dim"])
    if "experts" in v:
        w.add_expert_count(v["experts"][0])
        w.add_expert_used_count(v["experts"][1])
    if "scaling" in v:
        kind, factor, original = v["scaling"]
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        if original:
            w.add_rope_scaling_orig_ctx_len(original)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    write_tokenizer(w, tok)

    for name, arr, kind in W:
        if kind == "f32":
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, quantize_q8_0(arr), raw_dtype=QT.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    h = hashlib.sha256()
    with open(args.out, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    print(f"{args.out}: {args.variant}, {len(W)} tensors, sha256 {h.hexdigest()}", file=sys.stderr)


if __name__ == "__main__":
    main()
