#!/usr/bin/env bash
# Generation speed and worker memory at several worker counts, one after another on this machine.
#   benches/generate_tp.sh [MODEL.gguf] [N_PREDICT] [TP sizes...]
# Prints, per TP size, prompt and generation tokens/s (greedy, fixed prompt) and, per worker,
# its shard's weight bytes next to its peak RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:-${TP_MODEL_DIR:-$HOME/.cache/tp/models}/SmolLM2-135M-Instruct.Q4_1.gguf}"
n="${2:-128}"
shift 2 2>/dev/null || true
sizes=("${@:-1 2 3}")
cargo build --release --locked --quiet --bin tp-coordinator --bin tp-worker
prompt="Write a short story about a robot who learns to paint. Once upon a time"
echo "model: $model, $(nproc) cores, n_predict $n, greedy"
printf '| TP | threads/worker | prompt tok/s | generation tok/s | worker: weights MiB / peak RSS MiB |\n|---|---|---|---|---|\n'
for tp in ${sizes[@]}; do
  threads=$(( $(nproc) / tp )); [ "$threads" -ge 1 ] || threads=1
  target/release/tp-coordinator generate --model "$model" --local "$tp" --threads "$threads" \
    --prompt "$prompt" -n "$n" --temperature 0 --format json |
  python3 -c '
import json, sys
r = json.load(sys.stdin)
t = r["timings"]
mib = lambda b: b / 2**20
mem = ", ".join("%.1f / %.1f" % (mib(w["weight_bytes"]), mib(w["peak_rss_bytes"])) for w in r["workers"])
print("| %s | %s | %.1f | %.1f | %s |" % (sys.argv[1], sys.argv[2], t["prompt_tokens_per_second"], t["generated_tokens_per_second"], mem))
' "$tp" "$threads"
done
