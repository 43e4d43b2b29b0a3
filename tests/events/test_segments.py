"""Partial and final results over segments: client-marked, or between speech events."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from realtime.events import (
    Batch,
    ConfigError,
    Emitted,
    OutputInfo,
    Timebase,
    run_chain,
    segments,
    speech,
)

TIMEBASE = Timebase(16000, 320, 0)  # 20 ms windows
OUTPUTS = [OutputInfo("p", ()), OutputInfo("level", ())]


def _chain(table: dict[str, Any], options: dict[str, Any], with_speech: bool) -> list[Any]:
    chain = []
    if with_speech:
        chain.append(
            speech.factory({"kind": "speech", "output": "p", "pad_ms": 0}, OUTPUTS, TIMEBASE)({})
        )
    chain.append(segments.factory({"kind": "segments", **table}, OUTPUTS, TIMEBASE)(options))
    return chain


def _feed(chain: list[Any], p: list[float], ends: dict[int, float] | None = None) -> list[Emitted]:
    """One window per batch; ``ends`` maps a window index to a segment end after it."""
    t = 20.0 * np.arange(len(p))
    level = np.arange(len(p), dtype=np.float32)  # window i has level i
    probs = np.array(p, np.float32)
    out: list[Emitted] = []
    for i in range(len(p)):
        end = (ends or {}).get(i)
        out += run_chain(
            chain, Batch(t[i : i + 1], {"p": probs[i : i + 1], "level": level[i : i + 1]}, [], end)
        )
    return out


def test_client_segments_give_one_final_each_reducing_their_windows() -> None:
    chain = _chain({"outputs": ["level"], "reduce": "mean"}, {}, with_speech=False)
    got = _feed(chain, [0.0] * 10, ends={3: 80.0, 9: 200.0})
    assert [(e.event, e.t) for e in got] == [("final", 80.0), ("final", 200.0)]
    assert got[0].data == {
        "segment": 1,
        "start": 0.0,
        "duration_ms": 80.0,
        "windows": 4,
        "outputs": {"level": pytest.approx(1.5)},  # mean of 0, 1, 2, 3
    }
    assert got[1].data["start"] == 80.0 and got[1].data["outputs"]["level"] == pytest.approx(6.5)


def test_partials_come_every_partial_ms_when_the_stream_asks() -> None:
    table = {"outputs": ["level"], "reduce": "max"}
    assert _feed(_chain(table, {}, False), [0.0] * 10) == []  # no partials unless asked
    got = _feed(_chain(table, {"partial_ms": 60}, False), [0.0] * 10, ends={9: 200.0})
    partials = [(e.t, e.data["outputs"]["level"]) for e in got if e.event == "partial"]
    assert partials == [(60.0, 2.0), (120.0, 5.0), (180.0, 8.0)]
    assert got[-1].event == "final" and got[-1].data["outputs"]["level"] == 9.0


def test_speech_segments_follow_the_speech_processor_before_in_the_chain() -> None:
    chain = _chain({"outputs": ["level"], "reduce": "last", "segment_by": "speech"}, {}, True)
    p = [0.0] * 10 + [0.9] * 20 + [0.0] * 20  # speech from 200 to 600 ms
    got = [e for e in _feed(chain, p) if e.event == "final"]
    assert [(e.t, e.data["start"], e.data["windows"]) for e in got] == [(600.0, 200.0, 20)]
    assert got[0].data["outputs"]["level"] == 29.0  # the last window inside the utterance


def test_bad_tables_are_refused() -> None:
    with pytest.raises(ConfigError, match="outputs"):
        segments.factory({"kind": "segments", "outputs": ["x"]}, OUTPUTS, TIMEBASE)
    with pytest.raises(ConfigError, match="reduce"):
        segments.factory({"kind": "segments", "reduce": "median"}, OUTPUTS, TIMEBASE)
    with pytest.raises(ConfigError, match="segment_by"):
        segments.factory({"kind": "segments", "segment_by": "time"}, OUTPUTS, TIMEBASE)


def test_a_long_silence_keeps_its_windows_in_arrays_and_checkpoints_only_those_kept() -> None:
    """Between utterances a stream remembers up to MAX_WINDOWS windows (a speech start is
    confirmed late): in a few arrays, not a Python object each (a full garbage collection walked
    them all), and a checkpoint pickles only the windows kept."""
    import gc
    import pickle

    chain = _chain({"outputs": ["level"], "segment_by": "speech"}, {}, with_speech=True)
    n = segments.MAX_WINDOWS + 500
    tracked = len(gc.get_objects())
    got = _feed(chain, [0.0] * n + [0.9] * 20 + [0.0] * 30)
    assert len(gc.get_objects()) - tracked < 500  # not one object (or two) per window
    history = chain[1]._windows
    assert len(history) <= segments.MAX_WINDOWS
    final = [e for e in got if e.event == "final"]
    assert len(final) == 1 and final[0].data["windows"] >= 20
    # The utterance's windows are n .. n+19 (level = index): its mean is theirs.
    assert final[0].data["outputs"]["level"] == pytest.approx(n + 9.5, abs=1.0)
    blob = pickle.dumps(chain[1])
    assert len(blob) < 16 * len(history) + 2000  # its times and levels, not its spare room
    again = pickle.loads(blob)
    assert len(again._windows) == len(history)
