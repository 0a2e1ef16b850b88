"""Pass: vector payloads into the graph.

    MatMul(x, W) -> rwkvq.VQMatMul(x, codes, codebooks, scales)

codes are bit-packed per row (index_bits each), codebooks int8 with one
scale per codebook, all initializers named after the weight. In float16
graphs the op runs in float32 between two Casts.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper, numpy_helper

from rwkvq_onnx.names import DOMAIN, OPSET_VERSION
from rwkvq_onnx.opspec import vq_matmul
from rwkvq_onnx.errors import ConfigError
from rwkvq_onnx.graph import ensure_opset
from rwkvq_onnx.quant import VectorQuantized

from rwkvq_onnx.quant.formats import Payloads

from .base import PassResult, rewrite_weight_matmuls


@dataclass
class RewriteVector:
    name: str = "rewrite-vector"

    def __call__(self, model: onnx.ModelProto, payloads: Payloads) -> PassResult:
        result = PassResult(self.name)
        targets = {n: q for n, q in payloads.linear.items() if isinstance(q, VectorQuantized)}
        inits = {t.name: t for t in model.graph.initializer}

        def replace(node: onnx.NodeProto, w: str) -> list[onnx.NodeProto]:
            q = targets[w]
            if q.codebook_bits > 8:
                raise ConfigError(f"{w}: rwkvq.VQMatMul stores 8-bit codebooks, got {q.codebook_bits}-bit")
            arrays, checked = vq_matmul.pack(q)
            attrs = checked.as_dict()
            names = [f"{w}_{k}" for k in arrays]
            model.graph.initializer.extend(numpy_helper.from_array(a, n) for a, n in zip(arrays.values(), names))
            fp16 = inits[w].data_type == TensorProto.FLOAT16
            x, y = node.input[0], node.output[0]
            nodes = []
            if fp16:
                nodes.append(helper.make_node("Cast", [x], [w + "_x32"], to=TensorProto.FLOAT))
                x, y = w + "_x32", w + "_y32"
            nodes.append(helper.make_node("VQMatMul", [x, *names], [y], name=node.name, domain=DOMAIN, **attrs))
            if fp16:
                nodes.append(helper.make_node("Cast", [y], [node.output[0]], to=TensorProto.FLOAT16))
            result.count("vq_matmul")
            return nodes

        rewrite_weight_matmuls(model, targets, replace)
        if result.counts:
            ensure_opset(model, DOMAIN, OPSET_VERSION)
        return result
