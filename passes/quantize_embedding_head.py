"""Pass: the embedding and the head, which RWKVQuant keeps in full precision, to 8 / 4 bits.

    Gather(emb.weight, ids)  -> Mul(Cast(Gather(emb.weight_q int8, ids)), Gather(emb.weight_scale, ids))
    MatMul(x, head.weight)   -> rwkvq.SQMatMul(x, ...)              (4-bit, head_format "sqmatmul", the default)
                             -> com.microsoft.MatMulNBits(x, ...)   (8-bit, or head_format "matmulnbits")
                                (round to nearest in groups of 64 along the input, per-group zero points)

In a small RWKV they are most of the bytes (0.1B: 100M of 185M parameters),
so a 3-bit body alone saves little memory and bandwidth; decode reads the
whole head every token. Embedding rows get one symmetric scale each (each
row is layer-normalised right after the lookup, so a per-row scale is what
matters); the head gets round-to-nearest groups of 64 along its input.

A 4-bit head is stored as the package's packed rwkvq.SQMatMul by default:
its weights are read from the model's data file where they lie, so the
sequence and the step session share one copy. onnxruntime's MatMulNBits
(`head_format="matmulnbits"`, and every 8-bit head) pre-packs its weight
into each session's own memory: at 0.1B two re-laid-out copies of the head,
66 MiB of a 3.275-bpw process's 324 MiB peak. MatMulNBits heads use int8
activations inside the op by default (onnxruntime's fast CPU path; see
`head_accuracy_level`). Standard ONNX ops for the embedding keep it portable
(TensorRT included; build-engine lowers SQMatMul to standard ops).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from rwkvq_onnx.errors import ConfigError
from rwkvq_onnx.names import DOMAIN, EMBEDDING, HEAD, OPSET_VERSION
from rwkvq_onnx.opspec import sq_matmul
from rwkvq_onnx.quant import ScalarConfig
from rwkvq_onnx.quant.scalar import rtn_quantize

from .base import Pass, PassResult, is_float16, replace_nodes
from .rewrite_scalar import matmulnbits_constants, sqmatmul_nodes

HEAD_GROUP = 64
HEAD_FORMATS = ("sqmatmul", "matmulnbits")


def int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes and one float32 scale per row (w [V, C] -> codes [V, C], scales [V, 1])."""
    w = np.asarray(w, np.float32)
    scale = np.maximum(np.abs(w).max(axis=1, keepdims=True), 1e-12) / 127.0
    return np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale.astype(np.float32)


class QuantizeEmbeddingHead(Pass):
    name = "quantize-embedding-head"
    domains = {"com.microsoft": 1, DOMAIN: OPSET_VERSION}
    phrases = {"embedding": "rewrote {n} embedding lookups to int8 rows",
               "head": "rewrote {n} head MatMuls to MatMulNBits",
               "head_sq": "rewrote {n} head MatMuls to " + sq_matmul.QUALIFIED}

    def __init__(self, embedding_bits: int | None = None, head_bits: int | None = None,
                 head_accuracy_level: int = 4, head_format: str = "sqmatmul") -> None:
        """embedding_bits: 8, or None to keep it; head_bits: 4 or 8, or None to keep it.

        head_format: "sqmatmul" (a 4-bit head as packed rwkvq.SQMatMul, one copy shared by both sessions) or
        "matmulnbits"; an 8-bit head is always MatMulNBits (SQMatMul packs 2 to 4 bits).

        head_accuracy_level: MatMulNBits accuracy_level of the head: 4 quantizes its input to int8 per block
        inside the kernel, which onnxruntime's CPU kernels need to be fast (0.1B head, one token: 4-bit 1.4 ms
        at level 4, 9.6 ms at level 0, fp32 MatMul 15.6 ms; 8-bit at level 0 falls back to a 270 ms path);
        0 computes in float.
        """
        if embedding_bits not in (None, 8):
            raise ConfigError(f"--embedding-bits must be 8, got {embedding_bits}")
        if head_bits not in (None, 4, 8):
            raise ConfigError(f"--head-bits must be 4 or 8, got {head_bits}")
        if head_accuracy_level not in (0, 4):
            raise ConfigError(f"--head-accuracy-level must be 0 or 4, got {head_accuracy_level}")
        if head_format not in HEAD_FORMATS:
            raise ConfigError(f"unknown head format '{head_format}' (choose from {', '.join(HEAD_FORMATS)})")
        self.embedding_bits, self.head_bits, self.head_accuracy_level = embedding_bits, head_bits, head_accuracy_level
        self.head_format = head_format

    @property
    def head_as_sqmatmul(self) -> bool:
        return self.head_format == "sqmatmul" and self.head_bits in sq_matmul.BITS

    def run(self, graph: gs.Graph, payloads=None) -> PassResult:
        result = PassResult(self.name, phrases=self.phrases)
        replacements: list[tuple[gs.Node, list[gs.Node]]] = []
        emb_constants: list[gs.Constant] = []  # built once, shared by every lookup
        head_constants: list[gs.Constant] = []
        for node in graph.nodes:
            weight = node.inputs[0] if node.op == "Gather" else node.inputs[1] if node.op == "MatMul" else None
            if not isinstance(weight, gs.Constant):
                continue
            if self.embedding_bits and node.op == "Gather" and weight.name == EMBEDDING:
                emb_constants = emb_constants or self._embedding_constants(weight)
                replacements.append((node, self._embedding(node, *emb_constants, to_fp16=is_float16(weight))))
                result.count("embedding")
            elif self.head_bits and node.op == "MatMul" and weight.name == HEAD:
                q = self._head_rtn(weight)
                why_not = sq_matmul.unsupported(q) if self.head_as_sqmatmul else None
                if self.head_as_sqmatmul and why_not is None:
                    replacements.append((node, sqmatmul_nodes(q, HEAD, node, node.inputs[0], node.outputs[0])))
                    result.count("head_sq")
                    continue
                if why_not is not None:
                    result.skipped[HEAD] = f"{why_not}: MatMulNBits instead"
                head_constants = head_constants or matmulnbits_constants(q, HEAD, weight.values.dtype)
                k, n = weight.shape
                attrs = dict(K=k, N=n, bits=self.head_bits, block_size=HEAD_GROUP,
                             accuracy_level=self.head_accuracy_level)
                replacements.append((node, [gs.Node("MatMulNBits", node.name or "head", attrs,
                                                    [node.inputs[0], *head_constants], list(node.outputs),
                                                    domain="com.microsoft")]))
                result.count("head")
        replace_nodes(graph, replacements)
        return result

    @staticmethod
    def _embedding_constants(weight: gs.Constant) -> list[gs.Constant]:
        w = weight.values
        codes, scale = int8_rows(w)
        return [gs.Constant(EMBEDDING + "_q", codes), gs.Constant(EMBEDDING + "_scale", scale.astype(w.dtype))]

    @staticmethod
    def _embedding(node: gs.Node, codes: gs.Constant, scale: gs.Constant, to_fp16: bool) -> list[gs.Node]:
        ids, (out,) = node.inputs[1], node.outputs
        base = node.name or "emb"
        dtype = np.float16 if to_fp16 else np.float32
        q, qf, s = (gs.Variable(out.name + suffix, dtype=d) for suffix, d in
                    (("_q", np.int8), ("_qf", dtype), ("_s", dtype)))
        to = onnx.TensorProto.FLOAT16 if to_fp16 else onnx.TensorProto.FLOAT
        return [gs.Node("Gather", base + "_gather_q", {"axis": 0}, [codes, ids], [q]),
                gs.Node("Cast", base + "_cast", {"to": to}, [q], [qf]),
                gs.Node("Gather", base + "_gather_scale", {"axis": 0}, [scale, ids], [s]),
                gs.Node("Mul", base + "_dequantize", {}, [qf, s], [out])]

    def _head_rtn(self, weight: gs.Constant):
        """Round-to-nearest groups of HEAD_GROUP along the head's input (weight [K, N] as MatMul stores it)."""
        return rtn_quantize(weight.values.T.astype(np.float32),
                            cfg=ScalarConfig(bits=self.head_bits, group_size=HEAD_GROUP))
