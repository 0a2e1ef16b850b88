"""`rwkvq.VQElementwise(x, codes, codebook) -> y`: y = x * v with v an element-wise-codebook vector.

    x         float32 [...]          v broadcasts over it (numpy rules; v's non-1 dimensions are x's last ones)
    codes     uint8   [ceil(n * index_bits / 8)]  one little-endian bit stream (`bitpack`) of n = prod(shape)
                                                  indices
    codebook  float32 [2**index_bits]
    y         float32, x's shape broadcast with v's

v = codebook[codes].reshape(shape). Attributes: index_bits (INT), shape
(STRING, comma-separated positive dimensions, e.g. "1,1,768").
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from rwkvq_onnx.names import DOMAIN, OPSET_VERSION  # noqa: F401  (part of the spec: <op>.OPSET_VERSION)

from .bitpack import pack_bits, packed_bytes, unpack_bits
from .checks import INT32_LIMIT, expect_dtype, expect_shape, fail, int_attr

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from rwkvq_onnx.quant.formats import ElementwiseQuantized

OP_TYPE = "VQElementwise"
QUALIFIED = f"{DOMAIN}.{OP_TYPE}"
ATTRIBUTES = ("index_bits", "shape")  # INT, STRING
INPUTS = ("x", "codes", "codebook")
INPUT_DTYPES = (np.dtype(np.float32), np.dtype(np.uint8), np.dtype(np.float32))
OUTPUT_DTYPE = np.dtype(np.float32)
MAX_INDEX_BITS = 16  # ort_ops.c refuses more
MAX_RANK = 8  # ort_ops.c holds the shape in int64[8]
MAX_SHAPE_CHARS = 255  # ort_ops.c reads the attribute into a 256-byte buffer


@dataclass(frozen=True)
class Attributes:
    """A checked attribute set (build it with `validate`)."""

    index_bits: int
    shape: tuple[int, ...]

    @property
    def count(self) -> int:
        """n: values in the vector."""
        return int(np.prod(self.shape, dtype=object))

    @property
    def codes_bytes(self) -> int:
        return packed_bytes(self.count, self.index_bits)

    @property
    def entries(self) -> int:
        return 1 << self.index_bits

    def as_dict(self) -> dict[str, Any]:
        """ONNX attribute values (shape as its string form)."""
        return {"index_bits": self.index_bits, "shape": format_shape(self.shape)}


def format_shape(shape: Sequence[int]) -> str:
    return ",".join(str(int(d)) for d in shape)


def parse_shape(text: Any, *, node: str) -> tuple[int, ...]:
    """The shape attribute ('1,1,768', str or bytes) as positive Python ints; refuses anything else."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if not isinstance(text, str):
        raise fail(node, QUALIFIED, f"attribute shape must be a string, got {text!r}")
    if len(text) > MAX_SHAPE_CHARS:
        raise fail(node, QUALIFIED, f"attribute shape is {len(text)} characters, at most {MAX_SHAPE_CHARS}")
    parts = text.split(",")
    if not 1 <= len(parts) <= MAX_RANK or not all(p.strip().isdigit() for p in parts):
        raise fail(node, QUALIFIED, f"attribute shape '{text}' is not 1 to {MAX_RANK} comma-separated "
                                    "positive integers")
    dims = tuple(int(p) for p in parts)
    if any(not 1 <= d < INT32_LIMIT for d in dims):
        raise fail(node, QUALIFIED, f"attribute shape '{text}' has a dimension outside [1, {INT32_LIMIT - 1}]")
    if int(np.prod(dims, dtype=object)) >= INT32_LIMIT:
        raise fail(node, QUALIFIED, f"attribute shape '{text}' holds {INT32_LIMIT} or more values")
    return dims


def validate(attrs: Mapping[str, Any], codes: Any = None, codebook: Any = None, *, node: str) -> Attributes:
    """Check the attributes and the given inputs (anything with .shape and .dtype) against each other.

    Returns the checked Attributes; raises a one-line ConfigError naming `node` for the first problem.
    """
    unknown = sorted(set(attrs) - set(ATTRIBUTES))
    if unknown:
        raise fail(node, QUALIFIED, f"unknown attribute(s) {', '.join(unknown)}")
    bits = int_attr(attrs, "index_bits", 1, MAX_INDEX_BITS + 1, node=node, op=QUALIFIED)
    if "shape" not in attrs:
        raise fail(node, QUALIFIED, "missing attribute shape")
    a = Attributes(bits, parse_shape(attrs["shape"], node=node))
    if codes is not None:
        expect_dtype(codes, INPUT_DTYPES[1], "codes", node=node, op=QUALIFIED)
        expect_shape(codes, (a.codes_bytes,), "codes", node=node, op=QUALIFIED)
    if codebook is not None:
        expect_dtype(codebook, INPUT_DTYPES[2], "codebook", node=node, op=QUALIFIED)
        expect_shape(codebook, (a.entries,), "codebook", node=node, op=QUALIFIED)
    return a


def pack(q: ElementwiseQuantized, shape: Sequence[int] | None = None) -> tuple[dict[str, np.ndarray], Attributes]:
    """The op's constant inputs (codes, codebook) and attributes for an element-wise payload.

    shape: the vector's shape in the graph (e.g. [1, 1, C] for a payload of shape [C]; same element count),
    default the payload's own.
    """
    shape = tuple(q.shape if shape is None else shape)
    arrays = {"codes": pack_bits(np.asarray(q.codes).reshape(-1), q.index_bits),
              "codebook": np.ascontiguousarray(q.codebook, dtype=np.float32)}
    attrs = validate({"index_bits": q.index_bits, "shape": format_shape(shape)}, **arrays,
                     node=f"payload {list(q.shape)}")
    return arrays, attrs


def indices(a: Attributes, codes: np.ndarray) -> np.ndarray:
    """int64 of `a.shape`: the codebook entry of every element."""
    return unpack_bits(np.asarray(codes).reshape(-1), a.index_bits, a.count).reshape(a.shape)


def decode_vector(codes: np.ndarray, codebook: np.ndarray, **attrs: Any) -> np.ndarray:
    """v float32 of the op's shape from its constant inputs."""
    a = validate(attrs, codes, codebook, node="reference")
    return np.asarray(codebook, np.float32)[indices(a, codes)]


def reference(x: np.ndarray, codes: np.ndarray, codebook: np.ndarray, **attrs: Any) -> np.ndarray:
    """The numpy reference of the op (what every implementation is tested against)."""
    if not isinstance(attrs.get("shape", ""), (str, bytes)):
        attrs = {**attrs, "shape": format_shape(attrs["shape"])}
    v = decode_vector(codes, codebook, **attrs)
    return (np.asarray(x, np.float32) * v).astype(np.asarray(x).dtype)


def lower(node: gs.Node, prefix: str) -> list[gs.Node]:
    """Standard ONNX nodes `Mul(x, Gather(codebook, index))` computing what `node` computes (they take over its
    output), tensors named `prefix`_*.

    index is the int32 `indices` array of the vector's shape (stored unpacked: a compatibility path).
    """
    import onnx_graphsurgeon as gs

    if not all(isinstance(t, gs.Constant) for t in node.inputs[1:]):
        raise fail(node.name, QUALIFIED, "lowering needs constant codes and codebooks")
    x, codes, codebook = node.inputs
    a = validate(node.attrs, codes, codebook, node=node.name)
    index = gs.Constant(prefix + "_index", indices(a, codes.values).astype(np.int32))
    book = gs.Constant(prefix + "_book", np.asarray(codebook.values, np.float32))
    vector = gs.Variable(prefix + "_v", dtype=np.float32)
    return [gs.Node("Gather", prefix + "_gather", {"axis": 0}, [book, index], [vector]),
            gs.Node("Mul", node.name or prefix, {}, [x, vector], list(node.outputs))]
