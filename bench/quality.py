"""Learning quality: the service against random, popularity, Vowpal Wabbit and an oracle.

Every policy meets the same seeded users, sessions and uniform draws (see
``bench/simulator.py``). The service is driven over HTTP exactly as a client would:
the catalog is uploaded, ``recommend`` is called with the user id and the
demographics as context, and ``feedback`` is sent for clicks only (shown items
without a click are learned from through the reward window).

    python -m bench.quality [--seeds 0 1 2] [--requests 10000] [--variant default]
                            [--policies service random popularity vw-epsilon vw-squarecb oracle]
                            [--write-docs]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from dataclasses import asdict, replace

import httpx
import numpy as np
from tqdm import tqdm

from bench.docs import write_block
from bench.peers import OraclePolicy, PopularityPolicy, RandomPolicy, VowpalPolicy
from bench.server import running_service
from bench.simulator import Request, Session, SimConfig, World, catalog_phases, request_stream

VARIANTS = {
    "default": {},
    "long-sessions": {"session_len": 10.0},
    "short-sessions": {"session_len": 2.0},
    "no-fatigue": {"fatigue": 0.0, "ignore_decay": 1.0},
    "strong-position-bias": {"position_eta": 1.0},
    "catalog-swap": {"swap_at": 0.5},
}
PEERS = ["random", "popularity", "vw-epsilon", "vw-squarecb"]
ALL = ["service", *PEERS, "oracle"]


def simulate(world: World, requests: list[Request], choose, learn, desc: str,
             observe=None, on_swap=None) -> tuple[np.ndarray, np.ndarray]:
    """Run one policy over the request stream; returns clicks and purchases per request.

    ``choose(request, session, blocked)`` must not return ``blocked`` movies (consumed
    by the user, or not in the catalog now). ``learn(request, items, clicked,
    bought)`` sees the user's reaction; ``bought`` is all False unless the world has
    purchases. ``on_swap()`` is called before the first request after a catalog swap.
    ``observe(request, session, consumed, items)``, if given, sees each slate before
    the user reacts to it (``bench.probe`` uses it to diagnose a policy)."""
    clicks = np.zeros(len(requests))
    purchases = np.zeros(len(requests))
    consumed: dict[int, set[int]] = {}
    session: Session | None = None
    session_id = -1
    # purchase draws come from their own stream: the click draws stay those of a world
    # without purchases, so click figures are comparable across the two
    buy_draws = np.random.default_rng([world.config.seed, 1]).random(
        (len(requests), world.config.slate))
    before, after, swap_index = catalog_phases(world)
    absent = set(np.flatnonzero(~before).tolist())
    for r in tqdm(requests, desc=desc, unit="req", mininterval=2.0):
        if r.index == swap_index:
            absent = set(np.flatnonzero(~after).tolist())
            if on_swap is not None:
                on_swap()
        if r.session != session_id:
            session = Session(world, r.user,
                              np.random.default_rng([world.config.seed, r.session]))
            session_id = r.session
        seen = consumed.setdefault(r.user, set())
        items = choose(r, session, seen | absent if absent else seen)
        if observe is not None:
            observe(r, session, seen, items)
        p = session.click_probs(items, seen)
        clicked = r.draws[: len(items)] < p
        bought = clicked & (buy_draws[r.index, : len(items)] < world.buy_probs(r.user, items))
        session.observe(items, clicked)
        seen.update(items[clicked].tolist())
        learn(r, items, clicked, bought)
        clicks[r.index] = clicked.sum()
        purchases[r.index] = bought.sum()
    return clicks, purchases


def run_peer(name: str, world: World, requests: list[Request]) -> tuple[np.ndarray, np.ndarray]:
    """A peer learns from clicks (the objective the quality table compares on)."""
    seed = world.config.seed
    k = world.config.slate
    policy = {"random": lambda: RandomPolicy(world, seed),
              "popularity": lambda: PopularityPolicy(world, seed),
              "vw-epsilon": lambda: VowpalPolicy(world, seed, "--epsilon 0.05"),
              "vw-squarecb": lambda: VowpalPolicy(world, seed, "--squarecb --gamma_scale 100"),
              "oracle": lambda: OraclePolicy(world)}[name]()
    return simulate(world, requests,
                    lambda r, s, seen: policy.slate(r.user, s, seen, k),
                    lambda r, items, clicked, bought: policy.learn(r.user, items, clicked,
                                                                   None),
                    f"{name} seed {seed}")


@contextlib.contextmanager
def service_subprocess(env: dict[str, str]):
    """An HTTP client of a fresh ``recsvc serve`` process started with ``env``."""
    with running_service(env) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


def run_service(world: World, requests: list[Request], env: dict[str, str],
                connect=service_subprocess, observe=None, label: str = "service"
                ) -> tuple[np.ndarray, np.ndarray]:
    """Drive the service over HTTP; ``connect(env)`` yields the client to drive it with.
    Clicks are sent as ``click`` feedback, purchases (if the world has them) as
    ``purchase`` feedback too."""
    seed = world.config.seed
    index = {item_id: i for i, item_id in enumerate(world.item_ids)}
    users = world.data.users
    before, after, _ = catalog_phases(world)
    with connect({"RECSVC_DEVICE": "cpu", "RECSVC_SEED": str(seed), **env}) as c:
        items = [{"item_id": iid, "text": m.text, "tags": [g.lower() for g in m.genres]}
                 for iid, m in zip(world.item_ids, world.data.movies, strict=True)]

        def upload(rows: list[dict]) -> None:
            for s in range(0, len(rows), 500):
                c.post("/v1/items", json={"items": rows[s:s + 500]}).raise_for_status()

        def swap() -> None:
            for i in np.flatnonzero(before & ~after):
                c.delete(f"/v1/items/{world.item_ids[i]}").raise_for_status()
            upload([items[i] for i in np.flatnonzero(after & ~before)])

        upload([items[i] for i in np.flatnonzero(before)])
        last: dict[str, str] = {}

        def choose(r: Request, session: Session, seen: set[int]) -> np.ndarray:
            u = users[r.user]
            resp = c.post("/v1/recommend", json={"user_id": f"u-{u.user_id}",
                                                 "context": {"text": u.context},
                                                 "k": world.config.slate})
            resp.raise_for_status()
            body = resp.json()
            last["request_id"] = body["request_id"]
            return np.array([index[i["item_id"]] for i in body["items"]], dtype=np.int64)

        def learn(r: Request, items: np.ndarray, clicked: np.ndarray,
                  bought: np.ndarray) -> None:
            events = [(i, "click") for i in items[clicked]] + [
                (i, "purchase") for i in items[bought]]
            for i, event in events:
                c.post("/v1/feedback", json={"request_id": last["request_id"],
                                             "item_id": world.item_ids[int(i)],
                                             "event": event}).raise_for_status()

        result = simulate(world, requests, choose, learn, f"{label} seed {seed}", observe,
                          on_swap=swap)
        model = c.get("/v1/model").json()
    print(f"{label} seed {seed}: {model}")
    return result


def summarise(clicks: np.ndarray, requests: list[Request], k: int, windows: int = 10,
              swap_index: int | None = None) -> dict:
    n = len(clicks)
    steps = np.array([min(r.step, 5) for r in requests])
    ordinal: dict[int, int] = {}
    first5 = np.zeros(n, dtype=bool)  # each user's first 5 requests of the run
    for r in requests:
        first5[r.index] = ordinal.get(r.user, 0) < 5
        ordinal[r.user] = ordinal.get(r.user, 0) + 1
    after = {"new_users": clicks[first5].sum() / (first5.sum() * k)}
    if swap_index is not None:  # the tenth of the run right after the catalog swap
        window = clicks[swap_index: swap_index + n // 10]
        after["after_swap"] = window.sum() / (len(window) * k)
    return after | {
        "ctr": clicks.sum() / (n * k),
        "last20": clicks[int(0.8 * n):].sum() / ((n - int(0.8 * n)) * k),
        "first10": clicks[: int(0.1 * n)].sum() / (int(0.1 * n) * k),
        "curve": [float(w.mean() / k) for w in np.array_split(clicks, windows)],
        "by_step": [float(clicks[steps == s].mean() / k) if (steps == s).any() else float("nan")
                    for s in range(6)],
    }


def mean_se(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values)
    se = a.std(ddof=1) / np.sqrt(len(a)) if len(a) > 1 else float("nan")
    return float(a.mean()), float(se)


def report(results: dict[str, list[dict]], seeds: list[int], config: SimConfig,
           variant: str, command: str) -> str:
    swapped = all("after_swap" in r for runs in results.values() for r in runs)
    extra = " after-swap 10% CTR | after-swap per seed |" if swapped else ""
    lines = [f"Variant `{variant}`: {asdict(config) | {'seed': seeds}}", "",
             f"Command: `{command}`", "",
             "| policy | CTR | last-20% CTR | first-10% CTR | last-20% per seed | "
             "first-10% per seed | new users' first 5 requests, CTR | per seed |" + extra,
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if swapped else "")]
    for name, runs in results.items():
        ctr = mean_se([r["ctr"] for r in runs])
        last = mean_se([r["last20"] for r in runs])
        first = mean_se([r["first10"] for r in runs])
        per_seed = ", ".join(f"{r['last20']:.4f}" for r in runs)
        first_seed = ", ".join(f"{r['first10']:.4f}" for r in runs)
        new = mean_se([r["new_users"] for r in runs])
        row = (f"| {name} | {ctr[0]:.4f} ± {ctr[1]:.4f} | {last[0]:.4f} ± {last[1]:.4f} "
               f"| {first[0]:.4f} ± {first[1]:.4f} | {per_seed} | {first_seed} "
               f"| {new[0]:.4f} ± {new[1]:.4f} | "
               + ", ".join(f"{r['new_users']:.4f}" for r in runs) + " |")
        if swapped:
            post = mean_se([r["after_swap"] for r in runs])
            row += (f" {post[0]:.4f} ± {post[1]:.4f} | "
                    + ", ".join(f"{r['after_swap']:.4f}" for r in runs) + " |")
        lines.append(row)
    peers = [p for p in results if p in PEERS]
    for service in [s for s in results if s.startswith("service") and peers]:
        ratios = []
        for i in range(len(seeds)):
            best = max(results[p][i]["last20"] for p in peers)
            ratios.append(results[service][i]["last20"] / best)
        label = service[0].upper() + service[1:]
        lines += ["", f"{label} last-20% CTR / best peer's, per seed: " +
                  ", ".join(f"{x:.2f}x" for x in ratios)]
    for alt in [s for s in results if s.startswith("service+") and "service" in results]:
        parts = []
        for key, what in (("first10", "first-10%"), ("new_users", "new users' first 5"),
                          ("after_swap", "after-swap 10%"), ("last20", "last-20%")):
            if all(key in r for r in results[alt]):
                parts.append(f"{what} " + ", ".join(
                    f"{a[key] / max(b[key], 1e-9):.2f}x"
                    for a, b in zip(results[alt], results["service"], strict=True)))
        lines += ["", f"{alt} / service, CTR per seed: " + "; ".join(parts)]
    lines += ["", "CTR by step within a session (steps 0..4, 5+), mean over seeds:", "",
              "| policy | " + " | ".join(["0", "1", "2", "3", "4", "5+"]) + " |",
              "|---|" + "---|" * 6]
    for name, runs in results.items():
        steps = np.nanmean([r["by_step"] for r in runs], axis=0)
        lines.append(f"| {name} | " + " | ".join(f"{x:.4f}" for x in steps) + " |")
    lines += ["", "Learning curve (CTR per tenth of the run), mean over seeds:", "",
              "| policy | " + " | ".join(str(i + 1) for i in range(10)) + " |",
              "|---|" + "---|" * 10]
    for name, runs in results.items():
        curve = np.mean([r["curve"] for r in runs], axis=0)
        lines.append(f"| {name} | " + " | ".join(f"{x:.4f}" for x in curve) + " |")
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, runs in results.items():
        curves = np.array([r["curve"] for r in runs])
        x = (np.arange(curves.shape[1]) + 0.5) * 10
        mean = curves.mean(0)
        se = curves.std(0, ddof=1) / np.sqrt(len(curves)) if len(curves) > 1 else 0 * mean
        ax.plot(x, mean, marker="o", label=name)
        ax.fill_between(x, mean - se, mean + se, alpha=0.2)
    ax.set_xlabel("% of requests")
    ax.set_ylabel("CTR per shown item")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_docs(section: str, variant: str, path: str = "docs/benchmarks.md") -> None:
    write_block(f"quality:{variant}", section, f"### Quality, variant `{variant}`", path)


def main(argv: list[str] | None = None) -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--variant", choices=list(VARIANTS), default="default")
    ap.add_argument("--policies", nargs="+", choices=ALL, default=ALL)
    ap.add_argument("--service-env", nargs="*", default=[],
                    help="extra RECSVC_ settings for the service, NAME=VALUE")
    ap.add_argument("--alt-env", nargs="+", action="append", default=[],
                    help="also run the service with these settings added (NAME=VALUE), "
                         "as policy service+NAME=VALUE, on the same draws; repeatable")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--docs-key", default=None,
                    help="write the table (and plot) under this name instead of the "
                         "variant's, so a comparison does not replace the variant's table")
    args = ap.parse_args(argv)
    key = args.docs_key or args.variant
    env = dict(kv.split("=", 1) for kv in args.service_env)
    alts = {"service+" + "+".join(kv.removeprefix("RECSVC_") for kv in group):
            {**env, **dict(kv.split("=", 1) for kv in group)} for group in args.alt_env}
    if "service" in args.policies:
        at = args.policies.index("service") + 1
        args.policies[at:at] = list(alts)
    command = "python -m bench.quality " + " ".join(sys.argv[1:] if argv is None else argv)
    results: dict[str, list[dict]] = {p: [] for p in args.policies}
    base = replace(SimConfig(requests=args.requests), **VARIANTS[args.variant])
    started = time.time()
    for seed in args.seeds:
        config = replace(base, seed=seed)
        world = World.build(config)
        requests = request_stream(world)
        for name in args.policies:
            if name == "service":
                clicks, _ = run_service(world, requests, env)
            elif name in alts:
                clicks, _ = run_service(world, requests, alts[name], label=name)
            else:
                clicks, _ = run_peer(name, world, requests)
            results[name].append(summarise(clicks, requests, config.slate,
                                           swap_index=catalog_phases(world)[2]))
            r = results[name][-1]
            swap = f"  after-swap {r['after_swap']:.4f}" if "after_swap" in r else ""
            print(f"seed {seed} {name:12s} CTR {r['ctr']:.4f}  last-20% {r['last20']:.4f}  "
                  f"first-10% {r['first10']:.4f}  new users {r['new_users']:.4f}{swap}",
                  flush=True)
    section = report(results, args.seeds, base, args.variant, command)
    # the recorded figure in docs/ is replaced only by a run that also writes the table
    folder = "docs" if args.write_docs else tempfile.gettempdir()
    png = os.path.join(folder, f"quality-{key}.png")
    plot(results, png, f"Learning curves, {key}")
    print(f"plot: {png}")
    section += f"\n\n![learning curves](quality-{key}.png)"
    print(section)
    print(f"\ntotal {time.time() - started:.0f}s")
    if args.write_docs:
        write_docs(section, key)


if __name__ == "__main__":
    main()
