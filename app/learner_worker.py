"""The learner: joins feedback with impressions and turns them into DQN updates.

It consumes the store's event stream (consumer-group semantics). A feedback event
becomes a transition at once; when an impression's reward window closes, every
slate item that got no feedback becomes a transition with the default reward.
Stream entries are acknowledged only after their transitions entered learning,
so a learner that dies loses nothing: its pending entries are read again.

New weights are published at most every ``publish_interval_s``, and only when
finite; serving processes pick them up from the store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from app.features import context_of, user_state
from app.loops import PeriodicLoop
from app.settings import Settings
from app.store import Impression, Store, StoreUnavailable, UserData
from models.index import CandidateIndex
from models.learner import DQNLearner
from models.lru import LRUCache
from models.qnet import all_finite
from models.state import N_ITEM_FEATURES, StateLayout

log = logging.getLogger("recsvc.learner")


@dataclass
class PendingImpression:
    imp: Impression
    entry_id: str
    deadline: float
    rewards: dict[str, float] = field(default_factory=dict)  # item -> sum of its rewards


@dataclass
class Transition:
    user_id: str
    state: np.ndarray
    item_id: str
    reward: float
    context: np.ndarray | None
    features: np.ndarray  # the item's per-candidate features when it was shown


def _slot_features(imp: Impression, item_id: str) -> np.ndarray:
    """Per-candidate features the item had when it was placed in this slate."""
    if imp.features:
        return np.asarray(imp.features[imp.item_ids.index(item_id)], dtype=np.float32)
    return np.zeros(N_ITEM_FEATURES, dtype=np.float32)


def _log_record(imp: Impression, rewards: dict[str, float], default: float) -> dict:
    """What off-policy evaluation needs of a closed impression."""
    return {"request_id": imp.request_id, "user_id": imp.user_id, "ts": imp.ts,
            "model_version": imp.model_version, "n_candidates": imp.n_candidates,
            "item_ids": imp.item_ids, "propensities": imp.propensities,
            "explored": imp.explored,
            "rewards": [rewards.get(i, default) for i in imp.item_ids]}


class LearnerWorker:
    def __init__(self, settings: Settings, store: Store, index: CandidateIndex,
                 layout: StateLayout, device: str, run=None, consumer: str | None = None,
                 ) -> None:
        self.settings = settings
        self.store = store
        self.index = index
        self.layout = layout
        # Blocking work runs on the learner's own thread by default, so a long training
        # round never holds a slot of the pool that serves recommendations.
        self._pool = None if run else ThreadPoolExecutor(1, thread_name_prefix="recsvc-learner")
        self.run = run or self._run_on_own_thread
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.learner = DQNLearner(layout.size, layout.dim, settings.dqn, device)
        self.pending: dict[str, PendingImpression] = {}
        # what was learned recently, so entries delivered again after a failed round
        # (still unacknowledged) are not learned twice
        self._done: LRUCache[tuple[str, ...], bool] = LRUCache(200_000)
        self._reread = False
        self._log_backlog: list[dict] = []
        self.version = 0
        self.feedback_learned = 0
        self.transitions = 0
        self._dirty = False
        self._last_publish = float("-inf")  # the first version is due at once
        self._loop = PeriodicLoop("learner", self._iteration, settings.learner_poll_s)

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        await self._resume()
        self._loop.start()

    async def _run_on_own_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def stop(self) -> None:
        """Finish the current round, then publish what was learned since the last
        version, so a SIGTERM loses no learning (unacknowledged events stay pending)."""
        await self._loop.stop()
        try:
            await self.maybe_publish(force=True)
        except StoreUnavailable:
            log.warning("store unreachable at shutdown: unpublished learning is lost; "
                        "its events stay pending and are learned again")
        if self._pool:
            self._pool.shutdown(wait=True)

    async def _resume(self) -> None:
        """Continue from the last published weights and counters, then re-read our pending."""
        try:
            self.version = await self.store.latest_version()
            stats = await self.store.get_stats()
            if self.version:
                blob = await self.store.get_weights(self.version)
                if blob is not None:
                    await self.run(self.learner.load_weights, blob)
            self.feedback_learned = int(stats.get("feedback_learned", 0))
            self.learner.updates = int(stats.get("updates", 0))
            await self.process(await self.store.read_stream(self.consumer, 10_000, pending=True))
        except StoreUnavailable:
            log.warning("store unreachable at learner start; will retry in the loop")

    async def _iteration(self) -> None:
        try:
            if self._reread:
                # a failed round may have left entries delivered to us but unprocessed
                await self.process(await self.store.read_stream(self.consumer, 100_000,
                                                                pending=True))
                self._reread = False
            await self.step()
        except StoreUnavailable as exc:
            log.warning("learner: store unreachable (%s); retrying", exc)
            self._reread = True
            await asyncio.sleep(1.0)  # the store is down: back off, lose nothing

    # -- one round ---------------------------------------------------------------------
    async def step(self, now: float | None = None) -> int:
        """Read new events, learn from what is ready, publish; returns transitions learned."""
        await self.adopt_newer_weights()
        entries = await self.store.read_stream(self.consumer, 1000)
        n = await self.process(entries, now)
        await self.maybe_publish()
        return n

    async def process(self, entries: list, now: float | None = None) -> int:
        """Turn stream entries into transitions, learn from them, then acknowledge.

        Nothing in memory changes until the learning step is done, so a round that
        fails on the store leaves the learner as it was; the entries it read stay
        unacknowledged and are read again (``_reread``). Keys of what was learned
        make the repeat learn nothing twice.
        """
        now = time.time() if now is None else now
        new_imps: dict[str, str] = {}  # request id -> stream entry id
        feedback = []
        for entry_id, f in entries:
            if f.get("type") == "impression":
                new_imps[f["request_id"]] = entry_id
            elif f.get("type") == "feedback":
                feedback.append((entry_id, f))
        wanted = [rid for rid in new_imps if rid not in self.pending] + [
            f["request_id"] for _, f in feedback if f["request_id"] not in self.pending]
        imps = await self.store.get_impressions(list(dict.fromkeys(wanted)))
        acks: list[str] = []
        arriving: dict[str, PendingImpression] = {}
        for rid, entry_id in new_imps.items():
            if rid in self.pending:  # read again after a failed round: already waiting
                continue
            imp = imps.get(rid)
            if imp is None or self._done.get((rid,)):  # expired, erased, or learned already
                acks.append(entry_id)
                continue
            arriving[rid] = PendingImpression(imp, entry_id, imp.ts + self.settings.reward_wait_s)
        waiting = {**self.pending, **arriving}

        transitions: list[Transition] = []
        learned_keys: list[tuple[str, ...]] = []  # feedback events and closed impressions
        rewarded: list[tuple[str, str, float]] = []  # (request id, item id, reward)
        for entry_id, f in feedback:
            acks.append(entry_id)
            key = (f["request_id"], f["item_id"], f["event"])
            if self._done.get(key):  # read again after a failed round: learned already
                continue
            p = waiting.get(f["request_id"])
            imp = p.imp if p else imps.get(f["request_id"])
            if imp is None:
                continue
            if p:
                rewarded.append((f["request_id"], f["item_id"], float(f["reward"])))
            state = np.frombuffer(imp.state, dtype=np.float32)
            transitions.append(Transition(imp.user_id, state, f["item_id"], float(f["reward"]),
                                          context_of(self.layout, state),
                                          _slot_features(imp, f["item_id"])))
            learned_keys.append(key)

        closed: list[dict] = []
        default = self.settings.rewards.default
        closing = [rid for rid, p in waiting.items() if p.deadline <= now]
        # An impression erased meanwhile (DELETE /v1/users on any replica) is dropped
        # unlearned and unlogged.
        still_stored = await self.store.get_impressions(closing) if closing else {}
        for rid in closing:
            p = waiting[rid]
            acks.append(p.entry_id)
            if rid not in still_stored:
                continue
            rewards = dict(p.rewards)
            for r_rid, item_id, reward in rewarded:
                if r_rid == rid:
                    rewards[item_id] = rewards.get(item_id, 0.0) + reward
            state = np.frombuffer(p.imp.state, dtype=np.float32)
            ctx = context_of(self.layout, state)
            for item_id in p.imp.item_ids:
                if item_id not in rewards:
                    transitions.append(Transition(p.imp.user_id, state, item_id, default, ctx,
                                                  _slot_features(p.imp, item_id)))
            closed.append(_log_record(p.imp, rewards, default))
            learned_keys.append((rid,))

        if transitions:
            users = await self.store.get_users(list({t.user_id for t in transitions}))
            ok = await self.run(self._learn, transitions, users, now)
            self._dirty = self._dirty or ok
        # learned: commit to memory; from here on, nothing is learned twice
        self.pending.update(arriving)
        for r_rid, item_id, reward in rewarded:
            if r_rid in self.pending:
                rw = self.pending[r_rid].rewards
                rw[item_id] = rw.get(item_id, 0.0) + reward
        for rid in closing:
            self.pending.pop(rid, None)
        for key in learned_keys:
            self._done.put(key, True)
        self.feedback_learned += sum(len(k) == 3 for k in learned_keys)
        self.transitions += len(transitions)
        # closed impressions wait here until the log has them (a failed append is retried)
        self._log_backlog.extend(closed)
        if self._log_backlog:
            await self.store.append_log(self._log_backlog, self.settings.ope_log_size)
            self._log_backlog = []
        await self.store.ack(acks)
        return len(transitions)

    def _learn(self, transitions: list[Transition], users: dict[str, UserData],
               now: float) -> bool:
        s = self.settings
        known, embeddings = self.index.vectors_of([t.item_id for t in transitions])
        keep = set(known)
        rows = [t for t in transitions if t.item_id in keep]  # deleted items: nothing to learn
        if not rows:
            return False
        # vectors_of keeps order and drops unknown ids, so embeddings align with rows
        actions = np.concatenate([embeddings, np.stack([t.features for t in rows])], axis=1)
        next_states = {}
        for t in rows:
            key = (t.user_id, None if t.context is None else t.context.tobytes())
            if key not in next_states:
                next_states[key] = user_state(self.layout, users[t.user_id], t.context,
                                              self.index, s.rewards, s.history_len,
                                              s.history_decay, now)
        states = np.stack([t.state for t in rows])
        nexts = np.stack([next_states[(t.user_id, None if t.context is None
                                       else t.context.tobytes())] for t in rows])
        rewards = np.array([t.reward for t in rows], dtype=np.float32)
        slots = self.learner.add(states, actions, rewards, nexts)
        return self.learner.train(self._next_actions, slots)

    def _next_actions(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Online argmax at s': the top inner-product item for the online query."""
        found = self.index.search(queries, 1)
        actions = np.zeros((len(queries), self.layout.dim), dtype=np.float32)
        valid = np.zeros(len(queries), dtype=bool)
        for i, (ids, vecs) in enumerate(found):
            if ids:
                actions[i] = vecs[0]
                valid[i] = True
        return actions, valid

    # -- publishing --------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        return {"version": self.version, "updates": self.learner.updates,
                "feedback_learned": self.feedback_learned,
                "pending_impressions": len(self.pending),
                "transitions": self.transitions,
                "rejected_updates": self.learner.rejected_updates}

    async def maybe_publish(self, force: bool = False) -> bool:
        """Publish a new version if learning changed the weights (and they are finite)."""
        due = time.monotonic() - self._last_publish >= self.settings.publish_interval_s
        if not self._dirty or not (due or force):
            await self.store.put_stats(self.stats())
            return False
        if await self.adopt_newer_weights():
            return False  # a rollback happened meanwhile: what was learned on top is dropped
        if not all_finite(self.learner.online):
            log.error("weights are not finite: not published; version %d keeps serving and "
                      "the learner goes back to it", self.version)
            self.learner.rejected_updates += 1
            await self._reload_published()
            self._dirty = False
            return False
        blob = await self.run(self.learner.weights)
        parent = self.version
        self.version += 1
        await self.store.publish_weights(self.version, blob, self.stats(), parent=parent,
                                         keep=self.settings.weights_kept)
        self._dirty = False
        self._last_publish = time.monotonic()
        return True

    async def adopt_newer_weights(self) -> bool:
        """Follow a version this learner did not publish (a rollback through the API):
        continue learning from it instead of overwriting it."""
        latest = await self.store.latest_version()
        if latest <= self.version:
            return False
        blob = await self.store.get_weights(latest)
        if blob is None:
            return False
        await self.run(self.learner.load_weights, blob)
        log.info("learner continues from version %d (published elsewhere)", latest)
        self.version = latest
        self._dirty = False
        return True

    async def _reload_published(self) -> None:
        blob = await self.store.get_weights(self.version) if self.version else None
        if blob is not None:
            await self.run(self.learner.load_weights, blob)
        else:
            await self.run(self.learner.reset_weights)
