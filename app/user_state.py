"""From a user's stored history to the policy's state vector.

Positive history (reward > 0) feeds the positive pool. Interactions with reward
<= 0 (skip, dislike, low ratings) and items shown without any interaction feed
the negative pool: what the user just ignored is information.
"""

from __future__ import annotations

from itertools import compress
from operator import not_

import numpy as np

from app.store import UserData
from models.index import CandidateIndex
from models.rewards import RewardMap
from models.state import RecentItems, StateLayout, build_state


def split_history(user: UserData, rewards: RewardMap, limit: int
                  ) -> tuple[list[str], list[str], float | None]:
    """Positive and negative item ids, oldest first, and the last interaction time."""
    pos: list[tuple[float, str]] = []
    neg: list[tuple[float, str]] = []
    touched: set[str] = set()
    last_ts: float | None = None
    for h in user.history:
        try:
            good = rewards.is_positive(h["event"], h.get("value"))
        except ValueError:
            continue
        (pos if good else neg).append((h["ts"], h["item_id"]))
        touched.add(h["item_id"])
        last_ts = max(last_ts or h["ts"], h["ts"])
    if user.shown:  # up to shown_len entries: C-level iteration, no Python per entry
        shown_ids, shown_ts = zip(*user.shown, strict=True)
        passed_over = map(not_, map(touched.__contains__, shown_ids))
        neg.extend(compress(zip(shown_ts, shown_ids, strict=True), passed_over))
        latest = max(shown_ts)
        last_ts = latest if last_ts is None else max(last_ts, latest)
    pos.sort()
    neg.sort()
    return [i for _, i in pos[-limit:]], [i for _, i in neg[-limit:]], last_ts


def user_state(layout: StateLayout, user: UserData, context: np.ndarray | None,
               index: CandidateIndex, rewards: RewardMap, limit: int, decay: float,
               now: float) -> np.ndarray:
    """The state vector of a user at ``now`` with this request's context embedding."""
    return user_state_and_history(layout, user, context, index, rewards, limit, decay, now)[0]


def user_state_and_history(layout: StateLayout, user: UserData, context: np.ndarray | None,
                           index: CandidateIndex, rewards: RewardMap, limit: int,
                           decay: float, now: float) -> tuple[np.ndarray, RecentItems]:
    """The state, and the embeddings and tags of the positive and negative history
    (oldest first), which the per-candidate affinity features compare candidates with."""
    pos_ids, neg_ids, last_ts = split_history(user, rewards, limit)
    found, vectors, tags = index.vectors_and_tags_of([*pos_ids, *neg_ids])  # one lookup
    n_pos = int(found[: len(pos_ids)].sum())
    pos, neg = vectors[:n_pos], vectors[n_pos:]
    pos_known = tuple(compress(pos_ids, found[: len(pos_ids)].tolist()))
    gap = None if last_ts is None else now - last_ts
    recent = RecentItems(pos, neg, tags[:n_pos], tags[n_pos:], pos_known, tuple(pos_ids))
    return build_state(layout, context, pos, neg, gap, decay), recent


def context_of(layout: StateLayout, state: np.ndarray) -> np.ndarray | None:
    """The context embedding stored in a state, or None when it had no context."""
    has_context = bool(layout.has_context(state))
    return layout.context(state).copy() if has_context else None


def resting_items(user: UserData, latest: int, since: float = float("-inf")) -> set[str]:
    """Items among the user's ``latest`` shown, since ``since`` (the start of their
    session), that they did not act on.

    Showing a user again what they just scrolled past is a common way to waste a
    slate: within a session a passed-over item is often passed over again. Across
    sessions it is fresh again, so only this session's showings count. These items
    rest (are not retrieved) while the session lasts and they stay in the window;
    any interaction with an item ends its rest.
    """
    if latest <= 0 or not user.shown:
        return set()
    return {item_id for item_id, ts in user.shown[-latest:]
            if ts >= since and item_id not in user.touched}


def latest_first(user: UserData, items: set[str]) -> list[str]:
    """Those of ``items`` the user was shown, most recently shown first."""
    out = []
    for item_id, _ in reversed(user.shown):
        if item_id in items:
            out.append(item_id)
    return list(dict.fromkeys(out))
