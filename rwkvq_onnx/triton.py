"""`triton-repo`: a Triton Inference Server model repository for an engine or an ONNX model.

The model keeps its recurrent state on the server: the sequence batcher's
implicit state maps `state_*` inputs to `new_state_*` outputs, starting from
zeros at each sequence start (control inputs START and CORRID), so a client
sends one token per request with a sequence id and receives logits.

- `Q.plan` -> platform `tensorrt_plan` (sidecar `Q.plan.json` from build-engine gives the shapes). The rwkvq
  plugins are AOT plugins embedded in the engine; load their creator with
  `tritonserver --backend-config=tensorrt,plugins=...` or LD_PRELOAD if your TensorRT version needs it.
- `Q.onnx` -> platform `onnxruntime_onnx`; the step graph sibling is used when present, and rwkvq ops are
  lowered to standard ONNX (Triton's onnxruntime backend has no Python custom ops).
The generated config.pbtxt is parsed with Triton's own `model_config` protobuf before it is written.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import onnx

from .errors import ConfigError, MissingDependencyError
from .checkpoint import ModelConfig
from .export import read_config, save_model, step_path


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


def _dims(shape) -> str:
    return "[ " + ", ".join(str(d) for d in shape) + " ]"


def model_config_text(name: str, platform: str, config: ModelConfig, step: bool, kind: str = "KIND_GPU",
                      instances: int = 1) -> str:
    """config.pbtxt for one sequence per request (batch 1 inside the model, max_batch_size 0)."""
    L, C, H, N, V = config.n_layer, config.n_embd, config.n_head, config.head_size, config.vocab_size
    token = ("token", [1]) if step else ("tokens", [1, -1])
    logits = [1, V] if step else [1, -1, V]
    states = [("state_att_shift", [L, 1, C]), ("state_ffn_shift", [L, 1, C]), ("state_wkv", [L, 1, H, N, N])]
    state_text = ",\n".join(
        f"""    {{
      input_name: "{s}"
      output_name: "new_{s}"
      data_type: TYPE_FP32
      dims: {_dims(d)}
      initial_state: {{ data_type: TYPE_FP32 dims: {_dims(d)} zero_data: true name: "zero" }}
    }}""" for s, d in states)
    return f"""name: "{name}"
platform: "{platform}"
max_batch_size: 0
input [
  {{ name: "{token[0]}" data_type: TYPE_INT64 dims: {_dims(token[1])} }}
]
output [
  {{ name: "logits" data_type: TYPE_FP32 dims: {_dims(logits)} }}
]
sequence_batching {{
  max_sequence_idle_microseconds: 60000000
  control_input [
    {{ name: "START" control [ {{ kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0, 1 ] }} ] }},
    {{ name: "CORRID" control [ {{ kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 }} ] }}
  ]
  state [
{state_text}
  ]
}}
instance_group [ {{ count: {instances} kind: {kind} }} ]
"""


def _with_control_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Declare START / CORRID graph inputs (unused by the graph) so the backend can feed the controls."""
    names = {i.name for i in model.graph.input}
    if "START" not in names:
        model.graph.input.append(onnx.helper.make_tensor_value_info("START", onnx.TensorProto.FLOAT, [1]))
    if "CORRID" not in names:
        model.graph.input.append(onnx.helper.make_tensor_value_info("CORRID", onnx.TensorProto.UINT64, [1]))
    return model


def triton_repo(model_path: str | Path, out_dir: str | Path, name: str = "rwkv", kind: str | None = None,
                instances: int = 1) -> Path:
    """Write REPO/NAME/config.pbtxt and REPO/NAME/1/model.{plan,onnx}; returns the model folder."""
    model_path, out_dir = Path(model_path), Path(out_dir)
    if not model_path.is_file():
        raise ConfigError("no such model", model_path)
    if kind not in (None, "KIND_GPU", "KIND_CPU"):
        raise ConfigError(f"--kind must be KIND_GPU or KIND_CPU, got {kind}")
    folder = out_dir / name
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"model folder {folder} exists and is not empty")
    if model_path.suffix == ".plan":
        sidecar = Path(str(model_path) + ".json")
        if not sidecar.is_file():
            raise ConfigError(f"needs the build-engine sidecar {sidecar.name} for the engine's shapes", model_path)
        meta = json.loads(sidecar.read_text())
        config = ModelConfig(**meta["model"])
        step = "token" in meta["profile"]
        text = model_config_text(name, "tensorrt_plan", config, step, kind or "KIND_GPU", instances)
        parse_model_config(text)
        (folder / "1").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_path, folder / "1" / "model.plan")
    else:
        source = step_path(model_path) if step_path(model_path).is_file() else model_path
        model = onnx.load(source)
        config = read_config(model)
        step = {p.key: p.value for p in model.metadata_props}.get("rwkvq.graph") == "step"
        if any(n.domain == "rwkvq" for n in model.graph.node):
            from .passes.lower_vq import LowerVQ

            LowerVQ()(model)
        text = model_config_text(name, "onnxruntime_onnx", config, step, kind or "KIND_CPU", instances)
        parse_model_config(text)
        (folder / "1").mkdir(parents=True, exist_ok=True)
        save_model(_with_control_inputs(model), folder / "1" / "model.onnx")
    (folder / "config.pbtxt").write_text(text)
    return folder
