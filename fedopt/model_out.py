"""The trained models a run writes (``model_final.pt``, ``model_best.pt``) and reading them back.

Every run that finishes writes ``model_final.pt``: the global model the run
ends with (the merged model of a decentralized run, FedKSeed's replayed
model, a LoRA run's wrapped model with its adapters), as a state_dict with the
resolved scenario that rebuilds it. A run with central evaluation also keeps
``model_best.pt``, rewritten whenever the central accuracy improves; the best
so far is read from the rows, so a resumed run keeps the same file an
uninterrupted one does. :func:`load_model` rebuilds either (``fedopt eval``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedopt.errors import ConfigError
from fedopt.report import atomic_file

__all__ = ["MODEL_BEST", "MODEL_FINAL", "BestModel", "load_model", "save_model"]

MODEL_FINAL = "model_final.pt"
MODEL_BEST = "model_best.pt"
_WHICH = {"final": MODEL_FINAL, "best": MODEL_BEST}


def save_model(
    path: Path, state: Mapping[str, Any], *, scenario: Any, round_: int, accuracy: float | None
) -> Path:
    """Write ``state`` (tensors or arrays) with the scenario that rebuilds it, atomically."""
    import torch

    tensors = {k: torch.as_tensor(v) for k, v in state.items()}
    payload = {
        "format": 1,
        "state_dict": tensors,
        "scenario": scenario.to_dict(),
        "round": int(round_),
        "central_accuracy": accuracy,
    }
    with atomic_file(path, "wb") as fh:
        torch.save(payload, fh)
    return Path(path)


class BestModel:
    """Keeps ``model_best.pt`` at the best central accuracy of the rows so far.

    Parameters
    ----------
    run_dir : Path
        Where the file goes.
    scenario : Scenario
        The run's scenario (written with the weights).
    rows : sequence of dict
        Rows already written (a resumed run's): the best among them is the bar.
    """

    def __init__(self, run_dir: Path, scenario: Any, rows: Sequence[Mapping[str, Any]]) -> None:
        self.path = Path(run_dir) / MODEL_BEST
        self.scenario = scenario
        seen = [float(r["central_accuracy"]) for r in rows if r.get("central_accuracy") is not None]
        self.best = max((a for a in seen if math.isfinite(a)), default=-math.inf)

    def offer(self, row: Mapping[str, Any], state: Callable[[], Mapping[str, Any]]) -> bool:
        """Write ``state()`` when ``row``'s central accuracy beats the best; return whether it did.

        ``state`` is called only then, so an evaluation that is not the best
        copies no weights.
        """
        acc = row.get("central_accuracy")
        if acc is None or not math.isfinite(float(acc)) or acc <= self.best:
            return False
        self.best = float(acc)
        save_model(
            self.path, state(), scenario=self.scenario, round_=int(row["round"]), accuracy=self.best
        )
        return True


def load_model(run_dir: str | Path, which: str = "final", sets: Sequence[str] = ()) -> tuple:
    """``(model, task, payload)`` of a run's ``final`` or ``best`` model, rebuilt and loaded.

    ``sets`` override the stored scenario before the task is built (e.g.
    ``data.*`` keys to score the model on another dataset of the same shape).

    Raises
    ------
    ConfigError
        ``which`` is not final/best, the file is missing or unreadable, or the
        weights do not fit the model the scenario builds.
    """
    import torch

    from fedopt.config import apply_overrides, parse_scenario
    from fedopt.task import build_task
    from fedopt.training import load_weights_

    if which not in _WHICH:
        raise ConfigError("--which", which, " | ".join(_WHICH))
    path = Path(run_dir) / _WHICH[which]
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(
            "run_dir", str(run_dir), f"a run directory holding {path.name} (a finished run)"
        ) from None
    except Exception as err:  # a torn or foreign file
        raise ConfigError("run_dir", str(run_dir), f"a readable {path.name} ({err})") from None
    scenario = parse_scenario(apply_overrides(payload["scenario"], sets))
    task = build_task(scenario)
    model = task.new_model()
    try:
        load_weights_(model, payload["state_dict"])
    except ValueError as err:
        raise ConfigError(
            "--set", list(sets), f"a task whose model fits {path.name} ({err})"
        ) from None
    model.eval()
    return model, task, payload
