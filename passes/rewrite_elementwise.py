"""Pass: element-wise codebook payloads into the graph.

    Mul(a, v) -> rwkvq.VQElementwise(a, codes, codebook)        (float32 graphs)
    v         -> decode(codes, codebook) as a constant            (--fold-elementwise, float16 graphs,
                                                                   or v not directly multiplied, e.g. RWKV-6 maa)
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper, numpy_helper

from rwkvq_onnx.names import DOMAIN, OPSET_VERSION
from rwkvq_onnx.opspec import vq_elementwise
from rwkvq_onnx.graph import consumers, ensure_opset, get_initializer, set_initializer

from rwkvq_onnx.quant.formats import Payloads

from .base import PassResult


@dataclass
class RewriteElementwise:
    fold: bool = False
    name: str = "rewrite-elementwise"

    def __call__(self, model: onnx.ModelProto, payloads: Payloads) -> PassResult:
        result = PassResult(self.name)
        users = consumers(model)
        inits = {t.name: t for t in model.graph.initializer}
        replace: dict[int, onnx.NodeProto] = {}
        for name, q in payloads.elementwise.items():
            if name not in inits:
                continue
            orig = get_initializer(model, name)
            muls = [n for n in users.get(name, []) if n.op_type == "Mul"]
            direct = len(users.get(name, [])) == 1 and len(muls) == 1
            if self.fold or not direct or inits[name].data_type != TensorProto.FLOAT:
                set_initializer(model, name, q.dequantize().reshape(orig.shape).astype(orig.dtype))
                result.count("folded")
                continue
            mul = muls[0]
            arrays, checked = vq_elementwise.pack(q)
            attrs = checked.as_dict()
            names = [f"{name}_codes", f"{name}_codebook"]
            model.graph.initializer.extend(numpy_helper.from_array(a, n) for a, n in zip(arrays.values(), names))
            x = mul.input[0] if mul.input[1] == name else mul.input[1]
            replace[id(mul)] = helper.make_node(
                "VQElementwise", [x, *names], list(mul.output), name=mul.name, domain=DOMAIN,
                index_bits=attrs["index_bits"], shape=",".join(str(s) for s in orig.shape))
            result.count("vq_elementwise")
        if replace:
            nodes = [replace.get(id(n), n) for n in model.graph.node]
            del model.graph.node[:]
            model.graph.node.extend(nodes)
            ensure_opset(model, DOMAIN, OPSET_VERSION)
        return result
