#!/usr/bin/env bash
# Compile the rwkvq CUDA kernels to PTX (what TensorRT AOT plugins embed) and to a cubin, as a compile check.
#   plugins/build.sh [OUT_DIR] [SM]      default: plugins/build, sm_90 (Hopper); e.g. 80 for A100, 89 for L4/Ada
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/build}"
sm="${2:-90}"
mkdir -p "$out"
nvcc -std=c++17 -O3 -arch="sm_${sm}" -ptx "$here/rwkvq_kernels.cu" -o "$out/rwkvq_kernels.ptx"
nvcc -std=c++17 -O3 -arch="sm_${sm}" -cubin "$here/rwkvq_kernels.cu" -o "$out/rwkvq_kernels.cubin"
echo "wrote $out/rwkvq_kernels.ptx and $out/rwkvq_kernels.cubin (sm_${sm})"
