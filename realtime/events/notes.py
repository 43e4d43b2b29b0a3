"""Notes: frame-wise note activations or a pitch track -> ``note_on`` / ``note_off``.

Two layouts of model output feed one note tracker:

- ``layout = "activations"``: a matrix per window of frames x keys (basic-pitch's note and onset
  activations, key i being MIDI ``first_midi + i``), frames ``frame_hop`` samples apart from the
  window's first sample. Windows overlap; each frame is taken from the one window where it is
  furthest from an edge (the middle ``chunk`` samples of each window, as the package's own
  streaming keeps), so a note is neither missed nor doubled at a window boundary.
- ``layout = "midi"``: one fractional MIDI number (0: unvoiced) and a confidence per window (the
  built-in YIN pitch model), at the window's centre.

A key sounds when its activation stays at or above ``frame_threshold`` for ``min_note_ms`` and
either its onset activation (if the model has one) reached ``onset_threshold`` or its activation
reached ``note_threshold``; it stops after ``min_gap_ms`` below ``frame_threshold``, or at the end
of a segment. ``note_on`` is sent once a note is certain (``min_note_ms`` after its ``t``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from mypy_extensions import mypyc_attr

from realtime.events import Batch, ConfigError, Emitted, Factory, Options, OutputInfo, Timebase
from realtime.frozen import by_fields

_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


def note_name(midi: int) -> str:
    """Scientific pitch name of a MIDI note number: 60 -> C4."""
    return f"{_NAMES[midi % 12]}{midi // 12 - 1}"


@dataclass(frozen=True, slots=True)
class NotesConfig:
    """Where activations come from and how they become notes."""

    layout: str  # "activations" or "midi"
    output: str  # activations [frames, keys], or the fractional MIDI number
    onset_output: str | None = None  # activations: onset activations, same shape
    confidence_output: str | None = None  # midi: the confidence of each window
    first_midi: int = 21
    frame_ms: float = 0.0  # activations: ms between frames
    first_frame_ms: float = 0.0  # activations: first frame's time relative to the window's t
    own_from_ms: float = 0.0  # frames owned by a window: [t + own_from_ms, + own_ms)
    own_ms: float = 0.0
    onset_threshold: float = 0.5
    frame_threshold: float = 0.3
    note_threshold: float = 0.5
    min_note_ms: float = 120.0
    min_gap_ms: float = 25.0
    hold_semitones: float = 0.75  # midi: stay on a sounding note while this close to it

    def __reduce__(self) -> tuple[Any, ...]:
        return by_fields(self)


def factory(table: Mapping[str, Any], outputs: list[OutputInfo], timebase: Timebase) -> Factory:
    """Validate a ``kind = "notes"`` table; the factory of its per-stream processors."""
    o = Options(
        table,
        {"layout", "output", "onset_output", "confidence_output", "first_midi", "frame_hop"}
        | {"onset_threshold", "frame_threshold", "note_threshold", "min_note_ms", "min_gap_ms"},
    )
    if timebase.sample_rate is None or timebase.chunk is None:
        raise ConfigError("postprocess notes needs an audio model")
    rate, chunk, context = timebase.sample_rate, timebase.chunk, timebase.context
    layout = table.get("layout", "activations")
    shapes = {info.name: info.shape for info in outputs}
    common = {
        "onset_threshold": o.number("onset_threshold", 0.5, 0.0, 1.0),
        "frame_threshold": o.number("frame_threshold", 0.3, 0.0, 1.0),
        "note_threshold": o.number("note_threshold", 0.5, 0.0, 1.0),
        "min_note_ms": o.number("min_note_ms", 120.0, 0.0, 60_000.0),
        "min_gap_ms": o.number("min_gap_ms", 25.0, 0.0, 60_000.0),
        "first_midi": o.integer("first_midi", 21, 0, 127),
    }
    if layout == "activations":
        output = o.output("output", outputs)
        if len(shapes[output]) != 2:
            raise ConfigError(f"postprocess notes: {output} must be [frames, keys] per window")
        onset = o.output("onset_output", outputs) if "onset_output" in table else None
        if onset is not None and shapes[onset] != shapes[output]:
            raise ConfigError(f"postprocess notes: {onset} must be shaped like {output}")
        hop = o.integer("frame_hop", 0, 1)
        config = NotesConfig(
            layout,
            output,
            onset_output=onset,
            frame_ms=1000.0 * hop / rate,
            first_frame_ms=-1000.0 * context / rate,
            own_from_ms=-500.0 * context / rate,
            own_ms=1000.0 * chunk / rate,
            **common,  # type: ignore[arg-type]
        )
    elif layout == "midi":
        config = NotesConfig(
            layout,
            o.output("output", outputs),
            confidence_output=o.output("confidence_output", outputs),
            frame_ms=timebase.hop_ms,
            first_frame_ms=500.0 * (chunk - context) / rate,  # the window's centre
            **common,  # type: ignore[arg-type]
        )
    else:
        raise ConfigError('postprocess notes: layout must be "activations" or "midi"')
    return Factory(lambda options: NoteTracker(config))


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class NoteTracker:
    """One stream's sounding notes, fed one frame (all keys) at a time."""

    def __init__(self, config: NotesConfig) -> None:
        self.config = config
        self._since: dict[int, float] = {}  # key -> when its activation rose (not yet a note)
        self._peak: dict[int, float] = {}  # key -> highest activation or onset since then
        self._sounding: dict[int, tuple[float, float, int]] = {}  # key -> (onset, sum, frames)
        self._low: dict[int, float] = {}  # sounding key -> when its activation fell

    def process(self, batch: Batch) -> list[Emitted]:
        """Events of these windows' frames, then of the segment end if there is one."""
        cfg = self.config
        out: list[Emitted] = []
        end = batch.segment_end
        for i, t in enumerate(batch.t.tolist()):
            if cfg.layout == "activations":
                notes = batch.outputs[cfg.output][i]
                onsets = None if cfg.onset_output is None else batch.outputs[cfg.onset_output][i]
                first = t + cfg.first_frame_ms
                lo, hi = t + cfg.own_from_ms, t + cfg.own_from_ms + cfg.own_ms
                f0 = max(0, int(np.ceil((lo - first) / cfg.frame_ms - 1e-9)))
                for f in range(f0, notes.shape[0]):
                    tf = first + f * cfg.frame_ms
                    if tf >= hi or (end is not None and tf >= end):
                        break
                    out += self._frame(tf, notes[f], None if onsets is None else onsets[f])
            else:
                midi = float(batch.outputs[cfg.output][i].reshape(-1)[0])
                conf = float(batch.outputs[cfg.confidence_output or ""][i].reshape(-1)[0])
                out += self._frame(t + cfg.first_frame_ms, self._one_hot(midi, conf), None)
        if end is not None:
            for key in sorted(self._sounding):
                out.append(self._off(key, min(end, self._low.get(key, end))))
            self._since.clear()
            self._peak.clear()
        return out

    def _one_hot(self, midi: float, conf: float) -> dict[int, float]:
        """A pitch track frame as activations: the confidence on its (held) key."""
        if midi <= 0:
            return {}
        key = round(midi) - self.config.first_midi
        for held in (*self._since, *self._sounding):  # a rising or sounding note holds its key
            if abs(midi - self.config.first_midi - held) <= self.config.hold_semitones:
                key = held
        return {key: conf}

    def _frame(
        self,
        tf: float,
        notes: np.ndarray[Any, Any] | dict[int, float],
        onsets: np.ndarray[Any, Any] | None,
    ) -> list[Emitted]:
        cfg = self.config
        out: list[Emitted] = []
        if isinstance(notes, dict):
            active = notes
        else:
            idx = np.flatnonzero(notes >= cfg.frame_threshold)
            active = dict(zip(idx.tolist(), notes[idx].tolist(), strict=True))
        for key in list(self._sounding):
            if key in active:
                onset, total, n = self._sounding[key]
                self._sounding[key] = (onset, total + active[key], n + 1)
                self._low.pop(key, None)
            else:
                low = self._low.setdefault(key, tf)
                if tf - low >= cfg.min_gap_ms:
                    out.append(self._off(key, low))
        for key in list(self._since):
            if key not in active:
                del self._since[key], self._peak[key]
        for key, a in active.items():
            if key in self._sounding:
                continue
            since = self._since.setdefault(key, tf)
            strength = a if onsets is None else max(float(onsets[key]), a)
            self._peak[key] = peak = max(self._peak.get(key, 0.0), strength)
            strong = peak >= (cfg.note_threshold if onsets is None else cfg.onset_threshold)
            if strong and tf + cfg.frame_ms - since >= cfg.min_note_ms:
                del self._since[key], self._peak[key]
                self._sounding[key] = (since, a, 1)
                midi = key + cfg.first_midi
                out.append(
                    Emitted(
                        "note_on",
                        since,
                        {"midi": midi, "name": note_name(midi), "confidence": round(peak, 4)},
                    )
                )
        return out

    def _off(self, key: int, t: float) -> Emitted:
        onset, total, n = self._sounding.pop(key)
        self._low.pop(key, None)
        midi = key + self.config.first_midi
        return Emitted(
            "note_off",
            t,
            {
                "midi": midi,
                "name": note_name(midi),
                "onset": onset,
                "duration_ms": t - onset,
                "confidence": round(total / n, 4),
            },
        )
