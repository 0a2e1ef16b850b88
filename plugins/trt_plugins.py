"""TensorRT plugins for the rwkvq ops, through TensorRT's Python plugin API (`tensorrt.plugin`).

The plugins are named like the ONNX ops (namespace `rwkvq`, names `VQMatMul`
and `VQElementwise`), so TensorRT's ONNX parser maps the custom nodes to
them (`build-engine` sets the nodes' `plugin_namespace` attribute). Both use
ahead-of-time implementations: the CUDA kernels of `rwkvq_kernels.cu` are
compiled to PTX (nvcc, or NVRTC through cuda-python) and embedded in the
engine, so the engine runs in the C++ runtime (trtexec, Triton) without
Python and without any plugin library to load.

What TensorRT checks at registration shapes this module (TensorRT 10.9+,
`tensorrt/plugin/_validate.py`):
- annotations must be real classes at run time (`issubclass(annotation,
  TensorDesc)`), so this module must not use `from __future__ import
  annotations`;
- every `aot_impl` needs the return annotation `Tuple[str|bytes, str|bytes,
  KernelLaunchParams, SymIntExprs]`.

The plugin boundary is explicit (what `build-engine` prepares, and what the
shape functions refuse otherwise): activations fp16 in and out; the byte-typed
weights (uint8 codes, int8 codebooks) as INT32 tensors holding the same bytes
in packed little-endian words (the ONNX parser would widen UINT8 weights to
one INT32 per byte, which the word count of the codes exposes); VQElementwise's
codebook and VQMatMul's scales FP32. `VQMatMul` runs the shared-memory VQ GEMV for at
most `MAX_ROWS` activation rows (decode steps); `build-engine` refuses more.

This module imports TensorRT only inside `register_plugins()`; `define_plugins`
takes the `tensorrt.plugin` module and TensorRT's data types as arguments so
that the definitions can be checked without TensorRT.
"""
import ctypes
import functools
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Tuple, Union

from rwkvq_onnx.errors import ConfigError, MissingDependencyError
from rwkvq_onnx.names import DOMAIN
from rwkvq_onnx.opspec import vq_elementwise, vq_matmul

NAMESPACE = DOMAIN  # the ONNX parser maps rwkvq nodes to plugins of this namespace (plugin_namespace attribute)
# Attributes each plugin is registered with: the op spec's, plus the row bound build-engine adds to VQMatMul.
PLUGIN_ATTRIBUTES = {vq_matmul.OP_TYPE: (*vq_matmul.ATTRIBUTES, "max_rows"),
                     vq_elementwise.OP_TYPE: vq_elementwise.ATTRIBUTES}
GEMV_WARPS = 8
MAX_ROWS = 8  # RWKVQ_MAX_BATCH in rwkvq_kernels.cu: rows past it would never be written
DECODE_ROWS_PER_WARP = 2  # RWKVQ_DECODE_ROWS_PER_WARP in rwkvq_kernels.cu
# Dynamic shared memory a kernel may use without cudaFuncSetAttribute(MaxDynamicSharedMemorySize); the AOT
# launcher inside TensorRT does not promise that opt-in, so layouts needing more are refused.
SHARED_MEM_LIMIT = 48 * 1024
DECODE_KERNEL = "rwkvq_trt_vq_gemv_decode"  # <MAXB=1, RPW=2>: the instance plugins/harness.py benchmarks
BATCH_KERNEL = "rwkvq_trt_vq_gemv"  # <MAXB=8, RPW=1>
ELEMENTWISE_KERNEL = "rwkvq_trt_vq_elementwise"


def kernel_source() -> str:
    return resources.files(__package__).joinpath("rwkvq_kernels.cu").read_text()


def device_arch(device: int = 0) -> str:
    """`compute_XY` of a CUDA device (driver API through ctypes); a TensorRT engine is bound to its GPU's
    compute capability, so the embedded PTX is compiled for exactly that (and JIT-compiles on newer ones)."""
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        major, minor, dev = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
        if lib.cuInit(0) == 0 and lib.cuDeviceGet(ctypes.byref(dev), device) == 0:
            # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
            if (lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev) == 0
                    and lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev) == 0):
                return f"compute_{major.value}{minor.value}"
    raise MissingDependencyError("an NVIDIA GPU", "the plugins' PTX is compiled for the GPU that builds the engine")


@functools.lru_cache(maxsize=None)
def compile_ptx(arch: str) -> str:
    """PTX of the rwkvq kernels for a virtual architecture (`compute_XY`): nvcc when on PATH, else NVRTC."""
    if not arch.startswith("compute_"):
        raise ConfigError(f"PTX target must be a virtual architecture compute_XY, got {arch}")
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
    opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17"]
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


def gemv_launch(N: int, K: int, dim: int, group_rows: int, group_cols: int, index_bits: int,
                max_rows: int = MAX_ROWS) -> dict:
    """Kernel, grid, block and shared memory of the TensorRT VQ GEMV for at most `max_rows` activation rows.

    One activation row (decode at batch 1) runs the <MAXB=1, RPW=2> instance that the harness benchmarks;
    more rows run <MAXB=8, RPW=1>. One source for the plugin, the harness and the tests."""
    rpw = DECODE_ROWS_PER_WARP if max_rows == 1 else 1
    row_bytes = vq_matmul.Attributes(N, K, dim, group_rows, group_cols, index_bits).row_bytes
    C = K // group_cols
    warps = max(1, min(GEMV_WARPS, -(-group_rows // rpw)))
    smem = 4 * (C * (1 << index_bits) * dim + warps * rpw * (32 * index_bits + 1))
    return {"kernel": DECODE_KERNEL if max_rows == 1 else BATCH_KERNEL, "rows_per_warp": rpw,
            "grid": (-(-N // group_rows), -(-group_rows // (warps * rpw))), "block": 32 * warps,
            "shared_mem": smem, "row_bytes": row_bytes}


def gemv_supported(N: int, K: int, dim: int, group_rows: int, group_cols: int, index_bits: int,
                   max_rows: int = MAX_ROWS) -> Optional[str]:
    """Why the TensorRT VQ GEMV cannot take this layout or row count, or None (a layout the op spec refuses
    raises its ConfigError)."""
    vq_matmul.validate(dict(N=N, K=K, dim=dim, group_rows=group_rows, group_cols=group_cols,
                            index_bits=index_bits), node="gemv layout")
    if not 1 <= max_rows <= MAX_ROWS:
        return f"it computes 1..{MAX_ROWS} activation rows per call, the engine needs up to {max_rows}"
    if K % group_cols:
        return f"K={K} is not a multiple of group_cols={group_cols}"
    if dim not in (1, 2, 4):
        return f"dim={dim} (the CUDA GEMV is instantiated for dim 1, 2 and 4)"
    launch = gemv_launch(N, K, dim, group_rows, group_cols, index_bits, max_rows)
    if launch["row_bytes"] % 4:
        return f"code rows of {launch['row_bytes']} bytes are not 4-byte aligned"
    if launch["shared_mem"] > SHARED_MEM_LIMIT:
        return (f"codebooks need {launch['shared_mem']} bytes of shared memory per block, over the "
                f"{SHARED_MEM_LIMIT} available without an opt-in")
    return None


def _static(dim) -> Optional[int]:
    """A dimension's value when known at build time (an int, or a constant TensorRT ShapeExpr), else None."""
    if isinstance(dim, int):
        return dim
    return dim.constant_value() if getattr(dim, "is_constant", False) else None


def _check_words(op: str, codes, words: int) -> None:
    """Refuse codes whose last dimension is not the packed word count (e.g. bytes widened one per int32)."""
    got = _static(codes.shape_expr[codes.ndim - 1])
    if got is not None and got != words:
        raise ValueError(f"{NAMESPACE}::{op}: codes hold {got} int32 per row, expected {words} packed words")


def _check_types(op: str, got: dict, want: dict) -> None:
    """Refuse tensors whose types differ from the kernel's (TensorRT reports the ValueError at build)."""
    for name, dtype in want.items():
        if got[name] != dtype:
            raise ValueError(f"{NAMESPACE}::{op}: input '{name}' is {got[name]}, the kernel reads {dtype}")


def define_plugins(trtp, dtypes, arch: str) -> dict:
    """Register the two plugins' shape functions and AOT implementations with `trtp` (`tensorrt.plugin`).

    `dtypes` names TensorRT's data types (`float16`, `float32`, `int32`: the `tensorrt` module itself);
    returns the four functions by role so that they can be inspected."""

    @trtp.register(f"{NAMESPACE}::VQMatMul")
    def vq_matmul_desc(x: trtp.TensorDesc, codes: trtp.TensorDesc, codebooks: trtp.TensorDesc,
                       scales: trtp.TensorDesc, N: int, K: int, dim: int, group_rows: int, group_cols: int,
                       index_bits: int, max_rows: int) -> trtp.TensorDesc:
        _check_types("VQMatMul", {"x": x.dtype, "codes": codes.dtype, "codebooks": codebooks.dtype,
                                  "scales": scales.dtype},
                     {"x": dtypes.float16, "codes": dtypes.int32, "codebooks": dtypes.int32, "scales": dtypes.float32})
        why = gemv_supported(N, K, dim, group_rows, group_cols, index_bits, max_rows)  # validates via the spec
        if why:
            raise ValueError(f"{NAMESPACE}::VQMatMul: {why}")
        _check_words("VQMatMul", codes, gemv_launch(N, K, dim, group_rows, group_cols, index_bits)["row_bytes"] // 4)
        out = x.like()
        out.shape_expr[x.ndim - 1] = N  # [..., K] -> [..., N]
        return out

    @trtp.aot_impl(f"{NAMESPACE}::VQMatMul")
    def vq_matmul_aot(x: trtp.TensorDesc, codes: trtp.TensorDesc, codebooks: trtp.TensorDesc,
                      scales: trtp.TensorDesc, N: int, K: int, dim: int, group_rows: int, group_cols: int,
                      index_bits: int, max_rows: int, outputs: Tuple[trtp.TensorDesc], tactic: int
                      ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
        launch = gemv_launch(N, K, dim, group_rows, group_cols, index_bits, max_rows)
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y = launch["grid"]
        params.block_x = launch["block"]
        params.shared_mem = launch["shared_mem"]
        rows = x.shape_expr.numel() // K  # activation rows: at most max_rows (the build profile's bound)
        extra = trtp.SymIntExprs(8)  # the kernel's scalar arguments, in order
        extra[0] = trtp.SymInt32(rows)
        for i, v in enumerate((N, K, dim, group_rows, group_cols, index_bits, launch["row_bytes"]), start=1):
            extra[i] = trtp.SymInt32(v)
        return launch["kernel"], compile_ptx(arch), params, extra

    @trtp.register(f"{NAMESPACE}::VQElementwise")
    def vq_elementwise_desc(x: trtp.TensorDesc, codes: trtp.TensorDesc, codebook: trtp.TensorDesc,
                            index_bits: int, shape: str) -> trtp.TensorDesc:
        _check_types("VQElementwise", {"x": x.dtype, "codes": codes.dtype, "codebook": codebook.dtype},
                     {"x": dtypes.float16, "codes": dtypes.int32, "codebook": dtypes.float32})
        a = vq_elementwise.validate({"index_bits": index_bits, "shape": shape}, node="VQElementwise plugin")
        _check_words("VQElementwise", codes, -(-a.codes_bytes // 4))
        return x.like()

    @trtp.aot_impl(f"{NAMESPACE}::VQElementwise")
    def vq_elementwise_aot(x: trtp.TensorDesc, codes: trtp.TensorDesc, codebook: trtp.TensorDesc,
                           index_bits: int, shape: str, outputs: Tuple[trtp.TensorDesc], tactic: int
                           ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams,
                                      trtp.SymIntExprs]:
        a = vq_elementwise.validate({"index_bits": index_bits, "shape": shape}, node="VQElementwise plugin")
        n = a.count
        total = x.shape_expr.numel()
        params = trtp.KernelLaunchParams()
        params.grid_x = trtp.cdiv(total, 256)
        params.block_x = 256
        extra = trtp.SymIntExprs(4)
        extra[0] = trtp.SymInt32(total)
        extra[1] = trtp.SymInt32(n)
        extra[2] = trtp.SymInt32(index_bits)
        extra[3] = trtp.SymInt32(a.codes_bytes)
        return ELEMENTWISE_KERNEL, compile_ptx(arch), params, extra

    return {"VQMatMul": (vq_matmul_desc, vq_matmul_aot), "VQElementwise": (vq_elementwise_desc, vq_elementwise_aot)}


@functools.lru_cache(maxsize=None)
def register_plugins(arch: Optional[str] = None) -> Tuple[str, ...]:
    """Register `rwkvq::VQMatMul` and `rwkvq::VQElementwise` with TensorRT (PTX for `arch`, default: the
    compute capability of GPU 0); returns their ids."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    dtypes = SimpleNamespace(float16=trt.float16, float32=trt.float32, int32=trt.int32)
    define_plugins(trtp, dtypes, arch or device_arch())
    return (f"{NAMESPACE}::VQMatMul", f"{NAMESPACE}::VQElementwise")
