"""One module per `rwkvq` custom op: its attributes, validation, packing, numpy reference and standard-op lowering.

Every place that knows an op (the quantizer's rewrite pass, the standard-ONNX
lowering, onnxruntime registration, TensorRT preparation and plugins, the
kernel tests) reads it from its module here:

    vq_matmul       rwkvq.VQMatMul(x, codes, codebooks, scales) -> x @ W^T
    vq_elementwise  rwkvq.VQElementwise(x, codes, codebook)     -> x * v
    sq_matmul       rwkvq.SQMatMul(x, codes, scales, zero_points) -> x @ W^T (packed 2/3/4-bit scalar W)
    wkv7_step       rwkvq.WKV7Step(state, r, w, k, v, a, b)     -> (y, new_state), one RWKV-7 recurrence step
    wkv7_sequence   rwkvq.WKV7Sequence(state, r, w, k, v, a, b) -> (y, new_state), that step over T tokens
    bitpack         the bit-packer all packed formats share

Importing this package needs numpy only (no torch, no graphsurgeon), so the
runtime can use the references.
"""
from rwkvq_onnx.names import DOMAIN, OPSET_VERSION

from . import sq_matmul, vq_elementwise, vq_matmul, wkv7_sequence, wkv7_step

SPECS = {spec.OP_TYPE: spec  # op type -> its spec module
         for spec in (vq_matmul, vq_elementwise, sq_matmul, wkv7_step, wkv7_sequence)}

__all__ = ["DOMAIN", "OPSET_VERSION", "SPECS", "sq_matmul", "vq_elementwise", "vq_matmul", "wkv7_sequence",
           "wkv7_step"]
