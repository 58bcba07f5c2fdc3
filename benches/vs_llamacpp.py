#!/usr/bin/env python3
"""Prints the markdown comparison table for benches/vs_llamacpp.sh.

Reads llama-bench's `-o json` output and `tp-coordinator bench --format json` output (both an
array of objects with n_threads, n_prompt, n_gen, n_depth, avg_ts, stddev_ts; tp's also carry
`tp`, its number of workers, with n_threads being threads per worker). A tp row at TP=k with t
threads per worker is compared with llama.cpp at k*t threads, when llama.cpp ran at that count.
"""
import argparse
import json
import os
import sys


def load(path, what):
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit("vs_llamacpp: error: cannot read %s output %s: %s" % (what, path, e))
    if not isinstance(data, list):
        sys.exit("vs_llamacpp: error: %s output is not a JSON array" % what)
    need = ("n_threads", "n_prompt", "n_gen", "avg_ts", "stddev_ts")
    for i, r in enumerate(data):
        missing = [k for k in need if k not in r]
        if missing:
            sys.exit("vs_llamacpp: error: %s result %d lacks %s" % (what, i, ", ".join(missing)))
    return data


def test_name(r):
    p, n, d = int(r["n_prompt"]), int(r["n_gen"]), int(r.get("n_depth") or 0)
    if n == 0:
        name = "pp%d" % p
    elif p == 0:
        name = "tg%d" % n
    else:
        name = "pp%d+tg%d" % (p, n)
    return name + (" @ d%d" % d if d else "")


def test_order(r):  # prompt processing first, then generation, then mixed
    p, n = int(r["n_prompt"]), int(r["n_gen"])
    return (0 if n == 0 else 1 if p == 0 else 2, p, n, int(r.get("n_depth") or 0))


def speed(r):
    return "%.2f ± %.2f" % (float(r["avg_ts"]), float(r["stddev_ts"]))


def bandwidth(r):
    read, mem = r.get("effective_read_gbps"), r.get("memory_read_gbps")
    if read is None:
        return "—"
    if not mem:
        return "%.1f" % read
    return "%.1f of %.1f (%.0f%%)" % (read, mem, 100.0 * read / mem)


def isa():
    """The SIMD extensions that matter to both programs, from /proc/cpuinfo's flags."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), [])
    except OSError:
        return "unknown"
    names = [("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512F"), ("avx512bw", "BW"),
             ("avx512vl", "VL"), ("avx512_vnni", "VNNI"), ("avx_vnni", "AVX-VNNI"),
             ("avx512_bf16", "BF16"), ("amx_int8", "AMX-INT8 (flag)"), ("asimd", "NEON"),
             ("asimddp", "dotprod")]
    have = [n for f, n in names if f in flags]
    return " ".join(have) if have else "none of AVX2/AVX-512/NEON"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama", required=True, help="llama-bench -o json output")
    ap.add_argument("--tp", required=True, help="tp-coordinator bench --format json output")
    ap.add_argument("--model", required=True, help="model path (its file name is shown)")
    ap.add_argument("--llama-version", default="", help="where the llama.cpp source came from")
    a = ap.parse_args()

    llama = load(a.llama, "llama-bench")
    tp = load(a.tp, "tp-coordinator bench")
    model = os.path.basename(a.model)
    if model.endswith(".gguf"):
        model = model[: -len(".gguf")]

    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count()
    print("machine: %s cores (nproc), %s; ISA: %s" % (nproc, cpu_model(), isa()))
    if tp and "kernels" in tp[0]:
        print("tp kernels: %s" % tp[0]["kernels"])
    if llama:
        l0 = llama[0]
        src = (a.llama_version + ", ") if a.llama_version else ""
        print("llama.cpp: %scommit %s, build %s, backend %s"
              % (src, l0.get("build_commit", "?"), l0.get("build_number", "?"),
                 l0.get("backends", "?")))
        if "model_type" in l0:
            print("model: %s (%s, %.1f MiB, %.1fM parameters)"
                  % (model, l0["model_type"], l0.get("model_size", 0) / 2**20,
                     l0.get("model_n_params", 0) / 1e6))
    print()

    # llama.cpp's best setting: with several rows per test (e.g. `--repack 0,1`), the fastest.
    by_key = {}
    for r in llama:
        key = (test_name(r), int(r["n_threads"]))
        if key not in by_key or float(r["avg_ts"]) > float(by_key[key]["avg_ts"]):
            by_key[key] = r
    compared = set()
    rows = []
    for r in tp:
        k = int(r.get("tp", 1))
        t = int(r["n_threads"])
        key = (test_name(r), k * t)
        ref = by_key.get(key)
        ratio = "—"
        if ref is not None:
            compared.add(key)
            if float(ref["avg_ts"]) > 0:
                ratio = "%.2f" % (float(r["avg_ts"]) / float(ref["avg_ts"]))
            ref_col = speed(ref) + (" (repack %d)" % int(ref["repack"]) if "repack" in ref else "")
            threads_col = str(k * t)
        else:
            ref_col = "—"
            threads_col = "%d (llama.cpp not run at %d)" % (k * t, k * t)
        tp_col = "TP=%d × %d thread%s" % (k, t, "" if t == 1 else "s")
        rows.append((test_order(r), k, t,
                     [model, test_name(r), threads_col, ref_col, tp_col, speed(r), ratio,
                      bandwidth(r)]))
    # llama.cpp measurements that no tp row was compared with are still shown.
    for key, r in by_key.items():
        if key not in compared:
            compared.add(key)
            rows.append((test_order(r), 0, int(r["n_threads"]),
                         [model, key[0], str(key[1]), speed(r), "—", "—", "—", "—"]))
    rows.sort(key=lambda x: (x[0], x[2] * max(x[1], 1), x[1]))

    head = ["model", "test", "threads (total)", "llama.cpp t/s", "tp config",
            "tp t/s", "tp / llama.cpp", "tp weights read GB/s (of memory GB/s)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] * 2 + ["--:"] + ["--:", "---", "--:", "--:", "--:"]) + "|")
    for _, _, _, cells in rows:
        print("| " + " | ".join(cells) + " |")
    print()
    print("t/s: tokens per second, mean ± standard deviation over the repetitions. "
          "tp at TP=k with t threads per worker is compared with llama.cpp at k×t threads; "
          "llama.cpp's figure is its faster weight layout (`--repack 0,1`) where both ran. "
          "Weights read: the bytes of the weights one generated token reads times tp's tokens/s, "
          "next to the machine's sequential read bandwidth with as many threads.")


if __name__ == "__main__":
    main()
