"""The policies the service is compared with, on the same simulated users and draws.

Every peer gets what the service gets and no more: the user id, the context (the
user's demographics), the catalog's items with their tags, and what the user was
shown and clicked in this session and consumed before (``View``). None sees the
simulator's probabilities except the oracle, which is the ceiling.

Each peer is tuned per world over a small grid (``GRIDS``); the benchmark reports
the best setting of each. A peer that ends below random on some world is a defect
of the benchmark, not a win for the service: ``bench.family`` flags it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from bench.worlds import Request, Session, World


@dataclass
class View:
    """What a policy knows when it builds one slate."""

    request: Request
    session: Session          # only ``shown`` and ``clicked`` may be read, and the oracle's
    blocked: np.ndarray       # (items,) bool: not in the catalog now, or consumed by the user
    clicked_before: dict[int, int]  # the user's clicks so far, per item (repeat worlds)

    @property
    def user(self) -> int:
        return self.request.user


class Policy:
    name = "policy"

    def slate(self, view: View, k: int) -> np.ndarray:
        raise NotImplementedError

    def learn(self, view: View, items: np.ndarray, clicked: np.ndarray,
              bought: np.ndarray | None = None) -> None:
        """The user's reaction to the slate ``slate`` returned for ``view``: the items
        clicked, and of those the ones bought (in a world with purchases)."""


def epsilon_greedy(scores: np.ndarray, allowed: np.ndarray, k: int, epsilon: float,
                   rng: np.random.Generator) -> np.ndarray:
    """``k`` distinct allowed items, each slot the best remaining with probability
    ``1 - epsilon``, else a uniformly random remaining one."""
    ok = np.flatnonzero(allowed)
    k = min(k, len(ok))
    order = ok[np.argsort(-scores[ok], kind="stable")]
    explore = rng.random(k) < epsilon
    taken = np.zeros(len(scores), dtype=bool)
    out = []
    best = 0
    for slot in range(k):
        if explore[slot]:
            rest = ok[~taken[ok]]
            choice = int(rest[rng.integers(len(rest))])
        else:
            while taken[order[best]]:
                best += 1
            choice = int(order[best])
        taken[choice] = True
        out.append(choice)
    return np.array(out, dtype=np.int64)


class RandomPolicy(Policy):
    name = "random"

    def __init__(self, world: World, seed: int) -> None:
        self.rng = np.random.default_rng([seed, 11])

    def slate(self, view, k):
        ok = np.flatnonzero(~view.blocked)
        return self.rng.choice(ok, min(k, len(ok)), replace=False)


class PopularityPolicy(Policy):
    """The items with the highest smoothed CTR, from counts that decay with a
    half-life (in requests), so the list follows a changing catalog and taste.

    ``rest``: items shown to the user earlier in the session and not clicked are left
    out (what a careful popularity list does with the session it knows)."""

    def __init__(self, world: World, seed: int, half_life: float = math.inf,
                 rest: bool = True, epsilon: float = 0.05, prior_weight: float = 20.0) -> None:
        self.name = (f"popularity(half-life={half_life:g}, rest={'yes' if rest else 'no'}, "
                     f"eps={epsilon:g})")
        n = world.n_items
        self.shown = np.zeros(n)
        self.clicks = np.zeros(n)
        self.fade = 1.0 if math.isinf(half_life) else 0.5 ** (1.0 / half_life)
        self.rest = rest
        self.epsilon = epsilon
        self.prior_weight = prior_weight
        self.rng = np.random.default_rng([seed, 12])

    def scores(self) -> np.ndarray:
        total_shown, total_clicks = self.shown.sum(), self.clicks.sum()
        prior = (total_clicks + 1.0) / (total_shown + 30.0)
        return (self.clicks + prior * self.prior_weight) / (self.shown + self.prior_weight)

    def slate(self, view, k):
        allowed = ~view.blocked
        if self.rest and view.session.shown:
            ignored = set(view.session.shown) - set(view.session.clicked)
            resting = allowed.copy()
            resting[list(ignored)] = False
            if resting.sum() >= k:
                allowed = resting
        noise = self.rng.random(len(allowed)) * 1e-9  # random tie-break
        return epsilon_greedy(self.scores() + noise, allowed, k, self.epsilon, self.rng)

    def learn(self, view, items, clicked, bought=None):
        if self.fade < 1.0:
            self.shown *= self.fade
            self.clicks *= self.fade
        self.shown[items] += 1.0
        self.clicks[items[clicked]] += 1.0


def session_features(world: World, view: View, items: np.ndarray) -> np.ndarray:
    """``(len(items), 4)`` what the session says of each item: shown in it and not
    clicked (count), the share of its genres among the genres clicked in the session,
    the same among the genres ignored, and how often the user clicked it before."""
    out = np.zeros((len(items), 4))
    session = view.session
    if session.shown:
        shown = np.bincount(session.shown, minlength=world.n_items).astype(np.float64)
        if session.clicked:
            shown[session.clicked] = 0.0
        out[:, 0] = shown[items]
        g = world.item_genres
        per_item = np.maximum(g[items].sum(1), 1.0)
        if session.clicked:
            out[:, 1] = (g[items] @ g[session.clicked].sum(0).clip(0, 1)) / per_item
        ignored = [i for i in session.shown if i not in set(session.clicked)]
        if ignored:
            out[:, 2] = (g[items] @ g[ignored].sum(0).clip(0, 1)) / per_item
    if view.clicked_before:
        out[:, 3] = [math.log1p(view.clicked_before.get(int(i), 0)) for i in items]
    return out


def user_context(world: World) -> np.ndarray:
    """``(users, d)`` one-hot demographics: age bucket, gender, occupation, and a bias."""
    users = world.data.users
    ages = sorted({min(u.age // 10, 6) for u in users})
    occupations = sorted({u.occupation for u in users})
    out = np.zeros((len(users), len(ages) + 2 + len(occupations) + 1))
    for row, u in enumerate(users):
        out[row, ages.index(min(u.age // 10, 6))] = 1.0
        out[row, len(ages) + (u.gender == "F")] = 1.0
        out[row, len(ages) + 2 + occupations.index(u.occupation)] = 1.0
        out[row, -1] = 1.0
    return out


class LinUCBPolicy(Policy):
    """LinUCB with a model per item on the user's demographics (disjoint arms, Li et
    al. 2010) plus a model shared by all items on the session features
    (``session_features``), fitted on what the per-item models leave unexplained.
    The slate is the top-k by upper confidence bound ``x . theta_i + alpha * width``.

    ``half_life`` (in requests) discounts old evidence, as a drifting world needs: an
    arm's statistics fade by half every ``half_life`` requests (lazily, when the arm
    is next scored or updated: the fade scales ``A`` and ``b`` alike, so ``theta`` is
    unchanged and only the confidence widens)."""

    def __init__(self, world: World, seed: int, alpha: float = 0.5, ridge: float = 1.0,
                 half_life: float = math.inf) -> None:
        self.name = f"linucb(alpha={alpha:g}, half-life={half_life:g})"
        self.world = world
        self.alpha = alpha
        self.x = user_context(world)
        n, d = world.n_items, self.x.shape[1]
        self.a_inv = np.tile(np.eye(d) / ridge, (n, 1, 1))
        self.b = np.zeros((n, d))
        self.theta = np.zeros((n, d))
        self.log_fade = 0.0 if math.isinf(half_life) else math.log(0.5) / half_life
        self.updated = np.zeros(n)  # the request each arm's statistics are current at
        self.now = 0
        shared = 4
        self.shared_a = np.eye(shared) * ridge
        self.shared_b = np.zeros(shared)
        self.shared = np.zeros(shared)
        self.rng = np.random.default_rng([seed, 13])

    def _shared_features(self, view: View, items: np.ndarray) -> np.ndarray:
        return session_features(self.world, view, items)

    def slate(self, view, k):
        x = self.x[view.user]
        everything = np.arange(self.world.n_items)
        mean = self.theta @ x + self._shared_features(view, everything) @ self.shared
        width2 = np.maximum(np.einsum("nij,i,j->n", self.a_inv, x, x), 0.0)
        if self.log_fade:  # faded evidence: A / f, so A^-1 * f with f = fade^-age
            width2 = width2 * np.exp(-self.log_fade * (self.now - self.updated))
        scores = mean + self.alpha * np.sqrt(width2) + self.rng.random(len(mean)) * 1e-9
        scores[view.blocked] = -np.inf
        return np.argsort(-scores)[: min(k, int((~view.blocked).sum()))]

    def learn(self, view, items, clicked, bought=None):
        x = self.x[view.user]
        s = self._shared_features(view, items)
        r = clicked.astype(np.float64)
        for item, reward, feats in zip(items.tolist(), r, s, strict=True):
            a_inv = self.a_inv[item]
            if self.log_fade:
                fade = math.exp(self.log_fade * (self.now - self.updated[item]))
                a_inv /= fade
                self.b[item] *= fade
                self.updated[item] = self.now
            ax = a_inv @ x
            a_inv -= np.outer(ax, ax) / (1.0 + x @ ax)  # Sherman-Morrison
            self.b[item] += (reward - feats @ self.shared) * x
            self.theta[item] = a_inv @ self.b[item]
        # the shared session model fits what the items' own models leave
        residual = r - self.theta[items] @ x
        self.shared_a += s.T @ s
        self.shared_b += s.T @ residual
        self.shared = np.linalg.solve(self.shared_a, self.shared_b)
        self.now += 1


class OraclePolicy(Policy):
    """Greedy on the true current click probability: the ceiling."""

    name = "oracle"

    def __init__(self, world: World, seed: int) -> None:
        self.n = world.n_items

    def attraction(self, view: View) -> np.ndarray:
        """What the policy ranks by: every item's true click probability."""
        return view.session.attraction(np.arange(self.n))

    def slate(self, view, k):
        p = self.attraction(view)
        p[view.blocked] = -1.0
        return np.argsort(-p)[: min(k, int((~view.blocked).sum()))]


class TastelessOraclePolicy(OraclePolicy):
    """Greedy on the true click probability with the user's personal taste left out:
    it knows every item's attraction averaged over the users (``World.population_base``)
    and every dynamic of the world (what a click, a pass and a repeat do), but not what
    this user likes beyond that. With ``intent`` (``oracle-no-taste``) it also knows
    the session's hidden intent, which is drawn from that taste; without
    (``oracle-appeal``) it knows only what is not personal. What a policy can reach
    without learning each user's taste from their own clicks, which in a run of 10,000
    requests over 943 users are a handful each: where the target of ``bench.family``
    lies above it, meeting the target takes learning personal taste, not the world's
    dynamics."""

    def __init__(self, world: World, seed: int, intent: bool = True) -> None:
        super().__init__(world, seed)
        self.intent = intent
        self.name = "oracle-no-taste" if intent else "oracle-appeal"

    def attraction(self, view: View) -> np.ndarray:
        return view.session.attraction(np.arange(self.n), taste=False, intent=self.intent)


class VowpalPolicy(Policy):
    """Vowpal Wabbit's contextual-bandit regressor (``--cb_adf``) over the whole live
    catalog, with slates explored slot by slot as VW's ``cb_explore_adf`` explores
    one action.

    Shared namespace ``U``: user id and demographics. Action namespaces: ``I`` the
    item id, its genres (tags) and decade; ``S`` the session features
    (``session_features``). Quadratic interactions ``UI`` (user by item) and ``US``.

    ``cb_explore_adf`` returns a distribution over single actions; with ε-greedy it
    puts ``1 - ε`` on the best and spreads the rest evenly, so a slate drawn from it
    without replacement was one greedy pick and nine uniform ones (this peer ended
    near random on every world). So VW here scores every action (its cost
    estimates) and the slate is drawn slot by slot over what is left: ``epsilon``,
    the best remaining with probability ``1 - ε``, else a uniform one; ``squarecb``,
    VW's SquareCB rule (Foster and Rakhlin 2020: ``1 / (K + γ (cost - best cost))``
    per action, the rest on the best, ``γ = gamma_scale * sqrt(t)`` with ``t`` the
    slates learned from so far; VW counts examples, k per slate). Each shown item
    is learned from as one bandit example (cost -1 for a click) with the probability
    its slot drew it with; ``cb_type`` is how VW learns from it (``dm``: a plain
    regression of the cost, ``mtr``: importance-weighted)."""

    def __init__(self, world: World, seed: int, explore: str = "epsilon",
                 epsilon: float = 0.05, gamma_scale: float = 1000.0,
                 cb_type: str = "dm") -> None:
        import vowpalwabbit

        detail = f"eps={epsilon:g}" if explore == "epsilon" else f"gamma={gamma_scale:g}"
        self.name = f"vw({explore}, {detail}, {cb_type})"
        self.world = world
        self.explore = explore
        self.epsilon = epsilon
        self.gamma_scale = gamma_scale
        self.vw = vowpalwabbit.Workspace(
            f"--cb_adf --cb_type {cb_type} -q UI -q US --quiet --random_seed {seed}")
        self.rng = np.random.default_rng([seed, 14])
        self.actions = []
        for m in world.data.movies:
            genres = " ".join(f"g_{g.replace(chr(39), '')}" for g in m.genres)
            decade = f"d_{m.year[:3]}" if m.year else "d_none"
            self.actions.append(f"|I id_{m.item_id} {genres} {decade}")
        self.shared = [f"shared |U uid_{u.user_id} age_{u.age // 10} sex_{u.gender} "
                       f"occ_{u.occupation}" for u in world.data.users]
        self._probs = np.zeros(0)
        self._rounds = 0

    def _lines(self, view: View, items: np.ndarray) -> list[str]:
        feats = session_features(self.world, view, items)
        out = []
        for item, f in zip(items.tolist(), feats, strict=True):
            session = " ".join(f"s{j}:{v:.3f}" for j, v in enumerate(f) if v)
            out.append(self.actions[item] + (f" |S {session}" if session else ""))
        return out

    def _slot_pmf(self, costs: np.ndarray, left: np.ndarray) -> np.ndarray:
        """The slot's draw: a distribution over the actions still ``left`` (a mask)."""
        remaining = np.flatnonzero(left)
        best = remaining[np.argmin(costs[remaining])]
        pmf = np.zeros(len(costs))
        if self.explore == "epsilon":
            pmf[remaining] = self.epsilon / len(remaining)
            pmf[best] += 1.0 - self.epsilon
            return pmf
        gamma = self.gamma_scale * math.sqrt(self._rounds + 1)
        pmf[remaining] = 1.0 / (len(remaining) + gamma * (costs[remaining] - costs[best]))
        pmf[best] = 0.0
        pmf[best] = max(1.0 - pmf.sum(), 0.0)
        return pmf / pmf.sum()

    def slate(self, view, k):
        ok = np.flatnonzero(~view.blocked)
        costs = np.asarray(self.vw.predict([self.shared[view.user]] + self._lines(view, ok)),
                           dtype=np.float64)
        costs += self.rng.random(len(costs)) * 1e-9  # random tie-break
        left = np.ones(len(ok), dtype=bool)
        chosen, probs = [], []
        for _ in range(min(k, len(ok))):
            pmf = self._slot_pmf(costs, left)
            j = int(self.rng.choice(len(pmf), p=pmf))
            chosen.append(int(ok[j]))
            probs.append(float(pmf[j]))
            left[j] = False
        self._probs = np.array(probs)
        return np.array(chosen, dtype=np.int64)

    def learn(self, view, items, clicked, bought=None):
        lines = self._lines(view, items)
        for line, click, p in zip(lines, clicked, self._probs, strict=True):
            label = f"0:{-1.0 if click else 0.0}:{max(p, 1e-6)} "
            self.vw.learn([self.shared[view.user], label + line])
        self._rounds += 1


# Each peer's settings tried on every world; the best of each family is reported.
GRIDS: dict[str, list[dict]] = {
    "popularity": [{"half_life": h, "rest": r, "epsilon": e}
                   for h in (math.inf, 2_000.0) for r in (True, False) for e in (0.02, 0.1)],
    "linucb": [{"alpha": a, "half_life": h} for a in (0.1, 0.5, 1.5)
               for h in (math.inf, 3_000.0)],
    # dm: on hits (3,000 requests) mtr's importance weights left VW at 9.1% against
    # dm's 12.9% (epsilon 0.02), and SquareCB at gamma 100 explored too much (9.0%)
    "vw": [{"explore": "epsilon", "epsilon": e} for e in (0.02, 0.1)]
          + [{"explore": "squarecb", "gamma_scale": g} for g in (1_000.0, 10_000.0)],
}
PEER_CLASSES = {"random": RandomPolicy, "popularity": PopularityPolicy,
                "linucb": LinUCBPolicy, "vw": VowpalPolicy, "oracle": OraclePolicy,
                "oracle-no-taste": TastelessOraclePolicy,
                "oracle-appeal": functools.partial(TastelessOraclePolicy, intent=False)}
