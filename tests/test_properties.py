"""Property tests (Hypothesis) for the request schemas and the reward map: what the
API accepts is exactly what API.md allows, and every accepted event has a finite
reward, so no request can feed NaN or infinity into learning."""

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from app.schemas import EventIn, FeedbackIn, ItemsIn, RecommendIn
from models.rewards import DEFAULT_REWARDS, EVENTS, RewardMap

ID_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
ID_CHARS = st.sampled_from("abcXYZ019_.:@-")
ids = st.text(ID_CHARS, min_size=1, max_size=128)
any_float = st.floats(allow_nan=True, allow_infinity=True)
settings.register_profile("recsvc", max_examples=200, deadline=None)
settings.load_profile("recsvc")


def accepted(model, **body) -> bool:
    try:
        model(**body)
        return True
    except ValidationError:
        return False


@given(st.one_of(st.text(max_size=140), ids, st.text(ID_CHARS, min_size=120, max_size=140)))
def test_ids_are_accepted_exactly_when_api_md_allows_them(user_id):
    assert accepted(RecommendIn, user_id=user_id) == bool(ID_RE.fullmatch(user_id))


@given(st.integers(min_value=-10**6, max_value=10**6))
def test_k_is_accepted_from_1_to_100(k):
    assert accepted(RecommendIn, user_id="u", k=k) == (1 <= k <= 100)


@given(st.integers(min_value=0, max_value=1100))
def test_a_catalog_call_takes_1_to_1000_items(n):
    items = [{"item_id": f"i{j}", "text": "t"} for j in range(n)]
    assert accepted(ItemsIn, items=items) == (1 <= n <= 1000)


@given(st.text(max_size=4100))
def test_item_text_takes_1_to_4000_characters(text):
    assert accepted(ItemsIn, items=[{"item_id": "i", "text": text}]) == (1 <= len(text) <= 4000)


@given(st.sampled_from(EVENTS + ("teleport", "")), st.one_of(st.none(), any_float))
def test_every_accepted_event_has_a_finite_bounded_reward(event, value):
    """Rating needs 0..5, dwell needs finite seconds >= 0; no value may be NaN or
    infinite. Whatever passes the schema gets a finite reward within the map's range."""
    ok = accepted(FeedbackIn, request_id="r", item_id="i", event=event, value=value)
    assert ok == accepted(EventIn, user_id="u", item_id="i", event=event, value=value)
    finite = value is None or math.isfinite(value)
    if event not in EVENTS or not finite:
        assert not ok
    elif event == "rating":
        assert ok == (value is not None and 0 <= value <= 5)
    elif event == "dwell":
        assert ok == (value is not None and value >= 0)
    else:
        assert ok
    if ok:
        reward = RewardMap().reward(event, value)
        assert math.isfinite(reward)
        assert abs(reward) <= max(abs(r) for r in DEFAULT_REWARDS.values())


@given(st.floats(0, 5), st.floats(0, 5))
def test_a_higher_rating_never_earns_less(a, b):
    low, high = sorted((a, b))
    m = RewardMap()
    assert m.reward("rating", low) <= m.reward("rating", high)


@given(st.floats(0, 1e9), st.floats(0, 1e9))
def test_longer_dwell_never_earns_less_and_saturates(a, b):
    low, high = sorted((a, b))
    m = RewardMap()
    assert 0 <= m.reward("dwell", low) <= m.reward("dwell", high) <= 1.0


@given(st.dictionaries(st.sampled_from(EVENTS), any_float, max_size=len(EVENTS)))
def test_a_configured_map_overrides_exactly_and_refuses_non_finite_rewards(mapping):
    if not all(math.isfinite(v) for v in mapping.values()):
        with pytest.raises(ValueError):
            RewardMap(rewards=mapping)
        return
    m = RewardMap(rewards=mapping)
    for event in ("click", "purchase", "like", "dislike", "skip"):
        assert m.reward(event) == mapping.get(event, DEFAULT_REWARDS[event])
