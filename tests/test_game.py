"""The /game page ("Sing to fly") in real headless Chromium against a real server.

Chromium's fake microphone plays ../shared/data/melody_22k.wav: four plucked notes, C4 E4 G4 C5,
0.5 s each from 0.5, 1.25, 2.0 and 2.75 s (ground truth in ../shared/data/README.md). The page
keeps what each animation frame drew on ``window.game.timeline``: the stream time of the newest
pitch window it applied, the bird's voice height (the sung pitch), its hop (a speech start makes it
jump) and the height drawn, their sum. Set REALTIME_SCREENSHOT=path.png to keep the screenshot
(the README's docs/game.png).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from tests.conftest import SHARED, BrowserFactory, ServerFactory, needs_shared

NOTES = [(60, 0.50, 1.00), (64, 1.25, 1.75), (67, 2.00, 2.50), (72, 2.75, 3.25)]  # MIDI, s, s


@needs_shared
async def test_the_bird_flies_at_the_height_of_the_sung_notes(
    start_server: ServerFactory, browser_factory: BrowserFactory, tmp_path: Path
) -> None:
    server = await start_server()
    browser = browser_factory(SHARED / "data" / "melody_22k.wav")
    async with browser.open(f"http://127.0.0.1:{server.port}/game") as page:
        state = await page.wait_for(
            "game", lambda s: bool(s.get("timeline")) and s["timeline"][-1]["t"] > 3400
        )
        await page.screenshot(tmp_path / "game.png")
        hud = await page.evaluate("[...document.querySelectorAll('#hud b')].map(b => b.innerText)")
        status = await page.evaluate("document.getElementById('status').textContent")

        # The network drops the connection: the game resumes its session by itself.
        (conn,) = server.connections
        server.cut(conn.session.id)
        drawn = state["frames"]
        resumed = await page.wait_for(
            "game",
            lambda s: s["status"] == "resumed" and s["timeline"][-1]["frame"] > drawn + 30,
        )

    timeline = state["timeline"]
    assert timeline[-1]["t"] > 3400, "the page drew no pitch for the whole melody"
    assert not state["errors"], state["errors"]
    low, high = state["range"]
    sung = []
    for midi, onset, offset in NOTES:
        # The frames that applied pitch windows of the note, from 0.1 s after its onset (the
        # pitch model's 64 ms window must be inside the note). On a busy machine results come
        # in bunches and a frame applies several windows: its t0..t span overlaps the note's.
        note = (onset + 0.1, offset)
        voice = [
            e["voice"] for e in timeline if e["t0"] / 1000 <= note[1] and e["t"] / 1000 >= note[0]
        ]
        assert voice, (midi, [(e["t0"], e["t"]) for e in timeline])
        sung.append(low + statistics.median(voice) * (high - low))
    assert all(abs(s - m) <= 0.5 for s, (m, _, _) in zip(sung, NOTES, strict=True)), sung
    assert sung == sorted(sung), sung  # C4 -> E4 -> G4 -> C5, in that order
    # What is drawn is the voice's height plus the hop, each frame.
    for e in timeline:
        assert e["y"] == pytest.approx(min(1.0, e["voice"] + e["hop"]), abs=1e-9), e
    # A speech start (the first pluck, at 0.5 s) made the bird hop during the first note.
    starts = [e["t"] / 1000 for e in state["speech"] if e["event"] == "speech_start"]
    assert starts and abs(starts[0] - 0.5) <= 0.25, state["speech"]
    assert state["jumps"] >= 1
    assert max(e["hop"] for e in timeline if 0.5 <= e["t"] / 1000 <= 1.25) > 0.1
    # Each result is drawn by the first animation frame after it arrived.
    assert all(e["frame"] == e["arrivedFrame"] + 1 for e in timeline)
    # The HUD: score, note, then the latencies (sent -> drawn, round trip, server), all numbers.
    assert all(x.replace(".", "", 1).isdigit() for x in [hud[0], *hud[2:]]), hud
    assert status == "connected" and resumed["status"] == "resumed", (status, resumed["status"])
    print(f"game: sung {[round(s, 2) for s in sung]}, hud {hud}, {len(timeline)} frames drawn")
