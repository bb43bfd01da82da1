"""Slot-by-slot epsilon-greedy slates with exact logged propensities.

For each slot, with probability epsilon a uniformly random remaining candidate
is placed, otherwise the best remaining one. The probability that the item
actually placed in slot j got there, given the items already placed, is

    epsilon / R_j + (1 - epsilon) * [item is the best remaining]

with R_j the number of remaining candidates. That conditional probability is
what off-policy estimators need per slot, and it is what is logged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SlateChoice:
    indices: np.ndarray       # candidate indices, slot order
    propensities: np.ndarray  # exact probability of each placement, given the slots before
    explored: np.ndarray      # True where the slot was filled by the random branch


def epsilon_greedy_slate(scores: np.ndarray, k: int, epsilon: float,
                         rng: np.random.Generator) -> SlateChoice:
    """Choose ``min(k, len(scores))`` distinct candidates by epsilon-greedy per slot."""
    k = min(k, len(scores))
    coins, picks = rng.random((2, k))
    return slate_from_draws(scores, k, epsilon, coins, picks)


def slate_from_draws(scores: np.ndarray, k: int, epsilon: float, coins: np.ndarray,
                     picks: np.ndarray) -> SlateChoice:
    """Epsilon-greedy over ``scores`` with the uniform draws given: per slot, the
    random branch is taken when ``coins[slot] < epsilon``, and then places the
    ``floor(picks[slot] * remaining)``-th remaining candidate (in index order).

    One request at a time: the reference that ``epsilon_greedy_slates`` (a whole
    batch as array operations) must agree with, draw for draw."""
    n = len(scores)
    k = min(k, n)
    order = np.argsort(-scores, kind="stable")  # greedy order, computed once
    taken = np.zeros(n, dtype=bool)
    indices = np.empty(k, dtype=np.int64)
    props = np.empty(k, dtype=np.float64)
    explored = np.zeros(k, dtype=bool)
    best_ptr = 0
    for slot in range(k):
        while taken[order[best_ptr]]:
            best_ptr += 1
        best = order[best_ptr]
        remaining = n - slot
        if epsilon > 0 and coins[slot] < epsilon:
            # uniform over the remaining candidates
            pick = min(int(picks[slot] * remaining), remaining - 1)
            choice = int(np.flatnonzero(~taken)[pick])
            explored[slot] = choice != best
        else:
            choice = int(best)
        taken[choice] = True
        indices[slot] = choice
        props[slot] = epsilon / remaining + (1.0 - epsilon) * (choice == best)
    return SlateChoice(indices, props, explored)


def epsilon_greedy_slates(scores: np.ndarray, valid: np.ndarray, ks: np.ndarray,
                          epsilons: np.ndarray, coins: np.ndarray,
                          picks: np.ndarray) -> list[SlateChoice]:
    """``slate_from_draws`` for a whole batch at once, slot by slot over all requests.

    ``scores`` and ``valid`` are ``(B, C)``: request b's candidates are its first
    ``valid[b].sum()`` columns (the rest is padding). ``ks`` and ``epsilons`` are per
    request; ``coins`` and ``picks`` ``(B, K)`` with K at least the longest slate. The
    loop runs over slots (at most K), never over requests: each step is a handful of
    ``(B, C)`` array operations, so a batch of 32 costs about what one request did.
    """
    batch = len(scores)
    n = valid.sum(1)
    ks = np.minimum(ks, n)
    longest = int(ks.max()) if batch else 0
    # padding sorts last (stable: equal scores keep index order, as one request's do);
    # with at most ``longest`` placed, the best remaining is always among the top ones
    # (valid first, by key: a NaN score must not sort after the padding)
    order = np.lexsort((-scores, ~valid), axis=1)
    top = order[:, : longest + 1]
    slots = np.arange(longest)
    in_slate = slots[None, :] < ks[:, None]
    remaining = np.maximum(n[:, None] - slots[None, :], 1)
    # a request whose coins never come up takes the greedy order whole
    indices = top[:, :longest].copy()
    props = epsilons[:, None] / remaining + (1.0 - epsilons[:, None])
    explored = np.zeros((batch, longest), dtype=bool)
    exploring = np.flatnonzero(((coins[:, :longest] < epsilons[:, None]) & in_slate
                                & (epsilons[:, None] > 0)).any(1))
    if len(exploring):
        e = exploring
        indices[e], props[e], explored[e] = _slot_by_slot(
            top[e], ~valid[e], n[e], ks[e], epsilons[e], coins[e], picks[e], longest)
    return [SlateChoice(indices[b, :k], props[b, :k], explored[b, :k])
            for b, k in enumerate(ks.tolist())]


def _slot_by_slot(top: np.ndarray, taken: np.ndarray, n: np.ndarray, ks: np.ndarray,
                  epsilons: np.ndarray, coins: np.ndarray, picks: np.ndarray, longest: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The slot loop of ``epsilon_greedy_slates`` for requests that explore somewhere:
    ``top`` their greedy order's head, ``taken`` the padding (updated in place)."""
    batch = len(top)
    rows = np.arange(batch)
    indices = np.zeros((batch, longest), dtype=np.int64)
    props = np.ones((batch, longest), dtype=np.float64)
    explored = np.zeros((batch, longest), dtype=bool)
    top_taken = np.take_along_axis(taken, top, 1)
    for slot in range(longest):
        active = slot < ks
        remaining = np.maximum(n - slot, 1)
        best = top[rows, np.argmax(~top_taken, 1)]
        explore = active & (epsilons > 0) & (coins[:, slot] < epsilons)
        choice = best
        if explore.any():  # the n-th candidate not yet placed, in index order
            pick = np.minimum((picks[:, slot] * remaining).astype(np.int64), remaining - 1)
            nth_free = np.argmax(np.cumsum(~taken, 1) > pick[:, None], 1)
            choice = np.where(explore, nth_free, best)
        taken[rows[active], choice[active]] = True
        top_taken |= active[:, None] & (top == choice[:, None])
        indices[:, slot] = choice
        props[:, slot] = epsilons / remaining + (1.0 - epsilons) * (choice == best)
        explored[:, slot] = explore & (choice != best)
    return indices, props, explored


@dataclass(frozen=True)
class EpsilonSchedule:
    """Epsilon decaying from ``start`` towards ``end`` as feedback is learned.

    ``epsilon(n) = end + (start - end) * exp(-n / decay)``; ``decay <= 0`` keeps
    ``start`` forever. Tied to learned feedback rather than wall time, so an idle
    service does not stop exploring.
    """

    # chosen on the family of worlds (docs/benchmarks.md, "Exploration"): against
    # 0.2 -> 0.03, up on 11 of 15 worlds over 3 seeds, +2.3% on average
    start: float = 0.1
    end: float = 0.01
    decay: float = 2_000.0

    def __call__(self, learned: int) -> float:
        if self.decay <= 0:
            return self.start
        return self.end + (self.start - self.end) * math.exp(-learned / self.decay)
