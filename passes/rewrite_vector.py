"""Pass: vector payloads into the graph.

    MatMul(x, W) -> rwkvq.VQMatMul(x, codes, codebooks, scales)

Inputs and attributes come from `rwkvq_onnx.opspec.vq_matmul.pack`; the
constants are named after the weight (W_codes, W_codebooks, W_scales). In
float16 graphs the op runs in float32 between two Casts.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from rwkvq_onnx.names import DOMAIN, OPSET_VERSION
from rwkvq_onnx.opspec import vq_matmul
from rwkvq_onnx.quant import VectorQuantized
from rwkvq_onnx.quant.formats import Payloads

from .base import Pass, PassResult, is_float16, replace_nodes, weight_matmuls


class RewriteVector(Pass):
    name = "rewrite-vector"
    requires = ("vector",)
    domains = {DOMAIN: OPSET_VERSION}
    phrases = {"vq_matmul": "rewrote {n} MatMuls to " + vq_matmul.QUALIFIED}

    def run(self, graph: gs.Graph, payloads: Payloads) -> PassResult:
        result = PassResult(self.name, phrases=self.phrases)
        targets = {n: q for n, q in payloads.linear.items() if isinstance(q, VectorQuantized)}
        replacements = []
        for node, w in weight_matmuls(graph, targets):
            arrays, attrs = vq_matmul.pack(targets[w])
            inputs = [gs.Constant(f"{w}_{key}", arrays[key]) for key in vq_matmul.INPUTS[1:]]
            x, (y,) = node.inputs[0], node.outputs
            nodes = []
            fp16 = is_float16(node.inputs[1])
            if fp16:
                x32, y32 = gs.Variable(w + "_x32", dtype=np.float32), gs.Variable(w + "_y32", dtype=np.float32)
                nodes.append(gs.Node("Cast", w + "_cast_in", {"to": onnx.TensorProto.FLOAT}, [x], [x32]))
                x, y = x32, y32
            nodes.append(gs.Node(vq_matmul.OP_TYPE, node.name, attrs.as_dict(), [x, *inputs], [y], domain=DOMAIN))
            if fp16:
                nodes.append(gs.Node("Cast", w + "_cast_out", {"to": onnx.TensorProto.FLOAT16}, [y],
                                     list(node.outputs)))
            replacements.append((node, nodes))
            result.count("vq_matmul")
        replace_nodes(graph, replacements)
        return result
