"""``recsvc demo``: watch the service learn, next to random and popularity peers.

MovieLens-100k's movies go into a service (by default a fresh one with the embedded
store, started by the demo itself with a 1-second reward window, so that learning
shows within a minute). Then simulated users come back in sessions of a few requests
each. A user clicks a shown movie with a probability that grows with how much that
user liked the movie's genres in their real MovieLens ratings, calibrated so that a
uniformly random slate gets 3% per item; a clicked movie is not clicked again.

The same users, in the same order, are also served by two peers from the same run,
with the same affordances as the service (they know what the user clicked before,
and do not re-show in a session what the user passed over):

- ``random``: uniformly random unseen movies;
- ``popularity``: the movies with the best click-through rate so far (clicks over
  impressions, shrunk towards the mean), with 5% of the slots explored at random.

The demo prints the CTR per shown item of successive windows for the three, and
writes the curves as a PNG (with matplotlib, ``pip install recsvc[demo]``). Learning
quality on many worlds against tuned peers is measured by ``bench.family``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from app.tools.client import Client
from app.tools.movielens import MovieLens, load

RANDOM_CTR = 0.03
K = 10
SESSION_MEAN = 4.0      # requests per session, on average (geometric)
POPULARITY_EPSILON = 0.05
POPULARITY_PRIOR = 20.0  # impressions' worth of the mean CTR in each movie's rate
# what the demo's own service runs with: a short reward window, so that a slate's
# silent items are learned from a second after it was served, not 30 s
DEMO_SERVICE_ENV = {"RECSVC_REWARD_WAIT_S": "1"}


def click_model(data: MovieLens) -> np.ndarray:
    """``(users, movies)`` click probabilities from genre affinities in the real ratings."""
    genres = sorted({g for m in data.movies for g in m.genres})
    g_idx = {g: i for i, g in enumerate(genres)}
    u_idx = {u.user_id: i for i, u in enumerate(data.users)}
    m_idx = {m.item_id: i for i, m in enumerate(data.movies)}
    item_genres = np.zeros((len(data.movies), len(genres)))
    for m in data.movies:
        for g in m.genres:
            item_genres[m_idx[m.item_id], g_idx[g]] = 1.0
    sums = np.zeros((len(data.users), len(genres)))
    counts = np.zeros_like(sums)
    for user_id, item_id, rating, _ in data.ratings:
        row = item_genres[m_idx[item_id]]
        sums[u_idx[user_id]] += row * (rating - 3.5)
        counts[u_idx[user_id]] += row
    affinity = np.where(counts > 0, sums / np.maximum(counts, 1), -0.5)
    n_genres = np.maximum(item_genres.sum(1), 1)
    score = (affinity @ item_genres.T) / n_genres
    raw = np.exp(2.5 * score)
    return np.clip(raw * RANDOM_CTR / raw.mean(), 0.0, 0.6)


@dataclass
class UserMemory:
    """What a policy may know of one user: everything clicked, and what was passed
    over in the current session."""

    clicked: set[int] = field(default_factory=set)
    session_shown: set[int] = field(default_factory=set)

    def allowed(self, n_items: int) -> np.ndarray:
        mask = np.ones(n_items, dtype=bool)
        mask[list(self.clicked | self.session_shown)] = False
        return mask


class Policy(Protocol):
    name: str

    def slate(self, user: int, memory: UserMemory) -> np.ndarray:
        """The movies (column indices) to show ``user`` now."""

    def learn(self, shown: np.ndarray, clicked: np.ndarray) -> None:
        """What became of the slate just served."""


class RandomPeer:
    name = "random"

    def __init__(self, n_items: int, seed: int) -> None:
        self.rng = np.random.default_rng([seed, 1])
        self.n_items = n_items

    def slate(self, user: int, memory: UserMemory) -> np.ndarray:
        allowed = np.flatnonzero(memory.allowed(self.n_items))
        return self.rng.choice(allowed, size=min(K, len(allowed)), replace=False)

    def learn(self, shown: np.ndarray, clicked: np.ndarray) -> None:
        pass


class PopularityPeer(RandomPeer):
    """The movies with the best shrunk click-through rate so far; ε of the slots random."""

    name = "popularity"

    def __init__(self, n_items: int, seed: int) -> None:
        super().__init__(n_items, seed)
        self.rng = np.random.default_rng([seed, 2])
        self.shown = np.zeros(n_items)
        self.clicks = np.zeros(n_items)

    def slate(self, user: int, memory: UserMemory) -> np.ndarray:
        allowed = memory.allowed(self.n_items)
        mean = (self.clicks.sum() + RANDOM_CTR) / (self.shown.sum() + 1.0)
        rate = (self.clicks + POPULARITY_PRIOR * mean) / (self.shown + POPULARITY_PRIOR)
        rate = np.where(allowed, rate + self.rng.random(self.n_items) * 1e-9, -np.inf)
        order = list(np.argsort(-rate))
        out: list[int] = []
        while len(out) < min(K, int(allowed.sum())):
            if self.rng.random() < POPULARITY_EPSILON:
                choice = int(self.rng.choice(np.flatnonzero(allowed)))
                order.remove(choice)
            else:
                choice = int(order.pop(0))
            allowed[choice] = False
            out.append(choice)
        return np.array(out)

    def learn(self, shown: np.ndarray, clicked: np.ndarray) -> None:
        self.shown[shown] += 1
        self.clicks[shown[clicked]] += 1


class ServicePolicy:
    """The service under test, over HTTP: the user id and demographics as context,
    one feedback call per click."""

    name = "service"

    def __init__(self, client: Client, data: MovieLens) -> None:
        self.client = client
        self.data = data
        self.column = {f"m-{m.item_id}": i for i, m in enumerate(data.movies)}
        self.request_id = ""
        self.version = 0

    def slate(self, user: int, memory: UserMemory) -> np.ndarray:
        """The service keeps its own memory of the user (``memory`` is not sent)."""
        u = self.data.users[user]
        answer = self.client.recommend(f"u-{u.user_id}", u.context, k=K)
        self.request_id = answer["request_id"]
        self.version = answer["model_version"]
        # a service of your own (--url) may hold other items: they get no clicks here
        return np.array([self.column[it["item_id"]] for it in answer["items"]
                         if it["item_id"] in self.column], dtype=np.int64)

    def learn(self, shown: np.ndarray, clicked: np.ndarray) -> None:
        events = [{"request_id": self.request_id, "item_id": f"m-{self.data.movies[i].item_id}",
                   "event": "click"} for i in shown[clicked]]
        if events:
            self.client.feedback_batch(events)


def sessions(n_users: int, requests: int, seed: int) -> Iterator[tuple[int, bool]]:
    """``(user, starts a session)`` for each request: users at random, each staying
    for a geometric number of requests (mean ``SESSION_MEAN``)."""
    rng = np.random.default_rng([seed, 0])
    user, left = 0, 0
    for _ in range(requests):
        starts = left == 0
        if starts:
            user, left = int(rng.integers(n_users)), int(rng.geometric(1.0 / SESSION_MEAN))
        left -= 1
        yield user, starts


@dataclass
class Curve:
    """Clicks and shown items per window of requests, for one policy."""

    clicks: list[int] = field(default_factory=list)
    shown: list[int] = field(default_factory=list)

    def ctr(self) -> list[float]:
        return [c / max(s, 1) for c, s in zip(self.clicks, self.shown, strict=True)]


def play(service: ServicePolicy, probs: np.ndarray, requests: int, window: int,
         seed: int) -> dict[str, Curve]:
    """Serve the same users by the service and the peers; return each one's curve."""
    n_users, n_items = probs.shape
    policies: list[Policy] = [service, RandomPeer(n_items, seed), PopularityPeer(n_items, seed)]
    names = [p.name for p in policies]
    memories = {name: [UserMemory() for _ in range(n_users)] for name in names}
    coins = {name: np.random.default_rng([seed, 10 + j]) for j, name in enumerate(names)}
    curves = {name: Curve() for name in names}
    print(f"{'requests':>9} {'service':>8} {'popularity':>11} {'random':>8} {'model':>6}")
    for n, (user, starts) in enumerate(sessions(n_users, requests, seed), 1):
        if (n - 1) % window == 0:  # a new window of the curve
            for curve in curves.values():
                curve.clicks.append(0)
                curve.shown.append(0)
        for name, policy in zip(names, policies, strict=True):
            memory = memories[name][user]
            if starts:
                memory.session_shown.clear()
            shown = policy.slate(user, memory)
            clicked = coins[name].random(len(shown)) < probs[user, shown]
            clicked &= ~np.isin(shown, list(memory.clicked))  # never clicked twice
            policy.learn(shown, clicked)
            memory.session_shown.update(shown[~clicked].tolist())
            memory.clicked.update(shown[clicked].tolist())
            curves[name].clicks[-1] += int(clicked.sum())
            curves[name].shown[-1] += len(shown)
        if n % window == 0 or n == requests:
            row = {name: curve.ctr()[-1] for name, curve in curves.items()}
            print(f"{n:>9} {row['service']:>8.4f} {row['popularity']:>11.4f} "
                  f"{row['random']:>8.4f} {service.version:>6}", flush=True)
    return curves


def write_png(curves: dict[str, Curve], window: int, requests: int, path: Path,
              oracle: float) -> bool:
    """The curves as a PNG; False (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        ends = [min((i + 1) * window, requests) for i in range(len(curve.shown))]
        ax.plot(ends, [100 * c for c in curve.ctr()], marker="o", label=name)
    ax.axhline(100 * oracle, color="grey", linestyle=":", label="oracle (expected)")
    ax.set_xlabel("requests")
    ax.set_ylabel(f"CTR per shown item, % (windows of {window})")
    ax.set_title("recsvc demo: MovieLens-100k users, simulated clicks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


@contextlib.contextmanager
def _service(url: str | None, seed: int) -> Iterator[str]:
    """The given service, or a fresh embedded one with the demo's settings."""
    if url is not None:
        yield url
        return
    from app.tools.processes import running_service_process

    print("starting a fresh service (embedded store, RECSVC_REWARD_WAIT_S=1) ...", flush=True)
    # none of this shell's RECSVC_ settings: not its Redis, not its keys
    with running_service_process({**DEMO_SERVICE_ENV, "RECSVC_SEED": str(seed)},
                                 inherit_settings=False) as (started, _):
        yield started


def run_demo(url: str | None, api_key: str | None, requests: int, window: int, seed: int,
             png: Path | None) -> None:
    if requests < 1 or window < 1:
        from app.tools.rows import InputError

        raise InputError(f"--requests and --window must be at least 1 (got {requests} "
                         f"and {window})")
    data = load()
    probs = click_model(data)
    with _service(url, seed) as base, Client(base, api_key) as client:
        items = [{"item_id": f"m-{m.item_id}", "text": m.text,
                  "tags": [g.lower() for g in m.genres]} for m in data.movies]
        with tqdm(total=len(items), desc="uploading movies", unit="item") as bar:
            for start in range(0, len(items), 250):
                client.upsert(items[start:start + 250])
                bar.update(len(items[start:start + 250]))
        oracle = float(np.sort(probs, 1)[:, -K:].mean())
        print(f"expected CTR per item: random slates {probs.mean():.4f}, "
              f"oracle (each user's {K} best) {oracle:.4f}")
        started = time.time()
        curves = play(ServicePolicy(client, data), probs, requests, window, seed)
        print(f"played {requests} requests in {time.time() - started:.0f} s")
        last = {name: curve.ctr()[-1] for name, curve in curves.items()}
        best_peer = max(last["popularity"], last["random"])
        verdict = "above" if last["service"] > best_peer else "not above"
        print(f"last window: service {last['service']:.4f}, popularity "
              f"{last['popularity']:.4f}, random {last['random']:.4f}: the service is "
              f"{verdict} both peers")
    if png is not None:
        if write_png(curves, window, requests, png, oracle):
            print(f"wrote the curves to {png}")
        else:
            print("no PNG: matplotlib is not installed (pip install 'recsvc[demo]')")
