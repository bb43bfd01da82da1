"""The ensemble: the logistic agent learns, the arm that serves a request is drawn by
the arms' estimated values (each agent alone, or their fusion), the served policy's
propensities stay exact, and its state travels with the weights."""

import numpy as np
import pytest

from models.ensemble import (
    AGENTS,
    ARM_FLOOR,
    ARMS,
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
        learner.update(x, clicked.astype(float))
    p = learner.params()
    assert np.abs(p.theta - truth).max() < 0.15
    assert np.einsum("ni,ij,nj->n", x_new, p.a_inv, x_new).mean() < 0.02 * width_before
    # no arm served a slate: each is as likely to serve the next
    assert np.allclose(p.weights, 1 / len(ARMS))


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
        learner.update(x, (rng.random(200) < p).astype(float), slots=slots)
    assert abs(learner.params().theta[0]) < 0.3


def test_expected_clicks_leave_out_the_items_own_popularity_and_count_the_slot():
    """What a shown item was expected to earn: the logistic model's click probability
    from the user, the session and the slot, not from the item's own popularity
    (its popularity is measured against this)."""
    from models.state import FEATURE_GROUPS

    rng = np.random.default_rng(8)
    layout = StateLayout(8)
    learner = EnsembleLearner()
    for _ in range(100):
        slots = rng.integers(0, 10, 200).astype(float)
        x = np.zeros((200, N_LINEAR))
        x[:, 0] = rng.standard_normal(200)
        x[:, -1] = 1.0
        learner.update(x, (rng.random(200) < 0.2 / (1 + slots)).astype(float), slots=slots)
    params = learner.params()
    assert params.slot_weight < -0.5  # lower slots are clicked less
    state = rng.standard_normal(layout.size).astype(np.float32)
    items = rng.standard_normal((2, 8)).astype(np.float32)
    feats = np.zeros((2, N_ITEM_FEATURES), np.float32)
    feats[1, FEATURE_GROUPS["popularity"]] = [3.0, 1.0]  # only item 1 is popular
    top = params.expected_ctr(layout, state, items[[0, 0]], feats, np.array([0, 0]))
    assert np.isclose(top[0], top[1])  # its popularity left out
    x = linear_features(layout, state, items[[0]], feats[[0]])
    assert np.isclose(top[0], 1 / (1 + np.exp(-(x @ params.theta)[0])))
    low = params.expected_ctr(layout, state, items[[0]], feats[[0]], np.array([5]))
    assert low[0] < 0.7 * top[0]


def serve(learner: EnsembleLearner, rng: np.random.Generator, ctr: dict[str, float],
          slates: int = 300, k: int = 10) -> None:
    """``slates`` requests, each served by an arm drawn with the learner's current play
    probabilities, whose items are clicked at the arm's ``ctr`` (0.05 unless named)."""
    weights = learner.params().weights
    arms = rng.choice(len(ARMS), slates, p=weights)
    rates = np.array([ctr.get(a, 0.05) for a in ARMS])
    learner.update_arms(arms, weights[arms],
                        [(rng.random(k) < rates[a]).astype(float) for a in arms])


def test_the_arm_whose_slates_earn_serves_most_requests():
    learner = EnsembleLearner()
    rng = np.random.default_rng(1)
    for _ in range(10):
        serve(learner, rng, {"popularity": 0.15})
    w = learner.params().weights
    assert w[ARMS.index("popularity")] > 0.9 and abs(w.sum() - 1) < 1e-9
    assert all(v >= ARM_FLOOR for v in w)           # none is ever switched off
    report = learner.report()
    assert set(report["agents"]) == set(ARMS)
    assert report["agents"]["popularity"]["value"] > 0.1 > report["agents"]["q"]["value"]


def test_arms_within_noise_share_the_requests():
    """Arms whose slates earn the same, on little evidence: none takes over."""
    learner = EnsembleLearner()
    serve(learner, np.random.default_rng(6), {}, slates=40)
    w = learner.params().weights
    assert (w > 0.1).all()


def test_an_arm_is_not_credited_with_the_traffic_of_the_hours_it_served():
    """The traffic's CTR moves over time. An arm played mostly while it is high must
    not look better than one played mostly while it is low: each slate weighs by the
    inverse of the probability its arm was drawn with. The errors count slates, not
    items: a slate's clicks go together."""
    est = ValueEstimates(2, horizon=1e9, max_weight=50.0)
    rng = np.random.default_rng(3)
    k = 10
    for period, (ctr, share0) in enumerate([(0.3, 0.9), (0.05, 0.1)]):
        arms = (rng.random(2000) >= share0).astype(np.int64)  # arm 0 with share0
        props = np.where(arms == 0, share0, 1 - share0)
        clicks = rng.random((2000, k)) < ctr                    # both arms alike
        est.update(np.repeat(1 << arms, k), clicks.ravel().astype(float),
                   np.repeat(props, k), np.repeat(np.arange(2000) + 2000 * period, k))
    value, se = est.values()
    assert abs(value[0] - value[1]) < 3 * np.hypot(se[0], se[1])
    assert value[0] == pytest.approx(0.175, abs=0.02)
    # counted per item, the error would be about 0.0035 (1.6 times smaller)
    assert se[0] > 0.0045


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
    from models.scorer import Scorer
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
        learner.update(x, (rng.random(200) < p).astype(float))
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
        learner.update(np.zeros((400, N_LINEAR)), np.zeros(400),
                       np.full(400, 0.9), sources=sources, depths=depths.astype(float),
                       greedy=greedy)
    reach = dict(zip(SOURCES, learner.params().reach, strict=True))
    assert 16 <= reach["query"] <= 32 and 128 <= reach["related"] <= 256
    assert np.isnan(reach["engaging"]) and np.isnan(reach["history"])
    shown = learner.report()["sources"]
    assert shown["engaging"]["reach"] is None and shown["query"]["reach"] == reach["query"]


def test_serving_fast_paths_match_the_straightforward_ones():
    """Serving scores one state against all candidates with matrix products; the
    learner's row-wise path and a per-agent standardise are what those must equal."""
    rng = np.random.default_rng(5)
    layout = StateLayout(16)
    items = rng.standard_normal((40, 16)).astype(np.float32)
    feats = rng.standard_normal((40, N_ITEM_FEATURES)).astype(np.float32)
    state = rng.standard_normal(layout.size).astype(np.float32)
    one = linear_features(layout, state, items, feats)
    rowwise = linear_features(layout, np.repeat(state[None], 40, 0), items, feats)
    assert np.allclose(one, rowwise, atol=1e-5)
    agents = np.stack([rng.standard_normal(40), np.full(40, 0.3), rng.standard_normal(40)])
    fused = EnsembleParams.arm_scores(agents, ARMS.index("fused"))
    q, linear = AGENTS.index("q"), AGENTS.index("linear")
    assert np.allclose(fused, (standardise(agents[q]) + standardise(agents[linear])) / 2)
    for arm in range(len(AGENTS)):  # an agent's arm ranks by that agent alone
        assert np.array_equal(EnsembleParams.arm_scores(agents, arm), agents[arm])


def test_the_served_policy_logs_exact_propensities():
    rng = np.random.default_rng(2)
    layout = StateLayout(8)
    items = rng.standard_normal((30, 8)).astype(np.float32)
    feats = rng.standard_normal((30, N_ITEM_FEATURES)).astype(np.float32)
    state = rng.standard_normal(layout.size).astype(np.float32)
    params = EnsembleParams(np.eye(N_LINEAR), rng.standard_normal(N_LINEAR),
                            np.array([0.1, 0.3, 0.2, 0.4]))
    agents = params.agent_scores(layout, state, items, feats, rng.standard_normal(30))
    fused = params.arm_scores(agents, ARMS.index("fused"))
    # arms are drawn with the play probabilities; without exploration the likeliest
    arms = [params.draw_arm(np.random.default_rng(s)) for s in range(4000)]
    assert np.bincount(arms, minlength=len(ARMS)) / 4000 == pytest.approx(params.weights,
                                                                           abs=0.025)
    assert params.greedy_arm() == ARMS.index("fused")  # the likeliest best
    tie = EnsembleParams(params.a_inv, params.theta, np.full(len(ARMS), 1 / len(ARMS)))
    assert tie.greedy_arm() == ARMS.index("fused")     # a tie goes to the fusion
    x = linear_features(layout, state, items, feats)
    assert np.allclose(agents[2], x @ params.theta + params.alpha * np.linalg.norm(x, axis=1),
                       atol=1e-5)
    # the slate is epsilon-greedy over the arm's scores: its propensities are that
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
                   rng.random(20), rng.integers(0, 10, 20),
                   rng.integers(0, 16, 20), rng.integers(0, 100, 20).astype(float),
                   rng.random(20) < 0.9)
    learner.update_arms(np.array([0, 3, 3]), np.array([0.2, 0.5, 0.5]),
                        [rng.random(10), rng.random(10), rng.random(4)])
    blob = weights_to_bytes(net, learner.tensors())
    again = split_weights(blob)[0]                  # the network loads as before
    assert again.shape == net.shape
    served = params_from_tensors(split_weights(blob)[1])
    assert np.allclose(served.theta, learner.params().theta)
    assert np.allclose(served.weights, learner.params().weights)
    assert np.allclose(served.reach, learner.params().reach, equal_nan=True)
    assert served.slot_weight == learner.params().slot_weight == learner.model.mean[-1]
    assert report_from_tensors(split_weights(blob)[1]) == learner.report()
    resumed = EnsembleLearner()
    assert resumed.load(split_weights(blob)[1])
    assert np.allclose(resumed.model.precision, learner.model.precision)
    assert np.allclose(resumed.values.sums, learner.values.sums)
    assert np.allclose(resumed.sources.sums, learner.sources.sums)
    assert params_from_tensors(split_weights(weights_to_bytes(net))[1]) is None
    assert np.allclose(default_params().weights, 1 / len(ARMS))
    assert np.isnan(default_params().reach).all()


def test_state_saved_before_the_fused_arm_keeps_its_logistic_model():
    """Weights published by a release whose ensemble credited three agents: the
    logistic model carries on, the arms start afresh with equal shares."""
    net = QNetwork(StateLayout(8).size, 8, hidden=16)
    learner = EnsembleLearner()
    rng = np.random.default_rng(4)
    learner.update(rng.standard_normal((50, N_LINEAR)), rng.random(50) < 0.3)
    tensors = learner.tensors()
    tensors["ensemble.values"] = tensors["ensemble.values"][: len(AGENTS)]
    tensors["ensemble.weights"] = tensors["ensemble.weights"][: len(AGENTS)]
    old = split_weights(weights_to_bytes(net, tensors))[1]
    resumed = EnsembleLearner()
    assert resumed.load(old)
    assert np.allclose(resumed.model.mean, learner.model.mean)
    assert np.allclose(params_from_tensors(old).weights, 1 / len(ARMS))
    assert np.allclose(resumed.params().weights, 1 / len(ARMS))


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
        # GET /v1/model shows every arm's and source's value. (With k equal to the
        # catalog every arm's slate holds the target, so all earn alike here; the tests
        # above cover how the arms' shares are learned.)
        served = c.app.state.engine.scorer.ensemble
        assert served is not None and not np.allclose(served.theta, default_params().theta)
        assert not np.allclose(served.a_inv, default_params().a_inv)
        shown = c.get("/v1/model").json()
        assert set(shown["agents"]) == set(ARMS) and set(shown["sources"]) == set(SOURCES)
        assert shown["agents"]["q"]["value"] > 0 and "weight" in shown["agents"]["q"]
        assert "reach" in shown["sources"]["query"]
        # and /metrics shows the learning: the rewards, the loss, the weights' age and
        # each arm's share of the requests and value
        text = c.get("/metrics").text
        assert "recsvc_feedback_reward_total 120.0" in text
        lines = dict(line.rsplit(" ", 1) for line in text.splitlines()
                     if line and not line.startswith("#"))
        assert float(lines["recsvc_learner_loss"]) >= 0
        assert 0 <= float(lines["recsvc_model_age_seconds"]) < 60
        shares = [float(lines[f'recsvc_ensemble_arm_share{{arm="{a}"}}']) for a in ARMS]
        assert abs(sum(shares) - 1) < 1e-6
        assert float(lines['recsvc_ensemble_arm_value{arm="q"}']) > 0
