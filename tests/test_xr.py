"""The /xr page in real headless Chromium against a real server.

With an emulated XR device (tests/webxr_device.js, a headset and two controllers on known paths,
installed before the page's scripts), the page offers immersive-vr, enters it on a click, sends
every frame's poses to the built-in `pose` model and draws the predictions, which the test reads
back as pixels; after the connection is cut the page resumes its session by itself. Without the
emulator the page runs Chromium's own inline WebXR session. The microphone plays
../shared/data/speech_16k.wav (speech from 1.01 s): its speech start becomes the floating label.
Set REALTIME_SCREENSHOT=path.png to keep the screenshot (the README's docs/xr.png).
"""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path
from typing import Any

from realtime.server import Server
from tests.conftest import REPO, SHARED, BrowserFactory, ServerFactory, needs_shared

XR_DEVICE = (REPO / "tests" / "webxr_device.js").read_text()


def metric(server: Server, name: str, label: str) -> float:
    """One sample of the server's /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f"{name}{{{label}}} "):
                return float(line.split()[-1])
    return 0.0


def close_to(a: list[float], b: list[float], tolerance: float) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


@needs_shared
async def test_the_xr_page_sends_an_emulated_headsets_poses_and_draws_their_prediction(
    start_server: ServerFactory, browser_factory: BrowserFactory, tmp_path: Path
) -> None:
    server = await start_server()
    browser = browser_factory(SHARED / "data" / "speech_16k.wav")
    async with browser.open(f"http://127.0.0.1:{server.port}/xr", XR_DEVICE) as page:
        state = await page.wait_for("xrDemo", lambda s: s.get("poseResults", 0) > 0)
        assert state["offered"] == "immersive-vr", state
        assert state["mode"] == "inline", state  # until the user asks for the headset

        await page.evaluate("document.getElementById('enter').click()", user_gesture=True)
        state = await page.wait_for(
            "xrDemo",
            lambda s: (
                s["framesIn"].get("immersive-vr", 0) > 60 and s["poseResults"] > 60 and s["speech"]
            ),
        )
        assert state["mode"] == "immersive-vr" and state["controllers"] == 2, state
        # Read back what the last frame drew where the prediction of the right hand is.
        await page.evaluate("window.xrDemo.probe = true")
        state = await page.wait_for("xrDemo", lambda s: not s["probe"])
        device = await page.state("xrDevice")
        rtt = await page.evaluate("document.getElementById('rtt').textContent")
        await page.screenshot(tmp_path / "xr.png")
        pose_runs = await asyncio.to_thread(
            metric, server, "realtime_items_run_total", 'model="pose@1"'
        )

        # The network drops the connection: the page resumes its session by itself.
        (conn,) = server.connections
        server.cut(conn.session.id)
        before = state["poseResults"]
        resumed = await page.wait_for(
            "xrDemo", lambda s: s["resumes"] >= 1 and s["poseResults"] > before + 60
        )
        status = await page.evaluate("document.getElementById('status').textContent")

    assert device["sessions"] == ["inline", "immersive-vr"], device
    assert device["frames"]["immersive-vr"] > 60, device
    assert state["posesSent"] > 60 and state["poseResults"] > 60, state
    # The poses reached the server's pose model, and came back predicted.
    assert pose_runs >= state["poseResults"], (pose_runs, state["poseResults"])
    pair = state["lastPair"]
    sent, predicted = pair["sent"], pair["predicted"]
    assert sent[9] == sent[16] == -0.5, sent  # both controllers' z on the device's paths
    for row in range(3):  # the prediction is near the pose it extrapolates, a unit quaternion
        assert close_to(predicted[7 * row : 7 * row + 3], sent[7 * row : 7 * row + 3], 0.2), pair
        assert abs(sum(q * q for q in predicted[7 * row + 3 : 7 * row + 7]) - 1) < 1e-3, pair
    # The predicted right hand was drawn: its pixel has the prediction's orange (255, 153, 46)
    # shaded by at most 0.6, not the background's grey nor the tracked hand's blue.
    r, g, b, _ = state["probed"]["rgba"]
    assert r >= 140 and g >= 80 and b <= 70 and r > g > b, state["probed"]
    assert rtt.replace(".", "", 1).isdigit() and float(rtt) > 0, rtt  # the round trip on screen
    assert state["speech"][0]["event"] == "speech_start", state["speech"]
    assert state["label"] != "listening", state["label"]
    assert not state["errors"], state["errors"]
    assert resumed["resumes"] >= 1 and status == "resumed", (resumed, status)
    assert resumed["mode"] == "immersive-vr", resumed
    print(
        f"xr: {state['frames']} frames, {state['poseResults']} predictions "
        f"({resumed['poseResults']} after the resume), round trip {rtt} ms, probe {state['probed']}"
    )


async def test_the_xr_page_runs_chromiums_own_inline_session(
    start_server: ServerFactory, browser_factory: BrowserFactory
) -> None:
    server = await start_server()
    browser = browser_factory(None)
    async with browser.open(f"http://127.0.0.1:{server.port}/xr") as page:
        state: dict[str, Any] = await page.wait_for(
            "xrDemo", lambda s: s.get("predictedDrawn", 0) > 30 and s["poseResults"] > 30
        )
    assert state["mode"] == "inline", state  # Chromium offers no immersive session here
    assert state["offered"] is None and state["controllers"] == 0, state
    assert state["poseResults"] > 30 and state["predictedDrawn"] > 30, state
    assert not state["errors"], state["errors"]
