"""The demo page in real headless Chromium against a real server: microphone and camera in,
events and results out, read from the page's own state (``window.demo``).

Chromium's fake media devices play ../shared/data/speech_16k.wav as the microphone (once, from
the moment the page asks for it) and a test pattern as the camera. Chromium is Debian's package;
the fixture installs it when it is missing and it can (root and apt), and skips with the reason
otherwise. Set REALTIME_SCREENSHOT=path.png to keep the screenshot (the README's comes from it).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect

from tests.conftest import SHARED, ServerFactory, needs_shared

TRUTH_S = [1.01, 2.99, 4.93, 6.71]  # ../shared/data/README.md: speech 1.01-2.99 s, 4.93-6.71 s


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    root = os.geteuid() == 0
    sudo = not root and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0
    if (root or sudo) and shutil.which("apt-get"):
        apt = ["apt-get"] if root else ["sudo", "-n", "apt-get"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        r = subprocess.run(
            [*apt, "install", "-y", "-q", "chromium"],
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
        )
        if r.returncode != 0:  # the package lists may be stale
            subprocess.run([*apt, "update", "-q"], capture_output=True, timeout=600, env=env)
            subprocess.run(
                [*apt, "install", "-y", "-q", "chromium"],
                capture_output=True,
                timeout=900,
                env=env,
            )
        if path := shutil.which("chromium"):
            return path
    pytest.skip("Chromium is missing and cannot be installed here (needs apt as root or sudo -n)")


@pytest.fixture(scope="module")
def chromium() -> str:
    return find_chromium()


class Browser:
    """One headless Chromium with fake media, driven over the DevTools protocol."""

    def __init__(self, binary: str, url: str, profile: Path, audio: Path) -> None:
        self.proc = subprocess.Popen(
            [
                binary,
                *("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic"),
                *("--no-first-run", "--disable-background-networking", "--disable-sync"),
                "--disable-component-update",
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={audio}%noloop",
                "--autoplay-policy=no-user-gesture-required",
                "--window-size=1280,900",
                url,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/..."
            if "DevTools listening on" in line:
                self.devtools = line.split("listening on ")[1].strip()
                break
        else:
            raise AssertionError("Chromium did not start its DevTools endpoint")
        self._ids = itertools.count(1)

    def page_socket(self) -> str:
        port = self.devtools.split(":")[2].split("/")[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
            pages = [t for t in orjson.loads(r.read()) if t["type"] == "page"]
        return str(pages[0]["webSocketDebuggerUrl"])

    async def call(self, ws: Any, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        await ws.send(orjson.dumps({"id": msg_id, "method": method, "params": params}).decode())
        while True:
            reply = orjson.loads(await ws.recv())
            if reply.get("id") == msg_id:
                assert "error" not in reply, reply
                return dict(reply["result"])

    async def state(self, ws: Any) -> dict[str, Any]:
        result = await self.call(
            ws, "Runtime.evaluate", expression="JSON.stringify(window.demo ?? null)"
        )
        value = result["result"].get("value")
        return orjson.loads(value) if value and value != "null" else {}

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def browser_factory(chromium: str, tmp_path: Path) -> Iterator[Any]:
    browsers: list[Browser] = []

    def make(url: str) -> Browser:
        b = Browser(chromium, url, tmp_path / "profile", SHARED / "data" / "speech_16k.wav")
        browsers.append(b)
        return b

    yield make
    for b in browsers:
        b.close()


@needs_shared
async def test_the_demo_page_streams_microphone_and_camera(
    start_server: ServerFactory, browser_factory: Any, tmp_path: Path
) -> None:
    server = await start_server()
    browser = browser_factory(f"http://127.0.0.1:{server.port}/?autostart=1")
    page = await asyncio.to_thread(browser.page_socket)
    async with connect(page, max_size=None) as ws:
        state: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the clip is 8.1 s long; poll the page's state
            state = await browser.state(ws)
            if len(state.get("speechEvents", [])) >= 4 and state.get("cameraResults", 0) > 10:
                break
            await asyncio.sleep(0.5)  # polling interval of the page's state, not a race
        shot = await browser.call(ws, "Page.captureScreenshot", format="png")
    png = base64.b64decode(shot["data"])
    (tmp_path / "demo.png").write_bytes(png)
    if target := os.environ.get("REALTIME_SCREENSHOT"):
        Path(target).write_bytes(png)

    assert state.get("connected"), state
    assert not state["errors"], state["errors"]
    events = state["speechEvents"]
    assert [e["event"] for e in events[:4]] == ["speech_start", "speech_end"] * 2, events
    times = [e["t"] / 1000 for e in events[:4]]
    assert all(abs(a - b) <= 0.15 for a, b in zip(times, TRUTH_S, strict=True)), times
    assert state["cameraResults"] > 10
    assert state["speechResults"] > 100
    print(f"browser: speech events at {times} s, {state['cameraResults']} camera results")
