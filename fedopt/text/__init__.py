"""Language-model tasks: tokenizers, the stdlib docstring corpus, local text files, models.

Importing this package forces the Hugging Face libraries offline (nothing is
ever downloaded) and registers the text datasets and transformer models.
"""

import os

for _flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_flag] = "1"

from fedopt.text import datasets, models  # noqa: E402  (registers after the flags are set)

__all__ = ["datasets", "models"]
