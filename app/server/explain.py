"""Why an item was recommended, and what the model relies on, by ablation.

Both answers are counterfactual: the model is asked again with one part of its
input taken away, and the change in its score is that part's contribution. That
is exact for this model, whatever it learned, at the price of one batched forward
pass per part; no gradient or linear approximation is trusted to explain it.

- Per request (``"explain": true``): the slate's items are scored again without
  the context, without each of the user's latest history items (it leaves the
  history, the shown list and every feature it fed), and without the items the user
  was shown and passed over. The parts whose removal changes the item's score most
  are its reasons.
- Model-wide (``GET /v1/model/importance``): on recently logged impressions, each
  part of the state (context, positive pool, negative pool, scalars) and each group
  of per-candidate features is zeroed in turn; its importance is the mean absolute
  change of Q over the logged slates' items, and how often the slate's top item
  changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.settings import Settings
from app.store import Impression, UserData
from app.user_state import user_state_and_history
from models.index import CandidateIndex
from models.scorer import Scorer
from models.state import FEATURE_GROUPS, StateLayout, candidate_features

# history items explained per request: the latest distinct ones
EXPLAINED_HISTORY = 20
# reasons returned per item, strongest first
REASONS_PER_ITEM = 3


@dataclass(frozen=True)
class Variant:
    """One counterfactual request: what was taken away, and what is left."""

    kind: str  # "none" (the request itself), "context", "history", "ignored"
    item_id: str | None
    event: str | None
    user: UserData
    ctx: np.ndarray | None


def lift_scale(settings: Settings, index: CandidateIndex) -> float | None:
    """How the popularity lift reads (``models.state.popularity_features``): clicks over
    the clicks expected of each impression, scaled by the catalog's ratio, under
    ``RECSVC_POPULARITY_LIFT=expected``; None (the smoothed CTR over the catalog's)
    under ``ctr``. Serving and explanations read it here, so they always agree."""
    return index.expected_scale() if settings.popularity_lift == "expected" else None


def _without_item(user: UserData, item_id: str) -> UserData:
    return UserData([h for h in user.history if h["item_id"] != item_id],
                    [s for s in user.shown if s[0] != item_id])


def _variants(user: UserData, ctx: np.ndarray | None) -> list[Variant]:
    out = [Variant("none", None, None, user, ctx)]
    if ctx is not None:
        out.append(Variant("context", None, None, user, None))
    latest: dict[str, str] = {}
    for h in reversed(user.history):  # newest first: each item's latest event
        if h["item_id"] not in latest:
            latest[h["item_id"]] = h["event"]
        if len(latest) == EXPLAINED_HISTORY:
            break
    out += [Variant("history", i, e, _without_item(user, i), ctx) for i, e in latest.items()]
    if any(i not in user.touched for i, _ in user.shown):
        out.append(Variant("ignored", None, None,
                           UserData(user.history,
                                    [s for s in user.shown if s[0] in user.touched]), ctx))
    return out


def explain_slate(layout: StateLayout, scorer: Scorer, index: CandidateIndex,
                  settings: Settings, user: UserData, ctx: np.ndarray | None,
                  item_ids: list[str], explored: list[bool], now: float) -> list[dict]:
    """Per slate item: its score, whether it was explored, and its strongest reasons,
    each ``{"kind", "item_id", "event", "contribution"}`` (contribution: how much
    lower the score would be without that part; negative when it held the item
    back). Items deleted meanwhile get no reasons."""
    s = settings
    known, items = index.vectors_of(item_ids)
    row = {i: r for r, i in enumerate(known)}
    variants = _variants(user, ctx)
    built = [user_state_and_history(layout, v.user, v.ctx, index, s.rewards, s.history_len,
                                    s.history_decay, now) for v in variants]
    queries, values = scorer.query(np.stack([b[0] for b in built]))
    stats, tags = index.stats_and_tags_of(known)
    scale = lift_scale(s, index)
    scores = np.stack([
        Scorer.score(queries[j], float(values[j]), items,
                     candidate_features(known, v.user.shown, v.user.touched, now, stats,
                                        items, tags, built[j][1], s.exposure_recent_s,
                                        index.base_ctr(), scale))
        for j, v in enumerate(variants)])  # (variants, known items)
    contributions = scores[0] - scores[1:]
    out = []
    for item_id, was_explored in zip(item_ids, explored, strict=True):
        entry: dict = {"explored": bool(was_explored), "reasons": []}
        if item_id in row:
            col = row[item_id]
            entry["score"] = float(scores[0, col])
            order = np.argsort(-np.abs(contributions[:, col]))[:REASONS_PER_ITEM]
            entry["reasons"] = [
                {"kind": variants[j + 1].kind, "item_id": variants[j + 1].item_id,
                 "event": variants[j + 1].event,
                 "contribution": round(float(contributions[j, col]), 6)}
                for j in order]
        out.append(entry)
    return out


def importance(layout: StateLayout, scorer: Scorer, index: CandidateIndex,
               impressions: list[Impression]) -> dict:
    """Model-wide importance of each input part, by ablation on logged impressions."""
    rows = []
    for imp in impressions:
        known, items = index.vectors_of(imp.item_ids)
        if not known or not imp.features:
            continue
        slot = {i: j for j, i in enumerate(imp.item_ids)}
        feats = np.asarray([imp.features[slot[i]] for i in known], dtype=np.float32)
        rows.append((np.frombuffer(imp.state, dtype=np.float32), items, feats))
    parts: list[dict] = []
    if not rows:
        return {"impressions": 0, "items": 0, "model_version": scorer.version, "parts": parts}
    states = np.stack([r[0] for r in rows])

    def q_all(states_: np.ndarray, feature_mask: slice | None = None) -> list[np.ndarray]:
        queries, values = scorer.query(states_)
        out = []
        for j, (_, items, feats) in enumerate(rows):
            f = feats.copy()
            if feature_mask is not None:
                f[:, feature_mask] = 0.0
            out.append(Scorer.score(queries[j], float(values[j]), items, f))
        return out

    base = q_all(states)

    def measure(name: str, kind: str, ablated: list[np.ndarray]) -> None:
        change = np.concatenate([np.abs(a - b) for a, b in zip(ablated, base, strict=True)])
        top = np.mean([np.argmax(a) != np.argmax(b) for a, b in zip(ablated, base, strict=True)])
        parts.append({"part": name, "kind": kind, "mean_abs_q_change": float(change.mean()),
                      "top_item_changed": float(top)})

    for name, cols in layout.parts.items():
        ablated = states.copy()
        ablated[:, cols] = 0.0
        measure(name, "state", q_all(ablated))
    for name, cols in FEATURE_GROUPS.items():
        measure(name, "item_features", q_all(states, cols))
    parts.sort(key=lambda p: -p["mean_abs_q_change"])
    return {"impressions": len(rows), "items": int(sum(len(r[1]) for r in rows)),
            "model_version": scorer.version, "parts": parts}

