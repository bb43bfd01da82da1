"""Off-policy estimators against closed-form cases."""

import numpy as np
import pytest

from models.ope import doubly_robust, ips, on_policy, snips


def test_on_policy_evaluation_is_the_mean():
    r = np.array([0, 1, 1, 0, 1], dtype=float)
    p = np.full(5, 0.5)
    for est in (ips(r, p, p), snips(r, p, p)):
        assert est.value == pytest.approx(0.6)
    assert on_policy(r).value == pytest.approx(0.6)


def test_ips_closed_form():
    # two actions logged uniformly; the target always takes action 1
    actions = np.array([0, 1, 1, 0, 1, 0])
    r = np.array([0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    p = np.full(6, 0.5)
    pi = (actions == 1).astype(float)
    assert ips(r, p, pi).value == pytest.approx((2 * 1 + 2 * 1) / 6)  # (1/0.5)*(1+0+1)/6
    assert snips(r, p, pi).value == pytest.approx(2 / 3)             # mean reward of action 1


def test_doubly_robust_with_a_perfect_model_has_no_variance():
    rng = np.random.default_rng(0)
    n = 1000
    true_mean = np.array([0.2, 0.7])
    actions = rng.integers(0, 2, n)
    r = true_mean[actions]  # deterministic rewards: the model below is exact
    p = np.full(n, 0.5)
    pi = (actions == 1).astype(float)
    est = doubly_robust(r, p, pi, true_mean[actions], np.full(n, 0.7))
    assert est.value == pytest.approx(0.7) and est.se == pytest.approx(0.0, abs=1e-12)


def test_intervals_cover_the_truth_at_about_the_nominal_rate():
    rng = np.random.default_rng(1)
    true_ctr = np.array([0.05, 0.15, 0.30])
    covered = {"ips": 0, "snips": 0, "dr": 0}
    trials = 300
    for _ in range(trials):
        n = 2000
        p_log = np.array([0.5, 0.3, 0.2])
        a = rng.choice(3, n, p=p_log)
        r = (rng.random(n) < true_ctr[a]).astype(float)
        pi_target = np.array([0.1, 0.2, 0.7])
        pi, p = pi_target[a], p_log[a]
        truth = float(pi_target @ true_ctr)
        qhat = np.array([0.06, 0.14, 0.25])  # a slightly wrong model
        covered["ips"] += ips(r, p, pi).contains(truth)
        covered["snips"] += snips(r, p, pi).contains(truth)
        covered["dr"] += doubly_robust(r, p, pi, qhat[a], np.full(n, pi_target @ qhat)
                                       ).contains(truth)
    for name, c in covered.items():
        assert 0.90 <= c / trials <= 0.99, (name, c / trials)


def test_slate_log_estimates_in_closed_form():
    from models.ope import evaluate_slate_log

    # two candidates, one slot, epsilon 0.5: greedy item "a" placed with p=0.75,
    # the other with p=0.25 (explored). "a" is clicked, "b" never.
    records = ([{"n_candidates": 2, "item_ids": ["a"], "propensities": [0.75],
                 "explored": [False], "rewards": [1.0]}] * 3 +
               [{"n_candidates": 2, "item_ids": ["b"], "propensities": [0.25],
                 "explored": [True], "rewards": [0.0]}])
    est = evaluate_slate_log(records)
    assert est["logging"]["IPS"].value == pytest.approx(0.75)        # on-policy CTR
    assert est["greedy"]["IPS"].value == pytest.approx(3 / 0.75 / 4)   # = 1.0: always "a"
    assert est["greedy"]["SNIPS"].value == pytest.approx(1.0)
    uniform = est["uniform"]["IPS"].value
    assert uniform == pytest.approx((3 * 0.5 / 0.75) / 4)             # = 0.5


def test_greedy_gets_no_credit_after_an_explored_slot():
    """The greedy policy would have built another slate once a slot was explored: the
    clicks of the later slots are not its evidence (slot-by-slot weights of 1 would
    credit it with them)."""
    from models.ope import evaluate_slate_log

    # slot 0 explored (p=0.1) and not clicked, slot 1 greedy (p=0.9) and clicked
    records = [{"n_candidates": 10, "item_ids": ["x", "a"], "propensities": [0.1, 0.9],
                "explored": [True, False], "rewards": [0.0, 1.0]},
               {"n_candidates": 10, "item_ids": ["a", "b"], "propensities": [0.9, 0.9],
                "explored": [False, False], "rewards": [0.0, 0.0]}]
    est = evaluate_slate_log(records)
    assert est["greedy"]["IPS"].value == pytest.approx(0.0)
    assert est["logging"]["IPS"].value == pytest.approx(0.25)  # 1 click in 4 slots
    # the second slot's weight under "uniform" is the product over both slots
    uniform = (1 / 10) / 0.1 * (1 / 9) / 0.9
    assert est["uniform"]["IPS"].value == pytest.approx(uniform / 4)  # 2 slates x 2 slots


def test_slate_estimates_agree_with_open_bandit_pipeline():
    """The reward-interaction IPS of ``evaluate_slate_log`` against obp's
    SlateRewardInteractionIPS on the same random log (obp's value is clicks per slate,
    ours per slot)."""
    from obp.ope import SlateRewardInteractionIPS

    from models.ope import SlateLog, evaluate_slate_log

    rng = np.random.default_rng(3)
    records = []
    for _ in range(400):
        explored = rng.random(5) < 0.2
        records.append({"n_candidates": 50, "item_ids": [f"i{j}" for j in range(5)],
                        "propensities": np.where(explored, 0.2 / 50, 0.8).tolist(),
                        "explored": explored.tolist(),
                        "rewards": (rng.random(5) < 0.3).astype(float).tolist()})
    ours = evaluate_slate_log(records)
    log = SlateLog.of(records)
    slate_id = np.repeat(np.arange(len(records)), 5)
    position = np.tile(np.arange(5), len(records))
    for name in ("greedy", "uniform"):
        theirs = SlateRewardInteractionIPS(len_list=5).estimate_policy_value(
            slate_id=slate_id, reward=log.reward.ravel(), position=position,
            pscore_cascade=np.cumprod(log.propensity, 1).ravel(),
            evaluation_policy_pscore_cascade=np.cumprod(log.target(name), 1).ravel())
        assert ours[name]["IPS"].value == pytest.approx(theirs / 5, rel=1e-9)
