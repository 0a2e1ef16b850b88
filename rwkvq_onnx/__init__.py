"""rwkvq-onnx: RWKV-6/7 checkpoints to ONNX, ~3-bit RWKVQuant quantization, CPU and TensorRT deployment."""

__version__ = "0.1.0"
