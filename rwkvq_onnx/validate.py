"""`validate`: compare two models' outputs with Polygraphy (onnxruntime with the rwkvq ops, or TensorRT).

The same inputs go to both: the tokens of a prompt with realistic states
(taken from running the first model token by token), so step graphs are
compared at every position, not only from the zero state. Tolerances are the
caller's: 1e-5 for a graph and its lowering, 1e-4 for fp32 export vs
reference, looser for fp vs quantized (quantization error is the point).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError, MissingDependencyError
from .runtime import RwkvSession, open_session

OUTPUTS = ("logits", "new_state_att_shift", "new_state_ffn_shift", "new_state_wkv")


@dataclass
class ValidationResult:
    passed: bool
    max_abs: dict[str, float]
    mean_abs: dict[str, float]
    feeds: int


def validation_feeds(reference: str | Path, tokens: list[int]) -> list[dict[str, np.ndarray]]:
    """Feeds for the graph kind of `reference`: per-token (step) or one block (sequence)."""
    sess = RwkvSession(reference, use_step_graph=False)
    if sess.sequence is not None:
        return [{"tokens": np.asarray([tokens], np.int64), **sess._feeds(sess.zero_state(1))}]
    feeds, state = [], sess.zero_state(1)
    for t in tokens:
        feeds.append({"token": np.asarray([t], np.int64), **sess._feeds(state)})
        _, state = sess.step(np.asarray([t]), state)
    return feeds


def _runner(path: Path, name: str):
    if path.suffix == ".plan":
        try:
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner
            import tensorrt  # noqa: F401
        except ImportError:
            raise MissingDependencyError("TensorRT", "validating a .plan needs TensorRT and a GPU") from None
        from .plugins.trt_plugins import register_plugins

        register_plugins()
        return TrtRunner(EngineFromBytes(path.read_bytes()), name=name)
    from polygraphy.backend.onnxrt import OnnxrtRunner

    return OnnxrtRunner(lambda: open_session(path), name=name)


def validate(a: str | Path, b: str | Path, tokens: list[int], atol: float, rtol: float,
             stat: str = "max") -> ValidationResult:
    """Run both models through Polygraphy's Comparator; pass when every output is within tolerance."""
    try:
        from polygraphy.comparator import Comparator
    except ImportError:
        raise MissingDependencyError("Polygraphy", "pip install polygraphy (or rwkvq-onnx[deploy])") from None
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING
    a, b = Path(a), Path(b)
    if not tokens:
        raise ConfigError("validate needs at least one token")
    feeds = validation_feeds(a, tokens)
    results = Comparator.run([_runner(a, "a"), _runner(b, "b")], data_loader=feeds)
    try:
        from polygraphy.comparator import SimpleCompareFunc as simple
    except ImportError:  # Polygraphy < 0.50
        from polygraphy.comparator import CompareFunc

        simple = CompareFunc.simple
    accuracy = Comparator.compare_accuracy(results, compare_func=simple(atol=atol, rtol=rtol, check_error_stat=stat))
    max_abs, mean_abs = {}, {}
    for out in OUTPUTS:
        diffs = [np.abs(np.asarray(ra[out], np.float64) - np.asarray(rb[out], np.float64))
                 for ra, rb in zip(results["a"], results["b"]) if out in ra and out in rb]
        if diffs:
            max_abs[out] = float(max(d.max() for d in diffs))
            mean_abs[out] = float(np.mean([d.mean() for d in diffs]))
    return ValidationResult(bool(accuracy), max_abs, mean_abs, len(feeds))
