"""End to end: ``recsvc serve`` as a subprocess, driven over real HTTP by a client that
knows only API.md, once with the embedded store and once with a real Redis."""

import os
import subprocess
import sys
import time

import httpx
import pytest

from app.tools.client import wait_ready
from tests.conftest import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture
def server(backend, tmp_path):
    name, cfg = backend
    port = free_port()
    env = {**os.environ, "RECSVC_REWARD_WAIT_S": "0.5", "RECSVC_LEARNER_POLL_S": "0.05",
           "RECSVC_PUBLISH_INTERVAL_S": "0.2", "RECSVC_WEIGHTS_POLL_S": "0.2",
           "RECSVC_ADMIN_KEYS": "e2e-key", "RECSVC_DEVICE": "cpu",
           # a gradient step for every learning round with new transitions: by default a
           # click on a 3-item slate owes less than one step (RECSVC_REPLAY_RATIO)
           "RECSVC_STEPS_PER_BATCH": "1"}
    if name == "redis":
        env.update(RECSVC_REDIS_URL=cfg["redis_url"], RECSVC_KEY_PREFIX=cfg["key_prefix"])
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "app.tools.cli", "serve", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    if not wait_ready(url, lambda: proc.poll() is None, 90):
        proc.kill()
        raise RuntimeError((tmp_path / "serve.log").read_text())
    with httpx.Client(base_url=url, headers={"X-API-Key": "e2e-key"}, timeout=30) as client:
        client.tmp_path = tmp_path
        yield client, proc
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("recsvc serve did not exit on SIGTERM")
    # uvicorn re-raises SIGTERM after its graceful shutdown, hence -15 rather than 0
    output = (tmp_path / "serve.log").read_text()
    assert proc.returncode in (0, -15), output
    assert "shutdown complete" in output, output


def test_full_contract_over_http(server):
    c, _ = server
    assert httpx.get(str(c.base_url) + "/v1/model").status_code == 401  # no key
    items = [{"item_id": f"m-{n}", "text": t} for n, t in enumerate([
        "Toy Story (1995). Animation, Children's, Comedy",
        "Heat (1995). Action, Crime, Thriller",
        "Casablanca (1942). Drama, Romance, War",
        "Alien (1979). Action, Horror, Sci-Fi, Thriller",
        "Babe (1995). Children's, Comedy, Drama",
    ])]
    r = c.post("/v1/items", json={"items": items})
    assert r.status_code == 200 and r.json() == {"upserted": 5, "catalog_size": 5}
    assert c.get("/v1/items/m-1").json()["text"].startswith("Heat")
    assert c.get("/v1/items/zz").status_code == 404

    r = c.post("/v1/recommend", json={"user_id": "u-42", "k": 3,
                                      "context": {"text": "24 year old male technician"}})
    assert r.status_code == 200
    slate = r.json()
    assert len(slate["items"]) == 3
    rid, item = slate["request_id"], slate["items"][1]["item_id"]

    before = c.get("/v1/model").json()
    fb = {"request_id": rid, "item_id": item, "event": "click", "value": None}
    r = c.post("/v1/feedback", json=fb)
    assert r.status_code == 202 and r.json()["accepted"] is True
    assert c.post("/v1/feedback", json=fb).json()["duplicate"] is True
    assert c.post("/v1/feedback", json={**fb, "request_id": "01UNKNOWN"}).status_code == 404
    assert c.post("/v1/feedback", json={**fb, "item_id": "m-404"}).status_code == 422
    assert c.post("/v1/events", json={"user_id": "u-42", "item_id": "m-4",
                                      "event": "like"}).status_code == 202
    history = c.get("/v1/users/u-42").json()["history"]
    assert [(h["item_id"], h["event"]) for h in history] == [(item, "click"), ("m-4", "like")]

    # the learner takes the click at once and the rest of the slate when the window closes
    deadline = time.time() + 20
    while time.time() < deadline:
        model = c.get("/v1/model").json()
        if model["feedback_learned"] == 1 and model["pending_impressions"] == 0 \
                and model["version"] > before["version"]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"feedback did not move the model: {model}")
    assert model["updates"] > before["updates"]
    assert c.post("/v1/recommend", json={"user_id": "u-1"}).json()["model_version"] >= 1

    # the closed impression is in the evaluation log: export it and evaluate it
    out = subprocess.run([sys.executable, "-m", "app.tools.cli", "export-log", "--url",
                          str(c.base_url), "--api-key", "e2e-key", "--out",
                          str(tmp_log := c.tmp_path / "log.jsonl")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert tmp_log.read_text().count("\n") >= 1
    ope = subprocess.run([sys.executable, "-m", "app.tools.cli", "ope", "--log", str(tmp_log)],
                         capture_output=True, text=True, timeout=60)
    assert ope.returncode == 0, ope.stderr
    assert "greedy" in ope.stdout and "SNIPS" in ope.stdout

    assert c.delete("/v1/items/m-0").status_code == 204
    ids = [i["item_id"] for i in c.post("/v1/recommend",
                                        json={"user_id": "x", "k": 10}).json()["items"]]
    assert "m-0" not in ids and len(ids) == 4
    assert c.delete("/v1/users/u-42").status_code == 204
    assert c.get("/v1/users/u-42").json()["history"] == []
    r = c.post("/v1/recommend", json={"user_id": "u", "k": 1000})
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
    assert "recsvc_recommendations_total" in httpx.get(str(c.base_url) + "/metrics").text
