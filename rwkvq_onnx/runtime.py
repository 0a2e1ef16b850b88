"""onnxruntime sessions over exported RWKV graphs, carrying the recurrent state.

`RwkvSession` opens a sequence graph (and its `.step.onnx` sibling when
present, used for one-token decoding) or a step graph alone, and offers
`forward` (a block of tokens) and `step` (one token) with explicit state.

Loading checks what a model claims against what it is: the graph's inputs and
outputs must be those its `rwkvq.config` implies, and a sequence graph and its
step sibling must carry the same pair identity (written by export and
quantize). Errors onnxruntime raises while running (a custom op refusing its
input, an index out of range) become one `RwkvqError` naming the model.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .checkpoint import ModelConfig
from .errors import ConfigError, RwkvqError
from .export import check_io, step_path
from .names import CONFIG_KEY, GRAPH_KEY, PAIR_ID_KEY
from .paths import require_file

StateArrays = tuple[np.ndarray, np.ndarray, np.ndarray]


def session_options(threads: int | None = None, kernels: str = "exact", isa: str = "auto"):
    """Session options shared by every session the library opens (the rwkvq custom ops registered).

    kernels: "exact" (float activations: the reference numerics) or "fast" (int8 activations per block of 32 in
    the native VQMatMul decode GEMV); isa: "auto" (the RWKVQ_ISA environment variable when it names an instruction
    set this CPU has, else the best it has) or "scalar", "avx2", "avxvnni",
    "avx512vnni". The native library reads both when it is registered, so they are set first; an unknown value or
    an instruction set this CPU lacks fails the registration with one line naming the setting.
    """
    import onnxruntime as ort

    from .ortops import register

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.add_session_config_entry("rwkvq.kernels", kernels)
    opts.add_session_config_entry("rwkvq.isa", isa)
    opts.register_custom_ops_library(register())
    # exact MatMulNBits / fused DequantizeLinear+MatMul numerics (no int8 activations)
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    # Idle intra-op threads keep onnxruntime's default (spin briefly before sleeping): the native rwkvq ops run
    # on the same pool (KernelContext_ParallelFor), and a sleeping pool pays a wake-up on each of the ~70 large
    # matmuls per token (2 cores, 0.1B RWKVQuant decode, one process, interleaved: 24.3 -> 20.2 ms/token;
    # fp32 34.8 -> 33.0).
    return opts


def open_session_from_model(model, threads: int | None = None):
    """A session over an in-memory model (written to a temporary file when too large for one protobuf)."""
    import tempfile

    import onnxruntime as ort

    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size < 1_800_000_000:
        return ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                    providers=["CPUExecutionProvider"])
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def open_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session, with a one-line error for a missing or invalid model."""
    import onnxruntime as ort

    path = require_file(path, "ONNX model")
    try:
        return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RwkvqError(f"cannot load ONNX model: {first}", path) from None


def _metadata(session, path: Path) -> tuple[ModelConfig, str, str | None]:
    """(config, graph kind, pair identity or None) of a session; its inputs and outputs are checked against
    the config."""
    meta = session.get_modelmeta().custom_metadata_map
    if CONFIG_KEY not in meta:
        raise RwkvqError(f"not an rwkvq-onnx model (no '{CONFIG_KEY}' metadata; export it with `rwkvq-onnx export`)", path)
    try:
        config = ModelConfig(**json.loads(meta[CONFIG_KEY]))
    except Exception as exc:
        raise RwkvqError(f"unreadable '{CONFIG_KEY}' metadata ({type(exc).__name__}: {exc})", path) from None
    kind = meta.get(GRAPH_KEY, "sequence")
    check_io(config, kind, {a.name: a.shape for a in session.get_inputs()},
             {a.name: a.shape for a in session.get_outputs()}, path)
    return config, kind, meta.get(PAIR_ID_KEY)


def _run_errors() -> tuple[type[BaseException], ...]:
    """The exception types onnxruntime raises from `InferenceSession.run`."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))


def run_session(session, path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """`session.run` with onnxruntime's errors as one-line `RwkvqError`s naming the model."""
    try:
        return session.run(None, feeds)
    except _run_errors() as exc:
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        raise RwkvqError(f"onnxruntime failed running the model: {lines[0] if lines else type(exc).__name__}",
                         path) from None


def zero_state(config: ModelConfig, batch: int = 1) -> StateArrays:
    """The empty-context state of a model (float32 zeros): att shift, ffn shift, WKV."""
    c = config
    return (np.zeros((c.n_layer, batch, c.n_embd), np.float32),
            np.zeros((c.n_layer, batch, c.n_embd), np.float32),
            np.zeros((c.n_layer, batch, c.n_head, c.head_size, c.head_size), np.float32))


def state_feeds(state: StateArrays) -> dict[str, np.ndarray]:
    """A state as the graphs' input feeds."""
    return {"state_att_shift": state[0], "state_ffn_shift": state[1], "state_wkv": state[2]}


class RwkvSession:
    """An exported RWKV model ready to run; state is passed in and returned, never hidden."""

    def __init__(self, path: str | Path, threads: int | None = None, use_step_graph: bool = True) -> None:
        self.path = Path(path)
        first = open_session(self.path, threads)
        self.config, kind, pair_id = _metadata(first, self.path)
        self.sequence = first if kind == "sequence" else None
        self.step_session = first if kind == "step" else None
        self.step_path = self.path if kind == "step" else step_path(self.path)
        sibling = self.step_path
        if self.step_session is None and use_step_graph and sibling.is_file():
            self.step_session = open_session(sibling, threads)
            step_config, step_kind, step_id = _metadata(self.step_session, sibling)
            if step_kind != "step" or step_config != self.config:
                raise RwkvqError(f"step graph does not match {self.path.name}", sibling)
            if pair_id and step_id and pair_id != step_id:
                stale = min((self.path, sibling), key=lambda p: p.stat().st_mtime)
                raise RwkvqError(f"{sibling.name} and {self.path.name} were not written together (their pair "
                                 f"identities differ): regenerate the older one, {stale}, with the command that "
                                 f"wrote the other (export --mode both, or quantize)", sibling)

    def zero_state(self, batch: int = 1) -> StateArrays:
        return zero_state(self.config, batch)

    @staticmethod
    def _feeds(state: StateArrays) -> dict[str, np.ndarray]:
        return state_feeds(state)

    def forward(self, tokens: np.ndarray, state: StateArrays | None = None) -> tuple[np.ndarray, StateArrays]:
        """tokens int [B, T] -> logits float32 [B, T, V] and the state after the last token."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 2 or tokens.shape[1] == 0:
            raise ConfigError(f"forward() needs tokens of shape [B, T>0], got {tokens.shape}")
        state = self.zero_state(tokens.shape[0]) if state is None else state
        if self.sequence is None:  # a step graph alone: run it token by token
            outs = []
            for t in range(tokens.shape[1]):
                logits, state = self.step(tokens[:, t], state)
                outs.append(logits)
            return np.stack(outs, axis=1), state
        logits, *new = run_session(self.sequence, self.path, {"tokens": tokens, **self._feeds(state)})
        return logits, tuple(new)

    def step(self, token: np.ndarray, state: StateArrays | None = None) -> tuple[np.ndarray, StateArrays]:
        """token int [B] -> logits float32 [B, V] and the next state (step graph when there is one)."""
        token = np.asarray(token, dtype=np.int64).reshape(-1)
        state = self.zero_state(token.shape[0]) if state is None else state
        if self.step_session is None:
            logits, new = self.forward(token[:, None], state)
            return logits[:, 0], new
        logits, *new = run_session(self.step_session, self.step_path, {"token": token, **self._feeds(state)})
        return logits, tuple(new)
