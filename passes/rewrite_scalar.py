"""Pass: scalar payloads into the graph.

    MatMul(x, W) -> MatMul(x, DequantizeLinear(Wq, scale, [zero], axis=0, block_size=g))    (--sq-format qdq)
    MatMul(x, W) -> com.microsoft.MatMulNBits(x, Wq, scales, zero_points)                    (--sq-format matmulnbits)

Codes of 2 or 3 bits travel in a 4-bit container (uint4/int4, or MatMulNBits
bits=4). Symmetric payloads become int4 without a zero point (what TensorRT
expects); asymmetric ones uint4 with zero points. MatMulNBits needs a
power-of-two block of at least 16; other group sizes fall back to QDQ. AWQ
input scales are applied at run time by a Mul before the MatMul, since in
RWKV nothing upstream can absorb them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rwkvq_onnx.errors import ConfigError
from rwkvq_onnx.graph import ensure_opset, get_initializer
from rwkvq_onnx.quant import ScalarQuantized

from rwkvq_onnx.quant.formats import Payloads

from .base import PassResult, rewrite_weight_matmuls

FORMATS = ("qdq", "matmulnbits")


def pack_nibbles(values: np.ndarray) -> bytes:
    """4-bit values (0..15), low nibble first, as ONNX INT4/UINT4 raw data."""
    v = np.asarray(values, np.uint8).reshape(-1)
    if v.size % 2:
        v = np.concatenate([v, np.zeros(1, np.uint8)])
    return (v[0::2] | (v[1::2] << 4)).astype(np.uint8).tobytes()


def qdq_initializers(q: ScalarQuantized, name: str, dtype: np.dtype) -> list[onnx.TensorProto]:
    """Weight, scale, [zero point] for a blocked DequantizeLinear along K of W^T [K, N]."""
    codes_t = q.codes.T  # [K, N]
    scales_t = q.scales.T.astype(dtype)  # [K/g, N]
    zeros_t = q.zeros.T
    out = []
    if q.bits == 8:
        if q.symmetric:
            out.append(numpy_helper.from_array((codes_t - zeros_t.repeat(q.group_size, 0)[: codes_t.shape[0]])
                                               .astype(np.int8), name + "_q"))
        else:
            out.append(numpy_helper.from_array(codes_t.astype(np.uint8), name + "_q"))
            out.append(numpy_helper.from_array(zeros_t.astype(np.uint8), name + "_zero"))
    elif q.symmetric:  # signed int4, zero point 0
        signed = codes_t - (1 << (q.bits - 1))
        out.append(helper.make_tensor(name + "_q", TensorProto.INT4, codes_t.shape, pack_nibbles(signed & 0xF), raw=True))
    else:
        out.append(helper.make_tensor(name + "_q", TensorProto.UINT4, codes_t.shape, pack_nibbles(codes_t), raw=True))
        out.append(helper.make_tensor(name + "_zero", TensorProto.UINT4, zeros_t.shape, pack_nibbles(zeros_t), raw=True))
    out.insert(1, numpy_helper.from_array(np.ascontiguousarray(scales_t), name + "_scale"))
    return out


def matmulnbits_initializers(q: ScalarQuantized, name: str, dtype: np.dtype) -> list[onnx.TensorProto]:
    """B uint8 [N, k_blocks, g/2], scales [N, k_blocks], zero points packed 4-bit [N, ceil(k_blocks/2)]."""
    n, k = q.shape
    g = q.group_size
    kb = -(-k // g)
    bits = 8 if q.bits == 8 else 4
    codes = np.zeros((n, kb * g), np.uint8)
    codes[:, :k] = q.codes
    if bits == 8:
        blob = codes.reshape(n, kb, g)
        zeros = q.zeros.astype(np.uint8)
    else:
        c = codes.reshape(n, kb, g // 2, 2)
        blob = (c[..., 0] | (c[..., 1] << 4)).astype(np.uint8)
        z = np.zeros((n, kb + kb % 2), np.uint8)
        z[:, :kb] = q.zeros
        zeros = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
    return [numpy_helper.from_array(np.ascontiguousarray(blob), name + "_q"),
            numpy_helper.from_array(np.ascontiguousarray(q.scales.astype(dtype)), name + "_scale"),
            numpy_helper.from_array(np.ascontiguousarray(zeros), name + "_zero")]


def weight_dtype(model: onnx.ModelProto, weight: str) -> np.dtype:
    return get_initializer(model, weight).dtype


@dataclass
class RewriteScalar:
    format: str = "qdq"
    name: str = "rewrite-scalar"

    def __call__(self, model: onnx.ModelProto, payloads: Payloads) -> PassResult:
        if self.format not in FORMATS:
            raise ConfigError(f"unknown --sq-format '{self.format}' (choose from {', '.join(FORMATS)})")
        result = PassResult(self.name)
        targets = {n: q for n, q in payloads.linear.items() if isinstance(q, ScalarQuantized)}
        inits = {t.name: t for t in model.graph.initializer}

        def replace(node: onnx.NodeProto, w: str) -> list[onnx.NodeProto]:
            q = targets[w]
            dtype = numpy_helper.to_array(inits[w]).dtype
            x = node.input[0]
            nodes = []
            if w in payloads.input_scales:
                inv = numpy_helper.from_array((1.0 / payloads.input_scales[w]).astype(dtype), w + "_awq_inv_scale")
                model.graph.initializer.append(inv)
                nodes.append(helper.make_node("Mul", [x, inv.name], [w + "_awq_in"], name=w + "_awq_mul"))
                x = w + "_awq_in"
            pow2 = q.group_size >= 16 and q.group_size & (q.group_size - 1) == 0
            if self.format == "matmulnbits" and pow2:
                tensors = matmulnbits_initializers(q, w, dtype)
                n, k = q.shape
                nodes.append(helper.make_node(
                    "MatMulNBits", [x, *(t.name for t in tensors)], list(node.output), name=node.name,
                    domain="com.microsoft", K=k, N=n, bits=8 if q.bits == 8 else 4, block_size=q.group_size,
                    accuracy_level=0))
                result.count("matmulnbits")
            else:
                if self.format == "matmulnbits":
                    result.skipped[w] = f"group size {q.group_size} is not a power of two >= 16: QDQ instead"
                tensors = qdq_initializers(q, w, dtype)
                dq_out = w + "_dq"
                nodes.append(helper.make_node("DequantizeLinear", [t.name for t in tensors], [dq_out],
                                              name=w + "_dequantize", axis=0, block_size=q.group_size))
                nodes.append(helper.make_node("MatMul", [x, dq_out], list(node.output), name=node.name))
                result.count("qdq")
            model.graph.initializer.extend(tensors)
            return nodes

        rewrite_weight_matmuls(model, targets, replace)
        if result.counts.get("matmulnbits"):
            ensure_opset(model, "com.microsoft", 1)
        return result
