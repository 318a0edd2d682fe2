"""The server-side auditor: scores every canary from the audited clients' released updates.

The server is exactly the party that sees what a client releases, so the
auditor is a strategy wrapper (``WRAPPERS["zz_audit"]``, the outermost one:
wrappers apply in name order, and it must see the replies before any DP
wrapper clips them, and the new global model after everything). Per audited
client and per round it took part in, it keeps two scores per canary, both
computed from the released arrays and the global models only (never from
reply metrics, never from the inclusion vector):

- white-box: the alignment ⟨w_received − w_sent, clip_C(∇ℓ_i(w_received))⟩ of
  the update with canary i's clipped gradient at the model the client
  received, summed over the rounds it trained;
- black-box: the canary's loss drop ℓ_i(w_initial) − ℓ_i(w_final) between
  the initial and the final global model.

The scores go to ``summary.json`` (``audit``); :mod:`fedopt.audit.run` turns
them into lower bounds once the inclusion vector is revealed.

How well canaries separate is limited by how many directions per-sample
gradients can take, not by the parameter count: a linear layer's gradient is
(error) ⊗ (input), so on 64-feature digits with 10 classes they span about
640 directions whatever the width, while a round of the audited client adds
up some 700 clipped gradients (its examples and its ~500 included canaries).
Each canary's alignment then carries interference of the size of its own
signal, and even without noise the bound stays far below the cap there
(measured: ε ≥ 0.8 white-box, 1.1 black-box with m = 1000 against a cap of
5.2). Wide inputs (e.g. 1024 features) separate m = 300 canaries completely.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from fedopt.audit.canaries import AuditParams, audited_clients, make_canaries
from fedopt.registry import WRAPPERS
from fedopt.server import find_hook
from fedopt.training import load_weights_, per_example_loss
from fedopt.transport import virtual_node
from fedopt.wrapper import WrappedStrategy

__all__ = ["CanaryScorer", "canary_losses", "clipped_gradients", "wrap_audit"]

_CHUNK = 256  # canaries per vectorised per-sample gradient


def clipped_gradients(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, max_grad_norm: float
) -> torch.Tensor:
    """Per-sample gradients of the loss, clipped to norm C as Opacus clips them, flattened.

    Returns a ``(len(x), d)`` tensor over the model's trainable parameters in
    ``named_parameters`` order; the factor is ``min(1, C / (‖g‖ + 1e-6))``.
    """
    from torch.func import functional_call, grad, vmap

    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    buffers = {k: b.detach() for k, b in model.named_buffers()}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return per_example_loss(logits, yi.unsqueeze(0)).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    out = []
    for start in range(0, len(x), _CHUNK):
        g = per_sample(params, x[start : start + _CHUNK], y[start : start + _CHUNK])
        flat = torch.cat([g[k].reshape(len(g[k]), -1) for k in params], dim=1)
        norms = flat.norm(dim=1, keepdim=True)
        out.append(flat * (max_grad_norm / (norms + 1e-6)).clamp(max=1.0))
    return torch.cat(out)


@torch.no_grad()
def canary_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Each canary's loss under ``model`` (float64)."""
    was = model.training
    model.eval()
    try:
        return np.concatenate(
            [
                per_example_loss(model(x[s : s + _CHUNK]), y[s : s + _CHUNK]).double().numpy()
                for s in range(0, len(x), _CHUNK)
            ]
        )
    finally:
        model.train(was)


def _flat_params(model: nn.Module, arrays: ArrayRecord) -> torch.Tensor:
    """The trainable entries of ``arrays`` in ``named_parameters`` order, flattened (float64)."""
    state = arrays.to_torch_state_dict()
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    return torch.cat([state[k].reshape(-1).double() for k in names])


class CanaryScorer(WrappedStrategy):
    """One-run audit's scorer (Steinke, Nasr and Jagielski, NeurIPS 2023), on the server.

    Parameters
    ----------
    strategy : Strategy
        The run's strategy, with every other wrapper already applied.
    scenario : Scenario
        The run's scenario; its ``[audit]`` section names the audited clients.
    """

    def __init__(self, strategy: Strategy, *, scenario: Any) -> None:
        super().__init__(strategy)
        self.scenario = scenario
        self.params: AuditParams = scenario.extras["audit"]
        self.max_grad_norm = float(scenario.client.params.max_grad_norm)
        self.model: nn.Module | None = None
        self.canaries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.white: dict[int, np.ndarray] = {}
        self.rounds: dict[int, list[int]] = {}
        self.received: dict[int, ArrayRecord] = {}
        self.initial: dict[int, np.ndarray] = {}
        self.final: ArrayRecord | None = None

    # -- set-up ---------------------------------------------------------------------------
    def bind_model(self, model: nn.Module) -> None:
        """Keep a private copy of the run's model; pass the model on to inner strategies."""
        inner = find_hook(self.strategy, "bind_model")
        if inner is not None:
            inner(model)
        self.model = copy.deepcopy(model).cpu()

    def _setup(self) -> None:
        if self.canaries:
            return
        from fedopt.task import build_task

        task = build_task(self.scenario)
        if self.model is None:
            self.model = task.new_model()
        for cid in audited_clients(self.params, task):
            c = make_canaries(self.params, task, cid)
            self.canaries[cid] = (torch.from_numpy(c.x), torch.from_numpy(c.y))
            self.white[cid] = np.zeros(len(c), dtype=np.float64)
            self.rounds[cid] = []

    def _load(self, arrays: ArrayRecord) -> nn.Module:
        assert self.model is not None
        load_weights_(self.model, arrays.to_torch_state_dict())
        return self.model

    # -- the strategy steps ---------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._setup()
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        by_node = {m.metadata.dst_node_id: m for m in messages}
        for cid, (x, y) in self.canaries.items():
            if cid not in self.initial:
                self.initial[cid] = canary_losses(self._load(arrays), x, y)
            sent = by_node.get(virtual_node(cid))
            if sent is not None:
                self.received[cid] = sent.content.get("arrays", arrays)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:
            m = reply.content["metrics"]
            cid = int(m["cid"])
            if cid in self.received and not m.get("dp_exhausted"):
                self._score(server_round, cid, reply.content["arrays"])
        self.received = {}
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            self.final = arrays
        return arrays, metrics

    def _score(self, server_round: int, cid: int, sent: ArrayRecord) -> None:
        model = self._load(self.received[cid])
        x, y = self.canaries[cid]
        update = _flat_params(model, self.received[cid]) - _flat_params(model, sent)
        grads = clipped_gradients(model, x, y, max_grad_norm=self.max_grad_norm)
        self.white[cid] += (grads.double() @ update).numpy()
        self.rounds[cid].append(server_round)

    # -- results --------------------------------------------------------------------------
    def summary_extra(self) -> dict[str, Any]:
        """The canary scores of every audited client (no inclusion vector: it is not known here)."""
        out = super().summary_extra()
        self._setup()
        clients = {}
        for cid, (x, y) in self.canaries.items():
            black = np.zeros(len(y))
            if self.final is not None and cid in self.initial:
                black = self.initial[cid] - canary_losses(self._load(self.final), x, y)
            clients[str(cid)] = {
                "m": len(y),
                "rounds": self.rounds[cid],
                "white_box": self.white[cid].tolist(),
                "black_box": black.tolist(),
            }
        p = self.params
        out["audit"] = {
            "method": "one-run audit (Steinke, Nasr and Jagielski, NeurIPS 2023)",
            "design": p.design,
            "seed": p.seed,
            "max_grad_norm": self.max_grad_norm,
            "clients": clients,
        }
        return out


def wrap_audit(strategy: Strategy, *, scenario: Any) -> Strategy:
    """Wrap the run's strategy in the canary scorer when the scenario has an ``[audit]`` section."""
    if "audit" not in scenario.extras:
        return strategy
    return CanaryScorer(strategy, scenario=scenario)


# Named to sort after every other wrapper ("curriculum", "privacy"): the outermost.
WRAPPERS.register("zz_audit", wrap_audit)
