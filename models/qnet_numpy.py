"""The Q-network's ranking pass (``QNetwork.forward``) in numpy, for serving on the CPU.

Serving calls the network once per batch of requests, with a few to a few dozen
states. At that size torch's cost is its per-operation overhead, not arithmetic:
about 20 operations through ``nn.Module`` calls, 0.4-0.7 ms per batch of 8 on this
project's 2-core machine, most of it Python. torch also releases the GIL about 40
times per pass and must take it back each time: under load, while the event loop or
the other compute thread holds it, every retake waits up to the interpreter's switch
interval (5 ms), so a pass that takes 0.5 ms alone took 200 ms beside one busy
Python thread. The same arithmetic in numpy is a handful of calls on small arrays
(1.3 ms beside that thread).

A ``NumpyQNetwork`` is a snapshot of one set of weights: ``models.scorer.Scorer``
holds one weights version and never trains through it. Training stays in torch.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import torch

from models.qnet import QNetwork
from models.state import StateLayout

# Abramowitz and Stegun 7.1.26: |error| < 1.5e-7 in exact arithmetic, below 5e-7 in
# float32
_P = 0.3275911
_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _erf(x: np.ndarray) -> np.ndarray:
    """The error function to within 5e-7 in float32 (numpy has none; torch's GELU uses
    it)."""
    a = np.abs(x)
    t = 1.0 / (1.0 + _P * a)
    poly = t * (_A[0] + t * (_A[1] + t * (_A[2] + t * (_A[3] + t * _A[4]))))
    return np.copysign(1.0 - poly * np.exp(-a * a), x)


def gelu(x: np.ndarray) -> np.ndarray:
    """``torch.nn.GELU()`` (the exact, erf form)."""
    return 0.5 * x * (1.0 + _erf(x * np.float32(np.sqrt(0.5))))


def _array(t: torch.Tensor) -> np.ndarray:
    """A float32 copy that later changes to the network do not reach."""
    return t.detach().cpu().float().numpy().copy()


class NumpyQNetwork:
    """``QNetwork.forward`` of a snapshot of ``net``'s weights (its head weights
    included): ``(B, state_dim)`` -> queries ``(B, action_dim)`` and values ``(B,)``."""

    def __init__(self, net: QNetwork) -> None:
        self.item_dim, self.heads, self.item_features = net.item_dim, net.heads, net.item_features
        self.pools = StateLayout(net.item_dim).pools
        self.project_parts = net.project.parts
        self.maps = _array(net.project.maps) if self.project_parts else None
        first, second = cast(torch.nn.Linear, net.trunk[0]), cast(torch.nn.Linear, net.trunk[2])
        self.trunk = [(_array(first.weight).T, _array(first.bias)),
                      (_array(second.weight).T, _array(second.bias))]
        # the three heads side by side: one product for all of them
        heads = (net.query_head, net.feature_head, net.value_head)
        self.head_w = np.concatenate([_array(h.weight).T for h in heads], 1)
        self.head_b = np.concatenate([_array(h.bias) for h in heads])
        self.skip_parts = net.skip.parts
        self.n_pools = max(self.project_parts, self.skip_parts)
        self.gains = _array(net.skip.gains)
        self.down, self.up = _array(net.skip.down.weight).T, _array(net.skip.up.weight).T
        self.head_weights = _array(net.head_weights)

    def _pooled(self, s: np.ndarray) -> np.ndarray:
        """``(B, parts, item_dim)``: the state's context and pools (``StateLayout``)."""
        return s[:, self.pools].reshape(len(s), self.n_pools, self.item_dim)

    def __call__(self, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = np.ascontiguousarray(states, dtype=np.float32)
        b, d = len(s), self.item_dim
        x = s
        if self.maps is not None:  # (parts, B, d) @ (parts, d, rank) -> (B, parts * rank)
            projected = np.matmul(self._pooled(s).transpose(1, 0, 2), self.maps)
            x = np.concatenate([projected.transpose(1, 0, 2).reshape(b, -1),
                                s[:, self.pools.stop:]], 1)
        h = x
        for w, bias in self.trunk:
            h = gelu(h @ w + bias)
        out = h @ self.head_w + self.head_b
        heads, f = self.heads, self.item_features
        query = out[:, : heads * d].reshape(b, heads, d)
        features = out[:, heads * d: heads * (d + f)].reshape(b, heads, f)
        values = out[:, heads * (d + f):]
        skip = (s @ self.down) @ self.up
        if self.skip_parts:
            skip = skip + np.matmul(self.gains, self._pooled(s))
        queries = np.concatenate([query + skip[:, None], features], -1)
        if heads == 1:
            return queries[:, 0], values[:, 0]
        w = self.head_weights
        return np.einsum("h,bha->ba", w, queries), values @ w
