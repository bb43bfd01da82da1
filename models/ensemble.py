"""A fused ensemble of agents that score the same candidates.

Agents, each scoring every candidate of a request:

- ``q``: the Q-network's Q(s, a);
- ``popularity``: the candidate's smoothed CTR lift (its popularity feature), which
  needs no learning and is right from the first impressions;
- ``linear``: LinUCB, a linear contextual bandit on a few features of (state, item):
  the per-candidate features and the item embedding's similarity to the context and
  to the user's positive and negative pools, plus an upper-confidence bonus. Ridge
  regression in 12 dimensions converges after a few hundred events, long before a
  deep network does.

Fusion: each agent's scores are standardised over the request's candidates and
summed with weights ``w``; the slate is then chosen from the fused scores by the
same epsilon-greedy, so the logged propensities stay exact for the fused policy.
``w`` is Hedge-style: ``w_k ∝ exp(eta * (rate_k / max_j rate_j - 1))``, where
``rate_k`` is the reward rate of the shown items that agent k ranked in its own
top-k (exponentially forgotten, so the weights follow a changing catalog). An
agent whose picks earn less loses weight; none is ever switched off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from models.state import FEATURE_GROUPS, StateLayout

AGENTS = ("q", "popularity", "linear")
N_LINEAR = 12  # per-candidate features (8), 3 similarities, a bias
POPULARITY_COLUMN = FEATURE_GROUPS["popularity"].start  # the smoothed CTR lift
PREFIX = "ensemble."


def linear_features(layout: StateLayout, states: np.ndarray, items: np.ndarray,
                    features: np.ndarray) -> np.ndarray:
    """``(n, N_LINEAR)`` LinUCB inputs of ``n`` (state, item) pairs: row i pairs
    ``states[i]`` (or the one state, if one is given) with ``items[i]``."""
    states = np.atleast_2d(states)
    if len(states) == 1:  # serving: one state for all candidates, one (n, d) @ (d, 3)
        d = layout.dim
        sims = items @ states[0, : 3 * d].reshape(3, d).T  # context, positive, negative
    else:
        sims = np.stack([(items * layout.context(states)).sum(-1),
                         (items * layout.positive_pool(states)).sum(-1),
                         (items * layout.negative_pool(states)).sum(-1)], -1)
    return np.concatenate([features, sims, np.ones((len(items), 1), np.float32)],
                          1).astype(np.float32)


def standardise(scores: np.ndarray) -> np.ndarray:
    """Zero mean and unit spread along the last axis (each row of a 2-D array on its
    own); a constant row, which ranks nothing, becomes zeros."""
    mean = scores.mean(-1, keepdims=True)
    sd = scores.std(-1, keepdims=True)
    return np.where(sd > 1e-9, (scores - mean) / np.where(sd > 1e-9, sd, 1.0), 0.0)


@dataclass
class EnsembleParams:
    """What serving needs: LinUCB's ``A^-1`` and ``theta``, and the fusion weights."""

    a_inv: np.ndarray
    theta: np.ndarray
    weights: np.ndarray  # (len(AGENTS),), summing to 1
    alpha: float = 0.5   # width of the upper-confidence bonus

    def agent_scores(self, layout: StateLayout, state: np.ndarray, items: np.ndarray,
                     features: np.ndarray, q_scores: np.ndarray) -> np.ndarray:
        """``(len(AGENTS), N)`` scores of every agent for one request's candidates."""
        x = linear_features(layout, state, items, features)
        width = np.sqrt(np.maximum(((x @ self.a_inv) * x).sum(1), 0.0))
        linear = x @ self.theta + self.alpha * width
        return np.stack([q_scores, features[:, POPULARITY_COLUMN], linear])

    def fuse(self, agent_scores: np.ndarray) -> np.ndarray:
        """The fused score of each candidate: weighted sum of standardised scores."""
        return self.weights @ standardise(agent_scores)  # every agent in one pass


def top_k_masks(agent_scores: np.ndarray, chosen: np.ndarray, k: int) -> list[int]:
    """Per chosen candidate, a bitmask of the agents that rank it in their own top-k:
    the credit its reward gives each agent."""
    k = min(k, agent_scores.shape[1])
    top = np.argpartition(-agent_scores, k - 1, axis=1)[:, :k]
    inside = np.zeros(agent_scores.shape, dtype=bool)
    np.put_along_axis(inside, top, True, axis=1)
    bits = np.left_shift(1, np.arange(len(agent_scores), dtype=np.int64))
    return (bits @ inside[:, chosen]).tolist()


@dataclass
class EnsembleLearner:
    """Learns LinUCB online from every transition and the fusion weights from the
    rewards of each agent's picks."""

    ridge: float = 1.0
    eta: float = 10.0
    horizon: float = 5_000.0  # transitions over which old credit fades (1/e)
    prior_rate: float = 0.03
    prior_count: float = 20.0
    a: np.ndarray = field(init=False)  # ridge * I plus the x x^T seen
    b: np.ndarray = field(default_factory=lambda: np.zeros(N_LINEAR))
    reward_sum: np.ndarray = field(default_factory=lambda: np.zeros(len(AGENTS)))
    count: np.ndarray = field(default_factory=lambda: np.zeros(len(AGENTS)))

    def __post_init__(self) -> None:
        self.a = self.ridge * np.eye(N_LINEAR)

    def update(self, x: np.ndarray, rewards: np.ndarray, masks: np.ndarray) -> None:
        """``x``: ``(n, N_LINEAR)``; ``rewards``: ``(n,)``; ``masks``: ``(n,)`` agent bits
        (0 when unknown: the transition then trains LinUCB only)."""
        self.a += x.T @ x
        self.b += x.T @ rewards
        bits = (masks[:, None] >> np.arange(len(AGENTS))) & 1
        credited = bits.any(1)
        if credited.any():
            fade = np.exp(-credited.sum() / self.horizon)
            self.reward_sum = fade * self.reward_sum + (bits * rewards[:, None]).sum(0)
            self.count = fade * self.count + bits.sum(0)

    def rates(self) -> np.ndarray:
        return (self.reward_sum + self.prior_rate * self.prior_count) / (
            self.count + self.prior_count)

    def params(self) -> EnsembleParams:
        a_inv = np.linalg.inv(self.a)
        rates = self.rates()
        logits = self.eta * (rates / max(rates.max(), 1e-9) - 1.0)
        w = np.exp(logits - logits.max())
        return EnsembleParams(a_inv, a_inv @ self.b, w / w.sum())

    # -- saved with the weights, so a learner that takes over continues -------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        p = self.params()
        arrays = {"a": self.a, "b": self.b, "reward_sum": self.reward_sum,
                  "count": self.count, "a_inv": p.a_inv, "theta": p.theta,
                  "weights": p.weights}
        return {PREFIX + k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64))
                for k, v in arrays.items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Continue from saved state; False (nothing changed) when there is none."""
        try:
            self.a, self.b, self.reward_sum, self.count = (
                tensors[PREFIX + k].numpy().copy() for k in ("a", "b", "reward_sum", "count"))
        except KeyError:
            return False
        return True


def params_from_tensors(tensors: dict[str, torch.Tensor]) -> EnsembleParams | None:
    """The serving side of saved ensemble state, or None when the weights have none."""
    try:
        return EnsembleParams(tensors[PREFIX + "a_inv"].numpy(),
                              tensors[PREFIX + "theta"].numpy(),
                              tensors[PREFIX + "weights"].numpy())
    except KeyError:
        return None


def default_params() -> EnsembleParams:
    """Before the learner published anything: LinUCB untrained, equal weights."""
    return EnsembleLearner().params()
