"""The inputs and outputs of the exported graphs, and the step graph's file name.

Kept apart from `export` (which needs `onnx`) so the runtime can check a
loaded session against its config with nothing but onnxruntime and numpy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from .checkpoint import ModelConfig
from .errors import ConfigError

STATE_NAMES = ("state_att_shift", "state_ffn_shift", "state_wkv")


def step_path(path: str | Path) -> Path:
    """The step graph written beside a sequence graph: `OUT.onnx` -> `OUT.step.onnx`."""
    path = Path(path)
    return path.with_name(path.name[: -len(".onnx")] + ".step.onnx" if path.name.endswith(".onnx")
                          else path.name + ".step.onnx")


Dims = list  # ints for fixed sizes, names ("batch", "tokens") for dynamic ones


def io_shapes(config: ModelConfig, step: bool) -> tuple[dict[str, Dims], dict[str, Dims]]:
    """Input and output shapes of the sequence or step graph of a model: what its config implies."""
    L, C, H, N, V = config.n_layer, config.n_embd, config.n_head, config.head_size, config.vocab_size
    tok_name, lead = ("token", ["batch"]) if step else ("tokens", ["batch", "tokens"])
    states = {"state_att_shift": [L, "batch", C], "state_ffn_shift": [L, "batch", C],
              "state_wkv": [L, "batch", H, N, N]}
    logits = lead if step else ["batch", "logit_positions"]  # T - logits_from (see names.LOGITS_FROM)
    return ({tok_name: lead, **states},
            {"logits": logits + [V], **{"new_" + n: d for n, d in states.items()}})


def check_io(config: ModelConfig, kind: str, inputs: Mapping[str, Dims], outputs: Mapping[str, Dims],
             path: str | Path | None = None) -> None:
    """Refuse a graph whose inputs and outputs are not those its `rwkvq.config` metadata implies.

    Metadata can be copied onto any ONNX model; without this check such a
    model fails deep inside quantization or onnxruntime. Dynamic dimensions
    (names or None) match anything; fixed ones must agree.
    """
    want_in, want_out = io_shapes(config, kind == "step")
    for role, want, have in (("input", want_in, inputs), ("output", want_out, outputs)):
        for name, dims in want.items():
            if name not in have:
                raise ConfigError(f"not an rwkvq-onnx {kind} graph: no {role} '{name}' (its 'rwkvq.config' "
                                  f"metadata does not describe this model)", path)
            got = list(have[name])
            if len(got) != len(dims) or any(isinstance(w, int) and isinstance(h, int) and w != h
                                            for w, h in zip(dims, got)):
                raise ConfigError(f"{role} '{name}' has shape {got}, but the model's 'rwkvq.config' implies "
                                  f"{dims}", path)


