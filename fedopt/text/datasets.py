"""Text datasets: the standard-library docstring corpus and the user's local text files.

Both registered loaders (``stdlib_docs``, ``text_files``) go through
:func:`text_task`: texts are split into a public side (for a central warm
start) and a private side by a hash of each text, so the split does not
depend on the run's seed; the private side is split into the clients' pool
and the central test set by text (all rows of one text on the same side),
then tokenized into rows by :mod:`fedopt.text.encode`.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedopt.data.core import Dataset, TaskData, TextSpec, seed32
from fedopt.errors import ConfigError
from fedopt.params import check
from fedopt.registry import DATASETS
from fedopt.text.encode import classify_rows, instruction_rows, lm_rows
from fedopt.text.stdlib import FAMILIES, family_of, stdlib_docstrings
from fedopt.text.tokenize import has_tokenizer, load_tokenizer

__all__ = ["StdlibDocsParams", "TextCorpus", "stdlib_docs", "text_task"]


@dataclass(frozen=True)
class TextCorpus:
    """Texts with what each one carries: client id, class, and an optional instruction.

    ``labels`` are classes for ``classify`` (and groups for label-based
    partitioners); ``prompts``, when set, make every text the response to
    its prompt (instruction tuning).
    """

    texts: tuple[str, ...]
    ids: np.ndarray
    labels: np.ndarray
    num_labels: int
    prompts: tuple[str, ...] | None = None
    inputs: tuple[str, ...] | None = None


def _public_mask(texts: Sequence[str], fraction: float) -> np.ndarray:
    """Texts whose CRC-32 falls in the first ``fraction`` of the range: the same on every run."""
    cut = int(round(fraction * 2**32))
    return np.array([zlib.crc32(t.encode("utf-8")) < cut for t in texts], dtype=bool)


def _rows(
    corpus: TextCorpus, idx: np.ndarray, task: str, tokenizer: str, seq_len: int, name: str
) -> Dataset:
    """The rows of texts ``idx`` of ``corpus`` for ``task``, as a :class:`Dataset`."""
    tok = load_tokenizer(tokenizer)
    texts = [corpus.texts[i] for i in idx]
    if task == "classify":
        x, y = classify_rows(texts, tok, seq_len=seq_len), corpus.labels[idx]
        source = np.arange(len(idx))
        spec = TextSpec("classify", tok.vocab_size, tok.pad_id, tok.name)
        num_classes = corpus.num_labels
    else:
        if corpus.prompts is None:
            x, y, source = lm_rows(texts, tok, seq_len=seq_len)
        else:
            x, y, source = instruction_rows(
                [corpus.prompts[i] for i in idx],
                texts,
                tok,
                seq_len=seq_len,
                inputs=None if corpus.inputs is None else [corpus.inputs[i] for i in idx],
            )
        spec = TextSpec("lm", tok.vocab_size, tok.pad_id, tok.name)
        num_classes = tok.vocab_size
    rows = idx[source] if len(idx) else idx
    return Dataset(
        x,
        y,
        num_classes,
        natural_id=corpus.ids[rows],
        name=name,
        text=spec,
        groups=corpus.labels[rows],
        num_groups=corpus.num_labels,
    )


def text_task(
    corpus: TextCorpus,
    *,
    task: str,
    tokenizer: str,
    seq_len: int,
    public_fraction: float,
    test_fraction: float,
    seed: int,
    name: str,
    min_client_texts: int = 1,
) -> TaskData:
    """Split ``corpus`` into public / clients' pool / central test, then tokenize each side.

    Raises
    ------
    ConfigError
        When a side would be empty.
    """
    n = len(corpus.texts)
    public = _public_mask(corpus.texts, public_fraction)
    private = np.flatnonzero(~public)
    if min_client_texts > 1:
        ids, counts = np.unique(corpus.ids[private], return_counts=True)
        keep = set(ids[counts >= min_client_texts].tolist())
        private = np.array([i for i in private if corpus.ids[i] in keep], dtype=np.int64)
    n_test = int(math.ceil(test_fraction * len(private)))
    if len(private) - n_test < 1 or n_test < 1:
        raise ConfigError(
            "data.test_fraction",
            test_fraction,
            f"a fraction that leaves texts on both sides of the {len(private)} private texts "
            f"of {name} ({n} texts, {int(public.sum())} public)",
        )
    order = np.random.default_rng(seed32(seed)).permutation(private)
    test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])
    train = _rows(corpus, train_idx, task, tokenizer, seq_len, name)
    test = _rows(corpus, test_idx, task, tokenizer, seq_len, name)
    pub = np.flatnonzero(public)
    pub_rows = _rows(corpus, pub, task, tokenizer, seq_len, name) if len(pub) else None
    if len(train) == 0 or len(test) == 0:
        raise ConfigError(
            "data.seq_len", seq_len, f"a length that leaves examples in {name} after tokenizing"
        )
    return TaskData(name, train, test, pub_rows)


@dataclass(frozen=True)
class StdlibDocsParams:
    """The docstrings of Python's standard library (``stdlib_docs``).

    Attributes
    ----------
    task : {"lm", "classify"}
        ``lm``: causal language modelling on all docstrings (perplexity, token
        accuracy); ``classify``: predict a docstring's module family (one of the
        nine :data:`~fedopt.text.stdlib.FAMILIES`; other modules are left out).
    seq_len : int
        Tokens per example: language-model windows, or the cut of a docstring.
    tokenizer : str
        ``bytes`` (built in), a directory with a saved tokenizer, or ``auto``:
        the tokenizer beside a local ``hf`` model, else bytes.
    min_chars : int
        Shorter docstrings are dropped.
    min_module_docs : int
        Modules with fewer private docstrings are left out of the clients' pool
        (so ``natural`` partitions have no near-empty clients).
    public_fraction : float
        Share of docstrings (by a hash of their text, independent of the seed)
        set aside as public data for a warm start; never given to clients.
    """

    task: Literal["lm", "classify"] = "lm"
    seq_len: int = 128
    tokenizer: str = "auto"
    min_chars: int = 40
    min_module_docs: int = 20
    public_fraction: float = 0.2

    def __post_init__(self) -> None:
        check(self.task in ("lm", "classify"), "task", self.task, "'lm' or 'classify'")
        check(self.seq_len >= 2, "seq_len", self.seq_len, "an integer >= 2")
        check(self.min_chars >= 0, "min_chars", self.min_chars, "an integer >= 0")
        check(self.min_module_docs >= 1, "min_module_docs", self.min_module_docs, ">= 1")
        check(
            0.0 <= self.public_fraction < 1.0,
            "public_fraction",
            self.public_fraction,
            "a fraction in [0, 1)",
        )


def stdlib_docs(params: StdlibDocsParams, *, test_fraction: float, seed: int) -> TaskData:
    """Docstrings of this Python's standard library, one natural client per top-level module."""
    docs = [(m, t) for m, t in stdlib_docstrings() if len(t) >= params.min_chars]
    if params.task == "classify":
        docs = [(m, t) for m, t in docs if family_of(m) < len(FAMILIES)]
    corpus = TextCorpus(
        texts=tuple(t for _, t in docs),
        ids=np.array([m for m, _ in docs]),
        labels=np.array([family_of(m) for m, _ in docs], dtype=np.int64),
        num_labels=len(FAMILIES) + (params.task == "lm"),
    )
    tokenizer = "bytes" if params.tokenizer == "auto" else params.tokenizer  # unbound: bytes
    return text_task(
        corpus,
        task=params.task,
        tokenizer=tokenizer,
        seq_len=params.seq_len,
        public_fraction=params.public_fraction,
        test_fraction=test_fraction,
        seed=seed,
        name="stdlib_docs",
        min_client_texts=params.min_module_docs,
    )


def bind_tokenizer(params: Any, scenario: Any) -> Any:
    """Resolve ``tokenizer = "auto"``: the tokenizer beside a local ``hf`` model, else bytes."""
    if params.tokenizer != "auto":
        return params
    path = Path(getattr(scenario.model.params, "path", "") or ".").expanduser()
    local = scenario.model.name == "hf" and has_tokenizer(path)
    return dataclasses.replace(params, tokenizer=str(path.resolve()) if local else "bytes")


stdlib_docs.bind_scenario = bind_tokenizer  # type: ignore[attr-defined]
DATASETS.register("stdlib_docs", stdlib_docs, params=StdlibDocsParams)
