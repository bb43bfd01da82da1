"""The fused ensemble: the logistic agent learns, fusion weights follow the agents'
estimated values, the fused policy's propensities stay exact, and its state travels
with the weights."""

import numpy as np
import pytest

from models.ensemble import (
    AGENTS,
    N_LINEAR,
    SOURCES,
    EnsembleLearner,
    EnsembleParams,
    ValueEstimates,
    default_params,
    linear_features,
    params_from_tensors,
    report_from_tensors,
    standardise,
    top_k_masks,
)
from models.exploration import epsilon_greedy_slate
from models.qnet import QNetwork, split_weights, weights_to_bytes
from models.state import N_ITEM_FEATURES, StateLayout


def test_the_logistic_agent_learns_log_odds_and_its_uncertainty_shrinks():
    rng = np.random.default_rng(0)
    truth = rng.standard_normal(N_LINEAR) * 0.5
    truth[-1] = -2.0  # a rare positive, as clicks are
    learner = EnsembleLearner()
    x_new = rng.standard_normal((50, N_LINEAR))
    width_before = np.einsum("ni,ij,nj->n", x_new, learner.params().a_inv, x_new).mean()
    for _ in range(200):
        x = rng.standard_normal((100, N_LINEAR))
        x[:, -1] = 1.0
        clicked = rng.random(100) < 1 / (1 + np.exp(-(x @ truth)))
        learner.update(x, clicked.astype(float), np.zeros(100, np.int64))
    p = learner.params()
    assert np.abs(p.theta - truth).max() < 0.15
    assert np.einsum("ni,ij,nj->n", x_new, p.a_inv, x_new).mean() < 0.02 * width_before
    # no agent was credited: the fusion weights stay equal
    assert np.allclose(p.weights, 1 / len(AGENTS))


def test_the_slot_is_not_mistaken_for_appeal():
    """Position bias lowers the clicks of items shown low; an item feature that merely
    goes with being shown low must not take the blame."""
    rng = np.random.default_rng(4)
    learner = EnsembleLearner()
    for _ in range(150):
        slots = rng.integers(0, 10, 200).astype(float)
        x = np.zeros((200, N_LINEAR))
        x[:, 0] = slots / 10 + 0.1 * rng.standard_normal(200)  # shown low <-> feature high
        x[:, -1] = 1.0
        p = 0.2 / (1 + slots)  # only the position matters
        learner.update(x, (rng.random(200) < p).astype(float), np.zeros(200, np.int64),
                       slots=slots)
    assert abs(learner.params().theta[0]) < 0.3


def test_fusion_weights_move_to_the_agent_whose_picks_earn():
    learner = EnsembleLearner()
    rng = np.random.default_rng(1)
    x = np.zeros((300, N_LINEAR))
    for _ in range(10):
        masks = rng.integers(0, 8, 300)              # which agents picked each shown item
        popular = (masks >> 1) & 1                   # the popularity agent's picks ...
        rewards = (rng.random(300) < np.where(popular, 0.15, 0.02)).astype(float)
        learner.update(x, rewards, masks, np.full(300, 0.9))  # ... are clicked far more often
    w = learner.params().weights
    assert w[AGENTS.index("popularity")] > 0.9 and abs(w.sum() - 1) < 1e-9
    assert all(v > 0 for v in w)                     # none is ever switched off
    report = learner.report()
    assert report["agents"]["popularity"]["value"] > 0.1 > report["agents"]["q"]["value"]


def test_agents_within_noise_share_the_weight():
    """Two agents whose picks earn the same, on little evidence: neither takes over."""
    learner = EnsembleLearner()
    rng = np.random.default_rng(6)
    masks = rng.choice([1, 2], 200)                  # q's and popularity's picks alike
    learner.update(np.zeros((200, N_LINEAR)), (rng.random(200) < 0.1).astype(float), masks,
                   np.full(200, 0.9))
    w = learner.params().weights
    assert w[0] > 0.2 and w[1] > 0.2


def test_explored_picks_weigh_more_than_greedy_ones():
    """The value estimate is importance-weighted by the logged propensities: an agent
    whose items only the exploration placed is judged on them, not drowned by the
    greedy picks of another."""
    est = ValueEstimates(2)
    # agent 0: 500 greedy picks (p = 0.95) at 5%; agent 1: 40 explored picks (p = 0.01) at 20%
    rng = np.random.default_rng(7)
    bits = np.r_[np.full(500, 1), np.full(40, 2)]
    props = np.r_[np.full(500, 0.95), np.full(40, 0.01)]
    rewards = np.r_[rng.random(500) < 0.05, rng.random(40) < 0.2].astype(float)
    est.update(bits, rewards, props)
    value, se = est.values()
    assert value[1] > value[0]
    assert se[1] > se[0]  # fewer items, however weighted: less sure


@pytest.mark.parametrize("passed_over_again", [True, False])
def test_resting_is_learned_from_whether_re_shown_items_are_taken(passed_over_again):
    """Items the user just passed over rest only once the logistic agent has seen that
    re-shown items are passed over again; where users take them as often as anything
    else, nothing rests. Before any evidence, nothing does."""
    from app.server.engine import Engine
    from models.qnet import Scorer
    from models.state import FEATURE_GROUPS

    net = QNetwork(StateLayout(8).size, 8, hidden=16)
    assert not Engine._resting_pays(Scorer(net, 0, ensemble=default_params()))
    assert Engine._resting_pays(Scorer(net, 0))  # no ensemble: always, as configured
    learner = EnsembleLearner()
    rng = np.random.default_rng(9)
    j = FEATURE_GROUPS["exposure"].start
    for _ in range(30):
        x = np.zeros((200, N_LINEAR))
        x[:, -1] = 1.0
        re_shown = rng.random(200) < 0.3
        x[re_shown, j] = 1.0
        p = np.where(re_shown & passed_over_again, 0.01, 0.1)
        learner.update(x, (rng.random(200) < p).astype(float), np.zeros(200, np.int64))
    rests = Engine._resting_pays(Scorer(net, 1, ensemble=learner.params()))
    assert rests == passed_over_again


def test_source_reach_follows_how_deep_the_greedy_picks_come_from():
    """The query source's picks all come from its top 20, the related source's from all
    of its 150; explored picks, which say nothing of the policy's preferences, come
    from deep in the engaging source and do not count. The history source gave too few
    picks to tell."""
    learner = EnsembleLearner()
    rng = np.random.default_rng(8)
    for _ in range(20):
        sources = rng.choice([1, 2, 4], 400)
        depths = np.where(sources == 1, rng.integers(0, 20, 400),
                          np.where(sources == 2, rng.integers(0, 150, 400),
                                   rng.integers(0, 50, 400)))
        greedy = sources != 4
        learner.update(np.zeros((400, N_LINEAR)), np.zeros(400), np.zeros(400, np.int64),
                       np.full(400, 0.9), sources=sources, depths=depths.astype(float),
                       greedy=greedy)
    reach = dict(zip(SOURCES, learner.params().reach, strict=True))
    assert 16 <= reach["query"] <= 32 and 128 <= reach["related"] <= 256
    assert np.isnan(reach["engaging"]) and np.isnan(reach["history"])
    shown = learner.report()["sources"]
    assert shown["engaging"]["reach"] is None and shown["query"]["reach"] == reach["query"]


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
    assert np.allclose(agents[2], x @ params.theta + params.alpha * np.linalg.norm(x, axis=1),
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
                   rng.integers(0, 8, 20), rng.random(20), rng.integers(0, 10, 20),
                   rng.integers(0, 16, 20), rng.integers(0, 100, 20).astype(float),
                   rng.random(20) < 0.9)
    blob = weights_to_bytes(net, learner.tensors())
    again = split_weights(blob)[0]                  # the network loads as before
    assert again.shape == net.shape
    served = params_from_tensors(split_weights(blob)[1])
    assert np.allclose(served.theta, learner.params().theta)
    assert np.allclose(served.weights, learner.params().weights)
    assert np.allclose(served.reach, learner.params().reach, equal_nan=True)
    assert report_from_tensors(split_weights(blob)[1]) == learner.report()
    resumed = EnsembleLearner()
    assert resumed.load(split_weights(blob)[1])
    assert np.allclose(resumed.model.precision, learner.model.precision)
    assert np.allclose(resumed.values.sums, learner.values.sums)
    assert np.allclose(resumed.sources.sums, learner.sources.sums)
    assert params_from_tensors(split_weights(weights_to_bytes(net))[1]) is None
    assert np.allclose(default_params().weights, 1 / len(AGENTS))
    assert np.isnan(default_params().reach).all()


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
        # The logistic agent's state is the learner's, served with the weights, and
        # GET /v1/model shows every agent's and source's value. (With k equal to the
        # catalog every agent's top-k is every item, so all are credited alike here and
        # the fusion weights stay equal; the fusion test above covers their learning.)
        served = c.app.state.engine.scorer.ensemble
        assert served is not None and not np.allclose(served.theta, default_params().theta)
        assert not np.allclose(served.a_inv, default_params().a_inv)
        shown = c.get("/v1/model").json()
        assert set(shown["agents"]) == set(AGENTS) and set(shown["sources"]) == set(SOURCES)
        assert shown["agents"]["q"]["value"] > 0 and "weight" in shown["agents"]["q"]
        assert "reach" in shown["sources"]["query"]
