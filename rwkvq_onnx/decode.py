"""Token-by-token decoding with the state kept in onnxruntime buffers (I/O binding).

`RwkvSession.step` passes the state in as numpy arrays and gets new ones
back: every token copies the whole state (0.1B: about 2.4 MB, mostly the WKV
state) into and out of onnxruntime. A `Decoder` binds two preallocated sets
of state buffers to the step graph, one as inputs and one as outputs, and
swaps their roles after each token, so a token costs no state copies; only
the token goes in and the logits come out.

The state is still the caller's: `Decoder.state` returns it (copies), and a
decoder starts from any state (`RwkvSession.decoder(state)`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ConfigError
from .graph_io import STATE_NAMES

StateArrays = tuple[np.ndarray, np.ndarray, np.ndarray]


class Decoder:
    """Feeds one token per `step` to a step-graph session; the state stays bound between steps."""

    def __init__(self, session, path: Path, state: StateArrays, vocab_size: int) -> None:
        import onnxruntime as ort

        self.session, self.path = session, path
        batch = state[0].shape[1]
        # two sets of state buffers: A feeds a step that writes B, then B feeds one that writes A
        self._sets = [tuple(np.ascontiguousarray(s, dtype=np.float32).copy() for s in state),
                      tuple(np.empty_like(np.asarray(s, dtype=np.float32)) for s in state)]
        self._token = np.zeros(batch, np.int64)
        self._logits = np.empty((batch, vocab_size), np.float32)
        values = [[ort.OrtValue.ortvalue_from_numpy(a) for a in group] for group in self._sets]
        token, logits = ort.OrtValue.ortvalue_from_numpy(self._token), ort.OrtValue.ortvalue_from_numpy(self._logits)
        self._bindings = []
        for src, dst in ((0, 1), (1, 0)):
            b = session.io_binding()
            b.bind_ortvalue_input("token", token)
            b.bind_ortvalue_output("logits", logits)
            for name, i, o in zip(STATE_NAMES, values[src], values[dst]):
                b.bind_ortvalue_input(name, i)
                b.bind_ortvalue_output("new_" + name, o)
            self._bindings.append(b)
        self._values = values  # the OrtValues wrap the numpy buffers above; both must outlive the bindings
        self._current = 0  # index of the set holding the current state
        self._fallback = None

    @classmethod
    def unbound(cls, rwkv, state: StateArrays) -> "Decoder":
        """A decoder over a model without a step graph: each step runs `rwkv.step` (same interface)."""
        self = cls.__new__(cls)
        self._fallback, self._state = rwkv, tuple(state)
        return self

    @property
    def batch(self) -> int:
        return (self._state if self._fallback else self._sets[0])[0].shape[1]

    def step(self, token) -> np.ndarray:
        """token int [B] (or a scalar for batch 1) -> logits float32 [B, V] (a fresh array); advances the state."""
        token = np.asarray(token, dtype=np.int64).reshape(-1)
        if token.shape[0] != self.batch:
            raise ConfigError(f"decoder step needs {self.batch} token(s), got {token.shape[0]}")
        if self._fallback is not None:
            logits, self._state = self._fallback.step(token, self._state)
            return logits
        from .runtime import _run_errors, one_line_error

        self._token[:] = token
        try:
            self.session.run_with_iobinding(self._bindings[self._current])
        except _run_errors() as exc:
            raise one_line_error(exc, self.path) from None
        self._current ^= 1
        return self._logits.copy()

    @property
    def state(self) -> StateArrays:
        """The state after the tokens stepped so far (copies: the decoder keeps its own buffers)."""
        if self._fallback is not None:
            return self._state
        return tuple(a.copy() for a in self._sets[self._current])
