"""The ``fedopt`` command line: run, resume, compare, pretrain, partitions, report, list, ....

Bad input (a ConfigError) prints one line naming the key, the value and what
is allowed, and exits with status 2, without a traceback. A run that fails
after starting exits with status 1 and keeps what it wrote. A run stopped by
Ctrl-C or SIGTERM writes a checkpoint, prints how to continue it
(``fedopt resume RUN_DIR``) and exits with status 130. ``fedopt resume`` on a
directory without a usable checkpoint is a failed run (status 1: there is
nothing to continue); a scenario that changed since the checkpoint is bad
input (status 2) unless ``--force``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedopt.errors import ConfigError, FedoptError, RunInterrupted

__all__ = ["main"]


def _progress(console: Console, total: int) -> tuple[Progress, Any]:
    """A progress bar and its row callback; the bar appears with the first row.

    Starting it lazily keeps a run refused before its first round (bad input
    found once the task is built) to the one line of its error.
    """
    bar = Progress(
        TextColumn("[bold]round"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("train loss {task.fields[loss]}  test acc {task.fields[acc]}"),
        TextColumn("sim {task.fields[sim]}  {task.fields[mb]} MB"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    task = bar.add_task("run", total=total, loss="-", acc="-", sim="-", mb="0.0")

    def on_row(row: dict[str, Any]) -> None:
        bar.start()  # a no-op once started
        acc = row.get("central_accuracy", row.get("fed_accuracy"))
        loss = row.get("train_loss")
        bar.update(
            task,
            completed=row["round"],
            loss=f"{loss:.4f}" if loss is not None else "-",
            acc=f"{acc:.4f}" if acc is not None else "-",
            sim=f"{row.get('sim_time', 0.0):.1f}s",
            mb=f"{row.get('cum_bytes', 0) / 1e6:.2f}",
        )

    return bar, on_row


class _Display:
    """What start-up is doing (a status line) until the first row, then the round bar.

    Nothing is drawn before the first status, so a run refused while it is
    validated stays the one line of its error.
    """

    def __init__(self, console: Console, total: int) -> None:
        self.bar, self._row = _progress(console, total)
        self._status = console.status("starting", spinner="dots")
        self._spinning = False

    def status(self, text: str) -> None:
        if self.bar.live.is_started:
            return
        self._status.update(f"[bold]{escape(text)}")
        if not self._spinning:
            self._status.start()
            self._spinning = True

    def row(self, row: dict[str, Any]) -> None:
        if row.get("round") == 0 and not self.bar.live.is_started:  # the untrained model
            self.status("round 1: waiting for the client workers (each imports torch)")
            return
        self._stop_status()
        self._row(row)

    def _stop_status(self) -> None:
        if self._spinning:
            self._status.stop()
            self._spinning = False

    def stop(self) -> None:
        self._stop_status()
        if self.bar.live.is_started:
            self.bar.stop()


def _advance(bar: Progress, task: Any, step: int, _total: int) -> None:
    bar.update(task, completed=step)


def _warm(scenarios: Sequence[Any], console: Console) -> None:
    """Make sure the warm-start checkpoint of every scenario with ``[pretrain]`` is cached."""
    from fedopt.pretrain import warm_start, warm_start_key

    seen: set[str] = set()
    for scenario in scenarios:
        key = warm_start_key(scenario) if "pretrain" in scenario.extras else None
        if key is None or key in seen:
            continue
        seen.add(key)
        steps = scenario.extras["pretrain"].steps
        bar = Progress(
            TextColumn("[bold]pretrain"),
            MofNCompleteColumn(),
            BarColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        with bar:
            task = bar.add_task("pretrain", total=steps)
            ws = warm_start(scenario, on_step=functools.partial(_advance, bar, task))
        m = ws.meta["metrics"]
        console.print(
            f"warm start {'(cached) ' if ws.cached else ''}{ws.path}: test perplexity "
            f"{m['test_perplexity_before']:.2f} -> {m['test_perplexity_after']:.2f} after "
            f"{steps} steps on {m['public_sequences']} public sequences ({m['seconds']:.0f}s)"
        )


def cmd_pretrain(args: argparse.Namespace, console: Console) -> int:
    from fedopt.config import load_scenario

    scenario = load_scenario(args.scenario, args.set)
    if "pretrain" not in scenario.extras:
        raise ConfigError(
            "pretrain", "(missing)", "a [pretrain] section in the scenario (defaults: [pretrain])"
        )
    _warm([scenario], console)
    return 0


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from fedopt.config import load_scenario
    from fedopt.simulation import run

    scenario = load_scenario(args.scenario, args.set)
    _warm([scenario], console)
    display = _Display(console, scenario.run.rounds)
    try:
        result = run(
            scenario,
            out=args.out,
            ray_address=args.ray_address,
            on_row=display.row,
            on_status=display.status,
        )
    finally:
        display.stop()
    _print_result(result, console)
    return 0


def _print_result(result: Any, console: Console) -> None:
    s = result.summary
    console.print(
        f"final accuracy {s.get('final_accuracy', float('nan')):.4f} "
        f"(best {s.get('best_accuracy', float('nan')):.4f} at round {s.get('best_round')}), "
        f"simulated time {s.get('sim_time', 0.0):.1f}s, {s.get('bytes_total', 0) / 1e6:.2f} MB, "
        f"clients on {s.get('client_device')}"
    )
    console.print(f"run directory: {result.run_dir}")


def cmd_resume(args: argparse.Namespace, console: Console) -> int:
    from fedopt.resume import continue_run, plan_resume

    plan = plan_resume(
        args.run_dir,
        sets=args.set,
        scenario_path=args.scenario,
        force=args.force,
        ray_address=args.ray_address,
    )
    if plan.forced:
        changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in plan.changed.items())
        console.print(
            f"resuming with a changed scenario (--force, recorded): {escape(changes)}",
            soft_wrap=True,
        )
    if plan.finished:
        console.print(
            f"{plan.run_dir} already finished its {plan.scenario.run.rounds} rounds; nothing to "
            "resume (extend it with --set run.rounds=N --force)",
            soft_wrap=True,
        )
        _print_result(continue_run(plan), console)
        return 0
    console.print(f"resuming {plan.run_dir} after round {plan.checkpoint.round}", soft_wrap=True)
    _warm([plan.scenario], console)
    bar, on_row = _progress(console, plan.scenario.run.rounds)
    if plan.rows:
        on_row(plan.rows[-1])  # the bar starts where the checkpoint left off
    try:
        result = continue_run(plan, on_row=on_row)
    finally:
        if bar.live.is_started:
            bar.stop()
    _print_result(result, console)
    return 0


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    from fedopt.compare import load_sweep, run_sweep

    sweep = load_sweep(args.sweep, args.set, quick=args.quick)
    cells = sweep.cells()
    total = len(cells)
    _warm([c[3] for c in cells], console)
    console.print(
        f"{sweep.name}: {total} runs ({len(sweep.strategies)} strategies x "
        f"{len(sweep.settings)} settings x {len(sweep.seeds)} seeds)"
    )

    def on_cell(i: int, cell: Any) -> None:
        acc = cell.summary.get("final_accuracy")
        console.print(
            f"[{i}/{total}] {cell.setting} / {cell.strategy} / seed {cell.seed}: "
            f"final accuracy {acc:.4f}"
            if acc is not None
            else "no accuracy"
        )

    out_dir, paths = run_sweep(
        sweep,
        out=Path(args.out),
        ray_address=args.ray_address,
        on_cell=on_cell,
        resume=Path(args.resume) if args.resume else None,
    )
    table = Path(paths["markdown"]).read_text().split("\n\n![")[0]
    console.print(table, markup=False, highlight=False)
    console.print(f"comparison directory: {out_dir}")
    return 0


def cmd_reproduce(args: argparse.Namespace, console: Console) -> int:
    from fedopt.reproduce import PAPERS_DIR, find_sweeps, reproduce

    folder = Path(args.papers) if args.papers else PAPERS_DIR
    paths = find_sweeps(folder, args.only)
    report = Path(args.report)
    if args.rebuild:
        from fedopt.reproduce import rebuild

        held = rebuild(folder, report, quick=args.quick)
        console.print(f"report: {report} ({held} stored sections, nothing run)")
        return 0
    console.print(f"{len(paths)} sweeps ({'quick' if args.quick else 'full'} tier) -> {report}")

    def on_sweep(result: Any) -> None:
        for v in result.verdicts:
            console.print(f"{result.sweep.name}: {v.claim.claim}: {v.word}; {v.detail}")

    reproduce(paths, quick=args.quick, out=Path(args.out), report=report, on_sweep=on_sweep)
    console.print(f"report: {report}")
    return 0


#: Most clients `fedopt partitions` lists (one table row and heatmap row each).
PARTITIONS_MAX = 5000


def cmd_partitions(args: argparse.Namespace, console: Console) -> int:
    from fedopt.config import load_scenario
    from fedopt.data import plot_label_heatmap
    from fedopt.task import build_task

    scenario = load_scenario(args.scenario, args.set)
    task = build_task(scenario)
    if task.num_clients > PARTITIONS_MAX:
        raise ConfigError(
            "partition.num_clients",
            task.num_clients,
            f"at most {PARTITIONS_MAX} clients for `fedopt partitions` (one row each)",
        )
    hist = task.label_histogram()
    table = Table(
        title=f"{scenario.name}: {scenario.partition.name} partition of {scenario.data.name}"
    )
    table.add_column("client", justify="right")
    table.add_column("train", justify="right")
    table.add_column("test", justify="right")
    for c in range(hist.shape[1]):
        table.add_column(str(c), justify="right")
    for cid in range(task.num_clients):
        train, test = task.client_data(cid)
        table.add_row(str(cid), str(len(train)), str(len(test)), *map(str, hist[cid]))
    console.print(table)
    out = Path(args.png or f"{scenario.name}_partitions.png")
    plot_label_heatmap(hist, out, title=f"{scenario.name}: labels per client")
    console.print(f"heatmap: {out.resolve()}")
    return 0


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    from fedopt.registry import load_builtins
    from fedopt.report import regenerate

    load_builtins()
    summary = regenerate(Path(args.run_dir))
    console.print(f"regenerated {args.run_dir}: final accuracy {summary.get('final_accuracy')}")
    return 0


def cmd_eval(args: argparse.Namespace, console: Console) -> int:
    from fedopt.model_out import load_model
    from fedopt.task import as_tensors
    from fedopt.training import evaluate

    model, task, payload = load_model(args.run_dir, args.which, args.set)
    x, y = as_tensors(task.data.test, next(model.parameters()).device)
    res = evaluate(model, x, y)
    data = task.scenario.data
    console.print(
        f"{args.which} model (round {payload['round']}) on the test set of {data.name} "
        f"({len(y)} examples): accuracy {res.accuracy:.4f}, loss {res.loss:.4f}",
        soft_wrap=True,
    )
    return 0


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    from fedopt import registry

    registry.load_builtins()
    kinds = {
        "datasets": registry.DATASETS,
        "partitioners": registry.PARTITIONERS,
        "models": registry.MODELS,
        "speed models": registry.SPEEDS,
        "optimizers": registry.OPTIMIZERS,
        "clients": registry.CLIENTS,
        "strategies": registry.STRATEGIES,
    }
    for title, reg in kinds.items():
        table = Table(title=title)
        table.add_column("name")
        table.add_column("parameters")
        table.add_column("what")
        for entry in reg:
            fields = ", ".join(getattr(entry.params, "__dataclass_fields__", {}))
            table.add_row(entry.name, fields or "-", entry.doc)
        console.print(table)
    return 0


def cmd_privacy(args: argparse.Namespace, console: Console) -> int:
    from fedopt.privacy.cli import privacy_command

    return privacy_command(args, console)


def cmd_audit(args: argparse.Namespace, console: Console) -> int:
    from fedopt.audit.cli import audit_command

    return audit_command(args, console, progress=_progress)


def cmd_expert(args: argparse.Namespace, console: Console) -> int:
    from fedopt.config import load_scenario
    from fedopt.curriculum import train_expert
    from fedopt.errors import ConfigError

    if args.epochs < 1:
        raise ConfigError("--epochs", args.epochs, "an integer >= 1")
    scenario = load_scenario(args.scenario, args.set)
    path = train_expert(scenario, args.out, epochs=args.epochs)
    console.print(f"expert model: {path.resolve()}  (use [curriculum] expert_path)")
    return 0


def cmd_reference(args: argparse.Namespace, console: Console) -> int:
    from fedopt.docs import scenario_reference

    print(scenario_reference(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fedopt`` command."""
    from importlib import metadata

    p = argparse.ArgumentParser(prog="fedopt", description="Federated learning simulator.")
    p.add_argument("--version", action="version", version=f"fedopt {metadata.version('fedopt')}")
    sub = p.add_subparsers(dest="command", required=True)
    sets = {
        "action": "append",
        "default": [],
        "metavar": "KEY=VALUE",
        "help": "override a scenario value, e.g. --set run.rounds=5",
    }

    r = sub.add_parser("run", help="run a scenario on Flower's Ray simulation engine")
    r.add_argument("scenario")
    r.add_argument("--set", **sets)
    r.add_argument("--out", default="runs", help="parent of the run directory (default: runs)")
    r.add_argument("--ray-address", default=None, help="join an existing Ray cluster")
    r.set_defaults(fn=cmd_run)

    rs = sub.add_parser("resume", help="continue a stopped run from its newest checkpoint")
    rs.add_argument("run_dir")
    rs.add_argument("--set", **sets)
    rs.add_argument("--scenario", default=None, help="instead of RUN_DIR/scenario.toml")
    rs.add_argument(
        "--force", action="store_true", help="resume even if the scenario changed (recorded)"
    )
    rs.add_argument("--ray-address", default=None, help="join an existing Ray cluster")
    rs.set_defaults(fn=cmd_resume)

    c = sub.add_parser("compare", help="run a sweep: strategies x settings x seeds")
    c.add_argument("sweep")
    c.add_argument("--set", **sets)
    c.add_argument("--out", default="runs")
    c.add_argument("--ray-address", default=None)
    c.add_argument(
        "--quick", action="store_true", help="the sweep's quick tier ([quick]: fewer seeds, rounds)"
    )
    c.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue this sweep's directory DIR: finished cells are kept, the rest run",
    )
    c.set_defaults(fn=cmd_compare)

    rp = sub.add_parser(
        "reproduce",
        help="run the paper sweeps (scenarios/papers), judge their claims, write a report",
    )
    rp.add_argument("--quick", action="store_true", help="each sweep's quick tier (smoke test)")
    rp.add_argument("--only", nargs="*", default=[], help="sweep names (file stems) to run")
    rp.add_argument("--papers", default=None, help="folder of sweep files (scenarios/papers)")
    rp.add_argument("--report", default="docs/reproductions.md", help="the report to write")
    rp.add_argument(
        "--rebuild", action="store_true", help="rewrite the report from its stored sections only"
    )
    rp.add_argument("--out", default="runs")
    rp.set_defaults(fn=cmd_reproduce)

    ev = sub.add_parser(
        "eval",
        help="score a finished run's model on its test set (or, with --set data.*, another)",
    )
    ev.add_argument("run_dir")
    ev.add_argument("--which", default="final", choices=["final", "best"])
    ev.add_argument("--set", **sets)
    ev.set_defaults(fn=cmd_eval)

    pa = sub.add_parser("partitions", help="print per-client sizes and labels; write a heatmap")
    pa.add_argument("scenario")
    pa.add_argument("--set", **sets)
    pa.add_argument("--png", default=None, help="heatmap path (default: <name>_partitions.png)")
    pa.set_defaults(fn=cmd_partitions)

    rp = sub.add_parser("report", help="regenerate a run directory's tables and plots")
    rp.add_argument("run_dir")
    rp.set_defaults(fn=cmd_report)

    ls = sub.add_parser("list", help="list registered datasets, models, clients, strategies")
    ls.set_defaults(fn=cmd_list)

    pv = sub.add_parser("privacy", help="ε of a DP-SGD plan by every accountant, or σ for a target")
    pv.add_argument("--sigma", type=float, default=None, help="noise multiplier σ")
    pv.add_argument("--target-epsilon", type=float, default=None, help="calibrate σ for this ε")
    pv.add_argument("--q", type=float, required=True, help="Poisson sampling rate of a step")
    pv.add_argument("--steps", type=int, required=True, help="number of noisy steps")
    pv.add_argument("--delta", type=float, default=1e-5, help="δ (default 1e-5)")
    pv.add_argument("--accountant", action="append", default=[], help="only these (repeatable)")
    pv.set_defaults(fn=cmd_privacy)

    au = sub.add_parser(
        "audit", help="one-run empirical privacy audit of DP-SGD clients (ε lower bounds)"
    )
    au.add_argument("scenario", help="a scenario file, or a sweep file with --cell")
    au.add_argument("--cell", default=None, help="the sweep cell: its label (or SETTING/LABEL)")
    au.add_argument("--canaries", type=int, default=None, help="canaries per client (default 1000)")
    au.add_argument(
        "--clients", type=int, nargs="+", default=None, help="audited client ids (default: largest)"
    )
    au.add_argument("--seed", type=int, default=None, help="seed of the canaries and inclusion")
    au.add_argument("--set", **sets)
    au.add_argument("--out", default="runs", help="parent of the run directory (default: runs)")
    au.set_defaults(fn=cmd_audit)

    ex = sub.add_parser("expert", help="train a scenario's model centrally (curriculum oracle)")
    ex.add_argument("scenario")
    ex.add_argument("--set", **sets)
    ex.add_argument("--out", required=True, help="where to save the state_dict")
    ex.add_argument("--epochs", type=int, default=10)
    ex.set_defaults(fn=cmd_expert)

    pt = sub.add_parser("pretrain", help="train (or find cached) a scenario's central warm start")
    pt.add_argument("scenario")
    pt.add_argument("--set", **sets)
    pt.set_defaults(fn=cmd_pretrain)

    ref = sub.add_parser("reference", help="print the scenario reference (every key) as Markdown")
    ref.set_defaults(fn=cmd_reference)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedopt`` console script."""
    args = build_parser().parse_args(argv)
    console = Console()
    err = Console(stderr=True)
    try:
        return int(args.fn(args, console))
    except RunInterrupted as e:
        err.print(f"[yellow]{escape(str(e))}[/yellow]", highlight=False, soft_wrap=True)
        return 130
    except ConfigError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    except FedoptError as e:
        err.print(f"[red]run failed:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        for note in getattr(e, "__notes__", []):
            err.print(escape(note), highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
