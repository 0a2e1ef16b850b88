"""Checkpoint loading: config inference and one clear error per kind of bad file."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rwkvq_onnx.checkpoint import infer_config, load_checkpoint, save_checkpoint
from rwkvq_onnx.cli import main
from rwkvq_onnx.errors import CheckpointError

from .conftest import shared_file


def test_fixture_configs_inferred_from_keys():
    c7, _ = load_checkpoint(shared_file("fixtures", "tiny-rwkv7-834K.pth"))
    assert (c7.version, c7.n_layer, c7.n_embd, c7.n_head, c7.head_size, c7.vocab_size) == ("x070", 12, 64, 1, 64, 256)
    assert c7.lora == {"w": 32, "a": 32, "v": 32, "g": 32}
    c6, _ = load_checkpoint(shared_file("fixtures", "tiny-rwkv6-1m.pth"))
    assert (c6.version, c6.n_layer, c6.n_head, c6.head_size, c6.ffn_dim) == ("x060", 12, 8, 8, 224)
    assert c6.lora == {"maa": 32, "decay": 64}
    cr, _ = load_checkpoint(shared_file("fixtures", "ref-rwkv7-L4-D256.pth"))
    assert cr.n_params == 3608320  # the fixture's own json


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_and_safetensors_inputs(tiny_ckpt, tmp_path, dtype):
    config, sd = load_checkpoint(tiny_ckpt)
    half = {k: torch.from_numpy(v).to(dtype) for k, v in sd.items()}
    pth = tmp_path / "half.pth"
    torch.save(half, pth)
    from safetensors.torch import save_file

    st = tmp_path / "half.safetensors"
    save_file(half, str(st))
    for path in (pth, st):
        c2, sd2 = load_checkpoint(path)
        assert c2 == config
        key = "blocks.1.att.key.weight"
        assert sd2[key].dtype == np.float32
        np.testing.assert_array_equal(sd2[key], half[key].float().numpy())


def _bad(tmp_path, sd, name="bad.pth"):
    path = tmp_path / name
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, path)
    return path


def _cases(tmp_path, tiny_ckpt):
    _, sd = load_checkpoint(tiny_ckpt)
    text = tmp_path / "notes.pth"
    text.write_text("hello, I am not a checkpoint")
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(tiny_ckpt.read_bytes()[: tiny_ckpt.stat().st_size // 2])
    trunc_st = tmp_path / "trunc.safetensors"
    save_checkpoint(sd, tmp_path / "ok.safetensors")
    trunc_st.write_bytes((tmp_path / "ok.safetensors").read_bytes()[:5000])
    v5 = {k.replace("att.x_r", "att.time_first"): v for k, v in sd.items() if not k.endswith(("att.r_k",))}
    missing = {k: v for k, v in sd.items() if k != "blocks.1.att.value.weight"}
    shape = dict(sd, **{"blocks.1.ffn.key.weight": np.zeros((100, 64), np.float32)})
    nan = dict(sd)
    nan["blocks.0.att.w1"] = sd["blocks.0.att.w1"].copy()
    nan["blocks.0.att.w1"][3, 4] = np.nan
    inf = dict(sd, **{"head.weight": np.full_like(sd["head.weight"], np.inf)})
    return {
        "not a checkpoint": (text, "cannot read as a PyTorch checkpoint"),
        "truncated": (trunc, "truncated"),
        "truncated safetensors": (trunc_st, "truncated"),
        "unknown architecture": (_bad(tmp_path, v5, "v5.pth"), "unknown architecture"),
        "missing key": (_bad(tmp_path, missing, "missing.pth"), "missing key 'blocks.1.att.value.weight'"),
        "inconsistent shape": (_bad(tmp_path, shape, "shape.pth"), "inconsistent shape for 'blocks.1.ffn.key.weight'"),
        "nan": (_bad(tmp_path, nan, "nan.pth"), "'blocks.0.att.w1' holds NaN or Inf"),
        "inf": (_bad(tmp_path, inf, "inf.pth"), "'head.weight' holds NaN or Inf"),
        "no file": (tmp_path / "absent.pth", "no such file"),
    }


def test_bad_checkpoints_raise_one_clear_error(tmp_path, tiny_ckpt):
    for case, (path, needle) in _cases(tmp_path, tiny_ckpt).items():
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        msg = str(info.value)
        assert needle in msg, (case, msg)
        assert str(path) in msg and "\n" not in msg, case


def test_cli_export_bad_input_exits_2_and_writes_nothing(tmp_path, tiny_ckpt, capsys):
    for case, (path, needle) in _cases(tmp_path, tiny_ckpt).items():
        out = tmp_path / f"out-{case.replace(' ', '_')}.onnx"
        assert main(["export", str(path), "-o", str(out), "--mode", "both"]) == 2, case
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and str(path) in err, (case, err)
        assert not out.exists() and not out.with_name(out.stem + ".step.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_unwritable_output_is_a_clear_error(tmp_path, tiny_ckpt, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        target = locked / "m.onnx"
        import os

        if os.access(locked, os.W_OK):  # running as root: permissions do not bind
            target = tmp_path / "no-such-folder" / "m.onnx"
        assert main(["export", str(tiny_ckpt), "-o", str(target)]) == 2
        err = capsys.readouterr().err
        assert str(target) in err and ("not writable" in err or "does not exist" in err)
    finally:
        locked.chmod(0o700)


def test_infer_config_needs_no_config_file(tiny_ckpt):
    _, sd = load_checkpoint(tiny_ckpt)
    config = infer_config(sd)
    assert (config.n_layer, config.n_embd, config.n_head, config.head_size) == (2, 64, 2, 32)
    wrapped = tiny_ckpt.with_name("wrapped.pth")
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, wrapped)
    assert load_checkpoint(wrapped)[0] == config
