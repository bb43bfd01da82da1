"""A fused ensemble of agents that score the same candidates, weighed by their value.

Agents, each scoring every candidate of a request:

- ``q``: the Q-network's Q(s, a);
- ``popularity``: the candidate's smoothed CTR lift (its popularity feature), which
  needs no learning and is right from the first impressions;
- ``linear``: a Bayesian logistic regression (Laplace approximation, updated online)
  of whether a shown item earns a positive reward, on ``N_LINEAR`` features of
  (state, item): the per-candidate features and the item embedding's similarity to
  the context and to the user's positive and negative pools, plus an
  upper-confidence bonus. A few hundred events fit its dozen weights, long before a
  deep network converges, and the log-odds scale lets an effect multiply an item's
  appeal (resting what was just passed over costs a popular item more than a rare
  one). The slot an item was shown in enters its training as a nuisance covariate,
  so position bias is not mistaken for the item's appeal.

Nothing here assumes the sign of a dynamic: whether an item like the last click, one
just passed over, or one the user liked before is worth more or less is a weight
the rewards set (the logistic model's, and the Q-network's ``w(s)``).

Which policy serves a request is itself a bandit (``ArmChooser``). The arms are
each agent alone and their fusion (the mean of the Q-network's and the logistic
agent's standardised scores); a request draws one arm with the probability that it is
the best under the posterior of the arms' values (Thompson sampling, with a floor so
that no arm is switched off for good), and its slate is chosen from that arm's scores
by the same epsilon-greedy, so the logged propensities stay exact for the policy that
served it. An arm's value is the reward per shown item of the slates it served, each
slate one observation weighted by the inverse of the probability its arm was drawn
with (``EnsembleLearner.update_arms``).

Why not weigh the agents inside one fused ranking by off-policy values of their own
top-k? Items an agent ranks first but the fusion does not show are placed only by
exploration, whose weights must be clipped, so such values mostly credit each agent
with the fused policy's own greedy picks, and the fusion followed the agent that
agreed with it. On the binge world (``bench.worlds``) it ended at 19.8% while the
Q-network alone made 22.1%. Serving whole requests by one arm has a regret guarantee
(that of Thompson sampling on the arms' rewards), so beyond the floor's share the
service cannot end below its best arm by more than that regret.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from models.state import FEATURE_GROUPS, N_ITEM_FEATURES, StateLayout

AGENTS = ("q", "popularity", "linear")
# The policies a request may be served by: each agent alone, and "fused", the mean of
# the Q-network's and the logistic agent's standardised scores (the popularity agent
# is already one of the logistic agent's features).
ARMS = (*AGENTS, "fused")
FUSED_AGENTS = np.array([AGENTS.index("q"), AGENTS.index("linear")])
# Where candidates come from: the Q-network's query, the neighbours of the user's latest
# positives, the most engaging items, the user's own positives. How deep into each
# source's ranked list the policy's picks reach is learned (``SourceDepths``), and so
# how many candidates each gives; each source's value is estimated for the report.
SOURCES = ("query", "related", "engaging", "history")
N_LINEAR = N_ITEM_FEATURES + 3 + 1  # per-candidate features, 3 similarities, a bias
POPULARITY_COLUMN = FEATURE_GROUPS["popularity"].start  # the smoothed CTR lift
PREFIX = "ensemble."
# The logistic model's prior mean: a popular item is likelier to be taken (the lift
# is a log-CTR ratio), and a click is rare. The rest starts at 0 (no assumed sign).
PRIOR_CTR = 0.03


def prior_mean() -> np.ndarray:
    mean = np.zeros(N_LINEAR)
    mean[POPULARITY_COLUMN] = 1.0
    mean[-1] = math.log(PRIOR_CTR / (1.0 - PRIOR_CTR))
    return mean


def linear_features(layout: StateLayout, states: np.ndarray, items: np.ndarray,
                    features: np.ndarray) -> np.ndarray:
    """``(n, N_LINEAR)`` logistic-model inputs of ``n`` (state, item) pairs: row i pairs
    ``states[i]`` (or the one state, if one is given) with ``items[i]``."""
    states = np.atleast_2d(states)
    if len(states) == 1:  # serving: one state for all candidates, one (n, d) @ (d, 3)
        d = layout.dim
        sims = items @ states[0, layout.pools].reshape(3, d).T  # context, positive, negative
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
    """What serving needs: the logistic model's covariance ``a_inv`` and mean
    ``theta``, and how often each arm serves a request."""

    a_inv: np.ndarray
    theta: np.ndarray
    weights: np.ndarray  # (len(ARMS),) the probability each arm serves a request; sum 1
    # (len(SOURCES),) how deep into each source's list the greedy picks reach (the 95th
    # percentile of their ranks); NaN while too few picks came from it to tell
    reach: np.ndarray = field(default_factory=lambda: np.full(len(SOURCES), np.nan))
    alpha: float = 0.1   # width of the upper-confidence bonus, in log-odds
    slot_weight: float = 0.0  # the log-odds per unit of ``slot_covariate``

    def agent_scores(self, layout: StateLayout, state: np.ndarray, items: np.ndarray,
                     features: np.ndarray, q_scores: np.ndarray) -> np.ndarray:
        """``(len(AGENTS), N)`` scores of every agent for one request's candidates."""
        x = linear_features(layout, state, items, features)
        width = np.sqrt(np.maximum(((x @ self.a_inv) * x).sum(1), 0.0))
        linear = x @ self.theta + self.alpha * width
        return np.stack([q_scores, features[:, POPULARITY_COLUMN], linear])

    def expected_ctr(self, layout: StateLayout, state: np.ndarray, items: np.ndarray,
                     features: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """The click probability of each shown item (``items``, ``features``) in its
        ``slots``, by the logistic model's mean without the item's popularity
        features: what the user, the session and the slot alone make of it. An item's
        popularity is its clicks over these (``models.state.popularity_features``)."""
        x = linear_features(layout, state, items, features)
        x[:, FEATURE_GROUPS["popularity"]] = 0.0
        logits = x @ self.theta + self.slot_weight * slot_covariate(slots)[:, 0]
        return 1.0 / (1.0 + np.exp(-np.clip(logits, -30.0, 30.0)))

    def agent_scores_batch(self, pool_products: np.ndarray, features: np.ndarray,
                           q_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``agent_scores`` of a padded batch: ``(B, len(AGENTS), C)``, and the
        logistic model's inputs ``(B, C, N_LINEAR)`` (``expected_ctr_batch`` reuses
        them). ``pool_products`` ``(B, C, 3)``: each candidate's dot products with its
        state's context and pools (``models.batch.ItemProducts.pools``); features
        ``(B, C, F)``."""
        batch, width, _ = features.shape
        x = np.concatenate([features, pool_products, np.ones((batch, width, 1), np.float32)],
                           2).astype(np.float32)
        spread = np.sqrt(np.maximum(((x @ self.a_inv) * x).sum(-1), 0.0))
        linear = x @ self.theta + self.alpha * spread
        return np.stack([q_scores, features[..., POPULARITY_COLUMN], linear], 1), x

    def expected_ctr_batch(self, x: np.ndarray, shown: np.ndarray) -> np.ndarray:
        """``expected_ctr`` of a batch's slates: ``x`` from ``agent_scores_batch``,
        ``shown`` the ``(B, K)`` candidate indices in slot order (padding anywhere
        gives values that are to be ignored)."""
        rows = np.arange(len(x))[:, None]
        xs = x[rows, shown]
        xs[..., FEATURE_GROUPS["popularity"]] = 0.0
        slots = slot_covariate(np.arange(shown.shape[1]))[:, 0]
        logits = xs @ self.theta + self.slot_weight * slots[None, :]
        return 1.0 / (1.0 + np.exp(-np.clip(logits, -30.0, 30.0)))

    def draw_arm(self, rng: np.random.Generator) -> int:
        """The arm (an index into ``ARMS``) that serves an exploring request."""
        return self.arm_from_draw(rng.random())

    def arm_from_draw(self, uniform: float) -> int:
        """The arm drawn with the play probabilities by a uniform draw in [0, 1)."""
        return int(self.arms_from_draws(np.array([uniform]))[0])

    def arms_from_draws(self, uniforms: np.ndarray) -> np.ndarray:
        """``arm_from_draw`` of each of a batch's uniform draws."""
        cdf = np.cumsum(self.weights)
        drawn = np.searchsorted(cdf / cdf[-1], uniforms, side="right")
        return np.minimum(drawn, len(ARMS) - 1)

    def greedy_arm(self) -> int:
        """The arm that serves a request without exploration: the likeliest best one,
        the fusion on a tie (as before any evidence)."""
        preferred = np.zeros(len(ARMS))
        preferred[ARMS.index("fused")] = 1e-9
        return int(np.argmax(self.weights + preferred))

    @staticmethod
    def arm_scores(agent_scores: np.ndarray, arm: int) -> np.ndarray:
        """The ranking scores of ``arm`` for one request's candidates."""
        if ARMS[arm] == "fused":
            return standardise(agent_scores[FUSED_AGENTS]).mean(0)
        return agent_scores[arm]

    @staticmethod
    def arm_scores_batch(agent_scores: np.ndarray, arms: np.ndarray, valid: np.ndarray
                         ) -> np.ndarray:
        """``arm_scores`` of a padded batch: ``(B, C)`` from ``(B, len(AGENTS), C)``
        agent scores, the ``(B,)`` serving arms and the ``(B, C)`` mask of real
        candidates (the fusion standardises over those alone)."""
        rows = np.arange(len(arms))
        fused_in = agent_scores[:, FUSED_AGENTS].astype(np.float64)
        real = valid[:, None, :]
        count = np.maximum(valid.sum(1), 1)[:, None, None]
        mean = np.where(real, fused_in, 0.0).sum(-1, keepdims=True) / count
        sd = np.sqrt(np.where(real, (fused_in - mean) ** 2, 0.0).sum(-1, keepdims=True)
                     / count)
        fused = np.where(sd > 1e-9, (fused_in - mean) / np.where(sd > 1e-9, sd, 1.0),
                         0.0).mean(1)
        single = agent_scores[rows, np.minimum(arms, len(AGENTS) - 1)]
        return np.where((arms == ARMS.index("fused"))[:, None], fused, single)


# a shown item's inverse propensity is clipped here: explored slots count up to this
# much more than greedy ones, which bounds the estimates' variance
MAX_IPS_WEIGHT = 20.0
# the least share of requests each arm serves: its arm propensity never falls below it
ARM_FLOOR = 0.02


@dataclass
class ValueEstimates:
    """Per arm (an ensemble arm, a candidate source), the clipped self-normalised IPS
    estimate of the reward rate of the shown items credited to it, with its standard
    error, exponentially forgotten.

    A shown item with propensity ``p`` and reward ``r`` is evidence for every arm whose
    bit is set on it, with importance weight ``1 / p`` (clipped at ``max_weight``). For
    a source (the bit: it retrieved the item) ``p`` is the slot's logged propensity,
    so items only exploration placed weigh as they would under a policy that places
    them. For an ensemble arm (the bit: it served the slate) ``p`` is the probability
    the arm was drawn with, and a slate's items are one observation (``groups``).
    """

    arms: int
    horizon: float = 5_000.0  # shown items over which old evidence fades (1/e)
    max_weight: float = MAX_IPS_WEIGHT  # where an inverse propensity is clipped
    prior_rate: float = 0.03
    prior_weight: float = 20.0
    sums: np.ndarray = field(init=False)  # per arm: sum w, w r, w^2, w^2 r, w^2 r^2

    def __post_init__(self) -> None:
        self.sums = np.zeros((self.arms, 5))

    def update(self, bits: np.ndarray, rewards: np.ndarray, propensities: np.ndarray,
               groups: np.ndarray | None = None) -> None:
        """``bits``: ``(n,)`` masks of the arms each shown item counts for (0: none);
        ``rewards``, ``propensities``: ``(n,)``. ``groups``: ``(n,)`` labels of the
        items that are one observation (a slate's items, whose rewards go together:
        one arm served them, to one user in one moment), so the standard error counts
        slates, not items; each group's items must count for the same arms."""
        held = (bits[:, None] >> np.arange(self.arms)) & 1
        used = held.any(1)
        if not used.any():
            return
        w = np.minimum(1.0 / np.maximum(propensities[used], 1e-12), self.max_weight)
        r = rewards[used]
        arms = held[used]
        if groups is not None:  # one observation per group: its weight, its mean reward
            labels, first, inverse = np.unique(groups[used], return_index=True,
                                               return_inverse=True)
            total = np.bincount(inverse, weights=w, minlength=len(labels))
            r = np.bincount(inverse, weights=w * r, minlength=len(labels)) / total
            w, arms = total, arms[first]
        per_obs = np.stack([w, w * r, w * w, w * w * r, w * w * r * r], 1)
        self.sums = (math.exp(-int(used.sum()) / self.horizon) * self.sums
                     + arms.T.astype(np.float64) @ per_obs)

    def values(self) -> tuple[np.ndarray, np.ndarray]:
        """Per arm, the estimated reward rate (shrunk towards ``prior_rate`` by
        ``prior_weight`` items' worth) and its standard error."""
        sw, swr, sww, swwr, swwrr = self.sums.T
        value = (swr + self.prior_rate * self.prior_weight) / (sw + self.prior_weight)
        spread = np.maximum(swwrr - 2 * value * swwr + value ** 2 * sww, 0.0)
        se = np.sqrt(spread + self.prior_rate * self.prior_weight) / (sw + self.prior_weight)
        return value, se

    def play_probabilities(self, floor: float = ARM_FLOOR, draws: int = 4096) -> np.ndarray:
        """Per arm, the probability that it is the best under a normal posterior of its
        value (the estimate and its standard error): how often Thompson sampling plays
        it. Computed from fixed draws, so the same evidence gives the same shares, and
        floored at ``floor`` each, so no arm is switched off for good. Arms with the
        same evidence (none, at the start) share alike."""
        value, se = self.values()
        if np.ptp(value) == 0 and np.ptp(se) == 0:
            return np.full(self.arms, 1.0 / self.arms)
        z = np.random.default_rng(0).standard_normal((draws, self.arms))
        best = np.argmax(value + se * z, axis=1)
        share = np.bincount(best, minlength=self.arms) / draws
        return floor + (1.0 - floor * self.arms) * share


# rank buckets of SourceDepths: 0, 1, 2-3, 4-7, ... up to 4096 and beyond
DEPTH_EDGES = np.concatenate([[0.0], 2.0 ** np.arange(13)])
MIN_PICKS = 50.0  # greedy picks from a source before its reach is trusted


@dataclass
class SourceDepths:
    """How deep into each candidate source's ranked list the policy's greedy picks
    reach: a forgetting histogram, per source, of the rank its picked items had in it.

    A source whose picks all come from the top of its list is asked for fewer
    candidates; one whose picks come from near the end of what it gave is asked for
    all it may give (its setting). Explored slots are left out: a uniform pick says
    nothing of where the policy's preferences lie."""

    sources: int
    horizon: float = 5_000.0  # picks over which old evidence fades (1/e)
    counts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.counts = np.zeros((self.sources, len(DEPTH_EDGES)))

    def update(self, bits: np.ndarray, depths: np.ndarray, greedy: np.ndarray) -> None:
        """``bits``: sources of each shown item; ``depths``: its rank in its source's
        list; ``greedy``: the slot was the greedy pick (not explored)."""
        held = ((bits[:, None] >> np.arange(self.sources)) & 1).astype(bool) & greedy[:, None]
        if not held.any():
            return
        bucket = np.searchsorted(DEPTH_EDGES, depths, side="right") - 1
        fresh = np.zeros_like(self.counts)
        for s in range(self.sources):
            np.add.at(fresh[s], bucket[held[:, s]], 1.0)
        self.counts = math.exp(-int(held.any(1).sum()) / self.horizon) * self.counts + fresh

    def reach(self, quantile: float = 0.95) -> np.ndarray:
        """Per source, the rank below which ``quantile`` of its picks lie (the upper
        edge of that bucket); NaN for sources with fewer than ``MIN_PICKS`` picks."""
        out = np.full(self.sources, np.nan)
        upper = np.append(DEPTH_EDGES[1:], DEPTH_EDGES[-1] * 2)
        for s in range(self.sources):
            total = self.counts[s].sum()
            if total >= MIN_PICKS:
                out[s] = upper[int(np.searchsorted(np.cumsum(self.counts[s]),
                                                   quantile * total))]
        return out


@dataclass
class LogisticBandit:
    """Online Bayesian logistic regression with a Gaussian (Laplace) posterior.

    Each batch moves the posterior by a few Newton steps from the previous one (the
    prior for the batch), and old evidence fades with ``horizon`` (the precision
    relaxes towards the prior's), so the model follows a world that drifts."""

    dims: int
    prior_precision: float = 1.0
    horizon: float = 20_000.0  # transitions over which old evidence fades (1/e)
    mean: np.ndarray = field(init=False)
    precision: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.prior = np.zeros(self.dims)
        self.prior[: N_LINEAR] = prior_mean()[: self.dims]
        self.mean = self.prior.copy()
        self.precision = self.prior_precision * np.eye(self.dims)

    def update(self, x: np.ndarray, y: np.ndarray, weight: np.ndarray, steps: int = 2
               ) -> None:
        """``x``: ``(n, dims)``; ``y``: 0/1 outcomes; ``weight``: per-row weights."""
        fade = math.exp(-len(x) / self.horizon)
        base = self.prior_precision * np.eye(self.dims)
        p0 = fade * self.precision + (1.0 - fade) * base
        m0 = self.mean
        w = m0.copy()
        for _ in range(steps):
            p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30.0, 30.0)))
            grad = p0 @ (w - m0) + x.T @ (weight * (p - y))
            hess = p0 + (x * (weight * p * (1.0 - p))[:, None]).T @ x
            w = w - np.linalg.solve(hess, grad)
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30.0, 30.0)))
        self.precision = p0 + (x * (weight * p * (1.0 - p))[:, None]).T @ x
        self.mean = w


# the slot an item was shown in, as the logistic model's training covariate
def slot_covariate(slots: np.ndarray) -> np.ndarray:
    return np.log1p(np.asarray(slots, dtype=np.float64))[:, None]


@dataclass
class EnsembleLearner:
    """Learns the logistic agent from every transition, and how often each arm serves
    from the rewards of the requests it served."""

    model: LogisticBandit = field(default_factory=lambda: LogisticBandit(N_LINEAR + 1))
    # the arms' values, from the slates each served (``update_arms``); slow to forget,
    # since the arms differ by a tenth of their value
    values: ValueEstimates = field(
        default_factory=lambda: ValueEstimates(len(ARMS), horizon=50_000.0,
                                               max_weight=1.0 / ARM_FLOOR))
    sources: ValueEstimates = field(default_factory=lambda: ValueEstimates(len(SOURCES)))
    depths: SourceDepths = field(default_factory=lambda: SourceDepths(len(SOURCES)))

    def update(self, x: np.ndarray, rewards: np.ndarray,
               propensities: np.ndarray | None = None, slots: np.ndarray | None = None,
               sources: np.ndarray | None = None, depths: np.ndarray | None = None,
               greedy: np.ndarray | None = None) -> None:
        """The logistic agent and the sources, from ``n`` learned transitions: ``x``
        ``(n, N_LINEAR)``, ``rewards`` ``(n,)``, and of the shown items, when known:
        ``propensities``, ``slots``, ``sources`` (bits), their ``depths`` in those
        sources' lists and whether each was a ``greedy`` pick. The sources' values are
        importance-weighted by the slot propensities."""
        n = len(x)
        slots = np.zeros(n) if slots is None else slots
        propensities = np.ones(n) if propensities is None else propensities
        positive = (rewards > 0).astype(np.float64)
        self.model.update(np.concatenate([x, slot_covariate(slots)], 1), positive,
                          np.maximum(np.abs(rewards), 1.0))
        if sources is not None:
            bits = sources.astype(np.int64)
            self.sources.update(bits, rewards, propensities)
            if depths is not None and greedy is not None:
                self.depths.update(bits, depths, greedy.astype(bool))

    def update_arms(self, arms: np.ndarray, arm_propensities: np.ndarray,
                    rewards: list[np.ndarray]) -> None:
        """The arms' values, from closed slates: the arm that served each (an index into
        ``ARMS``), the probability it was drawn with, and the rewards of the slate's
        items, feedback and silence alike. Called once per slate, when its window
        closes, so a slate is one observation (its items' rewards go together) and
        each weighs by the inverse of its arm propensity: an arm's value then weighs
        every period alike however often it was played then (the traffic's own CTR
        moves with the time of day and with who is on)."""
        if not len(arms):
            return
        sizes = np.array([len(r) for r in rewards])
        self.values.update(np.repeat(1 << np.asarray(arms, dtype=np.int64), sizes),
                           np.concatenate(rewards).astype(np.float64),
                           np.repeat(arm_propensities, sizes),
                           np.repeat(np.arange(len(arms)), sizes))

    def params(self) -> EnsembleParams:
        cov = np.linalg.inv(self.model.precision)
        return EnsembleParams(cov[:N_LINEAR, :N_LINEAR], self.model.mean[:N_LINEAR].copy(),
                              self.values.play_probabilities(), self.depths.reach(),
                              slot_weight=float(self.model.mean[N_LINEAR]))

    def report(self) -> dict[str, dict[str, dict[str, float | None]]]:
        """What ``GET /v1/model`` shows: each arm's and each source's estimated value
        (reward rate) and its standard error, with the share of requests the arm serves
        and how deep into the source's list the picks reach (None while unknown)."""
        out: dict[str, dict[str, dict[str, float | None]]] = {"agents": {}, "sources": {}}
        value, se = self.values.values()
        weights = self.values.play_probabilities()
        for i, name in enumerate(ARMS):
            out["agents"][name] = {"value": float(value[i]), "se": float(se[i]),
                                   "weight": float(weights[i])}
        value, se = self.sources.values()
        reach = self.depths.reach()
        for i, name in enumerate(SOURCES):
            out["sources"][name] = {"value": float(value[i]), "se": float(se[i]),
                                    "reach": None if np.isnan(reach[i]) else float(reach[i])}
        return out

    # -- saved with the weights, so a learner that takes over continues -------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        p = self.params()
        arrays = {"mean": self.model.mean, "precision": self.model.precision,
                  "values": self.values.sums, "sources": self.sources.sums,
                  "depths": self.depths.counts, "a_inv": p.a_inv, "theta": p.theta,
                  "weights": p.weights, "reach": p.reach}
        return {PREFIX + k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64))
                for k, v in arrays.items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Continue from saved state; False (nothing changed) when there is none, or its
        logistic model is of another layout. Arm values saved by a release with other
        arms (before "fused" was one) are left out: the arms start afresh."""
        try:
            mean, precision, sums, sources, depths = (
                tensors[PREFIX + k].numpy().copy()
                for k in ("mean", "precision", "values", "sources", "depths"))
        except KeyError:
            return False
        if mean.shape != self.model.mean.shape:
            return False
        self.model.mean, self.model.precision = mean, precision
        if sums.shape == self.values.sums.shape:
            self.values.sums = sums
        self.sources.sums, self.depths.counts = sources, depths
        return True


def params_from_tensors(tensors: dict[str, torch.Tensor]) -> EnsembleParams | None:
    """The serving side of saved ensemble state, or None when the weights have none (or
    have another layout's)."""
    try:
        params = EnsembleParams(tensors[PREFIX + "a_inv"].numpy(),
                                tensors[PREFIX + "theta"].numpy(),
                                tensors[PREFIX + "weights"].numpy(),
                                tensors[PREFIX + "reach"].numpy())
    except KeyError:
        return None
    mean = tensors.get(PREFIX + "mean")
    if mean is not None and mean.shape == (N_LINEAR + 1,):
        params.slot_weight = float(mean[N_LINEAR])
    if params.weights.shape != (len(ARMS),):  # saved with other arms: share alike
        params.weights = np.full(len(ARMS), 1.0 / len(ARMS))
    return params if params.theta.shape == (N_LINEAR,) else None


def report_from_tensors(tensors: dict[str, torch.Tensor]
                        ) -> dict[str, dict[str, dict[str, float | None]]]:
    """``EnsembleLearner.report`` of saved state (empty when the weights have none)."""
    learner = EnsembleLearner()
    if not learner.load(tensors):
        return {}
    return learner.report()


def default_params() -> EnsembleParams:
    """Before the learner published anything: the logistic model at its prior, equal
    weights."""
    return EnsembleLearner().params()
