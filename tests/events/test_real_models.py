"""Events from the real models, through the real server and the Python client."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import soxr

from realtime.client import Client
from realtime.protocol import Error, Event, Result
from tests.conftest import REPO, ServerFactory, needs_shared, read_clip

SPEECH = [(1010.0, 2990.0), (4930.0, 6710.0)]  # ../shared/data/README.md, ms


def clip(name: str, rate: int, dtype: str) -> np.ndarray[Any, Any]:
    """A shared clip at ``rate`` in ``dtype`` (float32 in [-1, 1], or int16 PCM)."""
    pcm, clip_rate = read_clip(name)
    x = pcm.astype(np.float32) / 32768
    if rate != clip_rate:
        x = soxr.resample(x, clip_rate, rate).astype(np.float32)
    return (np.clip(x, -1, 1 - 1 / 32768) * 32768).astype(np.int16) if dtype == "int16" else x


async def stream_clip(
    client: Client, model: str, samples: np.ndarray[Any, Any], rate: int, chunk_ms: float
) -> tuple[list[Event], list[Result]]:
    """Send a clip in chunks of ``chunk_ms`` (the last one ends the segment), at most 32 chunks
    in flight; every event and result of the stream."""
    # Far faster than real time: a stateful stream's windows run one at a time, so relax the
    # deadline (the model's is 100 ms).
    stream = await client.open(
        model, dtype=samples.dtype.name, sample_rate=rate, deadline_ms=10_000
    )
    step = round(rate * chunk_ms / 1000)
    starts = list(range(0, len(samples), step))
    window = asyncio.Semaphore(32)
    got: list[Any] = []

    async def receive() -> None:
        async for msg in stream:
            got.append(msg)
            if not isinstance(msg, Event):
                window.release()

    reader = asyncio.get_running_loop().create_task(receive())
    for i, a in enumerate(starts):
        await window.acquire()
        await stream.send(
            samples[a : a + step], t=1000.0 * a / rate, end_of_segment=i == len(starts) - 1
        )
    closed = await stream.close()
    await reader
    assert not [m for m in got if isinstance(m, Error)]
    results = [m for m in got if isinstance(m, Result)]
    assert [m.seq for m in results] == list(range(len(starts))) and closed.results == len(starts)
    return [m for m in got if isinstance(m, Event)], results


def segments(events: list[Event]) -> list[tuple[float, float]]:
    """(start, end) of each utterance, checking that starts and ends alternate."""
    kinds = [e.event for e in events if e.event in ("speech_start", "speech_end")]
    assert kinds == ["speech_start", "speech_end"] * (len(kinds) // 2), kinds
    starts = [e.t for e in events if e.event == "speech_start"]
    ends = [e for e in events if e.event == "speech_end"]
    assert [e.data["start"] for e in ends] == starts
    return [(a, e.t) for a, e in zip(starts, ends, strict=True)]


def assert_near(
    got: list[tuple[float, float]], want: list[tuple[float, float]], tol: float
) -> None:
    assert len(got) == len(want), got
    for (a, b), (wa, wb) in zip(got, want, strict=True):
        assert abs(a - wa) <= tol and abs(b - wb) <= tol, (got, want)


@needs_shared
@pytest.mark.parametrize(
    ("rate", "dtype", "chunk_ms"),
    [
        (16000, "int16", 10),
        (16000, "int16", 20),
        (16000, "int16", 32),
        (16000, "int16", 100),
        (48000, "float32", 20),
        (44100, "int16", 32),
    ],
)
async def test_silero_vad_speech_events_match_the_ground_truth(
    start_server: ServerFactory, rate: int, dtype: str, chunk_ms: float
) -> None:
    server = await start_server((REPO / "examples" / "models",), builtin=False)
    async with await Client.connect(server.url) as client:
        events, results = await stream_clip(
            client, "silero_vad", clip("speech_16k.wav", rate, dtype), rate, chunk_ms
        )
    assert_near(segments(events), SPEECH, 150.0)
    windows = np.concatenate([m.windows for m in results if m.windows is not None])
    np.testing.assert_allclose(windows, 32.0 * np.arange(len(windows)))  # 512 samples at 16 kHz


@needs_shared
async def test_chunk_sizes_do_not_change_the_events(start_server: ServerFactory) -> None:
    server = await start_server((REPO / "examples" / "models",), builtin=False)
    samples = clip("speech_16k.wav", 16000, "int16")
    async with await Client.connect(server.url) as client:
        runs = [
            (await stream_clip(client, "silero_vad", samples, 16000, ms))[0]
            for ms in (10, 20, 32, 100)
        ]
    for events in runs[1:]:
        assert [(e.event, e.t, e.data) for e in events] == [(e.event, e.t, e.data) for e in runs[0]]


@needs_shared
@pytest.mark.parametrize(("rate", "dtype"), [(16000, "int16"), (48000, "float32")])
async def test_builtin_speech_activity_finds_both_utterances(
    start_server: ServerFactory, rate: int, dtype: str
) -> None:
    server = await start_server()
    async with await Client.connect(server.url) as client:
        events, _ = await stream_clip(
            client, "speech_activity", clip("speech_16k.wav", rate, dtype), rate, 20
        )
    assert_near(segments(events), SPEECH, 150.0)
    speech = [e for e in events if e.event.startswith("speech_")]
    assert [e.data["segment"] for e in speech] == [1, 1, 2, 2]
    assert [e.data["segment"] for e in events if e.event == "final"] == [1, 2]


MELODY = [(60, 500.0, 1000.0), (64, 1250.0, 1750.0), (67, 2000.0, 2500.0), (72, 2750.0, 3250.0)]


def notes(events: list[Event]) -> list[tuple[int, float, float]]:
    """(midi, onset, offset) of each note, checking that every note_on has its note_off."""
    ons = [e for e in events if e.event == "note_on"]
    offs = [e for e in events if e.event == "note_off"]
    assert [(e.data["midi"], e.t) for e in ons] == [(e.data["midi"], e.data["onset"]) for e in offs]
    return [(e.data["midi"], e.data["onset"], e.t) for e in offs]


def assert_melody(got: list[tuple[int, float, float]], onset_tol: float) -> None:
    assert [m for m, _, _ in got] == [m for m, _, _ in MELODY], got
    for (_, on, off), (_, want_on, want_off) in zip(got, MELODY, strict=True):
        assert abs(on - want_on) <= onset_tol and abs(off - want_off) <= 100.0, got


@needs_shared
@pytest.mark.parametrize(
    ("rate", "dtype", "chunk_ms"),
    [(22050, "int16", 20), (48000, "float32", 10), (22050, "int16", 100)],
)
async def test_basic_pitch_notes_match_the_melody(
    start_server: ServerFactory, rate: int, dtype: str, chunk_ms: float
) -> None:
    server = await start_server((REPO / "examples" / "models",), builtin=False)
    async with await Client.connect(server.url) as client:
        events, _ = await stream_clip(
            client, "basic_pitch", clip("melody_22k.wav", rate, dtype), rate, chunk_ms
        )
    assert_melody(notes(events), 60.0)
    assert all(e.data["name"] in ("C4", "E4", "G4", "C5") for e in events)


@needs_shared
@pytest.mark.parametrize(("rate", "dtype"), [(22050, "int16"), (48000, "float32")])
async def test_builtin_pitch_notes_match_the_melody(
    start_server: ServerFactory, rate: int, dtype: str
) -> None:
    server = await start_server()
    async with await Client.connect(server.url) as client:
        events, _ = await stream_clip(
            client, "pitch", clip("melody_22k.wav", rate, dtype), rate, 20
        )
    assert_melody(notes(events), 60.0)


@needs_shared
async def test_builtin_speech_activity_partials_and_finals(start_server: ServerFactory) -> None:
    server = await start_server()
    samples = clip("speech_16k.wav", 16000, "int16")
    async with await Client.connect(server.url) as client:
        stream = await client.open(
            "speech_activity", dtype="int16", options={"partial_ms": 500}, deadline_ms=10_000
        )
        got: list[Event] = []
        stream.on_event = got.append  # events to a callback; iteration yields results only
        results = []
        for k, i in enumerate(range(0, len(samples), 320)):
            await stream.send(samples[i : i + 320], t=i / 16.0)
            if k >= 31:  # at most 32 in flight
                results.append(await stream.next())
        await stream.close()
        results += await stream.collect()
    assert [type(m).__name__ for m in results] == ["Result"] * -(-len(samples) // 320)
    finals = [e for e in got if e.event == "final"]
    ends = [e for e in got if e.event == "speech_end"]
    assert [(f.t, f.data["start"]) for f in finals] == [(e.t, e.data["start"]) for e in ends]
    assert len(finals) == 2
    for f in finals:
        assert f.data["outputs"]["speech_prob"] > 0.6 and f.data["outputs"]["energy_db"] > -40
        partials = [
            e for e in got if e.event == "partial" and e.data["segment"] == f.data["segment"]
        ]
        assert len(partials) >= 2  # utterances of about 2 s, a partial every 500 ms
        # A partial is sent while the utterance lasts, as far as anyone knows then: up to
        # min_silence_ms (300) past its end, before the speech_end that closes it.
        assert all(f.data["start"] < p.t <= f.t + 300 for p in partials), (partials, f)
        assert all(got.index(p) < got.index(f) for p in partials)
