"""`quantize`: calibrate an exported graph in onnxruntime, plan, apply the plan, lower the payloads.

Four steps with one contract each:
1. calibration statistics (Hessians, mean squared activations) from onnxruntime;
2. the plan (`rwkvq_onnx.quant.policy`): weight name -> method config, with the
   policy's reasons, or a saved plan read back with `--recipe`;
3. `apply_plan` (pure): weights + statistics -> `Payloads`; `--sequential`
   applies it block by block, re-calibrating each block on the already
   quantized blocks before it;
4. `lower_payloads` writes the payloads into the sequence graph and, when
   IN.onnx has a `.step.onnx` sibling, into OUT.step.onnx.

The plan is saved beside the model (OUT.plan.json) with the options that made
it; `quantize --recipe OUT.plan.json` reproduces the same model byte for byte.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .atomic import check_writable, write_text
from .calibration import CalibrationStats, calibration_windows, collect_statistics, find_targets
from .errors import ConfigError
from .export import output_files, read_config, save_pair, step_path
from .graph import rwkvq_ops, set_initializer
from .names import DOMAIN, EMBEDDING, GRAPH_KEY, HEAD, OPS_KEY, QUANTIZATION_KEY
from .paths import check_distinct, model_files, require_file
from .passes.base import PassResult
from .passes.layer_indexed_wkv_state import LayerIndexedWkvState
from .passes.pipeline import EXPORT_OPS, LoweringOptions, lower_payloads
from .passes.quantize_embedding_head import QuantizeEmbeddingHead
from .quant import ElementwiseConfig, GPTQConfig, VQConfig, model_bpw
from .quant.apply import apply_plan, dequantized, tensor_rows
from .quant.formats import Payloads
from .quant.plan import ALGORITHM_CONFIG, Plan
from .quant.policy import (ACCOUNTINGS, RANKINGS, mse_gain, plan_by_thresholds, plan_for_budget, plan_uniform,
                           ranking_scores, weight_proxies)
from .quant.rotate import rotate_lora
from .tokenizers import get_tokenizer

POLICIES = ("rwkvquant", *ALGORITHM_CONFIG)


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything `quantize` takes besides its paths; the defaults are the CLI's defaults."""

    method: str = "rwkvquant"
    bpw: float | None = None  # target over the linear weights, in `bpw_accounting`
    bpw_accounting: str = "stored"  # stored: the payload's bits; paper: 32 bits of scale+zero per scalar group
    wbits: int = 3
    group_size: int = 128  # 3 bits in asymmetric groups of 128 = 3.25 bpw as the paper counts
    symmetric: bool = False  # the authors' GPTQ: asymmetric min-max groups
    act_order: bool = False
    vq_dim: int = 2
    vq_bits: int | None = None  # None: wbits
    vq_bpw: float = 3.5  # rwkvquant holds every VQ weight at this cost (paper: 3.5)
    vq_group_cols: int = 256
    vq_group_rows: int = 0  # 0: the fewest rows that keep VQ within vq_bpw (or the --bpw of a VQ baseline)
    kmeans_iters: int = 25
    m_step: bool = True
    tau_c: float = 1.5
    tau_f: float = 50.0
    calib: str | None = None
    nsamples: int = 64  # what the README quality tables use
    seqlen: int = 256
    seed: int = 0
    sequential: bool = False
    elementwise: bool | None = None  # None: on for rwkvquant only
    elementwise_bits: int = 4
    elementwise_percentile: float = 99.0
    fold_elementwise: bool = False
    sq_format: str = "sqmatmul"
    lower_vq: bool = False
    tokenizer: str | None = None
    ranking: str = "proxy"  # ablations: coarse | fine | variance | range | mse
    elementwise_weighted: bool = True  # False: plain k-means codebooks (ablation of the activation weighting)
    rotate_lora: bool = False  # Hadamard-rotate RWKV-7's a1/a2 and v1/v2 LoRA pairs before calibration
    embedding_bits: int | None = None  # 8: int8 embedding rows (kept in full precision when None)
    head_bits: int | None = None  # 4 (SQMatMul with sq_format sqmatmul, else MatMulNBits) or 8 (MatMulNBits); None keeps it
    head_accuracy_level: int = 4  # MatMulNBits accuracy_level of the head: 4 int8 activations (fast), 0 float
    recipe: str | None = None  # a saved plan (OUT.plan.json): its recorded options replace these
    progress: bool = True

    def validate(self) -> None:
        if self.method not in POLICIES:
            raise ConfigError(f"unknown method '{self.method}' (choose from {', '.join(POLICIES)})")
        if self.bpw is not None and not 1.0 < self.bpw < 16.0:
            raise ConfigError(f"--bpw must be greater than 1 and less than 16, got {self.bpw}")
        if self.bpw_accounting not in ACCOUNTINGS:
            raise ConfigError(f"--bpw-accounting must be one of {', '.join(ACCOUNTINGS)}, got {self.bpw_accounting}")
        if self.ranking not in RANKINGS:
            raise ConfigError(f"unknown ranking '{self.ranking}' (choose from {', '.join(RANKINGS)})")
        if self.ranking != "proxy" and (self.method != "rwkvquant" or not self.bpw):
            raise ConfigError("--ranking other than 'proxy' needs --method rwkvquant and a --bpw target "
                              "(it orders weights, it has no threshold)")
        if self.ranking == "mse" and self.sequential:
            raise ConfigError("--ranking mse needs the full calibration statistics up front; drop --sequential")
        if self.vq_group_rows < 0:
            raise ConfigError(f"--vq-group-rows must be >= 0, got {self.vq_group_rows}")
        needs_h = self.method in ("rwkvquant", "gptq", "awq", "gptvq")
        if needs_h and not self.calib:
            raise ConfigError(f"--method {self.method} needs calibration data: pass --calib FILE")
        self.sq_config()
        self.vq_config()
        QuantizeEmbeddingHead(self.embedding_bits, self.head_bits, self.head_accuracy_level)  # checks them

    def use_elementwise(self) -> bool:
        return self.method == "rwkvquant" if self.elementwise is None else self.elementwise

    def sq_config(self) -> GPTQConfig:
        return GPTQConfig(bits=self.wbits, group_size=self.group_size, symmetric=self.symmetric,
                          act_order=self.act_order)

    def vq_config(self) -> VQConfig:
        if self.method not in ("rwkvquant", "gptvq", "kmeans"):
            return VQConfig()  # unused by scalar methods: their --wbits is not a VQ index width
        bits = self.vq_bits or self.wbits
        try:
            return VQConfig(bits=bits, dim=self.vq_dim, kmeans_iters=self.kmeans_iters, group_cols=self.vq_group_cols,
                            group_rows=self.vq_group_rows or 16, m_step=self.m_step, seed=self.seed)
        except ConfigError as exc:  # name the flags that made the VQ layout
            raise ConfigError(f"--method {self.method} with --wbits {bits} and --vq-dim {self.vq_dim}: {exc}") from None

    def vq_cost_cap(self) -> float | None:
        """The bpw every VQ weight is held at (None: --vq-group-rows fixes the blocks instead)."""
        if self.vq_group_rows:
            return None
        return self.bpw if self.method in ("gptvq", "kmeans") else self.vq_bpw

    def elementwise_config(self) -> ElementwiseConfig:
        return ElementwiseConfig(bits=self.elementwise_bits, percentile=self.elementwise_percentile,
                                 weighted=self.elementwise_weighted)


def options_json(opts: QuantizeOptions) -> dict:
    """The options that determine the model (recorded in its metadata and in its plan)."""
    return {f.name: getattr(opts, f.name) for f in fields(opts) if f.name not in ("progress", "recipe")}


def options_from_recipe(plan: Plan, opts: QuantizeOptions, source: str) -> QuantizeOptions:
    """The options a saved plan was made with (unknown keys are an error; missing keys keep their defaults)."""
    recorded = plan.policy.get("options")
    if not isinstance(recorded, dict):
        raise ConfigError(f"{source}: the plan records no options")
    known = {f.name for f in fields(QuantizeOptions)}
    unknown = sorted(set(recorded) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {unknown} in the plan")
    return replace(QuantizeOptions(**recorded), recipe=opts.recipe, progress=opts.progress)


def plan_path(out_path: str | Path) -> Path:
    """Where the plan of OUT.onnx is saved: OUT.plan.json."""
    p = Path(out_path)
    stem = p.name[: -len(".onnx")] if p.name.endswith(".onnx") else p.name
    return p.with_name(stem + ".plan.json")


def make_plan(opts: QuantizeOptions, weights: dict[str, np.ndarray], stats: CalibrationStats | None,
              vectors: list[str]) -> Plan:
    """The policy's plan for these weights ([N, K] layout) and element-wise vectors."""
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    proxy = weight_proxies(weights)
    sq, vq = opts.sq_config(), opts.vq_config()
    recorded = {"options": options_json(opts)}
    if opts.method != "rwkvquant":
        plan = plan_uniform(opts.method, shapes, sq, vq, opts.bpw if opts.method not in ("gptvq", "kmeans")
                            or not opts.vq_group_rows else None, opts.bpw_accounting, proxy, recorded)
    elif opts.bpw is None:
        plan = plan_by_thresholds(shapes, proxy, sq, vq, opts.tau_c, opts.tau_f, opts.vq_cost_cap(), recorded)
    else:
        scores = None
        if opts.ranking != "proxy":
            mse = None
            if stats is not None:
                mse = lambda n: mse_gain(weights[n], stats.hessians[n], sq, vq)  # noqa: E731
            scores = ranking_scores(opts.ranking, weights, proxy, opts.tau_c, opts.tau_f, mse)
        plan = plan_for_budget(shapes, proxy, opts.bpw, sq, vq, opts.vq_cost_cap(), scores, opts.bpw_accounting,
                               opts.tau_c, opts.tau_f, recorded)
    if opts.use_elementwise():
        plan = replace(plan, elementwise={v: opts.elementwise_config() for v in vectors})
    return plan


@dataclass
class QuantizeResult:
    outputs: list[Path]
    report: dict
    plan: Plan | None = None
    passes: list[PassResult] = field(default_factory=list)


def lowering_options(opts: QuantizeOptions) -> LoweringOptions:
    """How the payloads are written into the graphs."""
    return LoweringOptions(opts.sq_format, opts.fold_elementwise, opts.lower_vq, opts.embedding_bits,
                           opts.head_bits, opts.head_accuracy_level)


def _identity_stats(weights: dict[str, np.ndarray]) -> CalibrationStats:
    stats = CalibrationStats()
    for name, w in weights.items():
        stats.hessians[name] = np.eye(w.shape[1])
    return stats


def _merge(a: Payloads, b: Payloads) -> Payloads:
    """Both payload sets in one, in name order (as `apply_plan` returns them)."""
    def both(x: dict, y: dict) -> dict:
        return dict(sorted({**x, **y}.items()))

    return Payloads(both(a.linear, b.linear), both(a.input_scales, b.input_scales),
                    both(a.elementwise, b.elementwise))


def _apply_sequentially(model: onnx.ModelProto, plan: Plan, weights: dict[str, np.ndarray], windows: np.ndarray,
                        linear, elementwise, log) -> tuple[Payloads, CalibrationStats]:
    """GPTQ-style: calibrate each block with the blocks before it already quantized, apply its sub-plan."""
    calib_model = onnx.ModelProto()
    calib_model.CopyFrom(model)
    stats = CalibrationStats()
    payloads = Payloads()
    layers = sorted({int(t.weight.split(".")[1]) for t in linear})
    for layer in layers:
        block = [t for t in linear if t.weight.startswith(f"blocks.{layer}.")]
        part = collect_statistics(calib_model, windows, block, elementwise if layer == layers[0] else [],
                                  progress=False)
        stats.hessians.update(part.hessians)
        stats.act_sq.update(part.act_sq)
        stats.tokens, stats.samples = part.tokens, part.samples
        names = {t.weight for t in block}
        payloads = _merge(payloads, apply_plan(plan.subset(names), {n: weights[n] for n in names}, stats.hessians))
        for n in names:  # later blocks now see this block's quantized weights
            set_initializer(calib_model, n, dequantized(payloads, n).T.astype(np.float32))
        log(f"  sequential: block {layer} quantized ({len(block)} weights)")
    return payloads, stats


def rotate_model_lora(model: onnx.ModelProto, seed: int) -> list[str]:
    """Fold the Hadamard rotation of the linear-only LoRA pairs into the graph's initializers (see quant/rotate.py)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    rotated = rotate_lora(inits, seed)
    for name, array in rotated.items():
        set_initializer(model, name, array)
    return sorted(rotated)


def initializer_bytes(model: onnx.ModelProto, prefix_names: set[str] | None = None) -> int:
    total = 0
    for t in model.graph.initializer:
        if prefix_names is None or any(t.name == n or t.name.startswith(n + "_") for n in prefix_names):
            total += len(t.raw_data) if t.raw_data else onnx.numpy_helper.to_array(t).nbytes
    return total


def _load_recipe(opts: QuantizeOptions) -> tuple[Plan, QuantizeOptions]:
    path = Path(opts.recipe)
    if not path.is_file():
        raise ConfigError("no such plan file", path)
    plan = Plan.from_json(path.read_text(), str(path))
    return plan, options_from_recipe(plan, opts, str(path))


def _check_plan_matches(plan: Plan, weights: dict[str, np.ndarray], vectors: list[str], source: str) -> None:
    for e in plan.entries:
        if e.name not in weights:
            raise ConfigError(f"{source}: the plan names {e.name}, which is not a linear weight of this model")
        if tuple(weights[e.name].shape) != e.shape:
            raise ConfigError(f"{source}: {e.name} is {list(weights[e.name].shape)} here, {list(e.shape)} in the plan")
    missing = sorted(set(weights) - {e.name for e in plan.entries})
    if missing:
        raise ConfigError(f"{source}: the plan has no entry for {missing[0]} ({len(missing)} weight(s) missing)")
    extra = sorted(set(plan.elementwise) - set(vectors))
    if extra:
        raise ConfigError(f"{source}: the plan names element-wise vector {extra[0]}, which this model lacks")


def quantize_model(in_path: str | Path, out_path: str | Path, opts: QuantizeOptions,
                   report_path: str | Path | None = None, log=print) -> QuantizeResult:
    """Quantize IN.onnx (and its step sibling) into OUT.onnx (and OUT.step.onnx) and save OUT.plan.json."""
    recipe = None
    if opts.recipe:
        recipe, opts = _load_recipe(opts)
    opts.validate()
    in_path, out_path = Path(in_path), Path(out_path)
    require_file(in_path, "ONNX model", ConfigError)
    check_writable(out_path)
    check_writable(plan_path(out_path))
    if report_path:
        check_writable(report_path)
    check_distinct([*model_files(in_path), *model_files(step_path(in_path)), opts.recipe],
                   [*output_files(out_path), plan_path(out_path), report_path])
    t0 = time.perf_counter()
    try:
        model = onnx.load(in_path)
    except Exception as exc:
        raise ConfigError(f"cannot read ONNX model: {str(exc).splitlines()[0] if str(exc) else exc}", in_path) from None
    # rwkvq ops other than the recurrence export writes (WKV7Sequence / WKV7Step) come from quantize
    if any(n.domain == DOMAIN and n.op_type not in EXPORT_OPS for n in model.graph.node) or any(
            n.op_type in ("DequantizeLinear", "MatMulNBits") for n in model.graph.node):
        raise ConfigError("model is already quantized: quantize the fp export", in_path)
    config = read_config(model, in_path)
    props = {p.key: p.value for p in model.metadata_props}
    if props.get(GRAPH_KEY) == "step":
        raise ConfigError("quantize needs the sequence graph (OUT.onnx), not the step graph", in_path)
    if opts.rotate_lora:
        log(f"rotate-lora: {len(rotate_model_lora(model, opts.seed))} LoRA matrices rotated")
    linear, elementwise = find_targets(model)
    if not opts.use_elementwise():
        elementwise = []
    inits = {t.name: t for t in model.graph.initializer}
    weights = {t.weight: numpy_helper.to_array(inits[t.weight]).astype(np.float32).T.copy() for t in linear}
    vectors = {t.vector: numpy_helper.to_array(inits[t.vector]) for t in elementwise}
    if recipe is not None:
        _check_plan_matches(recipe, weights, list(vectors), str(opts.recipe))

    windows = None
    if opts.calib:
        tokenizer = get_tokenizer(opts.tokenizer, config.vocab_size)
        windows = calibration_windows(opts.calib, tokenizer, opts.nsamples, opts.seqlen, opts.seed)
        log(f"calibration: {len(windows)} windows x {opts.seqlen} tokens from {opts.calib}")
    stats = None
    if windows is not None and not opts.sequential:
        stats = collect_statistics(model, windows, linear, elementwise, progress=opts.progress)
    elif windows is None:
        stats = _identity_stats(weights)

    plan = recipe if recipe is not None else make_plan(opts, weights, stats, list(vectors))
    log(plan_summary(plan))
    if opts.sequential and windows is not None:
        payloads, stats = _apply_sequentially(model, plan, weights, windows, linear, elementwise, log)
        payloads = _merge(payloads, apply_plan(replace(plan, entries=()), {}, {}, vectors, stats.act_sq))
    else:
        payloads = apply_plan(plan, weights, stats.hessians, vectors, stats.act_sq, progress=opts.progress)
    rows = tensor_rows(plan, payloads, weights, stats.hessians, vectors, stats.act_sq)

    graphs = [(model, out_path)]
    sibling = step_path(in_path)
    if sibling.is_file():
        graphs.append((onnx.load(sibling), step_path(out_path)))
        # a step graph exported before the WKV state pass gets it here (a no-op on current exports)
        LayerIndexedWkvState()(graphs[-1][0])
        if opts.rotate_lora:
            rotate_model_lora(graphs[-1][0], opts.seed)
    meta = {"method": opts.method, "bpw": model_bpw(payloads.linear), "options": options_json(opts)}
    results = lower_payloads([g for g, _ in graphs], payloads, lowering_options(opts), log=log)
    for g, _ in graphs:
        onnx.helper.set_model_props(g, {**{p.key: p.value for p in g.metadata_props},
                                        QUANTIZATION_KEY: json.dumps(meta, sort_keys=True),
                                        OPS_KEY: rwkvq_ops(g)})
    written = save_pair(graphs)
    write_text(plan_path(out_path), plan.to_json())
    written.append(plan_path(out_path))
    report = build_report(in_path, out_path, model, plan, payloads, rows, stats, opts, config,
                          time.perf_counter() - t0)
    if report_path:
        write_text(report_path, json.dumps(report, indent=2, sort_keys=True) + "\n")
    return QuantizeResult(written, report, plan, results)


def plan_summary(plan: Plan) -> str:
    """One readable line: how many weights (and what share of the parameters) go to SQ and to VQ."""
    s = plan.share()
    mode = plan.policy.get("mode", "")
    target = plan.policy.get("target")
    head = f"plan ({plan.policy.get('policy', '?')}, {mode}{'' if target is None else f' {target} bpw'}): "
    return head + "; ".join(
        f"{k.upper()} {s[k]['tensors']} tensors ({100 * s[k]['tensor_share']:.1f}%), "
        f"{s[k]['params'] / 1e6:.3f}M params ({100 * s[k]['param_share']:.1f}%)" for k in ("sq", "vq"))


def build_report(in_path: Path, out_path: Path, model: onnx.ModelProto, plan: Plan, payloads: Payloads,
                 rows: dict[str, dict], stats: CalibrationStats | None, opts: QuantizeOptions, config,
                 seconds: float) -> dict:
    """Per-tensor rows and totals: bpw (stored and paper accounting), SQ/VQ shares, bytes vs fp16/fp32."""
    linear_numel = {n: int(np.prod(q.shape)) for n, q in payloads.linear.items()}
    n_lin = sum(linear_numel.values())
    inits = {t.name: t for t in onnx.load(in_path, load_external_data=False).graph.initializer}
    n_params = sum(int(np.prod(t.dims)) for t in inits.values())
    emb_head = {EMBEDDING, HEAD}
    n_emb_head = sum(int(np.prod(inits[n].dims)) for n in emb_head if n in inits)
    stored = initializer_bytes(model, set(linear_numel))
    elem = payloads.elementwise
    n_elem = sum(int(np.prod(q.shape)) for q in elem.values())
    bits_all = model_bpw(payloads.linear) * n_lin + sum(sum(q.bits_breakdown().values()) for q in elem.values())
    methods: dict[str, int] = {}
    for e in plan.entries:
        methods[e.algorithm] = methods.get(e.algorithm, 0) + 1
    return {
        "input": str(in_path),
        "output": str(out_path),
        "plan": str(plan_path(out_path)),
        "model": json.loads(config.to_json()),
        "options": options_json(opts),
        "policy": {k: v for k, v in plan.policy.items() if k != "options"},
        "seconds": round(seconds, 3),
        "calibration": None if stats is None else {"samples": stats.samples, "tokens": stats.tokens},
        "tensors": rows,
        "totals": {
            "bpw": model_bpw(payloads.linear),
            "bpw_paper": plan.bpw("paper"),
            "bpw_target": opts.bpw,
            "bpw_accounting": opts.bpw_accounting,
            "bpw_including_elementwise": bits_all / max(n_lin + n_elem, 1),
            "quantized_weights": n_lin,
            "quantized_tensors": len(linear_numel),
            "elementwise_vectors": len(elem),
            "methods": methods,
            "shares": plan.share(),
            "quantized_weights_stored_bytes": stored,
            "quantized_weights_stored_bits_per_weight": 8 * stored / max(n_lin, 1),
            "quantized_weights_fp16_bytes": 2 * n_lin,
            "quantized_weights_ratio_to_fp16": stored / max(2 * n_lin, 1),
            "embedding_and_head_params": n_emb_head,
            "embedding_and_head_bytes": initializer_bytes(model, emb_head),
            "file_bytes": out_path.stat().st_size + (Path(str(out_path) + ".data").stat().st_size
                                                    if Path(str(out_path) + ".data").exists() else 0),
            "fp32_bytes": 4 * n_params,
            "fp16_bytes": 2 * n_params,
        },
    }
