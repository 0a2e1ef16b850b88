"""Pass: scalar payloads into the graph.

    MatMul(x, W) -> MatMul(x, DequantizeLinear(Wq, scale, [zero], axis=0, block_size=g))    (--sq-format qdq)
    MatMul(x, W) -> com.microsoft.MatMulNBits(x, Wq, scales, zero_points)                    (--sq-format matmulnbits)
    MatMul(x, W) -> rwkvq.SQMatMul(x, codes, scales, zero_points)                             (--sq-format sqmatmul)

SQMatMul stores 2, 3 and 4-bit codes packed at their own width (the bytes
stored are the bits reported; `rwkvq_onnx.opspec.sq_matmul`); payloads it does
not take (8 bits, K or group size not a multiple of 32) fall back to QDQ with
a recorded reason, and in float16 graphs it runs in float32 between two Casts.
For QDQ and MatMulNBits, codes of 2 or 3 bits travel in a 4-bit container (uint4/int4, or MatMulNBits
bits=4). Symmetric payloads become int4 without a zero point (what TensorRT
expects); asymmetric ones uint4 with zero points. MatMulNBits needs a
power-of-two block of at least 16; other group sizes fall back to QDQ. AWQ
input scales are applied at run time by a Mul before the MatMul, since in
RWKV nothing upstream can absorb them.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from rwkvq_onnx.errors import ConfigError
from rwkvq_onnx.names import DOMAIN, OPSET_VERSION
from rwkvq_onnx.opspec import sq_matmul
from rwkvq_onnx.opspec.bitpack import pack_bits
from rwkvq_onnx.quant import ScalarQuantized
from rwkvq_onnx.quant.formats import Payloads

from .base import Pass, PassResult, float32_op_nodes, int4_constant, is_float16, replace_nodes, weight_matmuls

FORMATS = ("qdq", "matmulnbits", "sqmatmul")


def qdq_constants(q: ScalarQuantized, name: str, dtype: np.dtype) -> list[gs.Constant]:
    """Weight, scale, [zero point] for a blocked DequantizeLinear along K of W^T [K, N]."""
    codes_t = q.codes.T  # [K, N]
    zeros_t = q.zeros.T
    scale = gs.Constant(name + "_scale", np.ascontiguousarray(q.scales.T.astype(dtype)))  # [K/g, N]
    if q.bits == 8 and q.symmetric:
        signed = codes_t - zeros_t.repeat(q.group_size, 0)[: codes_t.shape[0]]
        return [gs.Constant(name + "_q", np.ascontiguousarray(signed.astype(np.int8))), scale]
    if q.bits == 8:
        return [gs.Constant(name + "_q", np.ascontiguousarray(codes_t.astype(np.uint8))), scale,
                gs.Constant(name + "_zero", np.ascontiguousarray(zeros_t.astype(np.uint8)))]
    if q.symmetric:  # signed int4, zero point 0
        return [int4_constant(name + "_q", codes_t - (1 << (q.bits - 1)), signed=True), scale]
    return [int4_constant(name + "_q", codes_t, signed=False), scale,
            int4_constant(name + "_zero", zeros_t, signed=False)]


def matmulnbits_constants(q: ScalarQuantized, name: str, dtype: np.dtype) -> list[gs.Constant]:
    """B uint8 [N, k_blocks, g*bits/8], scales [N, k_blocks], zero points uint8 [N, k_blocks] (8-bit) or
    4-bit packed [N, ceil(k_blocks/2)]."""
    n, k = q.shape
    g = q.group_size
    kb = -(-k // g)
    bits = 8 if q.bits == 8 else 4
    codes = np.zeros((n, kb * g), np.uint8)
    codes[:, :k] = q.codes
    blob = pack_bits(codes.reshape(n, kb, g), bits)
    zeros = q.zeros.astype(np.uint8) if bits == 8 else pack_bits(q.zeros, 4)
    return [gs.Constant(name + "_q", np.ascontiguousarray(blob)),
            gs.Constant(name + "_scale", np.ascontiguousarray(q.scales.astype(dtype))),
            gs.Constant(name + "_zero", np.ascontiguousarray(zeros))]


def is_matmulnbits_block(group_size: int) -> bool:
    """MatMulNBits takes power-of-two blocks of at least 16."""
    return group_size >= 16 and group_size & (group_size - 1) == 0


def sqmatmul_nodes(q: ScalarQuantized, w: str, node: gs.Node, x: gs.Tensor, y: gs.Tensor) -> list[gs.Node]:
    """rwkvq.SQMatMul over the packed payload (constants W_codes, W_scales, W_zero_points), named like the MatMul it
    replaces; Casts around it when the graph computes in float16 (the op takes and gives float32)."""
    arrays, attrs = sq_matmul.pack(q)
    inputs = [gs.Constant(f"{w}_{key}", arrays[key]) for key in sq_matmul.INPUTS[1:]]
    return float32_op_nodes(sq_matmul.OP_TYPE, DOMAIN, node.name, attrs.as_dict(), x, inputs, [y], w,
                            is_float16(node.inputs[1]))


class RewriteScalar(Pass):
    name = "rewrite-scalar"
    requires = ("scalar",)
    domains = {"com.microsoft": 1, DOMAIN: OPSET_VERSION}
    phrases = {"qdq": "rewrote {n} MatMuls to DequantizeLinear + MatMul",
               "matmulnbits": "rewrote {n} MatMuls to MatMulNBits",
               "sqmatmul": "rewrote {n} MatMuls to " + sq_matmul.QUALIFIED}

    def __init__(self, format: str = "qdq") -> None:
        if format not in FORMATS:
            raise ConfigError(f"unknown --sq-format '{format}' (choose from {', '.join(FORMATS)})")
        self.format = format

    def run(self, graph: gs.Graph, payloads: Payloads) -> PassResult:
        result = PassResult(self.name, phrases=self.phrases)
        targets = {n: q for n, q in payloads.linear.items() if isinstance(q, ScalarQuantized)}
        replacements = []
        for node, w in weight_matmuls(graph, targets):
            q, dtype = targets[w], np.float16 if node.inputs[1].dtype == np.float16 else np.float32
            x, (y,) = node.inputs[0], node.outputs
            nodes = []
            if w in payloads.input_scales:
                inv = gs.Constant(w + "_awq_inv_scale", (1.0 / payloads.input_scales[w]).astype(dtype))
                scaled = gs.Variable(w + "_awq_in", dtype=dtype)
                nodes.append(gs.Node("Mul", w + "_awq_mul", {}, [x, inv], [scaled]))
                x = scaled
            why_not = sq_matmul.unsupported(q) if self.format == "sqmatmul" else None
            if self.format == "sqmatmul" and why_not is None:
                nodes += sqmatmul_nodes(q, w, node, x, y)
                result.count("sqmatmul")
            elif self.format == "matmulnbits" and is_matmulnbits_block(q.group_size):
                n, k = q.shape
                attrs = dict(K=k, N=n, bits=8 if q.bits == 8 else 4, block_size=q.group_size, accuracy_level=0)
                nodes.append(gs.Node("MatMulNBits", node.name, attrs, [x, *matmulnbits_constants(q, w, dtype)], [y],
                                     domain="com.microsoft"))
                result.count("matmulnbits")
            else:
                if self.format == "matmulnbits":
                    result.skipped[w] = f"group size {q.group_size} is not a power of two >= 16: QDQ instead"
                if why_not is not None:
                    result.skipped[w] = f"{why_not}: QDQ instead"
                dq = gs.Variable(w + "_dq", dtype=dtype)
                nodes += [gs.Node("DequantizeLinear", w + "_dequantize", {"axis": 0, "block_size": q.group_size},
                                  qdq_constants(q, w, dtype), [dq]),
                          gs.Node("MatMul", node.name, {}, [x, dq], [y])]
                result.count("qdq")
            replacements.append((node, nodes))
        replace_nodes(graph, replacements)
        return result
