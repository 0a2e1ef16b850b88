"""The plan is the contract: saved beside the model, and `--recipe` reproduces the model byte for byte."""
from __future__ import annotations

import json

import numpy as np
import pytest

from rwkvq_onnx.checkpoint import load_checkpoint
from rwkvq_onnx.cli import main
from rwkvq_onnx.errors import ConfigError
from rwkvq_onnx.export import export, step_path
from rwkvq_onnx.quant import GPTQConfig, VQConfig, proxies
from rwkvq_onnx.quant.apply import apply_plan
from rwkvq_onnx.quant.plan import Plan
from rwkvq_onnx.quant.policy import plan_for_budget
from rwkvq_onnx.quantize import plan_path

from .conftest import shared_file


@pytest.fixture(scope="module")
def fp_model(tmp_path_factory):
    config, sd = load_checkpoint(shared_file("fixtures", "tiny-rwkv7-834K.pth"))
    path = tmp_path_factory.mktemp("plan") / "fp.onnx"
    export(config, sd, path, mode="both")
    return path


def _quantize(fp, out, *extra) -> int:
    return main(["quantize", str(fp), "-o", str(out), "--calib", str(shared_file("data", "lambada_test.jsonl")),
                 "--nsamples", "4", "--seqlen", "64", *extra])


def test_recipe_reproduces_the_model_byte_for_byte(fp_model, tmp_path):
    first = tmp_path / "a.onnx"
    assert _quantize(fp_model, first, "--bpw", "3.35", "--vq-dim", "1", "--vq-group-cols", "32",
                     "--kmeans-iters", "5") == 0
    plan = Plan.from_json(plan_path(first).read_text())
    assert {e.kind for e in plan.entries} == {"sq", "vq"} and plan.elementwise
    assert all("P_c" in e.reasons and "rank" in e.reasons for e in plan.entries)
    again = tmp_path / "b.onnx"
    # the recipe's recorded options win over the flags given with it
    assert main(["quantize", str(fp_model), "-o", str(again), "--recipe", str(plan_path(first)),
                 "--bpw", "3.5"]) == 0
    assert again.read_bytes() == first.read_bytes()
    assert step_path(again).read_bytes() == step_path(first).read_bytes()
    assert plan_path(again).read_text() == plan_path(first).read_text()


def test_an_edited_recipe_changes_only_what_it_names(fp_model, tmp_path):
    first = tmp_path / "a.onnx"
    assert _quantize(fp_model, first, "--method", "gptq", "--kmeans-iters", "5") == 0
    doc = json.loads(plan_path(first).read_text())
    name = sorted(doc["weights"])[0]
    doc["weights"][name]["algorithm"] = "rtn"
    doc["weights"][name]["config"] = {"type": "ScalarConfig", "bits": 4, "group_size": 32, "symmetric": True}
    edited = tmp_path / "edited.plan.json"
    edited.write_text(json.dumps(doc))
    out = tmp_path / "c.onnx"
    assert main(["quantize", str(fp_model), "-o", str(out), "--recipe", str(edited)]) == 0
    plan = Plan.from_json(plan_path(out).read_text())
    assert plan.by_name()[name].algorithm == "rtn" and plan.by_name()[name].config.bits == 4


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d.update(format="other"), "not a quantization plan"),
    (lambda d: d["weights"][sorted(d["weights"])[0]].update(algorithm="gptvq"), "does not take a GPTQConfig"),
    (lambda d: d["weights"].pop(sorted(d["weights"])[0]), "has no entry for"),
    (lambda d: d["weights"][sorted(d["weights"])[0]].update(shape=[3, 3]), "in the plan"),
    (lambda d: d["policy"]["options"].update(bogus=1), "unknown option"),
])
def test_bad_recipes_are_one_line_errors(fp_model, tmp_path, capsys, mutate, needle):
    first = tmp_path / "a.onnx"
    assert _quantize(fp_model, first, "--method", "gptq") == 0
    doc = json.loads(plan_path(first).read_text())
    mutate(doc)
    bad = tmp_path / "bad.plan.json"
    bad.write_text(json.dumps(doc))
    capsys.readouterr()
    out = tmp_path / "never.onnx"
    assert main(["quantize", str(fp_model), "-o", str(out), "--recipe", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_applying_a_plan_is_pure_and_block_by_block_equals_all_at_once():
    rng = np.random.default_rng(0)
    weights = {f"blocks.{i}.w": rng.laplace(0, 0.02, (64, 128)).astype(np.float32) for i in range(3)}
    x = rng.standard_normal((512, 128))
    hessians = {n: 2 / 512 * x.T @ x for n in weights}
    shapes = {n: w.shape for n, w in weights.items()}
    plan = plan_for_budget(shapes, {n: proxies(w) for n, w in weights.items()}, 3.34, GPTQConfig(),
                           VQConfig(dim=1, group_cols=32, kmeans_iters=5))
    assert {e.kind for e in plan.entries} == {"sq", "vq"}
    before = {n: w.copy() for n, w in weights.items()}
    whole = apply_plan(plan, weights, hessians)
    parts = [apply_plan(plan.subset({n}), {n: weights[n]}, hessians) for n in weights]
    for n in weights:
        np.testing.assert_array_equal(weights[n], before[n])  # inputs untouched
        part = next(p for p in parts if n in p.linear)
        np.testing.assert_array_equal(part.linear[n].dequantize(), whole.linear[n].dequantize())
    assert Plan.from_json(plan.to_json()) == plan


def test_plan_json_rejects_garbage():
    with pytest.raises(ConfigError, match="not JSON"):
        Plan.from_json("{", "x.json")
