#!/usr/bin/env bash
# Runs tp's whole test suite: fetches the test models if missing, then builds and runs every test
# with the optimized test profile.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh all >/dev/null
exec cargo test --locked "$@"
