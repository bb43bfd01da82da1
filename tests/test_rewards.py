import numpy as np
import pytest

from models.rewards import RewardMap


def test_default_map_and_scaled_events():
    m = RewardMap()
    assert m.reward("click") == 1.0
    assert m.reward("dislike") < 0
    assert m.reward("rating", 5) == 1.0
    assert m.reward("rating", 0) == -1.0
    assert m.reward("rating", 2.5) == 0.0
    assert m.reward("dwell", 30) == 0.5
    assert m.reward("dwell", 600) == 1.0
    assert m.is_positive("purchase") and not m.is_positive("skip")


def test_configured_map_overrides():
    m = RewardMap(rewards={"click": 0.5, "purchase": 10.0})
    assert m.reward("click") == 0.5 and m.reward("purchase") == 10.0


@pytest.mark.parametrize("event,value", [("rating", None), ("rating", 6), ("dwell", -1),
                                         ("teleport", None)])
def test_invalid_events_are_rejected(event, value):
    with pytest.raises(ValueError):
        RewardMap().reward(event, value)


def test_unknown_event_in_map_is_rejected():
    with pytest.raises(ValueError):
        RewardMap(rewards={"teleport": 1.0})


def test_multi_task_targets_train_each_head_on_what_happened_to_it():
    """A feedback event trains its own head; when the window closes every head that got
    no event learns that nothing happened, so a clicked item that was not bought tells
    the purchase head so, and an item rewarded before events were recorded is left be."""
    from app.learner.worker import _feedback_target, _silence_targets
    from app.store import Impression
    from models.rewards import HEADS

    r, mask = _feedback_target(HEADS, "like", 1.0)        # like: the click head's event
    assert r.tolist() == [1.0, 0, 0, 0] and mask.tolist() == [1, 0, 0, 0]
    r, mask = _feedback_target(HEADS, "purchase", 2.0)
    assert r.tolist() == [0, 2.0, 0, 0] and mask.tolist() == [0, 1, 0, 0]
    r, mask = _feedback_target((), "purchase", 2.0)         # one head: the reward itself
    assert r.tolist() == [2.0] and mask.tolist() == [1]
    assert _feedback_target(("click", "purchase"), "dwell", 30.0) is None  # no dwell head

    imp = Impression("r", "u", 0.0, 1, b"", ["clicked", "bought", "none", "old"], [1.0] * 4,
                     rewards={"clicked": 1.0, "bought": 3.0, "old": 1.0},
                     events={"clicked": ["click"], "bought": ["click", "purchase"]})
    silent = _silence_targets(HEADS, imp, default=-0.1)
    assert set(silent) == {"clicked", "bought", "none"}
    assert silent["clicked"][1].tolist() == [0, 1, 1, 1]
    assert silent["clicked"][0].tolist() == [0, 0, 0, 0]
    assert silent["bought"][1].tolist() == [0, 0, 1, 1]
    r, mask = silent["none"]
    assert mask.tolist() == [1, 1, 1, 1] and np.allclose(r, [-0.1, 0, 0, 0])
    shop = _silence_targets(("purchase",), imp, default=-0.1)   # no click head: no default
    assert set(shop) == {"clicked", "none"} and shop["none"][0].tolist() == [0.0]
    one_head = _silence_targets((), imp, default=-0.1)
    assert set(one_head) == {"none"} and np.allclose(one_head["none"][0], [-0.1])


@pytest.mark.parametrize("value", ['{"clicks": 1}', '[1, 2]', '{}', '{"click": "a"}'])
def test_invalid_head_weights_are_refused_at_start(value):
    from pydantic import ValidationError

    from app.settings import Settings

    with pytest.raises(ValidationError):
        Settings(head_weights=value)


def test_head_weights_name_the_heads():
    from app.settings import Settings

    s = Settings(head_weights='{"purchase": 2.5, "click": 1}')
    assert s.heads == ("click", "purchase")                  # HEADS order
    assert s.head_weight_list == (1.0, 2.5) and s.dqn.heads == 2
    assert Settings().heads == () and Settings().dqn.heads == 1
