"""Headless Chromium driven over the DevTools protocol (a websocket; the ``websockets``
package comes with ``uvicorn[standard]``), for the dashboard test: open a page, let it
run in real time (its polls must see real traffic between them), read the DOM, take a
screenshot. No webdriver and no extra dependency."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import threading
import urllib.request
from pathlib import Path

from app.tools.processes import stop

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    def __init__(self, ws) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, **params) -> dict:
        msg_id = next(self.ids)
        await self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(await self.ws.recv())
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression,
                                 returnByValue=True, awaitPromise=True)
        return result["result"].get("value")


def _devtools_port(proc: subprocess.Popen, timeout: float) -> int:
    """The port of Chromium's DevTools endpoint, from the line it prints on stderr
    ("DevTools listening on ws://127.0.0.1:PORT/..."); ``RuntimeError`` if it has not
    printed it within ``timeout`` seconds (a browser that hangs must not hang CI)."""
    assert proc.stderr is not None
    found: list[int] = []

    def read() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            match = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if match:
                found.append(int(match.group(1)))
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not found:
        raise RuntimeError(f"chromium did not open its DevTools endpoint in {timeout:.0f} s")
    return found[0]


async def _visit(url: str, seconds: float, screenshot: Path | None, width: int,
                 height: int) -> str:
    import websockets

    with tempfile.TemporaryDirectory(prefix="recsvc-chromium-") as profile:
        proc = subprocess.Popen(
            [str(BROWSER), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--remote-debugging-port=0", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            port = _devtools_port(proc, timeout=60)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                target = next(t for t in json.load(r) if t["type"] == "page")
            async with websockets.connect(target["webSocketDebuggerUrl"],
                                          max_size=64 * 2**20) as ws:
                page = Page(ws)
                async with asyncio.timeout(seconds + 60):  # never wait for ever
                    await page.call("Page.enable")
                    await page.call("Page.navigate", url=url)
                    await asyncio.sleep(seconds)
                    dom = await page.evaluate("document.documentElement.outerHTML")
                    if screenshot is not None:
                        shot = await page.call("Page.captureScreenshot", format="png")
                        screenshot.write_bytes(base64.b64decode(shot["data"]))
                return dom
        finally:
            stop(proc, grace_s=30)


def visit(url: str, seconds: float = 10.0, screenshot: Path | None = None,
          width: int = 1280, height: int = 1300) -> str:
    """Open ``url``, wait ``seconds`` of real time, return the page's HTML (and write a
    PNG screenshot to ``screenshot`` if given)."""
    return asyncio.run(_visit(url, seconds, screenshot, width, height))
