"""ONNX-to-ONNX graph passes (installed as `rwkvq_onnx.passes`)."""
