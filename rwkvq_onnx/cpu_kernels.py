"""The compiled CPU kernels of `plugins/cpu_kernels.c`, through ctypes, with the numpy reference as fallback.

The same library is the onnxruntime custom-op library of the `rwkvq` ops
(`library_path`); `vq_matmul` here runs its kernels directly: a threaded
table-lookup GEMV for decode (few activation rows) and, for prefill, a
GEMM that decodes a small tile of weight rows at a time.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

from .opspec import vq_matmul as vq_matmul_spec

GEMV_MAX_ROWS = 4  # RWKVQ_GEMV_MAX_ROWS in plugins/rwkvq_cpu.h: above it the tiled GEMM runs


def library_path() -> Path | None:
    """The built kernel / custom-op library, or None when the package was installed without it."""
    from . import plugins

    found = sorted(Path(plugins.__file__).parent.glob("_cpu_kernels*.so"))
    return found[0] if found else None


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The kernel library loaded with ctypes, or None when the package was installed without it."""
    path = library_path()
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))
    p, i = ctypes.c_void_p, ctypes.c_int
    for fn in (lib.rwkvq_vq_gemv, lib.rwkvq_vq_gemm, lib.rwkvq_vq_matmul):
        fn.argtypes = [p, i, p, i, p, p, p, i, i, i, i, i, i]
        fn.restype = ctypes.c_int
    lib.rwkvq_vq_decode.argtypes = [p, i, p, p, p, i, i, i, i, i, i]
    lib.rwkvq_vq_decode.restype = ctypes.c_int
    lib.rwkvq_ort_version.restype = ctypes.c_char_p
    lib.rwkvq_ort_abi_ok.restype = ctypes.c_int
    lib.rwkvq_ort_thread_pool.restype = ctypes.c_int
    return lib


def available() -> bool:
    return library() is not None


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


def vq_decode(codes: np.ndarray, codebooks: np.ndarray, scales: np.ndarray, *, N: int, K: int, dim: int,
              group_rows: int, group_cols: int, index_bits: int) -> np.ndarray:
    attrs = dict(N=N, K=K, dim=dim, group_rows=group_rows, group_cols=group_cols, index_bits=index_bits)
    lib = library()
    if lib is None:
        return vq_matmul_spec.decode_weight(codes, codebooks, scales, **attrs)
    vq_matmul_spec.validate(attrs, codes, codebooks, scales, node="vq_decode")  # the C code trusts its sizes
    codes, books = np.ascontiguousarray(codes, np.uint8), np.ascontiguousarray(codebooks, np.int8)
    scales = np.ascontiguousarray(scales, np.float32)
    w = np.empty((N, K), np.float32)
    if lib.rwkvq_vq_decode(_ptr(codes), codes.shape[1], _ptr(books), _ptr(scales), _ptr(w), N, K, dim, group_rows,
                           group_cols, index_bits) != 0:
        raise MemoryError("rwkvq_vq_decode: out of memory")
    return w


def vq_matmul(x: np.ndarray, codes: np.ndarray, codebooks: np.ndarray, scales: np.ndarray, *, N: int, K: int,
              dim: int, group_rows: int, group_cols: int, index_bits: int, kernel: str = "auto") -> np.ndarray:
    """y = x @ W^T for a vector-quantized W (same result as `opspec.vq_matmul.reference`, float32).

    kernel: "auto" (GEMV up to GEMV_MAX_ROWS activation rows, else GEMM), "gemv" or "gemm" (for tests).
    """
    attrs = dict(N=N, K=K, dim=dim, group_rows=group_rows, group_cols=group_cols, index_bits=index_bits)
    lib = library()
    x = np.asarray(x, np.float32)
    lead = x.shape[:-1]
    x2 = np.ascontiguousarray(x.reshape(-1, K))
    if lib is None:
        return vq_matmul_spec.reference(x, codes, codebooks, scales, **attrs).astype(np.float32)
    vq_matmul_spec.validate(attrs, codes, codebooks, scales, node="vq_matmul")  # the C code trusts its sizes
    fn = {"auto": lib.rwkvq_vq_matmul, "gemv": lib.rwkvq_vq_gemv, "gemm": lib.rwkvq_vq_gemm}[kernel]
    codes, books = np.ascontiguousarray(codes, np.uint8), np.ascontiguousarray(codebooks, np.int8)
    scales = np.ascontiguousarray(scales, np.float32)
    y = np.empty((x2.shape[0], N), np.float32)
    if fn(_ptr(x2), x2.shape[0], _ptr(codes), codes.shape[1], _ptr(books), _ptr(scales), _ptr(y),
          N, K, dim, group_rows, group_cols, index_bits) != 0:
        raise MemoryError("rwkvq_vq_matmul: out of memory")
    return y.reshape(*lead, N)
