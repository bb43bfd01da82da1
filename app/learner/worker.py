"""The learner: joins feedback with impressions and turns them into DQN updates.

It consumes the store's event stream (consumer-group semantics). A feedback event
becomes a transition at once; when an impression's reward window closes, every
slate item that got no feedback becomes a transition with the default reward.

Exactly one learner learns at a time: the one holding the lease in the store; any
others wait as standbys and take over when the lease expires (``lease_ttl_s``
after the holder's last renewal, a SIGKILL included). Stream entries are
acknowledged only in ``ModelRegistry.commit_learning``, together with the weights version
that holds their learning and the counters, atomically and only while the lease is
still this learner's. So learning that was never committed is redone by the next
holder from the entries still pending (claimed with XAUTOCLAIM), and every event
is in the published weights exactly once.

New weights are published at most every ``publish_interval_s``, and only when
finite; serving processes pick them up from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from app.clock import SYSTEM_CLOCK, Clock
from app.loops import PeriodicLoop
from app.settings import Settings
from app.store import Impression, Store, StoreUnavailable, UserData
from app.store.base import VersionConflict, WeightsUpdate
from app.user_state import context_of, user_state
from models.adaptation import AdaptationLearner, rule_features
from models.ensemble import EnsembleLearner, linear_features
from models.index import CandidateIndex
from models.learner import DQNLearner
from models.lru import LRUCache
from models.qnet import all_finite
from models.rewards import HEAD_OF_EVENT
from models.state import N_ITEM_FEATURES, StateLayout

log = logging.getLogger("recsvc.learner.worker")


SWEEP_EVERY_S = 10.0  # how often the lease holder claims entries stuck on other consumers
# up to this many items, next actions come from one matrix product over a copy of the
# servable embeddings (64 queries x 50k items: about 1.2 GFLOP, tens of ms on one core)
SNAPSHOT_MAX = 50_000


@dataclass
class PendingImpression:
    imp: Impression
    entry_id: str
    deadline: float


@dataclass
class Transition:
    user_id: str
    state: np.ndarray
    item_id: str
    reward: np.ndarray  # (heads,): one entry per head of the Q-network
    context: np.ndarray | None
    mask: np.ndarray  # (heads,): 1 for the heads this transition trains
    slot: SlotRecord  # where and how the item was shown


@dataclass(frozen=True)
class SlotRecord:
    """What the impression logged of the slot an item was shown in."""

    index: int             # the slot, 0 at the top
    propensity: float      # the probability the item was placed there
    features: np.ndarray   # the item's per-candidate features then
    sources: int = 0       # the candidate sources that retrieved it (bitmask; 0: unknown)
    depth: int = 0         # its rank in that source's list
    explored: bool = False  # placed by the random branch

    @classmethod
    def of(cls, imp: Impression, item_id: str) -> SlotRecord:
        j = imp.item_ids.index(item_id)
        features = np.zeros(N_ITEM_FEATURES, dtype=np.float32)
        if imp.features:  # an older release's layout is cut or padded to this one's
            logged = np.asarray(imp.features[j], dtype=np.float32)[:N_ITEM_FEATURES]
            features[: len(logged)] = logged
        return cls(j, float(imp.propensities[j]) if imp.propensities else 1.0, features,
                   imp.sources[j] if imp.sources else 0, imp.depths[j] if imp.depths else 0,
                   bool(imp.explored[j]) if imp.explored else False)


def _feedback_target(heads: tuple[str, ...], event: str, reward: float
                     ) -> tuple[np.ndarray, np.ndarray] | None:
    """``(reward, mask)`` of a feedback event: with one head the reward itself; with
    heads, the reward for the event's head and nothing said of the others (None when
    the event's head is not one of them: not learned)."""
    if not heads:
        return np.array([reward], np.float32), np.ones(1, np.float32)
    if HEAD_OF_EVENT[event] not in heads:
        return None
    r, mask = np.zeros(len(heads), np.float32), np.zeros(len(heads), np.float32)
    h = heads.index(HEAD_OF_EVENT[event])
    r[h], mask[h] = reward, 1.0
    return r, mask


@dataclass
class LearningRound:
    """What one read of the stream amounts to, before any of it is committed."""

    acks: list[str] = field(default_factory=list)          # stream entries to acknowledge
    transitions: list[Transition] = field(default_factory=list)
    # feedback events (request, item, event) and closed impressions (request,)
    learned_keys: list[tuple[str, ...]] = field(default_factory=list)
    closed: list[dict] = field(default_factory=list)       # evaluation-log records
    # closed slates an ensemble arm served: (arm, its propensity, the items' rewards)
    arm_slates: list[tuple[int, float, np.ndarray]] = field(default_factory=list)


def _silence_targets(heads: tuple[str, ...], imp: Impression, default: float
                     ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """When the reward window closes: item id -> ``(reward, mask)`` of what did not
    happen. With one head, every item without feedback gets the default reward. With
    several, every item trains the heads that got no event towards 0 (the click head
    towards the default), so a clicked item that was not bought teaches the purchase
    head that it was not. Items rewarded before events were recorded are left out."""
    out = {}
    for item_id in imp.item_ids:
        if not heads:
            if item_id not in imp.rewards:
                out[item_id] = np.array([default], np.float32), np.ones(1, np.float32)
            continue
        if item_id in imp.rewards and item_id not in imp.events:
            continue
        hit = {HEAD_OF_EVENT[e] for e in imp.events.get(item_id, ())}
        mask = np.array([h not in hit for h in heads], np.float32)
        if mask.any():
            r = np.zeros(len(heads), np.float32)
            if "click" in heads and "click" not in hit:
                r[heads.index("click")] = default
            out[item_id] = r, mask
    return out


def displayed(stored: Impression, feedback_counts: bool = False) -> set[str] | None:
    """The items of a ``defer_seen`` slate that were displayed: those ``POST /v1/seen``
    named (and, with ``feedback_counts``, those that got feedback). None for a slate
    that was not deferred: all of it was."""
    if not stored.deferred:
        return None
    shown = set(stored.seen) & set(stored.item_ids)
    return shown | set(stored.rewards) | set(stored.events) if feedback_counts else shown


def _serving_arm(stored: Impression) -> int | None:
    """The ensemble arm that served a slate (an index into ``ARMS``), or None: no
    ensemble, a request without exploration, or a slate logged by an older release
    (whose ``agents`` were top-k masks of several agents)."""
    bits = set(stored.agents)
    if len(bits) != 1:
        return None
    bit = bits.pop()
    return bit.bit_length() - 1 if bit > 0 and bit & (bit - 1) == 0 else None


def _log_record(imp: Impression, rewards: dict[str, float], default: float,
                shown: set[str] | None = None) -> dict | None:
    """What off-policy evaluation needs of a closed impression. Of a deferred slate,
    the slots down to the last of an unbroken run of displayed ones from the top
    (slot-by-slot estimators need every slot above a logged one), or None without
    one."""
    n = len(imp.item_ids)
    if shown is not None:
        n = next((j for j, i in enumerate(imp.item_ids) if i not in shown), n)
        if n == 0:
            return None
    return {"request_id": imp.request_id, "user_id": imp.user_id, "ts": imp.ts,
            "model_version": imp.model_version, "n_candidates": imp.n_candidates,
            "item_ids": imp.item_ids[:n], "propensities": imp.propensities[:n],
            "explored": imp.explored[:n],
            "rewards": [rewards.get(i, default) for i in imp.item_ids[:n]]}


class LearnerWorker:
    def __init__(self, settings: Settings, store: Store, index: CandidateIndex,
                 layout: StateLayout, device: str, run=None, consumer: str | None = None,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.settings = settings
        self.clock = clock
        self.store = store
        self.index = index
        self.layout = layout
        # Blocking work runs on the learner's own thread by default, so a long training
        # round never holds a slot of the pool that serves recommendations.
        self._pool = None if run else ThreadPoolExecutor(1, thread_name_prefix="recsvc-learner")
        self.run = run or self._run_on_own_thread
        # unique per process lifetime: the lease names its holder with it
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.active = False  # holds the lease
        self.takeovers = 0
        self.claimed = 0  # entries taken over from earlier holders
        self._next_sweep = 0.0
        self.learner = DQNLearner(layout.size, layout.dim, settings.dqn, device)
        self._snapshot: tuple[int, np.ndarray] = (-1, np.zeros((0, layout.dim), np.float32))
        self.ensemble = EnsembleLearner() if settings.ensemble_on else None
        self.adaptation = AdaptationLearner() if settings.adaptation else None
        self.pending: dict[str, PendingImpression] = {}
        # what was learned recently, so entries delivered again after a failed round
        # (still unacknowledged) are not learned twice
        self._done: LRUCache[tuple[str, ...], bool] = LRUCache(200_000)
        self._reread = False
        # learned but not committed yet: entries to acknowledge and closed impressions
        # for the evaluation log, written with the next commit
        self._acks: list[str] = []
        self._log_backlog: list[dict] = []
        self.version = 0
        self.feedback_learned = 0
        self.transitions = 0
        self._dirty = False
        self._last_publish = float("-inf")  # the first version is due at once
        self._published_at = 0.0  # wall-clock time of this learner's latest version
        self._loop = PeriodicLoop("learner", self.learn_round, settings.learner_poll_s)
        # renews the lease while a long round (a backlog, a big training batch) runs, so
        # the lease outlives rounds longer than its TTL
        self._keeper = PeriodicLoop("learner-lease", self._renew, settings.lease_ttl_s / 4)

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Start the loop; its first round takes the lease if it is free."""
        self._loop.start()
        self._keeper.start()

    async def _run_on_own_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def stop(self) -> None:
        """Finish the current round, commit what was learned since the last version,
        then hand the lease over, so a SIGTERM loses no learning and a standby takes
        over at once (uncommitted events stay pending and are learned again)."""
        await self._loop.stop()
        await self._keeper.stop()
        try:
            if self.active:
                if await self.commit(force=True):
                    log.info("learner %s committed version %d at shutdown (%d feedback "
                             "events learned)", self.consumer, self.version,
                             self.feedback_learned)
                await self.store.registry.release_lease(self.consumer)
        except StoreUnavailable:
            log.warning("store unreachable at shutdown: uncommitted learning is lost; "
                        "its events stay pending and are learned again")
        if self._pool:
            self._pool.shutdown(wait=True)

    async def learn_round(self) -> None:
        """One round of the learner loop: hold the lease, then read, learn, commit."""
        try:
            if not await self.hold_lease():
                return  # a standby: another learner holds the lease
            if self._reread:
                # a failed round may have left entries delivered to us but unprocessed
                await self._process_all(await self.store.stream.read_stream(
                    self.consumer, 1_000_000, pending=True))
                self._reread = False
            await self.step()
        except StoreUnavailable as exc:
            log.warning("learner: store unreachable (%s); retrying", exc)
            self._reread = True
            await asyncio.sleep(1.0)  # the store is down: back off, lose nothing

    # -- the lease ---------------------------------------------------------------------
    async def hold_lease(self) -> bool:
        """Renew the lease (or take it when free); take over or step down on a change."""
        held = await self.store.registry.hold_lease(self.consumer, self.settings.lease_ttl_s)
        if held and not self.active:
            await self._take_over()
        elif not held and self.active:
            self._step_down("another learner holds the lease")
        return held

    async def _renew(self) -> None:
        """Extend the lease while active. Losing it is acted on by the next round
        (``hold_lease`` steps down); meanwhile commits are refused by the store."""
        if self.active:
            with contextlib.suppress(StoreUnavailable):
                await self.store.registry.hold_lease(self.consumer, self.settings.lease_ttl_s)

    async def _take_over(self) -> None:
        """Continue from the published weights and counters, then learn what the previous
        holder read but never committed: its entries are still pending, so claim them."""
        self._forget()
        self.version = await self.store.registry.latest_version()
        stats = await self.store.registry.get_stats()
        if self.version:
            blob = await self.store.registry.get_weights(self.version)
            if blob is not None:
                await self._load(blob, self.version)
        self.feedback_learned = int(stats.get("feedback_learned", 0))
        self.transitions = int(stats.get("transitions", 0))
        self.learner.updates = int(stats.get("updates", 0))
        self.active = True
        self.takeovers += 1
        claimed = await self.store.stream.claim_stream(self.consumer, 0.0, 1_000_000)
        self.claimed += len(claimed)
        log.info("learner %s holds the lease: continues from version %d, %d pending "
                 "entries claimed", self.consumer, self.version, len(claimed))
        await self._process_all(claimed)

    def _step_down(self, why: str) -> None:
        log.warning("learner %s stops learning: %s; uncommitted learning is left to the "
                    "holder", self.consumer, why)
        self.active = False
        self._forget()

    def _forget(self) -> None:
        """Drop what was learned but not committed (the lease holder redoes it)."""
        self.pending.clear()
        self._done.clear()
        self._acks = []
        self._log_backlog = []
        self._dirty = False
        self._reread = False

    async def _process_all(self, entries: list) -> None:
        """Learn a backlog in rounds of ``learner_read_count`` entries, committing between
        rounds, so a long backlog neither loses the lease nor holds its acks."""
        chunk = self.settings.learner_read_count
        for start in range(0, len(entries), chunk):
            if not self.active or not await self.hold_lease():
                return
            await self.process(entries[start:start + chunk])
            await self.commit()

    async def _sweep(self) -> list:
        """Now and then, claim entries stuck on another consumer: a learner that lost the
        lease may have read entries after the holder's takeover claim and will never
        commit them. Entries of our own that wait for their reward window come back too
        and are recognised as waiting."""
        if self.clock.monotonic() < self._next_sweep:
            return []
        self._next_sweep = self.clock.monotonic() + SWEEP_EVERY_S
        s = self.settings
        stuck_s = s.reward_wait_s + 2 * s.lease_ttl_s + s.publish_interval_s
        return await self.store.stream.claim_stream(self.consumer, stuck_s, s.learner_read_count)

    # -- one round ---------------------------------------------------------------------
    async def step(self, now: float | None = None) -> int:
        """Read new events, learn from what is ready, publish; returns transitions learned."""
        await self.adopt_newer_weights()
        entries = await self.store.stream.read_stream(self.consumer,
                                                      self.settings.learner_read_count)
        entries += await self._sweep()
        n = await self.process(entries, now)
        await self.commit()
        return n

    async def process(self, entries: list, now: float | None = None) -> int:
        """Turn stream entries into transitions and learn from them; their
        acknowledgements wait for the commit of that learning.

        Nothing in memory changes until the learning step is done, so a round that
        fails on the store leaves the learner as it was; the entries it read stay
        unacknowledged and are read again (``_reread``). Keys of what was learned
        make the repeat learn nothing twice.
        """
        now = self.clock.time() if now is None else now
        new_imps: dict[str, str] = {}  # request id -> stream entry id
        feedback = []
        for entry_id, f in entries:
            if f.get("type") == "impression":
                new_imps[f["request_id"]] = entry_id
            elif f.get("type") == "feedback":
                feedback.append((entry_id, f))
        wanted = [rid for rid in new_imps if rid not in self.pending] + [
            f["request_id"] for _, f in feedback if f["request_id"] not in self.pending]
        imps = await self.store.impressions.get_impressions(list(dict.fromkeys(wanted)))
        out = LearningRound()
        arriving = self._arriving(new_imps, imps, out)
        waiting = {**self.pending, **arriving}
        self._feedback_transitions(feedback, waiting, imps, out)
        closing = [rid for rid, p in waiting.items() if p.deadline <= now]
        await self._closing_transitions(closing, waiting, out)

        if out.transitions:
            users = await self.store.users.get_users(list({t.user_id for t in out.transitions}))
            ok = await self.run(self._learn, out.transitions, users, now)
            self._dirty = self._dirty or ok
        if out.arm_slates and self.ensemble is not None:
            arms, propensities, rewards = zip(*out.arm_slates, strict=True)
            await self.run(self.ensemble.update_arms, np.array(arms), np.array(propensities),
                           list(rewards))
            self._dirty = True
        # learned: commit to memory; from here on, nothing is learned twice
        self.pending.update(arriving)
        for rid in closing:
            self.pending.pop(rid, None)
        for learned in out.learned_keys:
            self._done.put(learned, True)
        self.feedback_learned += sum(len(k) == 3 for k in out.learned_keys)
        self.transitions += len(out.transitions)
        # closed impressions and acknowledgements wait for the commit of this learning
        self._log_backlog.extend(out.closed)
        self._acks.extend(out.acks)
        return len(out.transitions)

    def _arriving(self, new_imps: dict[str, str], imps: dict[str, Impression],
                  out: LearningRound) -> dict[str, PendingImpression]:
        """The impressions of this read that start waiting for their rewards; those
        expired, erased or learned already are only acknowledged."""
        arriving: dict[str, PendingImpression] = {}
        for rid, entry_id in new_imps.items():
            if rid in self.pending:  # read again after a failed round: already waiting
                continue
            imp = imps.get(rid)
            if imp is None or self._done.get((rid,)):  # expired, erased, or learned already
                out.acks.append(entry_id)
                continue
            arriving[rid] = PendingImpression(imp, entry_id, imp.ts + self.settings.reward_wait_s)
        return arriving

    def _feedback_transitions(self, feedback: list, waiting: dict[str, PendingImpression],
                              imps: dict[str, Impression], out: LearningRound) -> None:
        """A transition per feedback event, on the state its impression logged."""
        this_round: set[tuple[str, ...]] = set()
        for entry_id, f in feedback:
            out.acks.append(entry_id)
            key = (f["request_id"], f["item_id"], f["event"])
            # read again after a failed round, or a retry's repeated stream entry (a
            # client retrying while its first delivery was still pending, in this read
            # or an earlier one): learned once
            if key in this_round or self._done.get(key):
                continue
            this_round.add(key)
            p = waiting.get(f["request_id"])
            imp = p.imp if p else imps.get(f["request_id"])
            if imp is None:
                continue
            target = _feedback_target(self.settings.heads, f["event"], float(f["reward"]))
            out.learned_keys.append(key)
            if target is None:  # an event of a head this network does not have
                continue
            if imp.deferred and not self.settings.heads:
                continue  # learned when the window closes, if the item was displayed
            state = np.frombuffer(imp.state, dtype=np.float32)
            reward, mask = target
            out.transitions.append(Transition(imp.user_id, state, f["item_id"], reward,
                                              context_of(self.layout, state), mask,
                                              SlotRecord.of(imp, f["item_id"])))

    async def _closing_transitions(self, closing: list[str],
                                   waiting: dict[str, PendingImpression],
                                   out: LearningRound) -> None:
        """The silent slots of impressions whose reward window closed (the default
        reward), and their records for the evaluation log.

        An impression erased meanwhile (DELETE /v1/users on any replica) is dropped
        unlearned and unlogged. The stored impression carries the rewards of the
        feedback accepted for it, whichever learner read that feedback."""
        default = self.settings.rewards.default
        still_stored = await self.store.impressions.get_impressions(closing) if closing else {}
        for rid in closing:
            p = waiting[rid]
            out.acks.append(p.entry_id)
            if rid not in still_stored:
                continue
            stored = still_stored[rid]
            state = np.frombuffer(p.imp.state, dtype=np.float32)
            ctx = context_of(self.layout, state)
            shown = displayed(stored, bool(self.settings.heads))
            for item_id, (reward, mask) in self._closing_targets(stored, shown).items():
                out.transitions.append(Transition(p.imp.user_id, state, item_id, reward, ctx,
                                                  mask, SlotRecord.of(p.imp, item_id)))
            arm = _serving_arm(stored)
            if arm is not None:
                out.arm_slates.append((arm, stored.arm_propensity, np.array(
                    [stored.rewards.get(i, default) for i in stored.item_ids
                     if shown is None or i in shown], dtype=np.float64)))
            record = _log_record(p.imp, stored.rewards, default, shown)
            if record is not None:
                out.closed.append(record)
            out.learned_keys.append((rid,))

    def _closing_targets(self, stored: Impression, shown: set[str] | None
                         ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Item id -> ``(reward, mask)`` learned when a slate's window closes: its silent
        items' default reward; of a deferred slate (one head), every displayed item with
        the rewards of its feedback, or the default, and nothing else."""
        default = self.settings.rewards.default
        if shown is None or self.settings.heads:
            targets = _silence_targets(self.settings.heads, stored, default)
            return {i: t for i, t in targets.items() if shown is None or i in shown}
        return {i: (np.array([stored.rewards.get(i, default)], np.float32),
                    np.ones(1, np.float32)) for i in stored.item_ids if i in shown}

    def _learn(self, transitions: list[Transition], users: dict[str, UserData],
               now: float) -> bool:
        s = self.settings
        known, embeddings = self.index.vectors_of([t.item_id for t in transitions])
        keep = set(known)
        rows = [t for t in transitions if t.item_id in keep]  # deleted items: nothing to learn
        if not rows:
            return False
        # vectors_of keeps order and drops unknown ids, so embeddings align with rows
        feats = np.stack([t.slot.features for t in rows])
        actions = np.concatenate([embeddings, feats], axis=1)
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
        rewards = np.stack([t.reward for t in rows])
        slots = self.learner.add(states, actions, rewards, nexts,
                                 mask=np.stack([t.mask for t in rows]))
        self._learn_options(states, actions, rewards[:, 0], [t.slot for t in rows])
        return self.learner.train(self._next_actions, slots,
                                  max_steps=self.settings.max_steps_per_round)

    def _learn_options(self, states: np.ndarray, actions: np.ndarray, rewards: np.ndarray,
                       logged: list[SlotRecord]) -> None:
        """The ensemble's and the adaptation rule's updates, from one reward per
        transition (settings refuse either option with several heads), before the
        network's own steps: the rule fits the residuals of the network it corrects."""
        d = self.layout.dim
        if self.ensemble is not None:
            x = linear_features(self.layout, states, actions[:, :d], actions[:, d:])
            self.ensemble.update(
                x, rewards.astype(np.float64),
                np.array([s.propensity for s in logged]),
                np.array([s.index for s in logged], dtype=np.float64),
                np.array([s.sources for s in logged], dtype=np.int64),
                np.array([s.depth for s in logged], dtype=np.float64),
                np.array([not s.explored for s in logged]))
        if self.adaptation is not None:
            phi = rule_features(self.layout, states, actions[:, d:])
            if phi.any():
                self.adaptation.update(phi, rewards - self.learner.q_of(states, actions))

    def _next_actions(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Online argmax at s': the top inner-product item for the online query.

        Up to ``SNAPSHOT_MAX`` servable items, one matrix product against a copy of
        their embeddings taken when the catalog changes (no index lock per step: the
        serving threads hold it for their searches); above it, the index's search."""
        if len(self.index) <= SNAPSHOT_MAX:
            if self._snapshot[0] != self.index.version:
                self._snapshot = self.index.servable_vectors()
            vectors = self._snapshot[1]
            if not len(vectors):
                return (np.zeros((len(queries), self.layout.dim), dtype=np.float32),
                        np.zeros(len(queries), dtype=bool))
            best = (queries @ vectors.T).argmax(1)
            return vectors[best], np.ones(len(queries), dtype=bool)
        found = self.index.search(queries, 1)
        actions = np.zeros((len(queries), self.layout.dim), dtype=np.float32)
        valid = np.zeros(len(queries), dtype=bool)
        for i, (rows, vecs) in enumerate(found):
            if len(rows):
                actions[i] = vecs[0]
                valid[i] = True
        return actions, valid

    # -- publishing --------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        return {"version": self.version, "updates": self.learner.updates,
                "feedback_learned": self.feedback_learned,
                "pending_impressions": len(self.pending),
                "transitions": self.transitions,
                "rejected_updates": self.learner.rejected_updates,
                **({"loss": self.learner.last_loss} if math.isfinite(self.learner.last_loss)
                   else {}),
                **({"published_at": self._published_at} if self._published_at else {})}

    async def commit(self, force: bool = False) -> bool:
        """Write what was learned: a new weights version (when learning changed the
        weights, they are finite and one is due), the counters and closed impressions,
        and acknowledge the entries they came from, in one step. While a version is
        not due, learning and its acknowledgements wait. Returns whether a version was
        published."""
        due = self.clock.monotonic() - self._last_publish >= self.settings.publish_interval_s
        if self._dirty and not (due or force):
            return False
        weights = None
        # (a rollback meanwhile: what was learned on top of the old version is dropped)
        if self._dirty and not await self.adopt_newer_weights():
            if all_finite(self.learner.online):
                blob = await self.run(self.learner.weights, self._option_tensors())
                weights = WeightsUpdate(self.version + 1, blob, parent=self.version,
                                        keep=self.settings.weights_kept,
                                        expected=self.version)
            else:
                log.error("weights are not finite: not published; version %d keeps "
                          "serving and the learner goes back to it", self.version)
                await self._reload_published()
                self._dirty = False
                # counted once the learner is back on the published weights: whoever
                # watches the count (the stats, a test) then sees it recovered, too
                self.learner.rejected_updates += 1
        acks = list(dict.fromkeys(self._acks))
        stats = {**self.stats(), "version": weights.version if weights else self.version}
        now = self.clock.time()
        if weights is not None:
            stats["published_at"] = now
        # stores merge stats: a loss that stopped being finite must not stay shown
        stats.setdefault("loss", float("nan"))
        try:
            committed = await self.store.registry.commit_learning(
                self.consumer, acks, stats, self._log_backlog, self.settings.ope_log_size,
                weights)
        except VersionConflict:
            # a rollback was published since the check above, or the store lost the
            # versions this learner published (a failover to a replica behind, a
            # restart without persistence): follow the former, resync to the latter
            await self.adopt_newer_weights()
            return False
        if not committed:
            self._step_down("the lease was lost before the commit")
            await self._reload_published()
            return False
        self._acks, self._log_backlog = [], []
        if weights is None:
            return False
        self._dirty = False
        self.version = weights.version
        self._last_publish = self.clock.monotonic()
        self._published_at = now
        return True

    def _option_tensors(self) -> dict | None:
        """The options' learned state, saved in the weights blob beside the network."""
        out = {}
        for option in (self.ensemble, self.adaptation):
            if option is not None:
                out.update(option.tensors())
        return out or None

    async def adopt_newer_weights(self) -> bool:
        """Follow a version this learner did not publish (a rollback through the API):
        continue learning from it instead of overwriting it (or, if the store's latest is
        older than this learner's, resync to it; False then too). What was learned on top of
        the version it replaces and not committed yet is dropped, and so are those
        entries' acknowledgements: they are read again and learned on top of it."""
        latest = await self.store.registry.latest_version()
        if latest < self.version:
            # the store lost the versions this learner published (a failover to a replica
            # behind, a restart without persistence): its weights are the newest there
            # are, published on top of the store's latest (comparing against a version
            # the store no longer has, every commit would conflict for ever)
            log.warning("the store's latest version is %d, this learner published %d: the "
                        "store lost data; publishing on top of %d", latest, self.version,
                        latest)
            self.version = latest
            self._dirty = True
            return False
        if latest == self.version:
            return False
        blob = await self.store.registry.get_weights(latest)
        if blob is None:
            return False
        if await self._load(blob, latest):
            log.info("learner continues from version %d (published elsewhere)", latest)
        self.version = latest
        if self._dirty or self._acks or self._log_backlog:
            self._forget()
            self._reread = True
        self._dirty = False
        return True

    async def _reload_published(self) -> None:
        blob = await self.store.registry.get_weights(self.version) if self.version else None
        if blob is None or not await self._load(blob, self.version):
            await self.run(self.learner.reset_weights)

    async def _load(self, blob: bytes, version: int) -> bool:
        """Continue from published weights, unless their shape is not this release's:
        then they are not loaded, and the next version this learner publishes
        replaces them."""
        extra = await self.run(self.learner.load_published, blob)
        if extra is not None:
            # the options continue from what this version saved, or start fresh
            if self.ensemble is not None:
                self.ensemble = EnsembleLearner()
                self.ensemble.load(extra)
            if self.adaptation is not None:
                self.adaptation = AdaptationLearner()
                self.adaptation.load(extra)
            return True
        log.warning("weights version %d have another shape (another feature layout or "
                    "encoder): not loaded; the next version published replaces them", version)
        return False
