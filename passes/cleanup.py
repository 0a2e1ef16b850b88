"""Pass: drop what the rewrites left unused (subgraph reads count as uses), then prove the graph valid.

Every `rwkvq` node is checked against its op spec (attributes against the
constant inputs' shapes and dtypes); shape inference with type checks and the
ONNX checker run on the exported model, in `after_export`.
"""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from rwkvq_onnx.names import DOMAIN
from rwkvq_onnx.opspec import SPECS

from .base import Pass, PassResult, check_model, constant_names


class Cleanup(Pass):
    name = "cleanup"
    domains = {}
    phrases = {"nodes": "removed {n} unused nodes", "initializers": "removed {n} unused initializers"}

    def __init__(self, check: bool = True) -> None:
        self.check = check

    def run(self, graph: gs.Graph, payloads=None) -> PassResult:
        nodes = len(graph.nodes)
        # graph inputs stay (a session feeds every declared input); constants a Scan body reads stay
        graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True)
        # initializers of the imported model nothing reads now (weights the rewrites replaced included)
        inits = len(getattr(graph, "source_initializers", frozenset()) - constant_names(graph))
        if self.check:
            for node in graph.nodes:
                if node.domain == DOMAIN and node.op in SPECS:
                    SPECS[node.op].validate(node.attrs, *node.inputs[1:], node=node.name)
        return PassResult(self.name, {"nodes": nodes - len(graph.nodes), "initializers": inits}, phrases=self.phrases)

    def after_export(self, model: onnx.ModelProto) -> None:
        if self.check:
            check_model(model)
