"""The service as a policy of the family benchmark, in this process, on simulated time.

The same ``Engine`` and ``LearnerWorker`` that ``recsvc serve`` runs, with the
embedded store, driven the way the HTTP benchmark drives a service: the catalog is
upserted, ``recommend`` is called with the user id and the demographics as context,
and a click is sent as ``click`` feedback. What differs is the clock: it is a
``SimulatedClock`` that moves ``1 / rate`` seconds per request, and the learner's
rounds (every ``RECSVC_LEARNER_POLL_S``) and the engine's polls for new weights
(every ``RECSVC_WEIGHTS_POLL_S``) run on it. So a run's pacing, and its result, do
not depend on how fast this machine is, and a run costs CPU time instead of a
subprocess's wall time.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

import numpy as np

from app.clock import SimulatedClock
from app.learner.worker import LearnerWorker
from app.metrics import Metrics
from app.server.engine import Engine
from app.settings import Settings
from app.store.memory import MemoryStore
from bench.peers import Policy, View
from bench.worlds import World

# requests per simulated second: about what one service answered over HTTP in the
# quality benchmark (10,000 requests in 3-4 minutes)
RATE = 50.0
# the reward window the HTTP protocol of the issue ran with (RECSVC_REWARD_WAIT_S)
BENCH_ENV = {"RECSVC_REWARD_WAIT_S": "5", "RECSVC_DEVICE": "cpu",
             "RECSVC_REPLAY_PREFAULT": "false"}


class CachedEncoder:
    """A ``TextEncoder`` that embeds each distinct text once per process: every run of
    the family upserts the same movies and sends the same demographics."""

    def __init__(self) -> None:
        from models.encoder import TextEncoder

        self.inner = TextEncoder()
        self.dim = self.inner.dim
        self.model_id = self.inner.model_id
        self.device = self.inner.device
        self._cache: dict[str, np.ndarray] = {}

    def encode(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            for t, v in zip(missing, self.inner.encode(missing), strict=True):
                self._cache[t] = v
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._cache[t] for t in texts])


_ENCODER: CachedEncoder | None = None


def shared_encoder() -> CachedEncoder:
    global _ENCODER
    if _ENCODER is None:
        _ENCODER = CachedEncoder()
    return _ENCODER


def feedback_events(items: np.ndarray, clicked: np.ndarray, bought: np.ndarray | None
                    ) -> list[tuple[int, str]]:
    """The feedback a client sends for a slate: a ``click`` per clicked item, and a
    ``purchase`` per bought one."""
    out = [(int(i), "click") for i in items[clicked]]
    if bought is not None:
        out += [(int(i), "purchase") for i in items[bought]]
    return out


@dataclass
class _Item:
    """What ``Engine.upsert_items`` reads of an item (the API's ``ItemIn``)."""

    item_id: str
    text: str
    tags: list[str]
    available: bool = True


def settings_for(seed: int, env: dict[str, str]) -> Settings:
    """The service's settings for a run: the benchmark's protocol, the run's seed, and
    ``env`` (``RECSVC_`` names) over them, as a subprocess would read them."""
    merged = {**BENCH_ENV, "RECSVC_SEED": str(seed), **env}
    fields = {k.removeprefix("RECSVC_").lower(): v for k, v in merged.items()}
    outside = {k: v for k, v in os.environ.items() if k.startswith("RECSVC_")}
    if outside:
        raise RuntimeError(f"unset {sorted(outside)}: the family runs its own settings")
    return Settings(**fields)


class ServicePolicy(Policy):
    """The service, driven as a client drives it (see the module docstring)."""

    def __init__(self, world: World, seed: int, env: dict[str, str] | None = None,
                 rate: float = RATE, name: str = "service") -> None:
        self.name = name
        self.world = world
        self.settings = settings_for(seed, env or {})
        self.clock = SimulatedClock()
        self.step_s = 1.0 / rate
        self.loop = asyncio.new_event_loop()
        self.store = MemoryStore(self.clock)
        self.engine = Engine(self.settings, self.store, Metrics(), shared_encoder(), self.clock)
        self.run(self.engine.start(follow=False))
        self.learner = LearnerWorker(self.settings, self.store, self.engine.index,
                                     self.engine.layout, self.engine.device, clock=self.clock)
        self._next_round = 0.0
        self._next_poll = 0.0
        self._catalog = np.zeros(world.n_items, dtype=bool)
        self._index = {item_id: i for i, item_id in enumerate(world.item_ids)}
        self._request_id = ""
        self.users = [f"u-{u.user_id}" for u in world.data.users]
        self.contexts = [u.context for u in world.data.users]

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    # -- the catalog ------------------------------------------------------------------
    def on_catalog(self, live: np.ndarray) -> None:
        """Follow the world's catalog: upsert what arrived, delete what left."""
        movies = self.world.data.movies
        gone = np.flatnonzero(self._catalog & ~live)
        new = np.flatnonzero(live & ~self._catalog)
        for i in gone.tolist():
            self.run(self.engine.delete_item(self.world.item_ids[i]))
        items = [_Item(self.world.item_ids[i], movies[i].text,
                       [g.lower() for g in movies[i].genres]) for i in new.tolist()]
        for start in range(0, len(items), 1000):
            self.run(self.engine.upsert_items(items[start:start + 1000]))
        self._catalog = live.copy()

    # -- serving ----------------------------------------------------------------------
    def slate(self, view: View, k: int) -> np.ndarray:
        user = view.user
        slate = self.run(self.engine.recommend(
            self.users[user], self.contexts[user], k, [],
            exclude_seen=self.world.config.consumes, candidates=None, explore=True))
        self._request_id = slate.request_id
        return np.array([self._index[i] for i in slate.item_ids], dtype=np.int64)

    def learn(self, view: View, items: np.ndarray, clicked: np.ndarray,
              bought: np.ndarray | None = None) -> None:
        for i, event in feedback_events(items, clicked, bought):
            self.run(self.engine.feedback(self._request_id, self.world.item_ids[i], event,
                                          None))
        self.clock.advance(self.step_s)
        self.run(self._on_time())

    async def _on_time(self) -> None:
        """The learner's rounds and the engine's polls that fall due by now."""
        now = self.clock.monotonic()
        s = self.settings
        while self._next_round <= now:
            await self.learner.learn_round()
            self._next_round += s.learner_poll_s
        if self._next_poll <= now:
            await self.engine.follow_store()
            self._next_poll = now + s.weights_poll_s

    # -- after the run --------------------------------------------------------------------
    def model(self) -> dict:
        """What ``GET /v1/model`` would say."""
        stats = self.learner.stats()
        return {"version": self.engine.scorer.version, "updates": stats["updates"],
                "feedback_learned": stats["feedback_learned"], "epsilon": self.engine.epsilon}

    def close(self) -> None:
        self.run(self.engine.stop())
        if self.learner._pool:
            self.learner._pool.shutdown(wait=True)
        self.loop.close()
