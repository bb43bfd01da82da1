"""What explanations cost, and what the trained model relies on.

Starts ``recsvc serve``, trains it on simulated users (the ``intent-fatigue`` world
of ``bench.worlds``, ``--train`` requests, clicks as feedback), then:

1. latency of ``POST /v1/recommend`` for users with histories, sequential, with and
   without ``"explain": true`` (the baseline), alternating request by request;
2. ``GET /v1/model/importance`` on the trained model;
3. how often each kind of reason is an item's strongest one.

    python -m bench.explain [--seed 0] [--train 5000] [--samples 400] [--write-docs]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import replace

import numpy as np

from app.tools.client import Call
from bench.docs import write_block
from bench.http_service import HttpServicePolicy, service_subprocess
from bench.service import BENCH_ENV
from bench.simulate import simulate
from bench.worlds import NAMED, World, request_stream


def measure(client, world: World, samples: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    users = world.data.users
    times: dict[bool, list[float]] = {False: [], True: []}
    strongest: Counter[str] = Counter()
    reasons = []
    for n in range(2 * samples):
        u = users[int(rng.integers(len(users)))]
        explain = bool(n % 2)
        start = time.perf_counter()
        answer = client.recommend(f"u-{u.user_id}", u.context, 10, explain=explain)
        times[explain].append(time.perf_counter() - start)
        if explain:
            for item in answer["items"]:
                why = item["explanation"]["reasons"]
                reasons.append(len(why))
                if why:
                    strongest[why[0]["kind"]] += 1
    pct = {k: (1000 * np.percentile(v, 50), 1000 * np.percentile(v, 99))
           for k, v in times.items()}
    total = sum(strongest.values())
    return {"latency": pct, "strongest": {k: v / total for k, v in strongest.items()},
            "reasons": float(np.mean(reasons))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=5_000)
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    command = "python -m bench.explain " + " ".join(sys.argv[1:] if argv is None else argv)
    world = World.build(replace(NAMED["intent-fatigue"], seed=args.seed,
                                requests=args.train))
    out: dict = {}
    with service_subprocess({**BENCH_ENV, "RECSVC_SEED": str(args.seed)}) as client:
        policy = HttpServicePolicy(world, client)
        simulate(world, request_stream(world), policy, desc="training",
                 on_catalog=policy.on_catalog)
        out.update(measure(client, world, args.samples, args.seed))
        out["importance"] = client.send(Call("GET", "/v1/model/importance",
                                             params={"limit": 2000}))
    lat = out["latency"]
    lines = [f"Command: `{command}` (the service trained on {args.train} simulated requests "
             f"first; {args.samples} requests each way, alternating, sequential)", "",
             "| recommend | p50 ms | p99 ms |", "|---|---|---|",
             f"| without explain (baseline) | {lat[False][0]:.1f} | {lat[False][1]:.1f} |",
             f"| with `\"explain\": true` | {lat[True][0]:.1f} | {lat[True][1]:.1f} |", "",
             f"Reasons per item: {out['reasons']:.2f} on average. Strongest reason, share "
             "of items: " + ", ".join(f"{k} {v:.1%}" for k, v in
                                      sorted(out["strongest"].items(), key=lambda kv: -kv[1])),
             "", f"Model-wide importance (`GET /v1/model/importance?limit=2000`, model "
             f"version {out['importance']['model_version']}, "
             f"{out['importance']['impressions']} impressions, "
             f"{out['importance']['items']} items):", "",
             "| part | kind | mean abs Q change | top item changed |", "|---|---|---|---|"]
    for p in out["importance"]["parts"]:
        lines.append(f"| {p['part']} | {p['kind']} | {p['mean_abs_q_change']:.4f} | "
                     f"{p['top_item_changed']:.1%} |")
    section = "\n".join(lines)
    print(section)
    if args.write_docs:
        write_block("explain", section, "## Explanations (issue 7, part 4)")


if __name__ == "__main__":
    main()
