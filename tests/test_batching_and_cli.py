"""Micro-batching returns what one-by-one calls return; the CLI's item file readers."""

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from app.batching import MicroBatcher
from app.cli import read_items


async def test_concurrent_encodes_share_batches_and_match_direct_calls(encoder):
    calls = []

    def fn(texts):
        calls.append(len(texts))
        return list(encoder.encode(texts))

    texts = [f"context number {i}" for i in range(40)]
    with ThreadPoolExecutor(2) as pool:
        batcher = MicroBatcher(fn, pool, max_batch=16)
        got = await asyncio.gather(*(batcher.submit(t) for t in texts))
    assert np.allclose(np.stack(got), encoder.encode(texts), atol=1e-5)
    assert sum(calls) == 40 and len(calls) < 40 and max(calls) <= 16


async def test_a_failing_batch_fails_its_callers_only():
    def fn(values):
        if "bad" in values:
            raise ValueError("boom")
        return values

    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(fn, pool)
        results = await asyncio.gather(batcher.submit("bad"), return_exceptions=True)
        assert isinstance(results[0], ValueError)
        assert await batcher.submit("ok") == "ok"


def test_read_items_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text(json.dumps({"item_id": "a", "text": "A", "tags": ["x"]}) + "\n\n" +
                     json.dumps({"item_id": "b", "text": "B"}) + "\n")
    assert [i["item_id"] for i in read_items(jsonl)] == ["a", "b"]
    csv_file = tmp_path / "items.csv"
    csv_file.write_text('item_id,text,tags,available\n'
                        'a,"Heat (1995). Action, Crime",action|crime,true\n'
                        'b,Babe,,false\n')
    items = list(read_items(csv_file))
    assert items[0] == {"item_id": "a", "text": "Heat (1995). Action, Crime",
                        "tags": ["action", "crime"], "available": True}
    assert items[1] == {"item_id": "b", "text": "Babe", "available": False}
