#!/usr/bin/env bash
# Runs tp's whole test suite: fetches the test models and the Python client the server tests
# drive it with (openai) if missing, then builds and runs every test
# with the optimized test profile, and type-checks the benchmarks so they cannot rot unseen.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh all >/dev/null
scripts/python-deps.sh
cargo check --locked --benches --quiet
exec cargo test --locked "$@"
