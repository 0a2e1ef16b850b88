"""Small helpers on `onnx.ModelProto` shared by calibration and the passes."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> nodes of the main graph that read it."""
    users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            users[name].append(node)
    return users


def initializer_names(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer}


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


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names read inside a node's subgraphs (Scan / Loop / If bodies)."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for n in g.node:
                names.update(n.input)
                names |= _subgraph_inputs(n)
    return names


def remove_unused(model: onnx.ModelProto) -> tuple[int, int]:
    """Drop nodes whose outputs nobody reads and initializers nobody uses; returns (nodes, initializers) removed."""
    g = model.graph
    removed_nodes = 0
    while True:
        needed = {o.name for o in g.output}
        for node in g.node:
            needed.update(node.input)
            needed |= _subgraph_inputs(node)
        keep = [n for n in g.node if any(o in needed for o in n.output)]
        if len(keep) == len(g.node):
            break
        removed_nodes += len(g.node) - len(keep)
        del g.node[:]
        g.node.extend(keep)
    used = {o.name for o in g.output}
    for node in g.node:
        used.update(node.input)
        used |= _subgraph_inputs(node)
    keep_init = [t for t in g.initializer if t.name in used]
    removed_inits = len(g.initializer) - len(keep_init)
    if removed_inits:
        tensors = [onnx.TensorProto() for _ in keep_init]
        for dst, src in zip(tensors, keep_init):
            dst.CopyFrom(src)
        del g.initializer[:]
        g.initializer.extend(tensors)
    return removed_nodes, removed_inits


def ensure_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))


RWKVQ_OPS_KEY = "rwkvq.ops"  # metadata written by quantize: the rwkvq custom ops a graph needs a library for
# metadata written by export and quantize into both graphs of a sequence/step pair: a digest of their weights
PAIR_ID_KEY = "rwkvq.pair_id"


def rwkvq_ops(model: onnx.ModelProto) -> str:
    """Comma-separated sorted op types of the `rwkvq` domain in the graph ('' when none)."""
    return ",".join(sorted({n.op_type for n in model.graph.node if n.domain == "rwkvq"}))
