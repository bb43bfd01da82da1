"""The store contract shared by the embedded and the Redis backends.

Both backends pass the same contract tests (tests/test_store_contract.py). The
event stream has consumer-group semantics: an entry read but not acknowledged
stays pending and is delivered again to ``read_stream(..., pending=True)``, so a
learner that dies loses nothing.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from functools import cached_property


class StoreUnavailable(Exception):
    """The backing store cannot be reached; callers answer 503 or degrade."""


@dataclass
class ItemRecord:
    item_id: str
    text: str
    tags: list[str]
    available: bool
    embedding: bytes  # float32, the encoder's dimension
    text_key: str     # model id + hash of the normalised text: re-embed only on change


@dataclass
class Impression:
    request_id: str
    user_id: str
    ts: float
    model_version: int
    state: bytes                 # float32 state vector the slate was chosen in
    item_ids: list[str]
    propensities: list[float]
    explored: list[bool] = field(default_factory=list)
    features: list[list[float]] = field(default_factory=list)  # per-candidate features per slot
    n_candidates: int = 0  # how many candidates the slate was chosen from (for OPE)


@dataclass
class UserData:
    history: list[dict]  # {item_id, event, ts, value}, oldest first
    shown: list[tuple[str, float]] = field(default_factory=list)  # (item_id, ts), oldest first

    @cached_property
    def touched(self) -> set[str]:
        """Ids of the items the user interacted with: exclude_seen, resting and the
        exposure features all ask, so one request computes it once."""
        return {h["item_id"] for h in self.history}


StreamEntry = tuple[str, dict[str, str]]


class Store(abc.ABC):
    """Async persistence used by the API and the learner."""

    # -- lifecycle ---------------------------------------------------------------
    @abc.abstractmethod
    async def ping(self) -> bool: ...

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    # -- catalog -----------------------------------------------------------------
    @abc.abstractmethod
    async def put_items(self, items: list[ItemRecord]) -> int:
        """Upsert; returns the catalog size afterwards."""

    @abc.abstractmethod
    async def get_items(self, item_ids: list[str]) -> dict[str, ItemRecord]: ...

    @abc.abstractmethod
    async def delete_item(self, item_id: str) -> bool: ...

    @abc.abstractmethod
    async def catalog_size(self) -> int: ...

    @abc.abstractmethod
    async def all_item_ids(self) -> list[str]: ...

    # -- embedding cache -----------------------------------------------------------
    @abc.abstractmethod
    async def get_embedding(self, key: str) -> bytes | None: ...

    @abc.abstractmethod
    async def put_embedding(self, key: str, vector: bytes, ttl_s: int) -> None: ...

    # -- users ---------------------------------------------------------------------
    @abc.abstractmethod
    async def get_user(self, user_id: str) -> UserData: ...

    async def get_users(self, user_ids: list[str]) -> dict[str, UserData]:
        """Several users at once (the Redis backend answers in one round trip)."""
        return {u: await self.get_user(u) for u in user_ids}

    @abc.abstractmethod
    async def add_event(self, user_id: str, entry: dict, max_len: int) -> None:
        """Append an interaction to the user's history (bounded to ``max_len``)."""

    @abc.abstractmethod
    async def delete_user(self, user_id: str) -> None:
        """Erase history, shown items, logged impressions and evaluation-log records."""

    # -- impressions and feedback ----------------------------------------------------
    @abc.abstractmethod
    async def log_impression(self, imp: Impression, ttl_s: int, shown_max: int) -> None:
        """Store the impression, remember the shown items, and append it to the stream."""

    @abc.abstractmethod
    async def get_impressions(self, request_ids: list[str]) -> dict[str, Impression]: ...

    @abc.abstractmethod
    async def record_feedback(self, request_id: str, user_id: str, item_id: str, event: str,
                              value: float | None, reward: float, ts: float,
                              ttl_s: int, history_max: int) -> tuple[bool, float]:
        """Deduplicate on (request_id, item_id, event), then append to the user's history
        and the stream. Returns ``(accepted, reward)``; a duplicate returns
        ``(False, reward of the first delivery)`` and writes nothing."""

    # -- the evaluation log -----------------------------------------------------------------
    @abc.abstractmethod
    async def append_log(self, records: list[dict], max_len: int) -> None:
        """Append closed impressions (slate, propensities, rewards) to a bounded log
        kept for off-policy evaluation; each record carries its ``user_id``."""

    @abc.abstractmethod
    async def read_log(self, limit: int) -> list[dict]:
        """The newest ``limit`` records, oldest first."""

    # -- the event stream (consumer-group semantics) ---------------------------------
    @abc.abstractmethod
    async def read_stream(self, consumer: str, count: int,
                          pending: bool = False) -> list[StreamEntry]:
        """New entries (or, with ``pending``, this consumer's unacknowledged ones)."""

    @abc.abstractmethod
    async def ack(self, entry_ids: list[str]) -> None: ...

    # -- model ---------------------------------------------------------------------------
    @abc.abstractmethod
    async def publish_weights(self, version: int, blob: bytes, stats: dict[str, float],
                              parent: int = 0, keep: int = 5) -> None:
        """Store a weights version and make it the latest. ``parent`` is the version it
        replaces in serving (what a rollback returns to); only the newest ``keep``
        versions are kept."""

    @abc.abstractmethod
    async def weights_parent(self, version: int) -> int:
        """The version ``version`` replaced when it was published; 0 when unknown."""

    @abc.abstractmethod
    async def latest_version(self) -> int:
        """Latest published version, 0 when none."""

    @abc.abstractmethod
    async def get_weights(self, version: int) -> bytes | None: ...

    @abc.abstractmethod
    async def put_stats(self, stats: dict[str, float]) -> None:
        """The learner's counters, so every API replica reports them."""

    @abc.abstractmethod
    async def get_stats(self) -> dict[str, float]: ...

    # -- rate limiting -------------------------------------------------------------------
    @abc.abstractmethod
    async def count_request(self, bucket: str, window_start: int, window_s: int) -> int:
        """Count one request of ``bucket`` in the window starting at ``window_start``;
        returns the count so far (this one included). Windows expire by themselves."""
