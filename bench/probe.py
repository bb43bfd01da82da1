"""Diagnose the service's policy on one world, in process: what the family table
cannot show.

The service runs as in ``bench.family`` (``bench.service``: the engine and learner
of ``recsvc serve`` on simulated time), on one world and seed. After the run it
prints, for the second half of the run and per session step, the CTR, the share of
the slate already shown earlier in the same session, and the true attraction of the
chosen items against the catalog's mean; then what the ensemble learned: each
agent's and each source's estimated value with its weight or budget, and the
logistic agent's coefficients (their signs are the world's dynamics as learned).

    python -m bench.probe [--world intent-fatigue] [--seed 0] [--requests 5000]
                          [--service-env NAME=VALUE ...]

A probe guides work; figures for docs come from ``bench.family`` (several seeds,
tuned peers in the same run).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np

from bench.family import last20
from bench.service import ServicePolicy
from bench.simulate import simulate
from bench.worlds import NAMED, World, request_stream
from models.ensemble import N_LINEAR
from models.state import FEATURE_GROUPS

LINEAR_INPUTS = [f"{group}[{i - s.start}]" for group, s in FEATURE_GROUPS.items()
                 for i in range(s.start, s.stop)] + ["sim-context", "sim-positive-pool",
                                                     "sim-negative-pool", "bias"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--world", choices=list(NAMED), default="intent-fatigue")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--service-env", nargs="*", default=[])
    args = ap.parse_args(argv)
    env = dict(kv.split("=", 1) for kv in args.service_env)
    world = World.build(replace(NAMED[args.world], seed=args.seed, requests=args.requests))
    requests = request_stream(world)
    rows: list[tuple[int, float, float, float]] = []
    shown: dict[int, set[int]] = {}

    def observe(view, items) -> None:
        r = view.request
        before = shown.setdefault(r.session, set())
        reshown = float(np.isin(items, list(before)).mean()) if before else 0.0
        everything = view.session.attraction(np.arange(world.n_items))
        rows.append((min(r.step, 5), reshown, float(view.session.attraction(items).mean()),
                     float(everything[~view.blocked].mean())))
        before.update(items.tolist())

    policy = ServicePolicy(world, args.seed, env)
    try:
        clicks = simulate(world, requests, policy, desc="service",
                          on_catalog=policy.on_catalog, observe=observe).clicks
        learner = policy.learner
    finally:
        policy.close()
    k = world.config.slate
    print(f"\nCTR {clicks.mean() / k:.4f}  last-20% {last20(clicks, k):.4f}  "
          f"model {policy.model()}")
    a = np.array(rows)
    steps = np.array([min(r.step, 5) for r in requests])
    late = np.arange(len(a)) >= len(a) // 2
    print("second half of the run, by session step:")
    print("step  CTR     re-shown  chosen attraction  catalog attraction")
    for step in range(6):
        m = late & (a[:, 0] == step)
        if m.any():
            print(f"{step if step < 5 else '5+':>4}  {clicks[m & (steps == step)].mean() / k:.4f}"
                  f"  {a[m, 1].mean():8.3f}  {a[m, 2].mean():17.4f}  {a[m, 3].mean():18.4f}")
    if learner.ensemble is not None:
        report = learner.ensemble.report()
        for part, key in (("agents", "weight"), ("sources", "reach")):
            print(f"{part}: " + ", ".join(f"{name} {v['value']:.4f} ± {v['se']:.4f} "
                                          f"({key} {v[key]})"
                                          for name, v in report[part].items()))
        mean = learner.ensemble.model.mean
        print("logistic agent's coefficients (log-odds per unit):")
        for name, value in zip([*LINEAR_INPUTS, "slot (training only)"], mean, strict=True):
            print(f"  {name:22s} {value:+.3f}")
        assert len(LINEAR_INPUTS) == N_LINEAR


if __name__ == "__main__":
    main()
