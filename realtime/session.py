"""One client's session, without I/O: its streams, chunk checks, sequence order and state.

A :class:`Session` turns protocol messages into replies and chunks into :class:`WorkItem` s for
the scheduler, and turns each item's outcome back into the messages to send, released strictly in
per-stream sequence order. Every chunk it accepts gets exactly one result or one typed error.
Everything a session holds lives here, in plain objects, so that it can be moved or resumed.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
from mypy_extensions import mypyc_attr

from realtime import errors, events
from realtime.audio import AUDIO_DTYPES, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, Rechunker
from realtime.frozen import by_fields
from realtime.models.repository import ModelRepository
from realtime.models.spec import Model
from realtime.protocol import (
    FLAG_END_OF_SEGMENT,
    Chunk,
    Close,
    Closed,
    Error,
    Event,
    Hello,
    Message,
    Open,
    Opened,
    Overflow,
    Result,
    ResultMode,
    Timing,
    Welcome,
)


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-session limits the server enforces and announces in its welcome."""

    max_message_bytes: int = 4 * 1024 * 1024
    #: Text (JSON control) messages are small; a large one would hold the loop while parsed.
    max_text_bytes: int = 64 * 1024
    max_streams: int = 64
    max_inflight_per_stream: int = 64
    max_inflight_per_session: int = 512
    #: Audio: seconds of model-rate audio one chunk may bring (a low-rate 8-bit chunk grows 16
    #: times when resampled to 16 kHz float32); at least two model windows.
    max_audio_chunk_seconds: float = 5.0
    #: Audio: seconds of model-rate audio a stream may have in chunks without an answer.
    max_audio_inflight_seconds: float = 30.0
    #: Sessions open at once from one client address (HTTP 429 at the handshake above it).
    max_sessions_per_ip: int = 256
    #: Inbound rate of all the sessions of one client address together (as a session's own).
    max_messages_per_second_per_ip: int = 10_000
    max_bytes_per_second_per_ip: int = 64 * 1024 * 1024
    #: A session that sends nothing for this long is closed (4001).
    idle_seconds: float = 300.0
    #: Inbound rate per session; above it the server stops reading from the client for a while
    #: (TCP then slows the sender). Half a second of either is allowed in a burst.
    max_messages_per_second: int = 1000
    max_bytes_per_second: int = 32 * 1024 * 1024
    #: A session whose connection is lost (not closed by the client) is kept this long for the
    #: client to resume it; 0 turns resuming off.
    resume_seconds: float = 30.0
    #: Frames already written that a session keeps to send again after a resume (the ones the
    #: lost connection may not have delivered), in bytes.
    resume_buffer_bytes: int = 256 * 1024

    def as_wire(self) -> dict[str, Any]:
        """The limits as the welcome message lists them."""
        return {
            "max_message_bytes": self.max_message_bytes,
            "max_text_bytes": self.max_text_bytes,
            "max_streams": self.max_streams,
            "max_inflight_per_stream": self.max_inflight_per_stream,
            "max_inflight_per_session": self.max_inflight_per_session,
            "max_audio_chunk_seconds": self.max_audio_chunk_seconds,
            "max_audio_inflight_seconds": self.max_audio_inflight_seconds,
            "max_messages_per_second": self.max_messages_per_second,
            "max_bytes_per_second": self.max_bytes_per_second,
            "resume_seconds": self.resume_seconds,
        }

    def __reduce__(self) -> tuple[Any, ...]:
        return by_fields(self)


# Built per chunk: its own __init__, which mypyc compiles (see setup.py).
@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(slots=True, init=False)
class Prediction:
    """A chunk's model outputs (aligned with ``Model.outputs``) and where its time went."""

    outputs: list[np.ndarray[Any, Any]]
    queue_ms: float
    infer_ms: float
    batch: int

    def __init__(
        self, outputs: list[np.ndarray[Any, Any]], queue_ms: float, infer_ms: float, batch: int
    ) -> None:
        self.outputs = outputs
        self.queue_ms = queue_ms
        self.infer_ms = infer_ms
        self.batch = batch


Outcome = Prediction | errors.ServingError


# Built per chunk: its own __init__, which mypyc compiles (see setup.py).
@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(slots=True, eq=False, init=False)
class Gather:
    """An audio chunk's model windows on their way through the scheduler: one outcome each."""

    seq: int
    t: float
    window_t: np.ndarray[Any, Any]  # client ms of each window's first new sample
    segment_end: float | None  # client ms, when this chunk ended a segment
    outcomes: list[Outcome | None]
    left: int
    #: The stream's media clock at the chunk's end (ms of audio the stream sent, see Stream).
    media_ms: float

    def __init__(
        self,
        seq: int,
        t: float,
        window_t: np.ndarray[Any, Any],
        segment_end: float | None,
        outcomes: list[Outcome | None],
        left: int,
        media_ms: float = 0.0,
    ) -> None:
        self.seq = seq
        self.t = t
        self.window_t = window_t
        self.segment_end = segment_end
        self.outcomes = outcomes
        self.left = left
        self.media_ms = media_ms


# Built per chunk: its own __init__, which mypyc compiles (see setup.py).
@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(slots=True, init=False)
class Ready:
    """A chunk's outcome, waiting for earlier chunks' before it is sent."""

    t: float
    outcome: Outcome
    windows: np.ndarray[Any, Any] | None  # audio: each window's client time (ms)
    segment_end: float | None

    def __init__(
        self,
        t: float,
        outcome: Outcome,
        windows: np.ndarray[Any, Any] | None,
        segment_end: float | None = None,
    ) -> None:
        self.t = t
        self.outcome = outcome
        self.windows = windows
        self.segment_end = segment_end


@mypyc_attr(serializable=True)
@dataclass(slots=True, eq=False)
class Stream:
    """One open stream: its model binding, sequence position, recurrent state and ordering."""

    session: str
    id: int
    model: Model
    dtype: np.dtype[Any]
    deadline_ms: float
    results: ResultMode
    options: dict[str, float]  # open.options, parsed (events.stream_options)
    overflow: Overflow
    #: Recurrent state per ``model.states`` (batch size 1); the scheduler updates it in place.
    state: list[np.ndarray[Any, Any]]
    #: Audio: converts, resamples and cuts the client's chunks into model windows.
    rechunker: Rechunker | None
    last_seq: int = -1
    #: The highest seq received on the stream, accepted or refused (a resuming client sends the
    #: chunks after it again).
    received: int = -1
    #: Accepted sequence numbers without a sent outcome, in order.
    pending: deque[int] = field(default_factory=deque)
    #: Outcomes that arrived before an earlier seq's; released in order.
    done: dict[int, Ready] = field(default_factory=dict)
    #: This stream's post-processors (the model's ``[[postprocess]]``), fed in stream order.
    chain: list[events.PostProcessor] = field(default_factory=list)
    #: Audio: model-rate samples of accepted chunks not answered yet (bounded per stream).
    audio_inflight: int = 0
    #: Client time (ms) of the end of the last window released, to end a stream's segment.
    last_end: float | None = None
    hop_ms: float = 0.0  # audio: ms between two model windows
    #: One model input's shape as a window is cut (audio; None: windows are already it).
    window_shape: tuple[int, ...] | None = None
    closing: bool = False
    #: False once the client is gone or the stream closed: the scheduler skips its items.
    live: bool = True
    results_sent: int = 0
    errors_sent: int = 0
    #: Audio: ms of audio accepted so far (the stream's media clock, from samples and rate, not
    #: from the client's ``t``, which a client may not keep in real time).
    media_ms: float = 0.0
    #: Live audio: the least (arrival - media clock) of its chunks, server monotonic ms, in this
    #: lateness window and in the one before. A result sent later than that after its chunk's
    #: media time is late by the difference (admission control's lateness).
    clock_min: float = math.inf
    clock_prev: float = math.inf
    #: ``clock_min`` at the last lateness window's end: a lead that fell far since is a client
    #: sending faster than real time (``admission.ahead_of_real_time``).
    clock_mark: float = math.inf
    answered: int = 0  # audio results sent in this lateness window
    late: int = 0  # of which late (``AdmissionPolicy.late_ms``)
    lateness_ms: float = 0.0  # their sum of how late each was (ms past its audio's time)


# Built per chunk: its own __init__, which mypyc compiles (see setup.py).
@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(slots=True, eq=False, init=False)
class WorkItem:
    """One model input on its way through the scheduler: a chunk, or one window of an audio
    chunk (then ``gather`` collects the chunk's windows into its one outcome)."""

    stream: Stream
    seq: int
    t: float  # the chunk's t; for an audio window, the window's own time
    inputs: np.ndarray[Any, Any]  # the model's input for this item, without the batch axis
    received: float  # monotonic seconds when the frame arrived
    deadline: float  # monotonic seconds by which the result is due
    end_of_segment: bool
    gather: Gather | None
    window: int  # index among the chunk's windows

    def __init__(
        self,
        stream: Stream,
        seq: int,
        t: float,
        inputs: np.ndarray[Any, Any],
        received: float,
        deadline: float,
        end_of_segment: bool = False,
        gather: Gather | None = None,
        window: int = 0,
    ) -> None:
        self.stream = stream
        self.seq = seq
        self.t = t
        self.inputs = inputs
        self.received = received
        self.deadline = deadline
        self.end_of_segment = end_of_segment
        self.gather = gather
        self.window = window


class Phase(Enum):
    """Where a session is in its life."""

    AWAITING_HELLO = "awaiting_hello"
    OPEN = "open"


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class Session:
    """The pure state machine of one client connection."""

    def __init__(
        self,
        session_id: str,
        repository: ModelRepository,
        limits: Limits,
        server: str,
        allows: Callable[[str], bool] | None = None,
        resume_token: str | None = None,
    ) -> None:
        self.id = session_id
        #: The secret a client gives back in ``hello.resume`` to take this session back.
        self.resume_token = resume_token
        #: Which model names this session's credential may open (None: any).
        self.allows = allows
        self.repository = repository
        self.limits = limits
        self.server = server
        self.phase = Phase.AWAITING_HELLO
        self.streams: dict[int, Stream] = {}
        self.client = ""
        #: Chunks accepted on all streams whose outcome is not sent yet.
        self.inflight = 0

    # --- control messages -------------------------------------------------------------------

    def hello(self, msg: Hello) -> Welcome:
        """Start the session: the welcome with its id, limits and catalog."""
        if self.phase is not Phase.AWAITING_HELLO:
            raise errors.BadMessage("hello was already received on this session")
        self.phase = Phase.OPEN
        self.client = msg.client
        return self.welcome()

    def welcome(self, replay_from: int | None = None) -> Welcome:
        """The session's welcome; given ``replay_from``, a resumed session's: its open streams,
        where each one's chunks got to, and the count of messages the replay starts after."""
        resumed = None
        if replay_from is not None:
            streams = [
                {"stream": s.id, "received": s.received, "closing": s.closing}
                for s in self.streams.values()
            ]
            resumed = {"streams": streams, "from": replay_from}
        return Welcome(
            self.id,
            self.server,
            self.limits.as_wire(),
            [m for m in self.repository.catalog() if self.allows is None or self.allows(m["name"])],
            resume_token=self.resume_token,
            resumed=resumed,
        )

    def check_grant(self, allows: Callable[[str], bool] | None) -> None:
        """Refuse to resume this session with a credential that may not use one of its open
        streams' models (a resumed session takes the grant of the credential resuming it)."""
        for stream in self.streams.values():
            if allows is not None and not allows(stream.model.name):
                raise errors.ModelForbidden(
                    f"this credential may not use model {stream.model.name!r} of stream "
                    f"{stream.id}: resume with one that may",
                    stream=stream.id,
                )

    def _require_open(self) -> None:
        if self.phase is not Phase.OPEN:
            raise errors.HelloRequired("send hello before anything else")

    def open_stream(self, msg: Open) -> Opened:
        """Bind a new stream to a model version after checking that its chunks can fit."""
        self._require_open()
        sid = msg.stream
        if sid in self.streams:
            raise errors.StreamAlreadyOpen(f"stream {sid} is already open", stream=sid)
        if len(self.streams) >= self.limits.max_streams:
            raise errors.TooManyStreams(
                f"at most {self.limits.max_streams} streams per session", stream=sid
            )
        if self.allows is not None and not self.allows(msg.model):
            raise errors.ModelForbidden(
                f"this session's key may not use model {msg.model!r}", stream=sid
            )
        model = self.repository.get(msg.model, msg.version)
        if model is None:
            if self.repository.has_name(msg.model):
                raise errors.UnknownVersion(
                    f"model {msg.model} has no version {msg.version}", stream=sid
                )
            raise errors.UnknownModel(f"no model named {msg.model!r}", stream=sid)
        if msg.kind != model.kind:
            raise errors.KindMismatch(
                f"{model.key} takes {model.kind} streams, not {msg.kind}", stream=sid
            )
        dtype = np.dtype(msg.dtype)
        if model.kind == "audio":
            if msg.dtype not in AUDIO_DTYPES:
                raise errors.DtypeMismatch(
                    f"audio chunks must be one of {', '.join(AUDIO_DTYPES)}", stream=sid
                )
            rate = msg.sample_rate or model.sample_rate or 0
            if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
                raise errors.UnsupportedSampleRate(
                    f"audio streams take {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz, not {rate}",
                    stream=sid,
                )
            if msg.shape is not None and len(msg.shape) != 1:
                raise errors.ShapeMismatch(
                    "audio chunks are 1-D: mono samples, any number", stream=sid
                )
        else:
            if dtype != model.input.dtype:
                raise errors.DtypeMismatch(
                    f"{model.key} takes {model.input.dtype.name}, not {msg.dtype}", stream=sid
                )
            if msg.shape is not None and msg.shape != model.item_shape:
                raise errors.ShapeMismatch(
                    f"{model.key} takes chunks shaped {list(model.item_shape)}, "
                    f"not {list(msg.shape)}",
                    stream=sid,
                )
        deadline = model.deadline_ms if msg.deadline_ms is None else msg.deadline_ms
        if not 0 < deadline <= 60_000:
            raise errors.BadMessage("deadline_ms must be in (0, 60000]", stream=sid)
        try:  # only what the post-processors read is kept, parsed: not the client's object
            options = events.stream_options(msg.options, model.postprocess)
        except events.ConfigError as e:
            raise errors.BadMessage(str(e), stream=sid) from None
        self.streams[sid] = Stream(
            session=self.id,
            id=sid,
            model=model,
            dtype=dtype,
            deadline_ms=deadline,
            results=msg.results,
            options=options,
            overflow=msg.overflow or ("reject" if model.kind == "tensor" else "drop_oldest"),
            state=[s.initial.copy() for s in model.states],
            rechunker=_rechunker(model, msg) if model.kind == "audio" else None,
            chain=[make(options) for make in model.postprocess],
            hop_ms=model.timebase.hop_ms,
            window_shape=_window_shape(model),
        )
        audio = model.kind == "audio"
        return Opened(
            sid,
            model.name,
            model.version,
            {
                "dtype": msg.dtype,
                "shape": list(model.chunk_shape),
                **(
                    {
                        "sample_rate": msg.sample_rate or model.sample_rate,
                        "model_sample_rate": model.sample_rate,
                        "chunk": model.chunk,
                        "context": model.context,
                    }
                    if audio
                    else {}
                ),
            },
            [
                {
                    "name": o.name,
                    "dtype": o.dtype.name,
                    "shape": [None, *o.shape[1:]] if audio else list(o.shape[1:]),
                }
                for o in model.outputs
            ],
            deadline,
            self.streams[sid].overflow,
        )

    def close_stream(self, msg: Close) -> list[Message]:
        """Stop accepting chunks on a stream; ``closed`` goes out once its results have."""
        self._require_open()
        stream = self.streams.get(msg.stream)
        if stream is None or stream.closing:
            raise errors.StreamNotOpen(f"stream {msg.stream} is not open", stream=msg.stream)
        stream.closing = True
        return self._maybe_closed(stream)

    def _maybe_closed(self, stream: Stream) -> list[Message]:
        if not stream.closing or stream.pending:
            return []
        stream.live = False
        del self.streams[stream.id]
        out: list[Message] = []
        if stream.chain and stream.last_end is not None:  # the end of the stream ends a segment
            out += self._events(stream, _NO_WINDOWS, {}, stream.last_end)
        out.append(Closed(stream.id, stream.results_sent, stream.errors_sent))
        return out

    def abandon(self, why: str) -> list[Message]:
        """Give every chunk still without an outcome a ``going_away`` error (a session handed to
        another server while a batch of it still runs here); the messages now due."""
        out: list[Message] = []
        for stream in list(self.streams.values()):
            for seq in stream.pending:
                if seq not in stream.done:
                    exc = errors.ShuttingDown(why, stream=stream.id, seq=seq)
                    stream.done[seq] = Ready(0.0, exc, None)
            out += self._release(stream)
            stream.audio_inflight = 0  # every chunk of it is answered now
        return out

    def refused(self, exc: errors.RealtimeError) -> None:
        """Note an error sent at once (a refusal) on the open stream it names, if any: a
        stream's ``closed`` counts every error that carried its id while it was open, and a
        refused chunk (the server shutting down, a bad frame) still counts as received, so a
        client that resumes the session does not send it again (its answer is replayed)."""
        stream = None if exc.stream is None else self.streams.get(exc.stream)
        if stream is not None:
            stream.errors_sent += 1
            if exc.seq is not None and exc.seq > stream.received:
                stream.received = exc.seq

    def disconnect(self) -> None:
        """The client is gone: its queued items are skipped and nothing more is sent."""
        for stream in self.streams.values():
            stream.live = False
        self.streams.clear()
        self.inflight = 0

    # --- chunks -----------------------------------------------------------------------------

    def accept(
        self,
        chunk: Chunk,
        now: float,
        make_room: Callable[[Stream], bool] | None = None,
        age: float = 0.0,
    ) -> list[WorkItem]:
        """Check a chunk against its stream and build its model inputs; raise if it is refused.

        A tensor or video chunk is one item. An audio chunk is one item per model window it
        completed, possibly none: then its (empty) result is due at once, see :meth:`release`.
        When the stream or the session has its limit of chunks in flight, a ``drop_oldest``
        stream calls ``make_room`` (the scheduler drops its oldest queued chunk, which gets a
        ``dropped`` error) and the new chunk is accepted; otherwise it is refused (``overloaded``).

        ``age`` is how long (seconds) before ``now`` the loop read the chunk's bytes: its
        deadline counts from then, and a chunk already past it is refused
        (``deadline_exceeded``) before any work. An audio chunk refused here keeps its place
        in the stream's timeline and media clock: a gap, not a shift.
        """
        if self.phase is not Phase.OPEN:
            raise errors.HelloRequired("send hello before anything else")
        sid, seq = chunk.stream, chunk.seq
        stream = self.streams.get(sid)
        if stream is None or stream.closing:
            raise errors.StreamNotOpen(f"stream {sid} is not open", stream=sid, seq=seq)
        if seq > stream.received:
            stream.received = seq
        if seq <= stream.last_seq:
            raise errors.BadSequence(
                f"seq {seq} after {stream.last_seq}: sequence numbers must increase",
                stream=sid,
                seq=seq,
            )
        data = chunk.data
        if data.dtype != stream.dtype:
            raise errors.DtypeMismatch(
                f"stream {sid} was opened with {stream.dtype.name}, chunk is {data.dtype.name}",
                stream=sid,
                seq=seq,
            )
        model = stream.model
        if (
            data.ndim != 1
            if stream.rechunker is not None  # audio: any number of samples
            else data.shape != model.item_shape
        ):
            raise errors.ShapeMismatch(
                f"chunk shaped {list(data.shape)}, {model.key} takes {list(model.chunk_shape)}",
                stream=sid,
                seq=seq,
            )
        if data.dtype.kind == "f" and not math.isfinite(data.sum(dtype=np.float64)):
            raise errors.NonFiniteInput("chunk holds NaN or infinity", stream=sid, seq=seq)
        limits = self.limits
        end = bool(chunk.flags & FLAG_END_OF_SEGMENT)
        rechunker = stream.rechunker
        decoded, per_stream, media = 0, 0, 0.0
        if rechunker is not None:
            decoded, per_stream = self._check_audio(stream, data.shape[0], seq)
            # The stream's media clock counts every chunk sent, run or refused.
            media = stream.media_ms = stream.media_ms + 1000.0 * data.shape[0] / rechunker.in_rate
            lead = (now - age) * 1000.0 - media
            if lead < stream.clock_min:
                stream.clock_min = lead
        try:
            if age >= 0.001 and age * 1000.0 >= (chunk.deadline_ms or stream.deadline_ms):
                if rechunker is not None:  # live audio: an answer, and a late one
                    clock = stream.clock_min
                    if stream.clock_prev < clock:
                        clock = stream.clock_prev
                    stream.answered += 1
                    stream.late += 1
                    stream.lateness_ms += now * 1000.0 - media - clock
                raise errors.DeadlineExceeded(
                    f"the chunk was {1000 * age:.0f} ms old when the server got to it, "
                    "past its deadline: not run",
                    stream=sid,
                    seq=seq,
                )
            if decoded:
                self._check_audio_room(stream, decoded, per_stream, seq)
            # Chunks whose outcome is known but waits for an earlier one's do not count:
            # dropped chunks wait so behind a running batch (a burst read at once can drop many
            # while one batch runs); the session's bound on chunks in flight still holds them.
            in_stream = len(stream.pending) - len(stream.done)
            if (
                in_stream >= limits.max_inflight_per_stream
                or self.inflight >= limits.max_inflight_per_session
            ) and not (
                stream.overflow == "drop_oldest"
                and self.inflight < limits.max_inflight_per_session
                and make_room is not None
                and make_room(stream)
            ):
                where = (
                    f"stream {sid} has {in_stream}"
                    if in_stream >= limits.max_inflight_per_stream
                    else f"session has {self.inflight}"
                )
                raise errors.Overloaded(
                    f"{where} chunks in flight; wait for results",
                    stream=sid,
                    seq=seq,
                    reason="inflight",
                )
        except errors.ServingError:
            if rechunker is not None:  # its audio keeps its place: a gap, not a shift
                rechunker.push(data, chunk.t, end)
            raise
        stream.last_seq = seq
        stream.pending.append(seq)
        self.inflight += 1
        received = now - age
        deadline = received + (chunk.deadline_ms or stream.deadline_ms) / 1000.0
        if rechunker is None:
            return [WorkItem(stream, seq, chunk.t, data, received, deadline, end)]
        windows = rechunker.push(data, chunk.t, end)
        k = len(windows.data)
        stream.audio_inflight += len(windows.t) * rechunker.chunk
        gather = Gather(seq, chunk.t, windows.t, windows.segment_end, [None] * k, k, media)
        if k == 0:
            stream.done[seq] = Ready(chunk.t, _stack(stream, []), windows.t, windows.segment_end)
            return []
        shape = stream.window_shape
        end_at = k - 1 if end else -1
        return [
            WorkItem(
                stream,
                seq,
                float(windows.t[i]),
                w if shape is None else w.reshape(shape),
                received,
                deadline,
                i == end_at,
                gather,
                i,
            )
            for i, w in enumerate(windows.data)
        ]

    def _check_audio(self, stream: Stream, n: int, seq: int) -> tuple[int, int]:
        """Refuse an audio chunk of ``n`` client samples that would bring more model-rate
        audio than one chunk may hold (``message_too_big``), from its length alone, before any
        of it is decoded; the model-rate samples it brings, and those the stream's chunks in
        flight may hold."""
        rechunker = stream.rechunker
        assert rechunker is not None
        decoded = rechunker.decoded(n)
        rate, limits = rechunker.out_rate, self.limits
        per_chunk = max(round(limits.max_audio_chunk_seconds * rate), 2 * rechunker.window)
        if decoded > per_chunk:
            raise errors.MessageTooBig(
                f"{n} samples at {rechunker.in_rate} Hz are {decoded / rate:.1f} s at the "
                f"model's {rate} Hz; a chunk may bring at most {per_chunk / rate:.1f} s",
                stream=stream.id,
                seq=seq,
            )
        return decoded, max(round(limits.max_audio_inflight_seconds * rate), per_chunk)

    def _check_audio_room(self, stream: Stream, decoded: int, per_stream: int, seq: int) -> None:
        """Refuse (``overloaded``) an audio chunk bringing ``decoded`` model-rate samples that
        its stream's chunks in flight (at most ``per_stream``) have no room for."""
        if stream.audio_inflight + decoded > per_stream:
            rate = stream.rechunker.out_rate if stream.rechunker is not None else 1
            raise errors.Overloaded(
                f"stream {stream.id} has {stream.audio_inflight / rate:.1f} s of audio in "
                f"flight, at most {per_stream / rate:.1f} s; wait for results",
                stream=stream.id,
                seq=seq,
                reason="inflight",
            )

    # --- outcomes ---------------------------------------------------------------------------

    def complete(self, item: WorkItem, outcome: Outcome) -> list[Message]:
        """Record an item's outcome; return the messages now due, in stream order."""
        stream = item.stream
        if not stream.live:
            return []
        gather = item.gather
        if gather is None:
            end = item.t if item.end_of_segment else None
            stream.done[item.seq] = Ready(item.t, outcome, None, end)
        else:
            gather.outcomes[item.window] = outcome
            gather.left -= 1
            if gather.left:
                return []
            stream.done[gather.seq] = Ready(
                gather.t, _merge(stream, gather.outcomes), gather.window_t, gather.segment_end
            )
        return self._release(stream)

    def release(self, stream_id: int) -> list[Message]:
        """The messages of a stream now due (after an audio chunk that completed no window)."""
        stream = self.streams.get(stream_id)
        return [] if stream is None or not stream.live else self._release(stream)

    @staticmethod
    def _events(
        stream: Stream,
        times: np.ndarray[Any, Any],
        outputs: dict[str, np.ndarray[Any, Any]],
        segment_end: float | None,
    ) -> list[Message]:
        """Feed released windows through the stream's post-processors; their events."""
        if len(times):
            stream.last_end = float(times[-1]) + stream.hop_ms
        if segment_end is not None:
            stream.last_end = segment_end
        batch = events.Batch(times, outputs, [], segment_end)
        return [
            Event(stream.id, e.event, e.t, e.data) for e in events.run_chain(stream.chain, batch)
        ]

    def _release(self, stream: Stream) -> list[Message]:
        out: list[Message] = []
        pending, done = stream.pending, stream.done
        while pending and pending[0] in done:
            seq = pending.popleft()
            self.inflight -= 1
            entry = done.pop(seq)
            if entry.windows is not None and stream.rechunker is not None:
                stream.audio_inflight -= len(entry.windows) * stream.rechunker.chunk
            ready = entry.outcome
            if isinstance(ready, Prediction):
                stream.results_sent += 1
                outputs = dict(zip(stream.model.output_names, ready.outputs, strict=True))
                out.append(
                    Result(
                        stream.id,
                        seq,
                        entry.t,
                        outputs,
                        Timing(ready.queue_ms, ready.infer_ms, ready.batch),
                        entry.windows,
                    )
                )
                if stream.chain:
                    times = np.array([entry.t]) if entry.windows is None else entry.windows
                    out += self._events(stream, times, outputs, entry.segment_end)
            else:
                stream.errors_sent += 1
                out.append(Error.of(ready))
                if stream.chain and entry.segment_end is not None:
                    out += self._events(stream, _NO_WINDOWS, {}, entry.segment_end)
        out.extend(self._maybe_closed(stream))
        return out


_NO_WINDOWS: np.ndarray[Any, Any] = np.empty(0, np.float64)


def _window_shape(model: Model) -> tuple[int, ...] | None:
    """The shape an audio window is given before it is batched (None: it has it already)."""
    if model.kind != "audio" or len(model.item_shape) == 1:
        return None
    return tuple(-1 if d is None else d for d in model.item_shape)


def _rechunker(model: Model, msg: Open) -> Rechunker:
    """The re-chunker of a new audio stream (the model's rate and chunk are set for audio)."""
    assert model.sample_rate is not None and model.chunk is not None
    return Rechunker(
        msg.sample_rate or model.sample_rate,
        msg.dtype,
        model.sample_rate,
        model.chunk,
        model.context,
        model.input.dtype,
    )


def _stack(stream: Stream, predictions: list[Prediction]) -> Prediction:
    """One audio chunk's outcome: its windows' outputs stacked on a new leading axis."""
    if not predictions:
        return Prediction(
            [np.empty((0, *(d or 0 for d in o.shape[1:])), o.dtype) for o in stream.model.outputs],
            0.0,
            0.0,
            0,
        )
    if len(predictions) == 1:  # the common case: a view with a window axis, no copy
        (p,) = predictions
        return Prediction([a[np.newaxis] for a in p.outputs], p.queue_ms, p.infer_ms, p.batch)
    return Prediction(
        [np.stack(arrays) for arrays in zip(*(p.outputs for p in predictions), strict=True)],
        max(p.queue_ms for p in predictions),
        sum(p.infer_ms for p in predictions),
        max(p.batch for p in predictions),
    )


def _merge(stream: Stream, outcomes: list[Outcome | None]) -> Outcome:
    """A chunk's one outcome from its windows': the first error if any window failed."""
    predictions: list[Prediction] = []
    for o in outcomes:
        if not isinstance(o, Prediction):
            assert o is not None
            return o
        predictions.append(o)
    return _stack(stream, predictions)
