"""Where a user's session ends, learned from the gaps between their slates."""

import numpy as np

from app.store.base import UserData
from app.user_state import resting_items
from models.session import DEFAULT_GAP_S, SessionGaps, session_start


def test_the_threshold_splits_short_gaps_within_sessions_from_long_ones_between():
    """Whatever the time scale: seconds between slates and minutes between sessions,
    or minutes and days; until enough gaps were seen, half an hour."""
    rng = np.random.default_rng(0)
    for within, between in ((3.0, 600.0), (120.0, 86_400.0)):
        gaps = SessionGaps()
        assert gaps.threshold() == DEFAULT_GAP_S
        for _ in range(2_000):
            mean = within if rng.random() < 0.8 else between
            gaps.add(float(rng.exponential(mean)) + 0.1 * within)
        t = gaps.threshold()
        assert 3 * within < t < between, (within, between, t)


def test_gaps_that_are_not_bimodal_keep_the_default():
    gaps = SessionGaps()
    for _ in range(1_000):
        gaps.add(10.0)
    assert gaps.threshold() == DEFAULT_GAP_S


def test_the_session_starts_after_the_last_long_gap():
    times = [0.0, 5.0, 1_000.0, 1_004.0, 1_010.0]
    assert session_start(times, 1_015.0, threshold_s=60.0) == 1_000.0
    assert session_start(times, 2_000.0, threshold_s=60.0) == 2_000.0  # a new session
    assert session_start(times, 1_015.0, threshold_s=10_000.0) == 0.0


def test_only_this_sessions_pass_overs_rest():
    """An item passed over yesterday is fresh today; one passed over a minute ago,
    in this session, rests; one the user clicked never does."""
    user = UserData(history=[{"item_id": "clicked", "event": "click", "ts": 1_001.0,
                              "value": None}],
                    shown=[("old", 0.0), ("new", 1_000.0), ("clicked", 1_000.0)])
    assert resting_items(user, 200) == {"old", "new"}
    assert resting_items(user, 200, since=900.0) == {"new"}
