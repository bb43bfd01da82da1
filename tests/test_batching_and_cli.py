"""Micro-batching returns what one-by-one calls return; the CLI's item file readers."""

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from app.server.batching import MicroBatcher, StoreBatcher
from app.tools.cli import read_items


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


async def test_batches_compute_in_parallel_up_to_the_concurrency():
    """Two cores: two batches at once, each answered to its own callers."""
    barrier = threading.Barrier(2, timeout=10)

    def fn(values):
        barrier.wait()  # raises unless a second batch runs at the same time
        return [v * 10 for v in values]

    with ThreadPoolExecutor(2) as pool:
        batcher = MicroBatcher(fn, pool, max_batch=4, concurrency=2)
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)  # the first batch is now waiting at the barrier
        got = await asyncio.gather(first, *(batcher.submit(v) for v in (2, 3, 4)))
    assert got == [10, 20, 30, 40]
    assert batcher._running == 0


async def test_store_calls_of_concurrent_requests_go_out_together():
    calls: list[list[int]] = []

    async def fetch(values: list[int]) -> list[int]:
        calls.append(list(values))
        await asyncio.sleep(0.01)  # a round trip: later callers queue meanwhile
        return [v * 10 for v in values]

    batcher = StoreBatcher(fetch)
    assert await batcher.submit(1) == 10  # alone: at once, a batch of one
    got = await asyncio.gather(*(batcher.submit(v) for v in range(2, 12)))
    assert got == [v * 10 for v in range(2, 12)]  # each caller its own answer
    assert calls == [[1], list(range(2, 12))]    # the ten concurrent ones: one call
    first = asyncio.ensure_future(batcher.submit(20))
    await asyncio.sleep(0.001)                   # in flight now
    late = await asyncio.gather(*(batcher.submit(v) for v in (21, 22)))
    assert await first == 200 and late == [210, 220] and calls[-2:] == [[20], [21, 22]]


async def test_a_failing_store_batch_fails_each_of_its_callers():
    async def down(values: list[int]) -> list[int]:
        raise ConnectionError("store down")

    batcher = StoreBatcher(down)
    results = await asyncio.gather(*(batcher.submit(v) for v in range(3)),
                                   return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    batcher.fn = lambda values: asyncio.sleep(0, [v + 1 for v in values])
    assert await batcher.submit(1) == 2  # the next batch goes out again


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


def test_load_items_resumes_after_a_failure_without_resending(tmp_path, monkeypatch, capsys):
    """A 1M-item load that dies part-way continues where the service last confirmed."""
    import app.tools.client
    from app.tools.cli import main

    sent: list[str] = []
    fail_at = {"call": 3}

    class FlakyClient:
        def __init__(self, url, api_key=None):
            self.calls = 0

        def upsert(self, items):
            self.calls += 1
            if self.calls == fail_at["call"]:
                raise ConnectionError("service went away")
            sent.extend(i["item_id"] for i in items)
            return {"catalog_size": len(set(sent))}

    monkeypatch.setattr(app.tools.client, "Client", FlakyClient)
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"item_id": f"i{n}", "text": f"item {n}"}) + "\n"
                             for n in range(25)))
    argv = ["load-items", str(items), "--batch", "5", "--url", "http://unused"]
    with pytest.raises(SystemExit):  # "cannot reach the service", no traceback
        main(argv)
    assert "cannot reach the service at http://unused" in capsys.readouterr().err
    assert sent == [f"i{n}" for n in range(10)]  # two batches confirmed, the third failed
    fail_at["call"] = -1
    main(argv)
    assert sent == [f"i{n}" for n in range(25)]  # each item sent once
    assert "catalog size: 25" in capsys.readouterr().out
    main(argv)
    assert "nothing left to load" in capsys.readouterr().out
    main([*argv, "--from-start"])
    assert len(sent) == 50


def _recording_client(monkeypatch, sent: list[str]):
    import app.tools.client

    class Recording:
        def __init__(self, url, api_key=None):
            pass

        def upsert(self, items):
            sent.extend(i["item_id"] for i in items)
            return {"catalog_size": len(sent)}

    monkeypatch.setattr(app.tools.client, "Client", Recording)


def test_load_items_names_the_line_of_each_bad_row_and_loads_the_rest(
        tmp_path, monkeypatch, capsys):
    """A row the service would refuse is reported by file and line and skipped; its
    batch's valid rows are loaded (before, the batch was refused whole with a 422
    naming only its position in the batch, or a traceback for a non-JSON line)."""
    from app.tools.cli import main

    sent: list[str] = []
    _recording_client(monkeypatch, sent)
    rows = tmp_path / "items.csv"
    rows.write_text("item_id,text\na,Heat\nb,\nbad id,Alien\nc,Babe\n")
    with pytest.raises(SystemExit) as stop:
        main(["load-items", str(rows), "--url", "http://unused"])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert f"{rows}:3: skipped: text" in err and f"{rows}:4: skipped: item_id" in err
    assert "2 rows of" in err
    assert sent == ["a", "c"]

    lines = tmp_path / "items.jsonl"
    lines.write_text('{"item_id": "a", "text": "Heat"}\n{"item_id": "b", "text": \n')
    with pytest.raises(SystemExit):
        main(["load-items", str(lines), "--url", "http://unused"])
    assert f"{lines}:2: not JSON" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["no file", "no text column"])
def test_load_items_says_what_is_wrong_with_the_file(tmp_path, monkeypatch, capsys, case):
    from app.tools.cli import main

    _recording_client(monkeypatch, [])
    path = tmp_path / "items.csv"
    if case == "no text column":
        path.write_text("item_id,title\na,Heat\n")
    with pytest.raises(SystemExit) as stop:
        main(["load-items", str(path), "--url", "http://unused"])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert ("no such file" if case == "no file" else "no text column") in err


def test_the_client_waits_out_a_retry_after(monkeypatch):
    """A 429 or 503 with Retry-After is a pause for a bulk load, not a failure."""
    import httpx

    from app.tools import client as client_module

    answers = iter([httpx.Response(429, headers={"Retry-After": "0"}, json={}),
                    httpx.Response(503, headers={"Retry-After": "0"}, json={}),
                    httpx.Response(200, json={"upserted": 1, "catalog_size": 1})])
    transport = httpx.MockTransport(lambda request: next(answers))
    c = client_module.Client("http://unused")
    c.http = httpx.Client(base_url="http://unused", transport=transport)
    assert c.upsert([{"item_id": "a", "text": "Heat"}]) == {"upserted": 1, "catalog_size": 1}


def test_the_client_gives_up_after_its_retries_with_the_last_answer():
    import httpx

    from app.tools import client as client_module

    calls = []

    def answer(request):
        calls.append(request)
        return httpx.Response(503, headers={"Retry-After": "0"},
                              json={"error": {"code": "store_unavailable", "message": "down"}})

    c = client_module.Client("http://unused")
    c.http = httpx.Client(base_url="http://unused", transport=httpx.MockTransport(answer))
    with pytest.raises(client_module.ServiceError, match="503"):
        c.upsert([{"item_id": "a", "text": "Heat"}])
    assert len(calls) == client_module.RETRIES + 1


@pytest.mark.parametrize("command, shown", [("demo", "recommend requests to play (default: 4000)"),
                                            ("load-items", "(at most 1000) (default: 500)")])
def test_every_option_has_help_with_its_default(capsys, command, shown):
    from app.tools.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert shown in out


def test_the_client_speaks_every_operation_of_the_api(backend, encoder):
    """The typed client against the service in process: every operation of
    docs/api.md by name, with ServiceError carrying the status and the error body."""
    from app.tools.client import Client, ServiceError
    from tests.test_api import MOVIES, make_client

    with make_client(backend, encoder) as http, Client(http=http) as c:
        assert c.upsert([{"item_id": i, "text": t} for i, t in MOVIES])["catalog_size"] == 10
        assert c.get_item("m-1")["item_id"] == "m-1"
        assert [i["item_id"] for i in c.iter_items(page=3)] == sorted(i for i, _ in MOVIES)
        assert len(c.similar("m-1", k=3)["items"]) == 3
        assert len(c.popular(k=2)["items"]) == 2
        slate = c.recommend("u-1", "a rainy evening", k=4, defer_seen=True)
        first = slate["items"][0]["item_id"]
        assert c.seen(slate["request_id"], [first]) == {"accepted": True, "seen": 1}
        assert c.feedback(slate["request_id"], first)["accepted"]
        batch = c.feedback_batch([{"request_id": slate["request_id"], "item_id": first,
                                   "event": "click"}])
        assert batch["results"][0]["duplicate"]
        assert c.event("u-1", "m-2", "like") == {"accepted": True}
        assert [h["item_id"] for h in c.user("u-1")["history"]][-1] == "m-2"
        assert "version" in c.model()
        assert c.delete_item("m-10") == {} and c.delete_user("u-1") == {}
        with pytest.raises(ServiceError) as refused:
            c.get_item("m-10")
        assert refused.value.status == 404 and refused.value.error["code"] == "item_not_found"


async def test_the_async_client_waits_out_a_retry_after_too():
    import httpx

    from app.tools.client import AsyncClient

    answers = iter([httpx.Response(503, headers={"Retry-After": "0"}, json={}),
                    httpx.Response(200, json={"items": [{"item_id": "a", "score": 1.0}]})])
    seen = []

    def answer(request):
        seen.append((request.method, request.url.path, dict(request.url.params)))
        return next(answers)

    http = httpx.AsyncClient(base_url="http://unused", transport=httpx.MockTransport(answer))
    async with AsyncClient(http=http) as c:
        assert (await c.popular(k=1))["items"][0]["item_id"] == "a"
    assert seen == [("GET", "/v1/popular", {"k": "1"})] * 2
