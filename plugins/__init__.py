"""CUDA kernels and TensorRT plugin definitions for the rwkvq ops (installed as `rwkvq_onnx.plugins`)."""
