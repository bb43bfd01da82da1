"""The floor of bench/load: the service's web stack doing no work.

A FastAPI ``async def`` endpoint that parses the same ``/v1/recommend`` body with
the service's own pydantic model and returns a 10-item slate of the same shape,
served by uvicorn with the same options as ``recsvc serve`` (uvloop, httptools,
no access log). Whatever the service costs above this is the recommender itself.

With ``--redis-url`` it also does, per request, the store I/O that a recommendation
cannot skip, through the service's own ``RedisStore`` and batched across concurrent
requests as the service batches them: read the user (history and shown items) and
log the impression (its state vector, propensities and features, which feedback and
the learner need). That splits the service's cost into the part
any recommender with this contract pays and the part the model pays.

    python -m bench.floor --port 8001 [--redis-url redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from fastapi import FastAPI

from app.ids import new_ulid
from app.schemas import RecommendIn, RecommendOut, SlateItem
from app.server.api import NO_NATIVE_TELEMETRY
from app.server.batching import StoreBatcher
from app.store import Impression
from app.store.redis_store import RedisStore
from models.state import N_ITEM_FEATURES, StateLayout

SLATE = [SlateItem(item_id=f"m-{i}", score=1.0 - i / 10, explored=False, propensity=0.95)
         for i in range(100)]
# the service's state vector with the bundled encoder (384-d): what an impression holds
STATE = np.zeros(StateLayout(384).size, dtype=np.float32).tobytes()
FEATURES = [[0.0] * N_ITEM_FEATURES for _ in range(100)]


def create_floor_app(store: RedisStore | None = None, ttl_s: int = 86_400,
                     shown_max: int = 200) -> FastAPI:
    """``ttl_s`` and ``shown_max``: the service's defaults (RECSVC_IMPRESSION_TTL_S,
    RECSVC_SHOWN_LEN)."""
    app = FastAPI(title="recsvc floor", telemetry=NO_NATIVE_TELEMETRY)  # as the service

    async def read_users(user_ids: list[str]) -> list:
        found = await store.users.get_users(list(dict.fromkeys(user_ids)))
        return [found[u] for u in user_ids]

    async def write_impressions(imps: list[Impression]) -> list[None]:
        await store.impressions.log_impressions(imps, ttl_s, shown_max)
        return [None] * len(imps)

    # batched across concurrent requests as the service batches them (app.server.engine)
    user_reads = StoreBatcher(read_users)
    impression_writes = StoreBatcher(write_impressions)

    @app.post("/v1/recommend", response_model=RecommendOut)
    async def recommend(body: RecommendIn) -> RecommendOut:
        out = RecommendOut(request_id=new_ulid(), model_version=1, items=SLATE[: body.k])
        if store is not None:  # the I/O of a recommendation, and nothing else
            await user_reads.submit(body.user_id)
            items = [it.item_id for it in out.items]
            await impression_writes.submit(
                Impression(out.request_id, body.user_id, time.time(), 1, STATE, items,
                           [it.propensity for it in out.items], [False] * len(items),
                           FEATURES[: len(items)], 200, agents=[0] * len(items)))
        return out

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"ready": True}

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--redis-url", default=None, help="also do a recommendation's store I/O")
    ap.add_argument("--key-prefix", default="floor")
    args = ap.parse_args(argv)
    store = RedisStore(args.redis_url, args.key_prefix) if args.redis_url else None
    uvicorn.run(create_floor_app(store), host=args.host, port=args.port, loop="uvloop",
                http="httptools", log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
