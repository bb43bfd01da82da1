"""Multi-task heads against one head on the summed reward, in a shop that sells.

The ``intent-fatigue`` world of ``bench.worlds``, with purchases: a clicked movie is
bought with a probability that rises steeply with the user's true rating of it. The
service gets ``click`` and ``purchase`` feedback and the default reward map (click 1,
purchase 2), over HTTP; the objective is the reward per request,
``clicks + 2 * purchases``. Compared, on the same users and draws:

- ``service-1head``: the default Q-network, one head learning the summed reward;
- ``service-heads``: ``RECSVC_HEAD_WEIGHTS={"click": 1, "purchase": 1}``, a click head
  and a purchase head (each learning its events' rewards) ranked by their sum, the
  same objective;
- ``service-heads-buy``: the same heads ranked with ``{"click": 0.5, "purchase": 2}``,
  a shop that trades clicks for purchases;
- peers of the family benchmark (they learn from clicks), with their default settings.

    python -m bench.multitask [--seeds 0 1 2] [--requests 10000] [--write-docs]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace

import numpy as np

from bench.docs import write_block
from bench.family import mean_se
from bench.http_service import run_over_http
from bench.peers import PEER_CLASSES
from bench.simulate import simulate
from bench.worlds import NAMED, World, WorldConfig, request_stream

SERVICES = {
    "service-1head": {},
    "service-heads": {"RECSVC_HEAD_WEIGHTS": '{"click": 1, "purchase": 1}'},
    "service-heads-buy": {"RECSVC_HEAD_WEIGHTS": '{"click": 0.5, "purchase": 2}'},
}
PEERS = ["random", "popularity", "vw"]
PURCHASE_REWARD = 2.0  # the default reward map's


def summarise(clicks: np.ndarray, purchases: np.ndarray, k: int) -> dict:
    n = len(clicks)
    tail = slice(int(0.8 * n), n)
    value = clicks + PURCHASE_REWARD * purchases
    return {"ctr": clicks.sum() / (n * k), "last20_ctr": clicks[tail].mean() / k,
            "buys": purchases.mean(), "last20_buys": purchases[tail].mean(),
            "value": value.mean(), "last20_value": value[tail].mean(),
            "buys_per_click": purchases.sum() / max(clicks.sum(), 1)}


def report(results: dict[str, list[dict]], seeds: list[int], config: WorldConfig,
           command: str) -> str:
    def cell(runs: list[dict], key: str, digits: int = 4) -> str:
        m, se = mean_se([r[key] for r in runs])
        return f"{m:.{digits}f} ± {se:.{digits}f}"

    lines = [f"World: {asdict(config) | {'seed': seeds}}", "",
             f"Command: `{command}`", "",
             "| policy | CTR | last-20% CTR | purchases / request | last-20% purchases / "
             "request | reward / request (clicks + 2 x purchases) | last-20% reward / "
             "request | purchases per click |",
             "|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        lines.append(f"| {name} | {cell(runs, 'ctr')} | {cell(runs, 'last20_ctr')} | "
                     f"{cell(runs, 'buys')} | {cell(runs, 'last20_buys')} | "
                     f"{cell(runs, 'value')} | {cell(runs, 'last20_value')} | "
                     f"{cell(runs, 'buys_per_click', 3)} |")
    lines += ["", "Last-20% purchases per request, per seed:", ""]
    for name, runs in results.items():
        lines.append(f"- {name}: " + ", ".join(f"{r['last20_buys']:.4f}" for r in runs))
    base = results.get("service-1head")
    if base:
        for name in [n for n in results if n.startswith("service-heads")]:
            ratios = [r["last20_buys"] / max(b["last20_buys"], 1e-9)
                      for r, b in zip(results[name], base, strict=True)]
            values = [r["last20_value"] / max(b["last20_value"], 1e-9)
                      for r, b in zip(results[name], base, strict=True)]
            lines.append(f"- {name} / service-1head, last-20% purchases: "
                         + ", ".join(f"{x:.2f}x" for x in ratios)
                         + "; last-20% reward: " + ", ".join(f"{x:.2f}x" for x in values))
    return "\n".join(lines)


def write_docs(section: str) -> None:
    write_block("multitask", section, "## Multi-task heads (issue 7, part 1)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--purchase-scale", type=float, default=0.5)
    ap.add_argument("--policies", nargs="+", choices=[*SERVICES, *PEERS],
                    default=[*SERVICES, *PEERS])
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    command = "python -m bench.multitask " + " ".join(sys.argv[1:] if argv is None else argv)
    config = replace(NAMED["intent-fatigue"], requests=args.requests,
                     purchase_scale=args.purchase_scale)
    results: dict[str, list[dict]] = {p: [] for p in args.policies}
    started = time.time()
    for seed in args.seeds:
        world = World.build(replace(config, seed=seed))
        for name in args.policies:
            if name in SERVICES:
                clicks, buys, _ = run_over_http(world.config, SERVICES[name], name)
            else:
                out = simulate(world, request_stream(world),
                               PEER_CLASSES[name](world, seed), desc=name)
                clicks, buys = out.clicks, out.purchases
            r = summarise(clicks, buys, config.slate)
            results[name].append(r)
            print(f"seed {seed} {name:18s} CTR {r['ctr']:.4f}  purchases/request "
                  f"{r['buys']:.4f}  last-20% {r['last20_buys']:.4f}  reward/request "
                  f"{r['value']:.4f}", flush=True)
    section = report(results, args.seeds, config, command)
    print(section)
    print(f"\ntotal {time.time() - started:.0f}s")
    if args.write_docs:
        write_docs(section)


if __name__ == "__main__":
    main()
