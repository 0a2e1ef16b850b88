"""The project's one bit-packer: unsigned integers as little-endian bit streams of bytes.

Value j of a row occupies bits [j*bits, (j+1)*bits) of the row's stream, bit 0
of a byte first. Every packed format in the project is this stream:
`rwkvq.VQMatMul` codes (one stream per weight row), `rwkvq.VQElementwise`
codes (one stream), ONNX INT4/UINT4 raw data and MatMulNBits blocks (bits=4:
the low nibble holds the even element), what the C and CUDA kernels read.
"""
from __future__ import annotations

import numpy as np

MAX_BITS = 32


def packed_bytes(count: int, bits: int) -> int:
    """Bytes that `count` values of `bits` bits take: ceil(count * bits / 8), in Python ints (no overflow)."""
    return -(-int(count) * int(bits) // 8)


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not 1 <= int(bits) <= MAX_BITS:
        raise ValueError(f"bit width must be in [1, {MAX_BITS}], got {bits}")
    return int(bits)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """values [..., M] ints in [0, 2**bits) -> uint8 [..., ceil(M*bits/8)], each last-axis row its own stream.

    Raises ValueError for a value that is negative or does not fit in `bits`.
    """
    bits = _check_bits(bits)
    v = np.asarray(values)
    if v.size and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"values in [{int(v.min())}, {int(v.max())}] do not fit in {bits} unsigned bits")
    v = v.astype(np.uint64)
    planes = ((v[..., None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(*v.shape[:-1], v.shape[-1] * bits), axis=-1, bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: uint8 [..., B] -> int64 [..., count] (the first `count` values of each row).

    Raises ValueError when a row holds fewer than count * bits bits.
    """
    bits = _check_bits(bits)
    packed = np.asarray(packed, np.uint8)
    if packed.shape[-1] < packed_bytes(count, bits):
        raise ValueError(f"{packed.shape[-1]} bytes per row hold fewer than {count} values of {bits} bits")
    planes = np.unpackbits(packed, axis=-1, bitorder="little")[..., : count * bits]
    planes = planes.reshape(*packed.shape[:-1], count, bits).astype(np.int64)
    return (planes << np.arange(bits, dtype=np.int64)).sum(axis=-1)
