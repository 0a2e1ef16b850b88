"""A small helper to emit ONNX nodes with unique names.

Export builds its graphs directly with `onnx.helper` (rather than tracing
PyTorch) so that every weight initializer keeps its checkpoint key, the WKV
recurrence is one node per layer (a native op or a `Scan`), and the step graph
is loop-free.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21


class GraphBuilder:
    """Accumulates nodes and initializers; `op` returns the output name(s)."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, name: str | None = None,
           outputs: Sequence[str] | None = None, domain: str = "", **attrs) -> str | list[str]:
        hint = name or op_type.lower()
        outs = list(outputs) if outputs is not None else [self.fresh(hint) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh("n_" + hint),
                                           domain=domain, **attrs))
        return outs[0] if n_out == 1 and outputs is None else outs

    def initializer(self, name: str, array: np.ndarray) -> str:
        """Add a named initializer (a weight keeps its checkpoint key as name)."""
        if name in self._names:
            return name
        self._names.add(name)
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C", copy=True), name))
        return name

    def const(self, value, dtype=np.float32) -> str:
        """A small shared constant (shapes, axes, scalars)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.initializer(self.fresh(f"const_{arr.dtype.name}"), arr)
        return self._consts[key]

    def ints(self, values) -> str:
        return self.const(values, np.int64)


def tensor_type(name: str, elem_type: int, shape: Sequence[int | str | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(shape))


FLOAT = TensorProto.FLOAT
FLOAT16 = TensorProto.FLOAT16
INT64 = TensorProto.INT64
