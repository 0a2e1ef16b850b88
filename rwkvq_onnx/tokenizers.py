"""Tokenizers: raw bytes (vocab 256), RWKV World (vocab 65536) and Hugging Face `tokenizer.json`.

Chosen from the model's vocabulary size unless named explicitly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from .errors import ConfigError


class Tokenizer(Protocol):
    name: str
    bos: int | None  # token fed before a document (RWKV convention: 0 = <|endoftext|>)

    def encode(self, text: str) -> list[int]: ...

    def decode(self, tokens: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens, as the byte-level fixture models use."""

    name = "bytes"
    bos = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, tokens: list[int]) -> str:
        return bytes(t & 0xFF for t in tokens).decode("utf-8", errors="replace")


class WorldTokenizer:
    """RWKV World tokenizer (rwkv_vocab_v20230424) from the `rwkv` package."""

    name = "world"
    bos = 0

    def __init__(self) -> None:
        import rwkv
        from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

        self._tok = TRIE_TOKENIZER(str(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def decode(self, tokens: list[int]) -> str:
        return self._tok.decodeBytes(tokens).decode("utf-8", errors="replace")


class HFTokenizer:
    """Any Hugging Face `tokenizer.json` (for example the GPT-NeoX 20B tokenizer of Pile models)."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _HF

        path = Path(path)
        try:
            self._tok = _HF.from_file(str(path))
        except Exception as exc:
            raise ConfigError(f"cannot read tokenizer: {str(exc).splitlines()[0] if str(exc) else exc}", path) from None
        self.name = f"hf:{path.name}"
        self.bos = self._tok.token_to_id("<|endoftext|>")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, tokens: list[int]) -> str:
        return self._tok.decode(tokens, skip_special_tokens=False)


def get_tokenizer(spec: str | None, vocab_size: int) -> Tokenizer:
    """`spec` is 'bytes', 'world', a path to tokenizer.json, or None/'auto' to choose by vocab size."""
    if spec in (None, "auto"):
        if vocab_size == 256:
            return ByteTokenizer()
        if vocab_size == 65536:
            return WorldTokenizer()
        raise ConfigError(f"no built-in tokenizer for vocab size {vocab_size}: pass --tokenizer PATH/tokenizer.json")
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "world":
        return WorldTokenizer()
    path = Path(spec)
    if not path.is_file():
        raise ConfigError("tokenizer must be 'bytes', 'world' or an existing tokenizer.json", path)
    return HFTokenizer(path)
