"""A fixed-size ring buffer of transitions, stored as preallocated numpy arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Batch:
    states: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray  # (B, heads)
    next_states: np.ndarray
    done: np.ndarray
    mask: np.ndarray  # (B, heads): 1 where the transition says something of that head


class ReplayBuffer:
    """Transitions ``(s, a, r, s', done, mask)``; ``a`` is the item's embedding, not its
    id, so a deleted or re-embedded item never invalidates stored experience.

    ``r`` has one entry per head of a multi-task network; ``mask`` says which heads a
    transition trains (a purchase event says nothing about the click head)."""

    def __init__(self, capacity: int, state_dim: int, action_dim: int, seed: int = 0,
                 heads: int = 1) -> None:
        self.capacity = capacity
        self.heads = heads
        self.states = np.zeros((capacity, state_dim), dtype=np.float32)
        self.actions = np.zeros((capacity, action_dim), dtype=np.float32)
        self.rewards = np.zeros((capacity, heads), dtype=np.float32)
        self.next_states = np.zeros((capacity, state_dim), dtype=np.float32)
        self.done = np.zeros(capacity, dtype=np.float32)
        self.mask = np.zeros((capacity, heads), dtype=np.float32)
        self._next = 0
        self._size = 0
        self.total_added = 0
        self._rng = np.random.default_rng(seed)

    def prefault(self) -> None:
        """Commit every page of the buffer now.

        ``np.zeros`` memory is mapped lazily, so without this a service's resident
        memory climbs by the buffer's full size (hundreds of MB at the default
        capacity) over its first minutes of traffic. Committing it up front makes a
        replica's footprint flat from start-up, lets a memory leak show as growth,
        and makes an undersized container fail at start rather than after an hour.
        """
        for array in self._arrays:
            array.fill(0.0)

    @property
    def _arrays(self) -> tuple[np.ndarray, ...]:
        return self.states, self.actions, self.rewards, self.next_states, self.done, self.mask

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays)

    def __len__(self) -> int:
        return self._size

    def add(self, states: np.ndarray, actions: np.ndarray, rewards: np.ndarray,
            next_states: np.ndarray, done: np.ndarray | None = None,
            mask: np.ndarray | None = None) -> np.ndarray:
        """Append a batch; returns the slots written (to sample the newest first).

        ``rewards`` is ``(n,)`` for one head or ``(n, heads)``; no ``mask`` trains
        every head on every transition."""
        n = len(rewards)
        slots = (self._next + np.arange(n)) % self.capacity
        self.states[slots] = states
        self.actions[slots] = actions
        self.rewards[slots] = np.asarray(rewards, dtype=np.float32).reshape(n, -1)
        self.next_states[slots] = next_states
        self.done[slots] = 0.0 if done is None else done
        self.mask[slots] = 1.0 if mask is None else mask
        self._next = int((self._next + n) % self.capacity)
        self._size = min(self._size + n, self.capacity)
        self.total_added += n
        return slots

    def sample(self, size: int, include: np.ndarray | None = None) -> Batch:
        """Uniform sample of ``size`` slots, always containing ``include`` (new data first)."""
        include = np.zeros(0, dtype=np.int64) if include is None else include[:size]
        rest = self._rng.integers(0, self._size, size=max(size - len(include), 0))
        idx = np.concatenate([include, rest]).astype(np.int64)
        return Batch(self.states[idx], self.actions[idx], self.rewards[idx],
                     self.next_states[idx], self.done[idx], self.mask[idx])
