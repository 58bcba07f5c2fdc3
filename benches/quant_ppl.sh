#!/usr/bin/env bash
# Perplexity of tp next to llama.cpp's on model files in every quant type tp reads: a slow,
# opt-in correctness check (CI runs the kernel and split tests instead; see docs/PERFORMANCE.md).
#
#   benches/quant_ppl.sh [-c CTX] [--chunks N] [-t THREADS] [FILE.gguf ...]
#
# Without files it makes them (once, into ${TP_MODEL_DIR:-~/.cache/tp/models}/quant) with the
# pinned llama.cpp's llama-quantize from the fetched Q4_K_M models (requantized with
# --allow-requantize, as the issue permits for test files):
#   Qwen2.5-Coder-0.5B -> Q5_1, IQ4_NL, IQ4_XS, Q3_K_M, Q2_K, and an MXFP4 file (Q8_0 with the
#                         FFN, attn_q and attn_output matrices in MXFP4: gpt-oss's mix)
#   Qwen2.5-Coder-1.5B -> Q3_K_M, IQ4_XS, Q2_K (every row a multiple of 256, so the K and IQ4_XS
#                         types are used without fallbacks)
# Each file runs through llama-perplexity and `tp-coordinator perplexity` (one worker) on
# ../shared/golden/ppl_text.txt-style text (default: tests/data/golden's ppl text) with the same
# context and chunks; the table gives both perplexities and their relative difference.
set -euo pipefail
cd "$(dirname "$0")/.."
ctx=512 chunks=4 threads=2 files=()
while [ $# -gt 0 ]; do
  case "$1" in
    -c) ctx="$2"; shift 2 ;;
    --chunks) chunks="$2"; shift 2 ;;
    -t) threads="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "quant_ppl: unknown option $1" >&2; exit 2 ;;
    *) files+=("$1"); shift ;;
  esac
done
die() { echo "quant_ppl: error: $*" >&2; exit 1; }
text="${TP_PPL_TEXT:-tests/data/golden/ppl_text.txt}"
[ -s "$text" ] || die "no text at $text (set TP_PPL_TEXT)"
bin="$(LLAMA_TARGETS="llama-bench llama-quantize llama-perplexity" benches/vs_llamacpp.sh --build-only)" ||
  die "could not build llama.cpp"
cargo build --release --locked --quiet --bin tp-coordinator --bin tp-worker || die "cargo build failed"
tp="${CARGO_TARGET_DIR:-target}/release/tp-coordinator"
models="${TP_MODEL_DIR:-$HOME/.cache/tp/models}"
out="$models/quant"
mkdir -p "$out"

make_file() { # source type name [extra llama-quantize args...]
  local source="$models/$1" ty="$2" dest="$out/$3"; shift 3
  [ -s "$dest" ] && { echo "$dest"; return; }
  [ -s "$source" ] || die "$source is missing (scripts/fetch-models.sh; the 1.5B model: see ../shared/golden/qwen2.5-1.5b)"
  echo "quant_ppl: making $dest" >&2
  "$bin/llama-quantize" --allow-requantize "$@" "$source" "$dest.part" "$ty" "$threads" >"$dest.log" 2>&1 ||
    { tail -5 "$dest.log" >&2; die "llama-quantize $ty failed"; }
  mv "$dest.part" "$dest"
  echo "$dest"
}
if [ ${#files[@]} -eq 0 ]; then
  q05=qwen2.5-coder-0.5b-instruct-q4_k_m.gguf q15=qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
  for ty in Q5_1 IQ4_NL IQ4_XS Q3_K_M Q2_K; do files+=("$(make_file $q05 $ty qwen0.5b-$ty.gguf)"); done
  files+=("$(make_file $q05 Q8_0 qwen0.5b-MXFP4.gguf --tensor-type ffn_up=mxfp4 --tensor-type ffn_gate=mxfp4 \
    --tensor-type ffn_down=mxfp4 --tensor-type attn_q=mxfp4 --tensor-type attn_output=mxfp4)")
  if [ -s "$models/$q15" ]; then
    for ty in Q3_K_M IQ4_XS Q2_K; do files+=("$(make_file $q15 $ty qwen1.5b-$ty.gguf)"); done
  else
    echo "quant_ppl: $models/$q15 is missing; skipping the 1.5B files" >&2
  fi
fi

types() { # tensor types of a file, most common first
  PYTHONPATH="${TP_PYTHONPATH:-$HOME/.cache/tp/python}" python3 - "$1" <<'PY'
import collections, sys, gguf
c = collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(sys.argv[1]).tensors)
print(", ".join(f"{n} {k}" for k, n in c.most_common() if k != "F32"))
PY
}
ppl() { grep -o 'Final estimate: PPL = [0-9.]*' | awk '{print $NF}'; }
echo "| file | tensor types (besides F32) | llama.cpp PPL | tp PPL | tp / llama.cpp - 1 |"
echo "|---|---|--:|--:|--:|"
for f in "${files[@]}"; do
  l="$("$bin/llama-perplexity" -m "$f" -f "$text" -c "$ctx" --chunks "$chunks" -t "$threads" -b "$ctx" 2>&1 | ppl)" ||
    die "llama-perplexity failed on $f"
  t="$("$tp" perplexity -m "$f" --local 1 -t "$threads" -f "$text" -c "$ctx" --chunks "$chunks" 2>&1 | ppl)" ||
    die "tp perplexity failed on $f"
  [ -n "$l" ] && [ -n "$t" ] || die "no perplexity for $f (llama.cpp '$l', tp '$t')"
  d="$(python3 -c "print(f'{$t / $l - 1:+.3%}')")"
  echo "| $(basename "$f") | $(types "$f") | $l | $t | $d |"
done
echo
echo "Context $ctx, $chunks chunks of $text, $threads threads; llama.cpp: the pinned llama-cpp-python 0.3.36 build."
