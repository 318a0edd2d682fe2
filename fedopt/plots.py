"""PNG plots of one run's curves and of strategy comparisons across seeds.

Figures are drawn with matplotlib's object-oriented API on the Agg canvas,
imported inside the plotting functions: nothing touches pyplot's global figure
registry, so no figure outlives the call and importing this module is cheap.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedopt.registry import PLOTS
from fedopt.report import accuracy_key, loss_key, series

__all__ = ["COMPARE_AXES", "Figure", "mean_curve", "plot_compare", "plot_run", "slug"]

# (row key, axis label, scale applied to the values, interpolate across seeds)
COMPARE_AXES = (
    ("round", "Round", 1.0, False),
    ("sim_time", "Simulated time (s)", 1.0, True),
    ("cum_bytes", "Cumulative traffic (MB)", 1e-6, True),
)
_LABELS = {
    "central_accuracy": "central",
    "fed_accuracy": "federated",
    "fed_accuracy_worst10": "federated, worst 10%",
    "train_loss": "train",
    "central_loss": "central",
    "fed_loss": "federated",
}
_GRID_POINTS = 200


def slug(text: str) -> str:
    """Return a filesystem-safe name: runs of other characters than ``[A-Za-z0-9._-]`` -> ``-``."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-.")
    return out or "x"


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    """A new Agg figure with one labelled axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Any, ax: Any, path: Path) -> Path:
    ax.legend(loc="best", fontsize="small")
    fig.savefig(path, dpi=110)
    fig.clear()
    return path


@dataclass(frozen=True)
class Figure:
    """One run figure: ``keys`` (row keys, or ``"accuracy"`` for the run's accuracy) against ``x``.

    Methods register their own with ``fedopt.registry.PLOTS.register(name, Figure(...))``
    (e.g. accuracy against ε, learning rates against rounds); :func:`plot_run`
    draws them after the built-in figures whenever their data is present.
    """

    filename: str
    x: str
    xlabel: str
    ylabel: str
    keys: tuple[str, ...]
    x_scale: float = 1.0


def plot_run(rows: Sequence[Mapping[str, Any]], out_dir: Path, *, title: str) -> list[Path]:
    """Plot one run's curves into ``out_dir``; a figure whose data is absent is skipped.

    Writes ``accuracy_vs_round.png`` (central, federated and worst-10% federated
    accuracy), ``loss_vs_round.png`` (train, central and federated loss),
    ``accuracy_vs_sim_time.png`` and ``accuracy_vs_bytes.png`` (x in MB,
    10^6 bytes of cumulative traffic), ``loss_vs_sim_time.png`` and
    ``loss_vs_bytes.png`` (train loss and the evaluation loss that matches the
    accuracy), then every figure registered in :data:`fedopt.registry.PLOTS`.

    Returns
    -------
    list of Path
        The files written, in the order above.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    acc = accuracy_key(rows)
    acc_only = (acc,) if acc else ()
    loss = loss_key(rows)
    loss_only = (loss,) if loss else ()
    figures = (
        ("accuracy_vs_round.png", "round", "Round", 1.0, "Accuracy",
         ("central_accuracy", "fed_accuracy", "fed_accuracy_worst10")),
        ("loss_vs_round.png", "round", "Round", 1.0, "Loss",
         ("train_loss", "central_loss", "fed_loss")),
        ("accuracy_vs_sim_time.png", "sim_time", "Simulated time (s)", 1.0, "Accuracy", acc_only),
        ("accuracy_vs_bytes.png", "cum_bytes", "Cumulative traffic (MB)", 1e-6, "Accuracy",
         acc_only),
        ("loss_vs_sim_time.png", "sim_time", "Simulated time (s)", 1.0, "Loss",
         ("train_loss", *loss_only)),
        ("loss_vs_bytes.png", "cum_bytes", "Cumulative traffic (MB)", 1e-6, "Loss",
         ("train_loss", *loss_only)),
    )  # fmt: skip
    extra = tuple(
        (f.filename, f.x, f.xlabel, f.x_scale, f.ylabel,
         tuple(acc or "" if k == "accuracy" else k for k in f.keys))
        for f in (entry.obj for entry in PLOTS)
    )  # fmt: skip
    written = []
    for name, x, xlabel, scale, ylabel, keys in figures + extra:
        curves = [(k, *series(rows, k, x=x)) for k in keys if k]
        curves = [c for c in curves if c[1]]
        if not curves:
            continue
        fig, ax = _figure(title, xlabel, ylabel)
        for key, xs, ys in curves:
            ax.plot(np.asarray(xs, float) * scale, ys, marker="." if len(xs) < 60 else None,
                    label=_LABELS.get(key, key))  # fmt: skip
        written.append(_save(fig, ax, out_dir / name))
    return written


def _sorted(xs: Sequence[float], ys: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``xs`` and ``ys`` as float arrays, stably sorted by ``xs``."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    order = np.argsort(x, kind="stable")
    return x[order], y[order]


def mean_curve(
    runs: Sequence[Sequence[Mapping[str, Any]]], y: str, *, x: str, interpolate: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Mean and population std of ``y`` over seeds on a common grid of ``x``.

    Without ``interpolate`` the grid is the ``x`` values every seed has (rounds);
    with it the grid is 200 evenly spaced points over the range all seeds cover
    and each seed is linearly interpolated onto it (a single seed keeps its own
    points). ``None`` when no common grid exists.
    """
    curves = [series(run, y, x=x) for run in runs]
    curves = [_sorted(xs, ys) for xs, ys in curves if xs]
    if not curves:
        return None
    if not interpolate:
        grid = sorted(set.intersection(*(set(xs.tolist()) for xs, _ in curves)))
        if not grid:
            return None
        lookup = [dict(zip(xs.tolist(), ys.tolist(), strict=True)) for xs, ys in curves]
        stack = np.array([[values[g] for g in grid] for values in lookup])
        grid = np.asarray(grid, float)
    elif len(curves) == 1:
        grid, stack = curves[0][0], curves[0][1][None, :]
    else:
        lo = max(float(xs.min()) for xs, _ in curves)
        hi = min(float(xs.max()) for xs, _ in curves)
        if hi < lo:
            return None
        grid = np.linspace(lo, hi, _GRID_POINTS) if hi > lo else np.array([lo])
        stack = np.array([np.interp(grid, xs, ys) for xs, ys in curves])
    return grid, stack.mean(axis=0), stack.std(axis=0)


def _overlay(
    by_strategy: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]],
    y: str,
    axis: tuple[str, str, float, bool],
    *,
    title: str,
    ylabel: str,
    path: Path,
) -> Path | None:
    """One figure with each strategy's mean curve and a ±std band; ``None`` if empty."""
    x, xlabel, scale, interpolate = axis
    fig, ax = _figure(title, xlabel, ylabel)
    drawn = 0
    for strategy, runs in by_strategy.items():
        curve = mean_curve(runs, y, x=x, interpolate=interpolate)
        if curve is None:
            continue
        grid, mean, std = curve
        (line,) = ax.plot(grid * scale, mean, label=f"{strategy} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(grid * scale, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        drawn += 1
    if not drawn:
        fig.clear()
        return None
    return _save(fig, ax, path)


def plot_compare(
    curves: Mapping[str, Mapping[str, Sequence[Sequence[Mapping[str, Any]]]]],
    out_dir: Path,
    *,
    title: str,
) -> list[Path]:
    """Overlay strategies per heterogeneity setting: mean accuracy over seeds ± std.

    ``curves[setting][strategy]`` is a list over seeds of row lists. Per setting
    writes ``compare_<slug>_round.png``, ``compare_<slug>_sim_time.png``,
    ``compare_<slug>_cum_bytes.png`` (accuracy) and ``compare_<slug>_loss.png``
    (the matching evaluation loss against round). Settings whose slugs collide
    get ``-2``, ``-3``, ... appended.

    Returns
    -------
    list of Path
        The files written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    used: set[str] = set()
    for setting, by_strategy in curves.items():
        base = name = slug(setting)
        n = 1
        while name in used:
            n += 1
            name = f"{base}-{n}"
        used.add(name)
        rows = [r for runs in by_strategy.values() for run in runs for r in run]
        acc, loss = accuracy_key(rows), loss_key(rows)
        heading = f"{title}: {setting}"
        jobs = [(acc, axis, "Accuracy", f"compare_{name}_{axis[0]}.png") for axis in COMPARE_AXES]
        jobs.append((loss, COMPARE_AXES[0], "Loss", f"compare_{name}_loss.png"))
        for y, axis, ylabel, file in jobs:
            if y is None:
                continue
            path = _overlay(by_strategy, y, axis, title=heading, ylabel=ylabel, path=out_dir / file)
            if path is not None:
                written.append(path)
    return written


def plot_across(
    values: Mapping[str, Mapping[float, Sequence[float]]],
    out_dir: Path,
    *,
    title: str,
    key: str,
    metric: str,
) -> Path:
    """One line per strategy of ``metric`` against the swept ``key``: mean over seeds ± std.

    ``values[strategy][x]`` holds the per-seed values at setting value ``x``.
    The x axis is logarithmic when the values are positive and span a decade
    or more (Dirichlet α from 0.05 to 0.9 or 100). Writes
    ``compare_<metric>_vs_<key>.png``.
    """
    xs_all = sorted({x for by_x in values.values() for x in by_x})
    fig, ax = _figure(title, key, metric.replace("_", " "))
    if xs_all and xs_all[0] > 0 and xs_all[-1] / xs_all[0] >= 10:
        ax.set_xscale("log")
    for strategy, by_x in values.items():
        xs = sorted(by_x)
        mean = np.array([np.mean(by_x[x]) for x in xs])
        std = np.array([np.std(by_x[x]) for x in xs])
        ax.plot(xs, mean, marker="o", label=strategy)
        ax.fill_between(xs, mean - std, mean + std, alpha=0.2)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return _save(fig, ax, Path(out_dir) / f"compare_{slug(metric)}_vs_{slug(key)}.png")
