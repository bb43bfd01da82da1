"""The RL state of a request: what the policy knows about the user right now.

Layout (``StateLayout``): the context embedding, a recency-weighted pool of the
embeddings of items the user engaged with positively, the same pool over items
the user ignored or rejected (shown without a click, skipped, disliked), and a
few scalars. Ignored items are signal: reacting to what a user just passed over
is most of what a session-aware recommender can gain over a static ranking.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import compress, repeat

import numpy as np

N_EXPOSURE_FEATURES = 2
N_POPULARITY_FEATURES = 2
N_AFFINITY_FEATURES = 2
N_TAG_FEATURES = 2
N_REPEAT_FEATURES = 2
N_ITEM_FEATURES = (N_EXPOSURE_FEATURES + N_POPULARITY_FEATURES + N_AFFINITY_FEATURES
                   + N_TAG_FEATURES + N_REPEAT_FEATURES)
# Exposure and repeat features fade by this factor per slate (or positive event) since:
# a count of the user's own steps, so "just now" means the same whether a session's
# requests are seconds or minutes apart (and whether a benchmark compresses time)
STEP_DECAY = 0.5


def _feature_groups() -> dict[str, slice]:
    groups, start = {}, 0
    for name, width in (("exposure", N_EXPOSURE_FEATURES), ("popularity", N_POPULARITY_FEATURES),
                        ("affinity", N_AFFINITY_FEATURES), ("tags", N_TAG_FEATURES),
                        ("repeat", N_REPEAT_FEATURES)):
        groups[name] = slice(start, start + width)
        start += width
    return groups


# where each group sits among the per-candidate features (``candidate_features``' order)
FEATURE_GROUPS: dict[str, slice] = _feature_groups()
RECENT_POSITIVES = 5
RECENT_NEGATIVES = 10
# tags are hashed into this many buckets: a fixed width whatever a catalog's vocabulary
TAG_BUCKETS = 64


# the scalars at the end of a state, in order (``build_state`` writes them)
SCALARS = ("has_context", "positives", "negatives", "has_history", "gap")
N_SCALARS = len(SCALARS)
# history counts are stored as log1p(count) / COUNT_SCALE, about 0..1.5 for real users
COUNT_SCALE = 4.0


@dataclass(frozen=True)
class StateLayout:
    """Where each part of a state vector of embedding width ``dim`` sits: the one place
    the offsets are written. Parts, in order: the context embedding, the positive
    pool, the negative pool (each ``dim`` wide), then the ``SCALARS``."""

    dim: int

    @property
    def size(self) -> int:
        return 3 * self.dim + N_SCALARS

    @property
    def pools(self) -> slice:
        """The three embedding-wide parts together (context, positive, negative)."""
        return slice(0, 3 * self.dim)

    @property
    def parts(self) -> dict[str, slice]:
        """Every part of the state by name, in order."""
        d = self.dim
        return {"context": slice(0, d), "positive_pool": slice(d, 2 * d),
                "negative_pool": slice(2 * d, 3 * d), "scalars": slice(3 * d, self.size)}

    def scalar(self, name: str) -> int:
        """The index of one of the ``SCALARS``."""
        return 3 * self.dim + SCALARS.index(name)

    def context(self, state: np.ndarray) -> np.ndarray:
        return state[..., self.parts["context"]]

    def positive_pool(self, state: np.ndarray) -> np.ndarray:
        return state[..., self.parts["positive_pool"]]

    def negative_pool(self, state: np.ndarray) -> np.ndarray:
        return state[..., self.parts["negative_pool"]]

    def has_context(self, state: np.ndarray) -> np.ndarray:
        return state[..., self.scalar("has_context")] > 0.5

    def positive_count(self, states: np.ndarray) -> np.ndarray:
        """The number of positive events each state was built from (its scalar decoded)."""
        scaled = np.atleast_2d(states)[:, self.scalar("positives")]
        return np.rint(np.expm1(COUNT_SCALE * scaled)).astype(np.int64)


def recency_pool(embeddings: np.ndarray, decay: float) -> np.ndarray:
    """Weighted mean of ``embeddings`` (oldest first), weight ``decay**age``.

    The newest row has weight 1; returns a zero vector for no rows.
    """
    if len(embeddings) == 0:
        return np.zeros(embeddings.shape[-1], dtype=np.float32)
    ages = np.arange(len(embeddings) - 1, -1, -1, dtype=np.float32)
    weights = decay ** ages
    return (weights[:, None] * embeddings).sum(0) / weights.sum()


def build_state(layout: StateLayout, context: np.ndarray | None,
                positive: np.ndarray, negative: np.ndarray,
                seconds_since_last: float | None, decay: float = 0.8) -> np.ndarray:
    """Assemble one state vector.

    ``positive`` and ``negative`` are ``(n, dim)`` embeddings, oldest first.
    Scalars: whether a context was given, log-counts of both histories, whether
    the user has any history, and a squashed time since their last interaction
    (a returning user after a day is in a different session than one a minute ago).
    """
    state = np.zeros(layout.size, dtype=np.float32)
    parts = layout.parts
    if context is not None:
        state[parts["context"]] = context
    state[parts["positive_pool"]] = recency_pool(positive, decay)
    state[parts["negative_pool"]] = recency_pool(negative, decay)
    gap = 1.0 if seconds_since_last is None else min(math.log1p(max(seconds_since_last, 0.0))
                                                     / math.log1p(86_400.0), 1.0)
    scalars = {"has_context": 1.0 if context is not None else 0.0,
               "positives": math.log1p(len(positive)) / COUNT_SCALE,
               "negatives": math.log1p(len(negative)) / COUNT_SCALE,
               "has_history": 1.0 if (len(positive) or len(negative)) else 0.0,
               "gap": gap}
    state[parts["scalars"]] = [scalars[name] for name in SCALARS]
    return state


def _per_candidate(candidate_ids: Sequence[str], item_ids: Sequence[str],
                   weights: np.ndarray) -> np.ndarray:
    """``[sum of weights, log1p(count) / log1p(10)]`` per candidate over the entries of
    ``item_ids`` (with repeats): the two columns of the exposure and repeat features.
    Grouping and matching go through one small dict each (C-level ``map``, no Python
    loop per entry; ``np.isin`` on strings sorts: 100x slower)."""
    feats = np.zeros((len(candidate_ids), 2), dtype=np.float32)
    group_of = dict(zip(item_ids, range(len(item_ids)), strict=True))  # last one wins
    groups = np.fromiter(map(group_of.__getitem__, item_ids), dtype=np.int64,
                         count=len(item_ids))
    weight = np.bincount(groups, weights, minlength=len(item_ids))
    count = np.bincount(groups, minlength=len(item_ids))
    hit = np.fromiter(map(group_of.get, candidate_ids, repeat(-1)), dtype=np.int64,
                      count=len(candidate_ids))
    at = np.flatnonzero(hit >= 0)
    if len(at):
        feats[at, 0] = weight[hit[at]]
        feats[at, 1] = np.log1p(count[hit[at]]) / math.log1p(10.0)
    return feats


def ignored_showings(shown: Sequence[tuple[str, float]], touched: set[str], now: float,
                     recent_s: float) -> tuple[tuple[str, ...], np.ndarray]:
    """The user's showings of items they did not act on, newest first (repeats kept),
    and each one's weight ``STEP_DECAY ** slates_since * exp(-age / recent_s)``: what
    ``exposure_features`` sums per item."""
    if not shown:
        return (), np.zeros(0)
    item_ids, times = zip(*reversed(shown), strict=True)  # newest first
    ts = np.asarray(times, dtype=np.float64)
    slates = np.concatenate([[0], np.cumsum(ts[1:] != ts[:-1])])  # slates since
    fade = STEP_DECAY ** slates * np.exp(-np.maximum(now - ts, 0.0) / recent_s)
    acted_on = np.fromiter(map(touched.__contains__, item_ids), dtype=bool,
                           count=len(item_ids))
    return tuple(compress(item_ids, (~acted_on).tolist())), fade[~acted_on]


def positive_weights(positive_ids: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The user's positive events' items, newest first (repeats kept), and each one's
    weight ``STEP_DECAY ** (positive events since)``: what ``repeat_features`` sums."""
    newest_first = list(reversed(positive_ids))
    return newest_first, STEP_DECAY ** np.arange(len(newest_first), dtype=np.float64)


def exposure_features(candidate_ids: Sequence[str], shown: Iterable[tuple[str, float]],
                      touched: set[str], now: float, recent_s: float = 1800.0) -> np.ndarray:
    """Per candidate: how recently, and how often, it was shown to this user and ignored.

    ``[sum over its ignored showings of STEP_DECAY ** slates_since * exp(-age / recent_s),
    log1p(times_shown) / log1p(10)]`` over the user's recently shown items that they
    did not interact with (``touched`` excludes those); a slate is the showings with one
    timestamp. Counting slates makes "shown on the last screen" mean the same at any
    pace of requests, and the time term lets a showing of yesterday fade however few
    slates came since. Users often pass over what they just scrolled past, or come back
    to it: the sign is the policy's to learn. Array operations over the (at most
    ``shown_len``) showings and the candidates: no Python loop per entry.
    """
    shown = list(shown)
    if not shown or not len(candidate_ids):
        return np.zeros((len(candidate_ids), N_EXPOSURE_FEATURES), dtype=np.float32)
    item_ids, fade = ignored_showings(shown, touched, now, recent_s)
    if not item_ids:
        return np.zeros((len(candidate_ids), N_EXPOSURE_FEATURES), dtype=np.float32)
    return _per_candidate(candidate_ids, item_ids, fade)


def repeat_features(candidate_ids: Sequence[str], positive_ids: Sequence[str]) -> np.ndarray:
    """Per candidate: the user's own positive events on this very item,
    ``[sum over them of STEP_DECAY ** (positive events since), log1p(count) / log1p(10)]``
    (``positive_ids`` oldest first). Whether a user comes back to what they liked
    (music, groceries) or is done with it (a film, a fridge) is learned from these;
    with ``exclude_seen`` such items are not candidates at all."""
    if not positive_ids or not len(candidate_ids):
        return np.zeros((len(candidate_ids), N_REPEAT_FEATURES), dtype=np.float32)
    return _per_candidate(candidate_ids, *positive_weights(positive_ids))


PRIOR_CTR = 0.03  # an item with no impressions is assumed to engage this often
PRIOR_WEIGHT = 20.0  # impressions' worth of that assumption
N_STATS = 3  # an item's counts: shown, clicked, expected clicks


def smoothed_ctr(stats: np.ndarray, prior_ctr: float = PRIOR_CTR,
                 prior_weight: float = PRIOR_WEIGHT) -> np.ndarray:
    """Per row of ``[shown, clicked]`` counts, the CTR shrunk towards ``prior_ctr``
    (a beta prior worth ``prior_weight`` impressions), so one lucky click on a
    rarely shown item does not rank it first."""
    shown, clicked = stats[:, 0], stats[:, 1]
    return (clicked + prior_ctr * prior_weight) / (shown + prior_weight)


def popularity_features(stats: np.ndarray, prior_ctr: float = PRIOR_CTR,
                        prior_weight: float = PRIOR_WEIGHT,
                        expected_scale: float | None = 1.0) -> np.ndarray:
    """Per candidate, from its ``[shown, clicked, expected]`` counts: its log lift
    (clicks over expected clicks, both shrunk by a prior worth ``prior_weight``
    impressions at ``prior_ctr``) and log impressions.

    Expected clicks are what the policy predicted for each impression from everything
    but the item itself: the user, the session and the slot
    (``EnsembleParams.expected_ctr``), scaled by ``expected_scale`` so that the
    catalog as a whole has lift 0. A plain CTR would credit an item with the contexts
    it was shown in: an item shown mostly right after a related click (where anything
    similar gets clicked) or in the top slot looks better than it is, and a good item
    shown only at session starts looks worse. Over ``[shown, clicked]`` counts (no
    expectation recorded), every impression expects ``prior_ctr``: the lift is the
    smoothed CTR over ``prior_ctr``; so it is with ``expected_scale=None``, whatever
    the counts hold (``RECSVC_POPULARITY_LIFT=ctr``).

    The Q-network has no item-id parameters (so new items work at once); these two
    features let it learn that some items simply engage more than their text says.
    A new item starts at the prior: lift 0, no impressions.
    """
    shown, clicked = stats[:, 0], stats[:, 1]
    expected = (stats[:, 2] * expected_scale
                if expected_scale is not None and stats.shape[1] > 2 else shown * prior_ctr)
    prior = prior_ctr * prior_weight
    lift = np.log((clicked + prior) / (expected + prior))
    return np.stack([lift, np.log1p(shown) / 10.0], 1).astype(np.float32)


def affinity_features(items: np.ndarray, positive: np.ndarray,
                      negative: np.ndarray) -> np.ndarray:
    """Per candidate: its highest cosine similarity to the user's latest positives and
    to the items they latest ignored or rejected (0 when there are none).

    This is what a session reveals: after a click on a comedy, other comedies; after
    scrolling past three thrillers, fewer thrillers. One ``(N, d) @ (d, m)`` product
    with ``m <= 15``; the Q-network learns how much each similarity is worth.
    """
    out = np.zeros((len(items), N_AFFINITY_FEATURES), dtype=np.float32)
    if len(items) == 0:
        return out
    for col, hist in ((0, positive[-RECENT_POSITIVES:]), (1, negative[-RECENT_NEGATIVES:])):
        if len(hist):
            out[:, col] = (items @ hist.T).max(1)
    return out


def tag_vectors(tags: Sequence[Sequence[str]]) -> np.ndarray:
    """``(n, TAG_BUCKETS)`` uint8 multi-hot of each item's tags, hashed (crc32, stable
    across processes) so that any vocabulary fits a fixed width. Case-insensitive."""
    out = np.zeros((len(tags), TAG_BUCKETS), dtype=np.uint8)
    for row, item_tags in enumerate(tags):
        for tag in item_tags:
            out[row, zlib.crc32(tag.lower().encode()) % TAG_BUCKETS] = 1
    return out


def tag_profile(tags: np.ndarray, decay: float) -> np.ndarray:
    """Unit-norm recency-weighted sum of tag multi-hots (oldest first); zeros for none."""
    pooled = recency_pool(tags.astype(np.float32), decay)  # zeros when there are none
    norm = float(np.linalg.norm(pooled))
    return pooled / norm if norm > 0 else pooled


def tag_affinity_features(item_tags: np.ndarray, positive_tags: np.ndarray,
                          negative_tags: np.ndarray, decay: float = 0.5) -> np.ndarray:
    """Per candidate: cosine between its tags and the tags of what the user latest
    engaged with, and of what they latest passed over (0 without tags or history).

    Tags (genres, categories) are the sharpest signal of what a session is about: a
    click on a comedy says more about the next comedy than the text embeddings'
    similarity does. ``decay`` weights the newest items most, so the profile follows
    the current session rather than the user's whole past. Two matrix-vector products.
    """
    out = np.zeros((len(item_tags), N_TAG_FEATURES), dtype=np.float32)
    if len(item_tags) == 0:
        return out
    norms = np.linalg.norm(item_tags, axis=1)
    unit = item_tags / np.maximum(norms, 1.0)[:, None]
    for col, hist in ((0, positive_tags[-RECENT_POSITIVES:]),
                      (1, negative_tags[-RECENT_NEGATIVES:])):
        if len(hist):
            out[:, col] = unit @ tag_profile(hist, decay)
    return out


@dataclass(frozen=True)
class RecentItems:
    """A user's latest positive and negative (ignored, rejected) items, oldest first:
    their embeddings and tag multi-hots, which candidates are compared with."""

    positive: np.ndarray
    negative: np.ndarray
    positive_tags: np.ndarray
    negative_tags: np.ndarray
    positive_ids: tuple[str, ...]  # the ids of ``positive``'s rows (related-items seeds)
    # every positive event's item, oldest first, repeats kept (the repeat features)
    positive_events: tuple[str, ...] = ()


def candidate_features(candidate_ids: Sequence[str], shown: Iterable[tuple[str, float]],
                       touched: set[str], now: float, stats: np.ndarray, items: np.ndarray,
                       item_tags: np.ndarray, recent: RecentItems,
                       recent_s: float = 1800.0, base_ctr: float = PRIOR_CTR,
                       expected_scale: float | None = 1.0) -> np.ndarray:
    """All per-candidate features: exposure to this user, item popularity (its clicks
    over the clicks expected of it, ``popularity_features``), similarity (of
    embeddings, of tags) to the user's latest positive and negative interactions, and
    the user's own positive events on the item."""
    return np.concatenate([
        exposure_features(candidate_ids, shown, touched, now, recent_s),
        popularity_features(stats, base_ctr, expected_scale=expected_scale),
        affinity_features(items, recent.positive, recent.negative),
        tag_affinity_features(item_tags, recent.positive_tags, recent.negative_tags),
        repeat_features(candidate_ids, recent.positive_events)], 1)
