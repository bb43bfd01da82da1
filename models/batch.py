"""A batch of concurrent requests' candidates as padded arrays, and what is computed
on them at once: the per-candidate features ``(B, C, F)`` and the Q-network's scores
``(B, C)``.

Serving gathers concurrent requests into a batch (``app.server.batching``). One
request's work is small (a few hundred candidates), so doing it request by request
costs mostly the interpreter's overhead per array operation; here each operation
runs once per batch. Request b's candidates are the first ``lengths[b]`` columns of
its row; the rest is padding, which ``valid`` marks: the features leave it at zero,
and whatever scores it gets are masked where slates are drawn.
The per-request functions in ``models.state`` and ``models.scorer`` are the
reference these agree with (``tests/test_batch.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models.state import (
    FEATURE_GROUPS,
    N_ITEM_FEATURES,
    N_POPULARITY_FEATURES,
    RECENT_NEGATIVES,
    RECENT_POSITIVES,
    RecentItems,
    StateLayout,
    ignored_showings,
    popularity_features,
    positive_weights,
)


@dataclass
class PaddedCandidates:
    """Every request's candidates, padded to the longest: ``(B, C, ...)`` arrays."""

    vectors: np.ndarray  # (B, C, D) float32 embeddings
    stats: np.ndarray    # (B, C, 3) shown, clicked, expected clicks
    tags: np.ndarray     # (B, C, T) tag multi-hots
    valid: np.ndarray    # (B, C) bool: a candidate, not padding
    lengths: np.ndarray  # (B,) candidates per request

    @classmethod
    def of(cls, vectors: Sequence[np.ndarray], stats: Sequence[np.ndarray],
           tags: Sequence[np.ndarray], dim: int, n_tags: int) -> PaddedCandidates:
        lengths = np.array([len(v) for v in vectors], dtype=np.int64)
        batch, width = len(vectors), int(lengths.max(initial=0))
        out = cls(np.zeros((batch, width, dim), np.float32),
                  np.zeros((batch, width, 3), np.float32),
                  np.zeros((batch, width, n_tags), np.float32),
                  np.arange(width)[None, :] < lengths[:, None], lengths)
        for b, n in enumerate(lengths.tolist()):
            out.vectors[b, :n] = vectors[b]
            out.stats[b, :n, : stats[b].shape[1]] = stats[b]
            out.tags[b, :n] = tags[b]
        return out

    def pad(self, per_request: Sequence[np.ndarray]) -> np.ndarray:
        """Per-request arrays of one entry per candidate (and any trailing shape) as one
        ``(B, C, ...)`` array, zeros in the padding."""
        trailing = per_request[0].shape[1:] if len(per_request) else ()
        out = np.zeros((len(per_request), self.valid.shape[1], *trailing),
                       dtype=per_request[0].dtype if len(per_request) else np.float32)
        for b, n in enumerate(self.lengths.tolist()):
            out[b, :n] = per_request[b]
        return out


# a request's index in the batch sits above the id hash's low 48 bits in one sort key:
# two ids of one request that agree in those bits (about 3e-10 per request with 200
# showings and 400 candidates) would share their exposure and repeat features
HASH_BITS = 48
_LOW = (1 << HASH_BITS) - 1


def _matched(hashes: np.ndarray, valid: np.ndarray, entries: Sequence[np.ndarray],
             weights: Sequence[np.ndarray]) -> np.ndarray:
    """``(B, C, 2)``: per candidate (``hashes`` ``(B, C)`` of its id), the sum of the
    ``weights`` of its request's ``entries`` (id hashes, repeats allowed) with its
    hash, and ``log1p(how many) / log1p(10)``; zeros where none match. One sort of
    the batch's entries and one binary search per candidate, keyed by
    ``(request, hash)``: no Python per entry or candidate."""
    batch, width = hashes.shape
    out = np.zeros((batch, width, 2), np.float32)
    counts = [len(e) for e in entries]
    if not sum(counts):
        return out
    owner = np.repeat(np.arange(batch, dtype=np.int64), counts)
    keys = (owner << HASH_BITS) | (np.concatenate(entries) & _LOW)
    unique, group = np.unique(keys, return_inverse=True)
    weight = np.bincount(group, np.concatenate(weights), minlength=len(unique))
    count = np.bincount(group, minlength=len(unique))
    wanted = (np.arange(batch, dtype=np.int64)[:, None] << HASH_BITS) | (hashes & _LOW)
    at = np.minimum(np.searchsorted(unique, wanted), len(unique) - 1)
    hit = (unique[at] == wanted) & valid
    out[..., 0] = np.where(hit, weight[at], 0.0)
    out[..., 1] = np.where(hit, np.log1p(count[at]) / math.log1p(10.0), 0.0)
    return out


def own_history_features(hashes: np.ndarray, valid: np.ndarray,
                         shown: Sequence[Sequence[tuple[str, float]]],
                         touched: Sequence[set[str]], positive_events: Sequence[Sequence[str]],
                         now: Sequence[float], recent_s: float) -> np.ndarray:
    """``(B, C, 4)``: ``models.state.exposure_features`` then ``repeat_features`` of a
    whole batch, matching candidates to each user's showings and positive events by
    id hash (``CandidateIndex.at_rows``) instead of by id. Per request, Python only
    hashes the user's own ids (C-level ``map``)."""
    seen, seen_weights, liked, liked_weights = [], [], [], []
    for user_shown, user_touched, events, at in zip(shown, touched, positive_events, now,
                                                     strict=True):
        item_ids, fade = ignored_showings(user_shown, user_touched, at, recent_s)
        seen.append(np.fromiter(map(hash, item_ids), dtype=np.int64, count=len(item_ids)))
        seen_weights.append(fade)
        newest_first, weights = positive_weights(events)
        liked.append(np.fromiter(map(hash, newest_first), dtype=np.int64,
                                 count=len(newest_first)))
        liked_weights.append(weights)
    return np.concatenate([_matched(hashes, valid, seen, seen_weights),
                           _matched(hashes, valid, liked, liked_weights)], 2)


def _recent(rows: Sequence[np.ndarray], keep: int, width: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """The latest ``keep`` rows of each request's history (oldest first), padded:
    ``(B, keep, width)`` and the ``(B, keep)`` mask of real rows."""
    out = np.zeros((len(rows), keep, width), np.float32)
    mask = np.zeros((len(rows), keep), bool)
    for b, hist in enumerate(rows):
        latest = hist[-keep:]
        out[b, : len(latest)] = latest
        mask[b, : len(latest)] = True
    return out, mask


def _masked_max(sims: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(B, C)``: each candidate's highest similarity over its request's real history
    rows (``sims`` ``(B, C, k)``, ``mask`` ``(B, k)``); 0 for a request without any."""
    best = np.where(mask[:, None, :], sims, -np.inf).max(-1, initial=-np.inf)
    has_history = np.asarray(mask.any(1))
    return np.where(has_history[:, None], best, 0.0)


@dataclass
class ItemProducts:
    """Every dot product with the candidates' embeddings that a batch needs, from one
    batched matrix product: the embeddings are read once, not once per use."""

    query: np.ndarray     # (B, C) with the item part of the Q-network's query
    pools: np.ndarray     # (B, C, 3) with the state's context, positive and negative pools
    affinity: np.ndarray  # (B, C, 2) the highest with the latest positives, negatives


def item_products(layout: StateLayout, items: np.ndarray, queries: np.ndarray,
                  states: np.ndarray, recent: Sequence[RecentItems]) -> ItemProducts:
    """``items`` ``(B, C, D)`` times, per request, its query's item part, its state's
    three pools and its latest positive and negative items (``(B, 19, D)``)."""
    batch, _, dim = items.shape
    positive, positive_mask = _recent([r.positive for r in recent], RECENT_POSITIVES, dim)
    negative, negative_mask = _recent([r.negative for r in recent], RECENT_NEGATIVES, dim)
    right = np.concatenate([queries[:, None, :dim].astype(np.float32),
                            states[:, layout.pools].reshape(batch, 3, dim), positive,
                            negative], 1)
    prod = np.matmul(items, right.transpose(0, 2, 1))
    split = 4 + RECENT_POSITIVES
    affinity = np.stack([_masked_max(prod[..., 4:split], positive_mask),
                         _masked_max(prod[..., split:], negative_mask)], -1)
    return ItemProducts(prod[..., 0], prod[..., 1:4], affinity)


def _tag_profiles(hist: np.ndarray, mask: np.ndarray, decay: float) -> np.ndarray:
    """``(B, T)`` unit-norm recency-weighted tag profiles (``models.state.tag_profile``:
    the newest row weighs 1, each older one ``decay`` times the next)."""
    lengths = mask.sum(1, keepdims=True)
    ages = lengths - 1 - np.arange(mask.shape[1])[None, :]
    weights = np.where(mask, decay ** np.maximum(ages, 0).astype(np.float32), 0.0)
    total = np.maximum(weights.sum(1, keepdims=True), 1e-30)
    pooled = (weights[:, :, None] * hist).sum(1) / total
    norm = np.linalg.norm(pooled, axis=1, keepdims=True)
    return np.where(norm > 0, pooled / np.where(norm > 0, norm, 1.0), 0.0)


def batch_features(padded: PaddedCandidates, recent: Sequence[RecentItems],
                   own: np.ndarray, affinity: np.ndarray, base_ctr: float,
                   expected_scale: float | None, tag_decay: float = 0.5) -> np.ndarray:
    """``(B, C, N_ITEM_FEATURES)``, ``models.state.candidate_features`` of every request
    at once. ``own`` is ``own_history_features`` (exposure, then repeats) and
    ``affinity`` is ``ItemProducts.affinity``."""
    batch, width, _ = padded.vectors.shape
    feats = np.zeros((batch, width, N_ITEM_FEATURES), np.float32)
    feats[..., FEATURE_GROUPS["exposure"]] = own[..., :2]
    feats[..., FEATURE_GROUPS["repeat"]] = own[..., 2:]
    feats[..., FEATURE_GROUPS["popularity"]] = popularity_features(
        padded.stats.reshape(-1, 3), base_ctr, expected_scale=expected_scale
    ).reshape(batch, width, N_POPULARITY_FEATURES)
    feats[..., FEATURE_GROUPS["affinity"]] = affinity
    tags = FEATURE_GROUPS["tags"].start
    n_tags = padded.tags.shape[2]
    unit = padded.tags / np.maximum(np.linalg.norm(padded.tags, axis=2), 1.0)[..., None]
    for col, keep, tag_rows in ((0, RECENT_POSITIVES, [r.positive_tags for r in recent]),
                                (1, RECENT_NEGATIVES, [r.negative_tags for r in recent])):
        hist_tags, tag_mask = _recent(tag_rows, keep, n_tags)
        profile = _tag_profiles(hist_tags, tag_mask, tag_decay).astype(np.float32)
        feats[..., tags + col] = np.matmul(unit, profile[:, :, None])[..., 0]
    feats[~padded.valid] = 0.0
    return feats


def batch_scores(products: ItemProducts, queries: np.ndarray, values: np.ndarray,
                 features: np.ndarray) -> np.ndarray:
    """``(B, C)`` Q of every candidate (``models.scorer.Scorer.score`` per request):
    the item part from ``item_products``, plus the features' product."""
    d = queries.shape[1] - features.shape[2]  # where the features' part of a query starts
    return (products.query + values[:, None]
            + np.matmul(features, queries[:, d:, None])[..., 0])
