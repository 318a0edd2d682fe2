"""The user's own text: a JSONL file or a saved Hugging Face ``datasets`` directory.

Records carry ``text`` (language modelling, or classification with a
``label``), or ``instruction`` / ``response`` (and an optional ``input``):
instruction tuning, whose loss counts the response only. An optional field
names each record's writer, the natural client id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedopt.data.core import TaskData
from fedopt.errors import ConfigError
from fedopt.params import check
from fedopt.registry import DATASETS
from fedopt.text.datasets import TextCorpus, bind_tokenizer, text_task

__all__ = ["TextFilesParams", "read_records", "text_files"]


@dataclass(frozen=True)
class TextFilesParams:
    """Local text data (``text_files``): a ``.jsonl`` file or a ``save_to_disk`` directory.

    Attributes
    ----------
    path : str
        The file (one JSON object per line) or directory (a ``Dataset``, or a
        ``DatasetDict`` whose ``train`` split is used).
    task : {"lm", "classify"}
        ``lm``: language modelling on ``text_field``, or instruction tuning when
        the records have ``instruction_field`` and ``response_field``;
        ``classify``: predict ``label_field`` (integers or strings) from the text.
    text_field, label_field, id_field : str
        Field names; ``id_field`` (optional) is the natural client id.
    instruction_field, response_field, input_field : str
        Instruction-tuning fields (``input_field`` may be absent).
    seq_len : int
        Tokens per example.
    tokenizer : str
        ``bytes``, a tokenizer directory, or ``auto`` (a local ``hf`` model's own).
    public_fraction : float
        Share of records (by a hash of their text) kept out of clients and
        tests for ``[pretrain]``.
    """

    path: str = ""
    task: Literal["lm", "classify"] = "lm"
    text_field: str = "text"
    label_field: str = "label"
    id_field: str = ""
    instruction_field: str = "instruction"
    response_field: str = "response"
    input_field: str = "input"
    seq_len: int = 128
    tokenizer: str = "auto"
    public_fraction: float = 0.0

    def __post_init__(self) -> None:
        check(bool(self.path), "path", self.path, "a .jsonl file or a save_to_disk directory")
        check(self.task in ("lm", "classify"), "task", self.task, "'lm' or 'classify'")
        check(self.seq_len >= 2, "seq_len", self.seq_len, "an integer >= 2")
        check(
            0.0 <= self.public_fraction < 1.0,
            "public_fraction",
            self.public_fraction,
            "a fraction in [0, 1)",
        )


def read_records(path: str) -> list[dict[str, Any]]:
    """The records of a JSONL file or a ``save_to_disk`` directory, as dicts."""
    where = Path(path).expanduser()
    if where.is_dir():
        import datasets

        try:
            saved = datasets.load_from_disk(str(where))
        except (FileNotFoundError, ValueError, OSError) as err:
            raise ConfigError("data.path", path, f"a save_to_disk directory ({err})") from None
        if isinstance(saved, datasets.DatasetDict):
            if "train" not in saved:
                raise ConfigError(
                    "data.path", path, f"a DatasetDict with a 'train' split, not {list(saved)}"
                )
            saved = saved["train"]
        return [dict(r) for r in saved]
    if not where.is_file():
        raise ConfigError("data.path", path, f"an existing .jsonl file or directory ({Path.cwd()})")
    out = []
    for n, line in enumerate(where.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            msg = f"one JSON object per line (line {n}: {err})"
            raise ConfigError("data.path", path, msg) from None
        if not isinstance(record, dict):
            raise ConfigError("data.path", path, f"one JSON object per line (line {n})")
        out.append(record)
    return out


def _column(records: list[dict], field: str, path: str, key: str) -> list[Any]:
    missing = [i for i, r in enumerate(records) if field not in r]
    if missing:
        raise ConfigError(
            key, field, f"a field every record of {path} has (record {missing[0]} lacks it)"
        )
    return [r[field] for r in records]


def _label_order(label: str) -> tuple[bool, int, str]:
    """Integer labels in numeric order first, then the others alphabetically."""
    return (not label.isdigit(), int(label) if label.isdigit() else 0, label)


def _corpus(p: TextFilesParams, records: list[dict]) -> TextCorpus:
    """The records as a :class:`TextCorpus` for ``p.task``."""
    instruct = p.task == "lm" and all(
        p.instruction_field in r and p.response_field in r for r in records
    )
    if instruct:
        texts = [str(t) for t in _column(records, p.response_field, p.path, "data.response_field")]
        prompts = _column(records, p.instruction_field, p.path, "data.instruction_field")
        inputs = tuple(str(r.get(p.input_field) or "") for r in records)
    else:
        texts = [str(t) for t in _column(records, p.text_field, p.path, "data.text_field")]
        prompts, inputs = None, None
    ids = (
        np.asarray([str(v) for v in _column(records, p.id_field, p.path, "data.id_field")])
        if p.id_field
        else np.arange(len(records))
    )
    if p.task == "classify":
        raw = _column(records, p.label_field, p.path, "data.label_field")
        names = sorted({str(v) for v in raw}, key=_label_order)
        index = {v: i for i, v in enumerate(names)}
        labels = np.array([index[str(v)] for v in raw], dtype=np.int64)
        num = len(names)
    else:
        labels, num = np.zeros(len(records), dtype=np.int64), 1
    return TextCorpus(
        tuple(texts),
        ids,
        labels,
        num,
        prompts=None if prompts is None else tuple(str(s) for s in prompts),
        inputs=inputs,
    )


def text_files(params: TextFilesParams, *, test_fraction: float, seed: int) -> TaskData:
    """Local JSONL or saved-dataset text, for language modelling, instructions or classification."""
    records = read_records(params.path)
    if not records:
        raise ConfigError("data.path", params.path, "a file with at least one record")
    return text_task(
        _corpus(params, records),
        task=params.task,
        tokenizer="bytes" if params.tokenizer == "auto" else params.tokenizer,
        seq_len=params.seq_len,
        public_fraction=params.public_fraction,
        test_fraction=test_fraction,
        seed=seed,
        name=f"text file {params.path}",
    )


text_files.bind_scenario = bind_tokenizer  # type: ignore[attr-defined]
DATASETS.register("text_files", text_files, params=TextFilesParams)
