"""Pass: rewrite every `rwkvq` op into standard ONNX so the model runs in any runtime.

    VQMatMul(x, codes, books, scales) -> MatMul(x, Transpose(Reshape(Gather(B, idx), [N, K])))
    VQElementwise(x, codes, book)     -> Mul(x, Reshape(Gather(book, idx), shape))

B is the decoded codebook table [R*C*E, dim] (int8 entries times their
scale, exactly the op's arithmetic) and idx the int32 row of B for every
group of `dim` weights. Indices are stored unpacked, so the lowered file is
larger than the custom-op one: this is a compatibility path, not the fast one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rwkvq_onnx.names import DOMAIN
from rwkvq_onnx.opspec.bitpack import unpack_bits
from rwkvq_onnx.graph import get_initializer, remove_unused

from .base import PassResult


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@dataclass
class LowerVQ:
    name: str = "lower-vq"

    def __call__(self, model: onnx.ModelProto, payloads=None) -> PassResult:
        result = PassResult(self.name)
        nodes = []
        for node in model.graph.node:
            if node.domain != DOMAIN:
                nodes.append(node)
                continue
            a = _attrs(node)
            # name the lowered tensors after the weight (inputs are WEIGHT_codes, ...), so reports find them
            base = node.input[1][: -len("_codes")] if node.input[1].endswith("_codes") else node.output[0]
            if node.op_type == "VQMatMul":
                codes, books, scales = (get_initializer(model, n) for n in node.input[1:4])
                N, K, d, gr, gc, bits = (int(a[k]) for k in ("N", "K", "dim", "group_rows", "group_cols", "index_bits"))
                R, C, E, _ = books.shape
                idx = unpack_bits(codes, bits, K // d)
                rb = np.arange(N)[:, None] // gr
                cb = (np.arange(K // d) * d)[None, :] // gc
                flat = ((rb * C + cb) * E + idx).astype(np.int32)
                table = (books.astype(np.float32) * scales.astype(np.float32)[..., None, None]).reshape(-1, d)
                model.graph.initializer.extend([numpy_helper.from_array(table, base + "_table"),
                                                numpy_helper.from_array(flat, base + "_index"),
                                                numpy_helper.from_array(np.array([N, K], np.int64), base + "_shape")])
                nodes += [
                    helper.make_node("Gather", [base + "_table", base + "_index"], [base + "_g"], axis=0),
                    helper.make_node("Reshape", [base + "_g", base + "_shape"], [base + "_w"]),
                    helper.make_node("Transpose", [base + "_w"], [base + "_wt"], perm=[1, 0]),
                    helper.make_node("MatMul", [node.input[0], base + "_wt"], list(node.output), name=base),
                ]
            elif node.op_type == "VQElementwise":
                codes, book = get_initializer(model, node.input[1]), get_initializer(model, node.input[2])
                shape = [int(s) for s in a["shape"].decode().split(",")] if isinstance(a["shape"], bytes) \
                    else [int(s) for s in str(a["shape"]).split(",")]
                idx = unpack_bits(codes, int(a["index_bits"]), int(np.prod(shape)))
                model.graph.initializer.extend([
                    numpy_helper.from_array(idx.astype(np.int32).reshape(shape), base + "_index"),
                    numpy_helper.from_array(book.astype(np.float32), base + "_book")])
                nodes += [helper.make_node("Gather", [base + "_book", base + "_index"], [base + "_v"], axis=0),
                          helper.make_node("Mul", [node.input[0], base + "_v"], list(node.output), name=base)]
            else:
                nodes.append(node)
                continue
            result.count(node.op_type)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        remove_unused(model)
        keep = [o for o in model.opset_import if o.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(keep)
        return result
