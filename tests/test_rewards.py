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
