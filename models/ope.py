"""Off-policy evaluation: IPS, self-normalised IPS and doubly robust estimates.

Each logged decision ``i`` has a reward ``r_i``, the probability ``p_i`` with which
the logging policy took the logged action, and the probability ``pi_i`` with which
the target policy would have taken it. The doubly robust estimator also needs a
reward model: ``qhat_i`` for the logged action and ``qhat_target_i``, the model's
expected reward under the target policy, ``sum_a pi(a | x_i) qhat(x_i, a)``.

Confidence intervals are normal approximations from the per-decision terms (the
delta method for SNIPS), at ``level`` (95% by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


@dataclass(frozen=True)
class Estimate:
    value: float
    se: float
    low: float
    high: float

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high


def _interval(value: float, se: float, level: float) -> Estimate:
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return Estimate(float(value), float(se), float(value - z * se), float(value + z * se))


def _mean_estimate(terms: np.ndarray, level: float) -> Estimate:
    n = len(terms)
    se = terms.std(ddof=1) / np.sqrt(n) if n > 1 else float("inf")
    return _interval(terms.mean(), se, level)


def ips(rewards, logging_p, target_p, level: float = 0.95) -> Estimate:
    """Inverse propensity scoring: mean of ``(pi / p) * r``. Unbiased, high variance."""
    r, p, pi = (np.asarray(a, dtype=np.float64) for a in (rewards, logging_p, target_p))
    return _mean_estimate(pi / p * r, level)


def snips(rewards, logging_p, target_p, level: float = 0.95) -> Estimate:
    """Self-normalised IPS: ``sum(w r) / sum(w)``; slightly biased, much steadier."""
    r, p, pi = (np.asarray(a, dtype=np.float64) for a in (rewards, logging_p, target_p))
    w = pi / p
    if w.sum() == 0:
        return Estimate(float("nan"), float("inf"), float("-inf"), float("inf"))
    value = (w * r).sum() / w.sum()
    # delta method: the estimator's influence terms are w (r - value) / mean(w)
    influence = w * (r - value) / w.mean()
    se = influence.std(ddof=1) / np.sqrt(len(r)) if len(r) > 1 else float("inf")
    return _interval(value, se, level)


def doubly_robust(rewards, logging_p, target_p, qhat_logged, qhat_target,
                  level: float = 0.95) -> Estimate:
    """Doubly robust: the reward model's value of the target policy plus an IPS
    correction of the model's error on the logged actions."""
    r, p, pi, q, qt = (np.asarray(a, dtype=np.float64)
                       for a in (rewards, logging_p, target_p, qhat_logged, qhat_target))
    return _mean_estimate(qt + pi / p * (r - q), level)


def on_policy(rewards, level: float = 0.95) -> Estimate:
    """Plain mean of rewards logged by the policy itself, with its interval."""
    return _mean_estimate(np.asarray(rewards, dtype=np.float64), level)


SLATE_POLICIES = ("logging", "greedy", "uniform")


def evaluate_slate_log(records: list[dict], level: float = 0.95
                       ) -> dict[str, dict[str, Estimate]]:
    """CTR estimates from the service's log of closed impressions.

    Every slot is one decision with its logged probability, conditional on the items
    already placed, and its reward (a click is a reward > 0). The policies are:

    - ``logging``: the policy that served (weights 1: its on-policy CTR);
    - ``greedy``: the same model without exploration, which places the logged item
      exactly when the slot was not explored (probability 1, else 0);
    - ``uniform``: a uniformly random pick among the remaining candidates.

    The doubly robust reward model is the mean reward of each slot position. The
    estimates are per-slot CTRs given the logged prefixes, averaged over slots.
    """
    props, clicks, explored, remaining, slots = [], [], [], [], []
    for rec in records:
        n = int(rec.get("n_candidates") or len(rec["item_ids"]))
        for j, (p, r) in enumerate(zip(rec["propensities"], rec["rewards"], strict=True)):
            props.append(p)
            clicks.append(1.0 if r > 0 else 0.0)
            explored.append(bool(rec["explored"][j]) if rec.get("explored") else False)
            remaining.append(max(n - j, 1))
            slots.append(j)
    p, r = np.asarray(props), np.asarray(clicks)
    slot = np.asarray(slots)
    targets = {"logging": p, "greedy": (~np.asarray(explored, dtype=bool)).astype(float),
               "uniform": 1.0 / np.asarray(remaining, dtype=np.float64)}
    qhat_by_slot = np.array([r[slot == j].mean() for j in range(slot.max() + 1)]) \
        if len(slot) else np.zeros(0)
    qhat = qhat_by_slot[slot] if len(slot) else np.zeros(0)
    out: dict[str, dict[str, Estimate]] = {}
    for name, pi in targets.items():
        out[name] = {"IPS": ips(r, p, pi, level), "SNIPS": snips(r, p, pi, level),
                     "DR": doubly_robust(r, p, pi, qhat, qhat, level)}
    return out
