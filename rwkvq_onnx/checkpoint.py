"""Load official BlinkDL RWKV-6 (x060) and RWKV-7 (x070) checkpoints.

As with the official loader, no config file is needed: version, depth, width,
head size, vocabulary and LoRA ranks are read off the key names and shapes.
Every tensor is checked against the shape the inferred config implies, and
for NaN/Inf, so a bad file fails here with one clear message instead of
producing garbage logits later.
"""
from __future__ import annotations

import json
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import CheckpointError
from .paths import require_file

VERSIONS = ("x060", "x070")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of an RWKV model, as inferred from its checkpoint."""

    version: str
    n_layer: int
    n_embd: int
    n_head: int
    head_size: int
    vocab_size: int
    ffn_dim: int
    lora: Mapping[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "lora": dict(self.lora)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls(**json.loads(text))

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(s)) for s in expected_shapes(self).values())


def _shared_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Keys both versions have: embedding, ln0, ln_out, head and every block's ln1/ln2."""
    C = c.n_embd
    shapes: dict[str, tuple[int, ...]] = {
        "emb.weight": (c.vocab_size, C),
        "blocks.0.ln0.weight": (C,),
        "blocks.0.ln0.bias": (C,),
        "ln_out.weight": (C,),
        "ln_out.bias": (C,),
        "head.weight": (c.vocab_size, C),
    }
    for i in range(c.n_layer):
        for n in ("ln1", "ln2"):
            shapes[f"blocks.{i}.{n}.weight"] = (C,)
            shapes[f"blocks.{i}.{n}.bias"] = (C,)
    return shapes


def _key_shapes_x070(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    C, H, N, F = c.n_embd, c.n_head, c.head_size, c.ffn_dim
    lw, la, lv, lg = (c.lora[k] for k in ("w", "a", "v", "g"))
    shapes = _shared_shapes(c)
    for i in range(c.n_layer):
        b = f"blocks.{i}."
        a = b + "att."
        for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
            shapes[a + n] = (1, 1, C)
        shapes[a + "w1"], shapes[a + "w2"] = (C, lw), (lw, C)
        shapes[a + "a1"], shapes[a + "a2"] = (C, la), (la, C)
        if i > 0:
            shapes[a + "v0"] = (1, 1, C)
            shapes[a + "v1"], shapes[a + "v2"] = (C, lv), (lv, C)
        shapes[a + "g1"], shapes[a + "g2"] = (C, lg), (lg, C)
        shapes[a + "r_k"] = (H, N)
        for n in ("receptance", "key", "value", "output"):
            shapes[a + n + ".weight"] = (C, C)
        shapes[a + "ln_x.weight"] = (C,)
        shapes[a + "ln_x.bias"] = (C,)
        shapes[b + "ffn.x_k"] = (1, 1, C)
        shapes[b + "ffn.key.weight"] = (F, C)
        shapes[b + "ffn.value.weight"] = (C, F)
    return shapes


def _key_shapes_x060(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    C, H, N, F = c.n_embd, c.n_head, c.head_size, c.ffn_dim
    lm, ld = c.lora["maa"], c.lora["decay"]
    shapes = _shared_shapes(c)
    for i in range(c.n_layer):
        b = f"blocks.{i}."
        a = b + "att."
        for n in ("x", "w", "k", "v", "r", "g"):
            shapes[a + "time_maa_" + n] = (1, 1, C)
        shapes[a + "time_maa_w1"] = (C, 5 * lm)
        shapes[a + "time_maa_w2"] = (5, lm, C)
        shapes[a + "time_decay"] = (1, 1, C)
        shapes[a + "time_decay_w1"] = (C, ld)
        shapes[a + "time_decay_w2"] = (ld, C)
        shapes[a + "time_faaaa"] = (H, N)
        for n in ("receptance", "key", "value", "output", "gate"):
            shapes[a + n + ".weight"] = (C, C)
        shapes[a + "ln_x.weight"] = (C,)
        shapes[a + "ln_x.bias"] = (C,)
        shapes[b + "ffn.time_maa_k"] = (1, 1, C)
        shapes[b + "ffn.time_maa_r"] = (1, 1, C)
        shapes[b + "ffn.key.weight"] = (F, C)
        shapes[b + "ffn.receptance.weight"] = (C, C)
        shapes[b + "ffn.value.weight"] = (C, F)
    return shapes


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key an official checkpoint of this config holds, with its shape."""
    if config.version == "x070":
        return _key_shapes_x070(config)
    return _key_shapes_x060(config)


def _shape(sd: Mapping[str, np.ndarray], key: str, path: Path) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"missing key '{key}' (not a complete RWKV checkpoint)", path)
    return tuple(sd[key].shape)


def detect_version(keys: set[str], path: Path) -> str:
    """Name the architecture from the keys, or fail naming what was found."""
    if any(k.endswith("ffn.s_emb.weight") for k in keys):
        raise CheckpointError("unknown architecture: RWKV-7 DeepEmbed variant (ffn.s_emb) is not supported", path)
    if "blocks.0.att.r_k" in keys or "blocks.0.att.x_r" in keys:
        return "x070"
    if "blocks.0.att.time_maa_x" in keys:
        return "x060"
    if "blocks.0.att.time_first" in keys or "blocks.0.att.time_faaaa" in keys:
        raise CheckpointError("unknown architecture: RWKV-4/5 checkpoints are not supported (need x060 or x070)", path)
    if "emb.weight" not in keys:
        raise CheckpointError("not an RWKV checkpoint: no 'emb.weight' key", path)
    raise CheckpointError("unknown architecture: keys match neither RWKV-6 (x060) nor RWKV-7 (x070)", path)


def infer_config(sd: Mapping[str, np.ndarray], path: str | Path = "<state dict>") -> ModelConfig:
    """Infer the model shape from key names and tensor shapes alone."""
    path = Path(path)
    keys = set(sd)
    version = detect_version(keys, path)
    layer_ids = {int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not layer_ids:
        raise CheckpointError("no 'blocks.N.' keys: not an RWKV checkpoint", path)
    n_layer = max(layer_ids) + 1
    missing = sorted(set(range(n_layer)) - layer_ids)
    if missing:
        raise CheckpointError(f"missing layer(s) {missing[:5]} (blocks.0..{n_layer - 1} expected)", path)
    emb = _shape(sd, "emb.weight", path)
    if len(emb) != 2:
        raise CheckpointError(f"'emb.weight' has shape {emb}, expected [vocab, n_embd]", path)
    vocab, C = emb
    ffn_dim = _shape(sd, "blocks.0.ffn.key.weight", path)[0]
    if version == "x070":
        rk = _shape(sd, "blocks.0.att.r_k", path)
        if len(rk) != 2:
            raise CheckpointError(f"'blocks.0.att.r_k' has shape {rk}, expected [n_head, head_size]", path)
        H, N = rk
        lora = {
            "w": _shape(sd, "blocks.0.att.w1", path)[-1],
            "a": _shape(sd, "blocks.0.att.a1", path)[-1],
            "v": _shape(sd, "blocks.1.att.v1", path)[-1] if n_layer > 1 else 0,
            "g": _shape(sd, "blocks.0.att.g1", path)[-1],
        }
    else:
        tf = _shape(sd, "blocks.0.att.time_faaaa", path)
        if len(tf) != 2:
            raise CheckpointError(f"'blocks.0.att.time_faaaa' has shape {tf}, expected [n_head, head_size]", path)
        H, N = tf
        lora = {
            "maa": _shape(sd, "blocks.0.att.time_maa_w2", path)[1],
            "decay": _shape(sd, "blocks.0.att.time_decay_w1", path)[-1],
        }
    if H * N != C:
        raise CheckpointError(f"inconsistent shapes: {H} heads x {N} != n_embd {C}", path)
    return ModelConfig(version, n_layer, C, H, N, vocab, ffn_dim, lora)


def validate_state_dict(sd: Mapping[str, np.ndarray], config: ModelConfig, path: str | Path) -> None:
    """Check every expected key is present with the right shape and finite values."""
    path = Path(path)
    for key, shape in expected_shapes(config).items():
        got = _shape(sd, key, path)
        if got != shape:
            raise CheckpointError(f"inconsistent shape for '{key}': {got}, expected {shape}", path)
        if not np.isfinite(sd[key]).all():
            raise CheckpointError(f"tensor '{key}' holds NaN or Inf values", path)


def _read_torch(path: Path) -> dict:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # torch raises many types for bad files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read as a PyTorch checkpoint (truncated or not a checkpoint): {reason}", path) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("not a checkpoint: expected a dict of tensors", path)
    return obj


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read as safetensors (truncated or not a checkpoint): {reason}", path) from None


def load_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Read a `.pth` or `.safetensors` RWKV checkpoint into float32 numpy arrays.

    fp16 and bf16 checkpoints are widened to float32 (exactly). Returns the
    inferred config and the state dict with the checkpoint's own key names
    and shapes.
    """
    import torch

    path = require_file(path, "checkpoint file", CheckpointError)
    if path.stat().st_size == 0:
        raise CheckpointError("empty file, not a checkpoint", path)
    raw = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    sd: dict[str, np.ndarray] = {}
    for key, tensor in raw.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"tensor '{key}' has dtype {tensor.dtype}, expected a float type", path)
        sd[key] = tensor.detach().to(torch.float32).numpy().copy()
    config = infer_config(sd, path)
    validate_state_dict(sd, config, path)
    return config, sd


def save_checkpoint(sd: Mapping[str, np.ndarray], path: str | Path) -> None:
    """Write a state dict in the official `.pth` layout (or `.safetensors` by suffix)."""
    import torch

    from .atomic import atomic_path

    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    with atomic_path(path) as tmp:
        if Path(path).suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp))
        else:
            torch.save(tensors, tmp)
