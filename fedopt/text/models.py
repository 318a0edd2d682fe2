"""Transformer models for text tasks: tiny configs built from scratch, and local HF models.

Both factories return a :class:`TextModel`, a plain ``nn.Module`` whose
forward maps token ids to logits (``(b, L, vocab)`` for language modelling,
``(b, classes)`` for classification), so the trainers, DP-SGD and every
method treat it like any other model. Models are always built or loaded
offline: ``transformers`` never reaches the network.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fedopt.data.core import TextSpec
from fedopt.errors import ConfigError
from fedopt.params import check
from fedopt.registry import MODELS

__all__ = ["HFParams", "SIZES", "TextModel", "TransformerParams", "hf", "transformer"]

#: Named sizes: hidden width, layers, attention heads, MLP width.
SIZES: Mapping[str, Mapping[str, int]] = types.MappingProxyType(
    {
        "tiny": {"hidden": 64, "layers": 2, "heads": 4, "mlp": 192},
        "small": {"hidden": 128, "layers": 4, "heads": 4, "mlp": 384},
        "base": {"hidden": 256, "layers": 6, "heads": 8, "mlp": 768},
    }
)


class TextModel(nn.Module):
    """A Hugging Face model (attribute ``net``) seen as ``token ids -> logits``.

    Inputs are right-padded, so causal attention never lets a real token see
    a pad and no attention mask is needed; classification heads pool at the
    last non-pad token (``config.pad_token_id``).
    """

    def __init__(self, net: nn.Module, *, kind: str) -> None:
        super().__init__()
        self.net = net
        self.kind = kind

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=ids.long(), use_cache=False).logits


def _need_text(text: TextSpec | None, model: str) -> TextSpec:
    if text is None:
        raise ConfigError(
            "model.name",
            model,
            "a text dataset (stdlib_docs, text_files): this model reads token ids",
        )
    return text


def _config(arch: str, size: Mapping[str, int], text: TextSpec, seq_len: int, dropout: float):
    """The ``transformers`` config of a from-scratch model."""
    import transformers as tf

    common = {"vocab_size": text.vocab_size, "pad_token_id": text.pad_id}
    if arch == "gpt2":
        return tf.GPT2Config(
            n_embd=size["hidden"],
            n_layer=size["layers"],
            n_head=size["heads"],
            n_inner=size["mlp"],
            n_positions=seq_len,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            **common,
        )
    return tf.LlamaConfig(
        hidden_size=size["hidden"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["heads"],
        intermediate_size=size["mlp"],
        max_position_embeddings=seq_len,
        attention_dropout=dropout,
        tie_word_embeddings=False,
        **common,
    )


@dataclass(frozen=True)
class TransformerParams:
    """A small transformer built from a ``transformers`` config, randomly initialised.

    Attributes
    ----------
    arch : {"llama", "gpt2"}
        Llama style (RMSNorm, rotary positions, gated MLP; Linear layers
        ``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``) or GPT-2 style.
    size : {"tiny", "small", "base"}
        tiny: 64 wide, 2 layers (about 0.13M parameters with the byte vocabulary);
        small: 128 wide, 4 layers (0.8M); base: 256 wide, 6 layers (4.8M).
    dropout : float
        Dropout of attention (and, for gpt2, residuals and embeddings).
    """

    arch: Literal["llama", "gpt2"] = "llama"
    size: Literal["tiny", "small", "base"] = "tiny"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check(self.arch in ("llama", "gpt2"), "arch", self.arch, "'llama' or 'gpt2'")
        check(self.size in SIZES, "size", self.size, "one of " + ", ".join(SIZES))
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "a number in [0, 1)")


def transformer(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    arch: str = "llama",
    size: str = "tiny",
    dropout: float = 0.0,
    text: TextSpec | None = None,
) -> TextModel:
    """A from-scratch transformer for ``text``'s task (causal LM or sequence classification)."""
    import transformers as tf

    spec = _need_text(text, "transformer")
    config = _config(arch, SIZES[size], spec, int(input_shape[0]), dropout)
    if spec.kind == "lm":
        net = tf.AutoModelForCausalLM.from_config(config)
    else:
        config.num_labels = num_classes
        net = tf.AutoModelForSequenceClassification.from_config(config)
    return TextModel(net, kind=spec.kind)


@dataclass(frozen=True)
class HFParams:
    """A Hugging Face model saved in a local directory (``save_pretrained``), loaded offline.

    Attributes
    ----------
    path : str
        The directory. For ``classify`` a fresh classification head of the
        task's size replaces whatever head it has; its tokenizer, if saved
        beside it, is the one ``data.tokenizer = "auto"`` uses.
    """

    path: str = ""

    def __post_init__(self) -> None:
        check(bool(self.path), "path", self.path, "a directory written by save_pretrained")


def hf(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    path: str,
    text: TextSpec | None = None,
) -> TextModel:
    """Load the model in ``path`` with ``from_pretrained`` for ``text``'s task, offline."""
    import transformers as tf

    tf.utils.logging.disable_progress_bar()
    spec = _need_text(text, "hf")
    where = Path(path).expanduser()
    if not (where / "config.json").is_file():
        raise ConfigError(
            "model.path", path, "a directory written by save_pretrained (with config.json)"
        )
    kwargs: dict[str, Any] = {"local_files_only": True}
    if spec.kind == "lm":
        net = tf.AutoModelForCausalLM.from_pretrained(str(where), **kwargs)
    else:
        net = tf.AutoModelForSequenceClassification.from_pretrained(
            str(where), num_labels=num_classes, ignore_mismatched_sizes=True, **kwargs
        )
    if net.config.pad_token_id is None:
        net.config.pad_token_id = spec.pad_id
    vocab = net.get_input_embeddings().num_embeddings
    if spec.vocab_size > vocab:
        raise ConfigError(
            "data.tokenizer",
            spec.tokenizer,
            f"a tokenizer whose {spec.vocab_size} ids fit the model's {vocab} embeddings "
            f"(use 'auto' for the tokenizer saved beside {path})",
        )
    return TextModel(net, kind=spec.kind)


MODELS.register("transformer", transformer, params=TransformerParams)
MODELS.register("hf", hf, params=HFParams)
