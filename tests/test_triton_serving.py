"""triton-repo: batch-first serving driven as Triton's sequence batcher would, configs parsed with Triton's own
schema, the name and the model checked before anything is written, atomic writes and one-line errors."""
from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from rwkvq_onnx.cli import main
from rwkvq_onnx.errors import ConfigError
from rwkvq_onnx.export import step_path
from rwkvq_onnx.runtime import RwkvSession, session_options
from rwkvq_onnx.triton import OP_LIBRARY_NAME, parse_model_config, triton_repo

from .conftest import GOLDEN_TEXT


@pytest.fixture(scope="module")
def quantized(tiny_sym_quantized):
    """A tiny RWKV-7 exported (both graphs) and quantized with RWKVQuant (VQ ops in the graph)."""
    fp, q, calib = tiny_sym_quantized
    return fp, q


@pytest.fixture(scope="module")
def repo(quantized, tmp_path_factory):
    _, q = quantized
    lines: list[str] = []
    folder = triton_repo(q, tmp_path_factory.mktemp("repo") / "models", name="tiny", max_batch=3, log=lines.append)
    return folder, lines


def test_onnx_repository_config_batches_sequences_without_controls(repo):
    folder, lines = repo
    cfg = parse_model_config((folder / "config.pbtxt").read_text())
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 3
    sb = cfg.sequence_batching
    assert sb.WhichOneof("strategy_choice") == "oldest" and sb.oldest.max_candidate_sequences == 3
    assert len(sb.control_input) == 0  # no START/CORRID: the graph has no such inputs
    assert [s.input_name for s in sb.state] == ["state_att_shift", "state_ffn_shift", "state_wkv"]
    assert list(sb.state[2].dims) == [2, 2, 32, 32]  # [L, H, N, N]: the batch dimension is Triton's
    assert all(s.initial_state[0].zero_data for s in sb.state)
    assert [i.name for i in cfg.input] == ["token"] and list(cfg.input[0].reshape.shape) == []
    assert list(cfg.output[0].dims) == [256]
    graph_inputs = {i.name for i in onnx.load(folder / "1" / "model.onnx").graph.input}
    assert {c.name for c in sb.control_input} <= graph_inputs


def test_onnx_repository_keeps_the_quantized_ops_and_ships_the_native_library(repo):
    folder, lines = repo
    cfg = parse_model_config((folder / "config.pbtxt").read_text())
    libs = list(cfg.model_operations.op_library_filename)
    assert libs == [str(folder.resolve() / OP_LIBRARY_NAME)] and os.path.isfile(libs[0])
    model = onnx.load(folder / "1" / "model.onnx")
    assert any(n.domain == "rwkvq" and n.op_type == "VQMatMul" for n in model.graph.node)
    # the shipped library alone runs the model (what Triton's onnxruntime backend does with model_operations)
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(libs[0])
    ort.InferenceSession(str(folder / "1" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    text = " ".join(lines)
    assert "step graph" in text and "batch-first" in text and "native op library" in text


def test_batch_first_graph_serves_sequences_as_the_sequence_batcher_does(repo, quantized):
    """Sequences join and leave a batch over steps, slots are reused; each sequence's logits must equal
    running it alone through the exported (layer-first) step graph."""
    folder, _ = repo
    _, q = quantized
    served = ort.InferenceSession(str(folder / "1" / "model.onnx"), session_options(),
                                  providers=["CPUExecutionProvider"])
    alone = RwkvSession(q, kernels="exact")
    text = np.frombuffer(GOLDEN_TEXT, np.uint8).astype(np.int64)
    sequences = {i: text[7 * i: 7 * i + n] for i, n in enumerate((5, 9, 3, 7, 4, 6))}
    slots = 3
    rng = np.random.default_rng(0)
    waiting, active = list(sequences), []
    state, pos, served_logits = {}, {}, {i: [] for i in sequences}
    max_seen = 0
    while waiting or active:
        while waiting and len(active) < slots:  # the batcher starts a new sequence in a free slot
            sid = waiting.pop(0)
            active.append(sid)
            pos[sid] = 0
            state[sid] = None  # zero initial state
        rng.shuffle(active)  # a sequence's place in the batch varies from step to step
        max_seen = max(max_seen, len(active))
        c = alone.config
        zero = (np.zeros((c.n_layer, c.n_embd), np.float32), np.zeros((c.n_layer, c.n_embd), np.float32),
                np.zeros((c.n_layer, c.n_head, c.head_size, c.head_size), np.float32))
        feeds = {"token": np.array([sequences[s][pos[s]] for s in active], np.int64)}
        for k, name in enumerate(("state_att_shift", "state_ffn_shift", "state_wkv")):
            feeds[name] = np.stack([zero[k] if state[s] is None else state[s][k] for s in active])
        logits, *new_state = served.run(None, feeds)
        for b, sid in enumerate(list(active)):
            served_logits[sid].append(logits[b])
            state[sid] = tuple(ns[b] for ns in new_state)
            pos[sid] += 1
            if pos[sid] == len(sequences[sid]):  # sequence end: the slot is freed
                active.remove(sid)
    assert max_seen == slots
    for sid, tokens in sequences.items():
        st = None
        for t, tok in enumerate(tokens):
            ref, st = alone.step(np.array([tok]), st)
            np.testing.assert_allclose(served_logits[sid][t], ref[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["../../x", "..", ".", "", "x/y", "/abs", ".hidden", "a b", "x\\y"])
def test_name_must_be_one_model_name_component(quantized, tmp_path, capsys, name):
    _, q = quantized
    out = tmp_path / "sub" / "models"
    assert main(["triton-repo", str(q), "-o", str(out), "--name", name]) == 2
    err = capsys.readouterr().err
    assert "--name" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sub").exists() and not (tmp_path / "x").exists()


def _vq_matmul(model):
    return next(n for n in model.graph.node if n.op_type == "VQMatMul")


def test_corrupted_vq_model_is_refused_before_writing(quantized, tmp_path, capsys):
    _, q = quantized
    model = onnx.load(step_path(q))
    node = _vq_matmul(model)
    for a in node.attribute:
        if a.name == "group_cols":
            a.i = 3  # not a multiple of dim: the CPU decode would read past the codebook table
    bad = tmp_path / "bad.step.onnx"
    onnx.save(model, bad)
    assert main(["triton-repo", str(bad), "-o", str(tmp_path / "models")]) == 2
    err = capsys.readouterr().err
    assert node.name in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "models" / "rwkv").exists()


def test_one_line_errors_for_bad_inputs_and_outputs(quantized, tmp_path, capsys, monkeypatch):
    _, q = quantized
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01 this is not protobuf" * 10)
    assert main(["triton-repo", str(junk), "-o", str(tmp_path / "m1")]) == 2
    assert "ONNX" in capsys.readouterr().err
    # external data pointing outside the model's folder
    model = onnx.load(step_path(q))
    big = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    big.ClearField("raw_data")
    big.data_location = onnx.TensorProto.EXTERNAL
    big.external_data.add(key="location", value="../../../etc/passwd")
    evil = tmp_path / "evil.step.onnx"
    evil.write_bytes(model.SerializeToString())
    assert main(["triton-repo", str(evil), "-o", str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "evil.step.onnx" in err and "outside" in err
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()  # nothing created for bad input
    # a repository path under a file, and an unwritable folder
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["triton-repo", str(q), "-o", str(blocker / "models")]) == 2
    assert "repository" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(locked) else real_access(p, m))
    assert main(["triton-repo", str(q), "-o", str(locked)]) == 2
    assert "not writable" in capsys.readouterr().err
    monkeypatch.setattr(os, "access", real_access)  # root passes access(): the write itself fails

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("tempfile.mkdtemp", denied)
    assert main(["triton-repo", str(q), "-o", str(locked)]) == 2
    err = capsys.readouterr().err
    assert "Permission denied" in err and len(err.strip().splitlines()) == 1


def test_full_disk_leaves_nothing_and_a_rerun_works(quantized, tmp_path, capsys, monkeypatch):
    _, q = quantized
    out = tmp_path / "models"
    real_copy = shutil.copyfile

    def full(src, dst, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full)
    assert main(["triton-repo", str(q), "-o", str(out), "--name", "m"]) == 2
    err = capsys.readouterr().err
    assert "no space left" in err and len(err.strip().splitlines()) == 1
    assert list(out.iterdir()) == []  # no partial model folder, no temporary folder
    monkeypatch.setattr(shutil, "copyfile", real_copy)
    assert main(["triton-repo", str(q), "-o", str(out), "--name", "m"]) == 0
    assert (out / "m" / "config.pbtxt").is_file() and (out / "m" / "1" / "model.onnx").is_file()
    with pytest.raises(ConfigError, match="not empty"):
        triton_repo(q, out, name="m")


def test_engine_repositories_batch_only_batch_first_engines(quantized, tmp_path, capsys):
    fp, _ = quantized
    c = RwkvSession(fp).config
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"engine bytes")
    sidecar = {"model": json.loads(c.to_json()), "profile": {"token": [[1], [1], [4]]}, "max_batch": 4}
    (tmp_path / "m.plan.json").write_text(json.dumps(sidecar))
    lines: list[str] = []
    folder = triton_repo(plan, tmp_path / "repo", name="layer_first", log=lines.append)
    cfg = parse_model_config((folder / "config.pbtxt").read_text())
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 0 and len(cfg.sequence_batching.control_input) == 0
    assert list(cfg.sequence_batching.state[2].dims) == [c.n_layer, 1, c.n_head, c.head_size, c.head_size]
    assert "--serving" in " ".join(lines) and not cfg.model_operations.op_library_filename
    sidecar["state_layout"] = "batch_first"
    (tmp_path / "m.plan.json").write_text(json.dumps(sidecar))
    folder = triton_repo(plan, tmp_path / "repo", name="batch_first")
    cfg = parse_model_config((folder / "config.pbtxt").read_text())
    assert cfg.max_batch_size == 4 and cfg.sequence_batching.WhichOneof("strategy_choice") == "oldest"
    assert list(cfg.sequence_batching.state[2].dims) == [c.n_layer, c.n_head, c.head_size, c.head_size]
    assert (folder / "1" / "model.plan").read_bytes() == b"engine bytes"
    (tmp_path / "m.plan.json").unlink()
    with pytest.raises(ConfigError, match="sidecar"):
        triton_repo(plan, tmp_path / "repo", name="x")
    assert not (tmp_path / "repo" / "x").exists()


def test_batch_first_pass_is_a_pure_layout_change(tiny_ckpt, tmp_path):
    from rwkvq_onnx.passes.batch_first_state import batch_first_state, state_layout

    fp = tmp_path / "fp.onnx"
    assert main(["export", str(tiny_ckpt), "-o", str(fp), "--mode", "both"]) == 0
    model = onnx.load(step_path(fp))
    assert state_layout(model) == "layer_first"
    served = batch_first_state(onnx.load(step_path(fp)))
    assert state_layout(served) == "batch_first"
    onnx.checker.check_model(served)
    # the step graph runs its recurrence as rwkvq.WKV7Step (export's default): sessions with the native op library
    a = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(served.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    feeds = {i.name: rng.standard_normal([d.dim_value or 3 for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in model.graph.input if i.name != "token"}
    feeds["token"] = np.array([1, 2, 3], np.int64)
    out_a = a.run(None, feeds)
    swapped = {k: (np.swapaxes(v, 0, 1) if k != "token" else v) for k, v in feeds.items()}
    out_b = b.run(None, swapped)
    np.testing.assert_array_equal(out_a[0], out_b[0])
    for x, y in zip(out_a[1:], out_b[1:]):
        np.testing.assert_array_equal(np.swapaxes(x, 0, 1), y)
    with pytest.raises(ConfigError, match="already batch-first"):
        batch_first_state(served)
    del model.graph.input[1]
    with pytest.raises(ConfigError, match="missing state_att_shift"):
        batch_first_state(model)


def test_sequence_graph_without_step_sibling_is_refused(tiny_ckpt, tmp_path, capsys):
    seq = tmp_path / "seq.onnx"
    assert main(["export", str(tiny_ckpt), "-o", str(seq), "--mode", "sequence"]) == 0
    capsys.readouterr()
    assert main(["triton-repo", str(seq), "-o", str(tmp_path / "models")]) == 2
    err = capsys.readouterr().err
    assert "--mode both" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "models").exists()
