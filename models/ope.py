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
