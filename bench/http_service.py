"""The service as a policy of the family benchmark, over HTTP against ``recsvc serve``.

A client's view of the service: the catalog is uploaded (and follows the world's
turnover), ``POST /v1/recommend`` is called with the user id and the demographics
as context, and each click (and purchase, in a world with them) is sent as
feedback; shown items without feedback are learned from through the reward window.
Each request is sent when the last one is answered. The run paces itself on the
wall clock, so it checks that the in-process runs on simulated time
(``bench.service``) stand for the real thing: ``compare`` runs one world both ways.
"""

from __future__ import annotations

import contextlib

import numpy as np

from app.tools.client import Client
from app.tools.processes import running_service
from bench.peers import Policy, View
from bench.service import BENCH_ENV, feedback_events
from bench.simulate import simulate
from bench.worlds import World, WorldConfig, request_stream


@contextlib.contextmanager
def service_subprocess(env: dict[str, str]):
    """An HTTP client of a fresh ``recsvc serve`` process started with ``env``."""
    with running_service(env) as url, Client(url) as client:
        yield client


class HttpServicePolicy(Policy):
    """Drives a running service through ``client`` (see the module docstring)."""

    def __init__(self, world: World, client: Client, name: str = "service (HTTP)"
                 ) -> None:
        self.name = name
        self.world = world
        self.client = client
        self._catalog = np.zeros(world.n_items, dtype=bool)
        self._index = {item_id: i for i, item_id in enumerate(world.item_ids)}
        self._request_id = ""

    def on_catalog(self, live: np.ndarray) -> None:
        movies = self.world.data.movies
        for i in np.flatnonzero(self._catalog & ~live).tolist():
            self.client.delete_item(self.world.item_ids[i])
        rows = [{"item_id": self.world.item_ids[i], "text": movies[i].text,
                 "tags": [g.lower() for g in movies[i].genres]}
                for i in np.flatnonzero(live & ~self._catalog).tolist()]
        for start in range(0, len(rows), 500):
            self.client.upsert(rows[start:start + 500])
        self._catalog = live.copy()

    def slate(self, view: View, k: int) -> np.ndarray:
        u = self.world.data.users[view.user]
        body = self.client.recommend(f"u-{u.user_id}", u.context, k,
                                     exclude_seen=self.world.config.consumes)
        self._request_id = body["request_id"]
        return np.array([self._index[i["item_id"]] for i in body["items"]], dtype=np.int64)

    def learn(self, view: View, items: np.ndarray, clicked: np.ndarray,
              bought: np.ndarray | None = None) -> None:
        for i, event in feedback_events(items, clicked, bought):
            self.client.feedback(self._request_id, self.world.item_ids[i], event)

    def model(self) -> dict:
        return self.client.model()


def run_over_http(config: WorldConfig, env: dict[str, str], label: str = "service (HTTP)"
                  ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Clicks and purchases per request of a fresh ``recsvc serve`` with the benchmark's
    settings and ``env`` on one world, and ``GET /v1/model`` at the end."""
    world = World.build(config)
    service_env = {**BENCH_ENV, "RECSVC_SEED": str(config.seed), **env}
    with service_subprocess(service_env) as client:
        policy = HttpServicePolicy(world, client, label)
        out = simulate(world, request_stream(world), policy, desc=f"{label} {config.name}",
                       on_catalog=policy.on_catalog)
        model = policy.model()
    return out.clicks, out.purchases, model


def compare(config: WorldConfig, in_process: np.ndarray, env: dict[str, str]) -> str:
    """A paragraph for the report: the same world and seed over HTTP and in process."""
    from bench.family import last20

    clicks, _, model = run_over_http(config, env)
    k = config.slate
    a, b = last20(in_process, k), last20(clicks, k)
    # the two runs share the users and draws, not the policy's coin flips: the spread of
    # their difference is about that of two seeds, sqrt(2) x the per-run binomial error
    n = len(clicks) - int(0.8 * len(clicks))
    se = float(np.sqrt(2 * b * (1 - b) / (n * k)))
    return (f"Over HTTP (`recsvc serve`, seed {config.seed} of {config.name}, each request "
            f"sent when the last was answered): last-20% CTR {100 * b:.2f}% against "
            f"{100 * a:.2f}% in process; difference {100 * (b - a):+.2f} points, binomial "
            f"standard error of a difference about {100 * se:.2f}. The HTTP run's model at "
            f"the end: {model}.")
