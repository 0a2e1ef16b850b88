"""Batch-first recurrent state for serving: `[L, B, ...]` state tensors become `[B, L, ...]` at the graph edge.

Triton's dynamic and sequence batchers stack requests along dimension 0. The
exported step graph keeps its state layer-first (`state_wkv` is
`[L, B, H, N, N]`), which Triton cannot batch: one model instance would serve
one sequence at a time. This pass gives each state input and `new_*` output a
batch-first edge under the same name and puts a `Transpose` between the edge
and the unchanged graph, so the export stays as it is and the serving variant
is derived from it. It marks the model with `rwkvq.state_layout = batch_first`.

Pure layout transform: no weights are touched; logits are unchanged.
"""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from rwkvq_onnx.errors import ConfigError

from .base import Pass, PassResult, Payloads

STATE_NAMES = ("state_att_shift", "state_ffn_shift", "state_wkv")
LAYOUT_KEY = "rwkvq.state_layout"
BATCH_FIRST = "batch_first"


def state_layout(model: onnx.ModelProto) -> str:
    """`batch_first` for graphs this pass produced, else `layer_first` (the export's layout)."""
    return {p.key: p.value for p in model.metadata_props}.get(LAYOUT_KEY, "layer_first")


def _swap01(shape) -> list:
    return [shape[1], shape[0], *shape[2:]]


class BatchFirstState(Pass):
    """Wrap the state inputs/outputs of an rwkvq graph with Transposes so that the edge is `[B, L, ...]`."""

    name = "batch-first-state"

    def run(self, graph: gs.Graph, payloads: Payloads) -> PassResult:
        result = PassResult(self.name)
        inputs = {t.name: i for i, t in enumerate(graph.inputs)}
        outputs = {t.name: i for i, t in enumerate(graph.outputs)}
        missing = [n for n in STATE_NAMES if n not in inputs or f"new_{n}" not in outputs]
        if missing:
            raise ConfigError(f"not an rwkvq graph with recurrent state: missing {', '.join(missing)}")
        entry, exit_ = [], []
        for name in STATE_NAMES:
            for edge_name, is_input in ((name, True), (f"new_{name}", False)):
                tensors, index = (graph.inputs, inputs) if is_input else (graph.outputs, outputs)
                inner = tensors[index[edge_name]]
                if inner.shape is None or len(inner.shape) < 2:
                    raise ConfigError(f"state tensor {edge_name} has shape {inner.shape}, expected [L, B, ...]")
                perm = [1, 0, *range(2, len(inner.shape))]
                edge = gs.Variable(edge_name, dtype=inner.dtype, shape=_swap01(inner.shape))
                inner.name = f"{edge_name}__layer_first"
                tensors[index[edge_name]] = edge
                if is_input:  # edge [B, L, ...] -> Transpose -> the graph's [L, B, ...]
                    entry.append(gs.Node("Transpose", f"{edge_name}_to_layer_first", attrs={"perm": perm},
                                         inputs=[edge], outputs=[inner]))
                else:  # the graph's [L, B, ...] -> Transpose -> edge [B, L, ...]
                    exit_.append(gs.Node("Transpose", f"{edge_name}_to_batch_first", attrs={"perm": perm},
                                         inputs=[inner], outputs=[edge]))
                    inner.shape = None  # an internal tensor now: let shape inference restate it
                result.count("transposes")
        graph.nodes[:0] = entry
        graph.nodes.extend(exit_)
        return result

    def after_export(self, model: onnx.ModelProto) -> None:
        props = [p for p in model.metadata_props if p.key != LAYOUT_KEY]
        del model.metadata_props[:]
        model.metadata_props.extend(props)
        model.metadata_props.add(key=LAYOUT_KEY, value=BATCH_FIRST)


def batch_first_state(model: onnx.ModelProto) -> onnx.ModelProto:
    """Run `BatchFirstState` on `model` in place (and return it); refuses graphs already converted."""
    if state_layout(model) == BATCH_FIRST:
        raise ConfigError("the graph's state is already batch-first")
    BatchFirstState()(model)
    return model
