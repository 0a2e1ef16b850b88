"""Tokenizers, evaluation, generation and the CLI around them."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from rwkvq_onnx.cli import main
from rwkvq_onnx.errors import CalibrationError, ConfigError
from rwkvq_onnx.evaluate import evaluate_lambada, evaluate_text, read_documents
from rwkvq_onnx.export import export
from rwkvq_onnx.checkpoint import load_checkpoint
from rwkvq_onnx.generate import generate
from rwkvq_onnx.runtime import RwkvSession
from rwkvq_onnx.tokenizers import ByteTokenizer, HFTokenizer, WorldTokenizer, get_tokenizer

from .conftest import shared_file


@pytest.fixture(scope="module")
def ref_model(tmp_path_factory):
    """The trained reference RWKV-7 (byte level), exported with its step graph."""
    config, sd = load_checkpoint(shared_file("fixtures", "ref-rwkv7-L4-D256.pth"))
    path = tmp_path_factory.mktemp("ref") / "ref.onnx"
    export(config, sd, path, mode="both")
    return path


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    assert main(["export", str(tiny_ckpt), "-o", str(path), "--mode", "both"]) == 0
    return path


def test_tokenizers_round_trip_and_auto_choice(tmp_path):
    text = "Héllo, world!\n\nRWKV is an RNN."
    assert get_tokenizer(None, 256).name == "bytes"
    assert ByteTokenizer().decode(ByteTokenizer().encode(text)) == text
    world = get_tokenizer("auto", 65536)
    assert isinstance(world, WorldTokenizer) and world.bos == 0
    ids = world.encode(text)
    assert world.decode(ids) == text and len(ids) < len(text.encode()) and max(ids) < 65536
    with pytest.raises(ConfigError, match="--tokenizer"):
        get_tokenizer(None, 50277)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([text] * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<unk>"]))
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    tok = get_tokenizer(str(path), 50277)
    assert isinstance(tok, HFTokenizer) and tok.bos == 0
    assert tok.decode(tok.encode("RWKV is an RNN.")).strip() == "RWKV is an RNN."


def test_eval_reproduces_reference_bits_per_byte(ref_model):
    """The fixture's json gives fp32 bits-per-byte 2.0909 on 24 chunks of 384 bytes every 8000."""
    docs = read_documents(shared_file("data", "linuxdoc-val.txt"), chunk_len=384, chunk_every=8000)[:24]
    result = evaluate_text(RwkvSession(ref_model), ByteTokenizer(), docs, progress=False)
    expected = json.loads(shared_file("fixtures", "ref-rwkv7-L4-D256.json").read_text())
    ref_bpb = expected["bits_per_byte_fp32"]["linuxdoc-val.txt, 24 chunks of 384 bytes every 8000 bytes"]
    assert result.tokens == 24 * 383
    assert abs(result.bits_per_byte - ref_bpb) < 5e-4
    assert result.perplexity == pytest.approx(2 ** (result.bits_per_byte * result.bytes / result.tokens), rel=1e-9)


def test_lambada_scores_a_known_easy_and_hard_example(ref_model):
    sess = RwkvSession(ref_model)
    res = evaluate_lambada(sess, ByteTokenizer(), read_documents(shared_file("data", "lambada_test.jsonl"))[:20],
                           progress=False)
    assert res.examples == 20 and 0 <= res.accuracy <= 1 and res.perplexity > 1
    # the model was trained on kernel documentation: it completes a phrase from that domain greedily
    easy = evaluate_lambada(sess, ByteTokenizer(), ["The operating system is called the Linux kernel"], progress=False)
    hard = evaluate_lambada(sess, ByteTokenizer(), ["The operating system is called the Linux zqxjw"], progress=False)
    assert easy.perplexity < hard.perplexity


def test_eval_cli_json_and_errors(tiny_model, tmp_path, capsys):
    text = tmp_path / "t.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"sample number {i} ends with word"}) for i in range(5)))
    out = tmp_path / "r.json"
    assert main(["eval", str(tiny_model), "--text", str(text), "--lambada", str(text), "--json", str(out),
                 "--max-docs", "3"]) == 0
    report = json.loads(out.read_text())
    assert report["text"]["documents"] == 3 and report["lambada"]["examples"] == 3
    assert report["text"]["bits_per_byte"] > 0 and report["tokenizer"] == "bytes"
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    for args, needle in [
        (["--text", str(empty)], "holds no text"),
        (["--text", str(bad)], "line 2 is not JSON"),
        (["--lambada", str(tmp_path / "nope.jsonl")], "no such file"),
        ([], "needs --text"),
    ]:
        capsys.readouterr()
        assert main(["eval", str(tiny_model), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1
    assert main(["eval", str(tmp_path / "missing.onnx"), "--text", str(text)]) == 2
    not_rwkv = tmp_path / "x.onnx"
    not_rwkv.write_bytes(b"garbage")
    assert main(["eval", str(not_rwkv), "--text", str(text)]) == 2
    assert "cannot load ONNX model" in capsys.readouterr().err


def test_generate_greedy_is_deterministic_and_uses_step_graph(ref_model):
    sess = RwkvSession(ref_model)
    assert sess.step_session is not None and sess.step_session is not sess.sequence
    a = generate(sess, ByteTokenizer(), "The kernel", 40, greedy=True)
    b = generate(RwkvSession(ref_model, use_step_graph=False), ByteTokenizer(), "The kernel", 40, greedy=True)
    assert a.text == b.text and a.new_tokens == 40 and a.prompt_tokens == 10
    assert sum(c.isalpha() for c in a.text) > 20  # a trained model writes words
    s1 = generate(sess, ByteTokenizer(), "The kernel", 30, temperature=1.0, top_p=0.9, seed=7)
    s2 = generate(sess, ByteTokenizer(), "The kernel", 30, temperature=1.0, top_p=0.9, seed=7)
    assert s1.text == s2.text


def test_generate_cli_prints_text_and_speed(tiny_model, capsys):
    assert main(["generate", str(tiny_model), "--prompt", "Hi", "--max-tokens", "8", "--greedy"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("Hi")
    assert "prefill: 2 tokens" in lines[-1] and "decode: 8 tokens" in lines[-1] and "tokens/s" in lines[-1]
    assert main(["generate", str(tiny_model), "--prompt", "Hi", "--top-p", "0"]) == 2


def test_session_with_step_graph_only(tiny_ckpt, tmp_path):
    config, sd = load_checkpoint(tiny_ckpt)
    step_only = tmp_path / "only.onnx"
    export(config, sd, step_only, mode="step")
    seq = tmp_path / "seq.onnx"
    export(config, sd, seq)
    toks = np.array([[5, 6, 7, 8]])
    np.testing.assert_allclose(RwkvSession(step_only).forward(toks)[0], RwkvSession(seq).forward(toks)[0], atol=1e-5)


@pytest.mark.slow
def test_readme_demo_command_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rwkvq_onnx.cli", "demo", "--out", str(tmp_path / "demo")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "[5/6] generate" in out.stdout and "tokens/s" in out.stdout
    line = [l for l in out.stdout.splitlines() if l.startswith("[6/6] quantized with RWKVQuant to ")][0]
    assert 3.295 <= float(line.split(" to ")[1].split()[0]) <= 3.3  # landed on the target, no fallback
    err_line = [l for l in out.stdout.splitlines() if "max |logit difference|" in l][0]
    assert float(err_line.split("difference| ")[1].split()[0]) < 1e-4
    assert (tmp_path / "demo" / "synthetic-rwkv7.step.onnx").is_file()


def test_read_documents_chunks_plain_text(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("abcdefghij")
    assert read_documents(p, chunk_len=4, chunk_every=3) == ["abcd", "defg", "ghij"]
    assert read_documents(p) == ["abcdefghij"]
    with pytest.raises(CalibrationError):
        read_documents(tmp_path / "none.txt")
