"""The numpy ranking pass that serving uses on the CPU equals the torch network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.qnet import QNetwork
from models.qnet_numpy import NumpyQNetwork, gelu
from models.scorer import Scorer
from models.state import StateLayout


def _random_net(heads: int, trunk_rank: int = 32, item_dim: int = 16,
                skip_rank: int = 32, state_dim: int | None = None) -> QNetwork:
    torch.manual_seed(heads + trunk_rank + skip_rank)
    net = QNetwork(state_dim or StateLayout(item_dim).size, item_dim, hidden=24,
                   heads=heads, trunk_rank=trunk_rank, skip_rank=skip_rank)
    for p in net.parameters():  # a trained network: no zero heads
        torch.nn.init.normal_(p, std=0.3)
    if heads > 1:
        net.set_head_weights([0.5 + h for h in range(heads)])
    return net


@pytest.mark.parametrize("heads,trunk_rank,skip_rank,state_dim", [
    (1, 32, 32, None), (3, 32, 32, None), (1, 0, 32, None), (2, 0, 5, None),
    (2, 32, 32, 40),  # a state without the three pooled parts: no projection, no gains
])
def test_numpy_pass_equals_the_torch_network(heads, trunk_rank, skip_rank, state_dim):
    net = _random_net(heads, trunk_rank, skip_rank=skip_rank, state_dim=state_dim)
    states = np.random.default_rng(0).normal(size=(7, net.state_dim)).astype(np.float32)
    with torch.no_grad():
        want_q, want_v = (t.numpy() for t in net(torch.from_numpy(states)))
    q, v = NumpyQNetwork(net)(states)
    assert q.shape == want_q.shape and v.shape == want_v.shape
    assert q.dtype == np.float32 and v.dtype == np.float32
    np.testing.assert_allclose(q, want_q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v, want_v, rtol=1e-5, atol=1e-5)


def test_gelu_is_torchs_exact_gelu():
    x = np.linspace(-12, 12, 20_001, dtype=np.float32)
    want = torch.nn.GELU()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(gelu(x), want, rtol=0, atol=2e-6)


def test_a_cpu_scorer_serves_the_weights_it_was_made_with():
    """A new weights version is a new scorer: training the network afterwards does
    not change what an existing scorer ranks by."""
    net = _random_net(1)
    states = np.random.default_rng(1).normal(size=(3, net.state_dim)).astype(np.float32)
    scorer = Scorer(net, 1)
    q, v = scorer.query(states)
    with torch.no_grad():
        np.testing.assert_allclose(q, net(torch.from_numpy(states))[0].numpy(), atol=1e-5)
        net.value_head.bias.add_(1.0)
    assert np.allclose(scorer.query(states)[1], v)
    assert np.allclose(Scorer(net, 2).query(states)[1], v + 1.0, atol=1e-5)
