"""`eval --text` on long files: chunked by default, stable JSON, readable perplexities (issue 16, item 5)."""
from __future__ import annotations

import json

import pytest

from rwkvq_onnx.cli import main
from rwkvq_onnx.evaluate import DEFAULT_CHUNK_CHARS, format_perplexity, read_documents


def test_large_perplexities_print_in_scientific_notation():
    assert format_perplexity(281939049.156) == "2.8194e+08"
    assert format_perplexity(58.5951) == "58.595"


def test_back_to_back_chunks_keep_the_tail(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("abcdefghij")
    assert read_documents(p, chunk_len=4) == ["abcd", "efgh", "ij"]
    assert read_documents(p, chunk_len=4, chunk_every=5) == ["abcd", "fghi"]  # strided: whole chunks only


@pytest.fixture(scope="module")
def fp_model(tiny_ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "fp.onnx"
    assert main(["export", str(tiny_ckpt), "-o", str(path)]) == 0
    return path


def test_eval_text_chunks_plain_text_by_default(fp_model, tmp_path, capsys):
    text = tmp_path / "long.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * (2 * DEFAULT_CHUNK_CHARS // 45 + 3))
    out_json = tmp_path / "eval.json"
    assert main(["eval", str(fp_model), "--text", str(text), "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert f"3 chunk(s) of {DEFAULT_CHUNK_CHARS} characters" in out and "3 docs" in out
    res = json.loads(out_json.read_text())
    assert set(res["text"]) == {"documents", "tokens", "bytes", "nll_nats", "perplexity", "bits_per_byte"}
    assert res["text"]["documents"] == 3 and res["text_chunking"]["chunk_len"] == DEFAULT_CHUNK_CHARS
    assert main(["eval", str(fp_model), "--text", str(text), "--chunk-len", "0"]) == 0
    assert "1 docs" in capsys.readouterr().out
