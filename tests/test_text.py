"""Language-model tasks: corpus, tokenizers, row encoding, local text and local HF models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedopt.config import parse_scenario
from fedopt.data import load_task_data, partition_clients
from fedopt.errors import ConfigError
from fedopt.task import build_task
from fedopt.text.datasets import StdlibDocsParams, TextCorpus, _public_mask, text_task
from fedopt.text.encode import PROMPT_TEMPLATE, classify_rows, instruction_rows, lm_rows
from fedopt.text.stdlib import FAMILIES, family_of, stdlib_docstrings
from fedopt.text.tokenize import ByteTokenizer, load_tokenizer
from fedopt.training import IGNORE_INDEX, evaluate, objective

TOK = ByteTokenizer()


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def test_stdlib_corpus_is_deterministic_and_rich(tmp_path, monkeypatch):
    cached = stdlib_docstrings()
    monkeypatch.setenv("FEDOPT_CACHE", str(tmp_path))  # a cold cache: parse the library again
    stdlib_docstrings.cache_clear()
    try:
        fresh = stdlib_docstrings()
    finally:
        stdlib_docstrings.cache_clear()
    assert fresh == cached
    assert len(fresh) > 2000
    modules = {m for m, _ in fresh}
    assert {"json", "asyncio", "collections", "email"} <= modules
    assert all(isinstance(t, str) and t for _, t in fresh)
    assert list(tmp_path.glob("corpus/stdlib-*.json"))  # written for the next process


def test_families_cover_the_big_modules():
    assert len(FAMILIES) == 9
    assert family_of("json") == list(FAMILIES).index("formats")
    assert family_of("asyncio") == list(FAMILIES).index("concurrency")
    assert family_of("turtle") == len(FAMILIES)  # "other": left out of classification
    every = [m for mods in FAMILIES.values() for m in mods]
    assert len(every) == len(set(every))  # no module in two families


def test_stdlib_lm_partitions_by_module_are_disjoint_and_public_is_apart():
    data = load_task_data("stdlib_docs", {"task": "lm"}, test_fraction=0.1, seed=0)
    train, test, public = data.train, data.test, data.public
    assert train.text.kind == "lm" and train.y.shape == train.x.shape
    modules = np.unique(train.natural_id)
    parts = partition_clients(train, "natural", None, num_clients=len(modules), seed=0)
    seen = np.concatenate(parts)
    assert len(seen) == len(np.unique(seen)) == len(train)
    for idx in parts:
        assert len(np.unique(train.natural_id[idx])) == 1
    # The public side is exactly the windows of the texts whose hash marks them public.
    texts = [t for _, t in stdlib_docstrings() if len(t) >= 40]
    mask = _public_mask(texts, 0.2)
    assert 0.15 < mask.mean() < 0.25
    x, _, _ = lm_rows([t for t, m in zip(texts, mask, strict=True) if m], TOK, seq_len=128)
    np.testing.assert_array_equal(public.x, x)
    assert len(train) + len(test) < len(lm_rows(texts, TOK, seq_len=128)[0]) - len(x) + 1
    # The public side does not move with the run's seed.
    other = load_task_data("stdlib_docs", {"task": "lm"}, test_fraction=0.1, seed=5)
    np.testing.assert_array_equal(other.public.x, public.x)


def test_stdlib_classify_has_family_labels():
    p = StdlibDocsParams(task="classify", seq_len=64)
    data = load_task_data("stdlib_docs", p, test_fraction=0.1, seed=0)
    assert data.train.num_classes == len(FAMILIES)
    assert set(np.unique(data.train.y)) == set(range(len(FAMILIES)))
    assert data.train.x.shape[1] == 64
    assert np.all(data.train.x[:, 0] == TOK.bos_id)
    parts = partition_clients(
        data.train, "dirichlet", {"alpha": 0.5}, num_clients=8, seed=0
    )  # Dirichlet over module families
    assert sum(len(p) for p in parts) == len(data.train)


@pytest.mark.parametrize("text", ["plain ascii", "ünïcödé ✓ and 中文", ""])
def test_byte_tokenizer_round_trip(text):
    ids = TOK.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert TOK.decode([TOK.bos_id, *ids, TOK.eos_id, TOK.pad_id]) == text


def test_lm_rows_are_shifted_windows():
    text = "abcdefghij"  # 10 bytes, framed: 12 tokens, 11 predictions
    x, y, source = lm_rows([text, "z"], TOK, seq_len=4)
    # windows of 4 predictions: 11 -> 3 windows; "z" framed is 3 tokens -> 1 window
    assert x.shape == (4, 4) and list(source) == [0, 0, 0, 1]
    framed = [TOK.bos_id, *TOK.encode(text), TOK.eos_id]
    assert list(x[0]) == framed[0:4] and list(y[0]) == framed[1:5]
    assert list(x[1]) == framed[4:8] and list(y[1]) == framed[5:9]
    assert list(x[2]) == [*framed[8:11], TOK.pad_id]
    assert list(y[2]) == [*framed[9:12], IGNORE_INDEX]


def test_instruction_rows_mask_the_prompt_from_the_loss():
    x, y, _ = instruction_rows(["Add 2 and 3."], ["5"], TOK, seq_len=64)
    prompt = PROMPT_TEMPLATE.format(instruction="Add 2 and 3.", input="")
    n_prompt = 1 + len(TOK.encode(prompt))  # begin token + prompt
    counted = y[0] != IGNORE_INDEX
    assert not counted[: n_prompt - 1].any()
    assert TOK.decode(y[0][counted]) == "5"  # the response, then the end token
    assert y[0][counted][-1] == TOK.eos_id and counted.sum() == 2
    # the loss ignores any prediction at prompt positions
    logits = torch.randn(1, 64, TOK.vocab_size)
    loss, _, count = objective(logits, torch.from_numpy(y))
    changed = logits.clone()
    changed[0, : n_prompt - 1] += 100 * torch.randn(n_prompt - 1, TOK.vocab_size)
    assert int(count) == 2
    assert torch.equal(objective(changed, torch.from_numpy(y))[0], loss)


def test_classify_rows_cut_and_pad():
    x = classify_rows(["hello world", "hi"], TOK, seq_len=5)
    assert list(x[0]) == [TOK.bos_id, *TOK.encode("hell")]
    assert list(x[1]) == [TOK.bos_id, *TOK.encode("hi"), TOK.pad_id, TOK.pad_id]


def _corpus(n=40):
    texts = tuple(f"document number {i} about topic {i % 3}" for i in range(n))
    return TextCorpus(texts, np.arange(n) % 4, np.arange(n) % 3, 3)


def test_text_task_public_train_test_are_disjoint_texts():
    data = text_task(
        _corpus(),
        task="classify",
        tokenizer="bytes",
        seq_len=48,
        public_fraction=0.3,
        test_fraction=0.25,
        seed=0,
        name="toy",
    )
    decode = {side: {TOK.decode(r) for r in getattr(data, side).x} for side in ("train", "test")}
    public = {TOK.decode(r) for r in data.public.x}
    assert decode["train"].isdisjoint(decode["test"])
    assert public.isdisjoint(decode["train"] | decode["test"])
    assert len(decode["train"]) + len(decode["test"]) + len(public) == 40


def test_jsonl_classification_and_instruction_records(tmp_path):
    cls = write_jsonl(
        tmp_path / "cls.jsonl",
        [{"text": f"text {i}", "label": ["neg", "pos"][i % 2], "user": i % 3} for i in range(30)],
    )
    data = load_task_data(
        "text_files",
        {"path": str(cls), "task": "classify", "id_field": "user", "seq_len": 16},
        test_fraction=0.2,
        seed=0,
    )
    assert data.train.num_classes == 2
    assert set(np.unique(data.train.natural_id)) == {"0", "1", "2"}
    inst = write_jsonl(
        tmp_path / "inst.jsonl",
        [{"instruction": f"Say {i}.", "response": f"{i}"} for i in range(20)],
    )
    data = load_task_data("text_files", {"path": str(inst)}, test_fraction=0.2, seed=0)
    counted = data.train.y != IGNORE_INDEX
    assert counted.any() and (counted.sum(axis=1) <= 3).all()  # at most 2 digits and the end


def test_bad_text_inputs_name_the_problem(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(ConfigError, match="line 2"):
        load_task_data("text_files", {"path": str(bad)}, test_fraction=0.2, seed=0)
    missing = write_jsonl(tmp_path / "m.jsonl", [{"body": "x"}])
    with pytest.raises(ConfigError, match="text_field"):
        load_task_data("text_files", {"path": str(missing)}, test_fraction=0.2, seed=0)
    with pytest.raises(ConfigError, match="tokenizer"):
        load_tokenizer(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="text dataset"):
        parse_and_build({"data": {"name": "digits"}, "model": {"name": "transformer"}})


def parse_and_build(sections):
    raw = {
        "name": "t",
        "partition": {"name": "iid", "num_clients": 2},
        "client": {"name": "sgd", "steps": 1},
        "strategy": {"name": "fedavg"},
        "run": {"rounds": 1},
        **sections,
    }
    return build_task(parse_scenario(raw))


def test_transformer_evaluates_token_weighted_cross_entropy():
    task = parse_and_build(
        {
            "data": {"name": "stdlib_docs", "seq_len": 32},
            "partition": {"name": "iid", "num_clients": 3},
            "model": {"name": "transformer", "size": "tiny"},
        }
    )
    model = task.new_model()
    x, y = torch.from_numpy(task.data.test.x[:9]), torch.from_numpy(task.data.test.y[:9])
    res = evaluate(model, x, y, batch_size=4)
    with torch.no_grad():
        logits = model(x)
    mask = y != IGNORE_INDEX
    want = torch.nn.functional.cross_entropy(logits[mask], y[mask])
    assert res.loss == pytest.approx(float(want), rel=1e-5)
    assert logits.shape == (9, 32, TOK.vocab_size)
