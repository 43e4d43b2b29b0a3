"""Audio streams: client chunks of any length, dtype and rate in; model windows out. No I/O.

A :class:`Rechunker` belongs to one audio stream. It scales PCM to floats, resamples to the
model's rate with a streaming ``soxr`` resampler (whose filter state spans chunk boundaries, so
the output does not depend on how the client cut its audio), appends to one preallocated buffer
and cuts model windows of ``context + chunk`` samples, each hopping by ``chunk``. Every window
carries the time of its first new sample in the client's own timeline (ms), so whatever a model
says about a window maps back to the client's clock exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import soxr
from mypy_extensions import mypyc_attr

#: Audio chunk dtypes a stream may send; integers are PCM, scaled to [-1, 1).
AUDIO_DTYPES: Final[dict[str, float]] = {
    "float32": 1.0,
    "float64": 1.0,
    "int16": 1.0 / 32768,
    "int32": 1.0 / 2147483648,
    "uint8": 1.0 / 128,  # 8-bit PCM is unsigned, centred on 128
}
#: Client sample rates an audio stream may declare.
MIN_SAMPLE_RATE: Final = 1000
MAX_SAMPLE_RATE: Final = 384_000


# Built per chunk: its own __init__, which mypyc compiles (see setup.py).
@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(slots=True, init=False)
class Windows:
    """The model windows one client chunk completed (possibly none), in stream order."""

    #: Each ``context + chunk`` samples: a view of the stream's buffer, which is never written
    #: again where a window was cut (read them, do not write them).
    data: list[np.ndarray[Any, Any]]
    t: np.ndarray[Any, Any]  # float64 ms: client time of each window's first new sample
    segment_end: float | None  # client ms where the segment ended, if this chunk ended it

    def __init__(
        self,
        data: list[np.ndarray[Any, Any]],
        t: np.ndarray[Any, Any],
        segment_end: float | None = None,
    ) -> None:
        self.data = data
        self.t = t
        self.segment_end = segment_end


def _resampler(in_rate: int, out_rate: int) -> soxr.ResampleStream | None:
    """A streaming resampler (its filter state spans chunks), or None when the rates match."""
    if in_rate == out_rate:
        return None
    return soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality="HQ")


#: A re-chunker's attributes that a checkpoint keeps (not its buffer, scratch or resampler).
_KEPT = (
    "in_rate", "out_rate", "chunk", "context", "window", "_scale", "_unsigned", "_dtype",
    "_size", "_next", "_segment_t", "_client_samples",
)  # fmt: skip


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class Rechunker:
    """One audio stream's converter, resampler and window cutter."""

    def __init__(
        self,
        in_rate: int,
        in_dtype: str,
        out_rate: int,
        chunk: int,
        context: int,
        out_dtype: np.dtype[Any] | None = None,
    ) -> None:
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.chunk = chunk
        self.context = context
        self.window = chunk + context
        #: A float32 scalar: integer PCM times it is float32 at once (no float64 detour).
        self._scale = np.float32(AUDIO_DTYPES[in_dtype])
        self._unsigned = in_dtype == "uint8"
        self._dtype = np.dtype(np.float32) if out_dtype is None else out_dtype
        self._resampler = _resampler(in_rate, out_rate)
        # [start, fill) holds the context of the next window, then samples not yet in a window.
        # Windows are views of the buffer: nothing before ``fill`` is ever written again, and
        # when the buffer is full the samples held move to a new one (the old one lives on
        # while windows cut from it wait for their batch).
        self._size = 2 * self.window + 4096  # what the buffer shrinks back to after a long chunk
        self._buf = np.zeros(self._size, self._dtype)
        self._start = 0
        self._fill = context
        self._scratch = np.empty(0, np.float32)
        self._next = 0  # model samples of the segment that already opened a window
        self._segment_t: float | None = None  # client ms of the segment's first sample
        self._client_samples = 0  # client samples of this segment so far

    def __getstate__(self) -> dict[str, Any]:
        """What the stream holds, not its buffers' spare room (a checkpoint is written every
        second), nor the resampler, which cannot be pickled: a session handed to another
        server restarts its filter (a few ms of filter history are lost at the hand-off)."""
        state = {name: getattr(self, name) for name in _KEPT}
        state["_held"] = held = self._buf[self._start : self._fill].copy()
        state["_fill"] = held.shape[0]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        held = state.pop("_held", None)  # None: handed off by an older one, buffers and all
        state.setdefault("_size", 2 * state["window"] + 4096)  # handed off by an older one
        state.setdefault("_scratch", np.empty(0, np.float32))
        state["_start"] = 0
        for name, value in state.items():
            setattr(self, name, value)
        if held is not None:
            self._buf = np.zeros(max(self._size, held.shape[0]), self._dtype)
            self._buf[: held.shape[0]] = held
        self._resampler = _resampler(self.in_rate, self.out_rate)

    def decoded(self, n: int) -> int:
        """Model-rate samples that ``n`` more client samples bring, with those pending: what
        a chunk of ``n`` costs, known from its header before it is decoded or resampled."""
        return self.pending + -(-n * self.out_rate // self.in_rate)

    @property
    def pending(self) -> int:
        """Model-rate samples waiting for the next window (beyond its context)."""
        return self._fill - self._start - self.context

    def push(self, data: np.ndarray[Any, Any], t: float, end_of_segment: bool = False) -> Windows:
        """Add one client chunk (1-D, the stream's dtype) sent at client time ``t`` (ms).

        ``end_of_segment`` pads what is left with zeros into a last window and starts a new
        segment whose timeline resumes from the samples the client actually sent.
        """
        if self._segment_t is None:
            self._segment_t = t
        self._client_samples += data.shape[0]
        if self._resampler is None:
            self._append_scaled(data)
        else:
            floats = self._to_float(data)
            self._append(self._resampler.resample_chunk(floats, last=end_of_segment))
        windows, times = self._cut()
        segment_end = None
        if end_of_segment:
            if self.pending > 0:
                self._append(np.zeros(self.chunk - self.pending, self._dtype))
                more, more_t = self._cut()
                windows += more
                times += more_t
            self._segment_t += 1000.0 * self._client_samples / self.in_rate
            segment_end = self._segment_t
            self._client_samples = 0
            self._next = 0
            if self._resampler is not None:
                self._resampler.clear()
        if self._buf.shape[0] > self._size:  # a long chunk grew it: give the memory back
            self._move(0)
        if self._scratch.shape[0] > self._size:
            self._scratch = np.empty(0, np.float32)
        return Windows(windows, np.array(times, np.float64), segment_end)

    def _to_float(self, data: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        if data.dtype == np.float32:
            return data
        n = data.shape[0]
        if self._scratch.shape[0] < n:
            self._scratch = np.empty(max(n, 2 * self._scratch.shape[0]), np.float32)
        out = self._scratch[:n]
        np.multiply(data, self._scale, out=out)
        if self._unsigned:
            out -= 1.0
        return out

    def _room(self, n: int) -> np.ndarray[Any, Any]:
        """A view of ``n`` free samples at the end of the buffer (a new buffer if it is full)."""
        if self._fill + n > self._buf.shape[0]:
            self._move(n)
        end = self._fill + n
        view = self._buf[self._fill : end]
        self._fill = end
        return view

    def _move(self, room: int) -> None:
        """Move the samples held to the start of a new buffer with ``room`` free samples after
        them (at least the usual size): windows cut from the old one may still be waiting."""
        held = self._fill - self._start
        buf = np.empty(max(self._size, held + room), self._dtype)
        buf[:held] = self._buf[self._start : self._fill]
        self._buf, self._start, self._fill = buf, 0, held

    def _append_scaled(self, data: np.ndarray[Any, Any]) -> None:
        out = self._room(data.shape[0])
        out[:] = data  # cast in place: a multiply from the integers would cast to a temporary
        if data.dtype == self._dtype:
            return
        np.multiply(out, self._scale, out=out)
        if self._unsigned:
            out -= 1.0

    def _append(self, samples: np.ndarray[Any, Any]) -> None:
        self._room(samples.shape[0])[:] = samples

    def _cut(self) -> tuple[list[np.ndarray[Any, Any]], list[float]]:
        """Every full window, as a view; the last window's context and the rest stay held."""
        buf, size, hop, fill = self._buf, self.window, self.chunk, self._fill
        windows: list[np.ndarray[Any, Any]] = []
        times: list[float] = []
        start = self._start
        assert self._segment_t is not None
        while fill - start >= size:
            windows.append(buf[start : start + size])
            times.append(self._segment_t + 1000.0 * self._next / self.out_rate)
            self._next += hop
            start += hop
        self._start = start
        return windows, times
