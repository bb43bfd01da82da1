"""Epsilon-greedy slates: distinct items, exact logged propensities, schedule."""

from collections import Counter, defaultdict

import numpy as np

from models.exploration import (
    EpsilonSchedule,
    epsilon_greedy_slate,
    epsilon_greedy_slates,
    slate_from_draws,
)


def test_greedy_when_epsilon_zero():
    scores = np.array([0.1, 0.9, 0.5, 0.7])
    c = epsilon_greedy_slate(scores, 3, 0.0, np.random.default_rng(0))
    assert c.indices.tolist() == [1, 3, 2]
    assert np.allclose(c.propensities, 1.0)
    assert not c.explored.any()


def test_slate_is_min_k_n_and_never_duplicates():
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(1, 12))
        c = epsilon_greedy_slate(rng.standard_normal(n), 10, 0.7, rng)
        assert len(c.indices) == min(10, n)
        assert len(set(c.indices.tolist())) == len(c.indices)


def test_logged_propensities_match_empirical_frequencies():
    """Per slot, given the items already placed, the logged probability of the placed
    item equals how often that placement happens over many seeded draws."""
    scores = np.array([0.3, 1.0, 0.2, 0.8, 0.5, 0.1])
    eps, draws = 0.3, 60_000
    rng = np.random.default_rng(42)
    counts: dict[tuple, Counter] = defaultdict(Counter)
    logged: dict[tuple, dict] = defaultdict(dict)
    for _ in range(draws):
        c = epsilon_greedy_slate(scores, 3, eps, rng)
        for slot in range(3):
            prefix = tuple(c.indices[:slot].tolist())
            item = int(c.indices[slot])
            counts[prefix][item] += 1
            prev = logged[prefix].setdefault(item, c.propensities[slot])
            assert prev == c.propensities[slot]  # deterministic given the prefix
    checked = 0
    for prefix, counter in counts.items():
        total = sum(counter.values())
        if total < 3000:
            continue
        for item, n in counter.items():
            p = logged[prefix][item]
            se = np.sqrt(p * (1 - p) / total)
            assert abs(n / total - p) < 5 * se + 1e-9, (prefix, item, n / total, p)
            checked += 1
        # the probabilities of everything that can be placed sum to one
        assert abs(sum(logged[prefix].values()) - 1) < 1e-9 or len(counter) < 6 - len(prefix)
    assert checked >= 10
    # slot 0 marginals in closed form
    first = counts[()]
    assert abs(first[1] / draws - (0.7 + 0.3 / 6)) < 0.01
    assert abs(first[5] / draws - 0.3 / 6) < 0.005


def test_a_batch_draws_the_slates_and_propensities_of_one_request_at_a_time():
    """The batched chooser places, draw for draw, what the per-request reference does:
    requests of different lengths, slate sizes and epsilons (0 and 1 included), ties."""
    rng = np.random.default_rng(7)
    for _ in range(300):
        batch = int(rng.integers(1, 9))
        lengths = rng.integers(0, 14, batch)
        width = int(lengths.max()) + int(rng.integers(0, 3))
        scores = rng.standard_normal((batch, width))
        scores[:, ::3] = np.round(scores[:, ::3])  # some exact ties
        valid = np.arange(width)[None, :] < lengths[:, None]
        scores[~valid] = rng.standard_normal(int((~valid).sum())) * 100  # padding ignored
        ks = rng.integers(1, 12, batch)
        eps = rng.choice([0.0, 0.1, 0.5, 1.0], batch)
        coins, picks = rng.random((2, batch, 12))
        got = epsilon_greedy_slates(scores, valid, ks, eps, coins, picks)
        for b in range(batch):
            want = slate_from_draws(scores[b, : lengths[b]], int(ks[b]), float(eps[b]),
                                    coins[b], picks[b])
            assert got[b].indices.tolist() == want.indices.tolist()
            assert np.allclose(got[b].propensities, want.propensities)
            assert got[b].explored.tolist() == want.explored.tolist()


def test_padding_is_never_placed_even_after_nan_scores():
    scores = np.array([[1.0, np.nan, np.nan, 5.0, 6.0]])
    valid = np.array([[True, True, True, False, False]])
    got = epsilon_greedy_slates(scores, valid, np.array([3]), np.array([0.0]),
                                np.ones((1, 3)), np.zeros((1, 3)))[0]
    want = slate_from_draws(scores[0, :3], 3, 0.0, np.ones(3), np.zeros(3))
    assert got.indices.tolist() == want.indices.tolist() == [0, 1, 2]


def test_schedule_decays_towards_end():
    s = EpsilonSchedule(0.2, 0.05, 1000)
    assert s(0) == 0.2
    assert 0.05 < s(1000) < 0.2
    assert abs(s(100_000) - 0.05) < 1e-6
    assert EpsilonSchedule(0.1, 0.0, 0)(10**6) == 0.1
