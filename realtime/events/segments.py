"""Partial and final results: model outputs reduced over a segment, now and at its end.

A segment is an utterance (between the ``speech_start`` and ``speech_end`` of a ``speech``
processor earlier in the chain, with ``segment_by = "speech"``) or the audio between two
client-marked ends of segment (chunk flag bit 0; ``segment_by = "client"``, the default). At its
end comes one ``final`` event holding the chosen outputs reduced over the segment's windows
(``reduce``: mean, max or last); while it lasts, a stream that asks for them (open option
``partial_ms``, or the table's default) gets a ``partial`` event every ``partial_ms`` of audio.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from mypy_extensions import mypyc_attr

from realtime.events import Batch, ConfigError, Emitted, Factory, Options, OutputInfo, Timebase
from realtime.frozen import by_fields

#: Windows remembered before a segment is known to have begun (a speech start is confirmed
#: ``min_speech_ms`` late) and at most held in one segment.
MAX_WINDOWS = 4096
_REDUCE: dict[str, Callable[..., Any]] = {"mean": np.mean, "max": np.max}


@dataclass(frozen=True, slots=True)
class SegmentsConfig:
    """What to reduce, how, and what makes a segment."""

    outputs: tuple[str, ...]
    reduce: str = "mean"
    segment_by: str = "client"
    partial_ms: float = 0.0
    window_ms: float = 0.0

    def __reduce__(self) -> tuple[Any, ...]:
        return by_fields(self)


def factory(table: Mapping[str, Any], outputs: list[OutputInfo], timebase: Timebase) -> Factory:
    """Validate a ``kind = "segments"`` table; the factory of its per-stream processors."""
    o = Options(table, {"outputs", "reduce", "segment_by", "partial_ms"})
    names = table.get("outputs", [info.name for info in outputs])
    known = {info.name for info in outputs}
    if not isinstance(names, list) or not names or not all(n in known for n in names):
        raise ConfigError(f"postprocess segments: outputs must name model outputs ({known})")
    reduce = table.get("reduce", "mean")
    if reduce not in ("mean", "max", "last"):
        raise ConfigError('postprocess segments: reduce must be "mean", "max" or "last"')
    segment_by = table.get("segment_by", "client")
    if segment_by not in ("client", "speech"):
        raise ConfigError('postprocess segments: segment_by must be "client" or "speech"')
    config = SegmentsConfig(
        tuple(names),
        reduce,
        segment_by,
        o.number("partial_ms", 0.0, 0.0, 600_000.0),
        timebase.hop_ms,
    )

    def make(options: Mapping[str, float]) -> Segments:
        return Segments(config, options.get("partial_ms", config.partial_ms))

    return Factory(make, {"partial_ms": (0.0, 600_000.0)})


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class _History:
    """The windows a segment may still need: each one's time and chosen outputs, in growable
    arrays, no Python object per window (between utterances a stream holds up to
    :data:`MAX_WINDOWS` of them, and per-window objects made every full garbage collection walk
    them all). Times only grow, so [lo, hi) is searched in order."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.t: np.ndarray[Any, Any] = np.empty(0, np.float64)
        self.outputs: dict[str, np.ndarray[Any, Any]] = {}
        self.lo = 0  # the oldest window kept
        self.hi = 0  # one past the newest

    def __getstate__(self) -> dict[str, Any]:
        """Only the windows kept (a checkpoint is written every second)."""
        lo, hi = self.lo, self.hi
        outputs = {n: a[lo:hi].copy() for n, a in self.outputs.items()}
        return {
            "names": self.names,
            "t": self.t[lo:hi].copy(),
            "outputs": outputs,
            "lo": 0,
            "hi": hi - lo,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    def __len__(self) -> int:
        return self.hi - self.lo

    def append(self, t: np.ndarray[Any, Any], outputs: Mapping[str, np.ndarray[Any, Any]]) -> None:
        """Keep the windows of one batch (``outputs`` each with a leading axis of ``len(t)``)."""
        k = len(t)
        if not k:
            return
        if self.hi + k > len(self.t):  # (true on the first call: no arrays yet)
            self._make_room(k, outputs)
        hi = self.hi
        self.t[hi : hi + k] = t
        for n in self.names:
            self.outputs[n][hi : hi + k] = outputs[n][:k]
        self.hi = hi + k
        if self.hi - self.lo > MAX_WINDOWS:
            self.lo = self.hi - MAX_WINDOWS

    def _make_room(self, k: int, outputs: Mapping[str, np.ndarray[Any, Any]]) -> None:
        """Move the windows kept to the front of arrays with room for twice them and ``k``."""
        keep = min(self.hi - self.lo, MAX_WINDOWS)
        lo, size = self.hi - keep, max(64, 2 * (keep + k))
        t = np.empty(size, np.float64)
        t[:keep] = self.t[lo : self.hi]
        kept = {}
        for n in self.names:
            row = outputs[n][:1]
            old = self.outputs.get(n)
            kept[n] = np.empty((size, *row.shape[1:]), row.dtype)
            if old is not None:
                kept[n][:keep] = old[lo : self.hi]
        self.t, self.outputs, self.lo, self.hi = t, kept, 0, keep

    def before(self, t: float) -> int:
        """How many windows kept start before ``t``."""
        return int(np.searchsorted(self.t[self.lo : self.hi], t, "left"))

    def drop_before(self, t: float) -> None:
        """Forget the windows that start before ``t``."""
        self.lo += self.before(t)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class Segments:
    """One stream's open segment: its windows' chosen outputs, and when a partial is due."""

    def __init__(self, config: SegmentsConfig, partial_ms: float) -> None:
        self.config = config
        self.partial_ms = partial_ms
        self._windows = _History(config.outputs)
        self._start: float | None = None  # the open segment's start (None: between segments)
        self._next_partial = 0.0
        self.count = 0

    def process(self, batch: Batch) -> list[Emitted]:
        """Partials due in these windows, and a final where a segment ends."""
        cfg = self.config
        out: list[Emitted] = []
        if cfg.segment_by == "client" and self._start is None and len(batch.t):
            self._open(float(batch.t[0]))
        self._windows.append(batch.t, batch.outputs)
        if batch.events and cfg.segment_by == "speech":
            for mark in batch.events:
                if mark.event == "speech_start":
                    self._open(mark.t)
                elif mark.event == "speech_end" and self._start is not None:
                    out.append(self._final(mark.t))
        if self._start is not None and self.partial_ms > 0 and len(batch.t):
            now = float(batch.t[-1]) + cfg.window_ms
            if now >= self._next_partial:
                out.append(self._emit("partial", now))
                self._next_partial = now + self.partial_ms
        if batch.segment_end is not None and self._start is not None:
            out.append(self._final(batch.segment_end))
        return out

    def _open(self, t: float) -> None:
        self._start = t
        self.count += 1
        self._next_partial = t + self.partial_ms
        self._windows.drop_before(t)

    def _final(self, end: float) -> Emitted:
        event = self._emit("final", end)
        self._start = None
        self._windows.drop_before(end)
        return event

    def _emit(self, name: str, t: float) -> Emitted:
        """A partial or final of the windows in [segment start, t)."""
        cfg = self.config
        assert self._start is not None
        history = self._windows
        k = history.before(t)
        lo = history.lo
        reduced: dict[str, Any] = {}
        for n in cfg.outputs:
            if not k:
                reduced[n] = None
            elif cfg.reduce == "last":
                reduced[n] = history.outputs[n][lo + k - 1].tolist()
            else:
                reduced[n] = _REDUCE[cfg.reduce](history.outputs[n][lo : lo + k], axis=0).tolist()
        data: dict[str, Any] = {"segment": self.count, "start": self._start}
        if name == "final":
            data["duration_ms"] = t - self._start
        data["windows"] = k
        data["outputs"] = reduced
        return Emitted(name, t, data)
