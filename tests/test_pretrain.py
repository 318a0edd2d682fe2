"""Central warm start (cache keys, reuse, loading) and local Hugging Face models and tokenizers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedopt.config import parse_scenario
from fedopt.errors import ConfigError
from fedopt.pretrain import load_warm_start, warm_start, warm_start_key
from fedopt.task import build_task
from fedopt.text.tokenize import HFTokenizer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDOPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    lines = [
        {"text": " ".join(words[(i + k) % 10] for k in range(6)), "label": i % 2, "user": i % 4}
        for i in range(80)
    ]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return path


def scenario(data, model=None, **extra):
    raw = {
        "name": "warm",
        "data": {"name": "text_files", "seq_len": 24, **data},
        "partition": {"name": "iid", "num_clients": 2},
        "model": model or {"name": "transformer", "size": "tiny"},
        "client": {"name": "sgd", "steps": 1},
        "strategy": {"name": "fedavg"},
        "run": {"rounds": 1},
        **extra,
    }
    return parse_scenario(raw)


def test_warm_start_is_cached_and_keyed_by_what_determines_it(cache, jsonl):
    base = {"path": str(jsonl), "public_fraction": 0.5}
    s = scenario(base, pretrain={"steps": 3, "batch_size": 4})
    first = warm_start(s)
    assert not first.cached and first.path.is_file()
    assert first.path.parent == cache / "pretrain" / first.key
    second = warm_start(s)
    assert second.cached and second.path == first.path
    assert second.meta["metrics"] == first.meta["metrics"]
    # A different pretraining config is a different entry; the run's seed and the task are not.
    other = scenario(base, pretrain={"steps": 3, "batch_size": 4, "lr": 0.01})
    assert warm_start_key(other) != first.key
    assert not warm_start(other).cached
    reseeded = scenario(base, pretrain={"steps": 3, "batch_size": 4}, run={"rounds": 1, "seed": 7})
    classify = scenario({**base, "task": "classify"}, pretrain={"steps": 3, "batch_size": 4})
    assert warm_start_key(reseeded) == warm_start_key(classify) == first.key
    assert len(list((cache / "pretrain").iterdir())) == 2


def test_models_start_from_the_checkpoint(cache, jsonl):
    base = {"path": str(jsonl), "public_fraction": 0.5}
    lm = build_task(scenario(base, pretrain={"steps": 3, "batch_size": 4}))
    state = torch.load(warm_start(lm.scenario).path, weights_only=True)
    model = lm.new_model()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    cls = build_task(scenario({**base, "task": "classify"}, pretrain={"steps": 3, "batch_size": 4}))
    model = cls.new_model()
    assert load_warm_start(model, cls.scenario) == ["net.score.weight"]
    got = model.state_dict()
    shared = [k for k in got if k in state]
    assert shared and all(torch.equal(got[k], state[k]) for k in shared)


def test_warm_start_needs_public_text(cache, jsonl):
    with pytest.raises(ConfigError, match="public_fraction"):
        warm_start(scenario({"path": str(jsonl)}, pretrain={"steps": 1}))
    with pytest.raises(ConfigError, match="pretrain"):
        scenario_digits = {
            "name": "x",
            "data": {"name": "digits"},
            "partition": {"name": "iid", "num_clients": 2},
            "model": {"name": "mlp"},
            "client": {"name": "sgd"},
            "strategy": {"name": "fedavg"},
            "run": {"rounds": 1},
            "pretrain": {"steps": 1},
        }
        parse_scenario(scenario_digits)


@pytest.fixture
def local_model(tmp_path, jsonl):
    """A tiny Llama and its own BPE tokenizer, saved the way transformers saves them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in jsonl.read_text().splitlines()]
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<pad>", "<s>", "</s>"], show_progress=False
    )
    raw.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )
    folder = tmp_path / "my-model"
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_local_hf_model_and_its_tokenizer_load_offline(local_model, jsonl):
    from transformers import LlamaForCausalLM

    s = scenario({"path": str(jsonl)}, model={"name": "hf", "path": str(local_model)})
    task = build_task(s)
    text = task.data.train.text
    assert text.tokenizer == str(local_model.resolve())  # "auto" took the model's tokenizer
    tok = HFTokenizer(local_model)
    assert text.vocab_size == tok.vocab_size and text.pad_id == tok.pad_id
    assert tok.decode(tok.encode("alpha beta gamma")) == "alpha beta gamma"
    model = task.new_model()
    reference = LlamaForCausalLM.from_pretrained(str(local_model), local_files_only=True)
    ids = torch.from_numpy(task.data.test.x[:3])
    with torch.no_grad():
        assert torch.equal(model(ids), reference(input_ids=ids).logits)
    cls = build_task(
        scenario(
            {"path": str(jsonl), "task": "classify"},
            model={"name": "hf", "path": str(local_model)},
        )
    )
    out = cls.new_model()(torch.from_numpy(cls.data.test.x[:3]))
    assert out.shape == (3, 2)


def test_bad_local_model_directory(tmp_path, jsonl):
    with pytest.raises(ConfigError, match="save_pretrained"):
        build_task(scenario({"path": str(jsonl)}, model={"name": "hf", "path": str(tmp_path)}))


# -- a classifier's warm start on the public part of a public_split dataset ----------------------


def split_scenario(seed=0, **data):
    return parse_scenario(
        {
            "name": "split",
            "data": {"name": "public_split", "public_classes": [0, 1, 2], **data},
            "partition": {"name": "iid", "num_clients": 3},
            "model": {"name": "mlp", "hidden": [16]},
            "client": {"name": "sgd", "steps": 1},
            "strategy": {"name": "fedavg"},
            "run": {"rounds": 1, "seed": seed},
            "pretrain": {"steps": 60, "batch_size": 32, "lr": 0.01},
        }
    )


def rows(dataset):
    return {r.tobytes() for r in dataset.x}


def test_public_split_holds_a_fixed_share_of_the_public_classes_apart():
    from sklearn.datasets import load_digits

    from fedopt.data import data_params, load_task_data

    counts = np.bincount(load_digits().target)  # 178, 182, 177, ...: 1797 distinct images
    loaded = []
    for seed in (0, 5):
        s = split_scenario(seed)
        loaded.append(load_task_data("public_split", data_params(s), test_fraction=0.2, seed=seed))
    first, second = loaded
    for d in loaded:
        assert len(d.public) + len(d.train) + len(d.test) == 1797
        assert not rows(d.public) & (rows(d.train) | rows(d.test))
        public = np.bincount(d.public.y, minlength=10)
        np.testing.assert_array_equal(public[:3], [round(0.5 * c) for c in counts[:3]])
        assert public[3:].sum() == 0 and d.train.num_classes == d.public.num_classes == 10
    np.testing.assert_array_equal(first.public.x, second.public.x)  # the run's seed: only the test
    assert rows(first.test) != rows(second.test)
    with pytest.raises(ConfigError, match="data.public_classes.*0..9"):
        params = data_params(split_scenario(public_classes=[10]))
        load_task_data("public_split", params, test_fraction=0.2, seed=0)
    with pytest.raises(ConfigError, match="data.public_fraction"):
        split_scenario(public_fraction=1.0)


def test_a_classifier_pretrains_on_the_public_part_and_loads_whole(cache):
    s = split_scenario()
    ws = warm_start(s)
    m = ws.meta["metrics"]
    assert m["public_sequences"] == sum(round(0.5 * c) for c in (178, 182, 177))
    assert m["test_accuracy_after"] > m["test_accuracy_before"] + 0.1
    assert warm_start_key(split_scenario(seed=4)) == ws.key  # one checkpoint for every seed
    assert warm_start_key(split_scenario(public_seed=1)) != ws.key
    task = build_task(s)
    model = task.new_model()
    state = torch.load(ws.path, weights_only=True)
    assert set(model.state_dict()) == set(state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    reseeded = build_task(split_scenario(seed=4)).new_model().state_dict()
    assert all(torch.equal(reseeded[k], v) for k, v in state.items())
