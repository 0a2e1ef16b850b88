"""onnxruntime implementations of the `rwkvq` ops.

`register()` returns the custom-op library every session the package opens
loads (`session_options()` in `runtime`), so quantized graphs run exactly
like fp ones: the package's native library (`plugins/ort_ops.c`, built by
the install) when present, else onnxruntime-extensions with the ops defined
as Python functions (correct, but each call costs a Python round trip).
"""
from __future__ import annotations

import numpy as np

from . import cpu_kernels
from .names import DOMAIN
from .opspec import sq_matmul, vq_elementwise, vq_matmul, wkv7_sequence, wkv7_step

_REGISTERED = False


def register(native: bool = True) -> str:
    """The custom-op library to load into session options (native unless asked not to or not built)."""
    path = cpu_kernels.library_path() if native else None
    if path is not None:
        return str(path)
    return register_python_ops()


def register_python_ops() -> str:
    """Define the rwkvq ops for onnxruntime-extensions; returns the library path to load."""
    global _REGISTERED
    from onnxruntime_extensions import PyCustomOpDef as T
    from onnxruntime_extensions import get_library_path, onnx_op

    if not _REGISTERED:
        dtypes = {np.dtype(np.float32): T.dt_float, np.dtype(np.uint8): T.dt_uint8, np.dtype(np.int8): T.dt_int8,
                  np.dtype(np.float16): T.dt_float16}

        @onnx_op(op_type=f"{DOMAIN}::{vq_matmul.OP_TYPE}", inputs=[dtypes[d] for d in vq_matmul.INPUT_DTYPES],
                 outputs=[dtypes[vq_matmul.OUTPUT_DTYPE]], attrs={k: T.dt_int64 for k in vq_matmul.ATTRIBUTES})
        def run_vq_matmul(x, codes, codebooks, scales, **attrs):
            return cpu_kernels.vq_matmul(x, codes, codebooks, scales, **{k: int(v) for k, v in attrs.items()})

        @onnx_op(op_type=f"{DOMAIN}::{vq_elementwise.OP_TYPE}",
                 inputs=[dtypes[d] for d in vq_elementwise.INPUT_DTYPES],
                 outputs=[dtypes[vq_elementwise.OUTPUT_DTYPE]], attrs={"index_bits": T.dt_int64, "shape": T.dt_string})
        def run_vq_elementwise(x, codes, codebook, **attrs):
            return vq_elementwise.reference(x, codes, codebook, index_bits=int(attrs["index_bits"]),
                                            shape=str(attrs["shape"]))

        @onnx_op(op_type=f"{DOMAIN}::{sq_matmul.OP_TYPE}", inputs=[dtypes[d] for d in sq_matmul.INPUT_DTYPES],
                 outputs=[dtypes[sq_matmul.OUTPUT_DTYPE]], attrs={k: T.dt_int64 for k in sq_matmul.ATTRIBUTES})
        def run_sq_matmul(x, codes, scales, zero_points, **attrs):
            return sq_matmul.reference(x, codes, scales, zero_points, **{k: int(v) for k, v in attrs.items()})

        @onnx_op(op_type=f"{DOMAIN}::{wkv7_step.OP_TYPE}", inputs=[T.dt_float] * len(wkv7_step.INPUTS),
                 outputs=[T.dt_float] * len(wkv7_step.OUTPUTS), attrs={"head_size": T.dt_int64, "layer": T.dt_int64})
        def run_wkv7_step(state, r, w, k, v, a, b, **attrs):
            # onnxruntime-extensions passes a declared attribute the node lacks as 0: a [B, H, N, N] state (rank
            # 4) has no layer to read
            layer = {"layer": int(attrs["layer"])} if "layer" in attrs and np.ndim(state) == 5 else {}
            return wkv7_step.reference(state, r, w, k, v, a, b, head_size=int(attrs["head_size"]), **layer)

        @onnx_op(op_type=f"{DOMAIN}::{wkv7_sequence.OP_TYPE}", inputs=[T.dt_float] * len(wkv7_sequence.INPUTS),
                 outputs=[T.dt_float] * len(wkv7_sequence.OUTPUTS), attrs={"head_size": T.dt_int64})
        def run_wkv7_sequence(state, r, w, k, v, a, b, **attrs):
            return wkv7_sequence.reference(state, r, w, k, v, a, b, head_size=int(attrs["head_size"]))

        _REGISTERED = True
    return get_library_path()
