"""Text generation: prefill with the sequence graph, decode with the step graph, timed."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, RwkvqError
from .runtime import RwkvSession
from .tokenizers import Tokenizer


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else float("inf")

    def speed_line(self) -> str:
        return (f"prefill: {self.prompt_tokens} tokens, {self.prefill_tokens_per_s:.1f} tokens/s; "
                f"decode: {self.new_tokens} tokens, {self.decode_tokens_per_s:.1f} tokens/s")


def sample_token(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0,
                 top_p: float = 1.0, greedy: bool = False) -> int:
    """Greedy, or nucleus sampling at a temperature."""
    if greedy or temperature <= 0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, top_p)) + 1]
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    return int(rng.choice(len(p), p=p))


def check_sampling(max_tokens: int, temperature: float, top_p: float) -> None:
    """Refuse sampling arguments that cannot make a distribution (NaN and infinities included)."""
    if max_tokens < 0:
        raise ConfigError(f"--max-tokens must be >= 0, got {max_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p}")


def generate(session: RwkvSession, tokenizer: Tokenizer, prompt: str, max_tokens: int, *,
             greedy: bool = False, temperature: float = 1.0, top_p: float = 0.9, seed: int = 0) -> Generation:
    """Continue `prompt` by `max_tokens` tokens."""
    check_sampling(max_tokens, temperature, top_p)
    rng = np.random.default_rng(seed)
    prompt_ids = tokenizer.encode(prompt)
    if tokenizer.bos is not None:
        prompt_ids = [tokenizer.bos] + prompt_ids
    if not prompt_ids:
        raise ConfigError("the prompt is empty and the tokenizer has no BOS token")
    t0 = time.perf_counter()
    logits, state = session.prefill(np.asarray([prompt_ids]))
    last = logits[0]
    t1 = time.perf_counter()
    out: list[int] = []
    decoder = session.decoder(state)  # the state stays in onnxruntime buffers between tokens
    for _ in range(max_tokens):
        if not np.isfinite(last).all():
            raise RwkvqError("the model produced non-finite logits (NaN or infinity); it is corrupt", session.path)
        tok = sample_token(last, rng, temperature, top_p, greedy)
        out.append(tok)
        last = decoder.step(np.asarray([tok]))[0]
    t2 = time.perf_counter()
    return Generation(tokenizer.decode(out), len(prompt_ids), len(out), t1 - t0, t2 - t1)
