"""The pass contract: what a graph pass is, what it reports, and how a pass edits an ONNX model.

A pass is an object with
    name      str                  shown in logs and reports
    requires  tuple of str         the payload kinds it lowers ("scalar", "vector", "elementwise"); a pass
                                   whose kinds are all absent has nothing to do and is not run. Empty:
                                   the pass always runs (its own options decide).
    domains   dict[str, int]       the custom operator-set domains it manages (adds or removes), with their
                                   versions: after the passes, a graph imports each exactly when a node uses it
    run(graph, payloads) -> PassResult   the rewrite, on an onnx-graphsurgeon Graph, in place
and optionally `after_export(model)` (checks that need the exported ModelProto).

Graphs are edited with onnx-graphsurgeon (the design card's graph library; the
one TensorRT users know). Two of its limits are handled here, once:

- INT4/UINT4 constants cannot be exported from numpy values: such a constant
  is handed over as an already-packed `onnx.TensorProto` wrapped in
  `LazyValues` (`int4_constant`).
- graphsurgeon exports a constant that a subgraph (a Scan body) reads from the
  outer scope as an initializer OF THAT SUBGRAPH, once per subgraph that reads
  it: a weight read by two Scan bodies and by the main graph would be stored
  three times. `export_into` moves every such copy back to the outer graph
  (once), where the original model had it.

Model size: importing wraps every initializer in `LazyValues` (loaded only when
a pass reads it) and exporting reuses the TensorProtos, so a model is never
serialised to bytes here; checks are skipped above protobuf's 2 GB.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from rwkvq_onnx.quant.formats import Payloads, ScalarQuantized

CHECK_LIMIT_BYTES = 1_800_000_000  # onnx's checker and shape inference need the model under protobuf's 2 GB


@dataclass
class PassResult:
    """What a pass did: a count per kind of rewrite, what it skipped (weight -> reason), and how to say it.

    `phrases` maps a count key to a phrase with `{n}` (e.g. "rewrote {n} MatMuls to QDQ"); `line()` joins
    the non-zero ones: "cleanup: removed 94 unused initializers".
    """

    name: str
    counts: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    phrases: dict[str, str] = field(default_factory=dict)

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def line(self) -> str:
        parts = [self.phrases.get(k, "{n} " + k).format(n=v) for k, v in self.counts.items() if v]
        reasons: dict[str, int] = {}
        for reason in self.skipped.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        parts += [f"{n} {'weight' if n == 1 else 'weights'}: {reason}" for reason, n in reasons.items()]
        return f"{self.name}: " + ("; ".join(parts) if parts else "nothing to do")


class GraphPass(Protocol):
    name: str
    requires: tuple[str, ...]
    domains: dict[str, int]

    def run(self, graph: gs.Graph, payloads: Payloads) -> PassResult: ...

    def after_export(self, model: onnx.ModelProto) -> None: ...


def payload_kinds(payloads: Payloads) -> set[str]:
    """The kinds of payload present ("scalar", "vector", "elementwise"): what passes may require."""
    kinds = {"scalar" if isinstance(q, ScalarQuantized) else "vector" for q in payloads.linear.values()}
    return kinds | ({"elementwise"} if payloads.elementwise else set())


def is_needed(p: GraphPass, payloads: Payloads) -> bool:
    """Whether `p` has anything it requires in `payloads` (always, for a pass that requires nothing)."""
    return not p.requires or bool(set(p.requires) & payload_kinds(payloads))


class Pass:
    """Base of the passes: the contract's defaults and `pass(model, payloads)` for one pass on a ModelProto."""

    name = "pass"
    requires: tuple[str, ...] = ()
    domains: dict[str, int] = {}

    def run(self, graph: gs.Graph, payloads: Payloads) -> PassResult:
        raise NotImplementedError

    def after_export(self, model: onnx.ModelProto) -> None:
        """Checks on the exported model (default: none)."""

    def __call__(self, model: onnx.ModelProto, payloads: Payloads | None = None) -> PassResult:
        """Run this pass alone on `model`, in place (the pipeline imports a graph once for all passes)."""
        graph = import_graph(model)
        result = self.run(graph, payloads if payloads is not None else Payloads())
        export_into(graph, model, self.domains)
        self.after_export(model)
        return result


# ---- graph helpers the passes share -------------------------------------------------------------------

def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """The main graph of `model` as a graphsurgeon Graph (initializers stay lazy).

    graphsurgeon keeps only the constants some node reads, so the graph also carries
    `source_initializers`: the names of the model's initializers when it was imported (what cleanup
    counts its removals against).
    """
    graph = gs.import_onnx(model)
    graph.source_initializers = frozenset(t.name for t in model.graph.initializer)
    return graph


def constants(graph: gs.Graph) -> dict[str, gs.Constant]:
    """Name -> constant tensor of the main graph (subgraphs' own constants are not included)."""
    return {name: t for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}


def constant_names(graph: gs.Graph) -> set[str]:
    """Names of the constants the graph or any subgraph of it (Scan, Loop and If bodies) reads."""
    names = set(constants(graph))
    for node in graph.nodes:
        for value in node.attrs.values():
            for sub in value if isinstance(value, list) else [value]:
                if isinstance(sub, gs.Graph):
                    names |= constant_names(sub)
    return names


def weight_matmuls(graph: gs.Graph, weights) -> list[tuple[gs.Node, str]]:
    """Every `MatMul(x, W)` whose W is a constant named in `weights`: (node, W's name)."""
    return [(node, node.inputs[1].name) for node in graph.nodes
            if node.op == "MatMul" and len(node.inputs) == 2 and isinstance(node.inputs[1], gs.Constant)
            and node.inputs[1].name in weights]


def replace_nodes(graph: gs.Graph, replacements: list[tuple[gs.Node, list[gs.Node]]]) -> None:
    """Put each (node, its replacement nodes) where the node was (keeping the graph's order); drop the node.

    A replacement takes over the old node's outputs by listing the same output tensors. (graphsurgeon
    nodes are not hashable, hence a list of pairs.)
    """
    if not replacements:
        return
    by_id = {id(old): new for old, new in replacements}
    for old, _ in replacements:
        old.inputs.clear()
        old.outputs.clear()
    nodes = []
    for node in graph.nodes:
        nodes.extend(by_id.get(id(node), [node]))
    graph.nodes = nodes


def int4_constant(name: str, codes: np.ndarray, signed: bool) -> gs.Constant:
    """A constant of 4-bit codes (values 0..15 as two's complement nibbles when `signed`), stored packed."""
    from rwkvq_onnx.opspec.bitpack import pack_bits

    codes = np.asarray(codes)
    raw = pack_bits((codes & 0xF).reshape(-1), 4).tobytes()
    dtype = onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4
    return gs.Constant(name, LazyValues(onnx.helper.make_tensor(name, dtype, codes.shape, raw, raw=True)))


def is_float16(tensor: gs.Tensor) -> bool:
    return tensor.dtype == np.float16 or tensor.dtype == onnx.TensorProto.FLOAT16


def float32_op_nodes(op_type: str, domain: str, name: str, attrs: dict, x: gs.Tensor, constants: list[gs.Tensor],
                     outputs: list[gs.Tensor], weight: str, fp16: bool) -> list[gs.Node]:
    """A custom op that computes in float32 (the rwkvq matmuls) standing in for a MatMul: in a float16 graph,
    with a Cast to float32 before it and one back to float16 after it (tensors named after `weight`)."""
    if not fp16:
        return [gs.Node(op_type, name, attrs, [x, *constants], outputs, domain=domain)]
    x32, y32 = gs.Variable(weight + "_x32", dtype=np.float32), gs.Variable(weight + "_y32", dtype=np.float32)
    return [gs.Node("Cast", weight + "_cast_in", {"to": onnx.TensorProto.FLOAT}, [x], [x32]),
            gs.Node(op_type, name, attrs, [x32, *constants], [y32], domain=domain),
            gs.Node("Cast", weight + "_cast_out", {"to": onnx.TensorProto.FLOAT16}, [y32], outputs)]


def _subgraphs(graph: onnx.GraphProto):
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs):
                yield sub
                yield from _subgraphs(sub)


def export_into(graph: gs.Graph, model: onnx.ModelProto, domains: dict[str, int]) -> None:
    """Export `graph` into `model` in place: graph and operator sets replaced, metadata and IR version kept.

    Inputs that have an initializer (overridable defaults) stay inputs while their initializer stays.
    Initializers of the original main graph that graphsurgeon copied into subgraphs go back to the main
    graph, once. Each of `domains` (the passes' managed domains) is imported exactly when a node uses it.
    """
    outer = {t.name for t in model.graph.initializer}  # model is still the original here
    # inputs with an initializer (a default a caller may override, e.g. the sequence graph's logits_from):
    # graphsurgeon imports them as constants and exports no input for them
    overridable = [i for i in model.graph.input if i.name in outer]
    exported = gs.export_onnx(graph, do_type_check=False)
    have = {t.name for t in exported.graph.initializer}
    declared = {i.name for i in exported.graph.input}
    exported.graph.input.extend(i for i in overridable if i.name in have and i.name not in declared)
    for sub in _subgraphs(exported.graph):
        keep = []
        for t in sub.initializer:
            if t.name in outer:
                if t.name not in have:
                    exported.graph.initializer.append(t)
                    have.add(t.name)
            else:
                keep.append(t)
        if len(keep) != len(sub.initializer):
            del sub.initializer[:]
            sub.initializer.extend(keep)
    used = {n.domain for n in exported.graph.node} | {n.domain for s in _subgraphs(exported.graph) for n in s.node}
    opsets = [o for o in exported.opset_import if o.domain not in domains]
    opsets += [onnx.helper.make_opsetid(d, v) for d, v in domains.items() if d in used]
    model.graph.CopyFrom(exported.graph)
    del model.opset_import[:]
    model.opset_import.extend(opsets)


def check_model(model: onnx.ModelProto) -> None:
    """Shape inference with type checks and the ONNX checker (skipped for models near protobuf's 2 GB)."""
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size < CHECK_LIMIT_BYTES:
        onnx.shape_inference.infer_shapes(model, check_type=True)
        onnx.checker.check_model(model)


# ---- legacy: removed by the quantization-policy rework (nothing in passes/ reads it) --------------------
