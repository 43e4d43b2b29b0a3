"""Post-processors: pure code turning a stream's model outputs into events for apps.

A model version declares its post-processors in ``model.toml`` as ``[[postprocess]]`` tables,
each with a ``kind`` (one module of this package per idea: ``speech``, ``notes``,
``pitch_notes``, ``labels``, ``segments``). Every stream gets its own chain of processor
instances, fed each released chunk's outputs in stream order. Processors compose: each one sees
the events the processors before it in the chain emitted for the same windows (``segments``
closes a segment on ``speech_end``, for instance). Nothing here knows about sockets or asyncio.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from mypy_extensions import mypyc_attr

from realtime.frozen import by_fields


# Not frozen: one is built per chunk, and a frozen dataclass's __init__ costs 3x a plain one's.
@mypyc_attr(serializable=True)
@dataclass(slots=True)
class Emitted:
    """An event a post-processor found: its name, client time (ms) and fields."""

    event: str
    t: float
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Timebase:
    """Where a model's windows sit in time: audio window geometry (``None`` for other kinds)."""

    sample_rate: int | None = None
    chunk: int | None = None
    context: int = 0

    @property
    def hop_ms(self) -> float:
        """Milliseconds between two windows (0 when the stream is not audio)."""
        if self.sample_rate is None or self.chunk is None:
            return 0.0
        return 1000.0 * self.chunk / self.sample_rate

    @property
    def window_start_ms(self) -> float:
        """Where a window's first sample sits relative to its time (minus its context)."""
        return 0.0 if self.sample_rate is None else -1000.0 * self.context / self.sample_rate

    def __reduce__(self) -> tuple[Any, ...]:
        return by_fields(self)


# Built per chunk: its own __init__, which mypyc compiles (see setup.py).
@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(slots=True, init=False)
class Batch:
    """What one released chunk gives a processor chain.

    ``t`` holds each window's (or the chunk's) client time in ms, ``outputs`` each output
    stacked on a leading axis of the same length, ``events`` what earlier processors in the chain
    emitted for these windows, and ``segment_end`` the client time of an end of segment (the
    client's flag, or the end of the stream) right after these windows, if any.
    """

    t: np.ndarray[Any, Any]
    outputs: Mapping[str, np.ndarray[Any, Any]]
    events: list[Emitted]
    segment_end: float | None

    def __init__(
        self,
        t: np.ndarray[Any, Any],
        outputs: Mapping[str, np.ndarray[Any, Any]],
        events: list[Emitted] | None = None,
        segment_end: float | None = None,
    ) -> None:
        self.t = t
        self.outputs = outputs
        self.events = [] if events is None else events
        self.segment_end = segment_end


class PostProcessor(Protocol):
    """One stream's instance of a post-processor."""

    def process(self, batch: Batch) -> list[Emitted]:
        """The events these windows (and the segment end, if any) give, in time order."""
        ...


#: Each an option a post-processor reads from ``open.options``, with its bounds.
OptionBounds = Mapping[str, tuple[float, float]]


@dataclass(frozen=True, slots=True)
class Factory:
    """A validated ``[[postprocess]]`` table: makes a fresh processor for each stream, given
    the stream's options as :func:`stream_options` parsed them; ``options`` names the ones it
    reads, with their bounds."""

    make: Callable[[Mapping[str, float]], PostProcessor]
    options: OptionBounds = field(default_factory=dict)

    def __call__(self, options: Mapping[str, float]) -> PostProcessor:
        """One stream's processor."""
        return self.make(options)


def stream_options(given: Mapping[str, Any], chain: Sequence[Factory]) -> dict[str, float]:
    """A stream's ``open.options`` checked against what its post-processors read: only known
    keys, each a number within its bounds; the parsed values (nothing else of what the client
    sent is kept). Raises :class:`ConfigError`."""
    known: dict[str, tuple[float, float]] = {}
    for factory in chain:
        known.update(factory.options)
    unknown = [k for k in given if k not in known]
    if unknown:
        reads = ", ".join(sorted(known)) or "none"
        named = ", ".join(repr(k[:40]) for k in unknown[:5])
        raise ConfigError(f"unknown options {named}; this model's post-processing reads: {reads}")
    parsed: dict[str, float] = {}
    for key, value in given.items():
        lo, hi = known[key]
        if not isinstance(value, int | float) or isinstance(value, bool) or not lo <= value <= hi:
            raise ConfigError(f"options.{key} must be a number in [{lo:g}, {hi:g}]")
        parsed[key] = float(value)
    return parsed


@dataclass(frozen=True, slots=True)
class OutputInfo:
    """A model output as a post-processor's config checks it: name and one window's shape."""

    name: str
    shape: tuple[int | None, ...]


class ConfigError(ValueError):
    """A ``[[postprocess]]`` table that cannot work with its model."""


#: The events each post-processor kind emits (the catalog lists a model's).
EVENTS: dict[str, tuple[str, ...]] = {
    "speech": ("speech_start", "speech_end"),
    "notes": ("note_on", "note_off"),
    "labels": ("label",),
    "segments": ("partial", "final"),
}


def build(table: Mapping[str, Any], outputs: list[OutputInfo], timebase: Timebase) -> Factory:
    """Validate one ``[[postprocess]]`` table against the model; raise :class:`ConfigError`."""
    from realtime.events import labels, notes, segments, speech

    kinds: dict[str, Callable[[Mapping[str, Any], list[OutputInfo], Timebase], Factory]] = {
        "speech": speech.factory,
        "notes": notes.factory,
        "labels": labels.factory,
        "segments": segments.factory,
    }
    kind = table.get("kind")
    if kind not in kinds:
        raise ConfigError(f"postprocess kind {kind!r} is not one of {', '.join(kinds)}")
    return kinds[kind](table, outputs, timebase)


def run_chain(chain: list[PostProcessor], batch: Batch) -> list[Emitted]:
    """Feed a batch through a chain; every processor's events, sorted by time (stable)."""
    if len(chain) == 1:  # the common case: no batch to rebuild, one processor's events
        events = chain[0].process(batch)
    else:
        events = []
        for p in chain:
            events += p.process(Batch(batch.t, batch.outputs, list(events), batch.segment_end))
    if len(events) > 1:
        events.sort(key=lambda e: e.t)
    return events


class Options:
    """Typed reads of a post-processor's TOML table, raising :class:`ConfigError`."""

    def __init__(self, table: Mapping[str, Any], known: set[str]) -> None:
        self.table = table
        unknown = set(table) - known - {"kind"}
        if unknown:
            raise ConfigError(f"postprocess {table.get('kind')}: unknown keys {sorted(unknown)}")

    def number(self, key: str, default: float, lo: float = 0.0, hi: float = 1e9) -> float:
        """A number in [lo, hi]."""
        v = self.table.get(key, default)
        if not isinstance(v, int | float) or isinstance(v, bool) or not lo <= v <= hi:
            raise ConfigError(f"postprocess {key} must be a number in [{lo}, {hi}]")
        return float(v)

    def integer(self, key: str, default: int, lo: int = 0, hi: int = 2**31) -> int:
        """An integer in [lo, hi]."""
        v = self.table.get(key, default)
        if type(v) is not int or not lo <= v <= hi:
            raise ConfigError(f"postprocess {key} must be an integer in [{lo}, {hi}]")
        return v

    def output(self, key: str, outputs: list[OutputInfo], default: str | None = None) -> str:
        """The name of one of the model's outputs."""
        v = self.table.get(key, default)
        if v not in {o.name for o in outputs}:
            raise ConfigError(
                f"postprocess {key} = {v!r} must name a model output "
                f"({', '.join(o.name for o in outputs)})"
            )
        assert isinstance(v, str)
        return v
