"""The serving engine: embeds, retrieves, scores and picks slates; owns the index.

All blocking work (transformer, FAISS, torch) runs in a thread pool, never on the
event loop. The engine follows new weight versions and catalog changes from the
store by polling, so every serving process picks up a new version, and a change
made through another replica, within ``weights_poll_s``.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import contextvars
import gc
import inspect
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from app.catalog import CatalogReplica, index_records
from app.clock import SYSTEM_CLOCK, Clock
from app.errors import APIError
from app.ids import new_ulid
from app.loops import PeriodicLoop
from app.metrics import Metrics
from app.server.batching import MicroBatcher, StoreBatcher
from app.server.explain import explain_slate, importance, lift_scale
from app.settings import Settings
from app.store import Impression, ItemRecord, Store, StoreUnavailable, UserData
from app.store.base import FeedbackEvent, FeedbackOutcome, VersionConflict
from app.user_state import latest_first, resting_items, user_state_and_history
from models.adaptation import N_RULE, AdaptationRule, rule_from_tensors
from models.ann import set_search_threads
from models.batch import (
    PaddedCandidates,
    batch_features,
    batch_scores,
    item_products,
    own_history_features,
)
from models.device import resolve_device, torch_threads_for
from models.encoder import TextEncoder, text_key
from models.ensemble import (
    SOURCES,
    EnsembleParams,
    default_params,
    params_from_tensors,
    report_from_tensors,
)
from models.exploration import SlateChoice, epsilon_greedy_slates, slate_from_draws
from models.index import NO_ROWS, CandidateIndex, Hits
from models.lru import LRUCache
from models.qnet import QNetwork, all_finite, split_weights, weights_shape
from models.scorer import Scorer
from models.session import SessionGaps, session_start
from models.state import (
    FEATURE_GROUPS,
    TAG_BUCKETS,
    RecentItems,
    StateLayout,
    candidate_features,
    smoothed_ctr,
)

# the related-items source searches around this many of the user's latest positive items
RELATED_SEEDS = 3
# catalog texts per forward pass of an upsert: what a request's context may wait for
CATALOG_CHUNK = 16
# resting items that stay in the candidates for the exploration alone (the newest ones)
RESTING_EXPLORED = 20
# a source whose picks all come from the top of its list still gives this share of its
# setting: room for the policy to change its mind
MIN_SHARE = 0.25

log = logging.getLogger("recsvc.engine")


@dataclass
class Pick:
    """One request's inputs to the batched slate chooser."""
    user_data: UserData
    ctx: np.ndarray | None
    banned: set[str]
    candidates: list[str] | None
    k: int
    epsilon: float
    now: float
    # resting items (passed over just now) that only the exploration may place, newest
    # first: how the learner keeps finding out whether resting them pays
    explore_only: list[str] = field(default_factory=list)
    explore: bool = False  # the request explores (draws its ensemble arm, at any epsilon)


def _encode_in_background(encoder, texts: list[str]) -> np.ndarray:
    """``encoder.encode`` as background work where the encoder can tell (a
    ``TextEncoder``); other encoders (a test's, a benchmark's cache) just encode."""
    if "background" in inspect.signature(encoder.encode).parameters:
        return encoder.encode(texts, background=True)
    return encoder.encode(texts)


@dataclass
class Candidates:
    """One request's candidates by index row: their embeddings, and per candidate a
    bitmask of the sources (``models.ensemble.SOURCES``) that retrieved it."""

    rows: np.ndarray
    vectors: np.ndarray
    sources: np.ndarray  # int64 bits
    depths: np.ndarray   # each one's rank in its source's list
    explore_only: np.ndarray | None = None  # bool per candidate: never the greedy pick


@dataclass
class Chosen:
    """What ``choose_batch`` decided for one request."""

    scorer: Scorer          # the weights version that chose
    state: np.ndarray
    ids: list[str]          # the candidates
    scores: np.ndarray      # their ranking scores
    features: np.ndarray    # their per-candidate features
    choice: SlateChoice
    agents: list[int]       # per slot, the bit of the ensemble arm that served (or [])
    sources: list[int]      # per slot, the sources that retrieved it
    depths: list[int]       # per slot, its rank in that source's list
    arm_propensity: float = 1.0  # the probability the serving arm was drawn with
    # per slot, the click probability expected of it without its own popularity
    # (``EnsembleParams.expected_ctr``); None without the ensemble
    expected: list[float] | None = None


@dataclass
class Prepared:
    """A batch's inputs to the slate choosers (``Engine._prepare``)."""

    scorer: Scorer
    states: np.ndarray                 # (B, S)
    recent: list[RecentItems]
    queries: np.ndarray                # (B, A)
    values: np.ndarray                 # (B,)
    # per request: candidate ids, rows and sources, counts, tags, id hashes
    candidates: list[tuple[list[str], Candidates, np.ndarray, np.ndarray, np.ndarray]]
    draws: np.ndarray                  # (B, 1 + 2 * longest) uniforms
    longest: int                       # the longest slate asked for
    base_ctr: float                    # the catalog's CTR (``CandidateIndex.base_ctr``)
    expected_scale: float | None       # how the popularity lift reads (``lift_scale``)


@dataclass
class Slate:
    request_id: str
    model_version: int
    item_ids: list[str]
    scores: np.ndarray
    choice: SlateChoice
    explanations: list[dict] | None = None  # per item, when asked for (app.server.explain)


def set_torch_threads(threads: int) -> None:
    """A compute thread's first act: torch's intra-op threads for the work it runs
    (OpenMP's count is per thread; FAISS's searches set theirs around each search,
    ``models.ann.search_threads``)."""
    torch.set_num_threads(threads)


class Engine:
    def __init__(self, settings: Settings, store: Store, metrics: Metrics,
                 encoder: TextEncoder | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self.settings = settings
        self.clock = clock
        self.store = store
        self.metrics = metrics
        self.device = resolve_device(settings.device)
        self.compute_threads = settings.compute_threads
        # torch's thread count (OpenMP's) holds per thread: each thread that runs the
        # model sets it when it starts
        threads = (torch_threads_for(settings.torch_threads, settings.workers),)
        self.executor = ThreadPoolExecutor(max_workers=self.compute_threads,
                                           thread_name_prefix="recsvc-compute",
                                           initializer=set_torch_threads, initargs=threads)
        # catalog embedding has a thread of its own: a 1,000-item upsert (tens of
        # seconds of transformer on a CPU) never holds a thread that serves requests
        self.catalog_executor = ThreadPoolExecutor(1, thread_name_prefix="recsvc-catalog",
                                                   initializer=set_torch_threads,
                                                   initargs=threads)
        self._given_encoder = encoder
        # set by start(): no request reaches the engine before it is ready
        self.encoder: TextEncoder
        self.index: CandidateIndex
        self.catalog: CatalogReplica
        self.layout: StateLayout
        self.scorer: Scorer
        self.cache: LRUCache[str, np.ndarray] = LRUCache(settings.embedding_cache_size)
        self.learner_stats: dict[str, float] = {}
        # each agent's and source's estimated value, as the served version saved them
        self.ensemble_report: dict = {}
        self.ready = False
        self._rng = np.random.default_rng(settings.seed)
        # where users' sessions end, learned from the gaps between their slates
        self.sessions = SessionGaps()
        self._rng_lock = threading.Lock()
        self._batcher: MicroBatcher[str, np.ndarray]
        self._chooser: MicroBatcher[Pick, Chosen]
        self._follower: PeriodicLoop | None = None
        # concurrent requests' store calls, one pipeline per batch (app.server.batching)
        self._user_reads: StoreBatcher[str, UserData] = StoreBatcher(self._read_users)
        self._impression_writes: StoreBatcher[Impression, None] = StoreBatcher(
            self._write_impressions)
        self._feedback_writes: StoreBatcher[FeedbackEvent, FeedbackOutcome] = StoreBatcher(
            self._write_feedback)
        # impressions served while the store was down, by request id, oldest first
        self._unlogged: OrderedDict[str, Impression] = OrderedDict()
        metrics.held_impressions = lambda: len(self._unlogged)
        self._flusher: asyncio.Task | None = None
        self._flush_lock = asyncio.Lock()
        self._refused_version = 0
        self._sorted: tuple[int, list[str]] = (-1, [])  # (index ids_version, sorted ids)

    async def run(self, fn, *args):
        """Run blocking work on the compute pool."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # -- lifecycle -------------------------------------------------------------------
    async def start(self, follow: bool = True) -> None:
        """Load the encoder, the catalog and the newest weights; then, with ``follow``,
        poll the store for new versions and catalog changes every ``weights_poll_s``
        (a simulation calls ``follow_store`` on its own clock instead)."""
        if self._given_encoder is not None:
            self.encoder = self._given_encoder
        else:
            s = self.settings
            self.encoder = await self.run(
                lambda: TextEncoder(s.encoder_path, self.device, batch_size=s.encoder_batch_size))
        self.layout = StateLayout(self.encoder.dim)
        s = self.settings
        # numpy's BLAS too: per-request products are small, and a BLAS thread pool per
        # compute thread only fights the others for the cores
        threadpool_limits(s.search_threads, user_api="blas")
        set_search_threads(s.search_threads)
        self.index = CandidateIndex(self.encoder.dim, exact_threshold=s.exact_index_max,
                                    approximate_kind=s.approximate_index, hnsw_m=s.hnsw_m,
                                    ef_search=s.hnsw_ef_search, ivf_nprobe=s.ivf_nprobe,
                                    device=self.device)
        self.scorer = Scorer(self._ranking(QNetwork(self.layout.size, self.encoder.dim,
                                                    s.hidden, heads=max(len(s.heads), 1))),
                             0, self.device, default_params() if s.ensemble_on else None,
                             AdaptationRule(np.zeros(N_RULE)) if s.adaptation else None)
        self._batcher = MicroBatcher(self._encode_batch, self.executor,
                                     max_batch=self.settings.encoder_batch_size)
        self._chooser = MicroBatcher(self.choose_batch, self.executor,
                                     max_batch=self.settings.recommend_batch_size,
                                     concurrency=self.compute_threads)
        self.catalog = CatalogReplica(self.store.catalog, self.index, self.run)
        await self.catalog.try_load()
        self.metrics.catalog_size.set(len(self.index))
        await self.refresh_weights()
        if follow:
            self._follower = PeriodicLoop("store-follower", self.follow_store,
                                          self.settings.weights_poll_s)
            self._follower.start()
        # What start-up built (the catalog's ids, the index's tables, the encoder) lives
        # as long as the process: leave it out of the cyclic GC's full passes, which
        # otherwise walk all of it and stall every request in flight.
        gc.freeze()
        self.ready = True

    async def stop(self) -> None:
        if self._follower:
            await self._follower.stop()
        if self._unlogged:
            try:
                await self.flush_unlogged()
            except StoreUnavailable:
                log.error("store unreachable at shutdown: %d impressions were not logged",
                          len(self._unlogged))
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.catalog_executor.shutdown(wait=False, cancel_futures=True)

    # -- weights -----------------------------------------------------------------------
    async def refresh_weights(self) -> None:
        """Serve the newest published version, if it is newer than ours."""
        latest = await self.store.registry.latest_version()
        self.learner_stats = await self.store.registry.get_stats()
        self.metrics.learner_stats = self.learner_stats
        if latest <= self.scorer.version:
            return
        blob = await self.store.registry.get_weights(latest)
        if blob is None:
            return
        if weights_shape(blob) != self.scorer.net.shape:  # another release's layout
            if latest != self._refused_version:
                log.error("weights version %d have another shape than this release's "
                          "Q-network: version %d keeps serving until the learner publishes "
                          "a compatible one", latest, self.scorer.version)
                self._refused_version = latest
            return
        net, ensemble, adaptation, report = await self.run(self._decode, blob)
        if not all_finite(net):  # the learner never publishes these; a store might
            log.error("weights version %d are not finite: version %d keeps serving",
                      latest, self.scorer.version)
            return
        self.scorer = Scorer(net, latest, self.device, ensemble, adaptation)
        self.ensemble_report = self.metrics.ensemble_report = report
        self.metrics.model_version.set(latest)
        log.info("serving weights version %d", latest)

    def _decode(self, blob: bytes) -> tuple[QNetwork, EnsembleParams | None,
                                            AdaptationRule | None, dict]:
        """The network of a weights blob, ranking as this server ranks, and for the
        options that are on, their state saved beside it (an untrained one if the
        learner saved none: the setting was just turned on), with the ensemble's
        values for ``GET /v1/model``."""
        net, extra = split_weights(blob, self.device)
        net = self._ranking(net)
        s = self.settings
        ensemble = (params_from_tensors(extra) or default_params()) if s.ensemble_on else None
        adaptation = ((rule_from_tensors(extra) or AdaptationRule(np.zeros(N_RULE)))
                      if s.adaptation else None)
        return net, ensemble, adaptation, report_from_tensors(extra) if ensemble else {}

    def _ranking(self, net: QNetwork) -> QNetwork:
        """Rank by this server's head weights (a multi-task network's heads are summed
        with them; the weights are a serving setting, not part of the model)."""
        if self.settings.head_weight_list:
            net.set_head_weights(self.settings.head_weight_list)
        return net

    async def rollback(self) -> tuple[int, int]:
        """Serve again the weights the current version replaced, as a new version (every
        replica follows versions forward). Returns ``(new version, restored version)``.
        The learner sees the newer version and continues from it."""
        latest = await self.store.registry.latest_version()
        parent = await self.store.registry.weights_parent(latest) if latest else 0
        blob = await self.store.registry.get_weights(parent) if parent else None
        if blob is None:
            raise APIError(409, "no_previous_version",
                           f"version {latest} has no earlier weights kept to return to")
        if weights_shape(blob) != self.scorer.net.shape:  # saved by another release
            raise APIError(409, "no_previous_version",
                           f"version {parent} was saved by a release with another network "
                           "shape, which this one cannot serve")
        stats = await self.store.registry.get_stats()
        version = latest + 1
        try:
            await self.store.registry.publish_weights(
                version, blob, {**stats, "version": version},
                parent=await self.store.registry.weights_parent(parent),
                keep=self.settings.weights_kept, expected=latest)
        except VersionConflict as exc:
            raise APIError(409, "version_conflict", f"version {latest} was replaced while "
                           "rolling back; look at GET /v1/model and retry") from exc
        await self.refresh_weights()
        log.warning("rollback: version %d serves the weights of version %d", version, parent)
        return version, parent

    async def follow_store(self) -> None:
        """Log held impressions, serve a newer weights version, apply catalog changes."""
        self.flush_in_background()
        with contextlib.suppress(StoreUnavailable):  # keep serving what we have
            await self.refresh_weights()
            self.metrics.stream_backlog.set(await self.store.stream.stream_length())
            if await self.catalog.follow():
                self.metrics.catalog_size.set(len(self.index))

    # -- store calls of concurrent requests, batched ----------------------------------------
    async def _read_users(self, user_ids: list[str]) -> list[UserData]:
        found = await self.store.users.get_users(list(dict.fromkeys(user_ids)))
        return [found[u] for u in user_ids]

    async def _write_impressions(self, imps: list[Impression]) -> list[None]:
        await self.store.impressions.log_impressions(imps, self.settings.impression_ttl_s,
                                                     self.settings.shown_len)
        return [None] * len(imps)

    async def _write_feedback(self, events: list[FeedbackEvent]) -> list[FeedbackOutcome]:
        return await self.store.impressions.feedback_on_slates(
            events, self.settings.impression_ttl_s, self.settings.history_len)

    async def _check_and_record(self, event: FeedbackEvent) -> FeedbackOutcome:
        """Validate one feedback event against its slate and record it
        (``ImpressionLog.feedback_on_slates``), in one store call with the concurrent
        requests' events. (``ImpressionLog.record_feedback`` records without checking.)"""
        return await self._feedback_writes.submit(event)

    async def feedback(self, request_id: str, item_id: str, event: str,
                       value: float | None) -> FeedbackOutcome:
        """``POST /v1/feedback`` past validation: the reward from the reward map, the
        event recorded against its slate, and a positive one counted for the item's
        popularity."""
        await self._log_if_held(request_id)
        reward = self.settings.rewards.reward(event, value)
        out = await self._check_and_record(FeedbackEvent(
            request_id, item_id, event, value, reward, self.clock.time()))
        if out.status == "accepted":
            self.metrics.feedback.labels(event).inc()
            if reward >= 0:
                self.metrics.rewards.inc(reward)
            else:
                self.metrics.penalties.inc(-reward)
            if reward > 0:
                self.index.record((), (item_id,))
        return out

    async def _log_if_held(self, request_id: str) -> None:
        """A slate served while the store was down may still be held in memory: log it
        first, so what refers to it is never a 404; the rest are logged in the
        background."""
        held = self._unlogged.get(request_id)
        if held is not None:
            await self.store.impressions.log_impressions([held], self.settings.impression_ttl_s,
                                                         self.settings.shown_len)
            self._unlogged.pop(request_id, None)
        self.flush_in_background()

    async def seen(self, request_id: str, item_ids: list[str]) -> str:
        """``POST /v1/seen``: mark items of a slate displayed. Returns ``accepted``,
        ``unknown_request`` (unknown or expired), or the first item not in the slate."""
        await self._log_if_held(request_id)
        slate = await self.store.impressions.slate_of(request_id)
        if slate is None:
            return "unknown_request"
        in_slate = set(slate[1])
        outside = [i for i in item_ids if i not in in_slate]
        if outside:
            return outside[0]
        if not await self.store.impressions.mark_seen(request_id, item_ids):
            return "unknown_request"  # expired in between
        return "accepted"

    async def add_event(self, user_id: str, item_id: str, event: str,
                        value: float | None) -> None:
        """``POST /v1/events``: an interaction outside any slate, into the history."""
        await self.store.users.add_event(user_id, {"item_id": item_id, "event": event,
                                                   "ts": self.clock.time(), "value": value},
                                         self.settings.history_len)
        self.metrics.events.labels(event).inc()

    # -- impressions served while the store was down ------------------------------------
    def _keep_unlogged(self, imp: Impression, reason: Exception) -> None:
        """Hold the impression in memory (bounded) to log it once the store is back, so
        slates served during an outage can still get feedback and be learned from."""
        if len(self._unlogged) >= self.settings.unlogged_max:
            self._unlogged.popitem(last=False)
            self.metrics.impressions_dropped.inc()
        self._unlogged[imp.request_id] = imp
        if len(self._unlogged) == 1:
            log.warning("store unreachable (%s): holding impressions in memory until it is "
                        "back", reason)

    def flush_in_background(self) -> None:
        """Start logging held impressions, unless that is under way or none are held:
        no request waits for a backlog of up to ``unlogged_max`` of them."""
        if self._unlogged and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush_quietly(), context=contextvars.Context())  # no request's id

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(StoreUnavailable):  # the next poll or feedback retries
            await self.flush_unlogged()

    async def flush_unlogged(self, batch: int = 500) -> int:
        """Log held impressions, oldest first, ``batch`` per pipeline; stops (keeping the
        rest) if the store fails."""
        done = 0
        if not self._unlogged:
            return 0
        async with self._flush_lock:  # one flusher at a time: each impression logged once
            while self._unlogged:
                chunk = list(self._unlogged.values())[:batch]
                await self.store.impressions.log_impressions(chunk, self.settings.impression_ttl_s,
                                                             self.settings.shown_len)
                for imp in chunk:
                    self._unlogged.pop(imp.request_id, None)
                done += len(chunk)
        if done:
            log.info("store is back: logged %d impressions held during the outage", done)
        return done

    @property
    def epsilon(self) -> float:
        return self.settings.epsilon_schedule(int(self.learner_stats.get("feedback_learned", 0)))

    # -- embeddings --------------------------------------------------------------------
    def _encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return list(self.encoder.encode(texts))

    def _encode_catalog(self, texts: list[str]) -> np.ndarray:
        """Embed catalog texts a chunk at a time, giving way to requests: the encoder
        serves one forward pass at a time, so a request's context waits for one chunk
        (a fraction of a second), not for the whole upsert."""
        if not texts:
            return np.zeros((0, self.encoder.dim), dtype=np.float32)
        return np.concatenate([_encode_in_background(self.encoder, texts[i:i + CATALOG_CHUNK])
                               for i in range(0, len(texts), CATALOG_CHUNK)])

    def _cached_context(self, key: str) -> np.ndarray | None:
        """The embedding of the context with ``text_key`` ``key``, if this process's LRU
        holds it (counted as a hit): the common case, answered without an await."""
        vec = self.cache.get(key)
        if vec is not None:
            self.metrics.cache_hits.inc()
        return vec

    async def _uncached_context(self, key: str, text: str) -> np.ndarray:
        """After an LRU miss: the store's cache, then the (micro-batched) transformer."""
        try:
            raw = await self.store.embeddings.get_embedding(key)
        except StoreUnavailable:
            raw = None
        if raw is not None:
            vec = np.frombuffer(raw, dtype=np.float32)
            self.cache.put(key, vec)
            self.metrics.cache_hits.inc()
            return vec
        self.metrics.cache_misses.inc()
        vec = await self._batcher.submit(text)
        self.cache.put(key, vec)
        with contextlib.suppress(StoreUnavailable):
            await self.store.embeddings.put_embedding(key, vec.tobytes(),
                                                      self.settings.embedding_cache_ttl_s)
        return vec

    # -- catalog -----------------------------------------------------------------------
    async def upsert_items(self, items: list) -> int:
        """Embed new or changed texts in batches, store, then index (recommendable at return)."""
        latest = {it.item_id: it for it in items}  # a repeated id: the last one wins
        keys = {i: text_key(self.encoder.model_id, it.text) for i, it in latest.items()}
        existing = await self.store.catalog.get_items(list(latest))
        to_embed = [i for i in latest if i not in existing or existing[i].text_key != keys[i]]
        vectors = await asyncio.get_running_loop().run_in_executor(
            self.catalog_executor, self._encode_catalog, [latest[i].text for i in to_embed])
        fresh = dict(zip(to_embed, vectors, strict=True))
        records = [ItemRecord(i, it.text, list(it.tags), it.available,
                              fresh[i].tobytes() if i in fresh else existing[i].embedding, keys[i])
                   for i, it in latest.items()]
        size = await self.store.catalog.put_items(records, origin=self.catalog.origin)
        retagged = {i for i in latest if i in existing and existing[i].tags != list(latest[i].tags)}
        await self.run(self._apply_upsert, records, set(fresh) | retagged)
        self.metrics.catalog_size.set(len(self.index))
        return size

    def _apply_upsert(self, records: list[ItemRecord], changed_ids: set[str]) -> None:
        """Re-index new items and those whose embedding or tags changed; for the rest only
        availability can have changed."""
        changed = [r for r in records if r.item_id in changed_ids or r.item_id not in self.index]
        index_records(self.index, changed)
        for r in records:
            if r.item_id not in changed_ids:
                self.index.set_available(r.item_id, r.available)

    # -- catalog reads (v1.1) --------------------------------------------------------------
    async def list_items(self, limit: int, after: str | None
                         ) -> tuple[list[ItemRecord], str | None]:
        """A page of the catalog in item-id order: up to ``limit`` items after the id
        ``after`` (from the start without one), and the id to continue after, or None
        at the end. Every item once, in a stable order, while the catalog does not
        change; an item added meanwhile appears if its id sorts after the page."""
        ids = await self.run(self._sorted_ids)
        start = bisect.bisect_right(ids, after) if after is not None else 0
        page = ids[start:start + limit]
        records = await self.store.catalog.get_items(page)
        more = start + limit < len(ids)
        return [records[i] for i in page if i in records], (page[-1] if more else None)

    def _sorted_ids(self) -> list[str]:
        """Every item id in this replica's catalog, sorted; kept until an id joins or
        leaves (sorting a million ids takes about a second)."""
        version = self.index.ids_version
        if self._sorted[0] != version:
            self._sorted = (version, sorted(self.index.ids()))
        return self._sorted[1]

    async def popular(self, k: int) -> list[tuple[str, float]]:
        """The ``k`` available items with the highest smoothed engagement rate, the
        ranking the engaging candidate source draws from, with that rate."""
        return await self.run(self._popular, k)

    def _popular(self, k: int) -> list[tuple[str, float]]:
        ids, _, stats = self._read_by_id(lambda: self.index.engaging(k, [NO_ROWS]))
        rates = smoothed_ctr(stats, self.index.base_ctr())
        return list(zip(ids, rates.tolist(), strict=True))

    def _read_by_id(self, read: Callable[[], list[Hits]]
                    ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The first result of ``read()`` (an index read by row) as item ids, with its
        embeddings and ``[shown, clicked, expected]`` counts: what an answer by id
        needs. Read again if rows moved meanwhile (a compaction); an item deleted since
        the read keeps its row until compacted, so it is left out."""
        while True:
            generation = self.index.row_generation
            rows, vectors = read()[0]
            looked = self.index.at_rows([rows], generation)
            if looked is not None:
                ids, stats, _, _ = looked[0]
                live = np.array([self.index.is_recommendable(i) for i in ids], dtype=bool)
                kept = [i for i, ok in zip(ids, live, strict=True) if ok]
                return kept, vectors[live], stats[live]

    async def similar(self, item_id: str, k: int) -> list[tuple[str, float]] | None:
        """The ``k`` available items nearest to ``item_id`` by content embedding, with
        their cosine similarity; None for an unknown item."""
        return await self.run(self._similar, item_id, k)

    def _similar(self, item_id: str, k: int) -> list[tuple[str, float]] | None:
        known, vector = self.index.vectors_of([item_id])
        if not known:
            return None
        ids, vectors, _ = self._read_by_id(
            lambda: self.index.related([[item_id]], k, self.index.rows_of([[item_id]])))
        norms = np.linalg.norm(vectors, axis=1) * max(float(np.linalg.norm(vector[0])), 1e-12)
        cosine = vectors @ vector[0] / np.maximum(norms, 1e-12)
        return list(zip(ids, cosine.tolist(), strict=True))

    async def delete_item(self, item_id: str) -> bool:
        found = await self.store.catalog.delete_item(item_id, origin=self.catalog.origin)
        removed = await self.run(self.index.remove, [item_id])
        self.metrics.catalog_size.set(len(self.index))
        return found or bool(removed)

    async def importance(self, limit: int) -> dict:
        """Model-wide importance of the input's parts, by ablation on the latest
        ``limit`` closed impressions still stored (``app.server.explain.importance``)."""
        records = await self.store.impressions.read_log(limit)
        imps = await self.store.impressions.get_impressions([r["request_id"] for r in records])
        return await self.run(importance, self.layout, self.scorer, self.index,
                              list(imps.values()))

    # -- recommending ------------------------------------------------------------------
    async def recommend(self, user_id: str, context_text: str | None, k: int,
                        exclude: list[str], *, exclude_seen: bool,
                        candidates: list[str] | None, explore: bool,
                        explain: bool = False, defer_seen: bool = False) -> Slate:
        async def user() -> UserData:
            try:
                return await self._user_reads.submit(user_id)
            except StoreUnavailable:  # degrade to a context-only state
                return UserData([], [])

        key = text_key(self.encoder.model_id, context_text) if context_text else None
        ctx = self._cached_context(key) if key else None
        if ctx is not None or not key or context_text is None:  # no task to gather
            user_data = await user()
        else:
            user_data, ctx = await asyncio.gather(
                user(), self._uncached_context(key, context_text))
        banned = set(exclude)
        if exclude_seen:
            banned.update(user_data.touched)
        now = self.clock.time()
        explore_only = self._rest(user_data, banned, candidates, k, now, explore=explore)
        pick = Pick(user_data, ctx, banned, candidates, k,
                    self.epsilon if explore else 0.0, now, explore_only, explore)
        chosen = await self._chooser.submit(pick)
        scorer, state, ids, choice = chosen.scorer, chosen.state, chosen.ids, chosen.choice
        version = scorer.version
        slate = Slate(new_ulid(), version, [ids[i] for i in choice.indices],
                      chosen.scores[choice.indices], choice)
        if explain:  # with the weights that chose the slate
            slate.explanations = await self.run(
                explain_slate, self.layout, scorer, self.index, self.settings, user_data, ctx,
                slate.item_ids, choice.explored.tolist(), now)
        imp = Impression(slate.request_id, user_id, now, version, state.tobytes(),
                         slate.item_ids, choice.propensities.tolist(), choice.explored.tolist(),
                         chosen.features[choice.indices].tolist(), len(ids),
                         agents=chosen.agents, sources=chosen.sources, depths=chosen.depths,
                         arm_propensity=chosen.arm_propensity, deferred=defer_seen)
        try:
            await self._impression_writes.submit(imp)
        except StoreUnavailable as exc:
            self._keep_unlogged(imp, exc)
        self.index.record(slate.item_ids, expected=chosen.expected)
        self.metrics.recommendations.inc()
        self.metrics.items_served.inc(len(slate.item_ids))
        self.metrics.items_explored.inc(int(choice.explored.sum()))
        return slate

    def _rest(self, user_data: UserData, banned: set[str], candidates: list[str] | None,
              k: int, now: float, *, explore: bool) -> list[str]:
        """Add to ``banned`` the items the user passed over earlier in this session, when
        the learned policy holds that resting them pays and enough are left; returns
        the latest of them, which only exploration may place (so the learner keeps
        finding out whether resting pays)."""
        since = float("-inf")
        if user_data.shown:  # the gap since the user's last slate: where sessions end
            self.sessions.add(now - user_data.shown[-1][1])
            since = session_start(sorted({ts for _, ts in user_data.shown}), now,
                                  self.sessions.threshold())
        resting = resting_items(user_data, self.settings.rest_shown, since)
        if not resting or not self._resting_pays(self.scorer):
            return []
        # unless too few would be left: a short slate is worse than a repeat
        left = (len(set(candidates) - banned - resting) if candidates is not None
                else self.index.recommendable_count() - len(banned | resting))
        if left < k:
            return []
        explore_only: list[str] = []
        if candidates is None and explore:
            explore_only = [i for i in latest_first(user_data, resting)
                            if i not in banned][:RESTING_EXPLORED]
        banned |= resting
        return explore_only

    @staticmethod
    def _resting_pays(scorer: Scorer) -> bool:
        """Whether items the user just passed over rest (are left out of retrieval).

        Without the ensemble, always (``RECSVC_REST_SHOWN``). With it, while the
        logistic agent holds that a recent pass-over lowers the odds of a click, its
        exposure weight below zero by more than one posterior standard deviation:
        whether users come back to what they scrolled past is learned, not assumed.
        Before any evidence the weight is at its prior, 0, so nothing rests until the
        first re-shown items are seen to be passed over again."""
        e = scorer.ensemble
        if e is None:
            return True
        j = FEATURE_GROUPS["exposure"].start
        return bool(e.theta[j] + np.sqrt(max(float(e.a_inv[j, j]), 0.0)) < 0.0)

    def _budgets(self, scorer: Scorer) -> dict[str, int]:
        """How many candidates each source gives: its setting, or, once the ensemble
        learned how deep into the source's list the greedy picks reach
        (``EnsembleParams.reach``), half as deep again plus a margin, but never under
        ``MIN_SHARE`` of the setting (the related source's count is per seed item)."""
        s = self.settings
        ceilings = {"query": s.candidates, "related": s.related_candidates * RELATED_SEEDS,
                    "engaging": s.engaging_candidates, "history": s.history_len}
        reach = scorer.ensemble.reach if scorer.ensemble is not None else None
        out = {}
        for j, name in enumerate(SOURCES):
            ceiling = ceilings[name]
            if reach is not None and ceiling and not np.isnan(reach[j]):
                ceiling = int(min(ceiling, max(np.ceil(MIN_SHARE * ceiling),
                                               np.ceil(1.5 * reach[j]) + 8)))
            out[name] = ceiling
        out["related"] = int(np.ceil(out["related"] / RELATED_SEEDS))
        return out

    def _add_sources(self, found: dict[int, Candidates], picks: list[Pick],
                     recent: list[RecentItems], banned: list[np.ndarray],
                     budgets: dict[str, int]) -> None:
        """Append to each search result candidates from the sources the query alone
        would not reach, so the per-candidate features can rank them: the items nearest
        to what the user last engaged with (``CandidateIndex.related``, from cached
        neighbour lists), the items with the highest smoothed CTR
        (``CandidateIndex.engaging``) and the user's own positives (when the
        request does not exclude them). Each source skips what is banned or already a
        candidate (by row: no id is looked up again); whether its candidates earn is
        learned (``_budgets``)."""

        # per request, each source's part, appended once at the end (not one copy of
        # the growing embeddings per source): (rows, embeddings or None, source bit,
        # held back for exploration)
        parts: dict[int, list[tuple[np.ndarray, np.ndarray | None, int, bool]]] = {
            i: [] for i in found}

        def merge(i: int, rows: np.ndarray, items: np.ndarray | None, source: str | None
                  ) -> None:
            """Add candidates of ``source`` (None: resting items, explore only)."""
            if len(rows):
                bit = 0 if source is None else 1 << SOURCES.index(source)
                parts[i].append((rows, items, bit, source is None))

        def rows_so_far(i: int) -> np.ndarray:
            return np.concatenate([found[i].rows, *(part[0] for part in parts[i])])

        def excluded(i: int) -> np.ndarray:
            return np.concatenate([banned[i], rows_so_far(i)])

        if budgets["related"]:
            # around each of the latest positives, newest first
            seeded = [i for i in found if recent[i].positive_ids]
            for i, (rows, items) in zip(seeded, self.index.related(
                    [recent[i].positive_ids[-RELATED_SEEDS:][::-1] for i in seeded],
                    budgets["related"], [excluded(i) for i in seeded]), strict=True):
                merge(i, rows, items, "related")
        if budgets["engaging"]:
            order = list(found)
            for i, (rows, items) in zip(order, self.index.engaging(
                    budgets["engaging"], [excluded(i) for i in order]), strict=True):
                merge(i, rows, items, "engaging")
        if budgets["history"]:
            for i in found:
                own = [item_id for item_id in dict.fromkeys(reversed(recent[i].positive_events))
                       if item_id not in picks[i].banned][: budgets["history"]]
                if own:
                    rows = self.index.servable_rows(own)
                    merge(i, rows[~np.isin(rows, rows_so_far(i))], None, "history")
        for i in found:
            if picks[i].explore_only:
                rows = self.index.servable_rows(picks[i].explore_only)
                merge(i, rows[~np.isin(rows, rows_so_far(i))], None, None)
            c = found[i]
            added = parts[i]
            found[i] = Candidates(
                rows_so_far(i),
                np.concatenate([c.vectors, *(self.index.vectors_at(rows) if items is None
                                             else items for rows, items, _, _ in added)]),
                np.concatenate([c.sources, *(np.full(len(rows), bit, np.int64)
                                             for rows, _, bit, _ in added)]),
                np.concatenate([c.depths, *(np.arange(len(rows)) for rows, *_ in added)]),
                np.concatenate([np.zeros(len(c.rows), bool),
                                *(np.full(len(rows), held) for rows, _, _, held in added)]))

    def _candidates(self, picks: list[Pick], queries: np.ndarray, recent: list[RecentItems],
                    budgets: dict[str, int]) -> list[tuple[list[str], Candidates, np.ndarray,
                                                           np.ndarray, np.ndarray]]:
        """Per pick, its candidates' ids, rows, embeddings and sources, counts, tags and
        id hashes.

        Candidates travel by index row from the searches to the counts and tags (one
        id lookup per banned or explicitly named item, none per retrieved candidate);
        if rows move meanwhile (a compaction after many deletes, in another thread),
        the whole lookup is done again."""
        query_bit = 1 << SOURCES.index("query")
        while True:
            generation = self.index.row_generation
            banned = self.index.rows_of([p.banned for p in picks])
            to_search = [i for i, p in enumerate(picks) if p.candidates is None]
            hits = self.index.search(queries[to_search, : self.layout.dim],
                                          budgets["query"], [banned[i] for i in to_search]
                                          ) if to_search else []
            found = {i: Candidates(rows, vectors, np.full(len(rows), query_bit, np.int64),
                                   np.arange(len(rows)))
                     for i, (rows, vectors) in zip(to_search, hits, strict=True)}
            if found:
                self._add_sources(found, picks, recent, banned, budgets)
            for i, p in enumerate(picks):
                if p.candidates is not None:
                    wanted = [c for c in dict.fromkeys(p.candidates)
                              if c not in p.banned and self.index.is_recommendable(c)]
                    rows = self.index.rows_of([wanted])[0]
                    found[i] = Candidates(rows, self.index.vectors_at(rows),
                                          np.zeros(len(rows), np.int64), np.arange(len(rows)))
            looked = self.index.at_rows([found[i].rows for i in range(len(picks))], generation)
            if looked is not None:
                return [(ids, found[i], stats, tags, hashes)
                        for i, (ids, stats, tags, hashes) in enumerate(looked)]

    def _prepare(self, picks: list[Pick]) -> Prepared:
        """What both choosers start from: per request its state and recent history
        (built from its user's record), one Q-network call for the batch, the
        candidates of every source, and the batch's uniform draws."""
        s = self.settings
        scorer = self.scorer  # one weights version for the whole batch
        built = [user_state_and_history(self.layout, p.user_data, p.ctx, self.index, s.rewards,
                                        s.history_len, s.history_decay, p.now) for p in picks]
        states = np.stack([b[0] for b in built])
        queries, values = scorer.query(states)
        recent = [b[1] for b in built]
        candidates = self._candidates(picks, queries, recent, self._budgets(scorer))
        longest = max(p.k for p in picks)
        with self._rng_lock:  # column 0 draws the arm, then a coin and a pick per slot
            draws = self._rng.random((len(picks), 1 + 2 * longest))
        return Prepared(scorer, states, recent, queries, values, candidates, draws, longest,
                        self.index.base_ctr(), lift_scale(s, self.index))

    def choose_batch(self, picks: list[Pick]) -> list[Chosen]:
        """Slates for concurrent requests, the batch as one array program: one
        Q-network call, one index search per candidate source, then the candidates
        padded to ``(B, C)``, their features ``(B, C, F)``, the scores, the ensemble's
        agents and fusion, and the epsilon-greedy slates with their propensities, each
        computed once for the batch (``models.batch``). Per request, Python builds the
        state, hashes the user's own ids (exposure and repeat features), applies the
        new-user rule when it is on, and assembles the result.

        ``choose_each`` is the per-request reference: the same draws give the same
        slates and propensities (up to float rounding, which may flip exact near-ties)."""
        return self._choose_arrays(picks, self._prepare(picks))

    def choose_each(self, picks: list[Pick]) -> list[Chosen]:
        """``choose_batch`` one request at a time: the reference that the batched
        arrays are tested against."""
        prepared = self._prepare(picks)
        return [self._choose_one(p, prepared, i) for i, p in enumerate(picks)]

    def _choose_arrays(self, picks: list[Pick], prep: Prepared) -> list[Chosen]:
        s = self.settings
        scorer = prep.scorer
        base_ctr, expected_scale = prep.base_ctr, prep.expected_scale
        padded = PaddedCandidates.of([c[1].vectors for c in prep.candidates],
                                     [c[2] for c in prep.candidates],
                                     [c[3] for c in prep.candidates], self.layout.dim,
                                     TAG_BUCKETS)
        valid, lengths = padded.valid, padded.lengths
        own = own_history_features(
            padded.pad([c[4] for c in prep.candidates]), valid,
            [p.user_data.shown for p in picks], [p.user_data.touched for p in picks],
            [r.positive_events for r in prep.recent], [p.now for p in picks],
            s.exposure_recent_s)
        products = item_products(self.layout, padded.vectors, prep.queries, prep.states,
                                 prep.recent)
        feats = batch_features(padded, prep.recent, own, products.affinity, base_ctr,
                               expected_scale)
        scores = batch_scores(products, prep.queries, prep.values, feats)
        if scorer.adaptation is not None:  # new users: the learned correction
            for b, n in enumerate(lengths.tolist()):
                adjustment = scorer.adaptation.adjust(self.layout, prep.states[b], feats[b, :n])
                if adjustment is not None:
                    scores[b, :n] += adjustment
        batch = len(picks)
        arms = np.zeros(batch, np.int64)
        arm_propensities = np.ones(batch)
        drawing = np.array([p.explore for p in picks]) & (lengths > 0)
        expected_ctr = x = None
        if scorer.ensemble is not None:
            e = scorer.ensemble
            agent_scores, x = e.agent_scores_batch(products.pools, feats, scores)
            arms = np.where(drawing, e.arms_from_draws(prep.draws[:, 0]), e.greedy_arm())
            arm_propensities = np.where(drawing, e.weights[arms], 1.0)
            scores = e.arm_scores_batch(agent_scores, arms, valid)
        held = padded.pad([c[1].explore_only if c[1].explore_only is not None
                           else np.zeros(len(c[0]), bool) for c in prep.candidates]) & valid
        rest = valid & ~held
        holding = held.any(1) & rest.any(1)
        if holding.any():  # below every other candidate: only the random branch places them
            floor = np.where(rest, scores, np.inf).min(1) - 1.0
            scores = np.where(holding[:, None] & held, floor[:, None], scores)
        longest = prep.longest
        choices = epsilon_greedy_slates(
            scores, valid, np.array([p.k for p in picks]), np.array([p.epsilon for p in picks]),
            prep.draws[:, 1: 1 + longest], prep.draws[:, 1 + longest:])
        if (expected_scale is not None and scorer.ensemble is not None and x is not None
                and x.shape[1]):
            # of the slates actually chosen
            shown = np.zeros((batch, longest), np.int64)
            for b, choice in enumerate(choices):
                shown[b, : len(choice.indices)] = choice.indices
            expected_ctr = scorer.ensemble.expected_ctr_batch(x, shown)
        out = []
        for b, (p, (ids, found, *_)) in enumerate(zip(picks, prep.candidates, strict=True)):
            n, choice = int(lengths[b]), choices[b]
            shown_b = choice.indices
            agents = ([1 << int(arms[b])] * min(p.k, n)) if scorer.ensemble is not None \
                and drawing[b] else []
            expected = (expected_ctr[b, : len(shown_b)].tolist()
                        if expected_ctr is not None and len(shown_b) else None)
            out.append(Chosen(scorer, prep.states[b], ids, scores[b, :n], feats[b, :n], choice,
                              agents, found.sources[shown_b].tolist(),
                              found.depths[shown_b].tolist(), float(arm_propensities[b]),
                              expected))
        return out

    def _choose_one(self, p: Pick, prep: Prepared, i: int) -> Chosen:
        s = self.settings
        scorer = prep.scorer
        base_ctr, expected_scale = prep.base_ctr, prep.expected_scale
        state, recent = prep.states[i], prep.recent[i]
        ids, found, stats, tags, _ = prep.candidates[i]
        items = found.vectors
        feats = candidate_features(ids, p.user_data.shown, p.user_data.touched, p.now,
                                   stats, items, tags, recent, s.exposure_recent_s,
                                   base_ctr, expected_scale)
        scores = Scorer.score(prep.queries[i], float(prep.values[i]), items, feats)
        if scorer.adaptation is not None:  # a new user: the learned correction
            adjustment = scorer.adaptation.adjust(self.layout, state, feats)
            if adjustment is not None:
                scores = scores + adjustment
        agents: list[int] = []
        arm_propensity = 1.0
        if scorer.ensemble is not None and len(ids):
            # an exploring request draws the arm that serves it, and is evidence of
            # that arm's value; one without exploration takes the likeliest best arm
            e = scorer.ensemble
            agent_scores = e.agent_scores(self.layout, state, items, feats, scores)
            if p.explore:
                arm = e.arm_from_draw(float(prep.draws[i, 0]))
                arm_propensity = float(e.weights[arm])
                agents = [1 << arm] * min(p.k, len(ids))
            else:
                arm = e.greedy_arm()
            scores = e.arm_scores(agent_scores, arm)
        held_back = found.explore_only
        if held_back is not None and held_back.any() and not held_back.all():
            # below every other candidate: only the random branch places them
            scores = np.where(held_back, scores[~held_back].min() - 1.0, scores)
        longest = prep.longest
        choice = slate_from_draws(scores, p.k, p.epsilon, prep.draws[i, 1: 1 + longest],
                                  prep.draws[i, 1 + longest:])
        shown = choice.indices
        expected = None
        if expected_scale is not None and scorer.ensemble is not None and len(shown):
            expected = scorer.ensemble.expected_ctr(
                self.layout, state, items[shown], feats[shown],
                np.arange(len(shown))).tolist()
        return Chosen(scorer, state, ids, scores, feats, choice, agents,
                      found.sources[shown].tolist(), found.depths[shown].tolist(),
                      arm_propensity, expected)
