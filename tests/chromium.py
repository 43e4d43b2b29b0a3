"""Real headless Chromium for the page tests, driven over the DevTools protocol.

Chromium is Debian's package: ``find_chromium`` installs it when it is missing and it can (root
or ``sudo -n``, and apt), and skips the test with the reason otherwise. Its fake media devices play
a WAV file as the microphone (once, from the moment a page asks for it) and a test pattern as the
camera. The tests read what a page did from the state it keeps on ``window`` (polling it: the
page is another process), never from timing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect


def find_chromium() -> str:
    """The Chromium binary, installed with apt where missing and allowed; else skip the test."""
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


class Page:
    """One open tab: DevTools calls, the page's own state, screenshots."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Call a DevTools method and return its result (events meanwhile are dropped)."""
        msg_id = next(self._ids)
        await self.ws.send(
            orjson.dumps({"id": msg_id, "method": method, "params": params}).decode()
        )
        while True:
            reply = orjson.loads(await self.ws.recv())
            if reply.get("id") == msg_id:
                assert "error" not in reply, reply
                return dict(reply["result"])

    async def evaluate(self, expression: str, user_gesture: bool = False) -> Any:
        """The JSON value of a JavaScript expression in the page (None for undefined/null)."""
        result = await self.call(
            "Runtime.evaluate",
            expression=f"JSON.stringify({expression})",
            userGesture=user_gesture,
        )
        value = result["result"].get("value")
        return orjson.loads(value) if isinstance(value, str) else None

    async def state(self, name: str) -> dict[str, Any]:
        """The page's state object ``window[name]`` (empty until the page made it)."""
        return dict(await self.evaluate(f"window.{name} ?? {{}}") or {})

    async def wait_for(
        self, name: str, done: Callable[[dict[str, Any]], bool], timeout: float = 60
    ) -> dict[str, Any]:
        """Poll ``window[name]`` until ``done(state)`` or ``timeout`` seconds; the last state."""
        deadline = time.monotonic() + timeout
        state = await self.state(name)
        while not done(state) and time.monotonic() < deadline:
            await asyncio.sleep(0.25)  # the polling interval of another process's state
            state = await self.state(name)
        return state

    async def screenshot(self, path: Path) -> bytes:
        """A PNG of the viewport, written to ``path`` (and to $REALTIME_SCREENSHOT if set)."""
        shot = await self.call("Page.captureScreenshot", format="png")
        png = base64.b64decode(shot["data"])
        path.write_bytes(png)
        if target := os.environ.get("REALTIME_SCREENSHOT"):
            Path(target).write_bytes(png)
        return png


class Browser:
    """One headless Chromium with fake media, started blank. Its microphone plays ``audio``,
    or Chromium's own beeps if None."""

    def __init__(self, binary: str, profile: Path, audio: Path | None) -> None:
        microphone = [f"--use-file-for-fake-audio-capture={audio}%noloop"] if audio else []
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
                *microphone,
                "--autoplay-policy=no-user-gesture-required",
                "--window-size=1280,900",
                "about:blank",
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

    def _page_socket(self) -> str:
        port = self.devtools.split(":")[2].split("/")[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
            pages = [t for t in orjson.loads(r.read()) if t["type"] == "page"]
        return str(pages[0]["webSocketDebuggerUrl"])

    @contextlib.asynccontextmanager
    async def open(self, url: str, before_load: str | None = None) -> AsyncIterator[Page]:
        """Load ``url`` in the tab, running the script ``before_load`` first in every document."""
        async with connect(await asyncio.to_thread(self._page_socket), max_size=None) as ws:
            page = Page(ws)
            # A tab opened over DevTools is not focused, and Chromium gives unfocused pages no
            # inline XR frames: have it behave as the tab a person is looking at.
            await page.call("Emulation.setFocusEmulationEnabled", enabled=True)
            if before_load is not None:
                await page.call("Page.enable")  # (which new-document scripts need)
                await page.call("Page.addScriptToEvaluateOnNewDocument", source=before_load)
            await page.call("Page.navigate", url=url)
            yield page

    def close(self) -> None:
        """Stop Chromium (killed if it does not exit within 10 s)."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
