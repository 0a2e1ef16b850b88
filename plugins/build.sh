#!/usr/bin/env bash
# Compile the rwkvq CUDA kernels to PTX (what TensorRT AOT plugins embed) and to a cubin, as a compile check.
#   plugins/build.sh [OUT_DIR] [SM]
# OUT_DIR defaults to plugins/build. SM defaults to the compute capability of GPU 0 (nvidia-smi), else 80:
# PTX for compute_80 is the portable choice (it JIT-compiles on A100, L4/L40S (89), H100/H200 (90) and newer).
# build-engine does not use this script: it compiles the PTX for the building GPU's own compute_XY.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/build}"
if [[ $# -ge 2 ]]; then
  sm="$2"
elif cc="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader -i 0 2>/dev/null)" && [[ -n "$cc" ]]; then
  sm="${cc/./}"
else
  sm=80
fi
mkdir -p "$out"
nvcc -std=c++17 -O3 -arch="compute_${sm}" -ptx "$here/rwkvq_kernels.cu" -o "$out/rwkvq_kernels.ptx"
nvcc -std=c++17 -O3 -arch="sm_${sm}" -cubin "$here/rwkvq_kernels.cu" -o "$out/rwkvq_kernels.cubin"
echo "wrote $out/rwkvq_kernels.ptx (compute_${sm}) and $out/rwkvq_kernels.cubin (sm_${sm})"
