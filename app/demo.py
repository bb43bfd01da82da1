"""``recsvc demo``: MovieLens movies into a running service, then simulated users.

Each simulated user clicks a shown movie with a probability that grows with how
much that user liked the movie's genres in their real MovieLens ratings (about 3%
per item for an average movie). The demo prints the CTR of successive windows of
requests: the learning curve of the live service. The full quality benchmark with
peers is ``bench/quality``.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
from tqdm import tqdm

from app.client import Client
from app.movielens import load


def genre_affinity(data) -> tuple[dict[str, dict[str, float]], dict[str, list[str]]]:
    """Per user, the mean centred rating they gave each genre."""
    genres = {m.item_id: m.genres for m in data.movies}
    sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for user_id, item_id, rating, _ in data.ratings:
        for g in genres.get(item_id, []):
            sums[user_id][g].append(rating - 3.5)
    return ({u: {g: float(np.mean(v)) for g, v in by_g.items()} for u, by_g in sums.items()},
            genres)


def click_probability(affinity: dict[str, float], genres: list[str]) -> float:
    score = np.mean([affinity.get(g, -0.5) for g in genres]) if genres else -0.5
    return float(np.clip(0.03 * np.exp(2.5 * score), 0.0, 0.6))


def run_demo(url: str, api_key: str | None, requests: int, window: int, seed: int) -> None:
    client = Client(url, api_key)
    data = load()
    items = [{"item_id": f"m-{m.item_id}", "text": m.text,
              "tags": [g.lower() for g in m.genres]} for m in data.movies]
    with tqdm(total=len(items), desc="uploading movies", unit="item") as bar:
        for start in range(0, len(items), 250):
            client.upsert(items[start:start + 250])
            bar.update(len(items[start:start + 250]))
    affinity, genres = genre_affinity(data)
    rng = np.random.default_rng(seed)
    users = data.users
    clicks = shown = 0
    print(f"{'requests':>9} {'CTR/item':>9} {'model':>6}")
    started = time.time()
    for n in range(1, requests + 1):
        user = users[int(rng.integers(len(users)))]
        slate = client.recommend(f"u-{user.user_id}", user.context, k=10)
        for it in slate["items"]:
            shown += 1
            p = click_probability(affinity.get(user.user_id, {}), genres[it["item_id"][2:]])
            if rng.random() < p:
                clicks += 1
                client.feedback(slate["request_id"], it["item_id"], "click")
        if n % window == 0:
            print(f"{n:>9} {clicks / max(shown, 1):>9.4f} {slate['model_version']:>6}",
                  flush=True)
            clicks = shown = 0
    model = client.model()
    print(f"done in {time.time() - started:.0f}s; model: {model}")
