"""Names the whole project agrees on: the custom-op domain, the ONNX metadata keys, and the RWKV weight-name tables.

Everything that spells one of these (export, calibration, quantize, the
passes, runtime, the deploy tools) imports it from here, so a rename is one
edit and a typo is an import error instead of a silent mismatch.
"""
from __future__ import annotations

# ---- the custom-op domain -------------------------------------------------------------------------------
DOMAIN = "rwkvq"  # ONNX domain of the project's custom ops (also the TensorRT plugin namespace)
OPSET_VERSION = 1  # version of that domain's opset

# ---- ONNX metadata keys (model.metadata_props) ----------------------------------------------------------
CONFIG_KEY = "rwkvq.config"  # ModelConfig as JSON, written by export; its presence marks an rwkvq-onnx model
GRAPH_KEY = "rwkvq.graph"  # "sequence" or "step"
DTYPE_KEY = "rwkvq.dtype"  # "float32" or "float16": the graph's activation dtype
QUANTIZATION_KEY = "rwkvq.quantization"  # JSON: method, bpw and options, written by quantize
PAIR_ID_KEY = "rwkvq.pair_id"  # written by export and quantize into both graphs of a pair: a digest of their weights
OPS_KEY = "rwkvq.ops"  # comma-separated rwkvq op types a graph needs a custom-op library for

# ---- RWKV weight-name tables (checkpoint keys; the exported graphs name their initializers the same) ----
# The sequence graph's optional input: the first position whose logits it computes (ONNX Slice semantics, so -1 is
# the last position alone); an initializer of value [0] (every position) that a caller may override.
LOGITS_FROM = "logits_from"
EMBEDDING = "emb.weight"
HEAD = "head.weight"

# nn.Linear weights: stored [out, in] in the checkpoint, transposed to MatMul's [in, out] in the graph
LINEAR_SUFFIXES = ("receptance.weight", "key.weight", "value.weight", "output.weight", "gate.weight", HEAD)
# linear weights the quantizer leaves alone unless asked (the head has its own pass)
EXCLUDED_LINEAR = (HEAD,)
# weights consumed in the float32 part of an fp16 graph (norms, decay), which stay float32 there
FP32_SUFFIXES = ("ln0.weight", "ln0.bias", "ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias",
                 "ln_x.weight", "ln_x.bias", "ln_out.weight", "ln_out.bias", "att.w0",
                 "att.time_decay", "att.time_faaaa")

# per-channel vectors that multiply activations element-wise (token-shift mixes, k_k, ...)
ELEMENTWISE_SUFFIXES = ("att.x_r", "att.x_w", "att.x_k", "att.x_v", "att.x_a", "att.x_g", "ffn.x_k",
                        "att.k_k", "att.k_a", "att.r_k", "att.time_maa_x", "att.time_maa_w", "att.time_maa_k",
                        "att.time_maa_v", "att.time_maa_r", "att.time_maa_g", "ffn.time_maa_k",
                        "ffn.time_maa_r")


def is_linear_weight(key: str) -> bool:
    """Whether a checkpoint key is an nn.Linear weight ([out, in] in the checkpoint, [in, out] in ONNX)."""
    return key.endswith(LINEAR_SUFFIXES)


def is_elementwise_vector(key: str) -> bool:
    """Token-shift mixes, k_k, k_a, r_k (v7) and time_maa_* (v6): the paper's element-wise vectors."""
    return key.endswith(ELEMENTWISE_SUFFIXES)
