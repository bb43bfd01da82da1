"""The CUDA path of the encoder and the Q-network: same numbers as the CPU.

Skips cleanly without CUDA (CI never has a GPU). Imports no faiss, so it also runs
where only torch and transformers are installed. The index's GPU test is in
tests/test_index.py.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_encoder_and_scorer_match_cpu(encoder):
    from models.encoder import TextEncoder
    from models.qnet import QNetwork
    from models.scorer import Scorer
    from models.state import StateLayout

    texts = ["Toy Story (1995). Animation", "a 30 year old engineer"]
    gpu = TextEncoder(encoder.model_path, device="cuda")
    assert np.allclose(gpu.encode(texts), encoder.encode(texts), atol=1e-4)
    layout = StateLayout(384)
    net = QNetwork(layout.size, 384)
    state = np.random.default_rng(0).standard_normal((4, layout.size)).astype(np.float32)
    q_cpu, v_cpu = Scorer(net, 0, "cpu").query(state)
    q_gpu, v_gpu = Scorer(net, 0, "cuda").query(state)
    assert np.allclose(q_cpu, q_gpu, atol=1e-4) and np.allclose(v_cpu, v_gpu, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_torch_flat_index_is_exact_in_batches():
    from models.torch_flat import TorchFlatIP

    rng = np.random.default_rng(5)
    x = rng.standard_normal((50_000, 64)).astype(np.float32)
    q = rng.standard_normal((33, 64)).astype(np.float32)
    index = TorchFlatIP(64, dtype=torch.float32, chunk_rows=7_000)  # several chunks
    for part in np.array_split(x, 7):  # grows as uploads do
        index.add(part)
    scores, rows = index.search(q, 40)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :40]
    assert (rows == truth).mean() > 0.999
    assert np.allclose(scores, np.take_along_axis(q @ x.T, rows, 1), atol=1e-3)
    tiny = TorchFlatIP(64)
    tiny.add(x[:3])
    assert (tiny.search(q[:2], 5)[1][:, 3:] == -1).all()
