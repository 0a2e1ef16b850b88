"""Quantized tensor payloads and their bit accounting.

What is computed is separate from how it is stored: a scalar payload can be
lowered to QDQ or MatMulNBits, a vector payload to an `rwkvq` op or to
standard ops, by passes that read these types, never a method's name.

bpw of a tensor = (bits of codes + bits of scales/zero-points + bits of
codebooks) / number of weights, as `bits_breakdown()` counts them: the bits a
payload holds (see the config docstrings in configs.py for what a scale, a
zero point and a codebook cost).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ScalarQuantized:
    """Per-group affine codes along the input dimension: W[n, k] = (codes - zeros) * scales.

    codes [N, K] ints in [0, 2**bits); scales/zeros [N, ceil(K / group_size)].
    Symmetric payloads have the fixed zero point 2**(bits-1), which is not stored.
    Scales are float16 values (the dequantized weight uses exactly them).
    """

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    bits: int
    group_size: int
    symmetric: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> np.ndarray:
        g = self.group_size
        s = np.repeat(self.scales.astype(np.float32), g, axis=1)[:, : self.shape[1]]
        z = np.repeat(self.zeros.astype(np.float32), g, axis=1)[:, : self.shape[1]]
        return ((self.codes.astype(np.float32) - z) * s).astype(np.float32)

    def bits_breakdown(self) -> dict[str, int]:
        n_groups = self.scales.size
        return {"codes": self.codes.size * self.bits, "scales": n_groups * 16,
                "zeros": 0 if self.symmetric else n_groups * self.bits, "codebooks": 0}



@dataclass(frozen=True)
class VectorQuantized:
    """Groups of `dim` consecutive input-dimension weights replaced by codebook entries.

    codes [N, K // dim]: index into the codebook of the weight's block, where
    block (i, j) covers rows [i*group_rows, ...) and columns [j*group_cols, ...).
    codebooks int8 [row_blocks, col_blocks, entries, dim] with one float16
    scale per codebook (codebook_bits-bit entries, symmetric).
    """

    codes: np.ndarray
    codebooks: np.ndarray
    codebook_scales: np.ndarray
    shape: tuple[int, int]
    dim: int
    group_rows: int
    group_cols: int
    index_bits: int
    codebook_bits: int

    def decoded_codebooks(self) -> np.ndarray:
        return self.codebooks.astype(np.float32) * self.codebook_scales.astype(np.float32)[..., None, None]

    def dequantize(self) -> np.ndarray:
        n, k = self.shape
        cb = self.decoded_codebooks()
        rows = np.arange(n)[:, None] // self.group_rows
        cols = (np.arange(k // self.dim) * self.dim)[None, :] // self.group_cols
        vecs = cb[rows, cols, self.codes]  # [N, K/dim, dim]
        return vecs.reshape(n, k).astype(np.float32)

    def bits_breakdown(self) -> dict[str, int]:
        return {"codes": self.codes.size * self.index_bits, "scales": self.codebook_scales.size * 16,
                "zeros": 0, "codebooks": self.codebooks.size * self.codebook_bits}



@dataclass(frozen=True)
class ElementwiseQuantized:
    """A vector (token-shift mix, k_k, ...) as indices into one small float16 codebook."""

    codes: np.ndarray
    codebook: np.ndarray
    shape: tuple[int, ...]
    index_bits: int

    def dequantize(self) -> np.ndarray:
        return self.codebook.astype(np.float32)[self.codes].reshape(self.shape)

    def bits_breakdown(self) -> dict[str, int]:
        return {"codes": self.codes.size * self.index_bits, "scales": 0, "zeros": 0,
                "codebooks": self.codebook.size * 16}



Quantized = ScalarQuantized | VectorQuantized | ElementwiseQuantized


def numel(q: Quantized) -> int:
    return int(np.prod(q.shape))


def total_bits(q: Quantized) -> int:
    """Algorithmic bits of a payload (the bpw definition's numerator)."""
    return sum(q.bits_breakdown().values())


def bpw(q: Quantized) -> float:
    return total_bits(q) / numel(q)


def model_bpw(payloads: dict[str, Quantized]) -> float:
    """Weight-count-weighted mean bpw over quantized tensors."""
    n = sum(numel(q) for q in payloads.values())
    return sum(total_bits(q) for q in payloads.values()) / n if n else 0.0


@dataclass(frozen=True)
class Payloads:
    """What applying a quantization plan produces and what graph passes lower: the contract between
    `rwkvq_onnx.quant` (policy and algorithms) and `rwkvq_onnx.passes` (graph lowering).

    linear: weight name (checkpoint key) -> scalar or vector payload, [N out, K in] layout;
    input_scales: weight name -> AWQ per-input-channel scales (the MatMul input is divided by them);
    elementwise: vector name -> element-wise codebook payload.
    """

    linear: dict[str, "ScalarQuantized | VectorQuantized"] = field(default_factory=dict)
    input_scales: dict[str, np.ndarray] = field(default_factory=dict)
    elementwise: dict[str, "ElementwiseQuantized"] = field(default_factory=dict)
