#!/usr/bin/env python3
"""Float64 forward pass of a qwen3moe or qwen2moe GGUF, written from the architecture's
description (tests/data/golden/moe-synthetic/README.md, and llama.cpp's qwen2moe graph for the
differences): an independent oracle for tp's mixture-of-experts layers.

Weights are dequantized with the `gguf` package and every operation runs in float64 without
activation rounding, so tp (which rounds activations to Q8_0 like llama.cpp) should agree with
it as llama.cpp does with an exact evaluation.

Usage: reference.py MODEL.gguf < request.json > reply.json
  request: {"sequences": [[token ids], ...], "top": 10}
  reply:   {"sequences": [[[[id, logprob], ...] per position], ...]}
"""
import json
import sys

import numpy as np
import gguf
from gguf import quants


def load(path):
    reader = gguf.GGUFReader(path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()

    def field(key, default=None):
        f = reader.fields.get(f"{arch}.{key}")
        if f is None:
            return default
        return f.parts[f.data[0]][0]

    hp = dict(
        arch=arch,
        layers=int(field("block_count")),
        d=int(field("embedding_length")),
        heads=int(field("attention.head_count")),
        kv_heads=int(field("attention.head_count_kv")),
        eps=float(field("attention.layer_norm_rms_epsilon")),
        base=float(field("rope.freq_base", 10000.0)),
        used=int(field("expert_used_count")),
    )
    hp["head_dim"] = int(field("attention.key_length", hp["d"] // hp["heads"]))
    weights = {}
    for t in reader.tensors:
        w = quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        weights[t.name] = w.reshape([int(x) for x in reversed(t.shape)] if w.ndim > 1 else -1)
    return hp, weights


def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_neox(x, positions, base):
    # x: [tokens, heads, head_dim]; pairs (i, i + head_dim / 2)
    half = x.shape[-1] // 2
    theta = positions[:, None] * base ** (-2.0 * np.arange(half) / x.shape[-1])
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def silu(x):
    return x / (1.0 + np.exp(-x))


def forward(hp, W, ids):
    n, hd, H, KV = len(ids), hp["head_dim"], hp["heads"], hp["kv_heads"]
    qwen3 = hp["arch"] == "qwen3moe"
    x = W["token_embd.weight"][ids]
    positions = np.arange(n, dtype=np.float64)
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for il in range(hp["layers"]):
        p = f"blk.{il}."
        h = rmsnorm(x, W[p + "attn_norm.weight"], hp["eps"])
        q, k, v = (h @ W[p + f"attn_{t}.weight"].T for t in "qkv")
        if not qwen3:
            q, k, v = (y + W[p + f"attn_{t}.bias"] for y, t in zip((q, k, v), "qkv"))
        q, k, v = q.reshape(n, H, hd), k.reshape(n, KV, hd), v.reshape(n, KV, hd)
        if qwen3:
            q = rmsnorm(q, W[p + "attn_q_norm.weight"], hp["eps"])
            k = rmsnorm(k, W[p + "attn_k_norm.weight"], hp["eps"])
        q, k = rope_neox(q, positions, hp["base"]), rope_neox(k, positions, hp["base"])
        heads = []
        for j in range(H):
            g = j // (H // KV)
            scores = q[:, j, :] @ k[:, g, :].T / np.sqrt(hd) + mask
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            heads.append((scores / scores.sum(axis=-1, keepdims=True)) @ v[:, g, :])
        x = x + np.concatenate(heads, axis=-1) @ W[p + "attn_output.weight"].T
        h = rmsnorm(x, W[p + "ffn_norm.weight"], hp["eps"])
        logits = h @ W[p + "ffn_gate_inp.weight"].T
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        out = np.zeros_like(x)
        for t in range(n):
            chosen = np.argsort(-probs[t], kind="stable")[: hp["used"]]
            w = probs[t, chosen]
            if qwen3:  # qwen3moe renormalizes over the selected experts; qwen2moe does not
                w = w / w.sum()
            for e, we in zip(chosen, w):
                a = silu(W[p + "ffn_gate_exps.weight"][e] @ h[t]) * (W[p + "ffn_up_exps.weight"][e] @ h[t])
                out[t] += we * (W[p + "ffn_down_exps.weight"][e] @ a)
        if p + "ffn_gate_shexp.weight" in W:
            gate = 1.0 / (1.0 + np.exp(-(h @ W[p + "ffn_gate_inp_shexp.weight"])))
            a = silu(h @ W[p + "ffn_gate_shexp.weight"].T) * (h @ W[p + "ffn_up_shexp.weight"].T)
            out += gate[:, None] * (a @ W[p + "ffn_down_shexp.weight"].T)
        x = x + out
    x = rmsnorm(x, W["output_norm.weight"], hp["eps"])
    logits = x @ W["output.weight"].T
    logits -= logits.max(axis=-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))


def main():
    hp, W = load(sys.argv[1])
    request = json.load(sys.stdin)
    top = int(request.get("top", 10))
    reply = []
    for ids in request["sequences"]:
        logprobs = forward(hp, W, np.array(ids))
        rows = []
        for row in logprobs:
            best = np.argsort(-row, kind="stable")[:top]
            rows.append([[int(i), float(row[i])] for i in best])
        reply.append(rows)
    json.dump({"sequences": reply}, sys.stdout)


if __name__ == "__main__":
    main()
