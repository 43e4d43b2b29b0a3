"""One client connection's protocol, without I/O: messages in, frames and work out.

A :class:`Connection` is fed what arrives on a WebSocket (:meth:`Connection.receive_text`,
:meth:`Connection.receive_binary`), the outcomes of its chunks (:meth:`Connection.outcome`) and
the clock, and answers with the frames to send (:meth:`Connection.data_to_send`) and the work to
submit (returned by :meth:`Connection.receive_binary`). It never touches a socket, a task or a
future, so every case (resume replay, slow readers, shutdown) is tested with plain values, as
python-websockets' ``protocol.py`` is. The asyncio side (:mod:`realtime.server`) only moves bytes.

Its lifecycle is an explicit table (:data:`TRANSITIONS`), as in h11's ``_state.py``::

    awaiting_hello --hello--> open --lost--> parked --resume--> open
    open | parked --hand_off--> handed_off;  any --close--> closed

A connection is one *session*: it outlives its socket while parked, and a resumed client's new
socket takes the same :class:`Connection` back.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import Final

from realtime import errors
from realtime.handoff import HandedOff
from realtime.protocol import (
    CLIENT_MESSAGES,
    Chunk,
    Close,
    Error,
    GoingAway,
    Hello,
    Message,
    Open,
    Ping,
    Pong,
    Result,
    decode_frame,
    decode_text,
    encode_text,
    result_frames,
)
from realtime.ratelimit import TokenBucket
from realtime.session import Outcome, Session, Stream, WorkItem
from realtime.traffic import Traffic

#: Kinds of outbox entries: RESULT (a result, or a
#: chunk's deadline_exceeded) may be shed for a slow reader, NOTICE is the one unsent
#: ``results_dropped`` error (replaced, not repeated), OTHER is never dropped.
OTHER: Final = 0
RESULT: Final = 1
NOTICE: Final = 2
#: Close code for a client that does not read its results fast enough.
CLOSE_TOO_SLOW: Final = 4008
#: Close code after a ``server_busy`` refusal at ``hello`` (RFC 6455's "Try Again Later").
CLOSE_TRY_AGAIN: Final = 1013
#: Bytes a kept frame holds in memory beyond its own length (CPython: the bytes object's header,
#: the (frame, is_text, kind) tuple and the deque's slot), counted against
#: ``resume_buffer_bytes`` so that the bound is on memory. Counted at their length only, a
#: session's small JSON results held 1.8x the bound: ~450 KB of RSS a session for its 256 KB
#: at 100 silero sessions (docs/scheduler.md, session 29).
KEPT_OVERHEAD: Final = 105

Frame = tuple[bytes, bool, int]  # (payload, is_text, kind)
#: Admission control's answer to a new session (None) or stream (its ``open``): None to admit,
#: or the typed refusal (see :mod:`realtime.admission`).
Admit = Callable[[Open | None], errors.ServerBusy | None]


class State(Enum):
    """Where a connection is in its life."""

    AWAITING_HELLO = "awaiting_hello"
    OPEN = "open"
    PARKED = "parked"  # its socket was lost; kept for the client to resume
    HANDED_OFF = "handed_off"  # written out for another server process; inert here
    CLOSED = "closed"


#: (state, event) -> next state; anything else is a bug (``internal_error``).
TRANSITIONS: Final[dict[tuple[State, str], State]] = {
    (State.AWAITING_HELLO, "hello"): State.OPEN,
    (State.AWAITING_HELLO, "resume"): State.OPEN,  # a taken-over session's first socket
    (State.AWAITING_HELLO, "lost"): State.PARKED,  # a taken-over one whose resume was refused
    (State.OPEN, "lost"): State.PARKED,
    (State.PARKED, "resume"): State.OPEN,
    (State.OPEN, "hand_off"): State.HANDED_OFF,
    (State.PARKED, "hand_off"): State.HANDED_OFF,
    **{(s, "close"): State.CLOSED for s in State},
}


class Connection:
    """The pure state of one client session: its :class:`Session`, its outbox, and the frames
    it keeps to replay after a resume.

    Every frame handed out by :meth:`data_to_send` is counted; the last ``resume_buffer_bytes``
    of them are kept (each counted with :data:`KEPT_OVERHEAD`), so a client that lost its
    connection and says how many it got can be sent the rest again.
    """

    def __init__(
        self,
        session: Session,
        traffic: Traffic,
        max_outbox: int,
        drop_oldest: Callable[[Stream], list[WorkItem]],
        key: str | None = None,
        now: float = 0.0,
    ) -> None:
        self.session = session
        self.key = key  # the API key the session was admitted with (a resume must match it)
        self.state = State.AWAITING_HELLO
        self._traffic = traffic
        self._drop_oldest = drop_oldest
        self._outbox: deque[Frame] = deque()
        self._unsent_dropped = 0  # results counted by the NOTICE now in the outbox
        self._max_outbox = max_outbox
        #: Set when the client reads too slowly: the socket is to be closed with this code.
        self.close_code: int | None = None
        self.close_reason = ""
        self.last_seen = now  # monotonic time of the last message received
        self._kept: deque[Frame] = deque()  # written frames, oldest first
        self._kept_bytes = 0
        self._keep_bytes = session.limits.resume_buffer_bytes
        self.written = 0  # frames handed out on this session since it began
        self.first = 0  # index of the first frame after the welcome
        #: Its frame count at its last checkpoint (-1: none), and when (monotonic seconds).
        self.checkpointed = -1
        self.checkpointed_at = 0.0
        self.checkpoint_due = False  # one is due once no chunk is in flight
        self.from_checkpoint = False  # taken over from a checkpoint: the client may be ahead
        limits = session.limits
        self._messages = TokenBucket(
            limits.max_messages_per_second, limits.max_messages_per_second / 2, now
        )
        self._volume = TokenBucket(
            limits.max_bytes_per_second, limits.max_bytes_per_second / 2, now
        )
        self._told_rate = -1e9  # when the client was last told it is rate limited

    # --- lifecycle ---------------------------------------------------------------------------

    def _move(self, event: str) -> None:
        nxt = TRANSITIONS.get((self.state, event))
        if nxt is None:
            raise errors.InternalError(f"{event} is not allowed in state {self.state.value}")
        self.state = nxt

    @property
    def inflight(self) -> int:
        """Chunks accepted whose outcome is not queued yet."""
        return self.session.inflight

    @property
    def has_output(self) -> bool:
        """Whether frames wait to be sent."""
        return bool(self._outbox)

    def lost(self) -> None:
        """The socket went away without a close from the client: keep the session to resume."""
        self._move("lost")

    def close(self) -> None:
        """The session ends: its queued items are skipped and nothing more is sent."""
        if self.state is not State.HANDED_OFF:
            self.session.disconnect()
        self._outbox.clear()
        self.state = State.CLOSED

    def hand_off(self, expires_at: float) -> HandedOff:
        """The session as the next server needs it. What is still queued counts as written (the
        next server replays it), so whatever reaches the client from here, its count and the
        saved one agree."""
        self._move("hand_off")
        kept = [*self._kept, *self._outbox]
        written = self.written + len(self._outbox)
        self._outbox.clear()
        return HandedOff(self.session, self.key, expires_at, written, self.first, kept)

    def snapshot(self, expires_at: float, max_bytes: int) -> HandedOff:
        """The session as another process needs it if this one dies: as :meth:`hand_off`, but
        the session stays here, and only the newest ``max_bytes`` of frames are kept."""
        kept: list[Frame] = []
        size = 0
        for entry in itertools.chain(reversed(self._outbox), reversed(self._kept)):
            size += len(entry[0])
            if size > max_bytes:
                break
            kept.append(entry)
        kept.reverse()
        written = self.written + len(self._outbox)
        return HandedOff(self.session, self.key, expires_at, written, self.first, kept)

    @property
    def count(self) -> int:
        """Frames written or queued on this session since it began."""
        return self.written + len(self._outbox)

    @classmethod
    def taken_over(
        cls,
        entry: HandedOff,
        traffic: Traffic,
        max_outbox: int,
        drop_oldest: Callable[[Stream], list[WorkItem]],
        now: float,
        from_checkpoint: bool = False,
    ) -> Connection:
        """A session another server handed off (or checkpointed), ready for :meth:`resume`."""
        conn = cls(entry.session, traffic, max_outbox, drop_oldest, entry.key, now)
        conn.from_checkpoint = from_checkpoint
        conn.written, conn.first = entry.written, entry.first
        conn._kept.extend(entry.kept)
        conn._kept_bytes = sum(len(frame) + KEPT_OVERHEAD for frame, _, _ in entry.kept)
        return conn

    def resume(
        self, received: int, now: float, allows: Callable[[str], bool] | None
    ) -> list[Frame]:
        """Take a new socket, and the grant ``allows`` of the credential it came with: the
        resumed welcome, then every kept frame after the ``received`` first ones, to write at
        once (before :meth:`data_to_send`); a typed ``results_dropped`` goes first in the outbox
        if some were no longer kept. Raises (and stays as it was) if ``received`` is more than
        was sent, or the credential may not use an open stream's model."""
        start = self.first + received
        if self.from_checkpoint:  # the lost process sent more than its checkpoint knows of
            start = min(start, self.written)
        if start > self.written:
            raise errors.BadMessage(
                f"hello.received is {received}, this session sent {self.written - self.first}"
            )
        self.session.check_grant(allows)
        self.session.allows = allows
        self.from_checkpoint = False
        self._move("resume")
        self.last_seen = now
        oldest = self.written - len(self._kept)
        lost = max(0, oldest - start)
        start += lost
        welcome = encode_text(self.session.welcome(replay_from=start - self.first))
        replay: list[Frame] = [(welcome, True, OTHER)]
        kept = self._kept
        replay.extend(kept[i] for i in range(start - oldest, len(kept)))
        if lost:
            notice = errors.ResultsDropped(
                f"{lost} messages sent before the connection was lost are no longer kept"
            )
            self._outbox.appendleft((encode_text(Error.of(notice)), True, OTHER))
        return replay

    # --- input -------------------------------------------------------------------------------

    def throttle(self, size: int, now: float, shared: float = 0.0) -> float:
        """Count one received message of ``size`` bytes against the session's rates; the seconds
        to stop reading from this client (0: go on), at least ``shared`` (what its address's and
        key's rates ask, realtime.quotas). Past a rate the client is told once a second with a
        typed ``rate_limited``."""
        self.last_seen = now
        pause = self._messages.take(1, now)  # not max(): a builtin call per chunk
        volume = self._volume.take(size, now)
        if volume > pause:
            pause = volume
        if shared > pause:
            pause = shared
        if pause and now - self._told_rate >= 1.0:
            self._told_rate = now
            limits = self.session.limits
            self.error(
                errors.RateLimited(
                    f"over {limits.max_messages_per_second} messages or "
                    f"{limits.max_bytes_per_second} bytes a second, or its address's or key's "
                    f"rate: reading paused {1000 * pause:.0f} ms"
                )
            )
        return pause

    def receive_text(
        self, text: str, draining: bool = False, admit: Admit | None = None
    ) -> Hello | None:
        """Handle a control message; a ``hello`` that asks to resume is returned for the server
        to act on (it alone knows the other sessions). ``admit`` decides on a new session or
        stream: a session it refuses gets its ``server_busy`` and then the close (1013)."""
        traffic = self._traffic
        traffic.messages_in += 1
        traffic.bytes_in += len(text)
        session = self.session
        try:
            self._check_size(len(text), self.session.limits.max_text_bytes)
            msg = decode_text(text)
            if not isinstance(msg, CLIENT_MESSAGES):
                raise errors.BadMessage(f"{type(msg).__name__.lower()} is a server message")
            if isinstance(msg, Hello):
                if msg.resume is not None:
                    return msg
                if draining:
                    raise errors.ShuttingDown("the server is shutting down: connect elsewhere")
                busy = (
                    None if admit is None or self.state is not State.AWAITING_HELLO else admit(None)
                )
                if busy is not None:
                    self.error(busy)
                    self.close_code, self.close_reason = CLOSE_TRY_AGAIN, "server busy"
                    return None
                self.queue([session.hello(msg)], False)
                self._move("hello")
                self.first = self.written + len(self._outbox)
                return None
            reply: list[Message]
            if isinstance(msg, Open):
                busy = None if admit is None or self.state is not State.OPEN else admit(msg)
                if busy is not None:
                    busy.stream = msg.stream
                    raise busy
                reply = [session.open_stream(msg)]
            elif isinstance(msg, Close):
                reply = session.close_stream(msg)
            else:
                assert isinstance(msg, Ping)
                reply = [Pong(msg.id, msg.t, time.time() * 1000.0)]
            self.queue(reply, False)
        except errors.RealtimeError as e:
            self.error(e)
        return None

    def receive_binary(
        self, data: bytes, now: float, draining: bool = False, age: float = 0.0
    ) -> list[WorkItem]:
        """Check a chunk and cut it into work for the scheduler (possibly none: an audio chunk
        that completed no window, whose result is then queued at once). ``age`` is how long ago
        (seconds) its bytes reached the server: its deadline counts from then, and a chunk
        already past it is refused (``deadline_exceeded``) before any work."""
        traffic = self._traffic
        traffic.messages_in += 1
        traffic.bytes_in += len(data)
        session = self.session
        try:
            self._check_size(len(data))
            frame = decode_frame(data)
            if type(frame) is not Chunk:
                raise errors.BadFrame(
                    "result frames go from server to client only",
                    stream=frame.stream,
                    seq=frame.seq,
                )
            if draining:  # counted as received by self.error (Session.refused)
                raise errors.ShuttingDown(
                    "the server is shutting down", stream=frame.stream, seq=frame.seq
                )
            items = session.accept(frame, now, self._make_room, age)
        except errors.RealtimeError as e:
            self.error(e)
            return []
        if not items:  # an audio chunk that completed no model window: its result is due
            stream = session.streams[frame.stream]
            self.queue(session.release(frame.stream), stream.results == "binary")
        return items

    def _check_size(self, size: int, limit: int | None = None) -> None:
        limit = self.session.limits.max_message_bytes if limit is None else limit
        if size > limit:
            raise errors.MessageTooBig(f"{size} bytes, at most {limit}")

    def _make_room(self, stream: Stream) -> bool:
        """Drop a live-media stream's oldest queued chunk for a newer one; False if none waits."""
        dropped = self._drop_oldest(stream)
        for item in dropped:
            why = "dropped for a newer chunk: the stream sends faster than it is served"
            self.outcome(item, errors.Dropped(why, stream=stream.id, seq=item.seq))
        return bool(dropped)

    def outcome(self, item: WorkItem, outcome: Outcome) -> None:
        """One item's result or typed error: queue what is now due, in stream order."""
        messages = self.session.complete(item, outcome)
        if messages:
            self.queue(messages, item.stream.results == "binary")

    # --- output ------------------------------------------------------------------------------

    def error(self, exc: errors.RealtimeError) -> None:
        """Queue a typed error sent at once (a refusal; counted on its stream for ``closed``)."""
        self.session.refused(exc)
        self.queue([Error.of(exc)], False)

    def going_away(self, drain_ms: float, resume_token: str | None) -> None:
        """Queue the notice that the server is shutting down."""
        self.queue([GoingAway("the server is shutting down", drain_ms, resume_token)], False)

    def abandon(self, why: str) -> None:
        """Give every chunk still without an outcome a ``going_away`` error (the session is
        handed to another server while a batch of it still runs here)."""
        self.queue(self.session.abandon(why), False)

    def queue(self, messages: list[Message], binary_results: bool) -> None:
        """Queue messages in order, results as binary frames where the stream asked for them
        (nothing more once the connection is to be closed for reading too slowly)."""
        if self.close_code is not None:
            return
        outbox = self._outbox
        for msg in messages:
            if binary_results and type(msg) is Result:
                outbox.extend((frame, False, OTHER) for frame in result_frames(msg))
            else:
                kind = RESULT if type(msg) is Result else OTHER
                if type(msg) is Error:
                    errors_sent = self._traffic.errors
                    errors_sent[msg.code] = errors_sent.get(msg.code, 0) + 1
                    if msg.code == "deadline_exceeded":  # a chunk's answer: shed as results are
                        kind = RESULT
                outbox.append((encode_text(msg), True, kind))
        if len(outbox) > self._max_outbox // 2:
            self._shed_results()
            if (
                len(self._outbox) > self._max_outbox
                and self.close_code is None
                and self.state is State.OPEN
            ):
                self.close_code = CLOSE_TOO_SLOW
                self.close_reason = "results are not read fast enough"
                self._outbox.clear()

    def _shed_results(self) -> None:
        """A slow reader: drop its oldest unsent JSON results (a live client wants the newest)
        down to a quarter of the bound, and tell it how many with one typed error."""
        keep = self._max_outbox // 4
        excess = len(self._outbox) - keep
        kept: list[Frame] = []
        dropped = 0
        at = -1  # where the notice goes: in place of the first result dropped, in order
        for entry in self._outbox:
            if entry[2] == NOTICE:
                at = len(kept) if at < 0 else at
                continue  # replaced below, with the new count added
            if dropped < excess and entry[2] == RESULT:
                at = len(kept) if at < 0 else at
                dropped += 1
            else:
                kept.append(entry)
        if dropped:
            if not self._unsent_dropped:
                errors_sent = self._traffic.errors
                errors_sent["results_dropped"] = errors_sent.get("results_dropped", 0) + 1
            self._unsent_dropped += dropped
            notice = errors.ResultsDropped(
                f"{self._unsent_dropped} results were dropped unsent: the client reads too slowly"
            )
            kept.insert(at, (encode_text(Error.of(notice)), True, NOTICE))
            self._outbox = deque(kept)

    def data_to_send(self) -> deque[Frame]:
        """The frames to write now, in order; from here on they count as sent (and are kept for
        a resume)."""
        out = self._outbox
        if not out or self.state is State.HANDED_OFF:
            return deque()
        self._outbox = deque()
        traffic = self._traffic
        traffic.messages_out += len(out)
        self.written += len(out)
        kept, size = self._kept, 0
        for entry in out:
            if entry[2] == NOTICE:
                self._unsent_dropped = 0
            size += len(entry[0])
        kept.extend(out)
        traffic.bytes_out += size
        self._kept_bytes += size + KEPT_OVERHEAD * len(out)
        while self._kept_bytes > self._keep_bytes:
            self._kept_bytes -= len(kept.popleft()[0]) + KEPT_OVERHEAD
        return out
