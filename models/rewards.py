"""Turning feedback events into scalar rewards, from a configurable map.

Plain events (click, purchase, like, dislike, skip) get the mapped reward.
``rating`` scales its mapped reward by ``(value - centre) / (5 - centre)``, so a
5-star rating earns the full reward and ratings under the centre are negative;
``dwell`` scales by ``min(value / dwell_full_s, 1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

EVENTS = ("click", "purchase", "like", "dislike", "skip", "rating", "dwell")
VALUE_EVENTS = ("rating", "dwell")

# The objectives of a multi-task Q-network, one head each. Engagement events without
# a head of their own (like, dislike, skip) are the click head's: they say whether the
# item was worth the attention, as a click does.
HEADS = ("click", "purchase", "rating", "dwell")
HEAD_OF_EVENT: dict[str, str] = {"click": "click", "like": "click", "dislike": "click",
                                 "skip": "click", "purchase": "purchase",
                                 "rating": "rating", "dwell": "dwell"}

DEFAULT_REWARDS: dict[str, float] = {
    "click": 1.0, "purchase": 2.0, "like": 1.0, "dislike": -1.0, "skip": -0.1,
    "rating": 1.0, "dwell": 1.0,
}


@dataclass(frozen=True)
class RewardMap:
    rewards: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_REWARDS))
    rating_centre: float = 2.5
    dwell_full_s: float = 60.0
    default: float = 0.0

    def __post_init__(self) -> None:
        unknown = set(self.rewards) - set(EVENTS)
        if unknown:
            raise ValueError(f"reward map names unknown events: {sorted(unknown)}")
        if not all(math.isfinite(r) for r in [*self.rewards.values(), self.default]):
            raise ValueError("rewards must be finite numbers")
        if not 0 <= self.rating_centre < 5:
            raise ValueError("rating_centre must lie in [0, 5)")
        if self.dwell_full_s <= 0:
            raise ValueError("dwell_full_s must be positive")

    def reward(self, event: str, value: float | None = None) -> float:
        """Reward of one event; ``value`` is required for rating and dwell."""
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}")
        if value is not None and not math.isfinite(value):
            raise ValueError("value must be a finite number")
        base = self.rewards.get(event, DEFAULT_REWARDS[event])
        if event == "rating":
            if value is None or not 0 <= value <= 5:
                raise ValueError("rating needs a value in [0, 5]")
            return base * (value - self.rating_centre) / (5.0 - self.rating_centre)
        if event == "dwell":
            if value is None or value < 0:
                raise ValueError("dwell needs a value >= 0 seconds")
            return base * min(value / self.dwell_full_s, 1.0)
        return base

    def is_positive(self, event: str, value: float | None = None) -> bool:
        """Whether the event counts as engagement in the user's state (reward > 0)."""
        return self.reward(event, value) > 0
