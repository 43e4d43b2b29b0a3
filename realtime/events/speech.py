"""Voice activity: a speech probability per window -> ``speech_start`` / ``speech_end``.

Hysteresis as the hosted realtime speech APIs and silero-vad's own iterator do it: speech
starts when the probability reaches ``threshold`` and stays at or above ``off_threshold`` for
``min_speech_ms``; it ends after ``min_silence_ms`` below ``off_threshold``. Both edges are
moved out by ``pad_ms`` (never into the previous utterance). An event is sent when it is
certain, so ``speech_start`` arrives ``min_speech_ms`` after its ``t`` and ``speech_end``
``min_silence_ms - pad_ms`` after its ``t``; the ``t`` fields are where speech really started and
ended, in the client's timeline.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mypy_extensions import mypyc_attr

from realtime.events import (
    Batch,
    ConfigError,
    Emitted,
    Factory,
    Options,
    OutputInfo,
    Timebase,
)
from realtime.frozen import by_fields


@dataclass(frozen=True, slots=True)
class SpeechConfig:
    """Thresholds and durations of one voice-activity post-processor."""

    output: str
    threshold: float = 0.5
    off_threshold: float = 0.35
    min_speech_ms: float = 250.0
    min_silence_ms: float = 300.0
    pad_ms: float = 30.0
    index: int = 0  # which value of a window's output (flattened) is the probability
    window_ms: float = 20.0  # how long one window lasts

    def __reduce__(self) -> tuple[Any, ...]:
        return by_fields(self)


def factory(table: Mapping[str, Any], outputs: list[OutputInfo], timebase: Timebase) -> Factory:
    """Validate a ``kind = "speech"`` table; the factory of its per-stream processors."""
    o = Options(
        table,
        {"output", "threshold", "off_threshold", "min_speech_ms", "min_silence_ms", "pad_ms"}
        | {"index"},
    )
    if timebase.hop_ms <= 0:
        raise ConfigError("postprocess speech needs an audio model")
    threshold = o.number("threshold", 0.5, 0.0, 1.0)
    config = SpeechConfig(
        output=o.output("output", outputs),
        threshold=threshold,
        off_threshold=o.number("off_threshold", max(0.0, threshold - 0.15), 0.0, threshold),
        min_speech_ms=o.number("min_speech_ms", 250.0, 0.0, 60_000.0),
        min_silence_ms=o.number("min_silence_ms", 300.0, 0.0, 60_000.0),
        pad_ms=o.number("pad_ms", 30.0, 0.0, 10_000.0),
        index=o.integer("index", 0),
        window_ms=timebase.hop_ms,
    )
    return Factory(lambda options: SpeechActivity(config))


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class SpeechActivity:
    """One stream's voice-activity state: idle, maybe speech, speech, maybe silence."""

    def __init__(self, config: SpeechConfig) -> None:
        self.config = config
        self._origin: float | None = None  # where the stream (or segment) began
        self._candidate: float | None = None  # start of a run above threshold, not yet speech
        self._start: float | None = None  # start of the utterance being spoken (after padding)
        self._silence: float | None = None  # start of the silence that may end it
        self._last_end = float("-inf")
        self._peak = 0.0
        self.segments = 0

    def process(self, batch: Batch) -> list[Emitted]:
        """Events of these windows, then of the segment end if there is one."""
        cfg = self.config
        out: list[Emitted] = []
        n = len(batch.t)
        values = batch.outputs[cfg.output].reshape(n, -1)[:, cfg.index].tolist() if n else []
        for t, p in zip(batch.t.tolist(), values, strict=True):
            if self._origin is None:
                self._origin = t
            end = t + cfg.window_ms
            if self._start is None:
                if self._candidate is None:
                    if p >= cfg.threshold:
                        self._candidate, self._peak = t, p
                elif p < cfg.off_threshold:
                    self._candidate = None
                if self._candidate is not None:
                    self._peak = max(self._peak, p)
                    if end - self._candidate >= cfg.min_speech_ms:
                        out.append(self._begin())
            else:
                self._peak = max(self._peak, p)
                if p >= cfg.threshold:
                    self._silence = None
                elif p < cfg.off_threshold and self._silence is None:
                    self._silence = t
                if self._silence is not None and end - self._silence >= cfg.min_silence_ms:
                    out.append(self._end(self._silence + cfg.pad_ms))
        if batch.segment_end is not None:
            if self._start is not None:
                stop = batch.segment_end
                if self._silence is not None:
                    stop = min(stop, self._silence + cfg.pad_ms)
                out.append(self._end(stop))
            self._candidate = None
            self._origin = None
        return out

    def _begin(self) -> Emitted:
        assert self._candidate is not None and self._origin is not None
        start = max(self._candidate - self.config.pad_ms, self._last_end, self._origin)
        self._start, self._candidate, self._silence = start, None, None
        self.segments += 1
        return Emitted(
            "speech_start", start, {"segment": self.segments, "prob": round(self._peak, 4)}
        )

    def _end(self, stop: float) -> Emitted:
        assert self._start is not None
        start = self._start
        self._start, self._silence, self._last_end = None, None, stop
        event = Emitted(
            "speech_end",
            stop,
            {
                "segment": self.segments,
                "start": start,
                "duration_ms": stop - start,
                "prob": round(self._peak, 4),
            },
        )
        self._peak = 0.0
        return event
