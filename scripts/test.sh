#!/usr/bin/env bash
# Runs tp's whole test suite: fetches the test models if missing, then builds and runs every test
# with the optimized test profile, and type-checks the benchmarks so they cannot rot unseen.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh all >/dev/null
cargo check --locked --benches --quiet
exec cargo test --locked "$@"
