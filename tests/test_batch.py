"""The batch arrays agree with the per-request functions they replace in serving."""

import numpy as np
import pytest

from models.batch import (
    PaddedCandidates,
    batch_features,
    batch_scores,
    item_products,
    own_history_features,
)
from models.ensemble import ARMS, N_LINEAR, EnsembleParams
from models.scorer import Scorer
from models.state import (
    N_ITEM_FEATURES,
    TAG_BUCKETS,
    RecentItems,
    StateLayout,
    candidate_features,
)

DIM = 8


def unit(rng, n):
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def request(rng, n, pos, neg):
    """One request's candidates and history, as serving has them."""
    ids = [f"i{j}" for j in rng.permutation(40)[:n]]
    stats = np.abs(rng.standard_normal((n, 3))).astype(np.float32) * [50, 3, 2]
    tags = (rng.random((n, TAG_BUCKETS)) < 0.05).astype(np.float32)
    recent = RecentItems(unit(rng, pos), unit(rng, neg),
                         (rng.random((pos, TAG_BUCKETS)) < 0.05).astype(np.uint8),
                         (rng.random((neg, TAG_BUCKETS)) < 0.05).astype(np.uint8),
                         tuple(f"i{j}" for j in range(pos)),
                         tuple(f"i{int(j)}" for j in rng.integers(0, 40, pos + 2)))
    shown = [(f"i{int(j)}", float(100 + t // 3)) for t, j in enumerate(rng.integers(0, 40, 12))]
    return ids, unit(rng, n), stats, tags, recent, shown, {"i1", "i2"}


@pytest.mark.parametrize("expected_scale", [1.3, None])
def test_batch_features_and_scores_are_the_per_request_ones(expected_scale):
    rng = np.random.default_rng(0)
    layout = StateLayout(DIM)
    reqs = [request(rng, n, pos, neg)
            for n, pos, neg in ((7, 0, 0), (20, 3, 12), (0, 2, 1), (13, 7, 4), (1, 1, 0))]
    padded = PaddedCandidates.of([r[1] for r in reqs], [r[2] for r in reqs],
                                 [r[3] for r in reqs], DIM, TAG_BUCKETS)
    assert padded.valid.shape == (5, 20) and padded.lengths.tolist() == [7, 20, 0, 13, 1]
    hashes = padded.pad([np.array([hash(i) for i in r[0]], np.int64) for r in reqs])
    own = own_history_features(hashes, padded.valid, [r[5] for r in reqs],
                               [r[6] for r in reqs], [r[4].positive_events for r in reqs],
                               [120.0] * len(reqs), 1800.0)
    queries = rng.standard_normal((5, DIM + N_ITEM_FEATURES)).astype(np.float32)
    values = rng.standard_normal(5).astype(np.float32)
    states = rng.standard_normal((5, layout.size)).astype(np.float32)
    products = item_products(layout, padded.vectors, queries, states, [r[4] for r in reqs])
    feats = batch_features(padded, [r[4] for r in reqs], own, products.affinity, 0.04,
                           expected_scale)
    scores = batch_scores(products, queries, values, feats)
    params = EnsembleParams(np.eye(N_LINEAR) * 0.5, rng.standard_normal(N_LINEAR),
                            np.full(len(ARMS), 0.25), slot_weight=-0.2)
    agents, x = params.agent_scores_batch(products.pools, feats, scores)
    arms = np.arange(5) % len(ARMS)
    ranked = params.arm_scores_batch(agents, arms, padded.valid)
    expected = params.expected_ctr_batch(x, np.tile(np.arange(3), (5, 1)))
    for b, (ids, items, stats, tags, recent, shown, touched) in enumerate(reqs):
        n = len(ids)
        want = candidate_features(ids, shown, touched, 120.0, stats, items, tags, recent,
                                  base_ctr=0.04, expected_scale=expected_scale)
        assert np.allclose(feats[b, :n], want, atol=1e-5)
        assert not feats[b, n:].any()  # padding stays zero
        want_scores = Scorer.score(queries[b], float(values[b]), items, want)
        assert np.allclose(scores[b, :n], want_scores, atol=1e-4)
        if not n:
            continue
        want_agents = params.agent_scores(layout, states[b], items, want, want_scores)
        assert np.allclose(agents[b, :, :n], want_agents, atol=1e-4)
        assert np.allclose(ranked[b, :n], params.arm_scores(want_agents, int(arms[b])),
                           atol=1e-4)
        shown_rows = np.arange(min(3, n))
        assert np.allclose(expected[b, : len(shown_rows)], params.expected_ctr(
            layout, states[b], items[shown_rows], want[shown_rows], shown_rows), atol=1e-6)


def test_an_arm_drawn_from_a_uniform_has_the_play_probabilities():
    params = EnsembleParams(np.eye(N_LINEAR), np.zeros(N_LINEAR), np.array([0.1, 0.0, 0.3, 0.6]))
    draws = np.random.default_rng(1).random(20_000)
    arms = np.array([params.arm_from_draw(u) for u in draws])
    assert np.bincount(arms, minlength=4) / len(draws) == pytest.approx(params.weights,
                                                                          abs=0.015)
    assert params.arm_from_draw(0.0) == 0 and params.arm_from_draw(0.9999999) == 3
