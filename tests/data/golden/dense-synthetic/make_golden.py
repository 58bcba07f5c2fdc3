#!/usr/bin/env python3
"""Golden data for the synthetic dense models from the pinned llama.cpp build (see README.md beside this file).

  make_golden.py --bin DIR --model FILE --out DIR [--prompts ../moe-synthetic/generate.json]

Starts `DIR/llama-server` on the model (-t 1 -tb 1, defaults otherwise), runs every prompt of the prompts file greedily
(tokenized with add_special and parse_special, n_predict as there, 10 log-probabilities a step, no prompt cache) and
writes `generate.json`; then runs `DIR/llama-perplexity` at c = 128 and 512 on ../ppl_text.txt and writes `ppl.json`.
Both files have the formats of ../README.md.
"""
import argparse
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))


def post(port, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def generate(args, name):
    prompts = json.load(open(args.prompts))
    port = free_port()
    server = subprocess.Popen([os.path.join(args.bin, "llama-server"), "-m", args.model, "-t", "1", "-tb", "1",
                               "--host", "127.0.0.1", "--port", str(port)] + args.server_arg,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except Exception:
                time.sleep(0.2)
        cases = []
        for case in prompts["cases"]:
            ids = post(port, "/tokenize", {"content": case["prompt"], "add_special": True,
                                           "parse_special": True})["tokens"]
            out = post(port, "/completion", {"prompt": ids, "n_predict": case["n_predict"], "temperature": 0,
                                             "top_k": 1, "n_probs": 10, "cache_prompt": False,
                                             "return_tokens": True, "repeat_penalty": 1.0})
            top = [[[p["id"], p["logprob"]] for p in step["top_logprobs"]] for step in out["completion_probabilities"]]
            cases.append({"id": case["id"], "kind": case["kind"], "prompt": case["prompt"], "prompt_ids": ids,
                          "n_predict": case["n_predict"], "stop": "eos" if out["stop_type"] == "eos" else "limit",
                          "generated_ids": out["tokens"], "generated_text": out["content"], "top_logprobs": top})
    finally:
        server.terminate()
        server.wait()
    extra = " ".join(args.server_arg)
    json.dump({"producer": f"llama.cpp b11312 (llama-server POST /completion, CPU backend, -t 1 -tb 1 {extra})".strip(),
               "model": name, "model_sha256": sha256(args.model), "cases": cases},
              open(os.path.join(args.out, args.generate_name), "w"), indent=1)


def perplexity(args, name):
    text_file = os.path.join(HERE, "..", "ppl_text.txt")
    results = []
    for ctx in (128, 512):
        cmd = [os.path.join(args.bin, "llama-perplexity"), "-m", args.model, "-f", text_file, "-c", str(ctx),
               "-t", "2"]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True)
        text = log.stdout + log.stderr
        running = [float(v) for v in re.findall(r"\[\d+\](-?[0-9.e+]+|nan|inf)", text)]
        final = re.search(r"Final estimate: PPL = ([0-9.e+]+) \+/- ([0-9.e+]+)", text)
        results.append({"command": f"llama-perplexity -m {name} -f ppl_text.txt -c {ctx} -t 2", "n_ctx": ctx,
                        "chunks": len(running), "ppl": float(final.group(1)), "ppl_stderr": float(final.group(2)),
                        "running_ppl": running})
    json.dump({"producer": "llama.cpp b11312 (llama-perplexity, CPU backend)", "model": name,
               "text_file": "../ppl_text.txt", "text_tokens": args.text_tokens, "results": results},
              open(os.path.join(args.out, "ppl.json"), "w"), indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", default=os.path.join(HERE, "..", "moe-synthetic", "generate.json"))
    ap.add_argument("--no-ppl", action="store_true")
    ap.add_argument("--text-tokens", type=int, default=7638,
                    help="tokens of ../ppl_text.txt under the model's tokenizer (llama-tokenize -f, no special parsing);"
                         " 7638 for the SmolLM2 vocabulary with its own pre-tokenizer")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra llama-server argument (e.g. --server-arg=-fa --server-arg=off)")
    ap.add_argument("--generate-name", default="generate.json", help="file name of the generations")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    name = os.path.basename(args.model)
    generate(args, name)
    if not args.no_ppl:
        perplexity(args, name)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
