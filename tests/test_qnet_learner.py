"""Q-network scoring and serialisation, and that DQN learning moves the policy."""

import json
import os
import sys

import numpy as np
import pytest
import torch

from models.exploration import epsilon_greedy_slate
from models.learner import DQNConfig, DQNLearner
from models.qnet import QNetwork, split_weights, weights_to_bytes
from models.scorer import Scorer
from models.state import (
    N_ITEM_FEATURES,
    STEP_DECAY,
    StateLayout,
    build_state,
    exposure_features,
    repeat_features,
)


def unit(rng, n, d):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_fast_scores_equal_the_straightforward_per_candidate_q():
    torch.manual_seed(0)
    layout = StateLayout(16)
    net = QNetwork(layout.size, 16, hidden=32)
    for p in net.parameters():  # random, not the zero-initialised heads
        torch.nn.init.normal_(p, std=0.1)
    rng = np.random.default_rng(0)
    state = rng.standard_normal(layout.size).astype(np.float32)
    items = unit(rng, 200, 16)
    feats = rng.random((200, net.item_features)).astype(np.float32)
    actions = np.concatenate([items, feats], 1)
    scorer = Scorer(net, 3)
    q, v = scorer.query(state[None])
    fast = Scorer.score(q[0], float(v[0]), items, feats)
    with torch.no_grad():
        slow = np.array([float(net.q_of_actions(torch.from_numpy(state[None]),
                                                torch.from_numpy(actions[i:i + 1]))[0])
                         for i in range(len(items))])
        query, value = net(torch.from_numpy(state[None]))
        batched = torch.einsum("bd,bnd->bn", query, torch.from_numpy(actions[None])) + value
    assert np.allclose(fast, slow, atol=1e-5)
    assert np.allclose(fast, batched.numpy()[0], atol=1e-5)


def test_weights_round_trip_through_safetensors():
    net = QNetwork(StateLayout(8).size, 8, hidden=16)
    for p in net.parameters():
        torch.nn.init.normal_(p)
    blob = weights_to_bytes(net)
    # safetensors: 8-byte little-endian header length, then a JSON header (no pickle)
    header_len = int.from_bytes(blob[:8], "little")
    assert json.loads(blob[8:8 + header_len])["__metadata__"]["item_dim"] == "8"
    again = split_weights(blob)[0]
    x = torch.randn(4, net.state_dim)
    assert torch.allclose(net(x)[0], again(x)[0]) and torch.allclose(net(x)[1], again(x)[1])


def test_untrained_network_ranks_by_content_similarity():
    """Before any feedback, items close to the context and to liked items rank first."""
    rng = np.random.default_rng(1)
    d = 16
    layout = StateLayout(d)
    items = unit(rng, 50, d)
    ctx = items[3] + 0.1 * unit(rng, 1, d)[0]
    state = build_state(layout, ctx / np.linalg.norm(ctx), items[[10]], items[[20]], 5.0)
    q, v = Scorer(QNetwork(layout.size, d), 0).query(state[None])
    ranking = np.argsort(-Scorer.score(q[0], float(v[0]), items))
    assert ranking[0] in (3, 10)
    assert ranking[-1] == 20 or 20 in ranking[-3:]


def _run_synthetic(train: bool, rounds: int = 500, seed: int = 0) -> float:
    """Contexts each with one clearly best item; returns the greedy hit rate at the end."""
    rng = np.random.default_rng(seed)
    d, n_items, n_ctx = 16, 40, 6
    layout = StateLayout(d)
    items = unit(rng, n_items, d)
    contexts = unit(rng, n_ctx, d)
    # best item per context is chosen at random, so content similarity does not reveal it
    best = rng.choice(n_items, n_ctx, replace=False)
    learner = DQNLearner(layout.size, d, DQNConfig(gamma=0.0, lr=3e-3, batch_size=64,
                                                   steps_per_batch=4, hidden=64, seed=seed))
    states = np.stack([build_state(layout, c, np.zeros((0, d)), np.zeros((0, d)), None)
                       for c in contexts])

    def next_actions(queries):
        top = np.argmax(queries @ items.T, axis=1)
        return items[top], np.ones(len(queries), dtype=bool)

    for _ in range(rounds if train else 0):
        c = int(rng.integers(n_ctx))
        scorer = Scorer(learner.online, 0)
        q, v = scorer.query(states[c:c + 1])
        choice = epsilon_greedy_slate(Scorer.score(q[0], float(v[0]), items), 5, 0.3, rng)
        clicks = np.array([rng.random() < (0.9 if i == best[c] else 0.05)
                           for i in choice.indices], dtype=np.float32)
        shown = np.concatenate([items[choice.indices], np.zeros((5, N_ITEM_FEATURES))], 1)
        slots = learner.add(np.repeat(states[c:c + 1], 5, 0), shown, clicks,
                            np.repeat(states[c:c + 1], 5, 0))
        assert learner.train(next_actions, slots)
    scorer = Scorer(learner.online, 1)
    q, v = scorer.query(states)
    greedy_top = np.argmax(q[:, :d] @ items.T, axis=1)
    return float(np.mean(greedy_top == best))


def test_learning_finds_each_contexts_best_item():
    trained = np.mean([_run_synthetic(True, seed=s) for s in (0, 1)])
    untrained = np.mean([_run_synthetic(False, seed=s) for s in (0, 1)])
    assert trained >= 0.8, trained           # random would be 1/40
    assert untrained <= 0.35, untrained


def test_non_finite_update_is_rolled_back():
    layout = StateLayout(8)
    learner = DQNLearner(layout.size, 8, DQNConfig(batch_size=4, hidden=16))
    rng = np.random.default_rng(0)
    s = rng.standard_normal((4, layout.size)).astype(np.float32)
    a = np.concatenate([unit(rng, 4, 8), np.zeros((4, N_ITEM_FEATURES))], 1).astype(np.float32)
    learner.add(s, a, np.ones(4, dtype=np.float32), s)
    good = {k: v.clone() for k, v in learner.online.state_dict().items()}
    # inject a poisoned transition: an infinite reward drives the weights non-finite
    learner.add(s[:1], a[:1], np.array([np.inf], dtype=np.float32), s[:1])
    ok = learner.train(lambda q: (np.repeat(a[:1, :8], len(q), 0), np.ones(len(q), bool)),
                       np.array([4]), steps=1)
    assert not ok and learner.rejected_updates == 1
    now = learner.online.state_dict()
    assert all(torch.equal(now[k], good[k]) for k in good)
    assert all(torch.isfinite(p).all() for p in learner.online.parameters())


def test_exposure_features_mark_recently_ignored_items():
    # three slates (t=50, 100, 190), oldest first; "c" was clicked
    shown = [("c", 50.0), ("a", 100.0), ("b", 100.0), ("a", 190.0)]
    f = exposure_features(["x", "a", "b", "c"], shown, touched={"c"}, now=200.0,
                          recent_s=100.0)
    assert f[0].tolist() == [0.0, 0.0]                      # never shown
    assert f[3].tolist() == [0.0, 0.0]                      # shown but clicked: not ignored
    # "a": on the last slate (10 s ago) and the one before (100 s ago)
    assert np.isclose(f[1, 0], np.exp(-0.1) + STEP_DECAY * np.exp(-1.0))
    assert np.isclose(f[2, 0], STEP_DECAY * np.exp(-1.0))  # "b": the slate before only
    assert f[1, 1] > f[2, 1] > 0                             # shown twice vs once


def test_exposure_counts_slates_not_seconds():
    """The same three slates fade alike whether they came a second or a minute apart:
    "just shown" means the last screen, at any pace of requests."""
    for gap in (1.0, 60.0):
        shown = [("a", 0.0), ("b", gap), ("c", 2 * gap)]
        f = exposure_features(["a", "b", "c"], shown, touched=set(), now=2 * gap,
                              recent_s=1e9)
        assert np.allclose(f[:, 0], [STEP_DECAY ** 2, STEP_DECAY, 1.0])


def test_repeat_features_mark_what_the_user_liked_before():
    f = repeat_features(["x", "a", "b"], ["a", "b", "a"])  # oldest first
    assert f[0].tolist() == [0.0, 0.0]
    assert np.isclose(f[1, 0], 1.0 + STEP_DECAY ** 2)  # the latest and the third latest
    assert np.isclose(f[2, 0], STEP_DECAY)
    assert f[1, 1] > f[2, 1] > 0


def test_learning_uses_exposure_features():
    """Items that never get clicked again once shown: the network learns to avoid
    re-showing them through the exposure features alone."""
    rng = np.random.default_rng(0)
    d = 8
    layout = StateLayout(d)
    learner = DQNLearner(layout.size, d, DQNConfig(gamma=0.0, lr=3e-3, batch_size=64,
                                                   steps_per_batch=4, hidden=32))
    state = build_state(layout, unit(rng, 1, d)[0], np.zeros((0, d)), np.zeros((0, d)), None)
    items = unit(rng, 200, d)
    for _ in range(300):
        idx = rng.choice(200, 8, replace=False)
        fresh = rng.random(8) < 0.5
        feats = np.zeros((8, N_ITEM_FEATURES), np.float32)
        feats[~fresh, :2] = [1.0, 0.3]
        clicks = (fresh & (rng.random(8) < 0.5)).astype(np.float32)
        slots = learner.add(np.repeat(state[None], 8, 0),
                            np.concatenate([items[idx], feats], 1), clicks,
                            np.repeat(state[None], 8, 0))
        learner.train(lambda q: (items[np.argmax(q @ items.T, 1)], np.ones(len(q), bool)),
                      slots)
    q, v = Scorer(learner.online, 1).query(state[None])
    fresh = np.zeros((200, N_ITEM_FEATURES), np.float32)
    stale = fresh.copy()
    stale[:, :2] = [1.0, 0.3]
    fresh_scores = Scorer.score(q[0], float(v[0]), items, fresh)
    stale_scores = Scorer.score(q[0], float(v[0]), items, stale)
    assert (fresh_scores - stale_scores).mean() > 0.2


def test_popularity_features_start_at_the_prior_and_follow_counts():
    from models.state import popularity_features

    f = popularity_features(np.array([[0, 0], [1000, 100], [1000, 0]], np.float32))
    assert np.allclose(f[0], 0.0, atol=1e-6)
    assert f[1, 0] > 1.0 and f[2, 0] < -1.0 and f[1, 1] == f[2, 1] > 0


def test_popularity_is_clicks_over_what_the_context_made_likely():
    """Two items with the same CTR: one shown where anything gets clicked (right after
    a related click, in the top slot), one shown where clicks are rare. The second
    engages more than its contexts explain, so its lift is higher; the first earned
    what was expected of it, so its lift is about 0."""
    from models.state import popularity_features

    stats = np.array([[1000, 100, 1000 * 0.10], [1000, 100, 1000 * 0.02]], np.float32)
    f = popularity_features(stats, 0.05)
    assert abs(f[0, 0]) < 0.05 and f[1, 0] > 1.0
    assert f[0, 1] == f[1, 1]  # as often shown
    # scaled: a policy that expects half the clicks it gets lifts nothing for that
    assert np.allclose(popularity_features(stats * [1, 1, 0.5], 0.05, expected_scale=2.0),
                       f, atol=1e-5)
    # RECSVC_POPULARITY_LIFT=ctr: the expectations are there but not read; both items
    # have the same smoothed CTR, so the same lift
    ctr = popularity_features(stats, 0.05, expected_scale=None)
    assert np.allclose(ctr, popularity_features(stats[:, :2], 0.05))
    assert ctr[0, 0] == ctr[1, 0] > 0.5


def test_affinity_features_compare_candidates_with_recent_history():
    from models.state import affinity_features

    items = np.eye(4, dtype=np.float32)
    f = affinity_features(items, positive=items[[0]], negative=items[[1, 2]])
    assert f[:, 0].tolist() == [1, 0, 0, 0] and f[:, 1].tolist() == [0, 1, 1, 0]
    assert affinity_features(items, items[:0], items[:0]).sum() == 0


def test_tag_affinity_features_follow_the_latest_clicks_and_ignores():
    from models.state import tag_affinity_features, tag_vectors

    cands = tag_vectors([["Comedy"], ["drama"], ["comedy", "Romance"], []]).astype(np.float32)
    clicked = tag_vectors([["drama"], ["comedy"]]).astype(np.float32)  # comedy is newest
    ignored = tag_vectors([["romance"]]).astype(np.float32)
    f = tag_affinity_features(cands, clicked, ignored, decay=0.5)
    # profile over clicks: comedy weight 1, drama 0.5 -> unit (1, 0.5) / sqrt(1.25)
    assert np.allclose(f[:, 0], [1 / np.sqrt(1.25), 0.5 / np.sqrt(1.25),
                                 1 / np.sqrt(2) / np.sqrt(1.25), 0.0], atol=1e-6)
    assert np.allclose(f[:, 1], [0.0, 0.0, 1 / np.sqrt(2), 0.0], atol=1e-6)
    assert f[0, 0] > f[1, 0]  # the newer click counts more
    none = tag_affinity_features(cands, clicked[:0], ignored[:0])
    assert none.shape == (4, 2) and not none.any()
    # hashing is case-insensitive and the same in every process
    assert (tag_vectors([["Comedy"]]) == tag_vectors([["comedy"]])).all()


def _resident_fraction(array: np.ndarray) -> float:
    """Fraction of an array's pages that are in memory, asked of the kernel (mincore).

    Asking per page, rather than comparing the process's RSS before and after,
    keeps the answer true when the allocator reuses memory freed by earlier tests.
    """
    import ctypes

    page = os.sysconf("SC_PAGE_SIZE")
    address = array.ctypes.data
    start = address - address % page
    length = address + array.nbytes - start
    pages = (length + page - 1) // page
    vector = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vector) != 0:
        pytest.skip(f"mincore failed: errno {ctypes.get_errno()}")
    return sum(v & 1 for v in vector) / pages


@pytest.mark.skipif(sys.platform != "linux", reason="needs Linux mincore")
def test_prefaulted_replay_buffer_is_resident_before_any_transition():
    """A service's memory must not climb by the buffer's size under its first traffic."""
    eager = DQNLearner(64, 256, DQNConfig(buffer_size=40_000, prefault_buffer=True))
    assert eager.buffer.nbytes > 40_000 * 64 * 4 * 2
    for array in (eager.buffer.states, eager.buffer.next_states, eager.buffer.actions):
        assert _resident_fraction(array) == 1.0
    assert len(eager.buffer) == 0 and not eager.buffer.states.any()


def test_weights_of_another_shape_are_refused_not_loaded():
    """Weights published by a release with another feature layout: the learner keeps
    its own instead of failing on them."""
    layout = StateLayout(8)
    learner = DQNLearner(layout.size, 8, DQNConfig(hidden=16))
    before = {k: v.clone() for k, v in learner.online.state_dict().items()}
    older = QNetwork(layout.size, 8, hidden=16, item_features=N_ITEM_FEATURES - 1)
    assert learner.load_published(weights_to_bytes(older)) is None
    assert all(torch.equal(learner.online.state_dict()[k], before[k]) for k in before)
    same = QNetwork(layout.size, 8, hidden=16)
    torch.nn.init.normal_(same.value_head.bias)
    assert learner.load_published(weights_to_bytes(same)) is not None
    assert torch.equal(learner.online.value_head.bias, same.value_head.bias)


def _train_shop(weights: tuple[float, ...], rounds: int = 300, seed: int = 0):
    """A shop with 'bait' items (clicked half the time, never bought) and 'goods'
    (clicked a quarter of the time, bought on 80% of clicks). Heads: click and
    purchase; transitions as the learner worker makes them: a feedback event trains its
    head, and the closed window trains each head that got no event towards 0."""
    rng = np.random.default_rng(seed)
    d = 32  # more dimensions than items: any per-item value is linear in the embedding
    layout = StateLayout(d)
    items = unit(rng, 20, d)
    bait, goods = set(range(10)), set(range(10, 20))
    learner = DQNLearner(layout.size, d, DQNConfig(gamma=0.0, lr=3e-3, batch_size=64,
                                                   steps_per_batch=4, hidden=32, seed=seed,
                                                   heads=2, head_weights=weights))
    state = build_state(layout, unit(rng, 1, d)[0], np.zeros((0, d)), np.zeros((0, d)), None)
    for _ in range(rounds):
        rewards, masks, shown = [], [], []
        for i in rng.choice(20, 6, replace=False):
            clicked = rng.random() < (0.5 if i in bait else 0.25)
            bought = clicked and i in goods and rng.random() < 0.8
            if clicked:
                rewards.append([1.0, 0.0]), masks.append([1.0, 0.0]), shown.append(i)
            if bought:
                rewards.append([0.0, 1.0]), masks.append([0.0, 1.0]), shown.append(i)
            silent = [not clicked, not bought]
            if any(silent):
                rewards.append([0.0, 0.0]), masks.append(silent), shown.append(i)
        n = len(shown)
        actions = np.concatenate([items[shown], np.zeros((n, N_ITEM_FEATURES))], 1)
        slots = learner.add(np.repeat(state[None], n, 0), actions.astype(np.float32),
                            np.array(rewards, np.float32), np.repeat(state[None], n, 0),
                            mask=np.array(masks, np.float32))
        assert learner.train(lambda q: (items[np.argmax(q @ items.T, 1)],
                                        np.ones(len(q), bool)), slots)
    return learner, state, items, bait, goods


def _top5(net: QNetwork, state: np.ndarray, items: np.ndarray) -> set[int]:
    q, v = Scorer(net, 1).query(state[None])
    return set(np.argsort(-Scorer.score(q[0], float(v[0]), items))[:5].tolist())


def test_head_weights_trade_clicks_for_purchases_without_retraining():
    learner, state, items, bait, goods = _train_shop((1.0, 0.0))
    net = learner.online
    # each head learned its own objective: clicks 0.5 vs 0.25, purchases 0 vs 0.2
    with torch.no_grad():
        a = torch.from_numpy(np.concatenate([items, np.zeros((20, N_ITEM_FEATURES))], 1)
                             .astype(np.float32))
        q = net.q_heads_of_actions(torch.from_numpy(np.repeat(state[None], 20, 0)), a).numpy()
    b, g = sorted(bait), sorted(goods)
    assert q[b, 0].mean() > q[g, 0].mean() + 0.1
    assert q[g, 1].mean() > q[b, 1].mean() + 0.1
    assert len(_top5(net, state, items) & bait) >= 4          # ranked by clicks
    net.set_head_weights([1.0, 3.0])            # the same network, ranked by value:
    assert len(_top5(net, state, items) & goods) >= 4         # 0.25 + 3 * 0.2 > 0.5


def test_one_head_network_is_the_single_objective_network():
    """A one-head network loads weights saved before heads existed and scores as before."""
    torch.manual_seed(0)
    net = QNetwork(StateLayout(8).size, 8, hidden=16)
    assert net.heads == net.shape[4] == 1
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()}["query_head.weight"] == (8, 16)
    two = QNetwork(StateLayout(8).size, 8, hidden=16, heads=2)
    for p in two.parameters():
        torch.nn.init.normal_(p, std=0.1)
    two.set_head_weights([0.5, 2.0])
    x = torch.randn(3, two.state_dim)
    queries, values = two.forward_heads(x)
    query, value = two(x)
    assert torch.allclose(query, 0.5 * queries[:, 0] + 2.0 * queries[:, 1], atol=1e-5)
    assert torch.allclose(value, 0.5 * values[:, 0] + 2.0 * values[:, 1], atol=1e-5)
    again = split_weights(weights_to_bytes(two))[0]
    assert again.shape == two.shape
    assert torch.allclose(again.forward_heads(x)[0], queries)
    with pytest.raises(ValueError):
        two.set_head_weights([1.0])


def test_steps_per_transition_do_not_depend_on_how_often_rounds_run():
    """The same 960 transitions owe the same gradient steps whether they arrive in 96
    rounds of 10 or 3 rounds of 320: owed fractions carry over between rounds."""
    rng = np.random.default_rng(11)
    d = 8
    layout = StateLayout(d)
    items = unit(rng, 50, d)
    counts = []
    for per_round in (10, 320):
        learner = DQNLearner(layout.size, d, DQNConfig(batch_size=32, replay_ratio=3.0,
                                                       steps_per_batch=0, hidden=16))
        for _ in range(960 // per_round):
            s = rng.standard_normal((per_round, layout.size)).astype(np.float32)
            a = np.concatenate([items[rng.integers(0, 50, per_round)],
                                np.zeros((per_round, N_ITEM_FEATURES))], 1)
            slots = learner.add(s, a.astype(np.float32), np.zeros(per_round, np.float32), s)
            learner.train(lambda q: (items[np.argmax(q @ items.T, 1)], np.ones(len(q), bool)),
                          slots)
        counts.append(learner.updates)
    assert counts == [180, 180]  # 3 x 960 / 16


def test_a_round_over_its_step_cap_drops_the_excess_instead_of_carrying_it():
    """Under more traffic than it can train on, the learner learns less per event but
    stays current: steps owed beyond ``max_steps`` are not carried into later rounds."""
    rng = np.random.default_rng(12)
    d = 8
    layout = StateLayout(d)
    items = unit(rng, 50, d)
    learner = DQNLearner(layout.size, d, DQNConfig(batch_size=32, replay_ratio=3.0,
                                                   steps_per_batch=0, hidden=16))

    def round_of(n: int) -> int:
        before = learner.updates
        s = rng.standard_normal((n, layout.size)).astype(np.float32)
        a = np.concatenate([items[rng.integers(0, 50, n)], np.zeros((n, N_ITEM_FEATURES))], 1)
        slots = learner.add(s, a.astype(np.float32), np.zeros(n, np.float32), s)
        learner.train(lambda q: (items[np.argmax(q @ items.T, 1)], np.ones(len(q), bool)),
                      slots, max_steps=8)
        return learner.updates - before

    assert round_of(320) == 8  # owes 60
    assert round_of(16) == 3   # owes 3: nothing left over from the first round
