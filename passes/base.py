"""What passes share: what each reports, and the MatMul-rewrite helpers."""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx


@dataclass
class PassResult:
    """Counts of what a pass did, and what it skipped with the reason."""

    name: str
    counts: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def line(self) -> str:
        parts = [f"{k} {v}" for k, v in self.counts.items()]
        if self.skipped:
            parts.append(f"skipped {len(self.skipped)}")
        return f"{self.name}: " + (", ".join(parts) if parts else "nothing to do")


def weight_matmul(node: onnx.NodeProto, weights) -> str | None:
    """The weight of a `MatMul(x, W)` node when W is one of `weights` (the nodes rewrite passes replace)."""
    if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in weights:
        return node.input[1]
    return None


def rewrite_weight_matmuls(model: onnx.ModelProto, weights, replace) -> None:
    """Swap every `MatMul(x, W)` whose W is in `weights` (and an initializer) for the nodes `replace(node, W)` returns."""
    inits = {t.name for t in model.graph.initializer}
    new_nodes = []
    for node in model.graph.node:
        w = weight_matmul(node, weights)
        new_nodes.extend(replace(node, w) if w is not None and w in inits else [node])
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
