"""The step graph's WKV state read where it lies: each layer's `rwkvq.WKV7Step` takes the whole `state_wkv` input
with its `layer` attribute, and `new_state_wkv` is one Concat of the layers' new states.

The export's state plumbing (export._layer_slices / _stack_layers) is Reshape + Split in and Concat + Reshape
out. For the [L, B, H, N, N] WKV state that costs onnxruntime three full copies per decoded token: the Split
copies each layer's state out of the input, the Concat copies them together, and the Reshape copies the result
into the graph output (an output is never an alias). At 0.1B that is 3 x 2.4 MB per token, out of cache, on
the thread that runs the graph: about 10% of a one-thread decode (perf, the native kernels' memmove). After this
pass only the Concat's copy is left: the recurrence reads each layer's state in the input, and each new state
goes through an Unsqueeze (an alias) into a Concat that writes the output.

The standard-op form and the other state tensors (two [L, B, C] shifts, 36 KB at 0.1B) are left as they are.
`export` runs this pass on every step graph with fused recurrence nodes; it also upgrades a step graph exported
before it (a graph without the pattern is left alone). TensorRT preparation lowers the nodes
(`wkv7_step.lower`: a Gather of the layer first).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from rwkvq_onnx.names import DOMAIN
from rwkvq_onnx.opspec import wkv7_step

from .base import Pass, PassResult, Payloads

STATE, NEW_STATE = "state_wkv", "new_state_wkv"
# small constants named like the graph builder's (export.pair_identity leaves them out of the pair's digest)
AXES_NAME = "const_layeraxis_0"


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if len(t.inputs) == 1 else None


def _layer_of(node: gs.Node, state: gs.Variable, layers: int) -> int | None:
    """Which layer's slice of `state` node's state input is, for the export's plumbing: output i of a Split of
    Reshape(state) (or of state), or, with one layer, Reshape(state) itself; None for anything else."""
    src = node.inputs[0]
    if len(src.outputs) != 1:  # read by another node too: keep its slice
        return None
    split = _producer(src)
    if split is None:
        return None
    if split.op == "Reshape" and layers == 1:
        return 0 if split.inputs[0] is state else None
    if split.op != "Split" or split.attrs.get("axis", 0) != 0 or len(split.outputs) != layers:
        return None
    flat = split.inputs[0]
    reshape = _producer(flat)
    if not (flat is state or (reshape is not None and reshape.op == "Reshape" and reshape.inputs[0] is state)):
        return None
    return split.outputs.index(src)


class LayerIndexedWkvState(Pass):
    """Every WKV7Step reads `state_wkv` [L, B, H, N, N] at its layer; `new_state_wkv` is Concat(Unsqueeze(...))."""

    name = "layer-indexed-wkv-state"

    def run(self, graph: gs.Graph, payloads: Payloads) -> PassResult:
        result = PassResult(self.name, phrases={"layers": "the recurrence reads state_wkv in place in {n} layers"})
        state = next((t for t in graph.inputs if t.name == STATE), None)
        out = next((t for t in graph.outputs if t.name == NEW_STATE), None)
        steps = [n for n in graph.nodes if n.op == wkv7_step.OP_TYPE and n.domain == DOMAIN]
        if state is None or out is None or not steps or state.shape is None or len(state.shape) != 5:
            return result
        layers = len(steps)
        found = [_layer_of(n, state, layers) for n in steps]
        stack = _producer(out)
        stack = stack if stack is not None and stack.op == "Reshape" else None
        cat = _producer(stack.inputs[0]) if stack is not None and layers > 1 else None
        cat = cat if cat is not None and cat.op == "Concat" and cat.attrs.get("axis") == 0 else None
        new_states = [n.outputs[1] for n in steps]
        parts = [stack.inputs[0]] if stack is not None and layers == 1 else list(cat.inputs) if cat else None
        if sorted(i for i in found if i is not None) != list(range(layers)) or parts is None \
                or [id(t) for t in parts] != [id(new_states[i]) for i in sorted(range(layers), key=found.__getitem__)]:
            return result  # not the export's plumbing: nothing to do
        for node, layer in zip(steps, found):
            node.inputs[0] = state
            node.attrs["layer"] = layer
        axes = gs.Constant(AXES_NAME, np.array([0], np.int64))
        unsqueezed = []
        for layer, t in enumerate(parts):
            u = gs.Variable(f"{t.name}_layer", dtype=np.float32)
            graph.nodes.append(gs.Node("Unsqueeze", f"{t.name}_unsqueeze", {}, [t, axes], [u]))
            unsqueezed.append(u)
        stack.outputs.clear()
        if cat is not None:
            cat.outputs.clear()
        graph.nodes.append(gs.Node("Concat", f"{NEW_STATE}_concat", {"axis": 0}, unsqueezed, [out]))
        graph.cleanup().toposort()
        result.count("layers", layers)
        return result
