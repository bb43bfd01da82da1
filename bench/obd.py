"""Validate the off-policy estimators on real logged bandit feedback.

The Open Bandit Dataset sample (ZOZOTOWN, 80 items, 3 positions; shipped in the
``obp==0.4.1`` wheel) holds two logs of the same campaign: one collected by a
uniform-random policy and one by Bernoulli Thompson sampling (BTS), each with its
propensities. From the random log alone we estimate the CTR of the BTS policy
(IPS, SNIPS, doubly robust), and compare it with BTS's own on-policy CTR from its
log: a real-data check of the estimators.

The BTS policy is context-free. Two versions of it are evaluated:

- ``prior``: its probability of putting item ``a`` at position ``k`` computed by
  Monte Carlo from the Beta priors shipped with obp, exactly as OBP's own example
  does. The BTS log's propensities vary from round to round (the production
  posterior was updated while logging), so this fixed policy only approximates
  the one that made the log; their correlation is printed.
- ``empirical``: the BTS log's own action frequencies per position, i.e. the
  time-averaged policy whose on-policy CTR the BTS log measures.

    python -m bench.obd [--campaign all|men|women] [--sims 200000]
"""

from __future__ import annotations

import argparse
import csv
import io
import zipfile

import numpy as np
import yaml

from app.tools.wheeldata import fetch_wheel
from models.ope import doubly_robust, ips, on_policy, snips

POSITIONS = 3


def obp_wheel():
    return fetch_wheel("obp", "0.4.1", "--python-version", "3.10", "--only-binary=:all:")


def read_log(zf: zipfile.ZipFile, policy: str, campaign: str) -> dict[str, np.ndarray]:
    raw = zf.read(f"obp/dataset/obd/{policy}/{campaign}/{campaign}.csv").decode()
    rows = list(csv.DictReader(io.StringIO(raw)))
    return {"item": np.array([int(r["item_id"]) for r in rows]),
            "position": np.array([int(r["position"]) - 1 for r in rows]),
            "click": np.array([float(r["click"]) for r in rows]),
            "pscore": np.array([float(r["propensity_score"]) for r in rows])}


def bts_action_dist(zf: zipfile.ZipFile, campaign: str, n_items: int, sims: int,
                    seed: int) -> np.ndarray:
    """``(items, positions)`` probability that BTS ranks each item at each position."""
    prior = yaml.safe_load(zf.read("obp/policy/conf/prior_bts.yaml"))[campaign]
    alpha, beta = np.asarray(prior["alpha"]), np.asarray(prior["beta"])
    assert len(alpha) == n_items
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_items, POSITIONS))
    for start in range(0, sims, 20_000):
        n = min(20_000, sims - start)
        theta = rng.beta(alpha, beta, size=(n, n_items))
        top = np.argsort(-theta, axis=1)[:, :POSITIONS]
        for k in range(POSITIONS):
            counts[:, k] += np.bincount(top[:, k], minlength=n_items)
    return counts / sims


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--campaign", choices=["all", "men", "women"], default="all")
    ap.add_argument("--sims", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    with zipfile.ZipFile(obp_wheel()) as zf:
        random_log = read_log(zf, "random", args.campaign)
        bts_log = read_log(zf, "bts", args.campaign)
        n_items = int(max(random_log["item"].max(), bts_log["item"].max())) + 1
        pi = bts_action_dist(zf, args.campaign, n_items, args.sims, args.seed)

    # cross-check: the BTS log's propensities are this distribution's entries
    logged = bts_log["pscore"]
    simulated = pi[bts_log["item"], bts_log["position"]]
    agreement = np.corrcoef(logged, simulated)[0, 1]

    r, item, pos, p = (random_log[k] for k in ("click", "item", "position", "pscore"))
    # reward model for DR: per (item, position) CTR in the random log, smoothed to the mean
    clicks = np.zeros((n_items, POSITIONS))
    shows = np.zeros((n_items, POSITIONS))
    np.add.at(clicks, (item, pos), r)
    np.add.at(shows, (item, pos), 1)
    qhat = (clicks + 10 * r.mean()) / (shows + 10)
    empirical = np.zeros((n_items, POSITIONS))
    np.add.at(empirical, (bts_log["item"], bts_log["position"]), 1)
    empirical /= empirical.sum(0, keepdims=True)

    truth = on_policy(bts_log["click"])
    print(f"campaign {args.campaign}: random log {len(r)} rounds, BTS log "
          f"{len(bts_log['click'])} rounds, {n_items} items, {POSITIONS} positions")
    print(f"BTS prior policy vs logged propensities: correlation {agreement:.4f}")
    print(f"random policy's own CTR          : {on_policy(r).value:.5f}")
    print(f"BTS on-policy CTR (its own log)  : {truth.value:.5f}  "
          f"[{truth.low:.5f}, {truth.high:.5f}] 95%")
    print("\n| BTS policy | estimator | estimate of BTS CTR | 95% interval | relative error "
          "| truth inside |")
    print("|---|---|---|---|---|---|")
    for label, dist in (("prior (OBP protocol)", pi), ("empirical (its log)", empirical)):
        target = dist[item, pos]
        qhat_target = (dist * qhat).sum(0)[pos]  # model's expected reward of BTS there
        estimates = {"IPS": ips(r, p, target), "SNIPS": snips(r, p, target),
                     "DR": doubly_robust(r, p, target, qhat[item, pos], qhat_target)}
        for name, est in estimates.items():
            rel = abs(est.value - truth.value) / truth.value
            print(f"| {label} | {name} | {est.value:.5f} | [{est.low:.5f}, {est.high:.5f}] "
                  f"| {rel:.1%} | {'yes' if est.contains(truth.value) else 'no'} |")


if __name__ == "__main__":
    main()
