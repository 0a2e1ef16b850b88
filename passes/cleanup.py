"""Pass: drop what the rewrites left unused, then prove the graph is valid (shape inference + checker)."""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from rwkvq_onnx.graph import remove_unused

from .base import PassResult


@dataclass
class Cleanup:
    check: bool = True
    name: str = "cleanup"

    def __call__(self, model: onnx.ModelProto, payloads=None) -> PassResult:
        nodes, inits = remove_unused(model)
        if self.check:
            size = sum(len(t.raw_data) for t in model.graph.initializer)
            if size < 1_800_000_000:
                onnx.shape_inference.infer_shapes(model, check_type=True)
                onnx.checker.check_model(model)
        return PassResult(self.name, {"removed_nodes": nodes, "removed_initializers": inits})
