#!/usr/bin/env bash
# Runs the CPU kernel tests for aarch64 (the NEON kernels) under qemu-aarch64 on an x86_64
# host: cross-compiles the library's unit tests with Debian's aarch64 gcc as the linker.
#
#   scripts/test-aarch64.sh            # kernel tests (default filter: kernels::)
#   scripts/test-aarch64.sh shm        # any other test filter
#
# Needs: rustup's aarch64-unknown-linux-gnu target, qemu-user and gcc-aarch64-linux-gnu
# (installed here with apt-get when running as root). Exits 3 when the Rust target cannot be
# installed (it comes from rustup's servers, not a package registry).
set -euo pipefail
cd "$(dirname "$0")/.."

target=aarch64-unknown-linux-gnu
if [[ "$(uname -m)" == aarch64 ]]; then
    exec cargo test --locked --release --lib -- "${1:-kernels::}"
fi

missing=()
command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
if ((${#missing[@]})); then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        echo "test-aarch64: installing ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "test-aarch64: missing ${missing[*]} (Debian packages); install them first" >&2
        exit 1
    fi
fi
if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    if ! rustup target add "$target"; then
        echo "test-aarch64: cannot install the Rust target $target" >&2
        exit 3
    fi
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
cargo test --locked --release --target "$target" --lib -- "${1:-kernels::}"
