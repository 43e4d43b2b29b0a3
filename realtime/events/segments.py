"""Partial and final results: model outputs reduced over a segment, now and at its end.

A segment is an utterance (between the ``speech_start`` and ``speech_end`` of a ``speech``
processor earlier in the chain, with ``segment_by = "speech"``) or the audio between two
client-marked ends of segment (chunk flag bit 0; ``segment_by = "client"``, the default). At its
end comes one ``final`` event holding the chosen outputs reduced over the segment's windows
(``reduce``: mean, max or last); while it lasts, a stream that asks for them (open option
``partial_ms``, or the table's default) gets a ``partial`` event every ``partial_ms`` of audio.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from realtime.events import Batch, ConfigError, Emitted, Factory, Options, OutputInfo, Timebase

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


class Segments:
    """One stream's open segment: its windows' chosen outputs, and when a partial is due."""

    def __init__(self, config: SegmentsConfig, partial_ms: float) -> None:
        self.config = config
        self.partial_ms = partial_ms
        self._windows: deque[tuple[float, dict[str, np.ndarray[Any, Any]]]] = deque(
            maxlen=MAX_WINDOWS
        )
        self._start: float | None = None  # the open segment's start (None: between segments)
        self._next_partial = 0.0
        self.count = 0

    def process(self, batch: Batch) -> list[Emitted]:
        """Partials due in these windows, and a final where a segment ends."""
        cfg = self.config
        out: list[Emitted] = []
        for i, t in enumerate(batch.t.tolist()):
            self._windows.append((t, {n: batch.outputs[n][i] for n in cfg.outputs}))
            if cfg.segment_by == "client" and self._start is None:
                self._open(t)
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
        while self._windows and self._windows[0][0] < t:
            self._windows.popleft()

    def _final(self, end: float) -> Emitted:
        event = self._emit("final", end)
        self._start = None
        while self._windows and self._windows[0][0] < end:
            self._windows.popleft()
        return event

    def _emit(self, name: str, t: float) -> Emitted:
        """A partial or final of the windows in [segment start, t)."""
        cfg = self.config
        assert self._start is not None
        inside = [w for wt, w in self._windows if wt < t]
        reduced: dict[str, Any] = {}
        for n in cfg.outputs:
            if not inside:
                reduced[n] = None
            elif cfg.reduce == "last":
                reduced[n] = inside[-1][n].tolist()
            else:
                reduced[n] = _REDUCE[cfg.reduce](np.stack([w[n] for w in inside]), axis=0).tolist()
        data: dict[str, Any] = {"segment": self.count, "start": self._start}
        if name == "final":
            data["duration_ms"] = t - self._start
        data["windows"] = len(inside)
        data["outputs"] = reduced
        return Emitted(name, t, data)
