"""TensorRT plugins for the rwkvq ops, through TensorRT's Python plugin API (`tensorrt.plugin`).

The plugins are named like the ONNX ops (namespace `rwkvq`, names `VQMatMul`
and `VQElementwise`), so TensorRT's ONNX parser maps the custom nodes to
them (`build-engine` sets the nodes' `plugin_namespace` attribute). Both use
ahead-of-time implementations: the CUDA kernels of `rwkvq_kernels.cu` are
compiled to PTX (nvcc, or NVRTC through cuda-python) and embedded in the
engine, so the engine runs in the C++ runtime (trtexec, Triton) without
Python.

`VQMatMul` runs the shared-memory VQ GEMV (fp16 activations, up to 8 rows:
the decode step); graphs for prefill use `quantize --lower-vq`.

This module imports TensorRT only inside `register_plugins()`; nothing here
can run on a machine without TensorRT and a GPU (see README: verification).
"""
from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from rwkvq_onnx.errors import MissingDependencyError

NAMESPACE = "rwkvq"
GEMV_WARPS = 8
MAX_ROWS = 8  # RWKVQ_MAX_BATCH in rwkvq_kernels.cu


def kernel_source() -> str:
    return resources.files(__package__).joinpath("rwkvq_kernels.cu").read_text()


@functools.lru_cache(maxsize=None)
def compile_ptx(arch: str = "sm_90") -> str:
    """PTX of the rwkvq kernels: nvcc when on PATH, else NVRTC through cuda-python."""
    if shutil.which("nvcc"):
        with tempfile.TemporaryDirectory() as tmp:
            src, out = Path(tmp) / "k.cu", Path(tmp) / "k.ptx"
            src.write_text(kernel_source())
            subprocess.run(["nvcc", "-std=c++17", "-O3", f"-arch={arch}", "-ptx", str(src), "-o", str(out)],
                           check=True, capture_output=True)
            return out.read_text()
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        raise MissingDependencyError("a CUDA compiler", "put nvcc on PATH or pip install cuda-python") from None
    err, prog = nvrtc.nvrtcCreateProgram(kernel_source().encode(), b"rwkvq_kernels.cu", 0, [], [])
    opts = [f"--gpu-architecture={arch.replace('sm_', 'compute_')}".encode(), b"-std=c++17"]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        raise RuntimeError(f"NVRTC failed: {log.decode(errors='replace')}")
    _, size = nvrtc.nvrtcGetPTXSize(prog)
    ptx = b" " * size
    nvrtc.nvrtcGetPTX(prog, ptx)
    return ptx.decode().rstrip("\x00")


def gemv_launch(N: int, K: int, dim: int, group_rows: int, group_cols: int, index_bits: int) -> dict:
    """Grid, block and shared memory of `rwkvq_trt_vq_gemv` (one source for plugin and tests)."""
    C = K // group_cols
    warps = max(1, min(GEMV_WARPS, group_rows))
    smem = 4 * (C * (1 << index_bits) * dim + warps * (32 * index_bits + 1))
    return {"grid": (-(-N // group_rows), -(-group_rows // warps)), "block": 32 * warps, "shared_mem": smem,
            "row_bytes": -(-(K // dim) * index_bits // 8)}


def gemv_supported(N: int, K: int, dim: int, group_rows: int, group_cols: int, index_bits: int) -> str | None:
    """Why the TensorRT VQ GEMV cannot take this layout, or None."""
    launch = gemv_launch(N, K, dim, group_rows, group_cols, index_bits)
    if K % group_cols:
        return f"K={K} is not a multiple of group_cols={group_cols}"
    if launch["row_bytes"] % 4:
        return f"code rows of {launch['row_bytes']} bytes are not 4-byte aligned"
    if launch["shared_mem"] > 227 * 1024:
        return f"codebooks need {launch['shared_mem']} bytes of shared memory per block"
    return None


@functools.lru_cache(maxsize=None)
def register_plugins(arch: str = "sm_90") -> tuple[str, ...]:
    """Register `rwkvq::VQMatMul` and `rwkvq::VQElementwise` with TensorRT; returns their ids."""
    import numpy as np
    import tensorrt.plugin as trtp

    @trtp.register(f"{NAMESPACE}::VQMatMul")
    def vq_matmul_desc(x: trtp.TensorDesc, codes: trtp.TensorDesc, codebooks: trtp.TensorDesc,
                       scales: trtp.TensorDesc, N: int, K: int, dim: int, group_rows: int, group_cols: int,
                       index_bits: int) -> trtp.TensorDesc:
        out = x.like()
        out.shape_expr[x.ndim - 1] += N - K  # [..., K] -> [..., N]
        return out

    @trtp.aot_impl(f"{NAMESPACE}::VQMatMul")
    def vq_matmul_aot(x: trtp.TensorDesc, codes: trtp.TensorDesc, codebooks: trtp.TensorDesc,
                      scales: trtp.TensorDesc, N: int, K: int, dim: int, group_rows: int, group_cols: int,
                      index_bits: int, outputs, tactic: int):
        launch = gemv_launch(N, K, dim, group_rows, group_cols, index_bits)
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y = launch["grid"]
        params.block_x = launch["block"]
        params.shared_mem = launch["shared_mem"]
        rows = x.shape_expr.numel() // K  # activation rows (B, or B*T): at most MAX_ROWS
        extra = trtp.SymIntExprs(8)  # the kernel's scalar arguments, in order
        extra[0] = trtp.SymInt32(rows)
        for i, v in enumerate((N, K, dim, group_rows, group_cols, index_bits, launch["row_bytes"]), start=1):
            extra[i] = trtp.SymInt32(v)
        return "rwkvq_trt_vq_gemv", compile_ptx(arch), params, extra

    @trtp.register(f"{NAMESPACE}::VQElementwise")
    def vq_elementwise_desc(x: trtp.TensorDesc, codes: trtp.TensorDesc, codebook: trtp.TensorDesc,
                            index_bits: int, shape: str) -> trtp.TensorDesc:
        return x.like()

    @trtp.aot_impl(f"{NAMESPACE}::VQElementwise")
    def vq_elementwise_aot(x: trtp.TensorDesc, codes: trtp.TensorDesc, codebook: trtp.TensorDesc,
                           index_bits: int, shape: str, outputs, tactic: int):
        n = int(np.prod([int(s) for s in shape.split(",")]))
        total = x.shape_expr.numel()
        params = trtp.KernelLaunchParams()
        params.grid_x = trtp.cdiv(total, 256)
        params.block_x = 256
        extra = trtp.SymIntExprs(4)
        extra[0] = trtp.SymInt32(total)
        extra[1] = trtp.SymInt32(n)
        extra[2] = trtp.SymInt32(index_bits)
        extra[3] = trtp.SymInt32(-(-n * index_bits // 8))
        return "rwkvq_trt_vq_elementwise", compile_ptx(arch), params, extra

    return (f"{NAMESPACE}::VQMatMul", f"{NAMESPACE}::VQElementwise")
