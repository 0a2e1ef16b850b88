"""onnxruntime implementations of the `rwkvq` ops.

`register()` returns the custom-op library every session the package opens
loads (`session_options()` in `runtime`), so quantized graphs run exactly
like fp ones: the package's native library (`plugins/ort_ops.c`, built by
the install) when present, else onnxruntime-extensions with the ops defined
as Python functions (correct, but each call costs a Python round trip).
"""
from __future__ import annotations

from . import cpu_kernels, ops

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
        @onnx_op(op_type=f"{ops.DOMAIN}::VQMatMul", inputs=[T.dt_float, T.dt_uint8, T.dt_int8, T.dt_float],
                 outputs=[T.dt_float], attrs={"N": T.dt_int64, "K": T.dt_int64, "dim": T.dt_int64,
                                              "group_rows": T.dt_int64, "group_cols": T.dt_int64,
                                              "index_bits": T.dt_int64})
        def vq_matmul(x, codes, codebooks, scales, **attrs):
            return cpu_kernels.vq_matmul(x, codes, codebooks, scales, **{k: int(v) for k, v in attrs.items()})

        @onnx_op(op_type=f"{ops.DOMAIN}::VQElementwise", inputs=[T.dt_float, T.dt_uint8, T.dt_float],
                 outputs=[T.dt_float], attrs={"index_bits": T.dt_int64, "shape": T.dt_string})
        def vq_elementwise(x, codes, codebook, **attrs):
            shape = [int(s) for s in str(attrs["shape"]).split(",")]
            return ops.vq_elementwise(x, codes, codebook, index_bits=int(attrs["index_bits"]), shape=shape)

        _REGISTERED = True
    return get_library_path()
