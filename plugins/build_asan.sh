#!/usr/bin/env bash
# Build the native op library from the same sources as the package's extension (pyproject.toml's sources and
# compile flags) plus AddressSanitizer and UndefinedBehaviorSanitizer,
# into a separate .so for tests/test_native_fuzz.py. The normal build (pip install) is not affected.
#   plugins/build_asan.sh [OUT_SO]      default: plugins/build/_cpu_kernels_asan.so
# A process loading it must preload the ASan runtime, e.g.
#   LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 python ...
# CC selects the compiler (default gcc).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/build/_cpu_kernels_asan.so}"
cc="${CC:-gcc}"
# the extension's own flags (baseline x86-64: the AVX2 kernels are compiled by their target attributes and chosen
# at run time, so the sanitized code takes the same paths); the fallback, the same flags, is for a copy of
# plugins/ without pyproject.toml beside it
flags="$(python3 - "$here/../pyproject.toml" <<'PY' 2>/dev/null || echo "-O3 -fopenmp -std=c11"
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    ext = tomllib.load(f)["tool"]["setuptools"]["ext-modules"][0]
print(" ".join(ext["extra-compile-args"]))
PY
)"
# every C file in plugins/ is one of the extension's sources
sources=("$here"/*.c)
mkdir -p "$(dirname "$out")"
# -O1 after the extension's -O3: what the sanitizers recommend, and a faster compile; the code paths are the same
# shellcheck disable=SC2086  # flags is a word list
"$cc" $flags -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -shared -fPIC \
    -I"$here" "${sources[@]}" -o "$out"
echo "$out"
