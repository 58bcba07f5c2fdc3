#!/usr/bin/env python3
"""A deterministic synthetic GGUF of llama.cpp's `gpt-oss` architecture (no small real gpt-oss file exists).

What it exercises, as llama.cpp reads the architecture (src/models/openai-moe.cpp):
  - 4 layers alternating sliding-window (layers 0 and 2, window 32) and full causal attention (1 and 3);
  - attention sinks (`attn_sinks.weight`, one logit per query head, joining each head's softmax);
  - biases on Q, K, V, the attention output, the router and every expert's gate, up and down rows;
  - 8 query heads and 2 KV heads of 64 (queries 512 wide, twice d_model: the head size comes from key_length);
  - NEOX RoPE, base 150,000, YaRN factor 32 over an original context of 256 (prompts reach 688 positions);
  - 4 experts of 128 columns, 2 used per token, routed by the top-2 biased logits and a softmax over those two;
    experts in MXFP4 (gguf-py's encoder); 4% of the gate biases are +9 and 6% of the up biases +-9, so the clamped
    SwiGLU's limits (gate at 7 from above, up to [-7, 7]) always act on those columns;
  - the other matrices in Q8_0 (bit-exact, from ../moe-synthetic/make_moe_gguf.py), norms, biases, sinks and the
    router in F32, an untied output head;
  - the SmolLM2 vocabulary (BPE with merges) under the `gpt-4o` pre-tokenizer name.

Every random number comes from numpy's legacy `RandomState(seed)` in a fixed order, so the bytes depend only on this
script, numpy and the `gguf` package. Run with `--out FILE`; the sha256 is printed (and pinned in
scripts/fetch-models.sh).
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

SEED = 20261206
D, H, HKV, HD = 256, 8, 2, 64
LAYERS, WINDOW = 4, 32
EXPERTS, USED, FF = 4, 2, 128


def build(n_vocab, printable, seed):
    rs = np.random.RandomState(seed)

    def normal(shape, scale, mean=0.0):
        return (mean + rs.standard_normal(size=shape) * scale).astype(np.float32)

    def unif(shape, lo=0.5, hi=1.5):
        return rs.uniform(lo, hi, size=shape).astype(np.float32)

    W = [("token_embd.weight", normal((n_vocab, D), 3.0), "q8")]
    for il in range(LAYERS):
        p = f"blk.{il}."
        W.append((p + "attn_norm.weight", unif((D,)), "f32"))
        W.append((p + "attn_q.weight", normal((H * HD, D), 1.0 / 16.0), "q8"))
        W.append((p + "attn_q.bias", normal((H * HD,), 0.1), "f32"))
        W.append((p + "attn_k.weight", normal((HKV * HD, D), 1.0 / 16.0), "q8"))
        W.append((p + "attn_k.bias", normal((HKV * HD,), 0.1), "f32"))
        W.append((p + "attn_v.weight", normal((HKV * HD, D), 1.0 / 16.0), "q8"))
        W.append((p + "attn_v.bias", normal((HKV * HD,), 0.1), "f32"))
        W.append((p + "attn_output.weight", normal((D, H * HD), 1.0 / 16.0), "q8"))
        W.append((p + "attn_output.bias", normal((D,), 0.1), "f32"))
        # Sinks of the order of the attention logits: they take a real share of each softmax.
        W.append((p + "attn_sinks.weight", normal((H,), 1.0, mean=1.0), "f32"))
        W.append((p + "post_attention_norm.weight", unif((D,)), "f32"))
        # A sharp router: near-ties between the 2nd and 3rd expert, where a rounding flips a whole
        # expert (llama.cpp disagrees with itself there), stay rare.
        W.append((p + "ffn_gate_inp.weight", normal((EXPERTS, D), 5.0 / 16.0), "f32"))
        W.append((p + "ffn_gate_inp.bias", normal((EXPERTS,), 0.5), "f32"))
        # Gate and up pre-activations ~ N(0, 2.25) plus their biases; the columns whose bias is
        # +-9 sit beyond the clamp, where its output no longer depends on the input (larger random
        # pre-activations would make the model chaotic: every rounding difference would flip tokens).
        W.append((p + "ffn_gate_exps.weight", normal((EXPERTS, FF, D), 1.5 / 16.0), "mxfp4"))
        gate_bias = normal((EXPERTS, FF), 0.1)
        clamped = rs.uniform(size=(EXPERTS, FF)) < 0.04
        W.append((p + "ffn_gate_exps.bias", np.where(clamped, 9.0, gate_bias).astype(np.float32), "f32"))
        W.append((p + "ffn_up_exps.weight", normal((EXPERTS, FF, D), 1.5 / 16.0), "mxfp4"))
        up_bias = normal((EXPERTS, FF), 0.1)
        clamped = rs.uniform(size=(EXPERTS, FF)) < 0.06
        sign = np.where(rs.uniform(size=(EXPERTS, FF)) < 0.5, -9.0, 9.0)
        W.append((p + "ffn_up_exps.bias", np.where(clamped, sign, up_bias).astype(np.float32), "f32"))
        W.append((p + "ffn_down_exps.weight", normal((EXPERTS, D, FF), 1.0 / (3.0 * math.sqrt(FF))), "mxfp4"))
        W.append((p + "ffn_down_exps.bias", normal((EXPERTS, D), 0.1), "f32"))
    W.append(("output_norm.weight", unif((D,)), "f32"))
    row = np.exp(0.3 * rs.standard_normal(size=(n_vocab,)))
    row = np.where(printable, row, row * 0.5)
    W.append(("output.weight", (normal((n_vocab, D), 3.0 / 16.0) * row[:, None]).astype(np.float32), "q8"))
    return W


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer-from", required=True, help="donor GGUF (SmolLM2-135M-Instruct.Q4_1.gguf)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    tok = read_tokenizer(args.tokenizer_from)
    tokens, ttypes = tok["tokenizer.ggml.tokens"], tok["tokenizer.ggml.token_type"]
    W = build(len(tokens), printable_mask(tokens, ttypes), SEED)

    w = gguf.GGUFWriter(args.out, "gpt-oss")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(f"gptoss-synthetic seed {SEED}")
    w.add_block_count(LAYERS)
    w.add_context_length(8192)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FF)
    w.add_expert_feed_forward_length(FF)
    w.add_head_count(H)
    w.add_head_count_kv(HKV)
    w.add_key_length(HD)
    w.add_value_length(HD)
    w.add_rope_freq_base(150000.0)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(32.0)
    w.add_rope_scaling_orig_ctx_len(256)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_sliding_window(WINDOW)
    w.add_expert_count(EXPERTS)
    w.add_expert_used_count(USED)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_MXFP4_MOE)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # The donor's vocabulary under gpt-oss's pre-tokenizer name.
    write_tokenizer(w, tok, pre="gpt-4o")

    for name, arr, kind in W:
        if kind == "f32":
            w.add_tensor(name, arr)
        elif kind == "q8":
            w.add_tensor(name, quantize_q8_0(arr), raw_dtype=QT.Q8_0)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, QT.MXFP4), raw_dtype=QT.MXFP4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    h = hashlib.sha256()
    with open(args.out, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    print(f"{args.out}: gpt-oss, {len(W)} tensors, sha256 {h.hexdigest()}", file=sys.stderr)


if __name__ == "__main__":
    main()
