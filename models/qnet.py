"""The Q-network: a state tower whose output is a query in item-embedding space.

Q(s, a) = V(s) + q(s) . e_a + w(s) . f_a, where e_a is the item's (frozen,
unit-norm) transformer embedding, f_a are a few per-candidate features
(``models.state.candidate_features``: was it just shown and ignored, how popular
is it, how close is it, by embedding and by tags, to what the user just clicked or
passed over) and q(s), w(s) are produced by an MLP with a linear skip over the
state. The item side is
the precomputed embedding itself, so scoring N candidates is one ``(N, d) @ (d,)``
product after one small MLP pass (plus an ``(N, f) @ (f,)`` one), and the same
q(s) is the FAISS retrieval query: retrieval and ranking agree. New items
are scored from their embedding alone (no item-id parameters), so they are
recommendable as soon as they are upserted.

V(s) is a dueling-style state value: it carries the part of the return that does
not depend on the item, which keeps the advantage term q(s) . e_a small and
well conditioned.

Multi-task: with ``heads`` > 1 the trunk is shared and every head h (click,
purchase, rating, dwell) has its own ``V_h, q_h, w_h``, trained on its own
objective. The slate is ranked by ``sum_h c_h Q_h(s, a)`` with weights ``c`` from
settings; since every head is linear in the action, that sum is again one query
``sum_h c_h q_h(s)`` and one value, so retrieval and scoring stay one product each,
and a shop can trade clicks for purchases by changing ``c`` without retraining.
"""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from models.state import N_ITEM_FEATURES, StateLayout

SKIP_RANK = 32
TRUNK_RANK = 32
# the hidden layers' width (RECSVC_HIDDEN's default, through models.learner.DQNConfig)
HIDDEN = 128


class PooledProjection(nn.Module):
    """The trunk's input: each pooled part of the state (context, positive pool,
    negative pool; ``StateLayout`` order) mapped to ``rank`` dimensions by a map of its
    own, the rest of the state (session scalars) passed through. Feeding the whole
    1,157-d state to the trunk's first layer was over half of a training step's
    multiply-adds; a pooled embedding carries its information in far fewer directions
    than the encoder's width. ``rank`` 0 (or a state without the three parts) passes
    the state through whole, as weights saved before this map expect."""

    def __init__(self, state_dim: int, item_dim: int, rank: int = TRUNK_RANK) -> None:
        super().__init__()
        self.item_dim = item_dim
        self.parts = 3 if rank and state_dim >= 3 * item_dim else 0
        self.rank = rank if self.parts else 0
        if self.parts:
            self.maps = nn.Parameter(torch.empty(self.parts, item_dim, rank))
            nn.init.normal_(self.maps, std=item_dim ** -0.5)
        self.out_dim = (self.parts * rank + state_dim - self.parts * item_dim
                        if self.parts else state_dim)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        if not self.parts:
            return state
        pools = StateLayout(self.item_dim).pools
        pooled = state[:, pools].reshape(len(state), self.parts, self.item_dim).transpose(0, 1)
        projected = torch.bmm(pooled, self.maps).transpose(0, 1).reshape(len(state), -1)
        return torch.cat([projected, state[:, pools.stop:]], -1)


class StateSkip(nn.Module):
    """The query's linear path from the state: a learned gain on each pooled part of the
    state (context, positive pool, negative pool; ``StateLayout`` order), which is the
    content prior, plus a rank-``SKIP_RANK`` map of the whole state for what crosses
    parts. A full ``(state, item_dim)`` matrix here was half of a training step's
    arithmetic (1157 x 384 weights at the default width) for what these ~50k do."""

    def __init__(self, state_dim: int, item_dim: int, rank: int = SKIP_RANK) -> None:
        super().__init__()
        self.item_dim = item_dim
        self.parts = 3 if state_dim >= 3 * item_dim else 0
        self.gains = nn.Parameter(torch.zeros(self.parts))
        self.down = nn.Linear(state_dim, rank, bias=False)
        self.up = nn.Linear(rank, item_dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        out = self.up(self.down(state))
        if self.parts:
            pools = state[:, StateLayout(self.item_dim).pools]
            out = out + torch.einsum("p,bpd->bd", self.gains,
                                     pools.reshape(len(state), self.parts, self.item_dim))
        return out


class QNetwork(nn.Module):
    def __init__(self, state_dim: int, item_dim: int, hidden: int = HIDDEN,
                 item_features: int = N_ITEM_FEATURES, heads: int = 1,
                 skip_rank: int = SKIP_RANK, trunk_rank: int = TRUNK_RANK) -> None:
        super().__init__()
        self.skip_rank = skip_rank
        self.trunk_rank = trunk_rank
        self.state_dim = state_dim
        self.item_dim = item_dim
        self.item_features = item_features
        self.hidden = hidden
        self.heads = heads
        # outside the trunk's Sequential, so the trunk's layers keep their names
        self.project = PooledProjection(state_dim, item_dim, trunk_rank)
        self.trunk = nn.Sequential(
            nn.Linear(self.project.out_dim, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
        )
        # with one head these are the single-objective network's layers, shape for shape
        self.query_head = nn.Linear(hidden, heads * item_dim)
        self.value_head = nn.Linear(hidden, heads)
        self.feature_head = nn.Linear(hidden, heads * item_features)
        self.skip = StateSkip(state_dim, item_dim, skip_rank)
        # how the heads' values are summed into the ranking value: a serving setting,
        # not a learned weight, so it is not saved with the weights
        self.register_buffer("head_weights", torch.ones(heads), persistent=False)
        nn.init.zeros_(self.query_head.weight)
        nn.init.zeros_(self.query_head.bias)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        nn.init.zeros_(self.feature_head.weight)
        nn.init.zeros_(self.feature_head.bias)
        self.reset_content_prior()

    @torch.no_grad()
    def set_head_weights(self, weights: list[float] | tuple[float, ...]) -> QNetwork:
        """Set the ranking weight of each head (in ``models.rewards.HEADS`` order)."""
        if len(weights) != self.heads:
            raise ValueError(f"{len(weights)} head weights for {self.heads} heads")
        self.head_weights: torch.Tensor
        self.head_weights.copy_(torch.as_tensor(weights, dtype=torch.float32))
        return self

    @torch.no_grad()
    def reset_content_prior(self, scale: float = 0.1) -> None:
        """Start as a content-based recommender instead of a constant.

        Before any feedback the query is a blend of the context embedding and the
        pooled embeddings of what the user engaged with, minus what they ignored,
        so a new deployment already ranks related items first. Learning moves away
        from this prior as rewards arrive. Requires the StateLayout ordering.
        """
        if self.skip.parts:
            self.skip.gains.copy_(torch.tensor([0.5 * scale, scale, -0.5 * scale]))

    @property
    def shape(self) -> tuple[int, int, int, int, int, int, int]:
        """``(state_dim, item_dim, hidden, item_features, heads, skip_rank, trunk_rank)``:
        weights of
        another shape (an older feature layout, another encoder, another number of
        heads) cannot be loaded into this one."""
        return (self.state_dim, self.item_dim, self.hidden, self.item_features, self.heads,
                self.skip_rank, self.trunk_rank)

    @property
    def action_dim(self) -> int:
        """Width of an action: item embedding, then per-candidate features."""
        return self.item_dim + self.item_features

    def forward_heads(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every head's ``(query, value)``: ``(B, heads, action_dim)`` and ``(B, heads)``."""
        b = state.shape[0]
        h = self.trunk(self.project(state))
        query = (self.query_head(h).view(b, self.heads, self.item_dim)
                 + self.skip(state).unsqueeze(1))
        features = self.feature_head(h).view(b, self.heads, self.item_features)
        return torch.cat([query, features], -1), self.value_head(h)

    def forward(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the ranking ``(query, value)``: ``(B, action_dim)`` and ``(B,)``, the
        heads' weighted sum (with one head, that head).

        The query's first ``item_dim`` entries weigh the item embedding (and are the
        retrieval query), the rest weigh the per-candidate features.
        """
        queries, values = self.forward_heads(state)
        if self.heads == 1:
            return queries[:, 0], values[:, 0]
        w: torch.Tensor = self.head_weights
        return torch.einsum("h,bha->ba", w, queries), values @ w

    def q_of_actions(self, state: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q of one action per state: ``(B, action_dim)`` actions -> ``(B,)``."""
        query, value = self(state)
        return (query * actions).sum(-1) + value

    def q_heads_of_actions(self, state: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Every head's Q of one action per state: ``(B, action_dim)`` -> ``(B, heads)``."""
        queries, values = self.forward_heads(state)
        return (queries * actions.unsqueeze(1)).sum(-1) + values


def weights_to_bytes(net: QNetwork, extra: dict[str, torch.Tensor] | None = None) -> bytes:
    """Serialise weights as safetensors (never pickle: weights come from a shared store).
    ``extra`` tensors (the ensemble's state) travel in the same blob, so one version
    is one consistent policy."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tensors.update(extra or {})
    meta = {"state_dim": str(net.state_dim), "item_dim": str(net.item_dim),
            "hidden": str(net.hidden), "item_features": str(net.item_features),
            "heads": str(net.heads), "skip_rank": str(net.skip_rank),
            "trunk_rank": str(net.trunk_rank)}
    return st_save(tensors, metadata=meta)


def split_weights(blob: bytes, device: str = "cpu") -> tuple[QNetwork, dict[str, torch.Tensor]]:
    """The network of a weights blob (head weights: all 1; the server sets its own) and
    the tensors saved beside it (see weights_to_bytes), from one parse of the blob."""
    net = QNetwork(*weights_shape(blob))
    tensors = st_load(blob)
    mine = net.state_dict()
    net.load_state_dict({k: v for k, v in tensors.items() if k in mine})
    return net.to(device).eval(), {k: v for k, v in tensors.items() if k not in mine}


def weights_shape(blob: bytes) -> tuple[int, int, int, int, int, int, int]:
    """The ``QNetwork.shape`` of serialised weights, read from their header alone
    (weights saved before multi-task heads existed have one head; before the low-rank
    skip, a full one: rank 0 here, which no network of this release has; before the
    trunk's pooled projection, the whole state: trunk rank 0)."""
    meta = _metadata(blob)
    return (int(meta["state_dim"]), int(meta["item_dim"]), int(meta["hidden"]),
            int(meta.get("item_features", N_ITEM_FEATURES)), int(meta.get("heads", 1)),
            int(meta.get("skip_rank", 0)), int(meta.get("trunk_rank", 0)))


def _metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (its header is 8-byte length + JSON)."""
    (header_len,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8: 8 + header_len]).get("__metadata__", {})


def all_finite(net: nn.Module) -> bool:
    """True when every parameter is finite; non-finite weights are never published."""
    return all(bool(torch.isfinite(p).all()) for p in net.parameters())
