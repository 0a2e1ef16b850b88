"""`rwkvq.SQMatMul(x, codes, scales, zero_points) -> y`: y = x @ W^T with W [N, K] packed 2/3/4-bit scalar codes.

    x            float32 [..., K]                 K a multiple of 32
    codes        uint8   [N, K/32 * 4 * bits]     each block of 32 weights c_0..c_31 of a row in 4 * bits bytes
                                                  (`pack_codes`):
                                                    bits 2: byte j = c_j | c_{j+8} << 2 | c_{j+16} << 4 | c_{j+24} << 6
                                                    bits 3: those 8 bytes of the low 2 bits, then a 4-byte bit plane:
                                                            bit i (little-endian) is bit 2 of c_i
                                                    bits 4: byte j = c_j | c_{j+16} << 4 (16 bytes)
    scales       float16 [N, G]                   G = ceil(K / group_size)
    zero_points  uint8   [N, ceil(G * bits / 8)]  the G zero points of a row, `bits` bits each (`bitpack` stream)
    y            float32 [..., N]

W[n, k] = (code[n, k] - zero[n, k // group_size]) * scale[n, k // group_size].
Attributes (all INT): K, N, bits (2, 3 or 4), group_size (a multiple of 32).

Fast numerics (session config rwkvq.kernels=fast; plugins/rwkvq_sq.h): each row of x is quantized to int8 per
activation block of A = gcd(group_size, 128) values (`act_block`: a multiple of 32 that divides the weight group, so a
block never straddles two groups; 128 for the default group 128; the last block of a row may be shorter):
d = max|x_block| / 127, q = x / d rounded to nearest even (`quantize_activations`). The kernels then compute
(d * q) @ W^T with integer block sums (`fast_reference`), so they differ from `reference` by at most
`fast_error_bound` plus float rounding.

Why this layout (plugins/sq_simd.inc): the 2-bit "crumbs" of a block are one 64-bit word; broadcast to four lanes and
shifted right by 0, 2, 4, 6 bits, byte i of the result holds weight i in its low two bits (nibbles: two lanes, shifts 0
and 4), so the AVX2 unpack of a 3-bit block is 3 operations plus 6 for the bit plane, where `bits` bit planes took 18
(measured: the 3-bit GEMV ~1.6x faster; see tools/bench_sq_kernels.py). The bytes stored are exactly bits/8 per
weight. `validate` states what the kernels (plugins/sq_kernels.c, ort_ops.c) assume.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from rwkvq_onnx.names import DOMAIN, OPSET_VERSION  # noqa: F401  (part of the spec: <op>.OPSET_VERSION)

from .bitpack import pack_bits, packed_bytes, unpack_bits
from .checks import INT32_LIMIT, expect_dtype, expect_shape, fail, int_attr

if TYPE_CHECKING:  # the runtime needs the spec without the quantizers (torch) or graphsurgeon
    import onnx_graphsurgeon as gs

    from rwkvq_onnx.quant.formats import ScalarQuantized

OP_TYPE = "SQMatMul"
QUALIFIED = f"{DOMAIN}.{OP_TYPE}"
ATTRIBUTES = ("K", "N", "bits", "group_size")  # all INT (int64 in ONNX)
INPUTS = ("x", "codes", "scales", "zero_points")
INPUT_DTYPES = (np.dtype(np.float32), np.dtype(np.uint8), np.dtype(np.float16), np.dtype(np.uint8))
OUTPUT_DTYPE = np.dtype(np.float32)
BLOCK = 32  # weights per bit-plane block (and the unit of the fast kernels' int8 activation blocks)
ACT_BLOCK_MAX = 128  # the fast kernels' activation blocks: gcd(group_size, ACT_BLOCK_MAX) values
BITS = (2, 3, 4)


@dataclass(frozen=True)
class Attributes:
    """A checked attribute set (build it with `validate`), with the sizes that follow from it."""

    K: int
    N: int
    bits: int
    group_size: int

    @property
    def groups(self) -> int:
        """G: groups per row."""
        return -(-self.K // self.group_size)

    @property
    def codes_shape(self) -> tuple[int, int]:
        return (self.N, self.K // BLOCK * 4 * self.bits)

    @property
    def scales_shape(self) -> tuple[int, int]:
        return (self.N, self.groups)

    @property
    def zero_points_shape(self) -> tuple[int, int]:
        return (self.N, packed_bytes(self.groups, self.bits))

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def validate(attrs: Mapping[str, Any], codes: Any = None, scales: Any = None, zero_points: Any = None, *,
             node: str) -> Attributes:
    """Check every attribute and every given input (anything with .shape and .dtype) against each other: the checks
    rwkvq_sq_check_layout / _payload in plugins/sq_kernels.c perform. Returns the checked Attributes; raises a
    one-line ConfigError naming `node` for the first problem."""
    unknown = sorted(set(attrs) - set(ATTRIBUTES))
    if unknown:
        raise fail(node, QUALIFIED, f"unknown attribute(s) {', '.join(unknown)}")
    n = int_attr(attrs, "N", 1, INT32_LIMIT, node=node, op=QUALIFIED)
    k = int_attr(attrs, "K", 1, INT32_LIMIT, node=node, op=QUALIFIED)
    bits = int_attr(attrs, "bits", 2, 5, node=node, op=QUALIFIED)
    group_size = int_attr(attrs, "group_size", BLOCK, INT32_LIMIT, node=node, op=QUALIFIED)
    if group_size % BLOCK:
        raise fail(node, QUALIFIED, f"group_size={group_size} is not a multiple of {BLOCK}")
    if k % BLOCK:
        raise fail(node, QUALIFIED, f"K={k} is not a multiple of {BLOCK}")
    a = Attributes(k, n, bits, group_size)
    for value, dtype, shape, what in ((codes, INPUT_DTYPES[1], a.codes_shape, "codes"),
                                      (scales, INPUT_DTYPES[2], a.scales_shape, "scales"),
                                      (zero_points, INPUT_DTYPES[3], a.zero_points_shape, "zero_points")):
        if value is not None:
            expect_dtype(value, dtype, what, node=node, op=QUALIFIED)
            expect_shape(value, shape, what, node=node, op=QUALIFIED)
    return a


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes [N, K] ints in [0, 2**bits), K a multiple of 32 -> uint8 [N, K/32 * 4 * bits] in the op's block layout."""
    c = np.asarray(codes)
    n, k = c.shape
    if k % BLOCK:
        raise ValueError(f"K={k} is not a multiple of {BLOCK}")
    if bits not in BITS:
        raise ValueError(f"bits={bits} is not 2, 3 or 4")
    if c.size and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes in [{int(c.min())}, {int(c.max())}] do not fit in {bits} unsigned bits")
    blocks = c.reshape(n, k // BLOCK, BLOCK).astype(np.uint8)
    if bits == 4:  # byte j: c_j | c_{j+16} << 4
        return (blocks[..., :16] | (blocks[..., 16:] << 4)).reshape(n, -1)
    quarters = (blocks & 3).reshape(n, k // BLOCK, 4, 8)  # [.., q, j] = low bits of c_{j + 8q}
    crumbs = quarters[..., 0, :] | (quarters[..., 1, :] << 2) | (quarters[..., 2, :] << 4) | (quarters[..., 3, :] << 6)
    if bits == 2:
        return crumbs.reshape(n, -1)
    plane = np.packbits((blocks >> 2) & 1, axis=-1, bitorder="little")  # [N, K/32, 4]
    return np.concatenate([crumbs, plane], axis=-1).reshape(n, -1)


def unpack_codes(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of `pack_codes`: uint8 [N, K/32 * 4 * bits] -> int64 [N, K]."""
    p = np.asarray(packed, np.uint8)
    n = p.shape[0]
    blocks = p.reshape(n, k // BLOCK, 4 * bits).astype(np.int64)
    if bits == 4:
        return np.concatenate([blocks & 15, blocks >> 4], axis=-1).reshape(n, k)
    crumbs = blocks[..., :8]
    codes = np.concatenate([(crumbs >> (2 * q)) & 3 for q in range(4)], axis=-1)  # [.., 8q + j]
    if bits == 3:
        codes |= np.unpackbits(p.reshape(n, k // BLOCK, 12)[..., 8:], axis=-1, bitorder="little").astype(np.int64) << 2
    return codes.reshape(n, k)


def pack(q: ScalarQuantized) -> tuple[dict[str, np.ndarray], Attributes]:
    """The op's constant inputs (codes, scales, zero_points) and attributes for a scalar payload. Symmetric
    payloads store their fixed zero point 2**(bits-1) explicitly (the kernels have one formula)."""
    n, k = q.shape
    name = f"payload [{n}, {k}]"
    if q.bits not in BITS:
        raise fail(name, QUALIFIED, f"bits={q.bits} is not 2, 3 or 4")
    zeros = np.broadcast_to(np.asarray(q.zeros), q.scales.shape)
    arrays = {"codes": pack_codes(q.codes, q.bits),
              "scales": np.ascontiguousarray(q.scales, dtype=np.float16),
              "zero_points": pack_bits(zeros.astype(np.int64), q.bits)}
    attrs = validate(dict(K=k, N=n, bits=q.bits, group_size=q.group_size), **arrays, node=name)
    return arrays, attrs


def unsupported(q: ScalarQuantized) -> str | None:
    """Why a scalar payload cannot become an SQMatMul (None when it can): the reason a rewrite records."""
    k = q.shape[1]
    if q.bits not in BITS:
        return f"{q.bits}-bit codes (SQMatMul takes 2, 3 or 4)"
    if k % BLOCK:
        return f"K={k} is not a multiple of {BLOCK}"
    if q.group_size % BLOCK:
        return f"group size {q.group_size} is not a multiple of {BLOCK}"
    return None


def stored_bits(codes: Any, scales: Any, zero_points: Any) -> int:
    """Bits the op's three constant inputs occupy (what a model file holds for the weight)."""
    return 8 * sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in (codes, scales, zero_points))


def zero_point_values(a: Attributes, zero_points: np.ndarray) -> np.ndarray:
    """int64 [N, G]: the unpacked zero points."""
    return unpack_bits(zero_points, a.bits, a.groups)


def decode_weight(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, **attrs: int) -> np.ndarray:
    """W [N, K] float32 from the op's constant inputs: (code - zero) * scale in float32."""
    a = validate(attrs, codes, scales, zero_points, node="reference")
    c = unpack_codes(codes, a.bits, a.K)
    g = np.arange(a.K) // a.group_size
    z = zero_point_values(a, zero_points)[:, g]
    s = np.asarray(scales).astype(np.float32)[:, g]
    return ((c - z).astype(np.float32) * s).astype(np.float32)


def reference(x: np.ndarray, codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray,
              **attrs: int) -> np.ndarray:
    """The numpy reference of the op (float64 accumulation), float32 output."""
    w = decode_weight(codes, scales, zero_points, **attrs)
    return (np.asarray(x, np.float64) @ w.T.astype(np.float64)).astype(np.float32)


def lower(node: gs.Node, prefix: str) -> list[gs.Node]:
    """Standard ONNX nodes computing what `node` computes (they take over its output), tensors named `prefix`_*:

        MatMul(x, DequantizeLinear(codes uint4 [K, N], scale float32 [G, N], zero uint4 [G, N], axis=0,
                                   block_size=group_size))

    the QDQ form of `--sq-format qdq` (its constants come from the same helper), so plain onnxruntime runs it;
    symmetric payloads (every zero point 2^(bits-1)) as signed int4 without a zero point, as qdq writes them.
    Scales are widened to float32 (exactly) because the op's x and y are float32.
    """
    import onnx_graphsurgeon as gs

    from rwkvq_onnx.passes.rewrite_scalar import qdq_constants
    from rwkvq_onnx.quant.formats import ScalarQuantized

    if not all(isinstance(t, gs.Constant) for t in node.inputs[1:]):
        raise fail(node.name, QUALIFIED, "lowering needs constant codes, scales and zero points")
    x, codes, scales, zero_points = node.inputs
    a = validate(node.attrs, codes, scales, zero_points, node=node.name)
    zeros = zero_point_values(a, zero_points.values)
    # a payload whose zero points are all the symmetric one lowers as symmetric: signed int4 without a zero
    # point, the form TensorRT dequantizes (it takes zero point 0 only)
    symmetric = bool(np.all(zeros == 1 << (a.bits - 1)))
    q = ScalarQuantized(unpack_codes(codes.values, a.bits, a.K), np.asarray(scales.values, np.float16),
                        zeros, a.bits, a.group_size, symmetric=symmetric)
    weight = gs.Variable(prefix + "_dq", dtype=np.float32)
    return [gs.Node("DequantizeLinear", prefix + "_dequantize", {"axis": 0, "block_size": a.group_size},
                    qdq_constants(q, prefix, np.float32), [weight]),
            gs.Node("MatMul", node.name or prefix, {}, [x, weight], list(node.outputs))]


def act_block(group_size: int) -> int:
    """A: values per int8 activation block of the fast kernels, gcd(group_size, 128) (a multiple of 32 dividing the
    group: every block's weights share one scale and zero point, so its integer dot product needs no float step)."""
    return math.gcd(int(group_size), ACT_BLOCK_MAX)


def quantize_activations(x: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The fast kernels' activations (rwkvq_sq_quantize, the same bytes): x [M, K] float32 -> q int8 [M, K] and the
    block scales d float32 [M, ceil(K / A)]: d = max|x_block| / 127 (NaN when the block holds a NaN), q = x / d rounded
    to nearest even in float32 (0 where x is inf or NaN, or d is 0)."""
    x = np.asarray(x, np.float32)
    m, k = x.shape
    a = act_block(group_size)
    q = np.zeros((m, k), np.int8)
    d = np.zeros((m, -(-k // a)), np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        for b in range(d.shape[1]):
            xb = x[:, b * a:(b + 1) * a]
            amax = np.where(np.isnan(xb), np.float32(0), np.abs(xb)).max(axis=1)
            db = (amax / np.float32(127)).astype(np.float32)
            v = np.rint(xb / db[:, None]).astype(np.float32)
            ok = (db[:, None] > 0) & (v >= -127) & (v <= 127)
            q[:, b * a:(b + 1) * a] = np.where(ok, v, 0).astype(np.int8)
            d[:, b] = np.where(np.isnan(xb).any(axis=1), np.float32(np.nan), db)
    return q, d


def dequantized_activations(x: np.ndarray, group_size: int) -> np.ndarray:
    """float64 [M, K]: d * q, the activations the fast kernels multiply W with."""
    q, d = quantize_activations(x, group_size)
    return q.astype(np.float64) * np.repeat(d.astype(np.float64), act_block(group_size), axis=1)[:, :q.shape[1]]


def fast_reference(x: np.ndarray, codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray,
                   **attrs: int) -> np.ndarray:
    """The fast numerics in float64: (d * q) @ W^T, float32 output. The kernels compute the same integer block sums;
    they differ from this only by float32 rounding of the block and group partial sums (and the zero-point term
    sum_g s z T, T the group sums of d * q, subtracted at the end)."""
    a = validate(attrs, codes, scales, zero_points, node="fast reference")
    w = decode_weight(codes, scales, zero_points, **attrs).astype(np.float64)
    x = np.asarray(x, np.float32)
    xq = dequantized_activations(x.reshape(-1, a.K), a.group_size)
    return (xq @ w.T).astype(np.float32).reshape(*x.shape[:-1], a.N)


def fast_error_bound(x: np.ndarray, w: np.ndarray, group_size: int) -> np.ndarray:
    """[M, N] float64: how far the fast numerics may move y = x @ w^T (x [M, K], w [N, K]) from the exact value.
    Round to nearest moves each activation by at most half its block's step, |x - d q| <= d / 2 with
    d = max|x_block| / 127, so |y_fast - y| <= sum over activation blocks b of d_b / 2 * sum_{k in b} |w[n, k]|."""
    x = np.asarray(x, np.float64)
    m, k = x.shape
    a = act_block(group_size)
    nb = -(-k // a)
    pad = nb * a - k
    xa = np.pad(np.abs(x), ((0, 0), (0, pad))).reshape(m, nb, a)
    wa = np.pad(np.abs(np.asarray(w, np.float64)), ((0, 0), (0, pad))).reshape(len(w), nb, a)
    return (xa.max(axis=2) / 127.0 / 2) @ wa.sum(axis=2).T
