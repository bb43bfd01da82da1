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
from typing import Literal


class StoreUnavailable(Exception):
    """The backing store cannot be reached; callers answer 503 or degrade."""


class VersionConflict(Exception):
    """A weights version was published meanwhile (a rollback, another learner): the
    publish that assumed otherwise was refused and wrote nothing."""


@dataclass
class ItemRecord:
    item_id: str
    text: str
    tags: list[str]
    available: bool
    embedding: bytes  # float32, the encoder's dimension
    text_key: str     # model id + hash of the normalised text: re-embed only on change


@dataclass(frozen=True)
class FeedbackEvent:
    """One ``POST /v1/feedback``, its reward already computed from the reward map."""

    request_id: str
    item_id: str
    event: str
    value: float | None
    reward: float
    ts: float


@dataclass(frozen=True)
class FeedbackOutcome:
    """What became of one feedback event: ``accepted``, ``duplicate`` (``reward`` is
    then the first delivery's), ``unknown_request`` (unknown or expired) or
    ``not_in_slate``; nothing is written for the last three."""

    status: Literal["accepted", "duplicate", "unknown_request", "not_in_slate"]
    reward: float = 0.0


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
    # item -> sum of the rewards its accepted feedback earned, kept with the impression so
    # that whichever learner closes the reward window knows which items were rewarded
    rewards: dict[str, float] = field(default_factory=dict)
    # item -> the event types of its accepted feedback: a multi-task learner trains the
    # heads that got no event towards "nothing happened" when the window closes
    events: dict[str, list[str]] = field(default_factory=dict)
    # per slot, the bit of the ensemble's arm that served the slate (models.ensemble.ARMS):
    # whose value its reward is evidence of; empty without the ensemble
    agents: list[int] = field(default_factory=list)
    # per slot, a bitmask of the candidate sources that retrieved the item
    # (models.ensemble.SOURCES): the evidence each source's budget is learned from
    sources: list[int] = field(default_factory=list)
    # per slot, the item's rank in its source's list: how deep the policy's picks reach
    depths: list[int] = field(default_factory=list)
    # the probability that the serving arm was drawn for this request (1 when none was
    # drawn): how the arms' values weigh its slate, as play probabilities change
    arm_propensity: float = 1.0
    # v1.1 defer_seen: only the items POST /v1/seen marks displayed (``seen``), and those
    # that got feedback, are learned from when the window closes
    deferred: bool = False
    seen: list[str] = field(default_factory=list)


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
# (change id, origin replica, item ids): an upsert or a deletion through some replica
CatalogChange = tuple[str, str, list[str]]


@dataclass
class WeightsUpdate:
    """A new weights version as ``commit_learning`` publishes it."""
    version: int
    blob: bytes
    parent: int = 0  # the version it replaces in serving (what a rollback returns to)
    keep: int = 5    # only the newest ``keep`` versions are kept
    # the version that must still be the latest for this one to be published (compare
    # and set: a rollback published meanwhile is never overwritten); None: no check
    expected: int | None = None


def change_id_key(change_id: str) -> tuple[int, int]:
    """Stream ids ("ms-seq") in their order; "0" sorts first."""
    ms, _, seq = change_id.partition("-")
    return int(ms), int(seq or 0)


# The store's roles: each is what one part of the service needs of it. Every backend
# implements all of them, and ``Store`` holds one of each; a part that needs one role
# is given that role.


class Lifecycle(abc.ABC):
    """Health and connections."""

    @abc.abstractmethod
    async def ping(self) -> bool: ...

    async def check_writable(self) -> None:  # noqa: B027 - optional hook
        """Raise ``StoreUnavailable`` unless the store accepts writes now (readiness
        reports it; an embedded store always does)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class CatalogStore(abc.ABC):
    """The items and the changes to them that replicas follow (``app.catalog``)."""

    @abc.abstractmethod
    async def put_items(self, items: list[ItemRecord], origin: str = "") -> int:
        """Upsert; returns the catalog size afterwards. The change is announced to the
        other replicas (``catalog_changes``) as made by ``origin``."""

    @abc.abstractmethod
    async def get_items(self, item_ids: list[str]) -> dict[str, ItemRecord]: ...

    @abc.abstractmethod
    async def delete_item(self, item_id: str, origin: str = "") -> bool:
        """Remove the item; announced like ``put_items``."""

    @abc.abstractmethod
    async def last_catalog_change(self) -> str:
        """Id of the newest catalog change ("0" when none): a replica reads it before
        loading the catalog, then follows the changes made after it."""

    @abc.abstractmethod
    async def catalog_changes(self, after: str, count: int = 1000,
                              ) -> tuple[list[CatalogChange], bool]:
        """Changes newer than ``after``, oldest first, and whether they are complete:
        ``False`` when older changes were trimmed away meanwhile (reload the catalog)."""

    @abc.abstractmethod
    async def catalog_size(self) -> int: ...

    @abc.abstractmethod
    async def all_item_ids(self) -> list[str]: ...


class EmbeddingCache(abc.ABC):
    """Context embeddings shared by the API replicas."""

    @abc.abstractmethod
    async def get_embedding(self, key: str) -> bytes | None: ...

    @abc.abstractmethod
    async def put_embedding(self, key: str, vector: bytes, ttl_s: int) -> None: ...


class UserStore(abc.ABC):
    """Users' histories and the items recently shown to them."""

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


class ImpressionLog(abc.ABC):
    """Logged slates, the feedback on them, and the evaluation log of closed ones."""

    @abc.abstractmethod
    async def log_impression(self, imp: Impression, ttl_s: int, shown_max: int) -> None:
        """Store the impression, remember the shown items, and append it to the stream."""

    async def log_impressions(self, imps: list[Impression], ttl_s: int,
                              shown_max: int) -> None:
        """``log_impression`` for each, in order; a backend may write them all at once."""
        for imp in imps:
            await self.log_impression(imp, ttl_s, shown_max)

    @abc.abstractmethod
    async def get_impressions(self, request_ids: list[str]) -> dict[str, Impression]: ...

    @abc.abstractmethod
    async def mark_seen(self, request_id: str, item_ids: list[str]) -> bool:
        """Add ``item_ids`` to the impression's displayed items (``Impression.seen``);
        False, and nothing written, when it is unknown or expired."""

    async def slate_of(self, request_id: str) -> tuple[str, list[str]] | None:
        """The user and the item ids of an impression, or None when it is unknown or
        expired: all that feedback needs to be validated, without the stored state."""
        imp = (await self.get_impressions([request_id])).get(request_id)
        return None if imp is None else (imp.user_id, imp.item_ids)

    async def feedback_on_slate(self, request_id: str, item_id: str, event: str,
                                value: float | None, reward: float, ts: float, ttl_s: int,
                                history_max: int) -> FeedbackOutcome:
        """Validate feedback against its logged slate and record it (``record_feedback``)
        in one call, so a backend can do both in fewer round trips: this is the whole
        work of ``POST /v1/feedback``. Checks in the API's order: the impression is
        known, the item was in it, then the (request, item, event) is not a duplicate."""
        slate = await self.slate_of(request_id)
        if slate is None:
            return FeedbackOutcome("unknown_request")
        user_id, item_ids = slate
        if item_id not in item_ids:
            return FeedbackOutcome("not_in_slate")
        accepted, reward = await self.record_feedback(request_id, user_id, item_id, event,
                                                      value, reward, ts, ttl_s, history_max)
        return FeedbackOutcome("accepted" if accepted else "duplicate", reward)

    async def feedback_on_slates(self, events: list[FeedbackEvent], ttl_s: int,
                                 history_max: int) -> list[FeedbackOutcome]:
        """``feedback_on_slate`` for each event, in order (a repeat of an earlier
        event of the list is its duplicate); a backend may answer them all in one
        round trip per step."""
        return [await self.feedback_on_slate(e.request_id, e.item_id, e.event, e.value,
                                             e.reward, e.ts, ttl_s, history_max)
                for e in events]

    @abc.abstractmethod
    async def record_feedback(self, request_id: str, user_id: str, item_id: str, event: str,
                              value: float | None, reward: float, ts: float,
                              ttl_s: int, history_max: int) -> tuple[bool, float]:
        """Deduplicate on (request_id, item_id, event), then append to the user's history
        and the stream, and add the reward to the impression's ``rewards`` (and the
        event to its ``events``). Returns
        ``(accepted, reward)``; a duplicate returns ``(False, reward of the first
        delivery)`` and writes nothing."""

    @abc.abstractmethod
    async def append_log(self, records: list[dict], max_len: int) -> None:
        """Append closed impressions (slate, propensities, rewards) to a bounded log
        kept for off-policy evaluation; each record carries its ``user_id``."""

    @abc.abstractmethod
    async def read_log(self, limit: int) -> list[dict]:
        """The newest ``limit`` records, oldest first."""


class EventStream(abc.ABC):
    """Impressions and feedback on their way to the learner (consumer-group semantics)."""

    async def stream_length(self) -> int:
        """Entries of the event stream no learner has committed yet (the backlog)."""
        return 0

    @abc.abstractmethod
    async def read_stream(self, consumer: str, count: int,
                          pending: bool = False) -> list[StreamEntry]:
        """New entries (or, with ``pending``, this consumer's unacknowledged ones)."""

    @abc.abstractmethod
    async def ack(self, entry_ids: list[str]) -> None: ...

    @abc.abstractmethod
    async def claim_stream(self, consumer: str, min_idle_s: float, count: int,
                           ) -> list[StreamEntry]:
        """Make ``consumer`` the owner of entries pending on any consumer for at least
        ``min_idle_s`` and return them (Redis XAUTOCLAIM): a new lease holder takes over
        what the dead one had read but not committed."""


class ModelRegistry(abc.ABC):
    """The learner lease, the weights versions and the learner's commits."""

    @abc.abstractmethod
    async def hold_lease(self, owner: str, ttl_s: float) -> bool:
        """Take the learner lease when it is free, or extend it when ``owner`` holds it;
        returns whether ``owner`` holds it now."""

    @abc.abstractmethod
    async def release_lease(self, owner: str) -> None:
        """Give the lease up (only when ``owner`` holds it), so a standby takes over now."""

    @abc.abstractmethod
    async def lease_holder(self) -> str | None: ...

    @abc.abstractmethod
    async def commit_learning(self, owner: str, acks: list[str], stats: dict[str, float],
                              log_records: list[dict], log_max: int,
                              weights: WeightsUpdate | None = None) -> bool:
        """Atomically, and only while ``owner`` holds the lease: publish ``weights``
        (when given), store the counters, append closed impressions to the evaluation
        log and acknowledge the stream entries. Returns ``False``, writing nothing, when
        the lease is not ``owner``'s; raises ``VersionConflict``, writing nothing, when
        ``weights.expected`` is not the latest version any more."""

    @abc.abstractmethod
    async def publish_weights(self, version: int, blob: bytes, stats: dict[str, float],
                              parent: int = 0, keep: int = 5, expected: int | None = None
                              ) -> None:
        """Store a weights version and make it the latest. ``parent`` is the version it
        replaces in serving (what a rollback returns to); only the newest ``keep``
        versions are kept. With ``expected``, only if that is still the latest version
        (else ``VersionConflict``, nothing written)."""

    @abc.abstractmethod
    async def weights_parent(self, version: int) -> int:
        """The version ``version`` replaced when it was published; 0 when unknown."""

    @abc.abstractmethod
    async def latest_version(self) -> int:
        """Latest published version, 0 when none."""

    @abc.abstractmethod
    async def get_weights(self, version: int) -> bytes | None: ...

    @abc.abstractmethod
    async def get_stats(self) -> dict[str, float]:
        """The learner's counters as its latest commit wrote them, so every API replica
        reports them."""


class RateLimits(abc.ABC):
    """Request counts per key and window, shared by the API replicas (``app.server.gate``)."""

    @abc.abstractmethod
    async def count_request(self, bucket: str, window_start: int, window_s: int) -> int:
        """Count one request of ``bucket`` in the window starting at ``window_start``;
        returns the count so far (this one included). Windows expire by themselves."""


class Store(Lifecycle):
    """Async persistence used by the API and the learner: every role, one backend.

    A process is given the store and uses the roles it needs by name (the engine its
    catalog, users and impressions; the learner its stream and registry; the request
    gate its limits). The roles of one backend share its connection."""

    catalog: CatalogStore
    embeddings: EmbeddingCache
    users: UserStore
    impressions: ImpressionLog
    stream: EventStream
    registry: ModelRegistry
    limits: RateLimits
