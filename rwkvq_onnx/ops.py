"""The `rwkvq` custom ops: their ONNX form and numpy reference implementations.

`rwkvq.VQMatMul(x, codes, codebooks, scales) -> y`
    y = x @ W^T where W [N, K] is decoded from a vector-quantized payload:
    codes uint8 [N, ceil(K/dim * index_bits / 8)] (each row a little-endian
    bit stream of K/dim indices), codebooks int8 [R, C, E, dim], scales
    float32 [R, C]; row n, columns [j*dim, (j+1)*dim) take entry
    codes[n, j] of codebook (n // group_rows, j*dim // group_cols).
    Attributes: N, K, dim, group_rows, group_cols, index_bits.

`rwkvq.VQElementwise(x, codes, codebook) -> x * v`
    v (shape `shape`) = codebook[codes], codes bit-packed with index_bits.
    Attributes: index_bits, shape.

The numpy functions here are the reference every implementation (the
onnxruntime custom ops, the standard-ONNX lowering, the CUDA kernels) is
tested against.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the runtime needs these ops without the quantizers (and torch) behind rwkvq_onnx.quant
    from .quant.formats import ElementwiseQuantized, VectorQuantized

DOMAIN = "rwkvq"
OPSET_VERSION = 1


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes [N, M] ints < 2**bits -> uint8 [N, ceil(M*bits/8)], each row its own little-endian bit stream."""
    codes = np.asarray(codes, dtype=np.uint32)
    n, m = codes.shape
    planes = ((codes[:, :, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8).reshape(n, m * bits)
    return np.packbits(planes, axis=1, bitorder="little")


def unpack_rows(packed: np.ndarray, bits: int, m: int) -> np.ndarray:
    """Inverse of `pack_rows`: int64 [N, m]."""
    planes = np.unpackbits(np.asarray(packed, np.uint8), axis=1, bitorder="little")[:, : m * bits]
    planes = planes.reshape(packed.shape[0], m, bits).astype(np.int64)
    return (planes << np.arange(bits)).sum(axis=2)


def vq_weight(codes: np.ndarray, codebooks: np.ndarray, scales: np.ndarray, *, N: int, K: int, dim: int,
              group_rows: int, group_cols: int, index_bits: int) -> np.ndarray:
    """Decode W [N, K] (float32) from the op's inputs."""
    idx = unpack_rows(codes, index_bits, K // dim)
    books = codebooks.astype(np.float32) * np.asarray(scales, np.float32)[..., None, None]
    rows = np.arange(N)[:, None] // group_rows
    cols = (np.arange(K // dim) * dim)[None, :] // group_cols
    return books[rows, cols, idx].reshape(N, K)


def vq_matmul(x: np.ndarray, codes: np.ndarray, codebooks: np.ndarray, scales: np.ndarray, **attrs) -> np.ndarray:
    """Reference `rwkvq.VQMatMul`."""
    w = vq_weight(codes, codebooks, scales, **attrs)
    return (np.asarray(x, np.float32) @ w.T).astype(np.asarray(x).dtype)


def vq_elementwise(x: np.ndarray, codes: np.ndarray, codebook: np.ndarray, *, index_bits: int,
                   shape) -> np.ndarray:
    """Reference `rwkvq.VQElementwise`."""
    n = int(np.prod(shape))
    v = np.asarray(codebook, np.float32)[unpack_rows(codes.reshape(1, -1), index_bits, n)[0]].reshape(shape)
    return (np.asarray(x, np.float32) * v).astype(np.asarray(x).dtype)


def vq_matmul_inputs(q: VectorQuantized) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Op inputs (codes, codebooks, scales) and attributes for a vector payload."""
    n, k = q.shape
    arrays = {
        "codes": pack_rows(q.codes, q.index_bits),
        "codebooks": q.codebooks.astype(np.int8),
        "scales": q.codebook_scales.astype(np.float32),
    }
    attrs = dict(N=n, K=k, dim=q.dim, group_rows=q.group_rows, group_cols=q.group_cols, index_bits=q.index_bits)
    return arrays, attrs


def vq_elementwise_inputs(q: ElementwiseQuantized) -> tuple[dict[str, np.ndarray], dict]:
    arrays = {"codes": pack_rows(q.codes.reshape(1, -1), q.index_bits)[0],
              "codebook": q.codebook.astype(np.float32)}
    return arrays, dict(index_bits=q.index_bits, shape=list(q.shape))
