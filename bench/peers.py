"""The policies the service is compared with, on the same simulated users and draws.

Each policy builds a slate of movie indices for a request and learns from the
clicks on it. Peers see what a client would give them: the user id, the context
(demographics) and the items; none sees the simulator's probabilities except the
oracle, which is the ceiling.
"""

from __future__ import annotations

import numpy as np

from bench.simulator import Session, World


class Policy:
    name = "policy"

    def slate(self, user: int, session: Session, seen: set[int], k: int) -> np.ndarray:
        raise NotImplementedError

    def learn(self, user: int, items: np.ndarray, clicked: np.ndarray,
              probs: np.ndarray) -> None:
        """``probs``: the probability with which each item was placed in its slot."""


def _mask(n: int, seen: set[int]) -> np.ndarray:
    ok = np.ones(n, dtype=bool)
    ok[list(seen)] = False
    return ok


class RandomPolicy(Policy):
    name = "random"

    def __init__(self, world: World, seed: int) -> None:
        self.n = world.base.shape[1]
        self.rng = np.random.default_rng(seed)

    def slate(self, user, session, seen, k):
        return self.rng.choice(np.flatnonzero(_mask(self.n, seen)), k, replace=False)


class PopularityPolicy(Policy):
    """Most-clicked items so far (online counts), epsilon 5% random per slot."""

    name = "popularity"

    def __init__(self, world: World, seed: int, epsilon: float = 0.05) -> None:
        self.n = world.base.shape[1]
        self.clicks = np.zeros(self.n)
        self.rng = np.random.default_rng(seed)
        self.epsilon = epsilon

    def slate(self, user, session, seen, k):
        ok = _mask(self.n, seen)
        noise = self.rng.random(self.n) * 1e-6  # random tie-break
        order = [i for i in np.argsort(-(self.clicks + noise)) if ok[i]]
        out: list[int] = []
        for _ in range(k):
            if self.rng.random() < self.epsilon:
                rest = [i for i in np.flatnonzero(ok) if i not in out]
                out.append(int(self.rng.choice(rest)))
            else:
                out.append(next(i for i in order if i not in out))
        return np.array(out)

    def learn(self, user, items, clicked, probs):
        self.clicks[items[clicked]] += 1


class OraclePolicy(Policy):
    """Greedy on the true current click probability: the ceiling."""

    name = "oracle"

    def __init__(self, world: World) -> None:
        self.n = world.base.shape[1]

    def slate(self, user, session, seen, k):
        p = session.attraction(np.arange(self.n), seen)
        p[list(seen)] = -1
        return np.argsort(-p)[:k]


class VowpalPolicy(Policy):
    """Vowpal Wabbit ``cb_explore_adf`` over the whole catalog.

    Shared (user) namespace: user id, age bucket, gender, occupation. Action (item)
    namespace: item id, genres, decade. Their quadratic interaction ``-q UI``. The
    slate is drawn slot by slot from VW's pmf without replacement; each shown item
    is learned from as one bandit example (cost -1 for a click) with its probability.
    """

    def __init__(self, world: World, seed: int, explore: str) -> None:
        import vowpalwabbit

        self.name = f"vw-{explore.split()[0].lstrip('-')}"
        self.vw = vowpalwabbit.Workspace(
            f"--cb_explore_adf {explore} -q UI --quiet --random_seed {seed}")
        self.rng = np.random.default_rng(seed)
        self.n = world.base.shape[1]
        self.actions = []
        for m in world.data.movies:
            genres = " ".join(f"g_{g.replace(chr(39), '')}" for g in m.genres)
            decade = f"d_{m.year[:3]}" if m.year else "d_none"
            self.actions.append(f"|I id_{m.item_id} {genres} {decade}")
        self.shared = [f"shared |U uid_{u.user_id} age_{u.age // 10} sex_{u.gender} "
                       f"occ_{u.occupation}" for u in world.data.users]

    def slate(self, user, session, seen, k):
        ok = np.flatnonzero(_mask(self.n, seen))
        pmf = np.asarray(self.vw.predict([self.shared[user]] +
                                         [self.actions[i] for i in ok]), dtype=np.float64)
        chosen, probs = [], []
        taken = np.zeros(len(ok), dtype=bool)
        for _ in range(k):
            if pmf.sum() <= 0:  # everything left had zero mass: uniform over the rest
                pmf = (~taken).astype(np.float64)
            p = pmf / pmf.sum()
            j = int(self.rng.choice(len(p), p=p))
            chosen.append(int(ok[j]))
            probs.append(float(p[j]))
            taken[j] = True
            pmf[j] = 0.0
        self._probs = np.array(probs)
        return np.array(chosen)

    def learn(self, user, items, clicked, probs):
        for item, click, p in zip(items, clicked, self._probs, strict=True):
            label = f"0:{-1.0 if click else 0.0}:{max(p, 1e-6)} "
            self.vw.learn([self.shared[user], label + self.actions[int(item)]])
