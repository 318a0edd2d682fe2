"""The ``privacy`` block of summary.json: what each level released and how to recompute its ε."""

from __future__ import annotations

from typing import Any

from fedopt.privacy.plan import planned_participations
from fedopt.privacy.secrecy import noise_statement

__all__ = ["PARTICIPATION_SECRECY", "sample_level_summary", "user_level_summary"]

#: What must stay secret for client sampling to amplify user-level privacy.
PARTICIPATION_SECRECY = (
    "the amplification by client sampling holds only while which clients took part in a "
    "round stays secret; metrics.jsonl reveals it (each row's clients list and per_client "
    "entries) and holds un-noised client statistics (averaged training metrics, per-client "
    "bytes, durations and examples), none of it accounted: under user-level DP metrics.jsonl "
    "is a server-private log; the released outputs are the global models"
)
#: What DP-SGD replies send beside the noised update when ``release_train_metrics`` is on.
_TRAIN_METRICS = ["train_loss", "train_accuracy", "examples_sampled"]


def sample_level_summary(report: Any) -> dict[str, Any]:
    """DP-SGD on the clients: the plan, each client's (σ, q, steps) history, the noise's secrecy."""
    p = report.client_params
    if p.non_private:
        return {"non_private": True, "max_grad_norm": p.max_grad_norm, "epsilon": "infinite"}
    return {
        "mechanism": "Opacus DP-SGD: Poisson sampling, per-sample clipping, Gaussian noise",
        "adjacency": "add/remove one example of a client's training set",
        "public": "each client's n_k, q, sigma and step counts (they travel with every reply)",
        "accountant": p.accountant,
        "delta": p.delta,
        "allow_large_delta": p.allow_large_delta,
        "max_grad_norm": p.max_grad_norm,
        "noise_multiplier": p.noise_multiplier,
        "target_epsilon": p.target_epsilon,
        **noise_statement(p.noise),
        "unaccounted_releases": list(_TRAIN_METRICS) if p.release_train_metrics else [],
        "plan": {
            "participations": planned_participations(
                p,
                report.scenario.run.rounds,
                clients_per_round=report.scenario.clients_per_round,
                num_clients=report.scenario.partition.num_clients,
            ),
            "local_steps": p.steps
            if p.steps is not None
            else f"{p.epochs} x ceil(n_k / {p.batch_size})",
            "sample_rate": f"1 / ceil(n_k / {p.batch_size})",
            "client_sampling_amplification": "none claimed",
        },
        "clients": {str(c): h for c, h in sorted(report.clients.items())},
        "budget_spent_from_round": {str(c): r for c, r in sorted(report.exhausted.items())},
        "recompute": "each client's (sigma, q, steps) entries are Poisson-subsampled "
        "Gaussian steps; e.g. opacus.accountants.RDPAccountant with history = "
        "[(sigma, q, steps), ...] and get_epsilon(delta) gives its epsilon",
    }


def user_level_summary(report: Any) -> dict[str, Any]:
    """``[user_dp]``: sampling, adjacency, sensitivity, every round's event, noise secrecy."""
    p, dp, scenario = report.user_dp, report.dp, report.scenario
    scheme = p.scheme
    m, n = scenario.clients_per_round, scenario.partition.num_clients
    z_update = float(dp.noise_multiplier)
    out: dict[str, Any] = {
        "mechanism": "clipped client updates, Gaussian noise on their aggregate, one "
        "subsampled Gaussian per released round",
        "clipping": p.clipping,
        "initial_clipping_norm": p.clipping_norm,
        "final_clipping_norm": float(dp.clipping_norm),
        "sampling": p.sampling,
        "selection": scheme.selection,
        "adjacency": scheme.adjacency,
        "population": n,
        "clients_per_round": m,
        "sample_rate": p.sample_rate(scenario),
        "noise_multiplier": p.multiplier(scenario),
        "sensitivity": {
            "formula": scheme.sensitivity,
            "value": scheme.sensitivity_value(clip=p.clipping_norm, clients_per_round=m),
            "at": f"C = {p.clipping_norm:g} (the initial norm; each row's user_clipping_norm "
            "is its round's C), all m clients replying",
        },
        "noise_std": {"formula": scheme.noise_std, "update_noise_multiplier": z_update},
        "round_noise_multiplier": "the Gaussian's std over that sensitivity: each event's "
        "noise_multiplier (and each row's user_noise_multiplier)",
        "availability": "unavailable clients cannot be drawn, so a client's inclusion "
        "probability is at most the one accounted; that stays an upper bound only while "
        "availability does not depend on the clients' data",
        "dropped_clients": "a client that fails after being drawn contributes nothing; the "
        "accounting assumes failures do not depend on the clients' data",
        "participation_secrecy": PARTICIPATION_SECRECY,
        **noise_statement(p.noise),
    }
    if p.adaptive:
        out["adaptive_clipping"] = {
            "clipped_count_stddev": float(dp.clipped_count_stddev),
            "count_sensitivity": scheme.count_sensitivity,
            "released": "the noised count of unclipped updates (centred, over q·N, under "
            "poisson; over the m' replies under fixed), which moves C as "
            "C·exp(−clip_norm_lr·(b̄ − target_clipped_quantile))",
            "joint": "the update's and the count's Gaussians compose to one of multiplier "
            "(σ_update⁻² + σ_count⁻²)^(-1/2) per round, the event's noise_multiplier",
        }
    if report.unreleased:
        out["rounds_drawn_empty_and_not_released"] = list(report.unreleased)
    return {**out, **report.user.summary()}
