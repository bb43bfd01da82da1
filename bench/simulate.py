"""One policy against one world: the loop every benchmark of the family shares.

Each request of the world's seeded stream asks the policy for a slate, lets the
simulated user react with the request's own uniform draws, and shows the policy
the reaction. Every policy meets the same users, sessions and draws (common random
numbers), so their differences are the policies', not luck's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from bench.peers import Policy, View
from bench.worlds import Request, Session, World

# how often (in requests) the catalog follows the world's turnover
CATALOG_STEPS = 100


@dataclass
class Outcome:
    clicks: np.ndarray     # (requests,) clicks per slate
    purchases: np.ndarray  # (requests,) purchases per slate


def simulate(world: World, requests: list[Request], policy: Policy, desc: str = "",
             on_catalog: Callable[[np.ndarray], None] | None = None,
             observe: Callable[[View, np.ndarray], None] | None = None,
             progress_bar: bool = True) -> Outcome:
    """Run ``policy`` over the request stream.

    ``on_catalog(live)`` is called with the live-item mask before the first request
    and whenever the catalog changes (a policy that holds a catalog, the service,
    follows it). ``observe(view, items)``, if given, sees each slate before the user
    reacts (diagnostics)."""
    cfg = world.config
    total = len(requests)
    clicks = np.zeros(total)
    purchases = np.zeros(total)
    buy_draws = np.random.default_rng([cfg.seed, 1]).random((total, cfg.slate))
    repeat: dict[int, dict[int, float]] = {}
    counts: dict[int, dict[int, int]] = {}
    session: Session | None = None
    session_id = -1
    live = world.live_items(0.0)
    if on_catalog is not None:
        on_catalog(live)
    step = max(total // CATALOG_STEPS, 1)
    bar = tqdm(requests, desc=desc, unit="req", mininterval=5.0, disable=not progress_bar)
    for r in bar:
        progress = r.index / total
        if cfg.turnover > 0 and r.index and r.index % step == 0:
            live = world.live_items(progress)
            if on_catalog is not None:
                on_catalog(live)
        if r.session != session_id:
            session = Session(world, r.user, np.random.default_rng([cfg.seed, r.session]),
                              repeat.setdefault(r.user, {}))
            session_id = r.session
        session.progress = progress
        before = counts.setdefault(r.user, {})
        blocked = ~live
        if cfg.consumes and before:
            blocked = blocked.copy()
            blocked[list(before)] = True
        view = View(r, session, blocked, before)
        items = np.asarray(policy.slate(view, cfg.slate), dtype=np.int64)
        if observe is not None:
            observe(view, items)
        p = session.click_probs(items)
        clicked = r.draws[: len(items)] < p
        bought = clicked & (buy_draws[r.index, : len(items)] < world.buy_probs(r.user, items))
        policy.learn(view, items, clicked, bought)
        session.observe(items, clicked)
        for i in items[clicked].tolist():
            before[i] = before.get(i, 0) + 1
        clicks[r.index] = clicked.sum()
        purchases[r.index] = bought.sum()
    return Outcome(clicks, purchases)
