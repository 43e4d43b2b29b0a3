"""The one error tree of `realtime`.

Every leaf has a stable snake_case ``code`` that goes on the wire in an ``error`` message (see
``docs/protocol.md``) and a ``retryable`` flag that tells a client whether sending the same thing
again later can succeed. Callers catch :class:`RealtimeError`; tests assert the leaf.
"""

from __future__ import annotations

from typing import ClassVar, Literal, TypeAlias


class RealtimeError(Exception):
    """Root of every error `realtime` raises on purpose; carries the wire code."""

    code: ClassVar[str] = "internal_error"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, stream: int | None = None, seq: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.stream = stream
        self.seq = seq


class InternalError(RealtimeError):
    """A bug or an unexpected failure inside the server; the session keeps working."""

    code = "internal_error"
    retryable = True


# --- The client sent something the protocol does not allow -----------------------------------


class ProtocolError(RealtimeError):
    """The client broke the wire protocol; the session stays usable."""

    code = "bad_message"


class BadMessage(ProtocolError):
    """A text frame that is not valid JSON or not a valid message of the protocol."""

    code = "bad_message"


class BadFrame(ProtocolError):
    """A binary frame whose header or payload does not follow the chunk layout."""

    code = "bad_frame"


class MessageTooBig(ProtocolError):
    """A frame larger than the server's ``max_message_bytes`` limit."""

    code = "message_too_big"


class UnsupportedVersion(ProtocolError):
    """The client asked for a protocol version this server does not speak."""

    code = "unsupported_version"


class HelloRequired(ProtocolError):
    """A message arrived before the ``hello`` that must open every session."""

    code = "hello_required"


class BadSequence(ProtocolError):
    """A chunk whose sequence number is not greater than the stream's previous one."""

    code = "bad_sequence"


# --- Streams and models --------------------------------------------------------------------


class StreamNotOpen(ProtocolError):
    """A chunk or close for a stream id that is not open on this session."""

    code = "stream_not_open"


class StreamAlreadyOpen(ProtocolError):
    """An open for a stream id that is already open on this session."""

    code = "stream_already_open"


class TooManyStreams(ProtocolError):
    """Opening one more stream would pass the per-session stream limit."""

    code = "too_many_streams"


class UnknownModel(ProtocolError):
    """The model name is not in the catalog."""

    code = "unknown_model"


class UnknownVersion(ProtocolError):
    """The model exists but not in the requested version."""

    code = "unknown_version"


class ModelForbidden(ProtocolError):
    """The session's API key or token does not allow this model."""

    code = "model_forbidden"


class KindMismatch(ProtocolError):
    """The stream's kind (audio, video, tensor) is not the model's."""

    code = "kind_mismatch"


class DtypeMismatch(ProtocolError):
    """A stream or chunk dtype the model cannot take."""

    code = "dtype_mismatch"


class ShapeMismatch(ProtocolError):
    """A stream or chunk shape that does not fit the model's input."""

    code = "shape_mismatch"


class UnsupportedSampleRate(ProtocolError):
    """An audio stream whose sample rate the model cannot take."""

    code = "unsupported_sample_rate"


class NonFiniteInput(ProtocolError):
    """A floating-point chunk holding NaN or infinity."""

    code = "non_finite_input"


class ResumeUnknown(ProtocolError):
    """A ``hello`` resuming a session this server does not hold (never issued here, already
    resumed, or issued to another credential): start a new session."""

    code = "resume_unknown"


class ResumeExpired(ProtocolError):
    """A ``hello`` resuming a session whose ``resume_seconds`` ran out: its streams are gone."""

    code = "resume_expired"


# --- The server could not serve an accepted chunk --------------------------------------------


class ServingError(RealtimeError):
    """An accepted chunk that got no prediction; sent in the chunk's place in the stream order."""

    code = "serving_error"
    retryable = True


class DeadlineExceeded(ServingError):
    """The chunk's deadline passed before it could run, so it was not run."""

    code = "deadline_exceeded"


#: Why a chunk was refused with ``overloaded`` (the error's ``reason`` on the wire).
OverloadReason: TypeAlias = Literal["inflight", "queue"]


class Overloaded(ServingError):
    """The chunk was refused for load; ``reason`` says whose: ``inflight`` (the stream or the
    session has its limit of chunks in flight: wait for results) or ``queue`` (the model's
    queue is full, or too long for the chunk's deadline: the server is busy)."""

    code = "overloaded"

    def __init__(
        self,
        message: str,
        *,
        stream: int | None = None,
        seq: int | None = None,
        reason: OverloadReason | None = None,
    ) -> None:
        super().__init__(message, stream=stream, seq=seq)
        self.reason: OverloadReason | None = reason


class ResultsDropped(ServingError):
    """The client reads too slowly: its oldest unsent results were dropped (the count is in the
    message); it is disconnected (4008) if it stays behind."""

    code = "results_dropped"


class Dropped(ServingError):
    """The chunk was dropped to make room for a newer one (live-media policy)."""

    code = "dropped"


class InferenceFailed(ServingError):
    """The model raised while running the batch that held this chunk."""

    code = "inference_failed"


class ShuttingDown(ServingError):
    """The server is shutting down and did not run this chunk."""

    code = "going_away"


class RateLimited(RealtimeError):
    """The session sends more messages or bytes a second than its limit: the server stops
    reading from it until it is back under (nothing it sent is lost; TCP slows it down). Sent
    at most once a second while it lasts."""

    code = "rate_limited"
    retryable = True


class ServerBusy(RealtimeError):
    """The server is at capacity and refuses a new session (or stream): try again after
    ``retry_after_ms``, or elsewhere. At the handshake it is an HTTP 503 with this code in its
    JSON body."""

    code = "server_busy"
    retryable = True

    def __init__(
        self,
        message: str,
        *,
        retry_after_ms: float,
        stream: int | None = None,
        seq: int | None = None,
    ) -> None:
        super().__init__(message, stream=stream, seq=seq)
        self.retry_after_ms = retry_after_ms


# --- Start-up (never on the wire) ---------------------------------------------------------


class ModelLoadError(RealtimeError):
    """A model folder, model.toml or model.onnx that cannot be loaded, naming the file."""

    code = "model_load_failed"


class ConfigError(RealtimeError):
    """A configuration value that makes no sense."""

    code = "bad_config"


def all_codes() -> dict[str, type[RealtimeError]]:
    """Every wire code with the class that owns it (a code belongs to exactly one class)."""
    codes: dict[str, type[RealtimeError]] = {}
    pending: list[type[RealtimeError]] = [RealtimeError]
    while pending:
        cls = pending.pop()
        codes.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return codes
