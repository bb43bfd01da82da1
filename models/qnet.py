"""The Q-network: a state tower whose output is a query in item-embedding space.

    Q(s, a) = V(s) + exp(l(s, a)),   l(s, a) = c(s) + q(s) . e_a + w(s) . f_a

e_a is the item's (frozen, unit-norm) transformer embedding and f_a a few
per-candidate features (``models.state.candidate_features``: was it just shown
and ignored, how popular is it, how close is it to what the user just clicked or
passed over). q(s), w(s), c(s) and V(s) come from an MLP with a linear skip over
the state.

Why a log link for the item term: a user's interest in an item moves by
*factors* (an item scrolled past is a fraction as attractive as before, a tired
genre half as attractive), whatever its base appeal. In log space those are
additive and the same for every item, so a handful of feature weights learn
them; an additive Q would have to learn a penalty as large as the best item's
value, and regression on rare clicks fits the average item's instead. V(s)
carries the item-independent part of the return (dueling-style), so Q can still
take any sign.

Serving stays cheap: scoring N candidates is one ``(N, d) @ (d,)`` product, a
``(N, f) @ (f,)`` one and an ``exp``. Because ``exp`` is monotone, the top
candidates by Q without features are the top ones by ``q(s) . e_a``, so the same
q(s) is the FAISS retrieval query: retrieval and ranking agree. New items are
scored from their embedding alone (no item-id parameters), so they are
recommendable as soon as they are upserted.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from models.state import N_ITEM_FEATURES

# the log-scale item term starts near a typical per-item click rate
INITIAL_LOG_SCALE = -3.0
# bound on l(s, a): exp(8) ~ 3000 is far above any per-item reward
MAX_LOG = 8.0
# feature weights are learned on this scale: with one shared Adam learning rate they
# must reach log-factors of order 1 (an ignored item at a third of its appeal) within
# a few hundred updates, while the 384-wide query moves slowly (measured in bench/quality)
FEATURE_GAIN = 30.0
# stored with the weights; weights of another architecture are refused, not misread
ARCHITECTURE = "log-link-v2"


class QNetwork(nn.Module):
    def __init__(self, state_dim: int, item_dim: int, hidden: int = 256,
                 item_features: int = N_ITEM_FEATURES) -> None:
        super().__init__()
        self.state_dim = state_dim
        self.item_dim = item_dim
        self.item_features = item_features
        self.hidden = hidden
        self.trunk = nn.Sequential(
            nn.Linear(state_dim, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
        )
        self.query_head = nn.Linear(hidden, item_dim)
        self.value_head = nn.Linear(hidden, 1)
        self.feature_head = nn.Linear(hidden, item_features)
        self.scale_head = nn.Linear(hidden, 1)
        self.skip = nn.Linear(state_dim, item_dim, bias=False)
        nn.init.zeros_(self.query_head.weight)
        nn.init.zeros_(self.query_head.bias)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        nn.init.zeros_(self.feature_head.weight)
        nn.init.zeros_(self.feature_head.bias)
        nn.init.zeros_(self.scale_head.weight)
        nn.init.constant_(self.scale_head.bias, INITIAL_LOG_SCALE)
        self.reset_content_prior()

    @torch.no_grad()
    def reset_content_prior(self, scale: float = 1.0) -> None:
        """Start as a content-based recommender instead of a constant.

        Before any feedback the query is a blend of the context embedding and the
        pooled embeddings of what the user engaged with, minus what they ignored,
        so a new deployment already ranks related items first (in log space: a
        cosine of 0.5 makes an item ``exp(0.5 * scale)`` times as attractive).
        Learning moves away from this prior as rewards arrive. Requires the
        StateLayout ordering.
        """
        d = self.item_dim
        w = torch.zeros(d, self.state_dim)
        if self.state_dim >= 3 * d:
            eye = torch.eye(d)
            w[:, :d] = 0.5 * scale * eye
            w[:, d: 2 * d] = scale * eye
            w[:, 2 * d: 3 * d] = -0.5 * scale * eye
        self.skip.weight.copy_(w)

    @property
    def action_dim(self) -> int:
        """Width of an action: item embedding, then per-candidate features."""
        return self.item_dim + self.item_features

    @property
    def query_dim(self) -> int:
        """Width of a query: q(s), w(s), then the log scale c(s)."""
        return self.action_dim + 1

    def forward(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(query, value)``: ``(B, query_dim)`` and ``(B,)``.

        The query's first ``item_dim`` entries weigh the item embedding (and are the
        retrieval query), the next ``item_features`` weigh the per-candidate
        features, and the last is the log scale c(s).
        """
        h = self.trunk(state)
        query = self.query_head(h) + self.skip(state)
        return (torch.cat([query, FEATURE_GAIN * self.feature_head(h), self.scale_head(h)], -1),
                self.value_head(h).squeeze(-1))

    def q_values(self, state: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q for states against per-state candidates ``(B, N, action_dim)`` -> ``(B, N)``."""
        query, value = self(state)
        logits = torch.einsum("bd,bnd->bn", query[:, :-1], actions) + query[:, -1:]
        return torch.exp(logits.clamp(max=MAX_LOG)) + value.unsqueeze(-1)

    def q_of_actions(self, state: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q of one action per state: ``(B, action_dim)`` actions -> ``(B,)``."""
        query, value = self(state)
        logits = (query[:, :-1] * actions).sum(-1) + query[:, -1]
        return torch.exp(logits.clamp(max=MAX_LOG)) + value


def weights_to_bytes(net: QNetwork) -> bytes:
    """Serialise weights as safetensors (never pickle: weights come from a shared store)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = {"state_dim": str(net.state_dim), "item_dim": str(net.item_dim),
            "hidden": str(net.hidden), "item_features": str(net.item_features),
            "architecture": ARCHITECTURE}
    return st_save(tensors, metadata=meta)


def weights_from_bytes(blob: bytes, device: str = "cpu") -> QNetwork:
    """Rebuild a QNetwork from ``weights_to_bytes`` output."""
    meta = _metadata(blob)
    if meta.get("architecture") != ARCHITECTURE:
        raise ValueError(f"weights are for architecture {meta.get('architecture')!r}, "
                         f"this build serves {ARCHITECTURE!r}")
    net = QNetwork(int(meta["state_dim"]), int(meta["item_dim"]), int(meta["hidden"]),
                   int(meta.get("item_features", N_ITEM_FEATURES)))
    net.load_state_dict(st_load(blob))
    return net.to(device).eval()


def _metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (its header is 8-byte length + JSON)."""
    (header_len,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8: 8 + header_len]).get("__metadata__", {})


def all_finite(net: nn.Module) -> bool:
    """True when every parameter is finite; non-finite weights are never published."""
    return all(bool(torch.isfinite(p).all()) for p in net.parameters())


class Scorer:
    """Inference-side view of one weights version: query vector and scores, on numpy."""

    def __init__(self, net: QNetwork, version: int, device: str = "cpu") -> None:
        self.net = net.to(device).eval()
        self.version = version
        self.device = device

    @torch.inference_mode()
    def query(self, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(B, state_dim)`` -> queries ``(B, query_dim)`` and state values ``(B,)``.

        ``query[:, :item_dim]`` is the retrieval query in item-embedding space.
        """
        s = torch.from_numpy(np.ascontiguousarray(states, dtype=np.float32)).to(self.device)
        q, v = self.net(s)
        return q.float().cpu().numpy(), v.float().cpu().numpy()

    @staticmethod
    def score(query: np.ndarray, value: float, items: np.ndarray,
              features: np.ndarray | None = None) -> np.ndarray:
        """Q of every candidate: one matrix-vector product over item embeddings, plus
        the features' small product (zero features when none are given), then exp."""
        d = items.shape[1]
        logits = items @ query[:d] + query[-1]
        if features is not None and len(features):
            logits += features @ query[d:-1]
        return np.exp(np.minimum(logits, MAX_LOG)) + value
