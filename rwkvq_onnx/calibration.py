"""Calibration statistics from the exported sequence graph, run in onnxruntime.

The graph is the single source of truth: the input of every weight `MatMul`
and the activation multiplied by every element-wise checkpoint vector are
exposed as extra graph outputs, calibration windows are streamed through
onnxruntime one at a time, and per-weight statistics are accumulated
(never all activations at once):

- linear weights: H = 2/n X^T X over all calibration tokens (float64);
- element-wise vectors: mean squared activation per element.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from .errors import CalibrationError
from .evaluate import read_documents
from .graph import consumers
from .names import EXCLUDED_LINEAR, is_elementwise_vector
from .tokenizers import Tokenizer


@dataclass(frozen=True)
class LinearTarget:
    weight: str  # initializer name = checkpoint key
    activation: str  # tensor feeding the MatMul
    shape: tuple[int, int]  # [N out, K in] (nn.Linear layout)


@dataclass(frozen=True)
class ElementwiseTarget:
    vector: str
    activation: str  # the tensor the vector multiplies
    shape: tuple[int, ...]


@dataclass
class CalibrationStats:
    hessians: dict[str, np.ndarray] = field(default_factory=dict)
    act_sq: dict[str, np.ndarray] = field(default_factory=dict)
    tokens: int = 0
    samples: int = 0


def find_targets(model: onnx.ModelProto, include_head: bool = False) -> tuple[list[LinearTarget], list[ElementwiseTarget]]:
    """Weight MatMuls (2-D checkpoint weights) and element-wise Muls by checkpoint vectors, by name."""
    inits = {t.name: t for t in model.graph.initializer}
    linear, elementwise = [], []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and node.input[1].startswith(("blocks.", "head.")):
            t = inits[node.input[1]]
            if len(t.dims) != 2 or (node.input[1] in EXCLUDED_LINEAR and not include_head):
                continue
            linear.append(LinearTarget(node.input[1], node.input[0], (int(t.dims[1]), int(t.dims[0]))))
    users = consumers(model)
    for name, t in inits.items():
        if not name.startswith("blocks.") or len(t.dims) not in (1, 2) or not is_elementwise_vector(name):
            continue
        act = multiplied_activation(model, name, users)
        if act is not None:
            elementwise.append(ElementwiseTarget(name, act, tuple(int(d) for d in t.dims)))
    return linear, elementwise


def multiplied_activation(model: onnx.ModelProto, vector: str, users=None) -> str | None:
    """The activation a vector multiplies: `Mul(a, v)` directly, or `Mul(a, Add(v, m))` (RWKV-6 maa)."""
    users = users if users is not None else consumers(model)
    for node in users.get(vector, []):
        if node.op_type == "Mul":
            return node.input[0] if node.input[1] == vector else node.input[1]
        if node.op_type == "Add":
            for mul in users.get(node.output[0], []):
                if mul.op_type == "Mul":
                    return mul.input[0] if mul.input[1] == node.output[0] else mul.input[1]
    return None


def calibration_windows(path: str | Path, tokenizer: Tokenizer, nsamples: int, seqlen: int,
                        seed: int = 0) -> np.ndarray:
    """`nsamples` random windows of `seqlen` tokens from a text or jsonl file (seeded), int64 [n, seqlen]."""
    if nsamples < 1 or seqlen < 2:
        raise CalibrationError(f"need --nsamples >= 1 and --seqlen >= 2 (got {nsamples}, {seqlen})")
    docs = read_documents(path)
    stream: list[int] = []
    for d in docs:
        if tokenizer.bos is not None:
            stream.append(tokenizer.bos)
        stream.extend(tokenizer.encode(d))
    if len(stream) < seqlen:
        raise CalibrationError(f"too short for calibration: {len(stream)} tokens, need at least --seqlen {seqlen}",
                               path)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(stream) - seqlen + 1, size=nsamples)
    arr = np.asarray(stream, dtype=np.int64)
    return np.stack([arr[s:s + seqlen] for s in starts])


def _augmented(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for n in dict.fromkeys(names):
        if n not in existing:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    return m


def collect_statistics(model: onnx.ModelProto, windows: np.ndarray, linear: list[LinearTarget],
                       elementwise: list[ElementwiseTarget], progress: bool = True,
                       session_factory=None) -> CalibrationStats:
    """Run every window through the graph with the activations exposed and accumulate statistics."""
    from .runtime import open_session_from_model

    acts = [t.activation for t in linear] + [t.activation for t in elementwise]
    aug = _augmented(model, acts)
    session = (session_factory or open_session_from_model)(aug)
    out_names = [o.name for o in session.get_outputs()]
    cfg_inputs = {i.name: i for i in session.get_inputs()}
    stats = CalibrationStats()
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for w in tqdm(windows, desc="calibrate", unit="sample", disable=None if progress else True):
        feeds = {"tokens": w[None]}
        for name in ("state_att_shift", "state_ffn_shift", "state_wkv"):
            shape = [1 if isinstance(d, str) or d is None else d for d in cfg_inputs[name].shape]
            feeds[name] = np.zeros(shape, np.float32)
        values = dict(zip(out_names, session.run(out_names, feeds)))
        for t in linear:
            x = values[t.activation].reshape(-1, t.shape[1]).astype(np.float64)
            sums[t.weight] = sums.get(t.weight, 0) + x.T @ x
            counts[t.weight] = counts.get(t.weight, 0) + x.shape[0]
        for t in elementwise:
            n = int(np.prod(t.shape))
            a = values[t.activation].astype(np.float64).reshape(-1, n)
            sums[t.vector] = sums.get(t.vector, 0) + (a * a).sum(axis=0)
            counts[t.vector] = counts.get(t.vector, 0) + a.shape[0]
        stats.tokens += int(w.size)
        stats.samples += 1
    for t in linear:
        stats.hessians[t.weight] = 2.0 * sums[t.weight] / counts[t.weight]
    for t in elementwise:
        stats.act_sq[t.vector] = (sums[t.vector] / counts[t.vector]).reshape(t.shape)
    return stats
