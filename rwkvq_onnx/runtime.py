"""onnxruntime sessions over exported RWKV graphs, carrying the recurrent state.

`RwkvSession` opens a sequence graph (and its `.step.onnx` sibling when
present, used for one-token decoding) or a step graph alone, and offers
`forward` (a block of tokens) and `step` (one token) with explicit state, and
`decoder()`, a token-by-token loop that keeps the state in onnxruntime
buffers between steps (I/O binding; see `decode.Decoder`).

One copy of the weights: a pair written with a shared data file (see
`shared_data`) is opened with each of its tensors mapped once from that file
and handed to both onnxruntime sessions (`SessionOptions.add_initializer`:
onnxruntime uses the caller's buffer and does not load its own copy).

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
from .graph_io import check_io, step_path
from .names import CONFIG_KEY, GRAPH_KEY, LOGITS_FROM, PAIR_ID_KEY
from .paths import require_file

StateArrays = tuple[np.ndarray, np.ndarray, np.ndarray]
KERNELS = ("exact", "fast")
PREFILL_CHUNK = 128  # tokens per sequence-graph run in RwkvSession.prefill
_LAST = np.array([-1], np.int64)  # logits_from: the last position only
ISAS = ("auto", "scalar", "avx2", "avxvnni", "avx512vnni")


def session_options(threads: int | None = None, kernels: str = "exact", isa: str = "auto"):
    """Session options shared by every session the library opens (the rwkvq custom ops registered).

    kernels: "exact" (float activations: the reference numerics) or "fast" (int8 activations: per block of
    gcd(group_size, 128) in the native SQMatMul kernels, of 32 in the VQMatMul decode GEMV); isa: "auto" (the RWKVQ_ISA environment variable when it names an instruction
    set this CPU has, else the best it has) or "scalar", "avx2", "avxvnni",
    "avx512vnni". The native library reads both when it is registered, so they are set first; an unknown value or
    an instruction set this CPU lacks fails the registration with one line naming the setting.
    """
    import onnxruntime as ort

    from .ortops import register

    if kernels not in KERNELS:
        raise ConfigError(f"unknown kernels '{kernels}' (choose from {', '.join(KERNELS)})")
    if isa not in ISAS:
        raise ConfigError(f"unknown instruction set '{isa}' (choose from {', '.join(ISAS)})")
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


def open_session(path: str | Path, threads: int | None = None, kernels: str = "exact",
                 initializers: dict | None = None, prepack: bool = True):
    """An onnxruntime CPU session, with a one-line error for a missing or invalid model.

    `initializers` (name -> OrtValue) replace the model's own (the caller's
    buffers are used as they are); `prepack=False` stops operators from
    making their own re-laid-out copies of constant weights.
    """
    import onnxruntime as ort

    path = require_file(path, "ONNX model")
    opts = session_options(threads, kernels)
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    for name, value in (initializers or {}).items():
        opts.add_initializer(name, value)
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
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
        raise one_line_error(exc, path) from None


def one_line_error(exc: BaseException, path: Path) -> RwkvqError:
    """An onnxruntime run error as one line naming the model."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return RwkvqError(f"onnxruntime failed running the model: {lines[0] if lines else type(exc).__name__}", path)


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
    """An exported RWKV model ready to run; state is passed in and returned, never hidden.

    `kernels` is the native ops' numerics for both sessions: "fast" (int8
    activations, the default for running a model) or "exact" (float, for
    comparisons with the reference).
    """

    # Operators whose weights are pre-packed when a pair's graphs contain them. onnxruntime pre-packs per session
    # (each session its own re-laid-out copy: the one thing two sessions cannot share), so a shared pair is
    # opened without pre-packing unless it holds an operator that needs it: MatMulNBits without its packed
    # weights dequantizes the whole weight to float on every call (0.1B with an int8 embedding and a 4-bit
    # head: decode 0.48 instead of 2.5 tokens/s, and a 200 MB transient per prefill). Float MatMul packs its
    # weight panels on the fly at no measured cost to decode or prefill, so fp graphs keep one copy.
    NEEDS_PREPACK = frozenset({"MatMulNBits"})

    def __init__(self, path: str | Path, threads: int | None = None, use_step_graph: bool = True,
                 kernels: str = "fast") -> None:
        self.path = Path(path)
        self.kernels = kernels
        self._threads = threads
        self._shared = self._map_shared()
        first = self._open(self.path)
        self.config, kind, pair_id = _metadata(first, self.path)
        self.sequence = first if kind == "sequence" else None
        self._takes_logits_from = self.sequence is not None and LOGITS_FROM in {
            i.name for i in self.sequence.get_overridable_initializers()}
        self.step_session = first if kind == "step" else None
        self.step_path = self.path if kind == "step" else step_path(self.path)
        sibling = self.step_path
        if self.step_session is None and use_step_graph and sibling.is_file():
            self.step_session = self._open(sibling)
            step_config, step_kind, step_id = _metadata(self.step_session, sibling)
            if step_kind != "step" or step_config != self.config:
                raise RwkvqError(f"step graph does not match {self.path.name}", sibling)
            if pair_id and step_id and pair_id != step_id:
                stale = min((self.path, sibling), key=lambda p: p.stat().st_mtime)
                raise RwkvqError(f"{sibling.name} and {self.path.name} were not written together (their pair "
                                 f"identities differ): regenerate the older one, {stale}, with the command that "
                                 f"wrote the other (export --mode both, or quantize)", sibling)

    def _map_shared(self) -> tuple[dict, dict, dict] | None:
        """(header, arrays, OrtValues) of the pair's shared data file, or None when it has none."""
        from .shared_data import data_path, map_tensors

        name = self.path.name
        seq = self.path.with_name(name[: -len(".step.onnx")] + ".onnx") if name.endswith(".step.onnx") else self.path
        header, arrays = map_tensors(data_path(seq))
        if not arrays or not header.get("pair_id"):
            return None
        import onnxruntime as ort

        return header, arrays, {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in arrays.items()}

    def _open(self, path: Path):
        """A session over one graph, on the shared weights when the graph is the pair they were written for.

        The data file's pair identity must be the graph's: a graph rewritten
        alone beside an older pair's data file is opened with its own weights.
        """
        if self._shared is None:
            return open_session(path, self._threads, self.kernels)
        from .shared_data import release_pages

        header, arrays, values = self._shared
        prepack = bool(self.NEEDS_PREPACK & set(header.get("op_types", self.NEEDS_PREPACK)))
        try:
            session = open_session(path, self._threads, self.kernels, values, prepack)
        except RwkvqError:  # e.g. a rewritten graph whose tensors of the same names have other shapes
            session = None
        if session is None or session.get_modelmeta().custom_metadata_map.get(PAIR_ID_KEY) != header["pair_id"]:
            session = open_session(path, self._threads, self.kernels)
        release_pages(arrays)  # pages read only to pre-pack are dropped (the page cache keeps them)
        return session

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

    def _last_logits(self, tokens: np.ndarray, state: StateArrays) -> tuple[np.ndarray, StateArrays]:
        """The sequence graph's logits of the last position [B, 1, V] and the state: the head runs on that
        position alone when the graph takes `logits_from` (graphs exported before it compute all of them)."""
        if self.sequence is None or not self._takes_logits_from:
            logits, state = self.forward(tokens, state)
            return logits[:, -1:], state
        state = self.zero_state(tokens.shape[0]) if state is None else state
        logits, *new = run_session(self.sequence, self.path, {"tokens": tokens, LOGITS_FROM: _LAST,
                                                               **self._feeds(state)})
        return logits, tuple(new)

    def prefill(self, tokens: np.ndarray, state: StateArrays | None = None,
                chunk: int = PREFILL_CHUNK) -> tuple[np.ndarray, StateArrays]:
        """tokens int [B, T] -> the logits after the last token [B, V] and the state, running the sequence
        graph `chunk` tokens at a time with the head on each chunk's last position only (`logits_from` -1):
        the same result as `forward` (the recurrence carries the state between chunks) without computing or
        holding [B, T, V] logits and T-long activations at once (generation needs the last logits only; 0.1B,
        T = 512: the full logits alone are 128 MiB, and the head is a third of the multiply-adds)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 2 or tokens.shape[1] == 0:
            raise ConfigError(f"prefill() needs tokens of shape [B, T>0], got {tokens.shape}")
        if chunk < 1:
            raise ConfigError(f"prefill() needs a chunk of at least 1 token, got {chunk}")
        for start in range(0, tokens.shape[1], chunk):
            logits, state = self._last_logits(tokens[:, start:start + chunk], state)
        return logits[:, -1].copy(), state

    def step(self, token: np.ndarray, state: StateArrays | None = None) -> tuple[np.ndarray, StateArrays]:
        """token int [B] -> logits float32 [B, V] and the next state (step graph when there is one)."""
        token = np.asarray(token, dtype=np.int64).reshape(-1)
        state = self.zero_state(token.shape[0]) if state is None else state
        if self.step_session is None:
            logits, new = self.forward(token[:, None], state)
            return logits[:, 0], new
        logits, *new = run_session(self.step_session, self.step_path, {"token": token, **self._feeds(state)})
        return logits, tuple(new)

    def decoder(self, state: StateArrays | None = None, batch: int = 1):
        """A token-by-token decoder starting from `state` (zeros when None) that keeps the state in
        onnxruntime buffers between steps; its `state` attribute returns it (see `decode.Decoder`)."""
        from .decode import Decoder

        state = self.zero_state(batch) if state is None else state
        if self.step_session is None:
            return Decoder.unbound(self, state)
        return Decoder(self.step_session, self.step_path, state, self.config.vocab_size)
