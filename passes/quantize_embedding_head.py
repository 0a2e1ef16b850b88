"""Pass: the embedding and the head, which RWKVQuant keeps in full precision, to 8 / 4 bits.

    Gather(emb.weight, ids)  -> Mul(Cast(Gather(emb.weight_q int8, ids)), Gather(emb.weight_scale, ids))
    MatMul(x, head.weight)   -> com.microsoft.MatMulNBits(x, ...)   (round to nearest, per-group zero points)

In a small RWKV they are most of the bytes (0.1B: 100M of 185M parameters),
so a 3-bit body alone saves little memory and bandwidth; decode reads the
whole head every token. Embedding rows get one symmetric scale each (each
row is layer-normalised right after the lookup, so a per-row scale is what
matters); the head gets round-to-nearest groups of 64 along its input, as
MatMulNBits stores them, and by default int8 activations inside that op
(onnxruntime's fast CPU path; see `head_accuracy_level`). Standard ONNX
ops for the embedding keep it portable (TensorRT included).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rwkvq_onnx.errors import ConfigError
from rwkvq_onnx.graph import ensure_opset
from rwkvq_onnx.quant import ScalarConfig
from rwkvq_onnx.quant.scalar import rtn_quantize

from .base import PassResult
from .rewrite_scalar import matmulnbits_initializers

EMBEDDING, HEAD = "emb.weight", "head.weight"
HEAD_GROUP = 64


def int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes and one float32 scale per row (w [V, C] -> codes [V, C], scales [V, 1])."""
    w = np.asarray(w, np.float32)
    scale = np.maximum(np.abs(w).max(axis=1, keepdims=True), 1e-12) / 127.0
    return np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale.astype(np.float32)


@dataclass
class QuantizeEmbeddingHead:
    embedding_bits: int | None = None  # 8, or None to keep it
    head_bits: int | None = None  # 4 or 8, or None to keep it
    # MatMulNBits accuracy_level of the head: 4 quantizes its input to int8 per block inside the kernel, which
    # onnxruntime's CPU kernels need to be fast (0.1B head, one token: 4-bit 1.4 ms at level 4, 9.6 ms at
    # level 0, fp32 MatMul 15.6 ms; 8-bit at level 0 falls back to a 270 ms path); 0 computes in float.
    head_accuracy_level: int = 4
    name: str = "quantize-embedding-head"

    def __post_init__(self) -> None:
        if self.embedding_bits not in (None, 8):
            raise ConfigError(f"--embedding-bits must be 8, got {self.embedding_bits}")
        if self.head_bits not in (None, 4, 8):
            raise ConfigError(f"--head-bits must be 4 or 8, got {self.head_bits}")
        if self.head_accuracy_level not in (0, 4):
            raise ConfigError(f"--head-accuracy-level must be 0 or 4, got {self.head_accuracy_level}")

    def __call__(self, model: onnx.ModelProto, payloads=None) -> PassResult:
        result = PassResult(self.name)
        inits = {t.name: t for t in model.graph.initializer}
        new_nodes: list[onnx.NodeProto] = []
        added: list[onnx.TensorProto] = []
        for node in model.graph.node:
            if self.embedding_bits and node.op_type == "Gather" and node.input[0] == EMBEDDING and EMBEDDING in inits:
                new_nodes.extend(self._embedding(node, inits[EMBEDDING], added))
                result.count("embedding")
            elif (self.head_bits and node.op_type == "MatMul" and node.input[1] == HEAD and HEAD in inits):
                new_nodes.append(self._head(node, inits[HEAD], added))
                result.count("head")
            else:
                new_nodes.append(node)
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        model.graph.initializer.extend(added)
        if result.counts.get("head"):
            ensure_opset(model, "com.microsoft", 1)
        return result

    @staticmethod
    def _once(added: list[onnx.TensorProto], tensors: list[onnx.TensorProto]) -> None:
        have = {t.name for t in added}
        added.extend(t for t in tensors if t.name not in have)

    def _embedding(self, node: onnx.NodeProto, init: onnx.TensorProto,
                   added: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
        w = numpy_helper.to_array(init)
        codes, scale = int8_rows(w)
        q, s = EMBEDDING + "_q", EMBEDDING + "_scale"
        self._once(added, [numpy_helper.from_array(codes, q),
                           numpy_helper.from_array(scale.astype(w.dtype), s)])
        ids, out = node.input[1], node.output[0]
        to = TensorProto.FLOAT16 if w.dtype == np.float16 else TensorProto.FLOAT
        base = node.name or "emb"
        return [helper.make_node("Gather", [q, ids], [out + "_q"], name=base + "_gather_q", axis=0),
                helper.make_node("Cast", [out + "_q"], [out + "_qf"], name=base + "_cast", to=to),
                helper.make_node("Gather", [s, ids], [out + "_s"], name=base + "_gather_scale", axis=0),
                helper.make_node("Mul", [out + "_qf", out + "_s"], [out], name=base + "_dequantize")]

    def _head(self, node: onnx.NodeProto, init: onnx.TensorProto, added: list[onnx.TensorProto]) -> onnx.NodeProto:
        w = numpy_helper.to_array(init)  # [K, N] as MatMul stores it
        k, n = w.shape
        q = rtn_quantize(w.T.astype(np.float32), cfg=ScalarConfig(bits=self.head_bits, group_size=HEAD_GROUP))
        tensors = matmulnbits_initializers(q, HEAD, w.dtype)
        self._once(added, tensors)
        return helper.make_node("MatMulNBits", [node.input[0], *(t.name for t in tensors)], list(node.output),
                                name=node.name or "head", domain="com.microsoft", K=k, N=n, bits=self.head_bits,
                                block_size=HEAD_GROUP, accuracy_level=self.head_accuracy_level)
