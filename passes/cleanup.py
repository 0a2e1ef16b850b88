"""Pass: drop what the rewrites left unused (subgraph reads count as uses), then prove the graph valid.

The validity check (shape inference with type checks + the ONNX checker) runs
on the exported model, in `after_export`.
"""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from .base import Pass, PassResult, check_model, constants


class Cleanup(Pass):
    name = "cleanup"
    domains = {}
    phrases = {"nodes": "removed {n} unused nodes", "initializers": "removed {n} unused initializers"}

    def __init__(self, check: bool = True) -> None:
        self.check = check

    def run(self, graph: gs.Graph, payloads=None) -> PassResult:
        nodes, inits = len(graph.nodes), len(constants(graph))
        # graph inputs stay (a session feeds every declared input); constants a Scan body reads stay
        graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True)
        return PassResult(self.name, {"nodes": nodes - len(graph.nodes), "initializers": inits - len(constants(graph))},
                          phrases=self.phrases)

    def after_export(self, model: onnx.ModelProto) -> None:
        if self.check:
            check_model(model)
