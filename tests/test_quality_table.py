"""tools/quality_table.py on a tiny synthetic model: rows, intervals, comparisons, and commands that reproduce them."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from rwkvq_onnx.cli import main as cli_main

from .conftest import shared_file

TOOL = Path(__file__).resolve().parents[1] / "tools" / "quality_table.py"


def _tool():
    spec = importlib.util.spec_from_file_location("quality_table", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality_table"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # two rows quantized and scored, one re-run from its printed command: ~1 min alone
def test_table_rows_intervals_and_reproducible_commands(tiny_ckpt, tmp_path, capsys, monkeypatch):
    tool = _tool()
    monkeypatch.setattr(tool, "COMPARISONS", [("gptq-3.5", "rwkvquant-thresholds", "hybrid vs GPTQ (test)")])
    out = tmp_path / "q"
    tool.main([str(tiny_ckpt), "--calib", str(shared_file("data", "linuxdoc-calib.txt")),
               "--eval", str(shared_file("data", "linuxdoc-val.txt")),
               "--lambada", str(shared_file("data", "lambada_test.jsonl")), "--lambada-docs", "4",
               "--max-docs", "3", "--nsamples", "2", "--seqlen", "32",
               "--only", "gptq-3.5,rwkvquant-thresholds", "--extra-flags", "--vq-dim 1",
               "--out", str(out)])
    table = json.loads((out / "table.json").read_text())
    rows = {r["key"]: r for r in table["rows"]}
    assert set(rows) == {"gptq-3.5", "rwkvquant-thresholds"}
    for r in rows.values():
        assert "error" not in r, r
        s = r["shares"]
        assert s["sq"]["tensors"] + s["vq"]["tensors"] > 0
        for text in ("linuxdoc", "lambada"):
            x = r["texts"][text]
            d = x["delta"]
            assert d["low"] <= d["mean"] <= d["high"]
            assert d["mean"] == pytest.approx(x["bits_per_byte"] - x["fp_bits_per_byte"])
            assert x["mean_kl"] > 0 and 0 < x["top1"] <= 1
    assert rows["gptq-3.5"]["shares"]["vq"]["tensors"] == 0
    assert [(c["a"], c["b"]) for c in table["comparisons"]] == [("gptq-3.5", "rwkvquant-thresholds")]
    md = (out / "table.md").read_text()
    assert md.count("\n| ") == 2 + 2 + 1  # header, rule, fp32 and the two rows, nothing else
    assert "hybrid vs GPTQ (test)" in md

    # The printed command lines reproduce the row: same model bytes, same bits-per-byte.
    row = rows["rwkvquant-thresholds"]
    argv = row["quantize_command"].split()[1:]
    again = tmp_path / "again.onnx"
    argv[argv.index("-o") + 1] = str(again)
    argv[argv.index("--report") + 1] = str(tmp_path / "again.json")
    assert row["quantize_command"] in md
    assert cli_main(argv) == 0
    assert again.read_bytes() == (out / "rwkvquant-thresholds.onnx").read_bytes()
    capsys.readouterr()
    assert cli_main(row["eval_commands"]["lambada"].split()[1:]) == 0
    printed = capsys.readouterr().out
    assert f"bits-per-byte {row['texts']['lambada']['bits_per_byte']:.4f}" in printed


def test_the_tool_refuses_calibration_text_that_overlaps_the_evaluation_text(tmp_path):
    tool = _tool()
    words = " ".join(f"word{i % 97} token{i % 89}" for i in range(4000))
    calib, same_text, other = tmp_path / "calib.txt", tmp_path / "copy.txt", tmp_path / "other.txt"
    calib.write_text(words)
    same_text.write_text(words[1000:])
    other.write_text(" ".join(f"other{i % 83} prose{i % 79}" for i in range(4000)))
    for evaluation in (calib, same_text):
        with pytest.raises(SystemExit, match="refusing"):
            tool.check_no_overlap(calib, evaluation)
    tool.check_no_overlap(calib, other)  # disjoint: accepted
