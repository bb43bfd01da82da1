"""A seeded, semi-synthetic MovieLens-100k user simulator.

Ground truth is a matrix-factorisation model (ALS) fitted on all 100k ratings;
its predicted rating, standardised, sets each (user, movie) base attractiveness.
Click probability of a movie at slate position j:

    p = min(0.95, c * exp(beta * z(u, i)) * mood(i) * shown_decay(i)) * pos(j)

- ``c`` is calibrated so that a uniformly random slate of 10 gets ``target_ctr``
  (3%) per item at the start of a session;
- sessions: each user arrives for several consecutive requests (geometric length
  with mean ``session_len``); each session has an intent genre, drawn from the
  user's taste, whose movies are ``intent_boost`` times more attractive;
- drift within the session: after a click, the clicked movie's genres tire by
  ``fatigue`` (multiplicative) for the rest of the session; a movie shown and not
  clicked is ``ignore_decay`` times as attractive if shown again in the session;
- a clicked movie is consumed: that user never clicks it again;
- position bias ``pos(j) = 1 / (1 + j) ** position_eta``;
- catalog swap (off unless ``swap_at`` > 0): the catalog starts with two thirds of
  the movies; after ``swap_at`` of the requests, half of it leaves and the held-back
  third arrives (``catalog_phases``), as when a shop replaces a season's range;
- purchases (off unless ``purchase_scale`` > 0): a clicked movie is bought with
  probability ``purchase_scale * ((rating - 1) / 4) ** purchase_power``, where
  ``rating`` is the user's true (MF-predicted, 1..5) rating of it, so a policy that
  earns clicks with movies the user rates poorly earns few purchases.

Context text is the user's demographics; item text is title, year and genres.
Everything is seeded: the same seed gives the same users, sessions and the same
uniform draws, so policies are compared on common random numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from app.movielens import MovieLens, load


@dataclass(frozen=True)
class SimConfig:
    seed: int = 0
    requests: int = 10_000
    slate: int = 10
    session_len: float = 5.0
    intent_boost: float = 3.0
    fatigue: float = 0.5
    ignore_decay: float = 0.3
    position_eta: float = 0.5
    beta: float = 1.5
    target_ctr: float = 0.03
    mf_rank: int = 16
    purchase_scale: float = 0.0
    purchase_power: float = 4.0
    swap_at: float = 0.0


def fit_mf(data: MovieLens, rank: int, seed: int, iters: int = 12, reg: float = 5.0
           ) -> np.ndarray:
    """ALS on centred ratings; returns the dense ``(users, movies)`` predicted ratings."""
    users = {u.user_id: i for i, u in enumerate(data.users)}
    movies = {m.item_id: i for i, m in enumerate(data.movies)}
    rows = np.array([users[r[0]] for r in data.ratings])
    cols = np.array([movies[r[1]] for r in data.ratings])
    vals = np.array([r[2] for r in data.ratings], dtype=np.float64)
    mu = vals.mean()
    rng = np.random.default_rng(seed)
    U = 0.1 * rng.standard_normal((len(users), rank))
    V = 0.1 * rng.standard_normal((len(movies), rank))
    by_user = [np.flatnonzero(rows == u) for u in range(len(users))]
    by_movie = [np.flatnonzero(cols == m) for m in range(len(movies))]
    eye = reg * np.eye(rank)
    centred = vals - mu
    for _ in range(iters):
        for u, idx in enumerate(by_user):
            Vi = V[cols[idx]]
            U[u] = np.linalg.solve(Vi.T @ Vi + eye, Vi.T @ centred[idx])
        for m, idx in enumerate(by_movie):
            if len(idx):
                Ui = U[rows[idx]]
                V[m] = np.linalg.solve(Ui.T @ Ui + eye, Ui.T @ centred[idx])
    return mu + U @ V.T


@dataclass
class World:
    """Static ground truth shared by every policy run on one seed."""

    config: SimConfig
    data: MovieLens
    base: np.ndarray            # (users, movies) c * exp(beta * z)
    item_genres: np.ndarray     # (movies, genres) 0/1
    taste: np.ndarray           # (users, genres) probability of each session intent
    pos: np.ndarray             # (slate,) position bias
    item_ids: list[str] = field(default_factory=list)
    rating: np.ndarray | None = None  # (users, movies) true rating, 1..5

    def buy_probs(self, user: int, items: np.ndarray) -> np.ndarray:
        """Probability that each of ``items``, once clicked, is bought by ``user``."""
        cfg = self.config
        if cfg.purchase_scale <= 0:
            return np.zeros(len(items))
        r = self.rating[user, items]
        return cfg.purchase_scale * ((r - 1.0) / 4.0) ** cfg.purchase_power

    @classmethod
    def build(cls, config: SimConfig, data: MovieLens | None = None) -> World:
        data = data or load()
        pred = np.clip(fit_mf(data, config.mf_rank, seed=0), 1.0, 5.0)
        z = (pred - pred.mean()) / pred.std()
        genres = sorted({g for m in data.movies for g in m.genres})
        item_genres = np.zeros((len(data.movies), len(genres)))
        for i, m in enumerate(data.movies):
            for g in m.genres:
                item_genres[i, genres.index(g)] = 1.0
        # session intents follow the user's predicted taste per genre
        per_genre = (np.exp(z) @ item_genres) / np.maximum(item_genres.sum(0), 1)
        taste = per_genre ** 4
        taste /= taste.sum(1, keepdims=True)
        pos = 1.0 / (1.0 + np.arange(config.slate)) ** config.position_eta
        raw = np.exp(config.beta * z)
        world = cls(config, data, raw, item_genres, taste, pos,
                    [f"m-{m.item_id}" for m in data.movies], pred)
        world.base = raw * world._calibration()
        return world

    def mood_factor(self, mood: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Mean genre multiplier of each movie under a session's mood vector."""
        g = self.item_genres[items]
        return (g @ mood) / np.maximum(g.sum(1), 1)

    def _calibration(self) -> float:
        """Scale c so a random slate at a session's first step gets target_ctr per item."""
        rng = np.random.default_rng(12345)
        cfg = self.config
        n_users, n_items = self.base.shape
        total = 0.0
        samples = 4000
        for _ in range(samples):
            u = rng.integers(n_users)
            mood = np.ones(self.item_genres.shape[1])
            mood[rng.choice(len(mood), p=self.taste[u])] = cfg.intent_boost
            items = rng.choice(n_items, cfg.slate, replace=False)
            total += float((self.base[u, items] * self.mood_factor(mood, items) *
                            self.pos).sum())
        return cfg.target_ctr * samples * cfg.slate / total


@dataclass
class Request:
    """One request of the stream: who, in which session step, with which draws."""

    index: int
    user: int
    session: int
    step: int
    draws: np.ndarray  # (slate,) uniforms: slot j is clicked if draws[j] < p_j


class Session:
    """Mutable state of one user's session (mood, what was shown, clicks)."""

    def __init__(self, world: World, user: int, rng: np.random.Generator) -> None:
        self.world = world
        self.user = user
        self.mood = np.ones(world.item_genres.shape[1])
        self.intent = int(rng.choice(len(self.mood), p=world.taste[user]))
        self.mood[self.intent] = world.config.intent_boost
        self.shown_decay = np.ones(world.base.shape[1])

    def attraction(self, items: np.ndarray, consumed: set[int]) -> np.ndarray:
        """Click probability of each item at the top slot, right now."""
        w = self.world
        p = w.base[self.user, items] * w.mood_factor(self.mood, items)
        p = np.minimum(p * self.shown_decay[items], 0.95)
        if consumed:
            p[np.isin(items, list(consumed))] = 0.0
        return p

    def click_probs(self, items: np.ndarray, consumed: set[int]) -> np.ndarray:
        """Click probability of each slot of a slate (position bias applied)."""
        return self.attraction(items, consumed) * self.world.pos[: len(items)]

    def observe(self, items: np.ndarray, clicked: np.ndarray) -> None:
        cfg = self.world.config
        for i, c in zip(items, clicked, strict=True):
            if c:
                genres = self.world.item_genres[int(i)] > 0
                self.mood[genres] *= 1.0 - cfg.fatigue
            else:
                self.shown_decay[int(i)] *= cfg.ignore_decay


def catalog_phases(world: World) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Which movies are in the catalog before and after the swap (boolean masks), and
    the index of the first request after it (None: no swap, everything throughout)."""
    n = world.base.shape[1]
    cfg = world.config
    if cfg.swap_at <= 0:
        everything = np.ones(n, dtype=bool)
        return everything, everything, None
    third = np.arange(n) % 3
    return third != 2, third != 0, int(cfg.swap_at * cfg.requests)


def request_stream(world: World) -> list[Request]:
    """The seeded sequence of requests: users in sessions, with per-slot uniforms."""
    cfg = world.config
    rng = np.random.default_rng(cfg.seed)
    n_users = world.base.shape[0]
    # more active users come more often, as in the ratings
    activity = np.bincount([int(u) - 1 for u, *_ in world.data.ratings], minlength=n_users)
    activity = activity / activity.sum()
    out: list[Request] = []
    session = 0
    while len(out) < cfg.requests:
        user = int(rng.choice(n_users, p=activity))
        length = int(rng.geometric(1.0 / cfg.session_len))
        for step in range(length):
            if len(out) == cfg.requests:
                break
            out.append(Request(len(out), user, session, step, rng.random(cfg.slate)))
        session += 1
    return out
