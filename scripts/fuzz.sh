#!/usr/bin/env bash
# Fuzzes tp's input parsers with cargo-fuzz (libFuzzer; needs a nightly toolchain):
#   scripts/fuzz.sh [SECONDS] [TARGET...]     default: 600 s each for gguf, hosts_toml, control_messages, step_replies
# Starts from the committed seeds (fuzz/corpus/TARGET) and keeps what it finds in
# fuzz/target/corpus-TARGET. A crash stops the run and leaves its input in
# fuzz/artifacts/TARGET/; fix it, then copy the input to fuzz/regressions/TARGET/ so that
# tests/fuzz_corpus.rs replays it on every test run.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-600}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(gguf hosts_toml control_messages step_replies)

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

for target in "${targets[@]}"; do
  work="fuzz/target/corpus-$target"
  mkdir -p "$work"
  echo "fuzz: $target for ${seconds}s" >&2
  cargo +nightly fuzz run "$target" "$PWD/$work" "$PWD/fuzz/corpus/$target" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
    2>&1 | tee "fuzz/target/$target.log" | grep -E '^(Done|stat::number_of_executed_units|==[0-9]+==|SUMMARY)' || true
  if ls "fuzz/artifacts/$target"/crash-* >/dev/null 2>&1; then
    echo "fuzz: $target found a crash: fuzz/artifacts/$target/" >&2
    exit 1
  fi
done
