"""One copy of the weights for the sequence and step graphs, and the I/O-bound decoder."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from rwkvq_onnx import shared_data
from rwkvq_onnx.errors import ConfigError, RwkvqError
from rwkvq_onnx.export import export
from rwkvq_onnx.runtime import RwkvSession
from rwkvq_onnx.synthetic import synthetic_rwkv7, synthetic_rwkv7_config


def _export(folder, name, shared: bool, monkeypatch, seed: int = 3):
    config = synthetic_rwkv7_config(2, 64, 256, head_size=32)
    sd = synthetic_rwkv7(config, seed=seed)
    monkeypatch.setattr(shared_data, "SHARED_THRESHOLD", 0 if shared else 2**62)
    path = folder / name
    export(config, sd, path, mode="both")
    return path


@pytest.fixture
def pair(tmp_path, monkeypatch):
    """(inline pair, shared-data pair) of the same model."""
    return (_export(tmp_path, "inline.onnx", False, monkeypatch),
            _export(tmp_path, "shared.onnx", True, monkeypatch))


def test_shared_pair_stores_each_weight_once_and_runs_the_same(pair):
    inline, shared = pair
    data = shared_data.data_path(shared)
    assert data.is_file() and not shared_data.data_path(inline).exists()
    header = shared_data.read_index(data)
    # each large weight once: the data file is about one graph's weights, not two
    one_copy = sum(a.nbytes for a in shared_data.map_tensors(data)[1].values())
    assert one_copy <= data.stat().st_size < 1.5 * one_copy + 2**20
    assert shared.stat().st_size < 0.2 * inline.stat().st_size  # the graph files hold no large weights
    assert "emb.weight" in header["tensors"] and header["pair_id"]
    toks = np.arange(1, 40, dtype=np.int64)[None] % 256
    a, b = RwkvSession(inline, kernels="exact"), RwkvSession(shared, kernels="exact")
    assert b._shared is not None and a._shared is None
    # a float pair holds no operator that needs pre-packing: no session makes its own copy of the weights
    assert "MatMul" in header["op_types"] and not RwkvSession.NEEDS_PREPACK & set(header["op_types"])
    for sess in (b.sequence, b.step_session):
        assert sess.get_session_options().get_session_config_entry("session.disable_prepacking") == "1"
    # same weights, same kernels: the sessions compute the same floats (up to GEMM blocking with and without
    # pre-packed weights, well under 1e-5 on these magnitudes)
    la, sa = a.forward(toks)
    lb, sb = b.forward(toks)
    np.testing.assert_allclose(lb, la, atol=1e-5)
    for x, y in zip(sa, sb):
        np.testing.assert_allclose(y, x, atol=1e-5)
    np.testing.assert_allclose(b.step(np.array([7]), sb)[0], a.step(np.array([7]), sa)[0], atol=1e-5)


def test_graph_rewritten_alone_beside_an_old_data_file_uses_its_own_weights(tmp_path, monkeypatch):
    shared = _export(tmp_path, "m.onnx", True, monkeypatch, seed=3)
    before = RwkvSession(shared, use_step_graph=False, kernels="exact").forward(np.array([[5, 6, 7]]))[0]
    config = synthetic_rwkv7_config(2, 64, 256, head_size=32)
    monkeypatch.setattr(shared_data, "SHARED_THRESHOLD", 2**62)
    export(config, synthetic_rwkv7(config, seed=4), shared, mode="sequence")  # new weights, inline; old .data kept
    assert shared_data.data_path(shared).is_file()
    sess = RwkvSession(shared, use_step_graph=False, kernels="exact")
    after = sess.forward(np.array([[5, 6, 7]]))[0]
    (tmp_path / "ref").mkdir()
    ref = _export(tmp_path / "ref", "r.onnx", False, monkeypatch, seed=4)  # the new weights, on their own
    expect = RwkvSession(ref, use_step_graph=False, kernels="exact").forward(np.array([[5, 6, 7]]))[0]
    assert np.abs(after - before).max() > 1e-3  # different weights (the check below is not vacuous)
    np.testing.assert_allclose(after, expect, atol=1e-5)
    with pytest.raises(RwkvqError, match="not written together"):  # the old step graph no longer pairs with it
        RwkvSession(shared)


def test_corrupt_index_is_one_line_error(pair):
    _, shared = pair
    data = shared_data.data_path(shared)
    raw = bytearray(data.read_bytes())
    raw[16:20] = b"}}}}"
    data.write_bytes(bytes(raw))
    with pytest.raises(RwkvqError, match="corrupt weight index") as err:
        RwkvSession(shared)
    assert "\n" not in str(err.value)


def test_decoder_gives_the_logits_and_state_of_step(pair):
    """The I/O-bound decoder and `step` run the same graph on the same inputs: identical floats."""
    for path in pair:
        sess = RwkvSession(path, kernels="exact")
        toks = np.random.default_rng(0).integers(0, 256, size=(2, 12))
        _, start = sess.forward(toks[:, :4])
        dec = sess.decoder(start)
        state = start
        for t in range(4, 12):
            want, state = sess.step(toks[:, t], state)
            got = dec.step(toks[:, t])
            np.testing.assert_array_equal(got, want)
        for x, y in zip(dec.state, state):
            np.testing.assert_array_equal(x, y)
        assert start[2].any() and not np.shares_memory(dec.state[2], start[2])
        with pytest.raises(ConfigError, match="2 token"):
            dec.step(np.array([1]))


def test_decoder_without_step_graph_matches(pair):
    inline, _ = pair
    seq_only = RwkvSession(inline, use_step_graph=False, kernels="exact")
    dec = seq_only.decoder(batch=1)
    both = RwkvSession(inline, kernels="exact")
    state = None
    for t in (3, 9, 27):
        want, state = both.step(np.array([t]), state)
        np.testing.assert_allclose(dec.step(t), want, atol=1e-5)


def test_kernels_option_is_checked():
    from rwkvq_onnx.runtime import session_options

    with pytest.raises(ConfigError, match="unknown kernels 'turbo'"):
        session_options(kernels="turbo")
    opts = session_options(kernels="fast", isa="avx2")
    assert opts.get_session_config_entry("rwkvq.kernels") == "fast"
    assert opts.get_session_config_entry("rwkvq.isa") == "avx2"


def test_runtime_imports_neither_torch_nor_onnx():
    code = "import sys, rwkvq_onnx.runtime, rwkvq_onnx.decode; print(sorted({'torch', 'onnx'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_kernels_option(pair, capsys):
    from rwkvq_onnx.cli import main

    inline, _ = pair
    for kernels in ("fast", "exact"):
        assert main(["generate", str(inline), "--prompt", "ab", "--max-tokens", "4", "--greedy",
                     "--tokenizer", "bytes", "--kernels", kernels]) in (0, None)
    texts = capsys.readouterr().out.splitlines()
    assert len(texts) == 4 and texts[0] == texts[2]  # same greedy text on both paths (the tiny model, 4 tokens)
    with pytest.raises(SystemExit):
        main(["generate", str(inline), "--prompt", "ab", "--kernels", "turbo"])
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "--kernels {fast,exact}" in capsys.readouterr().out


def test_chunked_prefill_is_forward(pair):
    inline, _ = pair
    sess = RwkvSession(inline, kernels="exact")
    toks = np.random.default_rng(1).integers(0, 256, size=(2, 37))
    want, want_state = sess.forward(toks)
    got, state = sess.prefill(toks, chunk=8)  # 4 full chunks and a short one
    # the same graph over the same tokens, split where the state is carried: float reassociation only
    np.testing.assert_allclose(got, want[:, -1], atol=1e-5)
    for x, y in zip(state, want_state):
        np.testing.assert_allclose(x, y, atol=1e-5)
    with pytest.raises(ConfigError, match="chunk"):
        sess.prefill(toks, chunk=0)


def test_logits_from_limits_the_head_to_the_last_positions(pair):
    """The sequence graph's optional logits_from (Slice semantics) gives the logits of positions from.. only;
    omitted, every position (what eval reads); prefill asks for -1."""
    from rwkvq_onnx.names import LOGITS_FROM

    inline, _ = pair
    sess = RwkvSession(inline, kernels="exact")
    assert [i.name for i in sess.sequence.get_overridable_initializers()] == [LOGITS_FROM]
    assert LOGITS_FROM not in {i.name for i in sess.sequence.get_inputs()}  # callers may omit it
    toks = np.random.default_rng(2).integers(0, 256, size=(2, 9))
    want, _ = sess.forward(toks)
    feeds = {"tokens": toks, **dict(zip(("state_att_shift", "state_ffn_shift", "state_wkv"), sess.zero_state(2)))}
    for start, positions in ((-1, slice(8, 9)), (5, slice(5, 9)), (0, slice(0, 9))):
        got = sess.sequence.run(["logits"], {**feeds, LOGITS_FROM: np.array([start], np.int64)})[0]
        assert got.shape == (2, positions.stop - positions.start, want.shape[-1])
        np.testing.assert_allclose(got, want[:, positions], atol=1e-5)  # the head of the same rows
