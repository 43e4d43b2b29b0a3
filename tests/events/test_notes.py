"""Note tracking on made-up activations: a pitch track, and overlapping activation windows."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from realtime.events import Batch, ConfigError, Emitted, OutputInfo, Timebase, notes, run_chain


def _summary(events: list[Emitted]) -> list[tuple[str, int, float]]:
    return [(e.event, e.data["midi"], round(e.t, 3)) for e in events]


# --- layout = "midi": one pitch per 20 ms window, the window's centre at t + 10 ms --------------

PITCH = Timebase(16000, 320, 0)
PITCH_OUTPUTS = [OutputInfo("midi", ()), OutputInfo("confidence", ())]


def _track(midi: list[float], chunks: int = 1, end: float | None = None) -> list[Emitted]:
    table = {
        "kind": "notes",
        "layout": "midi",
        "output": "midi",
        "confidence_output": "confidence",
        "min_note_ms": 60,
        "min_gap_ms": 40,
    }
    proc = notes.factory(table, PITCH_OUTPUTS, PITCH)({})
    m = np.array(midi, np.float32)
    conf = np.where(m > 0, 0.9, 0.1).astype(np.float32)
    t = 20.0 * np.arange(len(m))
    out: list[Emitted] = []
    for i in range(0, len(m), chunks):
        s = slice(i, i + chunks)
        out += run_chain([proc], Batch(t[s], {"midi": m[s], "confidence": conf[s]}))
    if end is not None:
        out += run_chain([proc], Batch(np.empty(0), {}, [], end))
    return out


def test_a_held_pitch_with_vibrato_is_one_note() -> None:
    vibrato = [60 + 0.6 * np.sin(i / 2) for i in range(25)]  # crosses 60.5 and 59.5
    got = _track([0.0] * 5 + vibrato + [0.0] * 5)
    assert _summary(got) == [("note_on", 60, 110.0), ("note_off", 60, 610.0)]
    assert got[0].data["name"] == "C4" and got[1].data["onset"] == 110.0
    assert got[1].data["duration_ms"] == 500.0 and got[1].data["confidence"] == pytest.approx(0.9)


def test_blips_are_not_notes_and_a_new_pitch_is_a_new_note() -> None:
    got = _track([0.0] * 3 + [62.0] * 2 + [0.0] * 3 + [64.0] * 10 + [67.1] * 10 + [0.0] * 4)
    assert _summary(got) == [
        ("note_on", 64, 170.0),
        ("note_off", 64, 370.0),
        ("note_on", 67, 370.0),
        ("note_off", 67, 570.0),
    ]


def test_grouping_into_chunks_changes_nothing_and_segment_end_stops_notes() -> None:
    track = [0.0] * 4 + [69.0] * 30
    assert _track(track, 1, end=700.0) == _track(track, 9, end=700.0)
    assert _summary(_track(track, 4, end=700.0)) == [("note_on", 69, 90.0), ("note_off", 69, 700.0)]


# --- layout = "activations": overlapping windows of frames x keys -------------------------------

RATE, HOP, CHUNK, CONTEXT, FRAMES = 1000, 10, 200, 60, 26  # windows of 260 ms, frames of 10 ms
ACT = Timebase(RATE, CHUNK, CONTEXT)
ACT_OUTPUTS = [OutputInfo("note", (FRAMES, 4)), OutputInfo("onset", (FRAMES, 4))]


def _roll(times: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The true activations at frame times (ms): key 1 sounds 150-390, key 3 sounds 500-620."""
    note = np.full((len(times), 4), 0.05, np.float32)
    onset = np.full((len(times), 4), 0.05, np.float32)
    note[(times >= 150) & (times < 390), 1] = 0.8
    note[(times >= 500) & (times < 620), 3] = 0.7
    onset[(times >= 150) & (times < 170), 1] = 0.9
    onset[(times >= 500) & (times < 520), 3] = 0.9
    return note, onset


def _windows(n: int) -> tuple[np.ndarray[Any, Any], dict[str, np.ndarray[Any, Any]]]:
    """``n`` windows as a model would give them: frame f of window k at t_k - 60 + 10 f, with
    junk onsets in each window's first frames (edge effects the tracker must not believe)."""
    t = CHUNK * np.arange(n, dtype=np.float64)
    note, onset = zip(*(_roll(tk - CONTEXT + HOP * np.arange(FRAMES)) for tk in t), strict=True)
    onsets = np.stack(onset)
    onsets[:, :2, :] = 0.95
    notes_ = np.stack(note)
    notes_[:, :2, :] = 0.6
    return t, {"note": notes_, "onset": onsets}


def _activations(n: int, chunks: int = 1) -> list[Emitted]:
    table = {
        "kind": "notes",
        "output": "note",
        "onset_output": "onset",
        "frame_hop": HOP,
        "first_midi": 60,
        "min_note_ms": 50,
        "min_gap_ms": 20,
    }
    proc = notes.factory(table, ACT_OUTPUTS, ACT)({})
    t, outputs = _windows(n)
    out: list[Emitted] = []
    for i in range(0, n, chunks):
        s = slice(i, i + chunks)
        out += run_chain([proc], Batch(t[s], {k: v[s] for k, v in outputs.items()}))
    return out


def test_overlapping_windows_give_each_note_once_at_its_true_times() -> None:
    got = _activations(5)
    assert _summary(got) == [
        ("note_on", 61, 150.0),
        ("note_off", 61, 390.0),
        ("note_on", 63, 500.0),
        ("note_off", 63, 620.0),
    ]
    assert got[0].data["confidence"] == pytest.approx(0.9)
    assert _activations(5, chunks=2) == got


def test_bad_tables_are_refused() -> None:
    base = {"kind": "notes", "output": "note", "frame_hop": HOP}
    with pytest.raises(ConfigError, match="shaped like"):
        notes.factory({**base, "onset_output": "x"}, [*ACT_OUTPUTS, OutputInfo("x", (3,))], ACT)
    with pytest.raises(ConfigError, match="frames, keys"):
        notes.factory(base, [OutputInfo("note", (4,))], ACT)
    with pytest.raises(ConfigError, match="layout"):
        notes.factory({**base, "layout": "piano"}, ACT_OUTPUTS, ACT)
    with pytest.raises(ConfigError, match="frame_hop"):
        notes.factory({"kind": "notes", "output": "note"}, ACT_OUTPUTS, ACT)
    assert notes.note_name(60) == "C4" and notes.note_name(69) == "A4"
