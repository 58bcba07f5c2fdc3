#!/usr/bin/env python3
"""How closely two llama.cpp generation files agree (here: flash attention on and off), per prompt: the steps before
their tokens part, and the largest top-1 log-probability difference over those steps.

  compare_runs.py generate.json generate_fa_off.json
"""
import json
import sys


def main():
    a, b = (json.load(open(p))["cases"] for p in sys.argv[1:3])
    for x, y in zip(a, b):
        n = next((i for i, (p, q) in enumerate(zip(x["generated_ids"], y["generated_ids"])) if p != q),
                 len(x["generated_ids"]))
        delta = max([abs(p[0][1] - q[0][1]) for p, q in zip(x["top_logprobs"][:n], y["top_logprobs"][:n])] or [0.0])
        print(f"{x['id']:20} agree {n:2}/{len(x['generated_ids'])}  max top-1 delta {delta:.3f}")


if __name__ == "__main__":
    main()
