"""The clock serving and learning read time from.

One seam for the time: the engine, the learner and the embedded store take a
``Clock``, so a benchmark can run the very code that serves on simulated time
(``bench.service``). There, reward windows, the learner's rounds and weights
versions follow the simulation's pace, not how fast the machine happens to be.
"""

from __future__ import annotations

import time


class Clock:
    """Wall time (epoch seconds: timestamps, TTLs) and a monotonic clock (intervals)."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK = Clock()


class SimulatedClock(Clock):
    """A clock that moves only when told to: both readings advance together."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._start = start

    def time(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now - self._start

    def advance(self, seconds: float) -> None:
        self._now += seconds
