"""A family of simulated worlds built on MovieLens-100k users and movies.

One world is a named, seeded ``WorldConfig``: how clicks come about, what a click
does to the rest of the session, who comes back, and how things drift. Defaults
chosen on one world say little about the next, so the service's learning is judged
on all of them (``bench.family``), each against peers tuned on that world.

Ground truth is a matrix factorisation (ALS) of the 100k ratings. Its predictions
are split into two standardised fields: the item's appeal to everyone (the item's
mean prediction, where a popularity list is strong) and the user's personal taste
(the doubly centred residual). A movie's click probability at slate position ``j``:

    p = min(0.95, c * exp(beta * (sqrt(g) * appeal + sqrt(1 - g) * taste))
                  * mood * rest * repeat) * pos(j)

- ``g`` (``global_share``) is the share of the log-odds' variance that is appeal;
- ``beta`` is set so that each user's best slate gets ``lift`` times a random
  slate's CTR, and ``c`` so that a random slate gets ``base_ctr`` per item (both at
  the start of a session, with its intent, and within what the 0.95 cap allows);
- ``mood``: each session has an intent genre drawn from the user's taste, whose
  movies are ``intent_boost`` times as attractive; after a click the clicked
  movie's genres are multiplied by ``click_effect`` for the rest of the session
  (above 1: a click raises similar items, below 1: satiation);
- ``rest``: a movie shown and not clicked is ``ignore_decay`` times as attractive
  when shown again in the session;
- ``repeat``: once clicked, a movie is ``repeat`` times as attractive to that user
  from then on, however often clicked again (0: consumed, never clicked again;
  above 1: repeat consumption, as in music or groceries);
- ``pos(j) = 1 / (1 + j) ** position_eta``;
- drift: ``taste_drift`` turns appeal and taste towards an independent second draw
  of each, by up to a quarter turn over the run; ``turnover`` replaces that share
  of the catalog over the run (a window sliding through the movies); ``new_users``
  of the users are absent at the start and arrive spread over the run;
- who comes back: a user's share of the requests grows with their number of
  ratings to the power ``activity_power`` (0: uniform, 2: a few heavy users), in
  sessions of geometric length with mean ``session_len``.

Context text is the user's demographics; item text is title, year and genres, with
the genres as tags. Everything is seeded: the same config gives the same users,
sessions and uniform draws, so policies meet common random numbers.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

import numpy as np

from app.tools.movielens import MovieLens, load

CLICK_CAP = 0.95


@dataclass(frozen=True)
class WorldConfig:
    name: str = "custom"
    seed: int = 0
    requests: int = 10_000
    slate: int = 10
    # what a click probability is made of
    global_share: float = 0.4
    lift: float = 6.0
    base_ctr: float = 0.03
    position_eta: float = 0.5
    # the session
    intent_boost: float = 3.0
    click_effect: float = 0.5
    ignore_decay: float = 0.3
    repeat: float = 0.0
    # who comes back
    activity_power: float = 1.0
    session_len: float = 5.0
    # drift
    taste_drift: float = 0.0
    turnover: float = 0.0
    new_users: float = 0.0
    # purchases (off unless > 0): a clicked movie is bought with probability
    # purchase_scale * ((rating - 1) / 4) ** purchase_power, rating the user's true one
    purchase_scale: float = 0.0
    purchase_power: float = 4.0

    @property
    def consumes(self) -> bool:
        """A clicked item is never clicked again by that user: clients exclude it."""
        return self.repeat <= 0.0

    def axes(self) -> dict[str, float]:
        """The config's values on the family's axes (everything but name, seed, size)."""
        skip = {"name", "seed", "requests", "slate", "purchase_scale", "purchase_power"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


# The named worlds: each axis is taken to both of its directions by at least one.
NAMED: dict[str, WorldConfig] = {w.name: w for w in (
    # the simulator the service was first tuned on: session intent, genre fatigue
    WorldConfig("intent-fatigue"),
    # hits: most of the click probability is the item's appeal to everyone
    WorldConfig("hits", global_share=0.85, lift=4.0, base_ctr=0.06, intent_boost=1.5,
                click_effect=1.0, ignore_decay=0.5, session_len=3.0),
    # binge: a click raises similar items, long sessions
    WorldConfig("binge", global_share=0.3, intent_boost=4.0, click_effect=2.0,
                ignore_decay=0.6, session_len=10.0),
    # satiation without intent: whatever was clicked tires quickly
    WorldConfig("satiation", intent_boost=1.0, click_effect=0.25, ignore_decay=0.5,
                session_len=8.0),
    # repeat consumption (music, groceries): clicked items are clicked again
    WorldConfig("repeat", repeat=3.0, click_effect=1.2, ignore_decay=0.8, base_ctr=0.05,
                lift=5.0, activity_power=1.5),
    # a faint signal: low CTR, the best slate only 3x random
    WorldConfig("faint", lift=3.0, base_ctr=0.01, intent_boost=1.5, click_effect=1.0,
                ignore_decay=0.7),
    # sharp personal taste: the best slate 12x random, little shared appeal
    WorldConfig("sharp-taste", global_share=0.1, lift=12.0, base_ctr=0.02),
    # a strong position bias, high base CTR
    WorldConfig("top-heavy", position_eta=1.2, base_ctr=0.10, lift=3.0, click_effect=1.0,
                ignore_decay=0.5),
    # regulars: a few heavy users in short sessions, no session intent
    WorldConfig("regulars", activity_power=2.0, session_len=1.5, intent_boost=1.0,
                click_effect=1.0, global_share=0.2),
    # drift: tastes move, half the catalog turns over, half the users arrive later
    WorldConfig("drift", taste_drift=1.0, turnover=0.5, new_users=0.5, session_len=4.0),
)}

# the ranges the generator draws each axis from (both directions of every axis)
RANGES: dict[str, tuple[float, float]] = {
    "global_share": (0.05, 0.9), "lift": (3.0, 12.0), "base_ctr": (0.01, 0.10),
    "position_eta": (0.0, 1.2), "intent_boost": (1.0, 4.0), "click_effect": (0.25, 2.0),
    "ignore_decay": (0.2, 1.0), "activity_power": (0.0, 2.0), "session_len": (1.0, 20.0),
    "taste_drift": (0.0, 1.0), "turnover": (0.0, 0.6), "new_users": (0.0, 0.6),
}
LOG_SCALED = {"lift", "base_ctr", "click_effect", "session_len"}


STRATA = 5  # the first STRATA drawn worlds form a Latin hypercube over the axes


def drawn_world(index: int, requests: int = 5_000) -> WorldConfig:
    """The ``index``-th world drawn at random over the family's axes (the same index
    always gives the same world). The first ``STRATA`` are a Latin hypercube: on every
    axis each of them falls in a different fifth of the range, so a handful of drawn
    worlds already spans both directions of each axis; later ones are drawn freely.
    One in three consumes (a clicked item is never clicked again), one in three leaves a
    clicked item as it was, one in three repeats."""
    design = np.random.default_rng(2026)
    rng = np.random.default_rng(np.random.SeedSequence(2026).spawn(index + 1)[index])
    values = {}
    for axis, (low, high) in RANGES.items():
        order = design.permutation(STRATA)  # drawn for every axis: the design is fixed
        u = rng.random()
        if index < STRATA:
            u = (order[index] + u) / STRATA
        values[axis] = (float(np.exp(np.log(low) + u * (np.log(high) - np.log(low))))
                        if axis in LOG_SCALED else low + u * (high - low))
    values["repeat"] = (0.0, 1.0, 1.0 + 3.0 * rng.random())[index % 3]
    rounded = {k: round(float(v), 3) for k, v in values.items()}
    return WorldConfig(f"drawn-{index}", requests=requests, **rounded)


def standardise(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / max(float(x.std()), 1e-12)


@functools.lru_cache(maxsize=1)
def movielens() -> MovieLens:
    return load()


def fit_mf(data: MovieLens, rank: int = 16, seed: int = 0, iters: int = 12,
           reg: float = 5.0) -> np.ndarray:
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


@dataclass(frozen=True)
class Truth:
    """What every world of the family shares: the data and its two fields, twice."""

    data: MovieLens
    rating: np.ndarray        # (users, movies) predicted rating, 1..5
    appeal: np.ndarray        # (2, movies) standardised appeal: the first draw, the drifted one
    taste: np.ndarray         # (2, users, movies) standardised personal taste, the same
    item_genres: np.ndarray   # (movies, genres) 0/1
    activity: np.ndarray      # (users,) ratings per user


@functools.lru_cache(maxsize=1)
def truth() -> Truth:
    data = movielens()
    rating = np.clip(fit_mf(data), 1.0, 5.0)
    item_mean = rating.mean(0)
    residual = rating - item_mean - rating.mean(1, keepdims=True) + rating.mean()
    appeal = standardise(item_mean)
    taste = standardise(residual)
    # the drifted draw: another movie's appeal, another user's taste (independent fields
    # with the same distributions, so a turn between them keeps the variance)
    rng = np.random.default_rng(7)
    appeal2 = appeal[rng.permutation(len(appeal))]
    taste2 = taste[rng.permutation(len(taste))][:, rng.permutation(taste.shape[1])]
    genres = sorted({g for m in data.movies for g in m.genres})
    item_genres = np.zeros((len(data.movies), len(genres)))
    for i, m in enumerate(data.movies):
        for g in m.genres:
            item_genres[i, genres.index(g)] = 1.0
    users = {u.user_id: i for i, u in enumerate(data.users)}
    activity = np.bincount([users[r[0]] for r in data.ratings], minlength=len(users))
    return Truth(data, rating, np.stack([appeal, appeal2]), np.stack([taste, taste2]),
                 item_genres, activity.astype(np.float64))


@dataclass
class World:
    """A world's ground truth: the click model's parameters for one config."""

    config: WorldConfig
    truth: Truth
    beta: float
    scale: float             # c
    pos: np.ndarray          # (slate,) position bias
    genre_taste: np.ndarray  # (users, genres) probability of each session intent
    item_ids: list[str] = field(default_factory=list)
    _population: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def data(self) -> MovieLens:
        return self.truth.data

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def item_genres(self) -> np.ndarray:
        return self.truth.item_genres

    @classmethod
    def build(cls, config: WorldConfig) -> World:
        t = truth()
        pos = 1.0 / (1.0 + np.arange(config.slate)) ** config.position_eta
        logits0 = _mix(t, config, 0.0)
        per_genre = (np.exp(logits0) @ t.item_genres) / np.maximum(t.item_genres.sum(0), 1)
        genre_taste = per_genre ** 4
        genre_taste /= genre_taste.sum(1, keepdims=True)
        world = cls(config, t, 1.0, 1.0, pos, genre_taste,
                    [f"m-{m.item_id}" for m in t.data.movies])
        world.beta, world.scale = world._calibrate()
        return world

    # -- the click model -------------------------------------------------------------
    def logits(self, user: int, items: np.ndarray, progress: float) -> np.ndarray:
        """Log-attraction (before ``beta``) of ``items`` for ``user`` at ``progress``
        (0..1) through the run."""
        t, cfg = self.truth, self.config
        g = cfg.global_share
        angle = cfg.taste_drift * 0.5 * np.pi * progress
        a = np.cos(angle) * t.appeal[0, items] + np.sin(angle) * t.appeal[1, items]
        p = np.cos(angle) * t.taste[0, user, items] + np.sin(angle) * t.taste[1, user, items]
        return np.sqrt(g) * a + np.sqrt(1.0 - g) * p

    def base(self, user: int, items: np.ndarray, progress: float,
             taste: bool = True) -> np.ndarray:
        """The attraction of ``items`` to ``user`` before the session's effects; with
        ``taste=False`` the users' mean (``population_base``): what is known of an
        item without knowing who asks."""
        if not taste:
            return self.population_base(progress)[items]
        return self.scale * np.exp(self.beta * self.logits(user, items, progress))

    def population_base(self, progress: float) -> np.ndarray:
        """``(items,)`` each item's attraction before the session's effects, averaged
        over the users, each weighed by their share of the requests (``activity **
        activity_power``), each capped as a click probability is: the best a ranking
        can know without the user's taste (an item's mean attraction is not its appeal
        alone: items differ in how widely tastes about them spread). Cached per
        fiftieth of the run."""
        step = round(progress * 50) if self.config.taste_drift > 0 else 0
        cached = self._population.get(step)
        if cached is None:
            weights = self.truth.activity ** self.config.activity_power
            raw = np.minimum(self.scale * np.exp(self.beta * _mix(self.truth, self.config,
                                                                   step / 50)), CLICK_CAP)
            cached = (weights @ raw) / weights.sum()
            self._population[step] = cached
        return cached

    def mood_factor(self, mood: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Mean genre multiplier of each movie under a session's mood vector."""
        g = self.item_genres[items]
        return (g @ mood) / np.maximum(g.sum(1), 1)

    def buy_probs(self, user: int, items: np.ndarray) -> np.ndarray:
        """Probability that each of ``items``, once clicked, is bought by ``user``."""
        cfg = self.config
        if cfg.purchase_scale <= 0:
            return np.zeros(len(items))
        r = self.truth.rating[user, items]
        return cfg.purchase_scale * ((r - 1.0) / 4.0) ** cfg.purchase_power

    def _calibrate(self, samples: int = 600) -> tuple[float, float]:
        """``beta`` for the config's lift (bisection) and ``c`` for its base CTR, over
        sampled users at a session's start with its intent. A lift the cap cannot
        allow gives the largest reachable one."""
        cfg = self.config
        rng = np.random.default_rng(12345)
        n_users, n_items = self.truth.rating.shape
        users = rng.integers(n_users, size=samples)
        moods = np.ones((samples, self.item_genres.shape[1]))
        for s, u in enumerate(users):
            moods[s, rng.choice(moods.shape[1], p=self.genre_taste[u])] = cfg.intent_boost
        mood = (moods @ self.item_genres.T) / np.maximum(self.item_genres.sum(1), 1)
        logits = np.stack([self.logits(int(u), np.arange(n_items), 0.0) for u in users])
        randoms = rng.integers(n_items, size=(samples, cfg.slate))
        pos = self.pos

        def lift_and_scale(beta: float) -> tuple[float, float]:
            raw = np.exp(beta * logits) * mood
            rand = np.take_along_axis(raw, randoms, 1)
            c = cfg.base_ctr * cfg.slate / float((rand * pos).sum(1).mean())
            best = -np.sort(-np.minimum(c * raw, CLICK_CAP), 1)[:, : cfg.slate]
            rand_ctr = float((np.minimum(c * rand, CLICK_CAP) * pos).sum(1).mean())
            return float((best * pos).sum(1).mean()) / rand_ctr, c

        low, high = 0.0, 6.0
        for _ in range(30):
            mid = 0.5 * (low + high)
            low, high = (mid, high) if lift_and_scale(mid)[0] < cfg.lift else (low, mid)
        beta = 0.5 * (low + high)
        return beta, lift_and_scale(beta)[1]

    def measured_lift(self) -> float:
        """The lift the calibration reached (below the config's where the cap binds)."""
        return _reached_lift(self)

    # -- the catalog over the run ------------------------------------------------------
    def live_items(self, progress: float) -> np.ndarray:
        """Boolean mask of the movies in the catalog at ``progress``: a window of
        ``n / (1 + turnover)`` movies, in a seeded order, that slides by ``turnover`` of
        its size over the run."""
        cfg = self.config
        n = self.n_items
        if cfg.turnover <= 0:
            return np.ones(n, dtype=bool)
        order = np.random.default_rng([cfg.seed, 3]).permutation(n)
        width = int(n / (1.0 + cfg.turnover))
        start = int(round(progress * cfg.turnover * width))
        live = np.zeros(n, dtype=bool)
        live[order[start: start + width]] = True
        return live


def _mix(t: Truth, cfg: WorldConfig, progress: float) -> np.ndarray:
    """``(users, movies)`` log-attraction before ``beta`` at ``progress``."""
    g = cfg.global_share
    angle = cfg.taste_drift * 0.5 * np.pi * progress
    a = np.cos(angle) * t.appeal[0] + np.sin(angle) * t.appeal[1]
    p = np.cos(angle) * t.taste[0] + np.sin(angle) * t.taste[1]
    return np.sqrt(g) * a[None, :] + np.sqrt(1.0 - g) * p


def _reached_lift(world: World) -> float:
    cfg = world.config
    rng = np.random.default_rng(99)
    users = rng.integers(world.truth.rating.shape[0], size=300)
    everything = np.arange(world.n_items)
    best, rand = 0.0, 0.0
    for u in users:
        p = np.minimum(world.base(int(u), everything, 0.0), CLICK_CAP)
        best += float((np.sort(p)[::-1][: cfg.slate] * world.pos).sum())
        rand += float((p[rng.integers(world.n_items, size=cfg.slate)] * world.pos).sum())
    return best / rand


@dataclass
class Request:
    """One request of the stream: who, in which session step, with which draws."""

    index: int
    user: int
    session: int
    step: int
    draws: np.ndarray  # (slate,) uniforms: slot j is clicked if draws[j] < p_j

    def progress(self, total: int) -> float:
        return self.index / max(total, 1)


class Session:
    """Mutable state of one user's session: mood, what was shown and ignored."""

    def __init__(self, world: World, user: int, rng: np.random.Generator,
                 repeat: dict[int, float]) -> None:
        self.world = world
        self.user = user
        self.mood = np.ones(world.item_genres.shape[1])
        self.intent = int(rng.choice(len(self.mood), p=world.genre_taste[user]))
        self.mood[self.intent] = world.config.intent_boost
        self.rest = np.ones(world.n_items)
        self.repeat = repeat  # the user's lasting per-item factor after clicks
        self.shown: list[int] = []
        self.clicked: list[int] = []
        self.progress = 0.0

    def attraction(self, items: np.ndarray, taste: bool = True,
                   intent: bool = True) -> np.ndarray:
        """Click probability of each item at the top slot, right now. ``taste=False``
        takes the users' mean for the user's own (``World.population_base``);
        ``intent=False`` leaves out the session's intent (drawn from that taste, and
        never shown), while what the session's clicks did to the mood stays."""
        w = self.world
        mood = self.mood
        if not intent:
            mood = mood.copy()
            mood[self.intent] /= w.config.intent_boost
        p = w.base(self.user, items, self.progress, taste) * w.mood_factor(mood, items)
        p = p * self.rest[items]
        if self.repeat:
            p = p * np.array([self.repeat.get(int(i), 1.0) for i in items])
        return np.minimum(p, CLICK_CAP)

    def click_probs(self, items: np.ndarray) -> np.ndarray:
        """Click probability of each slot of a slate (position bias applied)."""
        return self.attraction(items) * self.world.pos[: len(items)]

    def observe(self, items: np.ndarray, clicked: np.ndarray) -> None:
        cfg = self.world.config
        for i, c in zip(items.tolist(), clicked.tolist(), strict=True):
            self.shown.append(i)
            if c:
                self.clicked.append(i)
                genres = self.world.item_genres[i] > 0
                self.mood[genres] *= cfg.click_effect
                self.repeat[i] = cfg.repeat
            else:
                self.rest[i] *= cfg.ignore_decay


def request_stream(world: World) -> list[Request]:
    """The seeded sequence of requests: users in sessions, with per-slot uniforms.
    Users come in proportion to their ratings to ``activity_power``; late users (a
    ``new_users`` share) come only after their arrival point."""
    cfg = world.config
    rng = np.random.default_rng(cfg.seed)
    activity = world.truth.activity ** cfg.activity_power
    n_users = len(activity)
    arrival = np.zeros(n_users)
    late = rng.random(n_users) < cfg.new_users
    arrival[late] = rng.random(int(late.sum())) * cfg.requests
    out: list[Request] = []
    session = 0
    while len(out) < cfg.requests:
        weights = np.where(arrival <= len(out), activity, 0.0)
        user = int(rng.choice(n_users, p=weights / weights.sum()))
        length = int(rng.geometric(1.0 / cfg.session_len))
        for step in range(length):
            if len(out) == cfg.requests:
                break
            out.append(Request(len(out), user, session, step, rng.random(cfg.slate)))
        session += 1
    return out
