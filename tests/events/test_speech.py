"""Voice activity with hysteresis, on made-up probability sequences (20 ms windows)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from realtime.events import Batch, ConfigError, Emitted, OutputInfo, Timebase, run_chain, speech

TIMEBASE = Timebase(16000, 320, 0)  # 20 ms windows
OUTPUTS = [OutputInfo("p", ())]


def _events(
    probs: list[float], chunks: int = 1, end: float | None = None, **table: Any
) -> list[Emitted]:
    """Feed probabilities (one per 20 ms window from t = 1000 ms) in groups of ``chunks``."""
    proc = speech.factory({"kind": "speech", "output": "p", **table}, OUTPUTS, TIMEBASE)({})
    t = 1000.0 + 20.0 * np.arange(len(probs))
    p = np.array(probs, np.float32)
    out: list[Emitted] = []
    for i in range(0, len(probs), chunks):
        out += run_chain([proc], Batch(t[i : i + chunks], {"p": p[i : i + chunks]}))
    if end is not None:
        out += run_chain([proc], Batch(np.empty(0), {}, [], end))
    return out


def _summary(events: list[Emitted]) -> list[tuple[str, float]]:
    return [(e.event, e.t) for e in events]


def test_an_utterance_gives_start_and_end_at_its_edges_padded() -> None:
    probs = [0.0] * 10 + [0.9] * 30 + [0.0] * 20  # speech from 1200 to 1800 ms
    got = _events(probs, pad_ms=30)
    assert _summary(got) == [("speech_start", 1170.0), ("speech_end", 1830.0)]
    assert got[0].data == {"segment": 1, "prob": pytest.approx(0.9)}
    assert got[1].data["start"] == 1170.0 and got[1].data["duration_ms"] == 660.0


def test_short_blips_are_not_speech_and_short_pauses_do_not_end_it() -> None:
    blip = [0.0] * 5 + [0.9] * 5 + [0.0] * 10  # 100 ms < min_speech_ms
    pause = [0.9] * 20 + [0.1] * 10 + [0.9] * 20 + [0.0] * 20  # 200 ms pause < min_silence
    assert _events(blip + pause, pad_ms=0) == _events([0.0] * 20 + pause, pad_ms=0)
    assert _summary(_events(blip + pause, pad_ms=0)) == [
        ("speech_start", 1400.0),
        ("speech_end", 2400.0),
    ]


def test_between_the_thresholds_nothing_changes() -> None:
    # 0.4 is between off (0.35) and on (0.5): it keeps speech going and does not start it.
    assert _events([0.4] * 50) == []
    got = _events([0.9] * 20 + [0.4] * 30 + [0.0] * 20, pad_ms=0)
    assert _summary(got) == [("speech_start", 1000.0), ("speech_end", 2000.0)]


def test_events_do_not_depend_on_how_windows_are_grouped_into_chunks() -> None:
    probs = list(np.random.default_rng(3).random(300).round(2))
    assert _events(probs, chunks=1) == _events(probs, chunks=7) == _events(probs, chunks=300)


def test_segment_end_closes_open_speech_and_padding_never_overlaps() -> None:
    got = _events([0.9] * 20, end=1400.0)
    assert _summary(got) == [("speech_start", 1000.0), ("speech_end", 1400.0)]
    got = _events([0.9] * 15 + [0.0] * 16 + [0.9] * 15 + [0.0] * 20, pad_ms=100)
    # The second start is padded back no further than the first end.
    assert _summary(got) == [
        ("speech_start", 1000.0),
        ("speech_end", 1400.0),
        ("speech_start", 1520.0),
        ("speech_end", 2020.0),
    ]


def test_bad_tables_are_refused() -> None:
    with pytest.raises(ConfigError, match="model output"):
        speech.factory({"kind": "speech", "output": "nope"}, OUTPUTS, TIMEBASE)
    with pytest.raises(ConfigError, match="off_threshold"):
        speech.factory(
            {"kind": "speech", "output": "p", "threshold": 0.3, "off_threshold": 0.6},
            OUTPUTS,
            TIMEBASE,
        )
    with pytest.raises(ConfigError, match="unknown keys"):
        speech.factory({"kind": "speech", "output": "p", "thresh": 1}, OUTPUTS, TIMEBASE)
    with pytest.raises(ConfigError, match="audio"):
        speech.factory({"kind": "speech", "output": "p"}, OUTPUTS, Timebase())
