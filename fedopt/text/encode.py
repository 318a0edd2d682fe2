"""Texts to fixed-length token arrays: language-model windows, instructions, labelled sequences.

Every function returns the rows of a :class:`~fedopt.data.Dataset` plus, for
each row, the index of the source text it came from, so loaders can carry a
text's client id, group and public/private side over to all its rows.
Sequences are right-padded: with causal attention no real token ever attends
to a pad, so the models need no attention mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedopt.text.tokenize import Tokenizer
from fedopt.training import IGNORE_INDEX

__all__ = ["PROMPT_TEMPLATE", "classify_rows", "instruction_rows", "lm_rows"]

#: How an instruction (and its optional input) is laid out before the response.
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n{input}### Response:\n"

Rows = tuple[np.ndarray, np.ndarray, np.ndarray]


def _framed(tok: Tokenizer, ids: list[int]) -> list[int]:
    """``ids`` between the tokenizer's begin and end tokens (those it has)."""
    head = [] if tok.bos_id is None else [tok.bos_id]
    tail = [] if tok.eos_id is None else [tok.eos_id]
    return head + ids + tail


def _pack(seqs: list[list[int]], targets: list[list[int]], seq_len: int, pad: int) -> Rows:
    n = len(seqs)
    x = np.full((n, seq_len), pad, dtype=np.int64)
    y = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    for i, (s, t) in enumerate(zip(seqs, targets, strict=True)):
        x[i, : len(s)] = s
        y[i, : len(t)] = t
    return x, y, np.empty(0, dtype=np.int64)


def lm_rows(texts: Sequence[str], tok: Tokenizer, *, seq_len: int) -> Rows:
    """Causal-LM windows: each text, framed, is cut into windows of ``seq_len`` predictions.

    Window ``k`` of a text covers tokens ``[k·L, (k+1)·L]`` of its framed
    ids; ``x`` holds the first L, ``y`` the L next-token targets. A last
    window with fewer than two tokens is dropped.

    Returns
    -------
    x, y : numpy.ndarray
        int64 arrays of shape ``(rows, seq_len)``; ``y`` is -100 past the text's end.
    source : numpy.ndarray
        The index into ``texts`` of each row.
    """
    seqs, targets, source = [], [], []
    for i, text in enumerate(texts):
        ids = _framed(tok, tok.encode(text))
        for start in range(0, max(len(ids) - 1, 0), seq_len):
            window = ids[start : start + seq_len + 1]
            if len(window) < 2:
                continue
            seqs.append(window[:-1])
            targets.append(window[1:])
            source.append(i)
    x, y, _ = _pack(seqs, targets, seq_len, tok.pad_id)
    return x, y, np.asarray(source, dtype=np.int64)


def instruction_rows(
    instructions: Sequence[str],
    responses: Sequence[str],
    tok: Tokenizer,
    *,
    seq_len: int,
    inputs: Sequence[str] | None = None,
) -> Rows:
    """Instruction tuning: prompt then response, the loss on the response (and end) only.

    The prompt is :data:`PROMPT_TEMPLATE`; targets that predict a prompt token
    are -100, so only the response's tokens and the end-of-sequence token are
    learnt. Sequences longer than ``seq_len`` are cut at the end; an example
    whose prompt fills the whole window has nothing left to learn and is dropped.
    """
    seqs, targets, source = [], [], []
    for i, (instruction, response) in enumerate(zip(instructions, responses, strict=True)):
        extra = inputs[i] if inputs is not None and inputs[i] else ""
        prompt = PROMPT_TEMPLATE.format(
            instruction=instruction, input=f"{extra}\n\n" if extra else ""
        )
        prompt_ids = ([] if tok.bos_id is None else [tok.bos_id]) + tok.encode(prompt)
        answer = tok.encode(response) + ([] if tok.eos_id is None else [tok.eos_id])
        ids = (prompt_ids + answer)[: seq_len + 1]
        learnt = [t if j + 1 >= len(prompt_ids) else IGNORE_INDEX for j, t in enumerate(ids[1:])]
        if all(t == IGNORE_INDEX for t in learnt):
            continue
        seqs.append(ids[:-1])
        targets.append(learnt)
        source.append(i)
    x, y, _ = _pack(seqs, targets, seq_len, tok.pad_id)
    return x, y, np.asarray(source, dtype=np.int64)


def classify_rows(texts: Sequence[str], tok: Tokenizer, *, seq_len: int) -> np.ndarray:
    """Token ids of each text (begin token first), cut or right-padded to ``seq_len``."""
    x = np.full((len(texts), seq_len), tok.pad_id, dtype=np.int64)
    head = [] if tok.bos_id is None else [tok.bos_id]
    for i, text in enumerate(texts):
        ids = (head + tok.encode(text))[:seq_len]
        x[i, : len(ids)] = ids
    return x
