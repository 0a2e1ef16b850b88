"""`validate`: does model b compute what model a computes? Two questions, chosen by what the models are.

* **same weights** (a graph and its lowering, an ONNX model and its TensorRT engine): the outputs must
  match elementwise, within a tolerance per output (logits and state separately). Both models get the
  same inputs: the tokens of a prompt with realistic states (taken from running `a` token by token), so
  step graphs are compared at every position, not only from the zero state. Polygraphy's Comparator
  runs both and checks the tolerances.
* **fp vs quantized** (one model quantized, the other not, or quantized differently): quantization error
  is the point, so elementwise tolerances say nothing. Each model runs the prompt from the zero state on
  its own state, and the question is whether the next-token distributions agree: mean and max
  KL(a || b) per token, top-1 agreement, the logit error relative to the logit range, and the relative
  error of the state after the prompt (`agreement.py`).

The mode is chosen from the models' `rwkvq.quantization` metadata (for a `.plan`, that of the ONNX model
named in its `.plan.json`) unless the caller forces it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .agreement import Agreement, agreement
from .checkpoint import ModelConfig
from .errors import ConfigError, MissingDependencyError, RwkvqError
from .names import CONFIG_KEY, GRAPH_KEY, QUANTIZATION_KEY
from .runtime import state_feeds, zero_state

LOGITS = "logits"
STATE_OUTPUTS = ("new_state_att_shift", "new_state_ffn_shift", "new_state_wkv")
OUTPUTS = (LOGITS, *STATE_OUTPUTS)
STATE_INPUTS = ("state_att_shift", "state_ffn_shift", "state_wkv")

SAME, AGREEMENT, AUTO = "same", "agreement", "auto"
MODES = (AUTO, SAME, AGREEMENT)

# Same-weights defaults: the README's Numerics section promises fp32 graphs within 1e-4 absolute of the
# reference and the rwkvq ops within 1e-5 of their lowering; 1e-4 covers both, for logits and state alike.
SAME_ATOL = 1e-4
SAME_RTOL = 1e-4
# fp-vs-quantized defaults. The README bounds 4-bit KL at <= 0.05 nats on a model whose logits reach 17;
# a good ~3 bpw model stays well below 0.1 nats per token and keeps most of its top-1 choices, while a
# broken one (scrambled codes, a scaled codebook) is off by whole nats and agrees on few tokens.
MAX_MEAN_KL = 0.1
MIN_TOP1 = 0.8


@dataclass(frozen=True)
class ModelInfo:
    """What `validate` needs to know about a model file: its config, graph kind and quantization."""

    path: Path
    config: ModelConfig
    graph: str  # "sequence" or "step"
    quantization: str | None  # the rwkvq.quantization metadata (JSON text), None for an fp model


@dataclass
class ValidationResult:
    """Outcome of a same-weights comparison: pass/fail, per-output errors and tolerances."""

    passed: bool
    max_abs: dict[str, float]
    mean_abs: dict[str, float]
    feeds: int
    tolerances: dict[str, tuple[float, float]] = field(default_factory=dict)  # output -> (atol, rtol)
    output_passed: dict[str, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class AgreementResult:
    """Outcome of an fp-vs-quantized comparison over one prompt."""

    passed: bool
    agreement: Agreement
    state_rel_error: float  # max over state outputs of ||a - b|| / ||a||, after the prompt
    max_mean_kl: float
    min_top1: float


def _onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # not a protobuf, truncated...
        raise RwkvqError(f"cannot read ONNX model: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}",
                         path) from None
    return {p.key: p.value for p in model.metadata_props}


def model_info(path: str | Path) -> ModelInfo:
    """Config, graph kind and quantization of an exported .onnx, or of the .onnx a .plan was built from."""
    path = Path(path)
    if not path.is_file():
        raise RwkvqError("no such model", path)
    onnx_path = path
    if path.suffix == ".plan":
        sidecar = Path(str(path) + ".json")
        if not sidecar.is_file():
            raise RwkvqError(f"no {sidecar.name} beside the engine (written by `rwkvq-onnx build-engine`)", path)
        try:
            onnx_path = Path(json.loads(sidecar.read_text())["onnx"])
        except (ValueError, KeyError, TypeError):
            raise RwkvqError(f"{sidecar.name} does not name the engine's source model (an 'onnx' field)",
                             path) from None
        if not onnx_path.is_file():
            raise RwkvqError(f"the engine's source model {onnx_path} (named in {sidecar.name}) is missing", path)
    meta = _onnx_metadata(onnx_path)
    if CONFIG_KEY not in meta:
        raise RwkvqError("not an rwkvq-onnx model (no 'rwkvq.config' metadata; export it with `rwkvq-onnx export`)",
                         onnx_path)
    return ModelInfo(path, ModelConfig(**json.loads(meta[CONFIG_KEY])), meta.get(GRAPH_KEY, "sequence"),
                     meta.get(QUANTIZATION_KEY))


def choose_mode(a: ModelInfo, b: ModelInfo) -> str:
    """`agreement` when the two models are quantized differently (one fp, one quantized...), else `same`."""
    return SAME if a.quantization == b.quantization else AGREEMENT


def _runner(path: Path, name: str):
    """A Polygraphy runner: TensorRT for a .plan (its plugins are serialized in it), onnxruntime otherwise."""
    if path.suffix == ".plan":
        try:
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner
            import tensorrt  # noqa: F401
        except ImportError:
            raise MissingDependencyError("TensorRT", "validating a .plan needs TensorRT and a GPU") from None
        return TrtRunner(EngineFromBytes(path.read_bytes()), name=name)
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from .runtime import open_session

    return OnnxrtRunner(lambda: open_session(path), name=name)


def _polygraphy():
    """Polygraphy's Comparator, its simple compare function and logger (a one-line error when missing)."""
    try:
        from polygraphy import comparator
        from polygraphy.logger import G_LOGGER
    except ImportError:
        raise MissingDependencyError("Polygraphy", "pip install polygraphy (or rwkvq-onnx[deploy])") from None
    # SimpleCompareFunc is the current name; CompareFunc.simple the older one (deprecated since).
    simple = getattr(comparator, "SimpleCompareFunc", None) or comparator.CompareFunc.simple
    return comparator.Comparator, simple, G_LOGGER


def run_own_state(runner, info: ModelInfo, tokens: list[int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Run `tokens` from the zero state on the model's own state: logits [T, V] and the state after them."""
    state = state_feeds(zero_state(info.config))
    with runner:
        if info.graph == "sequence":
            out = runner.infer({"tokens": np.asarray([tokens], np.int64), **state})
            logits = np.asarray(out[LOGITS])[0]
        else:
            rows = []
            for t in tokens:
                out = runner.infer({"token": np.asarray([t], np.int64), **state})
                rows.append(np.asarray(out[LOGITS])[0])
                state = {i: np.asarray(out[o]) for i, o in zip(STATE_INPUTS, STATE_OUTPUTS)}
            logits = np.stack(rows)
    return np.asarray(logits, np.float64), {o: np.asarray(out[o], np.float64) for o in STATE_OUTPUTS}


def state_rel_error(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Largest relative L2 error ||a - b|| / ||a|| over the state tensors (0 when a state is all zeros and equal)."""
    errs = []
    for name in a:
        norm = float(np.linalg.norm(a[name]))
        diff = float(np.linalg.norm(a[name] - b[name]))
        errs.append(diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf")))
    return max(errs) if errs else 0.0


def compare_agreement(a: str | Path, b: str | Path, tokens: list[int], max_mean_kl: float = MAX_MEAN_KL,
                      min_top1: float = MIN_TOP1) -> AgreementResult:
    """fp vs quantized: b passes when its mean KL(a || b) <= max_mean_kl and its top-1 agreement >= min_top1."""
    if not tokens:
        raise ConfigError("validate needs at least one token")
    _polygraphy()
    ia, ib = model_info(a), model_info(b)
    if ia.config.vocab_size != ib.config.vocab_size:
        raise ConfigError(f"the models have different vocabularies ({ia.config.vocab_size} vs {ib.config.vocab_size})")
    la, sa = run_own_state(_runner(ia.path, "a"), ia, tokens)
    lb, sb = run_own_state(_runner(ib.path, "b"), ib, tokens)
    agree = agreement(la, lb)
    passed = agree.mean_kl <= max_mean_kl and agree.top1 >= min_top1
    return AgreementResult(bool(passed), agree, state_rel_error(sa, sb), max_mean_kl, min_top1)


def validation_feeds(reference: str | Path, tokens: list[int]) -> list[dict[str, np.ndarray]]:
    """Feeds for the graph kind of `reference`: per-token (step) with its states, or one block (sequence)."""
    from .runtime import RwkvSession

    sess = RwkvSession(reference, use_step_graph=False, kernels="exact")  # same-weights checks compare exact numerics
    if sess.sequence is not None:
        return [{"tokens": np.asarray([tokens], np.int64), **sess._feeds(sess.zero_state(1))}]
    feeds, state = [], sess.zero_state(1)
    for t in tokens:
        feeds.append({"token": np.asarray([t], np.int64), **sess._feeds(state)})
        _, state = sess.step(np.asarray([t]), state)
    return feeds


def validate(a: str | Path, b: str | Path, tokens: list[int], atol: float = SAME_ATOL, rtol: float = SAME_RTOL,
             stat: str = "max", state_atol: float | None = None, state_rtol: float | None = None) -> ValidationResult:
    """Same weights: run both models through Polygraphy's Comparator on the same feeds.

    `atol`/`rtol` are the logits' tolerances, `state_atol`/`state_rtol` the state outputs' (default: the
    logits' values). An output passes when its `stat` error is within atol or within rtol (Polygraphy's rule).
    """
    Comparator, simple_compare, G_LOGGER = _polygraphy()
    a, b = Path(a), Path(b)
    if not tokens:
        raise ConfigError("validate needs at least one token")
    state_atol = atol if state_atol is None else state_atol
    state_rtol = rtol if state_rtol is None else state_rtol
    tolerances = {LOGITS: (atol, rtol), **{o: (state_atol, state_rtol) for o in STATE_OUTPUTS}}
    feeds = validation_feeds(a, tokens)
    severity = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.CRITICAL  # the verdict is ours, one line per output, not one per feed
    try:
        results = Comparator.run([_runner(a, "a"), _runner(b, "b")], data_loader=feeds)
        func = simple_compare(atol={o: t[0] for o, t in tolerances.items()},
                              rtol={o: t[1] for o, t in tolerances.items()}, check_error_stat=stat)
        accuracy = Comparator.compare_accuracy(results, compare_func=func)
    finally:
        G_LOGGER.module_severity = severity
    max_abs, mean_abs, output_passed = {}, {}, {}
    for out in OUTPUTS:
        pairs = [(np.asarray(ra[out], np.float64), np.asarray(rb[out], np.float64))
                 for ra, rb in zip(results["a"], results["b"]) if out in ra and out in rb]
        if pairs:
            diffs = [np.abs(x - y) for x, y in pairs]
            max_abs[out] = float(max(d.max() for d in diffs))
            mean_abs[out] = float(np.mean([d.mean() for d in diffs]))
    # Polygraphy >= 0.53 returns one AccuracyResult per compare function (a list); older ones a single one.
    for result in ([accuracy] if hasattr(accuracy, "values") else list(accuracy)):
        for iterations in result.values():
            for it in iterations:
                for out, match in it.items():
                    output_passed[out] = output_passed.get(out, True) and bool(match)
    return ValidationResult(bool(accuracy), max_abs, mean_abs, len(feeds), tolerances, output_passed)


def same_weights_lines(res: ValidationResult, stat: str) -> list[str]:
    """A readable table of a same-weights comparison, one line per output, then the verdict."""
    lines = [f"{'output':<22} {'max |a-b|':>10} {'mean |a-b|':>10} {'atol':>8} {'rtol':>8}  result"]
    for out, err in res.max_abs.items():
        atol, rtol = res.tolerances.get(out, (float("nan"), float("nan")))
        ok = res.output_passed.get(out, res.passed)
        lines.append(f"{out:<22} {err:>10.3e} {res.mean_abs[out]:>10.3e} {atol:>8.1e} {rtol:>8.1e}  "
                     f"{'ok' if ok else 'OUT OF TOLERANCE'}")
    lines.append(f"{'PASSED' if res.passed else 'FAILED'} (same weights): {res.feeds} feed(s), "
                 f"error statistic {stat}")
    return lines


def agreement_lines(res: AgreementResult) -> list[str]:
    """A readable table of an fp-vs-quantized comparison, then the verdict."""
    g = res.agreement
    kl_ok, top1_ok = g.mean_kl <= res.max_mean_kl, g.top1 >= res.min_top1
    lines = [
        f"{'measure (b against a)':<34} {'value':>10}  limit",
        f"{'mean KL(a||b) per token, nats':<34} {g.mean_kl:>10.4g}  <= {res.max_mean_kl:g}{'' if kl_ok else '  FAIL'}",
        f"{'max KL(a||b) per token, nats':<34} {g.max_kl:>10.4g}",
        f"{'top-1 agreement':<34} {g.top1:>10.1%}  >= {res.min_top1:.0%}{'' if top1_ok else '  FAIL'}",
        f"{'max |logit error| / logit range':<34} {g.rel_logit_error:>10.4g}",
        f"{'state relative error (L2)':<34} {res.state_rel_error:>10.4g}",
        f"{'PASSED' if res.passed else 'FAILED'} (fp vs quantized): {g.tokens} tokens",
    ]
    return lines
