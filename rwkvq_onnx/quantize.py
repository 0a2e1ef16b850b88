"""`quantize`: calibrate an exported graph in onnxruntime, run the passes, write the quantized graph(s).

The pipeline is an explicit, ordered tuple of passes (see `passes/`): select
methods -> quantize weights -> [element-wise codebooks] -> rewrite scalar ->
rewrite vector -> rewrite element-wise -> [lower rwkvq ops] -> clean up.
Calibration happens once; when IN.onnx has a `.step.onnx` sibling the same
payloads are written into OUT.step.onnx by the rewrite passes.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .atomic import check_writable
from .calibration import calibration_windows, collect_statistics, find_targets, CalibrationStats
from .errors import ConfigError
from .export import read_config, save_model, step_path
from .graph import RWKVQ_OPS_KEY, rwkvq_ops, set_initializer
from .passes.base import PassResult, QuantState
from .passes.pipeline import LoweringOptions, lower_payloads
from .passes.quantize_elementwise import QuantizeElementwise
from .passes.quantize_embedding_head import QuantizeEmbeddingHead
from .passes.quantize_weights import QuantizeWeights
from .passes.select_methods import POLICIES, SelectMethods
from .quant import METHODS, ElementwiseConfig, GPTQConfig, VQConfig, model_bpw
from .quant.formats import Payloads
from .quant.rotate import rotate_lora
from .tokenizers import get_tokenizer


@dataclass(frozen=True)
class QuantizeOptions:
    method: str = "rwkvquant"
    bpw: float | None = None
    wbits: int = 3
    group_size: int = 64
    symmetric: bool | None = None  # None: symmetric for rwkvquant (TensorRT-friendly), asymmetric otherwise
    vq_dim: int = 2
    vq_bits: int | None = None
    tau_c: float = 1.5
    tau_f: float = 50.0
    calib: str | None = None
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    sequential: bool = False
    elementwise: bool | None = None  # None: on for rwkvquant only
    elementwise_bits: int = 4
    elementwise_percentile: float = 99.0
    fold_elementwise: bool = False
    sq_format: str = "qdq"
    lower_vq: bool = False
    tokenizer: str | None = None
    kmeans_iters: int = 25
    ranking: str = "proxy"  # ablations: variance | range | mse
    rotate_lora: bool = False  # Hadamard-rotate RWKV-7's a1/a2 and v1/v2 LoRA pairs before calibration
    embedding_bits: int | None = None  # 8: int8 embedding rows (kept in full precision when None)
    head_bits: int | None = None  # 4 or 8: MatMulNBits head (kept in full precision when None)
    head_accuracy_level: int = 4  # MatMulNBits accuracy_level of the head: 4 int8 activations (fast), 0 float
    progress: bool = True

    def validate(self) -> None:
        if self.method not in POLICIES:
            raise ConfigError(f"unknown method '{self.method}' (choose from {', '.join(POLICIES)})")
        if self.bpw is not None and not 1.0 < self.bpw < 16.0:
            raise ConfigError(f"--bpw must be between 1 and 16, got {self.bpw}")
        needs_h = self.method == "rwkvquant" or METHODS[self.method].needs_hessian
        if needs_h and not self.calib:
            raise ConfigError(f"--method {self.method} needs calibration data: pass --calib FILE")
        QuantizeEmbeddingHead(self.embedding_bits, self.head_bits, self.head_accuracy_level)  # checks them

    def use_elementwise(self) -> bool:
        return self.method == "rwkvquant" if self.elementwise is None else self.elementwise

    def sq_config(self) -> GPTQConfig:
        sym = (self.method == "rwkvquant") if self.symmetric is None else self.symmetric
        return GPTQConfig(bits=self.wbits, group_size=self.group_size, symmetric=sym)

    def vq_config(self) -> VQConfig:
        return VQConfig(bits=self.vq_bits or self.wbits, dim=self.vq_dim, kmeans_iters=self.kmeans_iters,
                        seed=self.seed)


@dataclass
class QuantizeResult:
    outputs: list[Path]
    report: dict
    passes: list[PassResult] = field(default_factory=list)


def compute_passes(opts: QuantizeOptions) -> tuple:
    """Passes that compute payloads (graph unchanged)."""
    passes = [SelectMethods(opts.method, opts.bpw, opts.sq_config(), opts.vq_config(), opts.tau_c, opts.tau_f,
                            progress=opts.progress, ranking=opts.ranking)]
    if not opts.sequential:
        passes.append(QuantizeWeights(progress=opts.progress))
    if opts.use_elementwise():
        passes.append(QuantizeElementwise(ElementwiseConfig(bits=opts.elementwise_bits,
                                                            percentile=opts.elementwise_percentile)))
    return tuple(passes)


def lowering_options(opts: QuantizeOptions) -> LoweringOptions:
    """How the payloads are written into the graphs."""
    return LoweringOptions(opts.sq_format, opts.fold_elementwise, opts.lower_vq, opts.embedding_bits,
                           opts.head_bits, opts.head_accuracy_level)


def _linear_weights(model: onnx.ModelProto, state: QuantState) -> None:
    inits = {t.name: t for t in model.graph.initializer}
    for t in state.linear:
        state.weights[t.weight] = numpy_helper.to_array(inits[t.weight]).astype(np.float32).T.copy()


def _identity_stats(state: QuantState) -> CalibrationStats:
    stats = CalibrationStats()
    for t in state.linear:
        stats.hessians[t.weight] = np.eye(t.shape[1])
    return stats


def _quantize_sequentially(model: onnx.ModelProto, state: QuantState, windows: np.ndarray,
                           opts: QuantizeOptions, log) -> CalibrationStats:
    """GPTQ-style: calibrate each block with the blocks before it already quantized."""
    calib_model = onnx.ModelProto()
    calib_model.CopyFrom(model)
    stats = CalibrationStats()
    layers = sorted({int(t.weight.split(".")[1]) for t in state.linear})
    quantizer = QuantizeWeights(progress=False)
    for layer in layers:
        linear = [t for t in state.linear if t.weight.startswith(f"blocks.{layer}.")]
        part = collect_statistics(calib_model, windows, linear, state.elementwise if layer == layers[0] else [],
                                  progress=False)
        stats.hessians.update(part.hessians)
        stats.act_sq.update(part.act_sq)
        stats.tokens, stats.samples = part.tokens, part.samples
        sub = QuantState(linear=linear, stats=stats, weights=state.weights, plan=state.plan,
                         algorithm=state.algorithm, payloads=state.payloads, input_scales=state.input_scales,
                         report=state.report)
        quantizer(calib_model, sub)
        for t in linear:  # later blocks now see this block's quantized weights
            w_hat = state.payloads[t.weight].dequantize()
            if t.weight in state.input_scales:
                w_hat = w_hat / state.input_scales[t.weight][None, :]
            from .graph import set_initializer

            set_initializer(calib_model, t.weight, w_hat.T.astype(np.float32))
        log(f"  sequential: block {layer} quantized ({len(linear)} weights)")
    return stats


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


def quantize_model(in_path: str | Path, out_path: str | Path, opts: QuantizeOptions,
                   report_path: str | Path | None = None, log=print) -> QuantizeResult:
    """Quantize IN.onnx (and its step sibling) into OUT.onnx (and OUT.step.onnx); return the report."""
    opts.validate()
    in_path, out_path = Path(in_path), Path(out_path)
    check_writable(out_path)
    if report_path:
        check_writable(report_path)
    if not in_path.is_file():
        raise ConfigError("no such ONNX model", in_path)
    t0 = time.perf_counter()
    try:
        model = onnx.load(in_path)
    except Exception as exc:
        raise ConfigError(f"cannot read ONNX model: {str(exc).splitlines()[0] if str(exc) else exc}", in_path) from None
    if any(o.domain == "rwkvq" for o in model.opset_import) or any(
            n.op_type in ("DequantizeLinear", "MatMulNBits") for n in model.graph.node):
        raise ConfigError("model is already quantized: quantize the fp export", in_path)
    config = read_config(model)
    props = {p.key: p.value for p in model.metadata_props}
    if props.get("rwkvq.graph") == "step":
        raise ConfigError("quantize needs the sequence graph (OUT.onnx), not the step graph", in_path)
    if opts.rotate_lora:
        log(f"rotate-lora: {len(rotate_model_lora(model, opts.seed))} LoRA matrices rotated")
    state = QuantState()
    state.linear, state.elementwise = find_targets(model)
    if not opts.use_elementwise():
        state.elementwise = []
    _linear_weights(model, state)

    windows = None
    if opts.calib:
        tokenizer = get_tokenizer(opts.tokenizer, config.vocab_size)
        windows = calibration_windows(opts.calib, tokenizer, opts.nsamples, opts.seqlen, opts.seed)
        log(f"calibration: {len(windows)} windows x {opts.seqlen} tokens from {opts.calib}")

    results: list[PassResult] = []
    if windows is not None and not opts.sequential:
        state.stats = collect_statistics(model, windows, state.linear, state.elementwise, progress=opts.progress)
    elif windows is None:
        state.stats = _identity_stats(state)
    for p in compute_passes(opts):
        if isinstance(p, QuantizeElementwise) and opts.sequential:
            continue
        results.append(p(model, state))
        log(results[-1].line())
        if isinstance(p, SelectMethods) and opts.sequential:
            state.stats = _quantize_sequentially(model, state, windows, opts, log)
            if opts.use_elementwise():
                results.append(QuantizeElementwise(ElementwiseConfig(bits=opts.elementwise_bits,
                                                                     percentile=opts.elementwise_percentile))(
                    model, state))
                log(results[-1].line())

    graphs = [(model, out_path)]
    sibling = step_path(in_path)
    if sibling.is_file():
        graphs.append((onnx.load(sibling), step_path(out_path)))
        if opts.rotate_lora:
            rotate_model_lora(graphs[-1][0], opts.seed)
    meta = {"method": opts.method, "bpw": model_bpw(state.payloads), "options": _options_json(opts)}
    payloads = Payloads(state.payloads, state.input_scales, state.elementwise_payloads)
    results.extend(lower_payloads([g for g, _ in graphs], payloads, lowering_options(opts), log=log))
    for g, _ in graphs:
        onnx.helper.set_model_props(g, {**{p.key: p.value for p in g.metadata_props},
                                        "rwkvq.quantization": json.dumps(meta, sort_keys=True),
                                        RWKVQ_OPS_KEY: rwkvq_ops(g)})
    written: list[Path] = []
    try:
        for g, path in graphs:
            written.append(save_model(g, path))
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    report = build_report(in_path, out_path, model, state, opts, config, time.perf_counter() - t0)
    if report_path:
        from .atomic import write_text

        write_text(report_path, json.dumps(report, indent=2, sort_keys=True) + "\n")
    return QuantizeResult(written, report, results)


def _options_json(opts: QuantizeOptions) -> dict:
    d = {k: getattr(opts, k) for k in opts.__dataclass_fields__ if k != "progress"}
    return d


def build_report(in_path: Path, out_path: Path, model: onnx.ModelProto, state: QuantState,
                 opts: QuantizeOptions, config, seconds: float) -> dict:
    """Per-tensor rows and totals: bpw, bytes stored vs fp16/fp32."""
    linear_numel = {t.weight: t.shape[0] * t.shape[1] for t in state.linear if t.weight in state.payloads}
    n_lin = sum(linear_numel.values())
    inits = {t.name: t for t in onnx.load(in_path, load_external_data=False).graph.initializer}
    n_params = sum(int(np.prod(t.dims)) for t in inits.values())
    emb_head = {"emb.weight", "head.weight"}
    n_emb_head = sum(int(np.prod(inits[n].dims)) for n in emb_head if n in inits)
    stored = initializer_bytes(model, set(linear_numel))
    elem = state.elementwise_payloads
    n_elem = sum(int(np.prod(q.shape)) for q in elem.values())
    bits_all = model_bpw(state.payloads) * n_lin + sum(
        sum(q.bits_breakdown().values()) for q in elem.values())
    methods: dict[str, int] = {}
    for name in linear_numel:
        methods[state.algorithm[name]] = methods.get(state.algorithm[name], 0) + 1
    return {
        "input": str(in_path),
        "output": str(out_path),
        "model": json.loads(config.to_json()),
        "options": _options_json(opts),
        "seconds": round(seconds, 3),
        "calibration": None if state.stats is None else {"samples": state.stats.samples, "tokens": state.stats.tokens},
        "tensors": state.report,
        "totals": {
            "bpw": model_bpw(state.payloads),
            "bpw_target": opts.bpw,
            "bpw_including_elementwise": bits_all / max(n_lin + n_elem, 1),
            "quantized_weights": n_lin,
            "quantized_tensors": len(linear_numel),
            "elementwise_vectors": len(elem),
            "methods": methods,
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
