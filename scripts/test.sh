#!/usr/bin/env bash
# Runs tp's whole test suite: fetches the test models and the Python client the server tests
# drive it with (openai) if missing, then builds and runs every test
# with the optimized test profile, and type-checks the benchmarks so they cannot rot unseen.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh all >/dev/null
scripts/python-deps.sh
# NUMA placement (tp-worker --numa-node) builds where the system hwloc is installed; CI
# installs it, so there a missing hwloc is an error rather than a quietly smaller test run.
features=()
if pkg-config --exists hwloc 2>/dev/null; then
  features=(--features numa)
elif [ -n "${CI:-}" ]; then
  echo "test: hwloc is missing (Debian: libhwloc-dev libudev-dev pkg-config)" >&2
  exit 1
else
  echo "test: hwloc not found: building without NUMA support (install libhwloc-dev libudev-dev pkg-config to test it)" >&2
fi
cargo check --locked --benches --quiet "${features[@]}"
cargo test --locked "${features[@]}" "$@"
# Say which SIMD kernel sets the kernel tests compared with the scalar reference on this CPU
# (every set the CPU runs is tested; none is skipped quietly).
cargo test --locked --quiet --lib "${features[@]}" kernel_sets_tested -- --nocapture 2>&1 |
  grep '^kernel sets tested' >&2 || { echo "test: could not list the tested kernel sets" >&2; exit 1; }
