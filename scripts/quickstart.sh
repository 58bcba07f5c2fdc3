#!/usr/bin/env bash
# Fetches the default model (SmolLM2-135M-Instruct Q4_1) if missing and generates text with it
# split across two local worker processes.
#   scripts/quickstart.sh ["prompt"]
set -euo pipefail
cd "$(dirname "$0")/.."
model_dir="$(scripts/fetch-models.sh smollm2)"
cargo build --release --locked --bin tp-coordinator --bin tp-worker
exec target/release/tp-coordinator generate \
  --model "$model_dir/SmolLM2-135M-Instruct.Q4_1.gguf" --local 2 --chat \
  --prompt "${1:-Write a haiku about two processes sharing one model.}" -n 96
