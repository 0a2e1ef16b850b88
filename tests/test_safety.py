"""Issue 15 (non-native part): no command destroys its input, the sequence/step pair is one unit,
and every user-facing failure is one line with exit status 2.

Every test drives the CLI through `rwkvq_onnx.cli.main` on the tiny synthetic model.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from rwkvq_onnx.checkpoint import save_checkpoint
from rwkvq_onnx.cli import main
from rwkvq_onnx.errors import RwkvqError
from rwkvq_onnx.export import step_path
from rwkvq_onnx.names import PAIR_ID_KEY
from rwkvq_onnx.runtime import RwkvSession
from rwkvq_onnx.synthetic import synthetic_rwkv7, synthetic_rwkv7_config


@pytest.fixture(scope="module")
def pair(tiny_ckpt, tmp_path_factory) -> Path:
    """The tiny model exported as a sequence/step pair (read-only: copy before changing)."""
    out = tmp_path_factory.mktemp("pair") / "m.onnx"
    assert main(["export", str(tiny_ckpt), "-o", str(out), "--mode", "both"]) == 0
    return out


def _copy_pair(src: Path, folder: Path, name: str = "m.onnx") -> Path:
    dst = folder / name
    shutil.copyfile(src, dst)
    shutil.copyfile(step_path(src), step_path(dst))
    return dst


def _digest(*paths: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def _one_line_error(capsys, argv: list[str], needle: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert needle in err, err
    return err


def _no_temporaries(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


# -- 1. no command overwrites its own input ---------------------------------------------------------------------

def test_export_refuses_to_overwrite_its_checkpoint(tiny_ckpt, tmp_path, capsys):
    ckpt = tmp_path / "x.pth"
    shutil.copyfile(tiny_ckpt, ckpt)
    before = _digest(ckpt)
    _one_line_error(capsys, ["export", str(ckpt), "-o", str(ckpt)], "input")
    # the step sibling of the output is the input
    named_like_step = tmp_path / "y.step.onnx"
    shutil.copyfile(tiny_ckpt, named_like_step)
    _one_line_error(capsys, ["export", str(named_like_step), "-o", str(tmp_path / "y.onnx"), "--mode", "both"],
                    "input")
    os.link(ckpt, tmp_path / "hard.onnx")
    _one_line_error(capsys, ["export", str(ckpt), "-o", str(tmp_path / "hard.onnx")], "input")
    assert _digest(ckpt) == before == _digest(named_like_step)
    assert not (tmp_path / "y.onnx").exists()
    _no_temporaries(tmp_path)


def test_quantize_refuses_to_overwrite_its_inputs(pair, tmp_path, capsys):
    m = _copy_pair(pair, tmp_path)
    before = _digest(m, step_path(m))
    q = tmp_path / "q.onnx"
    os.link(m, tmp_path / "hard.onnx")
    os.symlink(m, tmp_path / "soft.onnx")
    os.link(step_path(m), tmp_path / "h2.step.onnx")
    cases = [
        ["-o", str(m)],                                   # quantize M -o M
        ["-o", str(tmp_path / "sub" / ".." / "m.onnx")],  # the same file under another spelling
        ["-o", str(q), "--report", str(m)],               # the report over the input
        ["-o", str(q), "--report", str(step_path(m))],    # the report over the input's step sibling
        ["-o", str(tmp_path / "hard.onnx")],              # a hard link to the input
        ["-o", str(tmp_path / "soft.onnx")],              # a symbolic link to the input
        ["-o", str(tmp_path / "h2.onnx")],                # OUT.step.onnx is a hard link to IN.step.onnx
        ["-o", str(q), "--report", str(q)],               # two outputs on one path
    ]
    (tmp_path / "sub").mkdir()
    for extra in cases:
        _one_line_error(capsys, ["quantize", str(m), "--method", "rtn", *extra], "")
        assert _digest(m, step_path(m)) == before, extra
        assert not q.exists() and not step_path(q).exists(), extra
    # the input named through a link, the output on the real file
    _one_line_error(capsys, ["quantize", str(tmp_path / "soft.onnx"), "--method", "rtn", "-o", str(m)], "input")
    assert _digest(m, step_path(m)) == before
    _no_temporaries(tmp_path)


def test_eval_refuses_to_write_its_json_over_the_model(pair, tmp_path, capsys):
    m = _copy_pair(pair, tmp_path)
    text = tmp_path / "t.txt"
    text.write_text("hello world, this is a short text to evaluate. " * 4)
    before = _digest(m, step_path(m), text)
    for target in (m, step_path(m), text):
        _one_line_error(capsys, ["eval", str(m), "--text", str(text), "--json", str(target)], "input")
    assert _digest(m, step_path(m), text) == before


def test_report_and_build_engine_refuse_to_overwrite_their_input(pair, tmp_path, capsys):
    q = tmp_path / "q.onnx"
    report = tmp_path / "r.json"
    assert main(["quantize", str(pair), "-o", str(q), "--method", "rtn", "--report", str(report)]) == 0
    before = _digest(report, q, step_path(q))
    _one_line_error(capsys, ["report", str(report), "-o", str(report)], "input")
    _one_line_error(capsys, ["build-engine", str(step_path(q)), "-o", str(step_path(q))], "input")
    os.link(q, tmp_path / "linked.plan")
    _one_line_error(capsys, ["build-engine", str(q), "-o", str(tmp_path / "linked.plan")], "input")
    assert _digest(report, q, step_path(q)) == before


# -- 2. the pair is one unit with one identity ------------------------------------------------------------------

def _pair_ids(path: Path) -> list[str | None]:
    ids = []
    for p in (path, step_path(path)):
        props = {q.key: q.value for q in onnx.load(p, load_external_data=False).metadata_props}
        ids.append(props.get(PAIR_ID_KEY))
    return ids


def test_export_and_quantize_give_both_graphs_one_identity(pair, tmp_path, capsys):
    seq_id, step_id = _pair_ids(pair)
    assert seq_id and seq_id == step_id
    q = tmp_path / "q.onnx"
    assert main(["quantize", str(pair), "-o", str(q), "--method", "rtn"]) == 0
    q_ids = _pair_ids(q)
    assert q_ids[0] and q_ids[0] == q_ids[1] and q_ids[0] != seq_id
    # identical arguments still give byte-identical files (the identity is a digest, not a random id)
    again = tmp_path / "again.onnx"
    assert main(["quantize", str(pair), "-o", str(again), "--method", "rtn"]) == 0
    assert _digest(q, step_path(q)) == _digest(again, step_path(again))


def test_session_refuses_a_mixed_pair_and_names_the_stale_file(pair, tiny_ckpt, tmp_path, capsys):
    m = _copy_pair(pair, tmp_path)
    other = tmp_path / "other.pth"
    save_checkpoint(synthetic_rwkv7(synthetic_rwkv7_config(2, 64, 256, head_size=32), seed=2), other)
    # a new sequence graph beside the step graph of an earlier export (same config, other weights)
    os.utime(step_path(m), (1, 1))
    assert main(["export", str(other), "-o", str(m)]) == 0
    err = _one_line_error(capsys, ["generate", str(m), "--prompt", "hi", "--max-tokens", "1"], "regenerate")
    assert step_path(m).name in err
    with pytest.raises(RwkvqError, match="m.step.onnx"):
        RwkvSession(m)


def test_models_exported_before_pair_identities_still_load(pair, tmp_path):
    m = _copy_pair(pair, tmp_path)
    for p in (m, step_path(m)):
        model = onnx.load(p)
        kept = [(q.key, q.value) for q in model.metadata_props if q.key != PAIR_ID_KEY]
        del model.metadata_props[:]
        helper.set_model_props(model, dict(kept))
        onnx.save_model(model, p)
    assert _pair_ids(m) == [None, None]
    session = RwkvSession(m)
    assert session.step_session is not None


def test_a_failed_pair_write_keeps_the_old_pair_and_leaves_no_temporaries(pair, tiny_ckpt, tmp_path, capsys,
                                                                           monkeypatch):
    m = _copy_pair(pair, tmp_path)
    before = _digest(m, step_path(m))
    real_save = onnx.save_model
    calls = []

    def interrupted_second_save(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt  # SIGINT while the second graph is written
        return real_save(*args, **kwargs)

    monkeypatch.setattr(onnx, "save_model", interrupted_second_save)
    assert main(["quantize", str(m), "-o", str(m.with_name("q.onnx")), "--method", "rtn"]) == 130
    calls.clear()
    assert main(["export", str(tiny_ckpt), "-o", str(tmp_path / "n.onnx"), "--mode", "both"]) == 130
    assert len(calls) == 2
    assert _digest(m, step_path(m)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.step.onnx"]


@pytest.mark.slow
def test_sigkill_while_writing_the_pair_keeps_the_old_pair(pair, tiny_ckpt, tmp_path):
    """A real SIGKILL once both graphs of the new pair are written, before the commit: the old pair stays whole,
    and the next run cleans up."""
    import signal
    import subprocess
    import sys
    import time

    m = _copy_pair(pair, tmp_path)
    before = _digest(m, step_path(m))
    other = tmp_path / "other.pth"  # other weights: the new pair differs from the old one
    save_checkpoint(synthetic_rwkv7(synthetic_rwkv7_config(2, 64, 256, head_size=32), seed=2), other)
    slow_writer = ("import sys, time, onnx\n"
                   "real = onnx.save_model\n"
                   "def slow(*a, **k):\n"
                   "    real(*a, **k)\n"
                   "    time.sleep(30)\n"
                   "onnx.save_model = slow\n"
                   "from rwkvq_onnx.cli import main\n"
                   "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.Popen([sys.executable, "-c", slow_writer, "export", str(other), "-o", str(m),
                             "--mode", "both"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".m*.tmp/m.step.onnx")):
            assert proc.poll() is None and time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _digest(m, step_path(m)) == before
    assert list(tmp_path.glob(".m*.tmp"))  # SIGKILL cannot be cleaned up after ...
    assert main(["export", str(tiny_ckpt), "-o", str(m), "--mode", "both"]) == 0
    assert not list(tmp_path.glob(".m*.tmp"))  # ... the next write to the target sweeps it
    assert RwkvSession(m).step_session is not None


def test_temporaries_of_killed_runs_are_swept(pair, tiny_ckpt, tmp_path):
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    stale = tmp_path / f".m.onnx.{dead}.abc.tmp"
    stale.mkdir()
    (stale / "m.onnx").write_bytes(b"half")
    alive = tmp_path / f".m.onnx.{os.getppid()}.abc.tmp"  # a live process's: must stay
    alive.mkdir()
    assert main(["export", str(tiny_ckpt), "-o", str(tmp_path / "m.onnx")]) == 0
    assert not stale.exists() and alive.exists()


# -- 3. one line, exit 2 ---------------------------------------------------------------------------------------

def test_full_disk_is_one_line_naming_the_file(pair, tiny_ckpt, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(onnx, "save_model", full)
    out = tmp_path / "e.onnx"
    err = _one_line_error(capsys, ["export", str(tiny_ckpt), "-o", str(out)], "No space left")
    assert str(out) in err
    err = _one_line_error(capsys, ["quantize", str(pair), "-o", str(tmp_path / "q.onnx"), "--method", "rtn"],
                          "No space left")
    assert "q.onnx" in err
    assert not list(tmp_path.iterdir())


def test_json_report_on_a_full_disk(pair, tmp_path, capsys, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text("hello world, this is a short text to evaluate. " * 4)

    def full(self, *args, **kwargs):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(Path, "write_text", full)
    err = _one_line_error(capsys, ["eval", str(pair), "--text", str(text), "--json", str(tmp_path / "r.json")],
                          "r.json")
    assert os.strerror(errno.EDQUOT) in err


def _impostor(pair: Path, folder: Path) -> Path:
    """A small ONNX model that is not an rwkvq export but carries the export's metadata."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    w = onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "other", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    props = {q.key: q.value for q in onnx.load(pair, load_external_data=False).metadata_props}
    helper.set_model_props(model, props)
    path = folder / "impostor.onnx"
    onnx.save_model(model, path)
    return path


def test_a_model_with_copied_metadata_is_refused(pair, tmp_path, capsys):
    fake = _impostor(pair, tmp_path)
    _one_line_error(capsys, ["quantize", str(fake), "-o", str(tmp_path / "q.onnx"), "--method", "rtn"], "impostor")
    _one_line_error(capsys, ["generate", str(fake), "--prompt", "hi"], "impostor")
    _one_line_error(capsys, ["validate", str(pair), str(fake)], "impostor")
    _one_line_error(capsys, ["validate", str(fake), str(pair)], "impostor")


def test_errors_raised_while_running_name_the_model(pair, capsys):
    # world token ids do not fit a byte-vocabulary model: onnxruntime's Gather fails inside session.run
    err = _one_line_error(capsys, ["generate", str(pair), "--tokenizer", "world", "--prompt", "hello there"],
                          str(pair))
    assert "onnxruntime" in err
    session = RwkvSession(pair)
    bad_state = tuple(s[:, :, :1] for s in session.zero_state(1))
    with pytest.raises(RwkvqError, match="m.onnx"):
        session.forward(np.zeros((1, 3), np.int64), bad_state)


@pytest.mark.parametrize("flags", [["--temperature", "nan"], ["--temperature", "inf"], ["--temperature", "-1"],
                                   ["--top-p", "0"], ["--top-p", "1.5"], ["--top-p", "nan"],
                                   ["--max-tokens", "-1"]])
def test_generate_refuses_bad_sampling_arguments(pair, capsys, flags):
    _one_line_error(capsys, ["generate", str(pair), "--prompt", "hi", *flags], flags[0])


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_eval_refuses_binary_data_before_running(pair, tmp_path, capsys, monkeypatch, suffix):
    data = tmp_path / f"bin{suffix}"
    data.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())

    def never(*args, **kwargs):
        raise AssertionError("the model ran on a binary file")

    monkeypatch.setattr(RwkvSession, "forward", never)
    for flag in ("--lambada", "--text"):
        _one_line_error(capsys, ["eval", str(pair), flag, str(data)], "UTF-8")


def test_unexpected_errors_are_one_line_with_a_debug_pointer(pair, capsys, monkeypatch):
    import rwkvq_onnx.generate as gen

    def boom(*args, **kwargs):
        raise ValueError("boom\nsecond line")

    monkeypatch.setattr(gen, "generate", boom)
    capsys.readouterr()
    code = main(["generate", str(pair), "--prompt", "hi"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "ValueError: boom" in err and "--debug" in err
    with pytest.raises(ValueError, match="boom"):
        main(["--debug", "generate", str(pair), "--prompt", "hi"])


# -- 4. messages about what is wrong ----------------------------------------------------------------------------

def test_scalar_method_with_eight_bits_is_not_refused_for_vq(pair, tmp_path, capsys):
    out = tmp_path / "q8.onnx"
    assert main(["quantize", str(pair), "-o", str(out), "--method", "rtn", "--wbits", "8"]) == 0
    err = _one_line_error(capsys, ["quantize", str(pair), "-o", str(out), "--method", "kmeans", "--wbits", "8"],
                          "--wbits 8")
    assert "--vq-dim" in err


def test_a_folder_is_reported_as_a_folder(pair, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    _one_line_error(capsys, ["export", str(folder), "-o", str(tmp_path / "x.onnx")], "is a directory")
    _one_line_error(capsys, ["generate", str(folder), "--prompt", "hi"], "is a directory")
    _one_line_error(capsys, ["quantize", str(folder), "-o", str(tmp_path / "q.onnx"), "--method", "rtn"],
                    "is a directory")
