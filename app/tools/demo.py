"""``recsvc demo``: MovieLens movies into a running service, then simulated users.

Each simulated user clicks a shown movie with a probability that grows with how
much that user liked the movie's genres in their real MovieLens ratings,
calibrated so that a uniformly random slate gets 3% per item. The demo prints the
CTR of successive windows of requests (the learning curve of the live service)
next to the expected CTR of random slates and of the oracle (each user's 10 best
movies). Learning quality against tuned peers is measured by ``bench.family``.
"""

from __future__ import annotations

import time

import numpy as np
from tqdm import tqdm

from app.tools.client import Client
from app.tools.movielens import MovieLens, load

RANDOM_CTR = 0.03


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


def run_demo(url: str, api_key: str | None, requests: int, window: int, seed: int) -> None:
    client = Client(url, api_key)
    data = load()
    items = [{"item_id": f"m-{m.item_id}", "text": m.text,
              "tags": [g.lower() for g in m.genres]} for m in data.movies]
    with tqdm(total=len(items), desc="uploading movies", unit="item") as bar:
        for start in range(0, len(items), 250):
            client.upsert(items[start:start + 250])
            bar.update(len(items[start:start + 250]))
    probs = click_model(data)
    column = {f"m-{m.item_id}": i for i, m in enumerate(data.movies)}
    rng = np.random.default_rng(seed)
    print(f"expected CTR per item: random slates {probs.mean():.4f}, "
          f"oracle (each user's 10 best) {np.sort(probs, 1)[:, -10:].mean():.4f}")
    print(f"{'requests':>9} {'CTR/item':>9} {'model':>6}")
    clicks = shown = 0
    started = time.time()
    for n in range(1, requests + 1):
        u = int(rng.integers(len(data.users)))
        user = data.users[u]
        slate = client.recommend(f"u-{user.user_id}", user.context, k=10)
        for it in slate["items"]:
            shown += 1
            if rng.random() < probs[u, column[it["item_id"]]]:
                clicks += 1
                client.feedback(slate["request_id"], it["item_id"], "click")
        if n % window == 0:
            print(f"{n:>9} {clicks / max(shown, 1):>9.4f} {slate['model_version']:>6}",
                  flush=True)
            clicks = shown = 0
    print(f"done in {time.time() - started:.0f}s; model: {client.model()}")
