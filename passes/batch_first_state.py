"""Batch-first recurrent state for serving: `[L, B, ...]` state tensors become `[B, L, ...]` at the graph edge.

Triton's dynamic and sequence batchers stack requests along dimension 0. The
exported step graph keeps its state layer-first (`state_wkv` is
`[L, B, H, N, N]`), which Triton cannot batch: one model instance would serve
one sequence at a time. This pass renames each state input/output pair to a
batch-first edge and puts a `Transpose` between the edge and the unchanged
graph, so the export stays as it is and the serving variant is derived from
it. It marks the model with `rwkvq.state_layout = batch_first`.

Pure graph transform: no weights are touched; logits are unchanged.
"""
from __future__ import annotations

import onnx
from onnx import helper

from rwkvq_onnx.errors import ConfigError

STATE_NAMES = ("state_att_shift", "state_ffn_shift", "state_wkv")
LAYOUT_KEY = "rwkvq.state_layout"
BATCH_FIRST = "batch_first"


def state_layout(model: onnx.ModelProto) -> str:
    """`batch_first` for graphs this pass produced, else `layer_first` (the export's layout)."""
    return {p.key: p.value for p in model.metadata_props}.get(LAYOUT_KEY, "layer_first")


def _swap01(rank: int) -> list[int]:
    return [1, 0, *range(2, rank)]


def batch_first_state(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite `model` in place (and return it): state inputs and `new_*` outputs batch-first.

    Refuses graphs without the three state pairs (not an rwkvq export) and graphs already converted."""
    if state_layout(model) == BATCH_FIRST:
        raise ConfigError("the graph's state is already batch-first")
    g = model.graph
    inputs = {i.name: i for i in g.input}
    outputs = {o.name: o for o in g.output}
    missing = [n for n in STATE_NAMES if n not in inputs or f"new_{n}" not in outputs]
    if missing:
        raise ConfigError(f"not an rwkvq graph with recurrent state: missing {', '.join(missing)}")
    entry, exit_ = [], []
    for name in STATE_NAMES:
        for vi, is_input in ((inputs[name], True), (outputs[f"new_{name}"], False)):
            dims = vi.type.tensor_type.shape.dim
            rank = len(dims)
            if rank < 2:
                raise ConfigError(f"state tensor {vi.name} has rank {rank}, expected [L, B, ...]")
            inner = f"{vi.name}__layer_first"
            perm = _swap01(rank)
            if is_input:  # edge [B, L, ...] -> Transpose -> the graph's [L, B, ...] under an inner name
                for node in g.node:
                    node.input[:] = [inner if i == vi.name else i for i in node.input]
                entry.append(helper.make_node("Transpose", [vi.name], [inner], perm=perm,
                                              name=f"{vi.name}_to_layer_first"))
            else:  # the graph's [L, B, ...] under an inner name -> Transpose -> edge [B, L, ...]
                for node in g.node:
                    node.output[:] = [inner if o == vi.name else o for o in node.output]
                    node.input[:] = [inner if i == vi.name else i for i in node.input]
                exit_.append(helper.make_node("Transpose", [inner], [vi.name], perm=perm,
                                              name=f"{vi.name}_to_batch_first"))
            d0, d1 = onnx.TensorShapeProto.Dimension(), onnx.TensorShapeProto.Dimension()
            d0.CopyFrom(dims[0])
            d1.CopyFrom(dims[1])
            dims[0].CopyFrom(d1)
            dims[1].CopyFrom(d0)
    nodes = entry + list(g.node) + exit_
    del g.node[:]
    g.node.extend(nodes)
    edges = set(STATE_NAMES) | {f"new_{n}" for n in STATE_NAMES}
    kept = [v for v in g.value_info if v.name not in edges]  # their layout changed: let inference redo them
    del g.value_info[:]
    g.value_info.extend(kept)
    props = [p for p in model.metadata_props if p.key != LAYOUT_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    model.metadata_props.add(key=LAYOUT_KEY, value=BATCH_FIRST)
    return model
