"""`build-engine`: a TensorRT engine (.plan) from an exported or quantized ONNX graph.

Everything that can be checked without TensorRT is checked first (the graph,
its ops, the output path), and the graph is prepared for TensorRT's ONNX
parser: model-local functions stripped (they would shadow plugins), rwkvq
nodes given `plugin_namespace` and fp16 activations (Casts around them in
fp32 graphs), MatMulNBits and asymmetric QDQ refused with the fix to use.
Only then are TensorRT and a GPU required; without them the command stops
with one line saying so.
"""
from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from . import ops
from .atomic import atomic_path, check_writable, write_text
from .errors import ConfigError, MissingDependencyError
from .export import read_config

TENSORRT_HINT = ("install TensorRT (pip install tensorrt) on a machine with an NVIDIA GPU and driver; "
                 "see README, 'GPU deployment'")


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


def optimization_profile(model: onnx.ModelProto, max_batch: int, max_seq: int) -> Profile:
    """Shapes for tokens/token and the three state tensors, batch 1..max_batch (sequence: T 1..max_seq)."""
    if max_batch < 1 or max_seq < 1:
        raise ConfigError("--max-batch and --max-seq must be >= 1")
    c = read_config(model)
    L, C, H, N = c.n_layer, c.n_embd, c.n_head, c.head_size
    names = [i.name for i in model.graph.input]

    def state(b: int) -> dict[str, tuple[int, ...]]:
        return {"state_att_shift": (L, b, C), "state_ffn_shift": (L, b, C), "state_wkv": (L, b, H, N, N)}

    opt_b = 1
    shapes: dict[str, tuple] = {}
    if "token" in names:
        shapes["token"] = ((1,), (opt_b,), (max_batch,))
    else:
        shapes["tokens"] = ((1, 1), (opt_b, max_seq), (max_batch, max_seq))
    for name in state(1):
        shapes[name] = (state(1)[name], state(opt_b)[name], state(max_batch)[name])
    return Profile(shapes)


def prepare_for_tensorrt(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """A copy of the graph TensorRT's parser can take, and what was changed (for the sidecar)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    notes = {"functions_stripped": len(m.functions), "plugins": {}, "casts_added": 0}
    del m.functions[:]
    inits = {t.name for t in m.graph.initializer}
    for node in m.graph.node:
        if node.op_type == "MatMulNBits":
            raise ConfigError("TensorRT cannot parse com.microsoft.MatMulNBits: quantize with --sq-format qdq")
        if node.op_type == "DequantizeLinear" and len(node.input) == 3 and node.input[2] in inits:
            raise ConfigError("TensorRT dequantizes with zero point 0: quantize with --sym sym for TensorRT")
    new_nodes = []
    fp32_acts = {p.key: p.value for p in m.metadata_props}.get("rwkvq.dtype", "float32") == "float32"
    for node in m.graph.node:
        if node.domain != ops.DOMAIN:
            new_nodes.append(node)
            continue
        if node.op_type == "VQMatMul":
            a = {at.name: helper.get_attribute_value(at) for at in node.attribute}
            from .plugins.trt_plugins import gemv_supported

            why = gemv_supported(*(int(a[k]) for k in ("N", "K", "dim", "group_rows", "group_cols", "index_bits")))
            if why:
                raise ConfigError(f"{node.name}: the TensorRT VQ GEMV cannot run this layout ({why}); "
                                  f"quantize with --lower-vq for this model")
        notes["plugins"][node.op_type] = notes["plugins"].get(node.op_type, 0) + 1
        node.attribute.extend([helper.make_attribute("plugin_namespace", ops.DOMAIN),
                               helper.make_attribute("plugin_version", "1")])
        if fp32_acts:  # the plugins take fp16 activations
            x16, y16 = node.input[0] + "_fp16", node.output[0] + "_fp16"
            new_nodes.append(helper.make_node("Cast", [node.input[0]], [x16], to=TensorProto.FLOAT16))
            out = node.output[0]
            node.input[0] = x16
            node.output[0] = y16
            new_nodes.append(node)
            new_nodes.append(helper.make_node("Cast", [y16], [out], to=TensorProto.FLOAT))
            notes["casts_added"] += 2
        else:
            new_nodes.append(node)
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    return m, notes


def build_engine(onnx_path: str | Path, plan_path: str | Path, *, fp16: bool = False, max_batch: int = 1,
                 max_seq: int = 128, workspace_mib: int = 4096, log=print) -> dict:
    """Validate and prepare the graph, then build and serialize the engine; returns the sidecar dict."""
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise ConfigError("no such ONNX model", onnx_path)
    check_writable(plan_path)
    try:
        model = onnx.load(onnx_path)
    except Exception as exc:
        raise ConfigError(f"cannot read ONNX model: {str(exc).splitlines()[0] if str(exc) else exc}", onnx_path) from None
    config = read_config(model)
    prepared, notes = prepare_for_tensorrt(model)
    profile = optimization_profile(prepared, max_batch, max_seq)
    graph_fp16 = {p.key: p.value for p in prepared.metadata_props}.get("rwkvq.dtype") == "float16"
    log(f"validated {onnx_path}: RWKV {config.version} {config.n_layer}x{config.n_embd}, "
        f"plugins {notes['plugins'] or 'none'}, profile {dict(profile.shapes)}")
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
    if not parser.parse(prepared.SerializeToString()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ConfigError(f"TensorRT could not parse the graph: {errors}", onnx_path)
    cfg = builder.create_builder_config()
    cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if fp16 and not graph_fp16:
        if hasattr(trt.BuilderFlag, "FP16"):
            cfg.set_flag(trt.BuilderFlag.FP16)
        else:
            raise ConfigError("TensorRT 11 builds the precision the graph has: export with --fp16 instead")
    opt = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile.shapes.items():
        opt.set_shape(name, lo, mid, hi)
    cfg.add_optimization_profile(opt)
    serialized = builder.build_serialized_network(network, cfg)
    if serialized is None:
        raise ConfigError("TensorRT failed to build the engine (see its log above)", onnx_path)
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    sidecar = {"onnx": str(onnx_path), "plan": str(plan_path), "tensorrt": trt.__version__,
               "plugins": notes["plugins"], "profile": {k: list(map(list, v)) for k, v in profile.shapes.items()},
               "max_batch": max_batch, "max_seq": max_seq, "fp16": fp16 or graph_fp16,
               "model": json.loads(config.to_json())}
    write_text(str(plan_path) + ".json", json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return sidecar
