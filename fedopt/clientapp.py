"""The Flower ClientApp adapter: messages in, a local optimizer's job out, replies back.

One :class:`ClientRuntime` lives in each worker process (each Ray actor). It
builds the task, the resident model and the local optimizer once, keeps every
virtual client's tensors on the device, loads each round's global weights in
place, and turns the optimizer's :class:`~fedopt.client.ClientUpdate` into a
reply. Nothing is kept in module globals: the runtime hangs off the ClientApp
object that Flower ships to each worker.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable, Mapping
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedopt import codec, partial, transport
from fedopt.client import ClientJob, ClientState
from fedopt.config import Scenario, parse_scenario
from fedopt.privacy.secrecy import NoiseKey, wants_secret
from fedopt.ray_backend import shared_task
from fedopt.records import RUN_KEY
from fedopt.registry import CLIENT_MODS, CLIENTS
from fedopt.resumable import client_state_mod
from fedopt.task import Task, as_tensors, build_task, derive_seed
from fedopt.training import evaluate

__all__ = ["RESERVED_METRICS", "ClientRuntime", "make_client_app", "pick_device"]

#: Metric keys every reply carries; they are bookkeeping, not learning metrics.
RESERVED_METRICS = ("num-examples", "cid", "work", "cuda")


def pick_device(scenario: Scenario) -> torch.device:
    """The GPU Ray gave this worker when the scenario asks for one, else the CPU."""
    if scenario.run.num_gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def message_run_key(msg: Message) -> str:
    """The run a message belongs to (a sweep drives several runs through one federation)."""
    config = msg.content.get("config")
    return str(config[RUN_KEY]) if config is not None and RUN_KEY in config else ""


def message_cid(msg: Message, context: Context) -> int:
    """The virtual client a message is for: ``config["cid"]``, else the node's partition."""
    config = msg.content.get("config")
    if config is not None and "cid" in config:
        return int(config["cid"])
    return int(context.node_config["partition-id"])


#: Clients of a generated population whose tensors a worker keeps (least recently used go).
POPULATION_CACHE = 4096


class ClientRuntime:
    """Everything a worker builds once for a scenario and reuses for every client it serves.

    Parameters
    ----------
    scenario : Scenario
        The run's scenario.
    run_key : str
        The run's name in a federation shared by several runs.
    noise_key : NoiseKey, optional
        The run's secret key (``noise = "secret"``): every client-side random
        draw (batches, Poisson masks, DP noise) is then seeded from it instead
        of ``run.seed``. A secret scenario without one (``flwr run``, where each
        node is its own party) draws a key of its own from OS entropy.
    """

    def __init__(
        self, scenario: Scenario, *, run_key: str = "", noise_key: NoiseKey | None = None
    ) -> None:
        self.scenario = scenario
        self.run_key = run_key
        self.given_key = noise_key
        if noise_key is None and wants_secret(scenario):
            noise_key = NoiseKey.new()
        self._noise_key = noise_key
        codec.install()
        torch.set_num_threads(scenario.run.num_cpus)
        # The driver's task when it shared one with this worker (fedopt.startup), else built here
        self.task: Task = shared_task(scenario) or build_task(scenario)
        self.device = pick_device(scenario)
        self.model = self.task.new_model().to(self.device)
        entry = CLIENTS.get(scenario.client.name, key="client.name")
        self.algorithm = entry.obj(scenario.client.params, scenario=scenario)
        self.mods = [m for e in CLIENT_MODS for m in e.obj(scenario)]
        # A scenario section may order each round's local data (``[curriculum]``): its
        # params' ``data_order(scenario=...)`` hook prepares ``job.order`` and sees the update.
        orders = [
            p.data_order(scenario=scenario)
            for p in scenario.extras.values()
            if callable(getattr(p, "data_order", None))
        ]
        self.data_order = orders[0] if orders else None
        self._tensors: dict[int, tuple[torch.Tensor, ...]] = {}

    def tensors(self, cid: int) -> tuple[torch.Tensor, ...]:
        """(x_train, y_train, x_test, y_test) of client ``cid`` on the device, cached.

        A generated population's clients are made again when needed (the same
        data, from ``(seed, cid)``): only the :data:`POPULATION_CACHE` most
        recently used stay, so a worker's memory does not grow with the rounds.
        """
        hit = self._tensors.pop(cid, None)
        if hit is None:
            train, test = self.task.client_data(cid)
            hit = (*as_tensors(train, self.device), *as_tensors(test, self.device))
        self._tensors[cid] = hit  # most recently used last
        if self.task.data.clients is not None and len(self._tensors) > POPULATION_CACHE:
            del self._tensors[next(iter(self._tensors))]
        return hit

    def _seed(self, server_round: int, cid: int, purpose: int) -> int:
        if self._noise_key is not None:
            return self._noise_key.seed(purpose, server_round, cid)
        return derive_seed(self.scenario.run.seed, server_round, cid, purpose)

    def _job(self, msg: Message, context: Context) -> ClientJob:
        """The global weights loaded into the resident model, and the client's job."""
        cid = message_cid(msg, context)
        config = dict(msg.content.get("config", {}))
        server_round = int(config.get("server-round", 0))
        seed = self._seed(server_round, cid, 1)
        # torch.manual_seed costs ~0.1 ms per call; seeding the generators directly does not
        torch.random.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed_all(seed)
        self.algorithm.load_global(self.model, msg.content)
        x, y, _, _ = self.tensors(cid)
        return ClientJob(
            cid=cid,
            server_round=server_round,
            model=self.model,
            x=x,
            y=y,
            config=config,
            content=msg.content,
            state=ClientState(context.state, cid, run_key=self.run_key),
            generator=torch.Generator().manual_seed(seed),
            device=self.device,
        )

    def _reply(self, msg: Message, job: ClientJob, update: Any, extra: Any = None) -> Message:
        metrics = MetricRecord(
            {
                "num-examples": int(update.num_examples),
                "cid": job.cid,
                "work": float(update.work),
                "cuda": int(self.device.type == "cuda"),
                **{k: float(v) for k, v in update.metrics.items()},
                **(extra or {}),
            }
        )
        return Message(RecordDict({"arrays": update.arrays, "metrics": metrics}), reply_to=msg)

    def train(self, msg: Message, context: Context) -> Message:
        """Handle a ``train`` message."""
        job = self._job(msg, context)
        order_metrics = self.data_order.prepare(job) if self.data_order is not None else {}
        update = self.algorithm.fit(job)
        if self.data_order is not None:
            self.data_order.finish(job, update)
        return self._reply(msg, job, update, order_metrics)

    def train_many(self, msgs: list[Message], context: Context) -> list[Message] | None:
        """Train a pack's clients at once when ``run.vectorize`` asks and the method can.

        None means "one by one instead": the run did not ask, mods or a data
        order must see each client, or the local optimizer has no batched path.
        A client's batched result does not depend on which clients share its
        batch (each client's slice of a ``vmap`` is the same kernel on the same
        shapes: the batch width is the scenario's batch size), so batched runs
        too give the same rows whatever the number of nodes or workers.
        """
        fit_many = getattr(self.algorithm, "fit_many", None)
        if not self.scenario.run.vectorize or self.mods or self.data_order or fit_many is None:
            return None
        jobs, starts = [], []
        for msg in msgs:
            jobs.append(self._job(msg, context))
            starts.append({k: p.detach().clone() for k, p in self.model.named_parameters()})
        updates = fit_many(jobs, starts)
        if updates is None:
            return None
        return [self._reply(m, j, u) for m, j, u in zip(msgs, jobs, updates, strict=True)]

    def query(self, msg: Message, context: Context) -> Message:
        """Handle a ``query`` message: this client's mean example score under the received model.

        The score is the data order's (``[curriculum]`` scoring), else the mean
        training loss; servers use it to order clients.
        """
        cid = message_cid(msg, context)
        self.algorithm.load_global(self.model, msg.content)
        x, y, _, _ = self.tensors(cid)
        if self.data_order is not None:
            state = ClientState(context.state, cid, run_key=self.run_key)
            score = self.data_order.mean_score(self.model, x, y, state)
        else:
            res = evaluate(self.model, x, y)
            score = res.loss if res.num_examples else 0.0
        metrics = MetricRecord({"num-examples": len(x), "cid": cid, "score": float(score)})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    def evaluate(self, msg: Message, context: Context) -> Message:
        """Handle an ``evaluate`` message: the global model on this client's test split."""
        cid = message_cid(msg, context)
        self.algorithm.load_global(self.model, msg.content)
        _, _, xt, yt = self.tensors(cid)
        res = evaluate(self.model, xt, yt)
        metrics = MetricRecord(
            {
                "num-examples": res.num_examples,
                "cid": cid,
                "eval_loss": res.loss if res.num_examples else 0.0,
                "eval_accuracy": res.accuracy if res.num_examples else 0.0,
            }
        )
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)


Resolver = Callable[[Context], Mapping[str, Mapping[str, Any]]]


class _ResidentRuntime:
    """The worker process's slot for its runtime: built on first use, rebuilt when the run changes.

    Runs of a sweep come one after another, so one runtime is kept at a time.
    """

    def __init__(self) -> None:
        self.runtime: ClientRuntime | None = None
        self.key: str | None = None
        self.raw: Any = None

    def get(
        self,
        runs: Mapping[str, Mapping[str, Any]],
        msg: Message,
        noise_keys: Mapping[str, NoiseKey] | None = None,
    ) -> ClientRuntime:
        run_key = message_run_key(msg)
        if run_key not in runs:
            if len(runs) != 1 or run_key:
                raise KeyError(f"message for unknown run {run_key!r}; known: {sorted(runs)}")
            run_key = next(iter(runs))
        raw = runs[run_key]
        noise_key = noise_keys.get(run_key) if noise_keys else None
        rt = self.runtime
        if rt is not None and run_key == rt.run_key and raw == self.raw:
            if rt.given_key == noise_key:  # the same run as the last message's (dict ==, no JSON)
                return rt
        self.raw = copy.deepcopy(raw)
        key = run_key + json.dumps(raw, sort_keys=True, default=str)
        if rt is None or key != self.key or rt.given_key != noise_key:
            self.runtime = None
            self.runtime = ClientRuntime(parse_scenario(raw), run_key=run_key, noise_key=noise_key)
            self.key = key
        return self.runtime


_RESIDENT = _ResidentRuntime()


class _RuntimeHolder:
    """Resolves a message's run and returns the worker's resident runtime for it."""

    def __init__(self, resolve: Resolver, noise_keys: Mapping[str, NoiseKey] | None) -> None:
        self._resolve = resolve
        self._noise_keys = noise_keys

    def get(self, msg: Message, context: Context) -> ClientRuntime:
        return _RESIDENT.get(self._resolve(context), msg, self._noise_keys)


def _call_mod(mod: Any, call_next: Any, msg: Message, context: Context) -> Message:
    return mod(msg, context, call_next)


def _scenario_mods(holder: _RuntimeHolder) -> Any:
    """One Flower mod that applies the mods the message's own scenario asks for.

    Mods are per ClientApp in Flower, but the runs of a sweep share one app and
    may differ (one with client-side DP clipping, one without), so the run's
    mods are looked up in :data:`~fedopt.registry.CLIENT_MODS` per message.
    """

    def mod(msg: Message, context: Context, call_next: Any) -> Message:
        runtime = holder.get(msg, context)
        chain = call_next
        for inner in reversed(runtime.mods):
            chain = functools.partial(_call_mod, inner, chain)
        return chain(msg, context)

    return mod


def with_content(msg: Message, content: RecordDict) -> Message:
    """A copy of ``msg`` (same metadata) carrying ``content`` instead."""
    out = copy.copy(msg)
    out.__dict__["_content"] = content
    return out


def _pack_mod(holder: _RuntimeHolder) -> Any:
    """The mod that serves a packed message: its clients in turn, or all at once.

    A client that raises is reported in the reply's error record, as Flower's
    engine would report it for an unpacked message; the others' replies are
    unaffected. All the clients share the node's ``Context`` (their state is
    kept apart by :class:`~fedopt.client.ClientState`). A pack of ``train``
    messages trains batched when the run asks for it (``run.vectorize``) and
    its local optimizer can (:meth:`ClientRuntime.train_many`). When the
    server asks (a linear strategy, :mod:`fedopt.partial`), a pack answers
    with its models summed per sum group, unless a reply carries more than a
    model and metrics.
    """

    def mod(msg: Message, context: Context, call_next: Any) -> Message:
        if not transport.is_pack(msg.content):
            return call_next(msg, context)
        subs = {
            cid: with_content(msg, content)
            for cid, content in transport.unpack_content(msg.content).items()
        }
        replies: dict[int, RecordDict] = {}
        errors = ConfigRecord()
        batched = None
        if msg.metadata.message_type == MessageType.TRAIN and subs:
            first = next(iter(subs.values()))
            batched = holder.get(first, context).train_many(list(subs.values()), context)
        if batched is not None:
            replies = {cid: r.content for cid, r in zip(subs, batched, strict=True)}
        for cid, sub in subs.items() if batched is None else ():
            try:
                reply = call_next(sub, context)
            except Exception as ex:  # one client's failure must not take its pack down
                errors[f"c{cid}"] = f"{type(ex)}:<'{ex}'>"
                continue
            if reply.has_error():
                errors[f"c{cid}"] = reply.error.reason
            else:
                replies[cid] = reply.content
        groups = transport.pack_reduce(msg.content)
        if groups and all(partial.is_plain(r) for r in replies.values()):
            out = partial.reduced_content(replies, groups=groups)
        else:
            out = transport.pack_content(replies)
        out[transport.PACK_ERRORS_KEY] = errors
        return Message(out, reply_to=msg)

    return mod


def make_client_app(
    resolve: Resolver, *, noise_keys: Mapping[str, NoiseKey] | None = None
) -> ClientApp:
    """A ClientApp whose runs come from ``resolve(context)``: ``{run key: scenario mapping}``.

    A message names its run under ``config["run-key"]``; with a single run the
    key may be omitted (as under ``flwr run``). A packed message (several
    clients of one node, :mod:`fedopt.transport`) is served client by client.
    ``noise_keys`` are the secret keys of the runs that have one
    (:mod:`fedopt.privacy.secrecy`): they reach the workers inside this app
    object, never in a message.
    """
    holder = _RuntimeHolder(resolve, noise_keys)
    app = ClientApp(mods=[_pack_mod(holder), client_state_mod, _scenario_mods(holder)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return holder.get(msg, context).train(msg, context)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return holder.get(msg, context).evaluate(msg, context)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return holder.get(msg, context).query(msg, context)

    return app
