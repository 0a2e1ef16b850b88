"""`triton-repo`: a Triton Inference Server model repository for an engine or an ONNX model.

The model keeps its recurrent state on the server: the sequence batcher's
implicit state maps `state_*` inputs to `new_state_*` outputs, starting from
zeros at each sequence start, so a client sends one token per request with a
sequence id and receives logits. No control inputs are declared: the graphs
have none (the TensorRT backend binds every declared control to an engine
input, and TensorRT has no uint64 for CORRID), and the zero initial state
already resets a sequence.

Concurrent sequences share a batch: Triton batches along dimension 0, so the
served graph has batch-first state (`[B, L, ...]`, passes/batch_first_state.py)
and `max_batch_size > 0` with the sequence batcher's `oldest` strategy.

- `Q.plan` -> platform `tensorrt_plan` (sidecar `Q.plan.json` from build-engine gives shapes and layout).
  The rwkvq plugins are AOT plugins whose kernels are embedded in the engine: there is no plugin library to
  load. Engines built with `build-engine --serving` batch sequences; others serve one sequence at a time.
- `Q.onnx` -> platform `onnxruntime_onnx`: the step graph (the sibling `Q.step.onnx` when given the sequence
  graph), made batch-first, with the rwkvq ops kept quantized and served by the package's native custom-op
  library, copied into the model folder and named in `model_operations { op_library_filename }`.

Before anything is written the name is checked (one path component), the model is checked (a corrupted VQ
node is refused), and the config is parsed with Triton's own `model_config` protobuf. The model folder is
written under a temporary name and renamed into place, so a failure (a full disk) leaves nothing behind and
a rerun works.
"""
from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import onnx

from .checkpoint import ModelConfig
from .errors import ConfigError, MissingDependencyError, OutputError, RwkvqError
from .export import read_config, step_path
from .names import DOMAIN, GRAPH_KEY

OP_LIBRARY_NAME = "librwkvq_ort_ops.so"
# Triton names a model by its folder: one path component. Letters, digits, '_', '-', '.', not starting with '.'.
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
SEQUENCE_IDLE_US = 60_000_000
QUEUE_DELAY_US = 100
TRITON_DTYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
                 onnx.TensorProto.INT64: "TYPE_INT64"}


def model_config_module():
    """Triton's generated `model_config_pb2` (from the tritonclient wheel, without its grpc extra)."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("tritonclient", "pip install tritonclient protobuf (or rwkvq-onnx[deploy])")
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        raise MissingDependencyError("tritonclient's model_config_pb2", "pip install --upgrade tritonclient")
    mod_spec = importlib.util.spec_from_file_location("rwkvq_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def parse_model_config(text: str):
    """Parse config.pbtxt text with Triton's schema; a misspelled field is a ConfigError."""
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, model_config_module().ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigError(f"invalid Triton model config: {exc}") from None


def check_model_name(name: str) -> str:
    """The name when it is one safe path component Triton accepts as a model name, else a ConfigError."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise ConfigError(f"--name {name!r} is not a model name: use one path component of letters, digits, "
                          f"'_', '-' and '.' (not starting with '.', at most 128 characters)")
    return name


def _dims(shape) -> str:
    return "[ " + ", ".join(str(d) for d in shape) + " ]"


def model_config_text(name: str, platform: str, config: ModelConfig, *, max_batch: int, kind: str = "KIND_GPU",
                      instances: int = 1, logits_type: str = "TYPE_FP32", op_library: str | None = None) -> str:
    """config.pbtxt for a step graph served one token per request.

    `max_batch > 0`: batch-first state, sequences batched by the `oldest` strategy (shapes exclude the batch
    dimension; the token's `[1]` is reshaped to the graph's `[B]`). `max_batch == 0`: the export's `[L, 1, ...]`
    state, one sequence per instance at a time."""
    L, C, H, N, V = config.n_layer, config.n_embd, config.n_head, config.head_size, config.vocab_size
    if max_batch > 0:
        token = '{ name: "token" data_type: TYPE_INT64 dims: [ 1 ] reshape: { shape: [ ] } }'
        logits = [V]
        states = [("state_att_shift", [L, C]), ("state_ffn_shift", [L, C]), ("state_wkv", [L, H, N, N])]
        strategy = (f"  oldest {{ max_candidate_sequences: {max_batch} preferred_batch_size: [ {max_batch} ] "
                    f"max_queue_delay_microseconds: {QUEUE_DELAY_US} }}\n")
    else:
        token = '{ name: "token" data_type: TYPE_INT64 dims: [ 1 ] }'
        logits = [1, V]
        states = [("state_att_shift", [L, 1, C]), ("state_ffn_shift", [L, 1, C]), ("state_wkv", [L, 1, H, N, N])]
        strategy = ""
    state_text = ",\n".join(
        f"""    {{
      input_name: "{s}"
      output_name: "new_{s}"
      data_type: TYPE_FP32
      dims: {_dims(d)}
      initial_state: {{ data_type: TYPE_FP32 dims: {_dims(d)} zero_data: true name: "zero" }}
    }}""" for s, d in states)
    operations = f'model_operations {{ op_library_filename: "{op_library}" }}\n' if op_library else ""
    return f"""name: "{name}"
platform: "{platform}"
max_batch_size: {max_batch}
input [
  {token}
]
output [
  {{ name: "logits" data_type: {logits_type} dims: {_dims(logits)} }}
]
sequence_batching {{
  max_sequence_idle_microseconds: {SEQUENCE_IDLE_US}
{strategy}  state [
{state_text}
  ]
}}
instance_group [ {{ count: {instances} kind: {kind} }} ]
{operations}"""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_onnx(path: Path) -> onnx.ModelProto:
    """The model with its external data, or a one-line ConfigError (not ONNX, unsafe external-data path)."""
    try:
        return onnx.load(path)
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ConfigError(f"cannot read as an ONNX model: {_first_line(exc)}", path) from None
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file
        raise ConfigError(f"not an ONNX model ({_first_line(exc)})", path) from None


def check_custom_ops(model: onnx.ModelProto, path: Path) -> None:
    """Refuse a model with a corrupted rwkvq node (each checked by its op spec: attributes against initializer
    shapes and dtypes), then one that does not open in onnxruntime with the native op library, as the server
    will open it."""
    from .runtime import open_session_from_model
    from .tensorrt_build import check_custom_nodes

    try:
        check_custom_nodes(model)
    except ConfigError as exc:
        raise ConfigError(str(exc), path) from None
    try:
        open_session_from_model(model, threads=1)
    except Exception as exc:
        raise ConfigError(f"the model does not load in onnxruntime with the rwkvq ops: {_first_line(exc)}",
                          path) from None


def native_op_library() -> Path:
    """The built onnxruntime custom-op library of the package (plugins/ort_ops.c)."""
    from . import cpu_kernels

    path = cpu_kernels.library_path()
    if path is None:
        raise MissingDependencyError("the native rwkvq op library", "reinstall the package (pip install -e .) "
                                                                   "with a C compiler present")
    return path


def _graph_output_type(model: onnx.ModelProto, name: str) -> str:
    elem = next(o.type.tensor_type.elem_type for o in model.graph.output if o.name == name)
    if elem not in TRITON_DTYPES:
        raise ConfigError(f"output {name} has ONNX type {onnx.TensorProto.DataType.Name(elem)}, not served")
    return TRITON_DTYPES[elem]


def _prepare_onnx(model_path: Path, name: str, final: Path, kind: str | None, instances: int, max_batch: int,
                  log: Callable[[str], None]) -> tuple[str, Callable[[Path], None]]:
    """config.pbtxt text and a writer of the version folder, for an ONNX model (everything checked here)."""
    from .passes.batch_first_state import BATCH_FIRST, batch_first_state, state_layout

    model = load_onnx(model_path)
    config = read_config(model)
    source = model_path
    if {p.key: p.value for p in model.metadata_props}.get(GRAPH_KEY) != "step":
        sibling = step_path(model_path)
        if not sibling.is_file():
            raise ConfigError("Triton sends one token per request, which needs the step graph: export with "
                              f"--mode both (no {sibling.name} beside it)", model_path)
        source, model = sibling, load_onnx(sibling)
        config = read_config(model)
        log(f"using the step graph {sibling.name} beside {model_path.name}: Triton sends one token per request")
    custom = sorted({n.op_type for n in model.graph.node if n.domain == DOMAIN})
    if custom:
        check_custom_ops(model, source)
    if max_batch < 1:
        raise ConfigError(f"--max-batch must be >= 1, got {max_batch}")
    if state_layout(model) != BATCH_FIRST:
        batch_first_state(model)
        log(f"made the state batch-first ([B, L, ...], Transposes at the graph edge) so that the sequence "
            f"batcher can batch up to {max_batch} sequences (max_batch_size {max_batch}, oldest strategy)")
    library = None
    if custom:
        library = native_op_library()
        log(f"kept the quantized ops ({', '.join(custom)}) in the graph; Triton's onnxruntime backend loads the "
            f"native op library {final / OP_LIBRARY_NAME} (model_operations; edit op_library_filename if the "
            f"server mounts the repository elsewhere; built for baseline x86-64, AVX2 kernels chosen at run time)")
    text = model_config_text(name, "onnxruntime_onnx", config, max_batch=max_batch, kind=kind or "KIND_CPU",
                             instances=instances, logits_type=_graph_output_type(model, "logits"),
                             op_library=str(final / OP_LIBRARY_NAME) if library else None)

    def write(tmp: Path) -> None:
        from .export import save_model

        save_model(model, tmp / "1" / "model.onnx")
        if library:
            shutil.copyfile(library, tmp / OP_LIBRARY_NAME)

    return text, write


def _prepare_plan(model_path: Path, name: str, kind: str | None, instances: int,
                  log: Callable[[str], None]) -> tuple[str, Callable[[Path], None]]:
    """config.pbtxt text and a writer of the version folder, for a TensorRT engine and its sidecar."""
    sidecar = Path(str(model_path) + ".json")
    if not sidecar.is_file():
        raise ConfigError(f"needs the build-engine sidecar {sidecar.name} for the engine's shapes", model_path)
    try:
        meta = json.loads(sidecar.read_text())
        config = ModelConfig(**meta["model"])
        profile = meta["profile"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"unreadable build-engine sidecar: {_first_line(exc)}", sidecar) from None
    if "token" not in profile:
        raise ConfigError("Triton sends one token per request: build the engine from the step graph "
                          "(NAME.step.onnx)", model_path)
    if meta.get("state_layout") == "batch_first":
        max_batch = int(meta.get("max_batch", profile["token"][2][0]))
    else:
        max_batch = 0
        log("the engine keeps the export's [L, B, ...] state: one sequence per instance at a time "
            "(max_batch_size 0); rebuild with build-engine --serving --max-batch B to batch sequences")
    text = model_config_text(name, "tensorrt_plan", config, max_batch=max_batch, kind=kind or "KIND_GPU",
                             instances=instances, logits_type="TYPE_FP16" if meta.get("logits_fp16") else "TYPE_FP32")

    def write(tmp: Path) -> None:
        shutil.copyfile(model_path, tmp / "1" / "model.plan")

    return text, write


def _check_free(folder: Path) -> None:
    if folder.is_symlink() or (folder.exists() and (not folder.is_dir() or any(folder.iterdir()))):
        raise ConfigError(f"model folder {folder} exists and is not empty")


def _prepare_out_dir(out_dir: Path, folder: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the repository folder: {exc.strerror or exc}", out_dir) from None
    if not out_dir.is_dir():
        raise OutputError("the repository path is not a folder", out_dir)
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise OutputError("the repository folder is not writable", out_dir)
    _check_free(folder)


def triton_repo(model_path: str | Path, out_dir: str | Path, name: str = "rwkv", kind: str | None = None,
                instances: int = 1, max_batch: int = 8, log: Callable[[str], None] = lambda line: None) -> Path:
    """Write REPO/NAME/config.pbtxt and REPO/NAME/1/model.{plan,onnx} atomically; returns the model folder.

    `log` receives one line per decision taken for the user (step graph, layout, ops kept)."""
    model_path, out_dir = Path(model_path), Path(out_dir)
    name = check_model_name(name)
    if not model_path.is_file():
        raise ConfigError("no such model", model_path)
    if kind not in (None, "KIND_GPU", "KIND_CPU"):
        raise ConfigError(f"--kind must be KIND_GPU or KIND_CPU, got {kind}")
    if instances < 1:
        raise ConfigError(f"--instances must be >= 1, got {instances}")
    folder = out_dir / name
    _check_free(folder)
    final = folder.resolve()
    if model_path.suffix == ".plan":
        text, write = _prepare_plan(model_path, name, kind, instances, log)
    else:
        text, write = _prepare_onnx(model_path, name, final, kind, instances, max_batch, log)
    parse_model_config(text)
    _prepare_out_dir(out_dir, folder)  # nothing is created before the model and its config are checked
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir))
    except OSError as exc:
        raise OutputError(f"cannot write the model repository: {_os_reason(exc)}", out_dir) from None
    try:
        (tmp / "1").mkdir()
        write(tmp)
        (tmp / "config.pbtxt").write_text(text)
        os.chmod(tmp, 0o777 & ~_umask())
        if folder.is_dir():
            folder.rmdir()  # empty (checked above)
        os.rename(tmp, folder)
    except OSError as exc:
        raise OutputError(f"cannot write the model repository: {_os_reason(exc)}", folder) from None
    except RwkvqError as exc:
        raise OutputError(f"cannot write the model repository: {exc}", folder) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _os_reason(exc: OSError) -> str:
    return "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or _first_line(exc))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
