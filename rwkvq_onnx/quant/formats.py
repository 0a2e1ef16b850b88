"""Quantized tensor payloads, their bit accounting and their serialised (numpy) form.

What is computed is separate from how it is stored: a scalar payload can be
lowered to QDQ or MatMulNBits, a vector payload to an `rwkvq` op or to
standard ops, by passes that read these types, never a method's name.

bpw of a tensor = (bits of codes + bits of scales/zero-points + bits of
codebooks) / number of weights; `to_arrays()` stores exactly those bits
(codes bit-packed), so `payload_bits()` and `bits()` agree up to the padding
of each packed array to whole bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers < 2**bits into a little-endian bit stream of bytes."""
    v = np.asarray(values, dtype=np.uint64).reshape(-1)
    if v.size and int(v.max()) >= 1 << bits:
        raise ValueError(f"value {int(v.max())} does not fit in {bits} bits")
    planes = ((v[:, None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: the first `count` values."""
    planes = np.unpackbits(np.asarray(packed, np.uint8), bitorder="little")[: count * bits].reshape(count, bits)
    return (planes.astype(np.int64) << np.arange(bits)).sum(axis=1)


def _meta(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


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

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {
            "meta": _meta(0, *self.shape, self.bits, self.group_size, int(self.symmetric)),
            "codes": pack_bits(self.codes, self.bits),
            "scales": self.scales.astype(np.float16),
        }
        if not self.symmetric:
            arrays["zeros"] = pack_bits(self.zeros, self.bits)
        return arrays

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> "ScalarQuantized":
        _, n, k, bits, g, sym = (int(x) for x in a["meta"])
        scales = a["scales"].astype(np.float16)
        zeros = (np.full(scales.shape, 1 << (bits - 1), np.int64) if sym
                 else unpack_bits(a["zeros"], bits, scales.size).reshape(scales.shape))
        return cls(unpack_bits(a["codes"], bits, n * k).reshape(n, k), scales, zeros, bits, g, bool(sym))


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

    def to_arrays(self) -> dict[str, np.ndarray]:
        rb, cb_, e, d = self.codebooks.shape
        return {
            "meta": _meta(1, *self.shape, self.dim, self.group_rows, self.group_cols, self.index_bits,
                          self.codebook_bits, rb, cb_, e),
            "codes": pack_bits(self.codes, self.index_bits),
            "codebooks": pack_bits(self.codebooks.astype(np.int64) + (1 << (self.codebook_bits - 1)),
                                   self.codebook_bits),
            "codebook_scales": self.codebook_scales.astype(np.float16),
        }

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> "VectorQuantized":
        _, n, k, d, gr, gc, ib, cbits, rb, cbn, e = (int(x) for x in a["meta"])
        cb = unpack_bits(a["codebooks"], cbits, rb * cbn * e * d) - (1 << (cbits - 1))
        return cls(unpack_bits(a["codes"], ib, n * k // d).reshape(n, k // d),
                   cb.reshape(rb, cbn, e, d).astype(np.int8 if cbits <= 8 else np.int16),
                   a["codebook_scales"].astype(np.float16),
                   (n, k), d, gr, gc, ib, cbits)


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

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"meta": _meta(2, self.index_bits, len(self.shape), *self.shape),
                "codes": pack_bits(self.codes, self.index_bits),
                "codebook": self.codebook.astype(np.float16)}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> "ElementwiseQuantized":
        meta = [int(x) for x in a["meta"]]
        bits, shape = meta[1], tuple(meta[3:3 + meta[2]])
        return cls(unpack_bits(a["codes"], bits, int(np.prod(shape))), a["codebook"].astype(np.float16), shape, bits)


Quantized = ScalarQuantized | VectorQuantized | ElementwiseQuantized
_KINDS = {0: ScalarQuantized, 1: VectorQuantized, 2: ElementwiseQuantized}


def from_arrays(arrays: dict[str, np.ndarray]) -> Quantized:
    """Rebuild any payload from its `to_arrays()` form."""
    return _KINDS[int(arrays["meta"][0])].from_arrays(arrays)


def numel(q: Quantized) -> int:
    return int(np.prod(q.shape))


def total_bits(q: Quantized) -> int:
    """Algorithmic bits of a payload (the bpw definition's numerator)."""
    return sum(q.bits_breakdown().values())


def bpw(q: Quantized) -> float:
    return total_bits(q) / numel(q)


def payload_bits(q: Quantized) -> int:
    """Bits actually stored by `to_arrays()` (metadata excluded)."""
    return sum(a.nbytes * 8 for name, a in q.to_arrays().items() if name != "meta")


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
