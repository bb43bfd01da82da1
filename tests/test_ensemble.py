"""The fused ensemble: LinUCB learns, fusion weights follow the agents' rewards, the
fused policy's propensities stay exact, and its state travels with the weights."""

import numpy as np
import pytest

from models.ensemble import (
    AGENTS,
    N_LINEAR,
    EnsembleLearner,
    EnsembleParams,
    default_params,
    linear_features,
    params_from_tensors,
    standardise,
    top_k_masks,
)
from models.exploration import epsilon_greedy_slate
from models.qnet import QNetwork, extra_tensors, weights_from_bytes, weights_to_bytes
from models.state import N_ITEM_FEATURES, StateLayout


def test_linucb_learns_a_linear_reward_and_its_uncertainty_shrinks():
    rng = np.random.default_rng(0)
    truth = rng.standard_normal(N_LINEAR) * 0.3
    learner = EnsembleLearner()
    x_new = rng.standard_normal((50, N_LINEAR))
    width_before = np.einsum("ni,ij,nj->n", x_new, learner.params().a_inv, x_new).mean()
    for _ in range(40):
        x = rng.standard_normal((50, N_LINEAR))
        learner.update(x, x @ truth + 0.1 * rng.standard_normal(50), np.zeros(50, np.int64))
    p = learner.params()
    assert np.abs(p.theta - truth).max() < 0.05
    assert np.einsum("ni,ij,nj->n", x_new, p.a_inv, x_new).mean() < 0.01 * width_before
    # no agent was credited: the fusion weights stay equal
    assert np.allclose(p.weights, 1 / len(AGENTS))


def test_fusion_weights_move_to_the_agent_whose_picks_earn():
    learner = EnsembleLearner()
    rng = np.random.default_rng(1)
    x = np.zeros((300, N_LINEAR))
    for _ in range(10):
        masks = rng.integers(0, 8, 300)              # which agents picked each shown item
        popular = (masks >> 1) & 1                   # the popularity agent's picks ...
        rewards = (rng.random(300) < np.where(popular, 0.15, 0.02)).astype(float)
        learner.update(x, rewards, masks)            # ... are clicked far more often
    w = learner.params().weights
    assert w[AGENTS.index("popularity")] > 0.6 and abs(w.sum() - 1) < 1e-9
    assert all(v > 0 for v in w)                     # none is ever switched off


def test_top_k_masks_credit_each_agent_for_its_own_top_k():
    scores = np.array([[5, 4, 3, 2, 1], [1, 2, 3, 4, 5], [0, 0, 9, 0, 8]], float)
    # chosen: candidates 0, 4, 2; k = 2 -> q's top {0,1}, popularity's {4,3}, linear's {2,4}
    assert top_k_masks(scores, np.array([0, 4, 2]), 2) == [0b001, 0b110, 0b100]


def test_serving_fast_paths_match_the_straightforward_ones():
    """Serving scores one state against all candidates with matrix products; the
    learner's row-wise path, a per-agent standardise and a per-agent top-k set are
    what those must equal."""
    rng = np.random.default_rng(5)
    layout = StateLayout(16)
    items = rng.standard_normal((40, 16)).astype(np.float32)
    feats = rng.standard_normal((40, N_ITEM_FEATURES)).astype(np.float32)
    state = rng.standard_normal(layout.size).astype(np.float32)
    one = linear_features(layout, state, items, feats)
    rowwise = linear_features(layout, np.repeat(state[None], 40, 0), items, feats)
    assert np.allclose(one, rowwise, atol=1e-5)
    agents = np.stack([rng.standard_normal(40), np.full(40, 0.3), rng.standard_normal(40)])
    params = EnsembleParams(np.eye(N_LINEAR), np.zeros(N_LINEAR), np.array([0.5, 0.2, 0.3]))
    assert np.allclose(params.fuse(agents), sum(w * standardise(a) for w, a in
                                                zip(params.weights, agents, strict=True)))
    chosen = rng.choice(40, 10, replace=False)
    scored = agents[[0, 2]]  # no ties: each top-10 set is unambiguous
    tops = [set(np.argsort(-a)[:10].tolist()) for a in scored]
    expected = [sum(1 << bit for bit, top in enumerate(tops) if c in top)
                for c in chosen.tolist()]
    assert top_k_masks(scored, chosen, 10) == expected


def test_fused_policy_logs_exact_propensities():
    rng = np.random.default_rng(2)
    layout = StateLayout(8)
    items = rng.standard_normal((30, 8)).astype(np.float32)
    feats = rng.standard_normal((30, N_ITEM_FEATURES)).astype(np.float32)
    state = rng.standard_normal(layout.size).astype(np.float32)
    params = EnsembleParams(np.eye(N_LINEAR), rng.standard_normal(N_LINEAR),
                            np.array([0.5, 0.2, 0.3]))
    agents = params.agent_scores(layout, state, items, feats, rng.standard_normal(30))
    fused = params.fuse(agents)
    assert np.allclose(fused, sum(w * standardise(a) for w, a in zip(params.weights, agents,
                                                                      strict=True)))
    x = linear_features(layout, state, items, feats)
    assert np.allclose(agents[2], x @ params.theta + 0.5 * np.linalg.norm(x, axis=1),
                       atol=1e-5)
    # the slate is epsilon-greedy over the fused scores: its propensities are that
    # policy's, which a direct count over many draws reproduces
    draws = [epsilon_greedy_slate(fused, 1, 0.3, np.random.default_rng(s)).indices[0]
             for s in range(4000)]
    best = int(np.argmax(fused))
    logged = epsilon_greedy_slate(fused, 1, 0.3, np.random.default_rng(0))
    assert np.mean(np.array(draws) == best) == pytest.approx(0.7 + 0.3 / 30, abs=0.025)
    assert logged.propensities[0] in (pytest.approx(0.7 + 0.3 / 30), pytest.approx(0.3 / 30))


def test_ensemble_state_travels_in_the_weights_blob():
    net = QNetwork(StateLayout(8).size, 8, hidden=16)
    learner = EnsembleLearner()
    rng = np.random.default_rng(3)
    learner.update(rng.standard_normal((20, N_LINEAR)), rng.random(20),
                   rng.integers(0, 8, 20))
    blob = weights_to_bytes(net, learner.tensors())
    again = weights_from_bytes(blob)                  # the network loads as before
    assert again.shape == net.shape
    served = params_from_tensors(extra_tensors(blob))
    assert np.allclose(served.theta, learner.params().theta)
    assert np.allclose(served.weights, learner.params().weights)
    resumed = EnsembleLearner()
    assert resumed.load(extra_tensors(blob))
    assert np.allclose(resumed.a, learner.a) and np.allclose(resumed.count, learner.count)
    assert params_from_tensors(extra_tensors(weights_to_bytes(net))) is None
    assert np.allclose(default_params().weights, 1 / len(AGENTS))


def test_the_fused_service_learns_from_feedback_and_serves_its_weights(backend, encoder):
    """RECSVC_ENSEMBLE=true over HTTP: greedy slates are the fused ranking, and always
    clicking the item it ranks last brings that item to the top, with the learned
    ensemble state published and served with the weights."""
    from tests.test_api import MOVIES, make_client, recommend, wait_for

    with make_client(backend, encoder, ensemble=True) as c:
        assert c.post("/v1/items", json={"items": [{"item_id": i, "text": t}
                                                   for i, t in MOVIES]}).status_code == 200
        greedy = recommend(c, user="probe", k=10, explore=False, exclude_seen=False)["items"]
        assert [i["propensity"] for i in greedy] == [1.0] * 10
        assert [i["score"] for i in greedy] == sorted((i["score"] for i in greedy),
                                                      reverse=True)
        target = greedy[-1]["item_id"]
        for n in range(120):
            slate = recommend(c, user=f"fan-{n % 7}", k=10, exclude_seen=False)
            assert c.post("/v1/feedback", json={"request_id": slate["request_id"],
                                                "item_id": target,
                                                "event": "click"}).status_code == 202
        model = wait_for(lambda: (m := c.get("/v1/model").json())["feedback_learned"] >= 120
                         and m["pending_impressions"] == 0 and m)
        wait_for(lambda: recommend(c, user="probe", k=10, explore=False,
                                   exclude_seen=False)["model_version"] >= model["version"])
        after = [i["item_id"] for i in recommend(c, user="probe", k=10, explore=False,
                                                 exclude_seen=False)["items"]]
        assert after.index(target) <= 1, after
        # LinUCB's state is the learner's, served with the weights. (With k equal to the
        # catalog every agent's top-k is every item, so all are credited alike here and
        # the fusion weights stay equal; the fusion test above covers their learning.)
        served = c.app.state.engine.scorer.ensemble
        assert served is not None and np.abs(served.theta).sum() > 0
        assert not np.allclose(served.a_inv, np.eye(N_LINEAR))
