"""onnxruntime implementations of the `rwkvq` ops (onnxruntime-extensions Python custom ops).

`register()` defines them once per process; `session_options()` in
`runtime` calls it and loads the extensions library, so every session the
library opens runs quantized graphs exactly like fp ones.
"""
from __future__ import annotations

from . import cpu_kernels, ops

_REGISTERED = False


def register() -> str:
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
