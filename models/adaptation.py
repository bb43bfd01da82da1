"""Fast adaptation for new users: a learned rule for how much a few events should move
their slate.

The Q-network is trained on everyone's transitions, most of them from users with
long histories, so how it weighs "similar to what this user just clicked" is set by
those users. For a user with a handful of events that weight is wrong in a way
that is the same for every new user, so it can be learned across users: that is
the meta-learning here. The rule is a per-user adjustment of each candidate's
score,

    delta(s, a) = theta[n] . g(s, a),

where ``n`` is how many positive events the user has (0 .. NEW_USER_EVENTS - 1; the
rule is off from there on), and ``g`` are the candidate's affinity features to this
user's own few events (embedding and tag similarity to their positives and to what
they passed over). The per-``n`` weights ``theta`` are fitted, by ridge regression
with forgetting, to the residual ``r - Q(s, a)`` of new users' transitions: they
learn how far the network's score should be corrected after 0, 1, 2 ... events, so
that a user's first clicks personalise the next slate as much as they predict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from models.state import FEATURE_GROUPS, StateLayout

NEW_USER_EVENTS = 5
# the embedding and tag affinity features, which sit side by side
_AFFINITY = slice(FEATURE_GROUPS["affinity"].start, FEATURE_GROUPS["tags"].stop)
N_PER_BUCKET = _AFFINITY.stop - _AFFINITY.start + 1  # and a bias
N_RULE = NEW_USER_EVENTS * N_PER_BUCKET
PREFIX = "adaptation."


def rule_features(layout: StateLayout, states: np.ndarray, features: np.ndarray
                  ) -> np.ndarray:
    """``(n, N_RULE)``: each row's affinity features and a bias, in the block of its
    user's event count (all zero for users with NEW_USER_EVENTS or more)."""
    n = len(features)
    counts = np.broadcast_to(layout.positive_count(states), (n,))
    out = np.zeros((n, N_RULE), dtype=np.float64)
    for bucket in range(NEW_USER_EVENTS):
        rows = counts == bucket
        if rows.any():
            block = slice(bucket * N_PER_BUCKET, (bucket + 1) * N_PER_BUCKET)
            out[rows, block] = np.concatenate(
                [features[rows][:, _AFFINITY], np.ones((int(rows.sum()), 1))], 1)
    return out


@dataclass
class AdaptationRule:
    """The serving side: ``theta`` of the learned rule."""

    theta: np.ndarray

    def adjust(self, layout: StateLayout, state: np.ndarray, features: np.ndarray
               ) -> np.ndarray | None:
        """The score adjustment of one request's candidates, or None (not a new user)."""
        if layout.positive_count(state)[0] >= NEW_USER_EVENTS or not len(features):
            return None
        return rule_features(layout, state, features) @ self.theta


@dataclass
class AdaptationLearner:
    """Fits the rule to new users' residuals ``r - Q(s, a)``."""

    ridge: float = 10.0
    horizon: float = 20_000.0  # transitions over which old evidence fades (1/e)
    a: np.ndarray = field(default_factory=lambda: np.zeros((N_RULE, N_RULE)))
    b: np.ndarray = field(default_factory=lambda: np.zeros(N_RULE))

    def update(self, phi: np.ndarray, residuals: np.ndarray) -> None:
        used = phi.any(1)
        if not used.any():
            return
        fade = math.exp(-int(used.sum()) / self.horizon)
        self.a = fade * self.a + phi[used].T @ phi[used]
        self.b = fade * self.b + phi[used].T @ residuals[used]

    def rule(self) -> AdaptationRule:
        return AdaptationRule(np.linalg.solve(self.a + self.ridge * np.eye(N_RULE), self.b))

    def tensors(self) -> dict[str, torch.Tensor]:
        arrays = {"a": self.a, "b": self.b, "theta": self.rule().theta}
        return {PREFIX + k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64))
                for k, v in arrays.items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> bool:
        try:
            self.a, self.b = (tensors[PREFIX + k].numpy().copy() for k in ("a", "b"))
        except KeyError:
            return False
        return True


def rule_from_tensors(tensors: dict[str, torch.Tensor]) -> AdaptationRule | None:
    theta = tensors.get(PREFIX + "theta")
    return None if theta is None else AdaptationRule(theta.numpy())
