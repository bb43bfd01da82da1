"""Fast adaptation for new users: the rule is learned across users from new users'
residuals, applies to users with few positive events only, and travels with the
weights."""

import numpy as np

from models.adaptation import (
    N_PER_BUCKET,
    N_RULE,
    NEW_USER_EVENTS,
    AdaptationLearner,
    AdaptationRule,
    rule_features,
    rule_from_tensors,
)
from models.qnet import QNetwork, split_weights, weights_to_bytes
from models.state import N_ITEM_FEATURES, StateLayout, build_state


def _state(layout, positives: int) -> np.ndarray:
    d = layout.dim
    return build_state(layout, None, np.ones((positives, d), np.float32) / np.sqrt(d),
                       np.zeros((0, d), np.float32), None)


def test_the_event_count_is_read_from_the_state():
    layout = StateLayout(8)
    for n in (0, 1, 4, 5, 30):
        assert layout.positive_count(_state(layout, n))[0] == n


def test_the_rule_learns_how_much_a_new_users_affinity_is_worth_per_event_count():
    """Simulated residuals: after one positive event the network under-rates items like
    it by 0.4 x similarity, after three by 0.1 x; experienced users are not touched."""
    rng = np.random.default_rng(0)
    layout = StateLayout(8)
    learner = AdaptationLearner()
    for _ in range(50):
        counts = rng.integers(0, 8, 200)
        states = np.stack([_state(layout, int(n)) for n in counts])
        feats = rng.random((200, N_ITEM_FEATURES)).astype(np.float32)
        slope = np.select([counts == 1, counts == 3], [0.4, 0.1], 0.0)
        residual = slope * feats[:, 4] + 0.05 * rng.standard_normal(200)
        learner.update(rule_features(layout, states, feats), residual)
    rule = learner.rule()
    theta = rule.theta.reshape(NEW_USER_EVENTS, N_PER_BUCKET)
    assert abs(theta[1, 0] - 0.4) < 0.05 and abs(theta[3, 0] - 0.1) < 0.05
    assert np.abs(theta[[0, 2, 4]]).max() < 0.05
    feats = np.zeros((3, N_ITEM_FEATURES), np.float32)
    feats[:, 4] = [0.0, 0.5, 1.0]
    assert np.allclose(rule.adjust(layout, _state(layout, 1), feats), theta[1, 0] * feats[:, 4]
                       + theta[1, -1])
    assert rule.adjust(layout, _state(layout, NEW_USER_EVENTS), feats) is None


def test_the_rule_travels_in_the_weights_blob():
    learner = AdaptationLearner()
    rng = np.random.default_rng(1)
    phi = np.zeros((40, N_RULE))
    phi[:, :N_PER_BUCKET] = rng.random((40, N_PER_BUCKET))
    learner.update(phi, rng.standard_normal(40))
    blob = weights_to_bytes(QNetwork(StateLayout(8).size, 8, hidden=16), learner.tensors())
    assert np.allclose(rule_from_tensors(split_weights(blob)[1]).theta, learner.rule().theta)
    resumed = AdaptationLearner()
    assert resumed.load(split_weights(blob)[1]) and np.allclose(resumed.a, learner.a)
    assert isinstance(learner.rule(), AdaptationRule)


def test_new_users_scores_carry_the_served_rule_and_experienced_users_do_not(backend,
                                                                            encoder):
    """Over HTTP with RECSVC_ADAPTATION=true: once the learner has fitted a rule, a new
    user's item scores are the Q-network's (the explanation's score) plus the rule's
    correction, and a user with 5 positive events gets the Q-network's alone."""
    from tests.test_api import MOVIES, make_client, recommend, wait_for

    with make_client(backend, encoder, adaptation=True, ensemble=False) as c:
        assert c.post("/v1/items", json={"items": [{"item_id": i, "text": t}
                                                   for i, t in MOVIES]}).status_code == 200
        for n in range(40):  # new users, each clicking the first item of their slate
            slate = recommend(c, user=f"new-{n}", k=5)
            assert c.post("/v1/feedback", json={"request_id": slate["request_id"],
                                                "item_id": slate["items"][0]["item_id"],
                                                "event": "click"}).status_code == 202
        wait_for(lambda: (m := c.get("/v1/model").json())["feedback_learned"] >= 40
                 and m["pending_impressions"] == 0)
        rule = wait_for(lambda: (r := c.app.state.engine.scorer.adaptation) is not None
                        and np.abs(r.theta).sum() > 0 and r)
        assert rule is not None
        for i in MOVIES[:5]:
            c.post("/v1/events", json={"user_id": "regular", "item_id": i[0],
                                       "event": "like"})
        new = recommend(c, user="newcomer", k=5, explore=False, explain=True)["items"]
        assert any(abs(i["score"] - i["explanation"]["score"]) > 1e-6 for i in new)
        regular = recommend(c, user="regular", k=5, explore=False, explain=True)["items"]
        assert all(abs(i["score"] - i["explanation"]["score"]) < 1e-4 for i in regular)
