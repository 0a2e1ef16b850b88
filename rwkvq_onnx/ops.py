"""Deprecated: the `rwkvq` ops moved to `rwkvq_onnx.opspec` (one module per op) and the domain to `rwkvq_onnx.names`.

Kept only for `tensorrt_build.py`, which reads `ops.DOMAIN` until it is
switched to the spec modules; nothing else may import this module.
"""
from .names import DOMAIN, OPSET_VERSION

__all__ = ["DOMAIN", "OPSET_VERSION"]
