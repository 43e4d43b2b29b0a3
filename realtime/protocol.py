"""Wire protocol v1: bytes and text in, typed messages out, and back. No I/O.

Text frames are JSON control messages; binary frames carry array chunks (client to server) and
array results (server to client) behind a fixed 32-byte little-endian header. ``docs/protocol.md``
is the contract; this module is its only implementation on the Python side. Every malformed input
raises a :class:`realtime.errors.ProtocolError` leaf and nothing else.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias

import numpy as np
import orjson
from mypy_extensions import mypyc_attr

from realtime.errors import BadFrame, BadMessage, Overloaded, RealtimeError, UnsupportedVersion

PROTOCOL_VERSION: Final = 1

# --- Binary frames -------------------------------------------------------------------------

#: version, type, dtype, ndim, stream, seq, flags, index, count, t, extra0, extra1
HEADER: Final = struct.Struct("<BBBBIIHBBdII")
HEADER_SIZE: Final = HEADER.size  # 32
MAX_NDIM: Final = 8
FRAME_CHUNK: Final = 1
FRAME_RESULT: Final = 2
#: Chunk flag: the client marks the end of a segment (an utterance, a phrase) with this chunk.
FLAG_END_OF_SEGMENT: Final = 1
_U32_MAX: Final = 2**32 - 1
#: Items an array's non-zero dims may multiply to. A dim of 0 makes a frame's payload empty
#: whatever the others are, so the length check alone would pass dims that overflow numpy.
MAX_ITEMS: Final = 2**32
_IDS: Final = struct.Struct("<II")  # stream and seq, at offset 4 of the header

#: Wire dtype codes. Stable: a code is never reused for another dtype.
DTYPE_CODES: Final[dict[str, int]] = {
    "float32": 1,
    "float16": 2,
    "float64": 3,
    "int8": 4,
    "uint8": 5,
    "int16": 6,
    "uint16": 7,
    "int32": 8,
    "int64": 9,
    "bool": 10,
}
_DTYPE_NAMES: Final[dict[np.dtype[Any], str]] = {np.dtype(n): n for n in DTYPE_CODES}
_DTYPES: Final[dict[int, np.dtype[Any]]] = {
    code: np.dtype(name).newbyteorder("<") for name, code in DTYPE_CODES.items()
}
_DIMS: Final[list[struct.Struct]] = [struct.Struct(f"<{n}I") for n in range(MAX_NDIM + 1)]


def _dims_size(ndim: int) -> int:
    """Bytes taken by ``ndim`` u32 dims, padded so the payload starts 8-byte aligned."""
    return (4 * ndim + 7) & ~7


# Built per chunk: its own __init__, which mypyc compiles (see setup.py).
@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(slots=True, eq=False, init=False)
class Chunk:
    """One array of a stream, client to server. ``data`` is a read-only view of the frame."""

    stream: int
    seq: int
    t: float
    data: np.ndarray[Any, Any]
    deadline_ms: int
    flags: int

    def __init__(
        self,
        stream: int,
        seq: int,
        t: float,
        data: np.ndarray[Any, Any],
        deadline_ms: int = 0,
        flags: int = 0,
    ) -> None:
        self.stream = stream
        self.seq = seq
        self.t = t
        self.data = data
        self.deadline_ms = deadline_ms
        self.flags = flags

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Chunk) and _frame_key(self) == _frame_key(other)


@dataclass(frozen=True, slots=True, eq=False)
class ResultFrame:
    """One output array of one chunk's result, server to client (binary result mode)."""

    stream: int
    seq: int
    t: float
    data: np.ndarray[Any, Any]
    index: int = 0
    count: int = 1
    queue_us: int = 0
    infer_us: int = 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ResultFrame) and _frame_key(self) == _frame_key(other)


def _frame_key(f: Chunk | ResultFrame) -> tuple[Any, ...]:
    """What makes two frames equal: every field, arrays compared by dtype, shape and bytes."""
    fields = tuple(getattr(f, x.name) for x in dataclasses.fields(f) if x.name != "data")
    return (*fields, f.data.dtype.str, f.data.shape, f.data.tobytes())


def encode_frame(frame: Chunk | ResultFrame) -> bytes:
    """Serialize a chunk or a result frame to the bytes of one binary WebSocket message."""
    data = frame.data
    code = DTYPE_CODES.get(_DTYPE_NAMES.get(data.dtype) or data.dtype.name)
    if code is None:
        raise BadFrame(f"dtype {data.dtype} has no wire code", stream=frame.stream, seq=frame.seq)
    if data.ndim > MAX_NDIM:
        raise BadFrame(f"{data.ndim} dims, at most {MAX_NDIM}", stream=frame.stream, seq=frame.seq)
    if data.dtype.byteorder == ">":
        data = data.astype(data.dtype.newbyteorder("<"))
    if isinstance(frame, Chunk):
        kind, flags, index, count = FRAME_CHUNK, frame.flags, 0, 0
        extra0, extra1 = frame.deadline_ms, 0
    else:
        kind, flags, index, count = FRAME_RESULT, 0, frame.index, frame.count
        extra0, extra1 = min(frame.queue_us, _U32_MAX), min(frame.infer_us, _U32_MAX)
    header = HEADER.pack(
        PROTOCOL_VERSION,
        kind,
        code,
        data.ndim,
        frame.stream,
        frame.seq,
        flags,
        index,
        count,
        frame.t,
        extra0,
        extra1,
    )
    dims = _DIMS[data.ndim].pack(*data.shape).ljust(_dims_size(data.ndim), b"\0")
    return b"".join((header, dims, np.ascontiguousarray(data).data))


def decode_frame(buf: bytes | bytearray | memoryview) -> Chunk | ResultFrame:
    """Parse one binary message; the array is a zero-copy view of ``buf``. Any malformed frame
    raises :class:`BadFrame`, with the stream and seq when the header got that far."""
    if len(buf) < HEADER_SIZE:
        stream = seq = None
        if len(buf) >= 12:
            stream, seq = _IDS.unpack_from(buf, 4)
        raise BadFrame(
            f"binary frame of {len(buf)} bytes is shorter than the 32-byte header",
            stream=stream,
            seq=seq,
        )
    (version, kind, code, ndim, stream, seq, flags, index, count, t, extra0, extra1) = (
        HEADER.unpack_from(buf)
    )
    if version != PROTOCOL_VERSION:
        raise BadFrame(
            f"frame version {version}, this server speaks {PROTOCOL_VERSION}",
            stream=stream,
            seq=seq,
        )
    dtype = _DTYPES.get(code)
    if dtype is None:
        raise BadFrame(f"unknown dtype code {code}", stream=stream, seq=seq)
    if ndim > MAX_NDIM:
        raise BadFrame(f"{ndim} dims, at most {MAX_NDIM}", stream=stream, seq=seq)
    offset = HEADER_SIZE + _dims_size(ndim)
    if len(buf) < offset:
        raise BadFrame("frame ends inside its dims", stream=stream, seq=seq)
    shape = _DIMS[ndim].unpack_from(buf, HEADER_SIZE)
    count_items = math.prod(shape)
    if (count_items or math.prod(d or 1 for d in shape)) > MAX_ITEMS:
        raise BadFrame(
            f"shape {list(shape)} has more than {MAX_ITEMS} items", stream=stream, seq=seq
        )
    if len(buf) - offset != count_items * dtype.itemsize:
        raise BadFrame(
            f"payload of {len(buf) - offset} bytes, shape {list(shape)} of {dtype.name} "
            f"needs {count_items * dtype.itemsize}",
            stream=stream,
            seq=seq,
        )
    if not math.isfinite(t):
        raise BadFrame("timestamp is not finite", stream=stream, seq=seq)
    if kind != FRAME_CHUNK and kind != FRAME_RESULT:
        raise BadFrame(f"unknown frame type {kind}", stream=stream, seq=seq)
    # The payload as a view (its length was checked above); 1-D (audio) needs no reshape.
    data = np.frombuffer(buf, dtype, count_items, offset)
    if ndim != 1:
        data = data.reshape(shape)
    if kind == FRAME_CHUNK:
        return Chunk(stream, seq, t, data, extra0, flags)
    return ResultFrame(stream, seq, t, data, index, count, extra0, extra1)


# --- Text messages -------------------------------------------------------------------------

Kind: TypeAlias = Literal["audio", "video", "tensor"]
ResultMode: TypeAlias = Literal["json", "binary"]
#: What a stream does when its client sends faster than it is served: drop its oldest queued
#: chunk (live media: a newer frame is worth more) or refuse the new one (tensors that must
#: not be lost). Both with a typed error for the chunk concerned.
Overflow: TypeAlias = Literal["drop_oldest", "reject"]
KINDS: Final = ("audio", "video", "tensor")
RESULT_MODES: Final = ("json", "binary")
OVERFLOWS: Final = ("drop_oldest", "reject")
_MAX_ID: Final = _U32_MAX


@dataclass(frozen=True, slots=True)
class Hello:
    """Client opens its session: the protocol version it speaks and who it is; or takes back a
    session it lost (``resume``: the session's resume token, ``received``: how many messages of
    it the client got after its first welcome)."""

    protocol: int = PROTOCOL_VERSION
    client: str = ""
    resume: str | None = None
    received: int = 0


@dataclass(frozen=True, slots=True)
class Welcome:
    """Server accepts the session: its id, the limits it enforces and the model catalog."""

    session: str
    server: str
    limits: dict[str, Any]
    models: list[dict[str, Any]]
    protocol: int = PROTOCOL_VERSION
    #: Give it back in ``hello.resume`` to take this session back after a lost connection.
    resume_token: str | None = None
    #: On a resume: ``streams``, the session's open streams (``{"stream", "received",
    #: "closing"}`` each, ``received`` the last seq the server got: send later chunks again), and
    #: ``from``, the count of messages since the first welcome that the replay follows.
    resumed: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Open:
    """Client opens a stream bound to a model; chunks then flow on its stream id."""

    stream: int
    model: str
    kind: Kind
    dtype: str
    version: str | None = None
    shape: tuple[int, ...] | None = None
    sample_rate: int | None = None
    deadline_ms: float | None = None
    results: ResultMode = "json"
    options: dict[str, Any] = field(default_factory=dict)
    overflow: Overflow | None = None


@dataclass(frozen=True, slots=True)
class Opened:
    """Server confirms a stream: the model version it is bound to and what chunks must be."""

    stream: int
    model: str
    version: str
    input: dict[str, Any]
    outputs: list[dict[str, Any]]
    deadline_ms: float
    overflow: Overflow = "reject"


@dataclass(frozen=True, slots=True)
class Close:
    """Client closes a stream; results of chunks already sent still arrive, then ``closed``."""

    stream: int


@dataclass(frozen=True, slots=True)
class Closed:
    """Server confirms that a stream is closed and every result of it has been sent."""

    stream: int
    results: int
    errors: int


@dataclass(frozen=True, slots=True)
class Ping:
    """Client asks for a pong, to measure round trip and clock offset."""

    id: int
    t: float = 0.0


@dataclass(frozen=True, slots=True)
class Pong:
    """Server answers a ping with the client's time echoed and its own clock (ms)."""

    id: int
    t: float
    server_time: float


@dataclass(frozen=True, slots=True)
class GoingAway:
    """Server is shutting down: it answers what it accepted, refuses new chunks, then closes."""

    reason: str
    drain_ms: float
    resume_token: str | None = None


# Built per chunk: its own __init__, which mypyc compiles (see setup.py).
@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(slots=True, init=False)
class Timing:
    """Where a result's time went on the server, in milliseconds."""

    queue_ms: float
    infer_ms: float
    batch: int

    def __init__(self, queue_ms: float, infer_ms: float, batch: int) -> None:
        self.queue_ms = queue_ms
        self.infer_ms = infer_ms
        self.batch = batch


# Built per chunk: its own __init__, which mypyc compiles (see setup.py).
@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(slots=True, eq=False, init=False)
class Result:
    """The model outputs for one chunk, in stream order.

    For audio streams each output has a leading axis of the model windows the chunk completed
    (possibly none), and ``windows`` holds each window's time in the client's timeline (ms).
    """

    stream: int
    seq: int
    t: float
    outputs: dict[str, np.ndarray[Any, Any]]
    timing: Timing
    windows: np.ndarray[Any, Any] | None

    def __init__(
        self,
        stream: int,
        seq: int,
        t: float,
        outputs: dict[str, np.ndarray[Any, Any]],
        timing: Timing,
        windows: np.ndarray[Any, Any] | None = None,
    ) -> None:
        self.stream = stream
        self.seq = seq
        self.t = t
        self.outputs = outputs
        self.timing = timing
        self.windows = windows

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Result):
            return False
        mine = {k: (v.dtype.name, v.shape, v.tobytes()) for k, v in self.outputs.items()}
        theirs = {k: (v.dtype.name, v.shape, v.tobytes()) for k, v in other.outputs.items()}
        windows = None if self.windows is None else self.windows.tolist()
        other_windows = None if other.windows is None else other.windows.tolist()
        return (self.stream, self.seq, self.t, self.timing, mine, windows) == (
            other.stream,
            other.seq,
            other.t,
            other.timing,
            theirs,
            other_windows,
        )


# Built per chunk: its own __init__, which mypyc compiles (see setup.py).
@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(slots=True, init=False)
class Event:
    """Something that happened in a stream (speech_start, note_on, ...), at client time ``t``."""

    stream: int
    event: str
    t: float
    data: dict[str, Any]

    def __init__(
        self, stream: int, event: str, t: float, data: dict[str, Any] | None = None
    ) -> None:
        self.stream = stream
        self.event = event
        self.t = t
        self.data = {} if data is None else data


@dataclass(frozen=True, slots=True)
class Error:
    """A typed error: a stable code, a message for people, and what it refers to."""

    code: str
    message: str
    stream: int | None = None
    seq: int | None = None
    retryable: bool = False
    #: When to try again (``server_busy``).
    retry_after_ms: float | None = None
    #: ``overloaded`` only: ``inflight`` or ``queue`` (see :class:`realtime.errors.Overloaded`).
    reason: str | None = None

    @classmethod
    def of(cls, exc: RealtimeError) -> Error:
        """The wire form of an error from the error tree."""
        retry = getattr(exc, "retry_after_ms", None)
        reason = exc.reason if isinstance(exc, Overloaded) else None
        return cls(exc.code, exc.message, exc.stream, exc.seq, exc.retryable, retry, reason)


Message: TypeAlias = (
    Hello
    | Welcome
    | Open
    | Opened
    | Close
    | Closed
    | Ping
    | Pong
    | Result
    | Event
    | Error
    | GoingAway
)
CLIENT_MESSAGES: Final = (Hello, Open, Close, Ping)


def _obj(d: dict[str, Any], key: str) -> Any:
    try:
        return d[key]
    except KeyError:
        raise BadMessage(f"{d.get('type')!s}: missing field {key!r}") from None


def _int(d: dict[str, Any], key: str, lo: int = 0, hi: int = _MAX_ID) -> int:
    v = _obj(d, key)
    if type(v) is not int or not lo <= v <= hi:
        raise BadMessage(f"{d['type']}.{key} must be an integer in [{lo}, {hi}]")
    return v


def _num(d: dict[str, Any], key: str, default: float | None = None) -> float:
    v = d.get(key, default)
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
        raise BadMessage(f"{d['type']}.{key} must be a finite number")
    return float(v)


def _str(d: dict[str, Any], key: str, default: str | None = None, max_len: int = 256) -> str:
    v = d.get(key, default)
    if not isinstance(v, str) or len(v) > max_len:
        raise BadMessage(f"{d['type']}.{key} must be a string of at most {max_len} characters")
    return v


def _opt_str(d: dict[str, Any], key: str) -> str | None:
    return None if d.get(key) is None else _str(d, key)


def _choice(
    d: dict[str, Any], key: str, choices: tuple[str, ...], default: str | None = None
) -> Any:
    v = d.get(key, default)
    if v not in choices:
        raise BadMessage(f"{d['type']}.{key} must be one of {', '.join(choices)}")
    return v


def _dict(d: dict[str, Any], key: str) -> dict[str, Any]:
    v = d.get(key, {})
    if not isinstance(v, dict):
        raise BadMessage(f"{d['type']}.{key} must be an object")
    return v


def _shape(d: dict[str, Any]) -> tuple[int, ...] | None:
    v = d.get("shape")
    if v is None:
        return None
    if (
        not isinstance(v, list)
        or len(v) > MAX_NDIM
        or not all(type(n) is int and 0 <= n <= _MAX_ID for n in v)
    ):
        raise BadMessage(f"{d['type']}.shape must be a list of at most {MAX_NDIM} sizes")
    return tuple(v)


def _array(name: str, v: Any) -> np.ndarray[Any, Any]:
    if not isinstance(v, dict):
        raise BadMessage(f"result output {name!r} must be an object")
    dtype = v.get("dtype")
    if dtype not in DTYPE_CODES:
        raise BadMessage(f"result output {name!r} has unknown dtype {dtype!r}")
    shape = _shape({"type": "result", "shape": v.get("shape")}) or ()
    data = v.get("data")
    if not isinstance(data, list) or len(data) != math.prod(shape):
        raise BadMessage(f"result output {name!r} data does not match its shape")
    try:
        return np.array(data, dtype=dtype).reshape(shape)
    except (TypeError, ValueError, OverflowError) as e:
        raise BadMessage(f"result output {name!r}: {e}") from None


def _parse(d: dict[str, Any]) -> Message:
    kind = d.get("type")
    if kind == "hello":
        version = _int(d, "protocol", 0)
        if version != PROTOCOL_VERSION:
            raise UnsupportedVersion(
                f"client speaks protocol {version}, this server speaks {PROTOCOL_VERSION}"
            )
        token = _opt_str(d, "resume")
        return Hello(
            version,
            _str(d, "client", ""),
            token,
            0 if token is None else _int(d, "received", 0, 2**53),
        )
    if kind == "open":
        sample_rate = d.get("sample_rate")
        deadline = d.get("deadline_ms")
        return Open(
            stream=_int(d, "stream"),
            model=_str(d, "model"),
            kind=_choice(d, "kind", KINDS),
            dtype=_choice(d, "dtype", tuple(DTYPE_CODES)),
            version=_opt_str(d, "version"),
            shape=_shape(d),
            sample_rate=None if sample_rate is None else _int(d, "sample_rate", 1, 1_000_000),
            deadline_ms=None if deadline is None else _num(d, "deadline_ms"),
            results=_choice(d, "results", RESULT_MODES, "json"),
            options=_dict(d, "options"),
            overflow=None if d.get("overflow") is None else _choice(d, "overflow", OVERFLOWS),
        )
    if kind == "close":
        return Close(_int(d, "stream"))
    if kind == "ping":
        return Ping(_int(d, "id"), _num(d, "t", 0.0))
    if kind == "welcome":
        models = _obj(d, "models")
        if not isinstance(models, list):
            raise BadMessage("welcome.models must be a list")
        resumed = d.get("resumed")
        if resumed is not None and not isinstance(resumed, dict):
            raise BadMessage("welcome.resumed must be an object")
        return Welcome(
            _str(d, "session"),
            _str(d, "server"),
            _dict(d, "limits"),
            models,
            _int(d, "protocol"),
            _opt_str(d, "resume_token"),
            resumed,
        )
    if kind == "opened":
        outputs = _obj(d, "outputs")
        if not isinstance(outputs, list):
            raise BadMessage("opened.outputs must be a list")
        return Opened(
            _int(d, "stream"),
            _str(d, "model"),
            _str(d, "version"),
            _dict(d, "input"),
            outputs,
            _num(d, "deadline_ms"),
            _choice(d, "overflow", OVERFLOWS, "reject"),
        )
    if kind == "closed":
        return Closed(_int(d, "stream"), _int(d, "results"), _int(d, "errors"))
    if kind == "pong":
        return Pong(_int(d, "id"), _num(d, "t"), _num(d, "server_time"))
    if kind == "going_away":
        return GoingAway(_str(d, "reason", ""), _num(d, "drain_ms"), _opt_str(d, "resume_token"))
    if kind == "result":
        outputs = _dict(d, "outputs")
        timing = _dict(d, "timing")
        timing["type"] = "result.timing"
        windows = d.get("windows")
        if windows is not None and (
            not isinstance(windows, list)
            or not all(isinstance(w, int | float) and not isinstance(w, bool) for w in windows)
        ):
            raise BadMessage("result.windows must be a list of numbers")
        return Result(
            _int(d, "stream"),
            _int(d, "seq"),
            _num(d, "t"),
            {name: _array(name, v) for name, v in outputs.items()},
            Timing(_num(timing, "queue_ms"), _num(timing, "infer_ms"), _int(timing, "batch")),
            None if windows is None else np.array(windows, np.float64),
        )
    if kind == "event":
        data = {k: v for k, v in d.items() if k not in ("type", "stream", "event", "t")}
        return Event(_int(d, "stream"), _str(d, "event"), _num(d, "t"), data)
    if kind == "error":
        stream, seq, retryable = d.get("stream"), d.get("seq"), d.get("retryable", False)
        if not isinstance(retryable, bool):
            raise BadMessage("error.retryable must be a boolean")
        return Error(
            _str(d, "code"),
            _str(d, "message", max_len=4096),
            None if stream is None else _int(d, "stream"),
            None if seq is None else _int(d, "seq"),
            retryable,
            None if d.get("retry_after_ms") is None else _num(d, "retry_after_ms"),
            _opt_str(d, "reason"),
        )
    raise BadMessage(f"unknown message type {kind!r}")


def decode_text(text: str | bytes) -> Message:
    """Parse one text frame into a typed message."""
    try:
        d = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise BadMessage(f"invalid JSON: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("type"), str):
        raise BadMessage('a text frame must be a JSON object with a string "type"')
    return _parse(d)


def _wire_array(a: np.ndarray[Any, Any]) -> dict[str, Any]:
    name = _DTYPE_NAMES.get(a.dtype) or a.dtype.name  # ``dtype.name`` is slow: ~3 us a call
    return {"dtype": name, "shape": a.shape, "data": a.ravel()}  # ravel: contiguous, for orjson


def _as_dict(msg: Message) -> dict[str, Any]:
    d: dict[str, Any]
    # The per-chunk messages first: a result, its events, an error.
    if type(msg) is Result:
        d = {
            "type": "result",
            "stream": msg.stream,
            "seq": msg.seq,
            "t": msg.t,
            "outputs": {name: _wire_array(a) for name, a in msg.outputs.items()},
            "timing": {
                "queue_ms": msg.timing.queue_ms,
                "infer_ms": msg.timing.infer_ms,
                "batch": msg.timing.batch,
            },
        }
        if msg.windows is not None:
            d["windows"] = msg.windows
        return d
    if type(msg) is Event:
        return {**msg.data, "type": "event", "stream": msg.stream, "event": msg.event, "t": msg.t}
    if type(msg) is Error:
        d = {"type": "error", "code": msg.code, "message": msg.message, "retryable": msg.retryable}
        if msg.stream is not None:
            d["stream"] = msg.stream
        if msg.seq is not None:
            d["seq"] = msg.seq
        if msg.retry_after_ms is not None:
            d["retry_after_ms"] = msg.retry_after_ms
        if msg.reason is not None:
            d["reason"] = msg.reason
        return d
    if isinstance(msg, Hello):
        d = {"type": "hello", "protocol": msg.protocol, "client": msg.client}
        if msg.resume is not None:
            d["resume"] = msg.resume
            d["received"] = msg.received
        return d
    if isinstance(msg, Welcome):
        d = {
            "type": "welcome",
            "protocol": msg.protocol,
            "session": msg.session,
            "server": msg.server,
            "limits": msg.limits,
            "models": msg.models,
        }
        if msg.resume_token is not None:
            d["resume_token"] = msg.resume_token
        if msg.resumed is not None:
            d["resumed"] = msg.resumed
        return d
    if isinstance(msg, Open):
        d = {
            "type": "open",
            "stream": msg.stream,
            "model": msg.model,
            "kind": msg.kind,
            "dtype": msg.dtype,
            "results": msg.results,
            "options": msg.options,
        }
        for key in ("version", "shape", "sample_rate", "deadline_ms", "overflow"):
            if (v := getattr(msg, key)) is not None:
                d[key] = v
        return d
    if isinstance(msg, Opened):
        return {
            "type": "opened",
            "stream": msg.stream,
            "model": msg.model,
            "version": msg.version,
            "input": msg.input,
            "outputs": msg.outputs,
            "deadline_ms": msg.deadline_ms,
            "overflow": msg.overflow,
        }
    if isinstance(msg, Close):
        return {"type": "close", "stream": msg.stream}
    if isinstance(msg, Closed):
        return {
            "type": "closed",
            "stream": msg.stream,
            "results": msg.results,
            "errors": msg.errors,
        }
    if isinstance(msg, Ping):
        return {"type": "ping", "id": msg.id, "t": msg.t}
    if isinstance(msg, Pong):
        return {"type": "pong", "id": msg.id, "t": msg.t, "server_time": msg.server_time}
    if isinstance(msg, GoingAway):
        d = {"type": "going_away", "reason": msg.reason, "drain_ms": msg.drain_ms}
        if msg.resume_token is not None:
            d["resume_token"] = msg.resume_token
        return d
    raise TypeError(f"not a protocol message: {msg!r}")


def encode_text(msg: Message) -> bytes:
    """Serialize a message to the UTF-8 JSON of one text frame.

    Copied once to its own size: orjson (3.12+) returns its whole working buffer, at least
    4 KiB whatever the message's length. A session keeps its last frames to replay after a
    resume, so a 300-byte result cost 4 KiB for as long as it was kept (14x its size)."""
    encoded = orjson.dumps(_as_dict(msg), option=orjson.OPT_SERIALIZE_NUMPY)
    return b"".join((encoded, b""))  # of two items, one empty: a copy of the first


def result_frames(msg: Result) -> list[bytes]:
    """A result in binary mode: one frame per output, in the model's output order, then (audio
    streams) one float64 frame of the window times."""
    arrays = list(msg.outputs.values())
    if msg.windows is not None:
        arrays.append(msg.windows)
    count = len(arrays)
    queue_us = round(msg.timing.queue_ms * 1000)
    infer_us = round(msg.timing.infer_ms * 1000)
    return [
        encode_frame(ResultFrame(msg.stream, msg.seq, msg.t, a, i, count, queue_us, infer_us))
        for i, a in enumerate(arrays)
    ]
