"""Pass: rewrite every `rwkvq` op into standard ONNX so the model runs in any runtime.

    VQMatMul(x, codes, books, scales) -> MatMul(x, Transpose(Reshape(Gather(B, idx), [N, K])))
    VQElementwise(x, codes, book)     -> Mul(x, Gather(book, idx))
    WKV7Step(state, r, w, k, v, a, b) -> Reshapes, Mul, MatMuls and Adds of the recurrence step
    WKV7Sequence(state, r, w, k, v, a, b) -> Reshapes and the export's Scan over T of the recurrence

Each op's module in `rwkvq_onnx.opspec` builds its own lowering (`lower`);
this pass finds the nodes and names the new tensors after the weight (the op's
codes input is WEIGHT_codes; other ops' after their first output), so reports
find them. Runs only when asked (`--lower-vq`), and for the ops TensorRT has
no plugin for when an engine is built (`LowerVQ(ops=("WKV7Step",
"WKV7Sequence", "SQMatMul"))`, see tensorrt_build.prepare_for_tensorrt).
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from rwkvq_onnx.names import DOMAIN, OPSET_VERSION
from rwkvq_onnx.opspec import SPECS
from rwkvq_onnx.quant.formats import Payloads

from .base import Pass, PassResult, replace_nodes


class LowerVQ(Pass):
    name = "lower-vq"
    domains = {DOMAIN: OPSET_VERSION}  # removed once nothing uses it
    phrases = {op: "lowered {n} " + spec.QUALIFIED + " to standard ops" for op, spec in SPECS.items()}

    def __init__(self, enabled: bool = True, ops: tuple[str, ...] | None = None) -> None:
        self.enabled = enabled
        self.ops = tuple(SPECS) if ops is None else ops  # the op types to lower (default: every rwkvq op)

    def run(self, graph: gs.Graph, payloads: Payloads | None = None) -> PassResult:
        result = PassResult(self.name, phrases=self.phrases)
        if not self.enabled:
            return result
        replacements = []
        for node in [n for n in graph.nodes if n.domain == DOMAIN and n.op in SPECS and n.op in self.ops]:
            codes = node.inputs[1].name
            prefix = codes[: -len("_codes")] if codes.endswith("_codes") else node.outputs[0].name
            replacements.append((node, SPECS[node.op].lower(node, prefix)))
            result.count(node.op)
        replace_nodes(graph, replacements)
        graph.cleanup(remove_unused_graph_inputs=False)  # the packed constants nothing reads any more
        return result
