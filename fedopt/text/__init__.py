"""Language-model tasks: tokenizers, the stdlib docstring corpus, local text files, models.

Importing this package forces the Hugging Face libraries offline (nothing is
ever downloaded) and registers the text datasets and transformer models.
"""

import os

for _flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_flag] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no per-load warnings in run logs

from fedopt.plots import Figure  # noqa: E402
from fedopt.registry import PLOTS  # noqa: E402
from fedopt.text import datasets, local, models  # noqa: E402  (registers after the flags)

__all__ = ["datasets", "local", "models"]

PLOTS.register(
    "perplexity",
    Figure(
        "perplexity_vs_round.png",
        "round",
        "Round",
        "Perplexity",
        ("central_perplexity", "fed_perplexity"),
    ),
)
