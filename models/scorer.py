"""One weights version as serving uses it: the Q-network's queries and scores, with
the options' learned state of the same version (the ensemble's arms and agents, the
new-user adaptation rule) beside it, so a request is served by one version whole."""

from __future__ import annotations

import numpy as np
import torch

from models.adaptation import AdaptationRule
from models.ensemble import EnsembleParams
from models.qnet import QNetwork
from models.qnet_numpy import NumpyQNetwork


class Scorer:
    """Inference-side view of one weights version: query vector and scores, on numpy.

    A new weights version is a new scorer: the engine never trains a scorer's network
    in place. On the CPU the ranking pass runs on a copy of the weights taken when the
    scorer is made (``models.qnet_numpy``); on CUDA it runs the network itself."""

    def __init__(self, net: QNetwork, version: int, device: str = "cpu",
                 ensemble: EnsembleParams | None = None,
                 adaptation: AdaptationRule | None = None) -> None:
        self.net = net.to(device).eval()
        self.version = version
        self.device = device
        # on the CPU, the ranking pass in numpy: a batch's few states cost torch's
        # per-operation overhead and a GIL hand-off per operation (models.qnet_numpy)
        self._numpy = NumpyQNetwork(self.net) if device == "cpu" else None
        # the options' learned state, of the same version, when they are on
        self.ensemble = ensemble
        self.adaptation = adaptation

    def query(self, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(B, state_dim)`` -> queries ``(B, action_dim)`` and state values ``(B,)``.

        ``query[:, :item_dim]`` is the retrieval query in item-embedding space.
        """
        if self._numpy is not None:
            return self._numpy(states)
        return self._torch_query(states)

    @torch.inference_mode()
    def _torch_query(self, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = torch.from_numpy(np.ascontiguousarray(states, dtype=np.float32)).to(self.device)
        q, v = self.net(s)
        return q.float().cpu().numpy(), v.float().cpu().numpy()

    @staticmethod
    def score(query: np.ndarray, value: float, items: np.ndarray,
              features: np.ndarray | None = None) -> np.ndarray:
        """Q of every candidate: one matrix-vector product over item embeddings, plus
        the per-candidate features' small product (zero features when none are given)."""
        d = items.shape[1]
        scores = items @ query[:d] + value
        if features is not None and len(features):
            scores += features @ query[d:]
        return scores
