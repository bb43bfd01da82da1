"""``/dashboard`` in a real browser: headless Chromium opens the page of a running
``recsvc serve`` while simulated users send traffic, and the charts must draw data.

Needs Debian's ``chromium`` (``.ci/run`` installs it). Without it the test skips,
except under CI (``CI=true``), where a missing browser is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from app.tools.client import Client
from app.tools.processes import running_service_process
from tests.browser import BROWSER, visit

CHARTS = ("c-log", "c-reward", "c-rates", "c-latency", "c-learning", "c-epsilon")
ITEMS = 40

if BROWSER is None and os.environ.get("CI"):
    pytest.fail("chromium is not installed (apt-get install chromium): the dashboard test "
                "needs it under CI", pytrace=False)
needs_browser = pytest.mark.skipif(BROWSER is None, reason="chromium is not installed "
                                   "(apt-get install chromium)")


def _points(dom: str, chart: str) -> int:
    tag = re.search(rf'<div[^>]*id="{chart}"[^>]*>', dom)
    assert tag, f"{chart} is not on the page"
    points = re.search(r'data-points="(\d+)"', tag.group(0))
    return int(points.group(1)) if points else 0


def _traffic(client: Client, stop: threading.Event) -> None:
    rng = np.random.default_rng(0)
    n = 0
    while not stop.is_set():
        slate = client.recommend(f"u-{n % 30}", "evening, on a phone", k=5)
        clicks = [{"request_id": slate["request_id"], "item_id": it["item_id"],
                   "event": "click"} for it in slate["items"] if rng.random() < 0.2]
        if clicks:
            client.feedback_batch(clicks)
        n += 1


@needs_browser
def test_dashboard_draws_live_charts_from_a_running_service(tmp_path):
    env = {"RECSVC_REWARD_WAIT_S": "1", "RECSVC_SEED": "0"}
    with running_service_process(env) as (url, _), Client(url) as client:
        client.upsert([{"item_id": f"i-{i}", "text": f"item {i} about topic {i % 5}",
                        "tags": [f"t{i % 5}"]} for i in range(ITEMS)])
        stop = threading.Event()
        for n in range(60):  # closed slates for the evaluation log, a learned model
            slate = client.recommend(f"w-{n}", "morning", k=5)
            client.feedback(slate["request_id"], slate["items"][0]["item_id"], "click")
        deadline = time.time() + 60  # their reward windows (1 s) close into the log
        while not client.log(10)["records"] and time.time() < deadline:
            time.sleep(0.2)
        player = threading.Thread(target=_traffic, args=(client, stop))
        player.start()
        try:
            shot = tmp_path / "dashboard.png"
            dom = visit(f"{url}/dashboard", seconds=10, screenshot=shot)
        finally:
            stop.set()
            player.join(30)
    assert "recsvc" in dom
    drawn = {chart: _points(dom, chart) for chart in CHARTS}
    assert all(n > 0 for n in drawn.values()), drawn
    tiles = dict(re.findall(r'id="(t-[a-z]+)"[^>]*>([^<]*)<', dom))
    rate = re.search(r'<div[^>]*id="c-rates"[^>]*>', dom).group(0)
    assert float(re.search(r'data-last="([^"]+)"', rate).group(1)) > 1.0  # recommend/s
    assert tiles["t-catalog"] == str(ITEMS) and tiles["t-store"] == "up"
    assert int(tiles["t-version"]) >= 1 and int(tiles["t-learned"]) >= 1
    arms = re.search(r'<table id="arms">.*?</table>', dom, re.S)
    assert arms and arms.group(0).count("<tr>") >= 1 + 4  # the header and four arms
    assert shot.stat().st_size > 20_000  # a page with charts, not a blank one
    if os.environ.get("RECSVC_DASHBOARD_SCREENSHOT"):  # refresh the README's picture
        shutil.copy(shot, Path(os.environ["RECSVC_DASHBOARD_SCREENSHOT"]))


def test_dashboard_page_and_assets_are_served_without_a_key():
    """The page loads without a key (it asks for one); the API behind it still wants it."""
    with running_service_process({"RECSVC_ADMIN_KEYS": "admin-1"}) as (url, _):
        import httpx

        page = httpx.get(f"{url}/dashboard")
        assert page.status_code == 200 and "uPlot" in page.text
        for asset in ("dashboard.js", "dashboard.css", "vendor/uPlot.iife.min.js"):
            assert httpx.get(f"{url}/dashboard-assets/{asset}").status_code == 200
        assert httpx.get(f"{url}/v1/model").status_code == 401
        assert httpx.get(f"{url}/v1/log", headers={"X-API-Key": "admin-1"}).status_code == 200
