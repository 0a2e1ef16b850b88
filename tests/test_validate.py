"""`validate`: fp vs quantized passes on a good model and fails on a corrupted one; same-weights tolerances
are per output; the Polygraphy data loader script runs under Polygraphy's own CLI (issues 14.17 and 16.1)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from rwkvq_onnx.cli import main
from rwkvq_onnx.demo import sample_text
from rwkvq_onnx.errors import RwkvqError
from rwkvq_onnx.export import step_path
from rwkvq_onnx import polygraphy_data
from rwkvq_onnx.validate import (AGREEMENT, SAME, _runner, choose_mode, model_info, state_rel_error,
                                 validate)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tiny_ckpt, tmp_path_factory):
    """fp (both graphs), its RWKVQuant quantization, and a copy with every VQ code array shuffled."""
    d = tmp_path_factory.mktemp("validate")
    calib = d / "calib.txt"
    calib.write_text(sample_text() * 2)
    fp = d / "fp.onnx"
    assert main(["export", str(tiny_ckpt), "-o", str(fp), "--mode", "both"]) == 0
    q = d / "q.onnx"
    assert main(["quantize", str(fp), "-o", str(q), "--bpw", "3.275", "--sym", "sym", "--calib", str(calib), "--nsamples", "4",
                 "--seqlen", "64"]) == 0
    bad = d / "bad.onnx"
    scramble_codes(q, bad)
    return fp, q, bad


def scramble_codes(src: Path, dst: Path) -> int:
    """Shuffle the entries of every `*_codes` initializer (a broken quantizer: right codebooks, wrong indices)."""
    m = onnx.load(src)
    rng = np.random.default_rng(0)
    n = 0
    for init in m.graph.initializer:
        if init.name.endswith("_codes"):
            flat = numpy_helper.to_array(init).copy().reshape(-1)
            rng.shuffle(flat)
            init.CopyFrom(numpy_helper.from_array(flat.reshape(init.dims), init.name))
            n += 1
    onnx.save(m, dst)
    return n


def test_mode_follows_quantization_metadata(models):
    fp, q, _ = models
    a, b = model_info(fp), model_info(q)
    assert a.quantization is None and b.quantization is not None
    assert choose_mode(a, b) == AGREEMENT and choose_mode(b, b) == SAME and choose_mode(a, a) == SAME
    assert model_info(step_path(q)).graph == "step"


def test_readme_validate_passes_good_quantized_model_and_fails_corrupted_one(models, capsys):
    fp, q, bad = models
    assert main(["validate", str(fp), str(q)]) == 0
    out = capsys.readouterr().out
    assert "mode agreement" in out and "PASSED (fp vs quantized)" in out
    for row in ("mean KL(a||b)", "max KL(a||b)", "top-1 agreement", "logit range", "state relative error"):
        assert row in out
    assert "[E]" not in out
    assert main(["validate", str(fp), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "FAILED (fp vs quantized)" in out and "FAIL" in out.split("FAILED")[0]


def test_step_graphs_are_compared_on_their_own_state(models, capsys):
    fp, q, _ = models
    assert main(["validate", str(step_path(fp)), str(step_path(q)), "--tokens", "24"]) == 0
    assert "24 tokens" in capsys.readouterr().out


def test_same_weights_tolerances_are_per_output(models, capsys):
    fp, q, _ = models
    tokens = list(sample_text().encode()[:12])
    res = validate(fp, q, tokens, atol=10.0, rtol=0.0, state_atol=1e-7, state_rtol=0.0)
    assert not res.passed
    assert res.output_passed["logits"] and not res.output_passed["new_state_wkv"]
    assert res.tolerances["logits"] == (10.0, 0.0) and res.tolerances["new_state_wkv"] == (1e-7, 0.0)
    assert main(["validate", str(q), str(q), "--tokens", "12"]) == 0  # same model: auto -> same weights
    out = capsys.readouterr().out
    assert "mode same" in out and "PASSED (same weights)" in out and "1.0e-04" in out
    assert main(["validate", str(fp), str(q), "--mode", "same", "--tokens", "12"]) == 1
    out = capsys.readouterr().out
    assert "OUT OF TOLERANCE" in out and "[E]" not in out


def test_state_relative_error():
    a = {"s": np.array([3.0, 4.0])}
    assert state_rel_error(a, {"s": np.array([3.0, 4.0])}) == 0.0
    assert state_rel_error(a, {"s": np.array([3.0, 3.0])}) == pytest.approx(0.2)


def test_plan_is_loaded_without_registering_plugins(models, tmp_path, monkeypatch):
    """A .plan carries its plugins; validate only deserializes it (TensorRT itself is faked here)."""
    fp, _, _ = models
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"engine bytes")
    with pytest.raises(RwkvqError, match="m.plan.json"):
        model_info(plan)
    Path(str(plan) + ".json").write_text("{}")
    with pytest.raises(RwkvqError, match="'onnx' field"):
        model_info(plan)
    Path(str(plan) + ".json").write_text(json.dumps({"onnx": str(fp)}))
    assert model_info(plan).config == model_info(fp).config
    from rwkvq_onnx.plugins import trt_plugins

    monkeypatch.setattr(trt_plugins, "register_plugins", lambda *a, **k: pytest.fail("plugins registered"))
    fake_trt = types.ModuleType("polygraphy.backend.trt")
    fake_trt.EngineFromBytes = lambda data: ("engine", data)
    fake_trt.TrtRunner = lambda engine, name: ("runner", engine, name)
    monkeypatch.setitem(sys.modules, "polygraphy.backend.trt", fake_trt)
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    assert _runner(plan, "b") == ("runner", ("engine", b"engine bytes"), "b")


def test_polygraphy_data_loader_feeds_match_the_graph(models):
    fp, _, _ = models
    seq = polygraphy_data.feeds(str(fp), "zero", tokens=5)
    assert len(seq) == 1 and seq[0]["tokens"].shape == (1, 5) and not seq[0]["state_wkv"].any()
    step = polygraphy_data.feeds(str(step_path(fp)), "random", tokens=3, seed=1)
    assert [f["token"].shape for f in step] == [(1,)] * 3 and step[0]["state_wkv"].std() > 0
    assert all(0 <= f["token"][0] < 256 for f in step)


@pytest.mark.parametrize("graph", ["sequence", "step"])
def test_polygraphy_cli_runs_with_the_data_loader_script(graph, tiny_ckpt, tmp_path):
    # Polygraphy's onnxruntime runner cannot load the rwkvq ops (WKV7Sequence, WKV7Step): the standard-op graphs
    fp = tmp_path / "standard.onnx"
    assert main(["export", str(tiny_ckpt), "-o", str(fp), "--mode", "both", "--wkv-op", "standard"]) == 0
    model = fp if graph == "sequence" else step_path(fp)
    env = {**os.environ, "RWKVQ_MODEL": str(model), "RWKVQ_STATE": "random", "RWKVQ_TOKENS": "3"}
    script = REPO / "rwkvq_onnx" / "polygraphy_data.py"
    run = subprocess.run([sys.executable, "-c", "import sys; from polygraphy.tools import main; sys.exit(main())",
                          "run", str(model), "--onnxrt", "--data-loader-script", f"{script}:load_data"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "PASSED" in run.stdout + run.stderr
    assert "'colored' module is not installed" not in run.stdout + run.stderr
    iterations = (run.stdout + run.stderr).count("[I] Iteration: ")
    assert iterations == (1 if graph == "sequence" else 3)


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    assert main(["validate", str(tmp_path / "none.onnx"), str(tmp_path / "q.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "none.onnx" in err
    monkeypatch.delenv("RWKVQ_MODEL", raising=False)
    with pytest.raises(RwkvqError, match="RWKVQ_MODEL"):
        next(polygraphy_data.load_data())
    with pytest.raises(RwkvqError, match="RWKVQ_STATE"):
        polygraphy_data.feeds(str(tmp_path / "none.onnx"), state="ones")
