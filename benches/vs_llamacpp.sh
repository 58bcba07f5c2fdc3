#!/usr/bin/env bash
# tp next to llama.cpp: runs llama.cpp's llama-bench and `tp-coordinator bench` on the same model
# with the same sizes, thread counts and repetitions, and prints one markdown table with the ratios.
#
#   benches/vs_llamacpp.sh [-m MODEL.gguf] [-p N_PROMPT] [-n N_GEN] [-t THREADS,...] [-r REPS]
#                          [--tp TP_SIZES,...]
#
# Defaults: SmolLM2-135M-Instruct Q4_1 from ${TP_MODEL_DIR:-~/.cache/tp/models} (fetched if
# missing), -p 512, -n 128, -t 1,2, -r 3, --tp 1. `-t` is threads per worker for tp: TP=1 rows
# are compared with llama.cpp at the same thread count, TP=k rows with t threads per worker with
# llama.cpp at k*t threads when that count is in -t too (e.g. `-t 1,2 --tp 1,2`).
#
# llama.cpp is the copy vendored in the llama-cpp-python source distribution on PyPI (version
# pinned below). It is downloaded, unpacked and built (CPU only, -DGGML_NATIVE=ON, only the
# llama-bench target) once under ${TP_CACHE_DIR:-~/.cache/tp}/llama.cpp/; later runs reuse it.
# If cmake is missing it is installed into a virtual environment in that directory (or with
# `pip --user`, or apt-get when running as root).
#
# Environment:
#   TP_CACHE_DIR    cache root (default ~/.cache/tp)
#   TP_MODEL_DIR    where the default model lives (default ~/.cache/tp/models)
#   TP_BUILD_LOCK   optional lock file; when set, every build step runs under `flock` on it so
#                   that builds started by several scripts on one machine do not overlap
#   LLAMA_REPACK    llama-bench's --repack values (default 0,1: both weight layouts are run and
#                   the faster is compared)
#   LLAMA_TARGETS   llama.cpp targets to build (default llama-bench)
#
# `benches/vs_llamacpp.sh --build-only` builds llama.cpp (LLAMA_TARGETS) and prints its bin folder.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

# llama-cpp-python release whose vendor/llama.cpp is benchmarked, and its sdist's SHA-256.
LCP_VERSION=0.3.36
LCP_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e

die() { echo "vs_llamacpp: error: $*" >&2; exit 1; }
note() { echo "vs_llamacpp: $*" >&2; }

usage() {
  echo "usage:"
  sed -n '5,6p' "$0" | sed 's/^# \{0,1\}//'
  echo "Defaults: -m SmolLM2-135M-Instruct.Q4_1.gguf -p 512 -n 128 -t 1,2 -r 3 --tp 1"
}

# ---- options ---------------------------------------------------------------------------------
default_model="${TP_MODEL_DIR:-$HOME/.cache/tp/models}/SmolLM2-135M-Instruct.Q4_1.gguf"
model="" n_prompt=512 n_gen=128 threads=1,2 reps=3 tp_sizes=1 build_only=0
llama_targets="${LLAMA_TARGETS:-llama-bench}"
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --build-only) build_only=1; shift ;;
    -m|--model|-p|--n-prompt|-n|--n-gen|-t|--threads|-r|--repetitions|--tp)
      [ $# -ge 2 ] || die "option $1 needs a value"
      case "$1" in
        -m|--model) model="$2" ;;
        -p|--n-prompt) n_prompt="$2" ;;
        -n|--n-gen) n_gen="$2" ;;
        -t|--threads) threads="$2" ;;
        -r|--repetitions) reps="$2" ;;
        --tp) tp_sizes="$2" ;;
      esac
      shift 2 ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done
for v in "$n_prompt" "$n_gen" "$reps"; do
  [[ "$v" =~ ^[0-9]+$ ]] || die "-p, -n and -r take a whole number, got '$v'"
done
[ "$reps" -ge 1 ] || die "-r must be at least 1"
[ "$n_prompt" -gt 0 ] || [ "$n_gen" -gt 0 ] || die "-p and -n are both 0: nothing to measure"
for v in "$threads" "$tp_sizes"; do
  [[ "$v" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || die "-t and --tp take positive numbers separated by commas, got '$v'"
done

# ---- prerequisites ---------------------------------------------------------------------------
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' is not installed; $2"; }
need python3 "it is needed to fetch llama.cpp and to print the table"
need cargo "install Rust (1.85 or newer) to build tp"
need tar "it is needed to unpack llama.cpp"
need sha256sum "it is needed to check the llama.cpp download"
python3 -m pip --version >/dev/null 2>&1 || die "python3 has no pip; install pip (e.g. python3 -m ensurepip)"

if [ "$build_only" = 0 ]; then
  if [ -z "$model" ]; then
    model="$default_model"
    if [ ! -s "$model" ]; then
      note "default model missing, fetching it"
      model="$(scripts/fetch-models.sh smollm2)/SmolLM2-135M-Instruct.Q4_1.gguf"
    fi
  fi
  [ -s "$model" ] || die "model '$model' does not exist"
  model="$(cd "$(dirname "$model")" && pwd)/$(basename "$model")"
fi

build_step() { # runs a build command, under the shared lock when TP_BUILD_LOCK is set
  if [ -n "${TP_BUILD_LOCK:-}" ]; then
    need flock "TP_BUILD_LOCK is set but flock(1) is missing"
    flock "$TP_BUILD_LOCK" "$@"
  else
    "$@"
  fi
}

cache="${TP_CACHE_DIR:-$HOME/.cache/tp}/llama.cpp"
mkdir -p "$cache"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# ---- 1. llama.cpp source ---------------------------------------------------------------------
sdist="$cache/llama_cpp_python-$LCP_VERSION.tar.gz"
src_root="$cache/llama_cpp_python-$LCP_VERSION"
src="$src_root/vendor/llama.cpp"
if [ ! -s "$sdist" ]; then
  note "downloading llama-cpp-python $LCP_VERSION source distribution (about 75 MB) into $cache"
  # Only llama-cpp-python itself has to come as source; its build requirements (which pip
  # installs to read the package's metadata) may come as wheels.
  python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
    -d "$work/dl" "llama-cpp-python==$LCP_VERSION" ||
    die "pip could not download llama-cpp-python==$LCP_VERSION from PyPI"
  [ -s "$work/dl/$(basename "$sdist")" ] || die "pip did not produce $(basename "$sdist")"
  mv "$work/dl/$(basename "$sdist")" "$sdist.part"
  got="$(sha256sum "$sdist.part" | cut -d' ' -f1)"
  [ "$got" = "$LCP_SHA256" ] || { rm -f "$sdist.part"; die "$(basename "$sdist") has sha256 $got, expected $LCP_SHA256"; }
  mv "$sdist.part" "$sdist"
fi
if [ ! -e "$src_root/.unpacked" ]; then
  note "unpacking $(basename "$sdist")"
  rm -rf "$src_root"
  tar -xzf "$sdist" -C "$cache" || die "could not unpack $sdist"
  [ -f "$src/CMakeLists.txt" ] || die "$sdist has no vendor/llama.cpp/CMakeLists.txt"
  touch "$src_root/.unpacked"
fi

# ---- 2. llama-bench --------------------------------------------------------------------------
build="$cache/build-$LCP_VERSION"
# -march=native turns on AMX where the CPU has it, and a virtual machine may not grant the
# tiles (llama.cpp then dies with "Illegal instruction"): on such CPUs build for the
# CPU's AVX-512 and AVX2 extensions by name instead, in a build folder of its own.
isa_flags=(-DGGML_NATIVE=ON)
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
  build="$cache/build-$LCP_VERSION-noamx"
  isa_flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
  for flag in avx512f:AVX512 avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
    grep -qw "${flag%%:*}" /proc/cpuinfo && isa_flags+=("-DGGML_${flag#*:}=ON")
  done
fi
llama_bench="$build/bin/llama-bench"
built() { local t; for t in $llama_targets; do [ -x "$build/bin/$t" ] || return 1; done; }
find_cmake() { # prints a usable cmake, installing one if there is none
  local venv="$cache/cmake-venv" user_bin
  if command -v cmake >/dev/null 2>&1; then command -v cmake; return 0; fi
  if [ -x "$venv/bin/cmake" ]; then echo "$venv/bin/cmake"; return 0; fi
  user_bin="$(python3 -m site --user-base 2>/dev/null)/bin"
  if [ -x "$user_bin/cmake" ]; then echo "$user_bin/cmake"; return 0; fi
  note "cmake not found; installing it with pip into $venv"
  if python3 -m venv "$venv" >&2 && "$venv/bin/python" -m pip install --quiet cmake >&2 &&
     [ -x "$venv/bin/cmake" ]; then
    echo "$venv/bin/cmake"; return 0
  fi
  rm -rf "$venv"
  note "virtual environment failed; trying python3 -m pip install --user cmake"
  if python3 -m pip install --quiet --user cmake >&2 && [ -x "$user_bin/cmake" ]; then
    echo "$user_bin/cmake"; return 0
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    note "pip failed; trying apt-get install -y cmake"
    if apt-get install -y cmake >&2 || { apt-get update >&2 && apt-get install -y cmake >&2; }; then
      command -v cmake && return 0
    fi
  fi
  return 1
}
if built; then
  note "reusing $build/bin ($llama_targets)"
else
  cmake_bin="$(find_cmake)" || die "cmake is missing and could not be installed (tried a pip venv, pip --user, apt-get); install CMake 3.14 or newer"
  command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || command -v clang++ >/dev/null 2>&1 ||
    die "no C++ compiler (c++, g++ or clang++) found; install one to build llama.cpp"
  command -v make >/dev/null 2>&1 || command -v ninja >/dev/null 2>&1 ||
    die "neither make nor ninja is installed; one is needed to build llama.cpp"
  generator=()
  command -v make >/dev/null 2>&1 || generator=(-G Ninja)
  note "building $llama_targets with $("$cmake_bin" --version | head -n1) in $build ($(nproc) jobs)"
  start=$SECONDS
  build_step nice -n 10 "$cmake_bin" -S "$src" -B "$build" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF "${isa_flags[@]}" \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF \
    -DGGML_CUDA=OFF -DGGML_HIP=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_SYCL=OFF \
    -DGGML_OPENCL=OFF -DGGML_BLAS=OFF -DGGML_RPC=OFF >"$work/cmake.log" 2>&1 ||
    { tail -n 40 "$work/cmake.log" >&2; die "configuring llama.cpp failed (log above)"; }
  # shellcheck disable=SC2086
  build_step nice -n 10 "$cmake_bin" --build "$build" --config Release --target $llama_targets \
    -j "$(nproc)" >"$work/build.log" 2>&1 ||
    { tail -n 40 "$work/build.log" >&2; die "building $llama_targets failed (log above)"; }
  built || die "the build finished but $build/bin lacks one of $llama_targets"
  note "$llama_targets built in $((SECONDS - start)) s"
fi
if [ "$build_only" = 1 ]; then
  echo "$build/bin"
  exit 0
fi

# ---- 3. tp -----------------------------------------------------------------------------------
note "building tp (release)"
build_step cargo build --release --locked --quiet --bin tp-coordinator --bin tp-worker ||
  die "cargo build failed"
coordinator="${CARGO_TARGET_DIR:-$repo/target}/release/tp-coordinator"
"$coordinator" bench --help >/dev/null 2>&1 ||
  die "this tp-coordinator has no 'bench' subcommand ($coordinator bench --help fails)"

# ---- 4. measurements -------------------------------------------------------------------------
llama_cmd=("$llama_bench" -m "$model" -p "$n_prompt" -n "$n_gen" -t "$threads" -r "$reps"
           --repack "${LLAMA_REPACK:-0,1}" -o json)
tp_cmd=("$coordinator" bench -m "$model" -p "$n_prompt" -n "$n_gen" -t "$threads" --tp "$tp_sizes"
        -r "$reps" --format json)
note "running: ${llama_cmd[*]}"
"${llama_cmd[@]}" >"$work/llama.json" 2>"$work/llama.log" ||
  { tail -n 30 "$work/llama.log" >&2; die "llama-bench failed (log above)"; }
note "running: ${tp_cmd[*]}"
"${tp_cmd[@]}" >"$work/tp.json" 2>"$work/tp.log" ||
  { tail -n 30 "$work/tp.log" >&2; die "tp-coordinator bench failed (log above)"; }

# ---- 5. table --------------------------------------------------------------------------------
python3 "$repo/benches/vs_llamacpp.py" --llama "$work/llama.json" --tp "$work/tp.json" \
  --model "$model" --llama-version "llama-cpp-python $LCP_VERSION"
