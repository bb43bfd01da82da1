"""Gradient steps per second of the learner, as it runs them.

A ``DQNLearner`` with the service's default settings (``Settings().dqn``), over
the default encoder's width (384-d embeddings, a 1,157-d state), a replay buffer of
50,000 synthetic transitions and a catalog of ``--items`` unit vectors; each step's
next actions come from ``LearnerWorker._next_actions``, the learner worker's own
path. Run on one torch thread (the learner's share of a 2-core machine).

    python -m bench.step [--items 1682] [--steps 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import numpy as np
import torch

from app.learner.worker import LearnerWorker
from app.settings import Settings
from models.index import CandidateIndex
from models.learner import DQNLearner
from models.state import N_ITEM_FEATURES, StateLayout


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1682)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--buffer", type=int, default=50_000)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    layout = StateLayout(384)
    vectors = rng.standard_normal((args.items, layout.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = CandidateIndex(layout.dim)
    index.upsert([f"i{n}" for n in range(args.items)], vectors)
    worker = SimpleNamespace(index=index, layout=layout,
                             _snapshot=(-1, np.zeros((0, layout.dim), np.float32)))
    settings = Settings(replay_prefault=False)
    learner = DQNLearner(layout.size, layout.dim, settings.dqn)
    n = args.buffer
    states = (0.1 * rng.standard_normal((n, layout.size))).astype(np.float32)
    actions = np.concatenate([vectors[rng.integers(0, args.items, n)],
                              rng.random((n, N_ITEM_FEATURES)).astype(np.float32)], 1)
    learner.add(states, actions, (rng.random(n) < 0.05).astype(np.float32),
                np.roll(states, 1, axis=0))

    def next_actions(queries):
        return LearnerWorker._next_actions(worker, queries)

    learner.train(next_actions, steps=20)  # warm up
    started = time.perf_counter()
    learner.train(next_actions, steps=args.steps)
    per_step = (time.perf_counter() - started) / args.steps
    params = sum(p.numel() for p in learner.online.parameters())
    print(f"{1 / per_step:.0f} steps/s ({1000 * per_step:.2f} ms a step; batch "
          f"{settings.batch_size}, {params:,} parameters, {args.items:,} items, "
          f"{args.threads} torch thread{'s' if args.threads > 1 else ''})")


if __name__ == "__main__":
    main()
