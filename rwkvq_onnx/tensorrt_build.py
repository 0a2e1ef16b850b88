"""`build-engine`: a TensorRT engine (.plan) from an exported or quantized ONNX graph.

Everything that can be checked without TensorRT is checked first (the graph,
its ops, the row count the plugins can serve, the output path), and the graph
is prepared for TensorRT's ONNX parser:
- model-local functions stripped (they would shadow plugins);
- rwkvq nodes given `plugin_namespace`/`plugin_version` (and VQMatMul the
  `max_rows` its kernel instance is chosen by);
- the plugin boundary made explicit: fp16 activations through Casts (the ONNX
  ops take float32; in fp16 exports they already sit between Casts to float),
  and the byte-typed weights (uint8 codes, int8 codebooks) as the same bytes
  in packed little-endian INT32 words: the parser would turn UINT8 weights
  into one INT32 per byte, and INT8 tensors carry quantization meaning in
  TensorRT, while INT32 words reach the kernel's byte pointers unchanged;
- MatMulNBits and asymmetric QDQ refused with the fix to use.
The network is STRONGLY_TYPED: precision is what the graph says, so no
builder precision flag is set. The prepared graph reaches the parser as a
file with external data (`parse_from_file`), so models over 2 GiB build; a
timing cache makes rebuilds fast. Only the build itself needs TensorRT and a
GPU; without them the command stops with one line saying so.
"""
from __future__ import annotations

import ctypes
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .atomic import atomic_path, check_writable, write_text
from .errors import ConfigError, MissingDependencyError, OutputError
from .export import read_config
from .names import DOMAIN, DTYPE_KEY, LOGITS_FROM
from .opspec import SPECS, sq_matmul, vq_matmul, wkv7_sequence, wkv7_step

TENSORRT_HINT = ("install TensorRT 10.9 or later (pip install 'rwkvq-onnx[tensorrt]') on a machine with an NVIDIA "
                 "GPU and driver; see README, 'GPU deployment'")
BYTE_DTYPES = (np.dtype(np.uint8), np.dtype(np.int8))


def as_int32_words(values: np.ndarray) -> np.ndarray:
    """The bytes of a uint8/int8 array as little-endian int32 words: rows kept when the last dimension is a
    multiple of 4 bytes, else flattened and zero-padded to whole words (the kernels read bytes through a
    pointer and never past the sizes their attributes give)."""
    raw = np.ascontiguousarray(values).view(np.uint8)
    if raw.ndim >= 1 and raw.shape[-1] % 4 == 0 and raw.size:
        return raw.view("<i4").astype(np.int32, copy=False)
    flat = np.zeros(-(-raw.size // 4) * 4, np.uint8)
    flat[: raw.size] = raw.reshape(-1)
    return flat.view("<i4").astype(np.int32, copy=False)


def cuda_device_count() -> int:
    """Number of CUDA devices the driver reports (0 without a driver or GPU)."""
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        if lib.cuInit(0) != 0:
            return 0
        count = ctypes.c_int(0)
        return count.value if lib.cuDeviceGetCount(ctypes.byref(count)) == 0 else 0
    return 0


@dataclass(frozen=True)
class Profile:
    """min / opt / max shape of every graph input."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def lines(self) -> list[str]:
        """One readable line per input: `name: min AxB, opt AxB, max AxB`."""
        def fmt(shape: tuple[int, ...]) -> str:
            return "x".join(str(d) for d in shape)

        width = max((len(n) for n in self.shapes), default=0)
        return [f"{name:<{width}}  min {fmt(lo)}, opt {fmt(mid)}, max {fmt(hi)}"
                for name, (lo, mid, hi) in self.shapes.items()]


def is_step_graph(model: onnx.ModelProto) -> bool:
    return "token" in {i.name for i in model.graph.input}


def optimization_profile(model: onnx.ModelProto, max_batch: int, max_seq: int) -> Profile:
    """Shapes for tokens/token and the three state tensors, batch 1..max_batch (sequence: T 1..max_seq).

    State shapes follow the graph's layout: `[L, B, ...]` as exported, `[B, L, ...]` after the serving
    transform (passes/batch_first_state.py)."""
    from .passes.batch_first_state import BATCH_FIRST, state_layout

    if max_batch < 1 or max_seq < 1:
        raise ConfigError("--max-batch and --max-seq must be >= 1")
    c = read_config(model)
    L, C, H, N = c.n_layer, c.n_embd, c.n_head, c.head_size
    batch_first = state_layout(model) == BATCH_FIRST

    def state(b: int) -> dict[str, tuple[int, ...]]:
        lb = (b, L) if batch_first else (L, b)
        return {"state_att_shift": (*lb, C), "state_ffn_shift": (*lb, C), "state_wkv": (*lb, H, N, N)}

    opt_b = 1
    shapes: dict[str, tuple] = {}
    if is_step_graph(model):
        shapes["token"] = ((1,), (opt_b,), (max_batch,))
    else:
        shapes["tokens"] = ((1, 1), (opt_b, max_seq), (max_batch, max_seq))
    for name in state(1):
        shapes[name] = (state(1)[name], state(opt_b)[name], state(max_batch)[name])
    return Profile(shapes)


def plugin_rows(model: onnx.ModelProto, max_batch: int, max_seq: int) -> int:
    """Most activation rows one plugin call sees under the profile: B for a step graph, B*T for a sequence."""
    return max_batch if is_step_graph(model) else max_batch * max_seq


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of an initializer, read from its header (no data loaded), for the spec checks."""

    shape: tuple[int, ...]
    dtype: np.dtype


def check_custom_nodes(model: onnx.ModelProto) -> dict[str, object]:
    """Validate every rwkvq node with its op spec (attributes against the initializer shapes and dtypes);
    returns the checked Attributes by node name. A corrupted node is a one-line ConfigError naming it."""
    inits = {t.name: TensorInfo(tuple(t.dims), np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)))
             for t in model.graph.initializer}
    checked = {}
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        spec = SPECS.get(node.op_type)
        if spec is None:
            raise ConfigError(f"node '{node.name}': unknown op {DOMAIN}.{node.op_type}")
        if len(node.input) != len(spec.INPUTS):
            raise ConfigError(f"{spec.QUALIFIED} node '{node.name}': {len(node.input)} inputs, "
                              f"expected {len(spec.INPUTS)}")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute
                 if a.name not in ("plugin_namespace", "plugin_version", "max_rows")}
        weights = {name: inits.get(tensor) for name, tensor in zip(spec.INPUTS[1:], node.input[1:])}
        checked[node.name] = spec.validate(attrs, **weights, node=node.name)
    return checked


def prepare_for_tensorrt(model: onnx.ModelProto, max_rows: int = 1) -> tuple[onnx.ModelProto, dict]:
    """A copy of the graph TensorRT's parser can take, and what was changed (for the sidecar).

    `max_rows`: the most activation rows a VQMatMul call sees (see `plugin_rows`); above the kernel's
    MAX_ROWS the graph is refused, since the rows past it would never be written."""
    from .plugins.trt_plugins import MAX_ROWS, gemv_supported

    m = onnx.ModelProto()
    m.CopyFrom(model)
    notes = {"functions_stripped": len(m.functions), "plugins": {}, "casts_added": 0, "weights_as_int32_words": 0,
             "max_rows": max_rows, "wkv_steps_lowered": 0, "wkv_sequences_lowered": 0}
    # the fused recurrence (step and sequence) and the packed scalar weights have no TensorRT plugin: their standard-op forms
    # (the recurrence as TensorRT's own layers, the weights as blocked DequantizeLinear + MatMul) run instead
    lowered = [op for op in (wkv7_step.OP_TYPE, wkv7_sequence.OP_TYPE, sq_matmul.OP_TYPE)
               if any(n.domain == DOMAIN and n.op_type == op for n in m.graph.node)]
    if lowered:
        from .passes.lower_vq import LowerVQ

        counts = LowerVQ(ops=tuple(lowered))(m).counts
        notes["wkv_steps_lowered"] = counts.get(wkv7_step.OP_TYPE, 0)
        notes["wkv_sequences_lowered"] = counts.get(wkv7_sequence.OP_TYPE, 0)
        notes["sq_matmuls_lowered"] = counts.get(sq_matmul.OP_TYPE, 0)
    del m.functions[:]
    # the sequence graph's overridable logits_from becomes a constant (0: logits for every position): an engine's
    # inputs are the tokens and the state
    kept = [i for i in m.graph.input if i.name != LOGITS_FROM]
    notes["logits_from_fixed"] = len(kept) < len(m.graph.input)
    del m.graph.input[:]
    m.graph.input.extend(kept)
    inits = {t.name: t for t in m.graph.initializer}
    for node in m.graph.node:
        if node.op_type == "MatMulNBits":
            raise ConfigError("TensorRT cannot parse com.microsoft.MatMulNBits: quantize with --sq-format qdq")
        if node.op_type == "DequantizeLinear" and len(node.input) == 3 and node.input[2] in inits:
            raise ConfigError("TensorRT dequantizes with zero point 0: quantize with --sym sym for TensorRT")
    checked = check_custom_nodes(m)
    new_nodes: list[onnx.NodeProto] = []
    fp16_inputs: dict[str, str] = {}  # activation -> its fp16 Cast (one per tensor, shared by its plugins)
    words: dict[str, str] = {}  # byte-typed weight -> its int32-word twin
    for node in m.graph.node:
        if node.domain != DOMAIN:
            new_nodes.append(node)
            continue
        if node.op_type == "VQMatMul":
            a = checked[node.name]
            why = gemv_supported(*(getattr(a, k) for k in vq_matmul.ATTRIBUTES), max_rows=max_rows)
            if why:
                hint = ("build the step graph (NAME.step.onnx) with --max-batch <= "
                        f"{MAX_ROWS}, or quantize with --lower-vq" if max_rows > MAX_ROWS
                        else "quantize with --lower-vq for this model")
                raise ConfigError(f"{node.name}: the TensorRT VQ GEMV cannot run this ({why}); {hint}")
            node.attribute.append(helper.make_attribute("max_rows", max_rows))
        spec = SPECS[node.op_type]
        for i, (name, dtype) in enumerate(zip(spec.INPUTS[1:], spec.INPUT_DTYPES[1:]), start=1):
            tensor = node.input[i]
            if tensor not in inits:
                raise ConfigError(f"{node.name}: {name} '{tensor}' is not an initializer; the TensorRT plugins "
                                  f"take their weights as constants")
            if np.dtype(dtype) not in BYTE_DTYPES:
                continue
            if tensor not in words:
                twin = numpy_helper.from_array(as_int32_words(numpy_helper.to_array(inits[tensor])),
                                               tensor + "_int32_words")
                m.graph.initializer.append(twin)
                words[tensor] = twin.name
                notes["weights_as_int32_words"] += 1
            node.input[i] = words[tensor]
        notes["plugins"][node.op_type] = notes["plugins"].get(node.op_type, 0) + 1
        node.attribute.extend([helper.make_attribute("plugin_namespace", DOMAIN),
                               helper.make_attribute("plugin_version", "1")])
        x = node.input[0]
        if x not in fp16_inputs:
            fp16_inputs[x] = x + "_fp16_in"
            new_nodes.append(helper.make_node("Cast", [x], [fp16_inputs[x]], to=TensorProto.FLOAT16,
                                              name=x + "_to_fp16"))
            notes["casts_added"] += 1
        node.input[0] = fp16_inputs[x]
        out = node.output[0]
        node.output[0] = out + "_fp16_out"
        new_nodes.append(node)
        new_nodes.append(helper.make_node("Cast", [node.output[0]], [out], to=TensorProto.FLOAT,
                                          name=out + "_to_fp32"))
        notes["casts_added"] += 1
    used = {i for n in new_nodes for i in n.input}
    kept = [t for t in m.graph.initializer if t.name in used or t.name not in words]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    return m, notes


def write_parser_input(model: onnx.ModelProto, folder: str | Path) -> Path:
    """Save the prepared graph for `OnnxParser.parse_from_file`: weights as external data, so graphs over
    protobuf's 2 GiB limit parse (an in-memory `parse(SerializeToString())` cannot take them)."""
    path = Path(folder) / "model.onnx"
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return path


def timing_cache_path(plan_path: str | Path) -> Path:
    """Default timing cache beside the engine: `OUT.plan.timing-cache`."""
    return Path(str(plan_path) + ".timing-cache")


def build_engine(onnx_path: str | Path, plan_path: str | Path, *, fp16: bool = False, max_batch: int = 1,
                 max_seq: int = 128, workspace_mib: int = 4096, timing_cache: str | Path | None = None,
                 serving: bool = False, log=print) -> dict:
    """Validate and prepare the graph, then build and serialize the engine; returns the sidecar dict.

    `serving`: make the state batch-first first (for Triton's sequence batcher; step graphs only)."""
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise ConfigError("no such ONNX model", onnx_path)
    check_writable(plan_path)
    cache_path = Path(timing_cache) if timing_cache else timing_cache_path(plan_path)
    check_writable(cache_path)
    try:
        model = onnx.load(onnx_path)
    except Exception as exc:
        raise ConfigError(f"cannot read ONNX model: {str(exc).splitlines()[0] if str(exc) else exc}", onnx_path) from None
    config = read_config(model)
    graph_fp16 = {p.key: p.value for p in model.metadata_props}.get(DTYPE_KEY) == "float16"
    if fp16 and not graph_fp16:
        raise ConfigError("--fp16: a strongly typed network takes its precision from the graph; "
                          "export with --fp16 instead", onnx_path)
    if serving:
        if not is_step_graph(model):
            raise ConfigError("--serving needs the step graph (NAME.step.onnx): Triton sends one token per "
                              "request", onnx_path)
        from .passes.batch_first_state import batch_first_state

        batch_first_state(model)
    rows = plugin_rows(model, max_batch, max_seq)
    prepared, notes = prepare_for_tensorrt(model, max_rows=rows)
    profile = optimization_profile(prepared, max_batch, max_seq)
    plugins = ", ".join(f"{n} {op}" for op, n in notes["plugins"].items()) or "none"
    log(f"validated {onnx_path}: RWKV {config.version} {config.n_layer}x{config.n_embd}, plugins: {plugins}"
        + (", state batch-first (serving)" if serving else ""))
    log("optimization profile:")
    for line in profile.lines():
        log("  " + line)
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependencyError("TensorRT", TENSORRT_HINT) from None
    if cuda_device_count() == 0:
        raise MissingDependencyError("an NVIDIA GPU", "TensorRT builds engines on the GPU that will run them")
    if notes["plugins"]:
        from .plugins.trt_plugins import register_plugins

        register_plugins()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(strongly_typed)
    parser = trt.OnnxParser(network, logger)
    with tempfile.TemporaryDirectory(prefix="rwkvq-trt-") as tmp:
        if not parser.parse_from_file(str(write_parser_input(prepared, tmp))):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ConfigError(f"TensorRT could not parse the graph: {errors}", onnx_path)
    cfg = builder.create_builder_config()
    cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    cache = cfg.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    cfg.set_timing_cache(cache, False)
    opt = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile.shapes.items():
        opt.set_shape(name, lo, mid, hi)
    cfg.add_optimization_profile(opt)
    serialized = builder.build_serialized_network(network, cfg)
    if serialized is None:
        raise ConfigError("TensorRT failed to build the engine (see its log above)", onnx_path)
    try:
        with atomic_path(plan_path) as tmp_plan:
            tmp_plan.write_bytes(bytes(serialized))
        with atomic_path(cache_path) as tmp_cache:
            tmp_cache.write_bytes(bytes(cfg.get_timing_cache().serialize()))
    except OSError as exc:
        raise OutputError(f"cannot write the engine: {exc.strerror or exc}", plan_path) from None
    from .passes.batch_first_state import state_layout

    sidecar = {"onnx": str(onnx_path), "plan": str(plan_path), "tensorrt": trt.__version__,
               "plugins": notes["plugins"], "profile": {k: list(map(list, v)) for k, v in profile.shapes.items()},
               "max_batch": max_batch, "max_seq": max_seq, "fp16": graph_fp16,
               "logits_fp16": any(o.name == "logits" and o.type.tensor_type.elem_type == TensorProto.FLOAT16
                                  for o in prepared.graph.output), "state_layout": state_layout(model),
               "timing_cache": str(cache_path), "model": json.loads(config.to_json())}
    write_text(str(plan_path) + ".json", json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return sidecar
