"""Where a user's session begins, learned from the gaps between their requests.

Resting what a user just passed over pays within a session and costs across
sessions: in a new session the same items are fresh again. Where a session ends is
a matter of time scale, and the time scale is the deployment's (minutes between a
shop's visits, seconds in a benchmark that compresses a day). So it is learned: the
gaps between a user's consecutive slates are bimodal, short within a session and
long between sessions, and Otsu's threshold on their logarithms splits the two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# log10 of a gap in seconds, from a millisecond to a year, in 0.1 steps
LOG_LOW, LOG_HIGH, BINS = -3.0, 7.5, 105
MIN_GAPS = 200            # gaps seen before the threshold is trusted
DEFAULT_GAP_S = 1800.0    # until then (and when the gaps are not bimodal): half an hour


@dataclass
class SessionGaps:
    """A forgetting histogram of log gaps and the session threshold it implies."""

    horizon: float = 20_000.0  # gaps over which old evidence fades (1/e)
    counts: np.ndarray = field(default_factory=lambda: np.zeros(BINS))
    seen: int = 0
    _threshold: float = DEFAULT_GAP_S
    _stale: int = 0

    def add(self, gap_s: float) -> None:
        if not gap_s > 0 or math.isinf(gap_s):
            return
        b = int((math.log10(gap_s) - LOG_LOW) / (LOG_HIGH - LOG_LOW) * BINS)
        self.counts *= math.exp(-1.0 / self.horizon)
        self.counts[min(max(b, 0), BINS - 1)] += 1.0
        self.seen += 1
        self._stale += 1
        if self._stale >= 50:  # recomputed now and then, not per request
            self._threshold = self._compute()
            self._stale = 0

    def threshold(self) -> float:
        """Gaps longer than this (seconds) separate sessions."""
        return self._threshold

    def _compute(self) -> float:
        total = self.counts.sum()
        if self.seen < MIN_GAPS or total <= 0:
            return DEFAULT_GAP_S
        centres = LOG_LOW + (np.arange(BINS) + 0.5) * (LOG_HIGH - LOG_LOW) / BINS
        p = self.counts / total
        w0 = np.cumsum(p)
        m0 = np.cumsum(p * centres)
        mean = m0[-1]
        w1 = 1.0 - w0
        with np.errstate(divide="ignore", invalid="ignore"):
            between = (mean * w0 - m0) ** 2 / (w0 * w1)
        between[~np.isfinite(between)] = 0.0
        k = int(np.argmax(between))
        # bimodal enough: the split explains most of the spread of log gaps
        spread = float((p * (centres - mean) ** 2).sum())
        if spread <= 0 or between[k] < 0.5 * spread:
            return DEFAULT_GAP_S
        return float(10 ** (LOG_LOW + (k + 1) * (LOG_HIGH - LOG_LOW) / BINS))


def session_start(shown_times: list[float], now: float, threshold_s: float) -> float:
    """The time the user's current session began: walking back from ``now`` over the
    times of their slates (oldest first), the first gap longer than ``threshold_s``
    ends the walk. ``now`` itself when the last slate is further back than that."""
    start = now
    for ts in reversed(shown_times):
        if start - ts > threshold_s:
            break
        start = ts
    return start
