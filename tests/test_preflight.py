"""Privacy checks before a run starts: δ against the smallest client, reachable budgets, caps."""

from __future__ import annotations

import warnings

import pytest
from opacus.accountants import RDPAccountant

from fedopt.config import parse_scenario
from fedopt.errors import ConfigError
from fedopt.privacy import PrivacyTargetError, calibrate_noise
from fedopt.privacy.plan import local_plan, planned_participations
from fedopt.privacy.preflight import PRIVACY_CHECKS, check_sample_level, check_tasks, train_sizes
from fedopt.registry import load_builtins
from fedopt.task import build_task

load_builtins()


def raw(client=None, **sections):
    out = {
        "name": "preflight",
        "data": {"name": "blobs", "num_examples": 400, "num_features": 8},
        "partition": {"name": "dirichlet", "alpha": 0.5, "num_clients": 4, "test_fraction": 0.2},
        "model": {"name": "mlp", "hidden": [8]},
        "client": {"name": "dpsgd", "batch_size": 16, "lr": 0.1, **(client or {})},
        "run": {"rounds": 5, "seed": 3},
    }
    out.update(sections)
    return out


def task_of(client=None, **sections):
    return build_task(parse_scenario(raw(client, **sections)))


@pytest.fixture(scope="module")
def sizes():
    """n_k of the test tasks (they share data, partition and seed)."""
    return train_sizes(task_of())


def opacus_eps(sigma, q, steps, delta=1e-5):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acc = RDPAccountant()
        acc.history = [(sigma, q, steps)]
        return acc.get_epsilon(delta=delta)


def test_train_sizes_are_the_clients_training_sets(sizes):
    task = task_of()
    assert sizes == [len(task.client_data(cid)[0]) for cid in range(task.num_clients)]
    assert min(sizes) < max(sizes)  # Dirichlet: unequal clients, so n_min matters


def test_a_delta_of_one_over_n_min_is_refused_naming_the_smallest_client(sizes):
    n_min = min(sizes)
    cid = sizes.index(n_min)
    delta = 1.0 / n_min
    with pytest.raises(ConfigError) as err:
        check_tasks([task_of({"delta": delta})])
    assert err.value.key == "client.delta"
    assert str(err.value) == (
        f"client.delta = {delta!r} is not allowed: a δ < 1/n_min = {1 / n_min:.3g} "
        f"(the smallest client, {cid}, has n_min = {n_min} training examples); "
        "or set client.allow_large_delta = true"
    )
    assert "\n" not in str(err.value)


def test_a_delta_just_below_one_over_n_min_passes_and_is_recorded(sizes):
    n_min = min(sizes)
    [facts] = check_tasks([task_of({"delta": 0.99 / n_min})])
    keys = ("n_min", "delta", "delta_times_n_min", "allow_large_delta")
    assert {k: facts["sample_level"][k] for k in keys} == {
        "n_min": n_min,
        "delta": 0.99 / n_min,
        "delta_times_n_min": pytest.approx(0.99),
        "allow_large_delta": False,
    }


def test_allow_large_delta_lets_it_through_and_says_so(sizes):
    [facts] = check_tasks([task_of({"delta": 0.5, "allow_large_delta": True})])
    assert facts["sample_level"]["allow_large_delta"] is True
    assert facts["sample_level"]["delta_times_n_min"] == 0.5 * min(sizes) >= 1


def test_an_unreachable_target_names_the_client_before_any_engine(sizes):
    # RDP over Opacus's orders cannot go below ε ≈ 0.1029 at δ = 1e-5 whatever σ is.
    with pytest.raises(PrivacyTargetError) as err:
        check_tasks([task_of({"target_epsilon": 0.05})])
    text = str(err.value)
    assert err.value.key == "client.target_epsilon" and "\n" not in text
    assert text.startswith("client.target_epsilon = 0.05 is not allowed: a target reachable ")
    assert text.endswith("(rdp): no σ up to 655360 reaches it (ε >= 0.1029 there)")
    n = int(text.split("n_k = ")[1].split(",")[0])
    cid = int(text.split("for client ")[1].split(" ")[0])
    assert sizes[cid] == n
    # exactly what the client's own calibration would have said in its first round
    params = parse_scenario(raw({"target_epsilon": 0.05})).client.params
    q, tau = local_plan(params, n)
    with pytest.raises(PrivacyTargetError, match="0.1029"):
        calibrate_noise(
            target_epsilon=0.05, delta=1e-5, sample_rate=q, steps=5 * tau, key="client.x"
        )


def test_a_reachable_target_passes_for_every_plan_the_clients_calibrate(sizes):
    task = task_of({"target_epsilon": 2.0, "batch_size": 64})
    p = task.scenario.client.params
    rounds = planned_participations(p, task.scenario.run.rounds)
    q_min, tau_min = local_plan(p, min(sizes))
    sigma_min = calibrate_noise(
        target_epsilon=2.0, delta=1e-5, sample_rate=q_min, steps=rounds * tau_min
    )
    assert check_tasks([task]) == [
        {
            "sample_level": {
                "n_min": min(sizes),
                "delta": 1e-5,
                "delta_times_n_min": min(sizes) * 1e-5,
                "allow_large_delta": False,
                "sigma_n_min": sigma_min,
                "noise_to_signal_n_min": sigma_min / (q_min * min(sizes)),
            }
        }
    ]
    plans = {local_plan(p, n) for n in sizes}
    assert (0.5, 2) in plans  # q = 0.5: where Opacus's RDP series is slowest at large σ
    q, tau = max(plans)  # a client's own calibration succeeds (q = 0.5 takes seconds)
    sigma = calibrate_noise(target_epsilon=2.0, delta=1e-5, sample_rate=q, steps=rounds * tau)
    assert 2.0 - 0.01 <= opacus_eps(sigma, q, rounds * tau) <= 2.0


def test_a_cap_that_no_client_fits_in_one_round_is_refused(sizes):
    p = parse_scenario(raw({"noise_multiplier": 0.3, "target_epsilon": 2.0})).client.params
    rounds = {n: local_plan(p, n) for n in sizes}
    eps, n = min((opacus_eps(0.3, *rounds[n]), n) for n in sizes)  # the cheapest round
    q, tau = rounds[n]
    assert eps > 2.0
    with pytest.raises(PrivacyTargetError) as err:  # build_task checks before the model exists
        task_of({"noise_multiplier": 0.3, "target_epsilon": 2.0})
    assert str(err.value) == (
        "client.target_epsilon = 2.0 is not allowed: a target reachable for one round with "
        "client.noise_multiplier = 0.3: no client can ever train, even client "
        f"{sizes.index(n)} (n_k = {n}: q = {q:g}, {tau} steps, δ = 1e-05, rdp) spends "
        f"ε = {eps:.4g} in one round; raise the cap or σ"
    )


def test_a_cap_that_some_client_fits_passes(sizes):
    p = parse_scenario(raw({"noise_multiplier": 1.0})).client.params
    one_round = sorted(opacus_eps(1.0, *local_plan(p, n)) for n in sizes)
    cap = round((one_round[0] + one_round[-1]) / 2, 3)
    assert one_round[0] < cap < one_round[-1]  # some clients fit a round, others never do
    assert check_tasks([task_of({"noise_multiplier": 1.0, "target_epsilon": cap})])[0]


def test_non_private_and_non_dp_clients_are_not_checked():
    tasks = [
        task_of({"non_private": True, "delta": 0.5}),
        build_task(parse_scenario({**raw(), "client": {"name": "sgd", "lr": 0.1}})),
    ]
    assert check_tasks(tasks) == [{}, {}]


def test_the_lora_dp_client_is_checked_too(sizes):
    lora = {
        "name": "lora_dpsgd",
        "batch_size": 16,
        "lr": 0.1,
        "lora_rank": 2,
        "delta": 1.0 / min(sizes),
    }
    scenario = parse_scenario({**raw(), "client": lora, "strategy": {"name": "fedsvd"}})
    with pytest.raises(ConfigError, match="client.allow_large_delta = true"):
        build_task(scenario)
    allowed = build_task(scenario.replace(**{"client.allow_large_delta": True}))
    assert check_sample_level(allowed)["allow_large_delta"] is True


def test_checks_are_pluggable():
    seen = []

    def count(task):
        seen.append(task.num_clients)
        return {"clients": task.num_clients}

    PRIVACY_CHECKS.register("test_count", count)
    try:
        facts = check_tasks([task_of({"non_private": True})])
    finally:
        PRIVACY_CHECKS.unregister("test_count")
    # once inside build_task, once asked here
    assert facts == [{"test_count": {"clients": 4}}] and seen == [4, 4]


def test_a_noise_that_buries_every_step_warns_naming_the_smallest_client(sizes):
    n = min(sizes)
    p = parse_scenario(raw({"noise_multiplier": 1.0})).client.params
    q, _ = local_plan(p, n)
    loud = q * n * 1.5  # sigma above the expected batch: noise_to_signal = 1.5
    with pytest.warns(UserWarning, match=rf"n_k = {n}\) trains at sigma = {loud:.4g}"):
        facts = check_sample_level(task_of({"noise_multiplier": loud}))
    assert facts["noise_to_signal_n_min"] == pytest.approx(1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sigma = 1 on batches of 16: no warning
        facts = check_sample_level(task_of({"noise_multiplier": 1.0}))
    assert facts["sigma_n_min"] == 1.0 and facts["noise_to_signal_n_min"] == 1.0 / (q * n)
