"""The audit's figure: each audited client's canary scores, included against left out.

One row per audited client, one panel per attack (white-box, black-box):
histograms of the scores of the included and of the left-out canaries, with
the proven ε lower bound and the reported ε in the title. Drawn with
matplotlib's object-oriented API on the Agg canvas, as :mod:`fedopt.plots`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_audit"]

_TITLES = {"white_box": "white-box: update · clipped gradient", "black_box": "black-box: loss drop"}


def _eps(value: float) -> str:
    return "∞" if math.isinf(value) else ("n/a" if math.isnan(value) else f"{value:.2f}")


def plot_audit(scores: Mapping[str, Any], result: Mapping[str, Any], path: Path) -> Path:
    """Draw ``audit.png``: ``scores`` is summary.json's ``audit`` block, ``result`` the analysis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    clients = list(result["clients"])
    fig = Figure(figsize=(10.0, 3.6 * len(clients)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(clients), len(_TITLES), squeeze=False)
    for row, cid in zip(axes, clients, strict=True):
        info = result["clients"][cid]
        inc = np.array([c == "1" for c in info["inclusion"]])
        reported = min(info["reported_epsilon"].values(), default=math.nan)
        for ax, (attack, title) in zip(row, _TITLES.items(), strict=True):
            s = np.asarray(scores["clients"][cid][attack], dtype=np.float64)
            bins = np.histogram_bin_edges(s, bins=40)
            ax.hist(s[inc], bins=bins, alpha=0.6, label=f"included ({inc.sum()})")
            ax.hist(s[~inc], bins=bins, alpha=0.6, label=f"left out ({(~inc).sum()})")
            b = info[attack]
            ax.set_title(
                f"client {cid}, {title}\nε ≥ {_eps(b['epsilon'])} ({b['correct']}/{b['guesses']} "
                f"right; at most {_eps(b['cap'])}), reported ε {_eps(reported)}",
                fontsize="small",
            )
            ax.set_xlabel("score")
            ax.set_ylabel("canaries")
            ax.grid(True, alpha=0.3)
            ax.legend(loc="best", fontsize="small")
    fig.savefig(path, dpi=110)
    fig.clear()
    return path
