"""The report page explains itself: the decision rule in words, every colour named (issue 16, item 9)."""
from __future__ import annotations

import json

import pytest

from rwkvq_onnx.cli import main
from rwkvq_onnx.report import (MISSING_COLOUR, categories, colour_word, decision_prose, fixed_threshold_method,
                               map_title)


def _row(kind, method, pc, pf, bpw=3.25):
    return {"kind": kind, "method": method, "proxy_coarse": pc, "proxy_fine": pf, "bpw": bpw,
            "rel_output_error": 0.01}


ROWS = {
    "blocks.0.att.key.weight": _row("sq", "gptq", 1.2, 20.0),     # SQ by the rule
    "blocks.0.att.value.weight": _row("vq", "gptvq", 1.8, 900.0),  # VQ by the rule
    "blocks.1.att.key.weight": _row("sq", "gptq", 1.6, 30.0),     # rule says VQ (P_c), target moved it to SQ
    "blocks.1.att.v1": _row("vq", "gptvq", 1.7, 80.0),            # layer 0 has no v1: a missing cell
}


def _report(target):
    return {"input": "missing.onnx", "output": "q.onnx", "options": {"method": "rwkvquant", "tau_c": 1.5,
                                                                     "tau_f": 50.0, "bpw": target},
            "totals": {"bpw": 3.3, "bpw_target": target, "methods": {"gptq": 2, "gptvq": 2}}, "tensors": ROWS}


def test_rule_is_sq_iff_both_proxies_are_below_their_thresholds():
    assert fixed_threshold_method(ROWS["blocks.0.att.key.weight"], 1.5, 50) == "sq"
    assert fixed_threshold_method(ROWS["blocks.1.att.key.weight"], 1.5, 50) == "vq"
    assert fixed_threshold_method(_row("sq", "gptq", 1.0, 60.0), 1.5, 50) == "vq"
    assert fixed_threshold_method({"kind": "sq"}, 1.5, 50) is None  # a baseline without proxies


def test_prose_explains_the_rule_and_the_ranking_at_a_target():
    text = " ".join(decision_prose(_report(3.3), ROWS, 1.5, 50.0))
    assert "SQ if and only if P_c < tau_c = 1.5 and P_f < tau_f = 50" in text
    assert "thresholds alone would give 1 SQ and 3 VQ" in text
    assert "decreasing score" in text and "1 weight(s) differ" in text and "2 SQ and 2 VQ" in text
    fixed = " ".join(decision_prose(_report(None), ROWS, 1.5, 50.0))
    assert "No bits-per-weight target" in fixed and "decreasing score" not in fixed


def test_every_colour_is_named_in_the_title_and_matches_the_palette():
    palette = categories(ROWS)
    assert set(palette) == {("sq", "gptq"), ("vq", "gptvq")}
    title = map_title(palette, has_missing=True)
    for cat, col in palette.items():
        assert f"= {colour_word(col)}" in title
    assert f"no such weight = {colour_word(MISSING_COLOUR)}" in title
    only_vq = categories({k: v for k, v in ROWS.items() if v["kind"] == "vq"})
    assert "blue" not in map_title(only_vq, has_missing=False)  # no colour named that the map does not show


def test_report_page_renders_with_the_prose_and_tolerates_missing_keys(tmp_path):
    pytest.importorskip("matplotlib")
    rows = dict(ROWS)
    rows["blocks.1.ffn.key.weight"] = {"kind": "sq", "method": "rtn"}  # no proxies, no bpw: still rendered
    report = {**_report(3.3), "tensors": rows}
    path = tmp_path / "q.json"
    path.write_text(json.dumps(report))
    out = tmp_path / "r.html"
    assert main(["report", str(path), "-o", str(out), "--histograms", "0"]) == 0
    page = out.read_text()
    assert "What the proxy decided, and why" in page and "if and only if" in page
    assert page.count("data:image/png;base64,") == 3 and "blocks.1.ffn.key.weight" in page
    assert "{" not in page.split("<body>", 1)[1].split("<h2>", 1)[0]  # the summary line has no raw dict
