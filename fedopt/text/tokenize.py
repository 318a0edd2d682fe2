"""Tokenizers of text tasks: the built-in byte-level one and a local Hugging Face tokenizer.

Nothing is ever downloaded: ``"bytes"`` needs no file at all, and a directory
holding a tokenizer saved by ``transformers`` (typically beside a local model)
is loaded with ``local_files_only=True`` and used as is.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fedopt.errors import ConfigError

__all__ = ["ByteTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer"]


class Tokenizer(Protocol):
    """What the text pipeline asks of a tokenizer."""

    name: str
    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens."""

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; special tokens are dropped."""


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then padding, begin and end of sequence.

    Lossless for any text (every string round-trips), needs no training and
    no file, and its 259-token vocabulary keeps tiny models tiny.
    """

    name: str = "bytes"
    vocab_size: int = 259
    pad_id: int = 256
    bos_id: int | None = 257
    eos_id: int | None = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A tokenizer saved by ``transformers`` in a local directory, loaded offline.

    Padding falls back to the end-of-sequence token, then to id 0, when the
    tokenizer defines none (as many causal-LM tokenizers do).
    """

    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        self.name = str(path)
        self._tok: Any = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.vocab_size = len(self._tok)
        self.bos_id = self._tok.bos_token_id
        self.eos_id = self._tok.eos_token_id
        pad = self._tok.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.eos_id or 0))

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode([int(i) for i in ids], skip_special_tokens=True))


def has_tokenizer(path: Path) -> bool:
    """Whether ``path`` is a directory with a saved tokenizer in it."""
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    return path.is_dir() and any((path / n).is_file() for n in names)


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: str, *, key: str = "data.tokenizer") -> Tokenizer:
    """The tokenizer named by ``spec``: ``"bytes"`` or a directory with a saved tokenizer.

    Raises
    ------
    ConfigError
        Under ``key`` when ``spec`` is neither.
    """
    if spec == "bytes":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if not has_tokenizer(path):
        raise ConfigError(
            key,
            spec,
            "'bytes' (built in), 'auto' (the model directory's tokenizer, else bytes) or a "
            "directory holding a tokenizer saved by transformers (tokenizer.json or "
            "tokenizer_config.json)",
        )
    return HFTokenizer(path.resolve())
