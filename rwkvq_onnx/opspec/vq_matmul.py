"""`rwkvq.VQMatMul(x, codes, codebooks, scales) -> y`: y = x @ W^T with W [N, K] vector-quantized.

    x          float32 [..., K]
    codes      uint8   [N, ceil(K/dim * index_bits / 8)]  each row a little-endian bit stream (`bitpack`)
                                                          of K/dim indices
    codebooks  int8    [R, C, E, dim]   R = ceil(N/group_rows), C = ceil(K/group_cols), E = 2**index_bits
    scales     float32 [R, C]           one scale per codebook
    y          float32 [..., N]

Row n, columns [j*dim, (j+1)*dim) of W are codebooks[n // group_rows,
j*dim // group_cols, code(n, j)] * scales[same block].
Attributes (all INT): N, K, dim, group_rows, group_cols, index_bits.

`validate` states what the kernels (plugins/cpu_kernels.c, ort_ops.c,
rwkvq_kernels.cu) assume; everything else here follows from it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from rwkvq_onnx.names import DOMAIN, OPSET_VERSION  # noqa: F401  (part of the spec: <op>.OPSET_VERSION)

from .bitpack import pack_bits, packed_bytes, unpack_bits
from .checks import INT32_LIMIT, expect_dtype, expect_shape, fail, int_attr

if TYPE_CHECKING:  # the runtime needs the spec without the quantizers (torch) or graphsurgeon
    import onnx_graphsurgeon as gs

    from rwkvq_onnx.quant.formats import VectorQuantized

OP_TYPE = "VQMatMul"
QUALIFIED = f"{DOMAIN}.{OP_TYPE}"
ATTRIBUTES = ("N", "K", "dim", "group_rows", "group_cols", "index_bits")  # all INT (int64 in ONNX)
INPUTS = ("x", "codes", "codebooks", "scales")
INPUT_DTYPES = (np.dtype(np.float32), np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.float32))
OUTPUT_DTYPE = np.dtype(np.float32)
MAX_INDEX_BITS = 12  # the CPU kernels' code reader takes up to 12-bit indices


@dataclass(frozen=True)
class Attributes:
    """A checked attribute set (build it with `validate`), with the sizes that follow from it."""

    N: int
    K: int
    dim: int
    group_rows: int
    group_cols: int
    index_bits: int

    @property
    def codes_per_row(self) -> int:
        return self.K // self.dim

    @property
    def row_bytes(self) -> int:
        return packed_bytes(self.codes_per_row, self.index_bits)

    @property
    def entries(self) -> int:
        """E: entries per codebook."""
        return 1 << self.index_bits

    @property
    def codebooks_shape(self) -> tuple[int, int, int, int]:
        return (-(-self.N // self.group_rows), -(-self.K // self.group_cols), self.entries, self.dim)

    @property
    def codes_shape(self) -> tuple[int, int]:
        return (self.N, self.row_bytes)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def validate(attrs: Mapping[str, Any], codes: Any = None, codebooks: Any = None, scales: Any = None, *,
             node: str) -> Attributes:
    """Check every attribute and every given input (anything with .shape and .dtype) against each other.

    Returns the checked Attributes; raises a one-line ConfigError naming `node` for the first problem.
    """
    def check(key: str, lo: int, hi: int = INT32_LIMIT) -> int:
        return int_attr(attrs, key, lo, hi, node=node, op=QUALIFIED)

    unknown = sorted(set(attrs) - set(ATTRIBUTES))
    if unknown:
        raise fail(node, QUALIFIED, f"unknown attribute(s) {', '.join(unknown)}")
    n, k, dim = check("N", 1), check("K", 1), check("dim", 1)
    group_rows, group_cols, bits = check("group_rows", 1), check("group_cols", 1), check("index_bits", 1,
                                                                                          MAX_INDEX_BITS + 1)
    if k % dim:
        raise fail(node, QUALIFIED, f"K={k} is not a multiple of dim={dim}")
    if group_cols % dim:
        raise fail(node, QUALIFIED, f"group_cols={group_cols} is not a multiple of dim={dim}")
    a = Attributes(n, k, dim, group_rows, group_cols, bits)
    if a.entries * dim >= INT32_LIMIT:  # one codebook's floats, indexed with int in the kernels
        raise fail(node, QUALIFIED, f"a codebook of {a.entries} x {dim} entries is too large")
    if codes is not None:
        expect_dtype(codes, INPUT_DTYPES[1], "codes", node=node, op=QUALIFIED)
        expect_shape(codes, a.codes_shape, "codes", node=node, op=QUALIFIED)
    if codebooks is not None:
        expect_dtype(codebooks, INPUT_DTYPES[2], "codebooks", node=node, op=QUALIFIED)
        expect_shape(codebooks, a.codebooks_shape, "codebooks", node=node, op=QUALIFIED)
    if scales is not None:
        expect_dtype(scales, INPUT_DTYPES[3], "scales", node=node, op=QUALIFIED)
        expect_shape(scales, a.codebooks_shape[:2], "scales", node=node, op=QUALIFIED)
    return a


def pack(q: VectorQuantized) -> tuple[dict[str, np.ndarray], Attributes]:
    """The op's constant inputs (codes, codebooks, scales) and attributes for a vector payload."""
    n, k = q.shape
    name = f"payload [{n}, {k}]"
    if q.codebook_bits > 8:
        raise fail(name, QUALIFIED, f"codebooks are stored as int8, got {q.codebook_bits}-bit entries")
    arrays = {"codes": pack_bits(q.codes, q.index_bits),
              "codebooks": np.ascontiguousarray(q.codebooks, dtype=np.int8),
              "scales": np.ascontiguousarray(q.codebook_scales, dtype=np.float32)}
    attrs = validate(dict(N=n, K=k, dim=q.dim, group_rows=q.group_rows, group_cols=q.group_cols,
                          index_bits=q.index_bits), **arrays, node=name)
    return arrays, attrs


def block_index(a: Attributes, codes: np.ndarray) -> np.ndarray:
    """int64 [N, K/dim]: the row of the flattened codebook table [R*C*E, dim] that each group of dim weights takes."""
    _, c, e, _ = a.codebooks_shape
    idx = unpack_bits(codes, a.index_bits, a.codes_per_row)
    rows = np.arange(a.N)[:, None] // a.group_rows
    cols = (np.arange(a.codes_per_row) * a.dim)[None, :] // a.group_cols
    return (rows * c + cols) * e + idx


def decoded_table(codebooks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 [R*C*E, dim]: every codebook entry times its codebook's scale (the op's arithmetic)."""
    books = np.asarray(codebooks).astype(np.float32) * np.asarray(scales, np.float32)[..., None, None]
    return books.reshape(-1, books.shape[-1])


def decode_weight(codes: np.ndarray, codebooks: np.ndarray, scales: np.ndarray, **attrs: int) -> np.ndarray:
    """W [N, K] float32 from the op's constant inputs."""
    a = validate(attrs, codes, codebooks, scales, node="reference")
    return decoded_table(codebooks, scales)[block_index(a, codes)].reshape(a.N, a.K)


def reference(x: np.ndarray, codes: np.ndarray, codebooks: np.ndarray, scales: np.ndarray, **attrs: int) -> np.ndarray:
    """The numpy reference of the op (what every implementation is tested against)."""
    w = decode_weight(codes, codebooks, scales, **attrs)
    return (np.asarray(x, np.float32) @ w.T).astype(np.asarray(x).dtype)


def lower(node: gs.Node, prefix: str) -> list[gs.Node]:
    """Standard ONNX nodes computing what `node` computes (they take over its output), tensors named `prefix`_*.

        MatMul(x, Transpose(Reshape(Gather(table, index), [N, K])))

    table is `decoded_table` [R*C*E, dim], index the int32 `block_index` [N, K/dim]. Indices are stored
    unpacked, so the lowered file is larger than the custom-op one: a compatibility path, not the fast one.
    """
    import onnx_graphsurgeon as gs

    if not all(isinstance(t, gs.Constant) for t in node.inputs[1:]):
        raise fail(node.name, QUALIFIED, "lowering needs constant codes and codebooks")
    x, codes, codebooks, scales = node.inputs
    a = validate(node.attrs, codes, codebooks, scales, node=node.name)
    table = gs.Constant(prefix + "_table", decoded_table(codebooks.values, scales.values))
    index = gs.Constant(prefix + "_index", block_index(a, codes.values).astype(np.int32))
    shape = gs.Constant(prefix + "_shape", np.array([a.N, a.K], np.int64))
    gathered = gs.Variable(prefix + "_g", dtype=np.float32)
    weight = gs.Variable(prefix + "_w", dtype=np.float32)
    weight_t = gs.Variable(prefix + "_wt", dtype=np.float32)
    return [gs.Node("Gather", prefix + "_gather", {"axis": 0}, [table, index], [gathered]),
            gs.Node("Reshape", prefix + "_reshape", {}, [gathered, shape], [weight]),
            gs.Node("Transpose", prefix + "_transpose", {"perm": [1, 0]}, [weight], [weight_t]),
            gs.Node("MatMul", node.name or prefix, {}, [x, weight_t], list(node.outputs))]
