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


@dataclass(frozen=True)
class SlateLog:
    """A log of slates as padded ``(slates, slots)`` arrays; ``valid`` marks real slots."""

    propensity: np.ndarray  # the logged probability of each placement, given the slots before
    reward: np.ndarray      # 1 for a click (a reward > 0), else 0
    explored: np.ndarray    # the slot was filled by the random branch
    remaining: np.ndarray   # candidates left when the slot was filled
    valid: np.ndarray

    @classmethod
    def of(cls, records: list[dict]) -> SlateLog:
        length = max((len(r["item_ids"]) for r in records), default=0)
        shape = (len(records), length)
        log = cls(np.ones(shape), np.zeros(shape), np.zeros(shape, bool), np.ones(shape),
                  np.zeros(shape, bool))
        for t, rec in enumerate(records):
            n = int(rec.get("n_candidates") or len(rec["item_ids"]))
            k = len(rec["item_ids"])
            log.propensity[t, :k] = rec["propensities"]
            log.reward[t, :k] = [1.0 if r > 0 else 0.0 for r in rec["rewards"]]
            if rec.get("explored"):
                log.explored[t, :k] = rec["explored"]
            log.remaining[t, :k] = np.maximum(n - np.arange(k), 1)
            log.valid[t, :k] = True
        return log

    def target(self, policy: str) -> np.ndarray:
        """Each slot's probability under ``policy`` of the logged item, given the logged
        slots before it."""
        if policy == "logging":
            return self.propensity
        if policy == "greedy":  # the same model without exploration
            return (~self.explored).astype(np.float64)
        if policy == "uniform":
            return 1.0 / self.remaining
        raise ValueError(f"unknown policy {policy!r}")


def rips_weights(log: SlateLog, target: np.ndarray) -> np.ndarray:
    """Reward-interaction IPS weights: at slot j, the product over slots ``1..j`` of
    ``target / logged``. A slot's click is evidence for a policy only if that policy
    would also have built the slate's prefix: once the greedy policy would have placed
    another item (an explored slot), every later slot's weight is 0."""
    ratio = np.where(log.valid, target / log.propensity, 1.0)
    return np.cumprod(ratio, axis=1) * log.valid


def evaluate_slate_log(records: list[dict], level: float = 0.95
                       ) -> dict[str, dict[str, Estimate]]:
    """Per-slot CTR estimates of slate policies from the service's log of closed
    impressions (McInerney et al. 2020, "Counterfactual Evaluation of Slate
    Recommendations with Sequential Reward Interactions"; Kiyohara et al. 2022 for the
    cascade doubly robust estimator). The policies are:

    - ``logging``: the policy that served (weights 1: its on-policy CTR);
    - ``greedy``: the same model without exploration, which places the logged item
      exactly when the slot was not explored;
    - ``uniform``: a uniformly random pick among the remaining candidates.

    IPS weighs each slot's click by its RIPS weight (``rips_weights``); SNIPS
    normalises those weights per slot position; the doubly robust estimate adds a
    per-position reward model (the mean CTR of the position) with the cascade
    correction. Every estimate is clicks per slate over the mean slate length, so it
    reads as a per-slot CTR; intervals come from the per-slate terms.
    """
    log = SlateLog.of(records)
    if not len(records):
        nan = Estimate(float("nan"), float("inf"), float("-inf"), float("inf"))
        return {name: {"IPS": nan, "SNIPS": nan, "DR": nan} for name in SLATE_POLICIES}
    mean_len = log.valid.sum(1).mean()
    present = log.valid.sum(0)
    qhat = (log.reward * log.valid).sum(0) / np.maximum(present, 1)  # CTR per position
    out: dict[str, dict[str, Estimate]] = {}
    for name in SLATE_POLICIES:
        w = rips_weights(log, log.target(name))
        before = np.concatenate([np.ones((len(w), 1)), w[:, :-1]], 1) * log.valid
        ips_terms = (w * log.reward).sum(1) / mean_len
        dr_terms = (w * (log.reward - qhat) + before * qhat).sum(1) / mean_len
        # self-normalised per position: each position's weighted CTR over its weights
        mean_w = w.sum(0) / np.maximum(present, 1)
        per_pos = (w * log.reward).sum(0) / np.maximum(w.sum(0), 1e-300)
        snips_value = float((per_pos * present).sum() / present.sum())
        influence = np.where(mean_w > 0, w * (log.reward - per_pos) /
                             np.maximum(mean_w, 1e-300), 0.0) * log.valid
        snips_se = influence.sum(1).std(ddof=1) / mean_len / np.sqrt(len(w)) \
            if len(w) > 1 else float("inf")
        out[name] = {"IPS": _mean_estimate(ips_terms, level),
                     "SNIPS": _interval(snips_value, snips_se, level),
                     "DR": _mean_estimate(dr_terms, level)}
    return out
