"""The compiled CPU kernels of `plugins/cpu_kernels.c`, through ctypes, with the numpy reference as fallback.

`vq_matmul` is what the onnxruntime `rwkvq.VQMatMul` op runs: a threaded,
AVX2 table-lookup GEMV for decode (few activation rows) and, for prefill,
one decode of the weight followed by a BLAS GEMM.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

from . import ops

GEMV_MAX_ROWS = 8  # above this many activation rows, decode W once and use BLAS


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The built kernel library, or None when the package was installed without it."""
    from . import plugins

    for path in sorted(Path(plugins.__file__).parent.glob("_cpu_kernels*.so")):
        lib = ctypes.CDLL(str(path))
        p, i = ctypes.c_void_p, ctypes.c_int
        lib.rwkvq_vq_gemv.argtypes = [p, i, p, i, p, p, p, i, i, i, i, i, i]
        lib.rwkvq_vq_decode.argtypes = [p, i, p, p, p, i, i, i, i, i, i]
        lib.rwkvq_vq_gemv.restype = lib.rwkvq_vq_decode.restype = ctypes.c_int
        return lib
    return None


def available() -> bool:
    return library() is not None


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


def vq_decode(codes: np.ndarray, codebooks: np.ndarray, scales: np.ndarray, *, N: int, K: int, dim: int,
              group_rows: int, group_cols: int, index_bits: int) -> np.ndarray:
    lib = library()
    if lib is None:
        return ops.vq_weight(codes, codebooks, scales, N=N, K=K, dim=dim, group_rows=group_rows,
                             group_cols=group_cols, index_bits=index_bits)
    codes, books = np.ascontiguousarray(codes, np.uint8), np.ascontiguousarray(codebooks, np.int8)
    scales = np.ascontiguousarray(scales, np.float32)
    w = np.empty((N, K), np.float32)
    if lib.rwkvq_vq_decode(_ptr(codes), codes.shape[1], _ptr(books), _ptr(scales), _ptr(w), N, K, dim, group_rows,
                           group_cols, index_bits) != 0:
        raise MemoryError("rwkvq_vq_decode: out of memory")
    return w


def vq_matmul(x: np.ndarray, codes: np.ndarray, codebooks: np.ndarray, scales: np.ndarray, *, N: int, K: int,
              dim: int, group_rows: int, group_cols: int, index_bits: int) -> np.ndarray:
    """y = x @ W^T for a vector-quantized W (same result as `ops.vq_matmul`, float32)."""
    attrs = dict(N=N, K=K, dim=dim, group_rows=group_rows, group_cols=group_cols, index_bits=index_bits)
    lib = library()
    x = np.asarray(x, np.float32)
    lead = x.shape[:-1]
    x2 = np.ascontiguousarray(x.reshape(-1, K))
    if lib is None or x2.shape[0] > GEMV_MAX_ROWS:
        y = x2 @ vq_decode(codes, codebooks, scales, **attrs).T
        return y.reshape(*lead, N)
    codes, books = np.ascontiguousarray(codes, np.uint8), np.ascontiguousarray(codebooks, np.int8)
    scales = np.ascontiguousarray(scales, np.float32)
    y = np.empty((x2.shape[0], N), np.float32)
    if lib.rwkvq_vq_gemv(_ptr(x2), x2.shape[0], _ptr(codes), codes.shape[1], _ptr(books), _ptr(scales), _ptr(y),
                         N, K, dim, group_rows, group_cols, index_bits) != 0:
        raise MemoryError("rwkvq_vq_gemv: out of memory")
    return y.reshape(*lead, N)
