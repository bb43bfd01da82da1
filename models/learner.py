"""Incremental DQN over slates: replay, target network, Double-DQN target, Huber loss.

A transition is ``(s, a, r, s')`` for one item ``a`` shown in the slate at state
``s``. Because Q(s, a) = V(s) + q(s) . e_a, the online argmax over the catalog at
``s'`` is the top inner-product item for the online query, which the caller's
``next_action_fn`` retrieves from the candidate index; the target network then
values that action (Double DQN). Updates are a few gradient steps per batch of
new transitions: never a retrain on the request path.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.qnet import (
    HIDDEN,
    QNetwork,
    all_finite,
    split_weights,
    weights_shape,
    weights_to_bytes,
)
from models.replay import ReplayBuffer

# (B, d) online retrieval queries -> (B, d) embeddings of the next actions, (B,) valid mask
NextActionFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class DQNConfig:
    """The learner's settings. These defaults are the service's: ``app.settings.Settings``
    takes its learning defaults from here (as ``RECSVC_GAMMA`` and so on), so the two
    cannot disagree."""

    gamma: float = 0.3
    lr: float = 1e-3
    batch_size: int = 64
    buffer_size: int = 50_000
    steps_per_batch: int = 0
    # minibatch draws per new transition (each minibatch is half new data): 1 puts each
    # new transition in one minibatch; more replays the recent past more per event
    replay_ratio: float = 3.0
    huber_delta: float = 1.0
    grad_clip: float = 5.0
    target_tau: float = 0.01
    hidden: int = HIDDEN
    seed: int = 0
    prefault_buffer: bool = True
    # multi-task: heads of the Q-network, and their weights in the ranking value (the
    # online argmax at s' ranks as the server does); one head = a single objective
    heads: int = 1
    head_weights: tuple[float, ...] = ()


class DQNLearner:
    """Owns the online and target networks, the optimiser and the replay buffer."""

    def __init__(self, state_dim: int, item_dim: int, config: DQNConfig | None = None,
                 device: str = "cpu") -> None:
        self.config = config or DQNConfig()
        self.device = device
        self.item_dim = item_dim
        self.state_dim = state_dim
        torch.manual_seed(self.config.seed)
        self.online = self._fresh_network()
        self.target = copy.deepcopy(self.online).eval()
        self.optim = self._optimizer()
        self.buffer = ReplayBuffer(self.config.buffer_size, state_dim, self.online.action_dim,
                                   seed=self.config.seed, heads=self.config.heads)
        if self.config.prefault_buffer:
            self.buffer.prefault()
        self.updates = 0
        self._owed = 0.0  # gradient steps owed to new transitions, carried between rounds
        self.rejected_updates = 0
        self.last_loss = float("nan")
        self._good = self._checkpoint()

    # -- weights -----------------------------------------------------------------
    def _fresh_network(self) -> QNetwork:
        cfg = self.config
        net = QNetwork(self.state_dim, self.item_dim, cfg.hidden, heads=cfg.heads)
        if cfg.head_weights:
            net.set_head_weights(cfg.head_weights)
        return net.to(self.device)

    def _optimizer(self) -> torch.optim.Optimizer:
        """Adam with its fused kernel: one pass over all parameters instead of a dozen
        elementwise ops per tensor (3.7 -> 0.5 ms a step for this network on one CPU
        thread); the plain one where a build has no fused kernel for the device."""
        params = self.online.parameters()
        try:
            return torch.optim.Adam(params, lr=self.config.lr, fused=True)
        except (RuntimeError, TypeError):
            return torch.optim.Adam(self.online.parameters(), lr=self.config.lr)

    def _checkpoint(self) -> dict:
        return {"online": copy.deepcopy(self.online.state_dict()),
                "target": copy.deepcopy(self.target.state_dict()),
                "optim": copy.deepcopy(self.optim.state_dict())}

    def _restore(self, ckpt: dict) -> None:
        self.online.load_state_dict(ckpt["online"])
        self.target.load_state_dict(ckpt["target"])
        self.optim.load_state_dict(ckpt["optim"])

    def weights(self, extra: dict[str, torch.Tensor] | None = None) -> bytes:
        """Safetensors bytes of the online network (the serving policy), with ``extra``
        tensors beside it."""
        return weights_to_bytes(self.online, extra)

    def load_published(self, blob: bytes) -> dict[str, torch.Tensor] | None:
        """Resume from published weights (a learner restart continues, not restarts),
        returning the tensors the options saved beside the network (from the same parse
        of the blob). Returns None, keeping the current weights, when the blob has
        another shape: weights published by a version with another feature layout
        cannot continue."""
        if weights_shape(blob) != self.online.shape:
            return None
        net, extra = split_weights(blob, self.device)
        self.online.load_state_dict(net.state_dict())
        self.target.load_state_dict(net.state_dict())
        self._good = self._checkpoint()
        return extra

    def reset_weights(self) -> None:
        """Start over from a fresh network (non-finite weights with no good version to
        return to); the replay buffer is kept, so learning resumes from the data."""
        torch.manual_seed(self.config.seed)
        fresh = self._fresh_network()
        self.online.load_state_dict(fresh.state_dict())
        self.target.load_state_dict(fresh.state_dict())
        self.optim = self._optimizer()
        self._good = self._checkpoint()

    @torch.no_grad()
    def q_of(self, states: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """The online network's ranking Q of one action per state."""
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(self.device)  # noqa: E731
        return self.online.q_of_actions(t(states), t(actions)).cpu().numpy()

    # -- learning ----------------------------------------------------------------
    def add(self, states: np.ndarray, actions: np.ndarray, rewards: np.ndarray,
            next_states: np.ndarray, done: np.ndarray | None = None,
            mask: np.ndarray | None = None) -> np.ndarray:
        """Store transitions; ``rewards`` and ``mask`` are ``(n, heads)`` for a multi-task
        network (see ``ReplayBuffer.add``)."""
        return self.buffer.add(states, actions, rewards, next_states, done, mask)

    def train(self, next_action_fn: NextActionFn, new_slots: np.ndarray | None = None,
              steps: int | None = None, max_steps: int | None = None) -> bool:
        """Run gradient steps; returns False (and rolls back) if weights went non-finite.

        New transitions owe ``replay_ratio * new / (batch/2)`` steps (half of each batch
        is new data until all of it was used); owed fractions carry over to the next
        call, so the steps per transition are the same whether the transitions come in
        many small rounds or a few large ones: how fast serving runs does not change
        how much is learned per event. ``steps_per_batch`` is a floor per call with new
        data, ``max_steps`` an optional cap.
        """
        if len(self.buffer) == 0:
            return True
        cfg = self.config
        new_slots = np.zeros(0, dtype=np.int64) if new_slots is None else new_slots
        half = max(cfg.batch_size // 2, 1)
        if steps is None:
            self._owed += cfg.replay_ratio * len(new_slots) / half
            due = int(self._owed)
            self._owed -= due
            steps = max(cfg.steps_per_batch if len(new_slots) else 0, due)
            if max_steps is not None:
                steps = min(steps, max_steps)
        if steps == 0:  # nothing owed yet: the weights are as good as they were
            return True
        for step in range(steps):
            include = new_slots[step * half:(step + 1) * half]
            batch = self.buffer.sample(cfg.batch_size, include)
            self.last_loss = self._step(batch, next_action_fn)
            self.updates += 1
        if not all_finite(self.online) or not np.isfinite(self.last_loss):
            self.rejected_updates += 1
            self._restore(self._good)
            return False
        self._good = self._checkpoint()
        return True

    def _step(self, batch, next_action_fn: NextActionFn) -> float:
        cfg = self.config
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
        s, a, r, s2, done, mask = (t(batch.states), t(batch.actions), t(batch.rewards),
                                   t(batch.next_states), t(batch.done), t(batch.mask))
        with torch.no_grad():
            online_query, _ = self.online(s2)
            next_items, valid = next_action_fn(online_query[:, : self.item_dim].cpu().numpy())
            # the next action is valued on its embedding alone: it has not been shown yet
            # (exposure 0), and its popularity and affinity features are left at 0 too,
            # an approximation that keeps the target one retrieval per transition
            a2 = torch.zeros(len(s2), self.online.action_dim, device=self.device)
            a2[:, : self.item_dim] = t(next_items.astype(np.float32))
            # every head bootstraps on its own value of the action the ranking would take
            bootstrap = (self.target.q_heads_of_actions(s2, a2)
                         * t(valid.astype(np.float32)).unsqueeze(-1))
            target = r + cfg.gamma * (1.0 - done).unsqueeze(-1) * bootstrap
        q = self.online.q_heads_of_actions(s, a)
        per_head = nn.functional.huber_loss(q, target, delta=cfg.huber_delta, reduction="none")
        # each head's mean over the rows that train it, summed over heads: a head learns
        # at full rate however rarely its events come (a mean over every masked entry
        # would let the frequent heads' rows dilute the rare heads' gradient)
        loss = ((per_head * mask).sum(0) / mask.sum(0).clamp(min=1.0)).sum()
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.online.parameters(), cfg.grad_clip)
        self.optim.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(self.target.parameters()),
                                 list(self.online.parameters()), cfg.target_tau)
        return float(loss.detach())
