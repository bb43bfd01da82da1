"""The floor of bench/load: the service's web stack doing no work.

A FastAPI ``async def`` endpoint that parses the same ``/v1/recommend`` body with
the service's own pydantic model and returns a 10-item slate of the same shape,
served by uvicorn with the same options as ``recsvc serve`` (uvloop, httptools,
no access log). Whatever the service costs above this is the recommender itself.

    python -m bench.floor --port 8001
"""

from __future__ import annotations

import argparse

from fastapi import FastAPI

from app.ids import new_ulid
from app.schemas import RecommendIn, RecommendOut, SlateItem

SLATE = [SlateItem(item_id=f"m-{i}", score=1.0 - i / 10, explored=False, propensity=0.95)
         for i in range(100)]


def create_floor_app() -> FastAPI:
    app = FastAPI(title="recsvc floor")

    @app.post("/v1/recommend", response_model=RecommendOut)
    async def recommend(body: RecommendIn) -> RecommendOut:
        return RecommendOut(request_id=new_ulid(), model_version=1, items=SLATE[: body.k])

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
    args = ap.parse_args(argv)
    uvicorn.run(create_floor_app(), host=args.host, port=args.port, loop="uvloop",
                http="httptools", log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
