"""Small read/write helpers on `onnx.ModelProto` for code outside the graph passes (calibration, quantize).

The passes edit graphs with onnx-graphsurgeon (`rwkvq_onnx.passes.base`).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from .names import DOMAIN


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> nodes of the main graph that read it."""
    users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            users[name].append(node)
    return users


def get_initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def set_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    """Add or replace an initializer."""
    tensor = numpy_helper.from_array(np.array(array, order="C", copy=True), name)
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(tensor)
            return
    model.graph.initializer.append(tensor)


def rwkvq_ops(model: onnx.ModelProto) -> str:
    """Comma-separated sorted op types of the `rwkvq` domain in the graph ('' when none)."""
    return ",".join(sorted({n.op_type for n in model.graph.node if n.domain == DOMAIN}))
