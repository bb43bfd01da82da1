"""Diagnose the service's policy on the quality simulator, in-process.

The same driver as ``bench.quality`` (same requests, same HTTP calls), but the
service runs inside this process behind FastAPI's TestClient, so that after the
run the learner can be inspected. It prints what the quality table cannot show:

- per session step, the share of the slate that was already shown earlier in the
  same session (re-shown items are what sank the service's later steps), and the
  true attraction of the chosen items against the catalog mean;
- the learned per-candidate feature weights w(s), averaged over
  5,000 states of the replay buffer.

    python -m bench.probe [--seed 0] [--requests 5000] [--variant default]
                          [--service-env NAME=VALUE ...]

A probe guides work; figures for docs come from ``bench.quality`` (subprocess,
several seeds, peers in the same run).
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import replace

import numpy as np
import torch

import bench.quality as quality
from bench.simulator import SimConfig, World, request_stream
from models.state import N_ITEM_FEATURES

FEATURES = ["shown-recency", "shown-count", "ctr-lift", "impressions", "sim-positive",
            "sim-ignored", "tag-positive", "tag-ignored"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--variant", choices=list(quality.VARIANTS), default="default")
    ap.add_argument("--service-env", nargs="*", default=[])
    args = ap.parse_args(argv)
    env = dict(kv.split("=", 1) for kv in args.service_env)
    config = replace(SimConfig(requests=args.requests, seed=args.seed),
                     **quality.VARIANTS[args.variant])
    world = World.build(config)
    requests = request_stream(world)
    apps: dict = {}

    @contextlib.contextmanager
    def in_process(service_env: dict[str, str]):
        """The service in this process, with ``service_env`` over the process's own
        RECSVC_ settings (as a subprocess would have them), kept in ``apps`` so that
        its learner can be inspected after the run."""
        from fastapi.testclient import TestClient

        from app.api import create_app
        from app.settings import Settings

        fields = {k.removeprefix("RECSVC_").lower(): v for k, v in service_env.items()}
        apps["app"] = create_app(Settings(**fields))
        with TestClient(apps["app"], base_url="http://probe") as client:
            yield client

    rows: list[tuple[int, float, float, float]] = []
    shown: dict[int, set[int]] = {}

    def observe(r, session, seen, items) -> None:
        before = shown.setdefault(r.session, set())
        reshown = float(np.isin(items, list(before)).mean()) if before else 0.0
        everything = session.attraction(np.arange(world.base.shape[1]), seen)
        rows.append((min(r.step, 5), reshown, float(session.attraction(items, seen).mean()),
                     float(everything.mean())))
        before.update(items.tolist())

    clicks, _ = quality.run_service(world, requests, env, connect=in_process,
                                    observe=observe)
    s = quality.summarise(clicks, requests, config.slate)
    print(f"\nCTR {s['ctr']:.4f}  last-20% {s['last20']:.4f}")
    a = np.array(rows)
    late = np.arange(len(a)) >= len(a) // 2
    print("second half of the run, by session step:")
    print("step  CTR     re-shown  chosen attraction  catalog attraction")
    for step in range(6):
        m = late & (a[:, 0] == step)
        print(f"{step if step < 5 else '5+':>4}  {s['by_step'][step]:.4f}  {a[m, 1].mean():8.3f}"
              f"  {a[m, 2].mean():17.4f}  {a[m, 3].mean():18.4f}")
    learner = apps["app"].state.learner.learner
    n = len(learner.buffer)
    states = torch.from_numpy(learner.buffer.states[:n][-5000:])
    with torch.no_grad():
        query, _ = learner.online(states)
    d = learner.item_dim
    w = query[:, d: d + N_ITEM_FEATURES].numpy()
    print("learned feature weights w(s), mean ± sd over 5,000 replayed states:")
    for name, mean, sd in zip(FEATURES, w.mean(0), w.std(0), strict=True):
        print(f"  {name:14s} {mean:+.3f} ± {sd:.3f}")


if __name__ == "__main__":
    main()
