"""The per-chunk glue between a client's socket, its session and the scheduler.

A chunk's frame is split off the socket's bytes by its :class:`Reader`, and its message goes
to :meth:`Relay.on_message` (its session turns it into work for the scheduler); its outcome
comes back to :meth:`Relay.deliver` (to the session, wherever it is now), and what the session
has to send is written by :meth:`Relay.flush`, once per loop iteration. These run once or twice
per chunk, so they live here, compiled with the other per-chunk modules (see setup.py), and not
in ``server.py``, which keeps the lifecycle, the handshake, text messages and resumes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from websockets.protocol import State as WsState

from realtime import errors, framing
from realtime.connection import Connection, State
from realtime.quotas import Quotas
from realtime.scheduler import Scheduler
from realtime.session import Outcome, WorkItem
from realtime.traffic import Traffic

log = logging.getLogger("realtime")

#: Messages of one client handed over per turn of the event loop (see :class:`Reader`).
BURST = 4
#: Messages a deferred client's reader keeps (:meth:`Reader.defer`) before it stops reading:
#: 5 s of 20 ms chunks. Past it they wait in the socket, and their age is not known.
DEFERRED_MAX = 256


class Socket(Protocol):
    """What is used of server.py's websockets connection (a ``ServerConnection``)."""

    reader: Reader
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    protocol: Any  # websockets' sans-I/O protocol
    paused: bool  # the client does not read: writes wait

    @property
    def close_code(self) -> int | None: ...

    def send_data(self) -> None: ...

    async def drain(self) -> None: ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...


class Reader:
    """A client socket's reading side: each whole data message handed to ``on_message`` as it
    arrives (no queue, future or task switch per message). A whole binary message in one frame
    (a chunk) is split off the bytes by :func:`framing.next_frame`; every other frame goes to
    websockets' parser (``parse``) whole, so that it stays at a frame's start: text, fragments,
    control frames, keepalive, the closing handshake and protocol errors stay websockets' own,
    and come back through :meth:`message`.

    A burst (many messages in one read) is handed over :data:`BURST` at a time, one batch per
    turn of the event loop, with reading paused meanwhile: a client with a backlog does not hold
    the loop while batches wait to be collected and sent.
    """

    def __init__(self, ws: Any, parse: Callable[[bytes], None]) -> None:
        self.ws = ws  # server.py's connection (its transport is set once it is connected)
        self.protocol: Any = ws.protocol  # websockets' sans-I/O protocol
        self.loop: asyncio.AbstractEventLoop = ws.loop
        self.parse = parse
        self.on_message: Callable[[bool, bytes], None] | None = None
        self.budget = BURST  # messages still to hand over in this turn of the loop
        #: Messages read but not handed over yet (a burst, or before the handler took over), and
        #: when they were read if their age counts (a deferred client's; else 0).
        self.backlog: deque[tuple[bool, bytes, float]] = deque()
        #: The server is behind and this client (one of the newest) waits: its messages wait
        #: in the backlog, read and stamped (:meth:`defer`).
        self.deferred = False
        self.held_until = 0.0  # reading is paused until then (a client over its rate)
        self.pump: asyncio.Handle | None = None  # hands the backlog over next, at pump_at
        self.pump_at = 0.0
        #: Loop time the messages now handed over reached the loop: when their bytes were read,
        #: or, from the backlog, when their turn came (a client's own burst and a hold for its
        #: rate do not age its chunks; the loop falling behind does).
        self.arrived = 0.0
        self.rest = bytearray()  # the start of a frame not whole yet
        self.need = 0  # the bytes rest must hold before it is looked at again

    def data_received(self, data: bytes) -> None:
        self.budget = BURST
        self.arrived = self.loop.time()
        if self.rest:
            self.rest += data
            if len(self.rest) < self.need:
                return
            data, self.rest = bytes(self.rest), bytearray()
        protocol = self.protocol
        limit: int = protocol.max_message_size or 1 << 62
        pos, size = 0, len(data)
        while pos < size:
            # The handshake, or bytes of a frame pipelined behind it: websockets' own.
            if protocol.state is not WsState.OPEN or protocol.reader.buffer:
                self.parse(data[pos:] if pos else data)
                return
            start = pos
            kind, frame, pos = framing.next_frame(data, start, limit)
            if kind == framing.INCOMPLETE:
                self.rest, self.need = bytearray(data[start:]), pos - start
                return
            if kind == framing.BINARY and protocol.current_size is None:
                self.message(False, frame)
            else:  # whole, even inside a fragmented message: websockets stays at a frame's start
                self.parse(data[start:pos])

    def message(self, text: bool, data: bytes) -> None:
        """One whole message: to ``on_message`` now, or to the backlog."""
        on_message = self.on_message
        if (
            on_message is not None
            and self.budget > 0
            and not self.backlog
            and not self.deferred
            and self.loop.time() >= self.held_until
        ):
            self.budget -= 1
            on_message(text, data)
            return
        if self.deferred:
            self.backlog.append((text, data, self.arrived))
            if len(self.backlog) >= DEFERRED_MAX and not self.ws.transport.is_closing():
                self.ws.transport.pause_reading()
            return
        self.backlog.append((text, data, 0.0))
        self.wait(self.held_until)

    def defer(self, deferred: bool) -> None:
        """While the server is behind, this client's messages wait, read and stamped with the
        time they arrived, until it has room again (False): they then go on from where they
        were, a turn at a time, with their age (those past their deadline are shed typed). A
        deferred client costs the event loop its reads, not its chunks."""
        if deferred == self.deferred:
            return
        self.deferred = deferred
        if not deferred and self.backlog:
            self.wait(max(self.held_until, self.loop.time()))

    def wait(self, until: float) -> None:
        """Stop reading; hand the backlog over from ``until`` (loop time) on."""
        transport = self.ws.transport
        if transport.is_closing():
            return
        transport.pause_reading()
        pump = self.pump
        if pump is not None:
            if self.pump_at <= until:
                return
            pump.cancel()
        self.pump_at = until
        self.pump = self.loop.call_at(until, self.take_backlog)

    def take_backlog(self) -> None:
        """Hand over up to :data:`BURST` waiting messages (unless reading is held); then go on
        on the next turn, or read again."""
        self.pump = None
        backlog = self.backlog
        loop = self.loop
        now = self.arrived = loop.time()
        for _ in range(BURST):
            on_message = self.on_message
            if not backlog or on_message is None or self.deferred or loop.time() < self.held_until:
                break
            text, data, arrived = backlog.popleft()
            self.arrived = arrived if arrived else now
            on_message(text, data)
        if self.on_message is None:
            return
        transport = self.ws.transport
        if self.deferred:  # read on: what arrives waits, stamped (see defer)
            if len(backlog) < DEFERRED_MAX and not transport.is_closing():
                transport.resume_reading()
            return
        if backlog or loop.time() < self.held_until:
            self.wait(self.held_until)
        elif not transport.is_closing():
            transport.resume_reading()

    def hold(self, seconds: float) -> None:
        """Stop reading from this client for ``seconds`` (it is over its rate)."""
        self.held_until = max(self.held_until, self.loop.time() + seconds)
        self.wait(self.held_until)


class Link:
    """One socket and the session it carries now (a resume swaps the session in)."""

    def __init__(self, ws: Socket, conn: Connection, ip: str, key: str | None) -> None:
        self.ws = ws
        self.reader = ws.reader
        self.conn = conn
        self.ip = ip
        self.key = key
        self.flush_due = False
        self.closing = False
        self.faulted = False  # an unexpected error was logged for this connection
        #: While a resume is being looked up: messages that arrived meanwhile, in order.
        self.held: list[tuple[bool, bytes]] | None = None
        self.ended = asyncio.Event()


class Relay:
    """Messages from sockets to sessions and the scheduler, outcomes back, frames out.

    ``on_text`` takes text messages (the server's); ``elsewhere`` the outcomes of items of no
    session here (Open Inference Protocol requests); ``checkpoint`` a session to checkpoint
    now that none of its chunks is in flight; ``check_drained`` is called after each outcome
    while the server drains. ``scheduler`` is set once the scheduler (which delivers here) is.
    """

    scheduler: Scheduler

    def __init__(
        self,
        traffic: Traffic,
        quotas: Quotas,
        late_ms: float,
        shed_by_age: bool,
        on_text: Callable[[Link, bytes], None],
        elsewhere: Callable[[WorkItem, Outcome], None],
        checkpoint: Callable[[Connection], None],
        check_drained: Callable[[], None],
    ) -> None:
        self.traffic = traffic
        self.quotas = quotas
        self.late_ms = late_ms
        #: Chunks past their deadline when the loop gets to them are refused (their real age:
        #: since the loop read their bytes).
        self.shed_by_age = shed_by_age
        self.on_text = on_text
        self.elsewhere = elsewhere
        self.checkpoint = checkpoint
        self.check_drained = check_drained
        #: Every session with a socket, by session id.
        self.links: dict[str, Link] = {}
        #: Every session (with a socket or parked), by session id: where outcomes go.
        self.conns: dict[str, Connection] = {}
        #: Sessions a hand-off waits on until none of their chunks is in flight, by session id.
        self.quiet: dict[str, asyncio.Future[None]] = {}
        self.draining = False  # shutting down: new chunks are refused, the rest answered

    def on_message(self, link: Link, text: bool, data: bytes) -> None:
        """One whole message from the client, straight from the socket's reader."""
        if link.held is not None:  # a resume is being looked up: after it, in order
            link.held.append((text, data))
            return
        conn = link.conn
        if conn.state is State.HANDED_OFF or conn.state is State.CLOSED:
            return  # the next server process has this session now
        now = time.monotonic()
        try:
            if text:
                self.on_text(link, data)
            else:
                scheduler = self.scheduler
                # Its real age: since the loop read its bytes (or took it from the backlog).
                age = now - link.reader.arrived if self.shed_by_age else 0.0
                for item in conn.receive_binary(data, now, self.draining, age):
                    try:
                        scheduler.submit(item)
                    except errors.ServingError as e:
                        self.deliver(item, e)
        except Exception as e:  # a bug: this client gets a typed error, nobody else notices
            if not link.faulted:
                link.faulted = True  # one log line per connection, whatever the client sends
                log.exception("event=internal_error session=%s", conn.session.id)
            conn.error(errors.InternalError(f"the server failed on this message: {e!r}"[:300]))
        size = len(data)
        pause = conn.throttle(size, now, self.quotas.charge(link.ip, link.key, size, now))
        if pause:
            link.reader.hold(pause)
        if not link.flush_due and conn.has_output:
            link.flush_due = True
            link.ws.loop.call_soon(self.flush, link)  # not get_running_loop: a getpid() a call

    def deliver(self, item: WorkItem, outcome: Outcome) -> None:
        """An item's outcome from the scheduler, to its session (parked ones included)."""
        stream = item.stream
        sid = stream.session
        conn = self.conns.get(sid)
        if conn is None:
            self.elsewhere(item, outcome)  # an Open Inference Protocol request's, or nobody's
            return
        now = time.monotonic()
        self.traffic.outcome(stream.model.key, (now - item.received) * 1000.0)
        gather = item.gather
        # Dropped for a newer chunk of its stream (batching.STALE_SHARE): that chunk's outcome
        # is still to come (queued, or in the batch just cut).
        dropped = outcome.__class__ is errors.Dropped
        # Live audio: how late, by the stream's own clock. Not a dropped chunk: the newer one's
        # result is the one that counts, and a client sending faster than real time (a
        # flooder) had its drops read as most of its results late, alone on the server, and
        # was taken back again and again.
        if gather is not None and not dropped:
            stream.answered += 1
            clock = stream.clock_min  # not min(): a builtin call per chunk
            if stream.clock_prev < clock:
                clock = stream.clock_prev
            late_by = now * 1000.0 - gather.media_ms - clock
            stream.lateness_ms += late_by
            if late_by > self.late_ms:
                stream.late += 1
        conn.outcome(item, outcome)
        if not conn.inflight:
            quiet = self.quiet.pop(sid, None)
            if quiet is not None and not quiet.done():
                quiet.set_result(None)
            if conn.checkpoint_due:
                self.checkpoint(conn)
        link = self.links.get(sid)
        # A dropped chunk's error goes out with the newer chunk's outcome, in one write.
        # Written at once, each drop cost a write of its own, and drops come while the server
        # is behind: its CPU is then what the rest is waiting for.
        if link is not None and not link.flush_due and conn.has_output and not dropped:
            link.flush_due = True
            link.ws.loop.call_soon(self.flush, link)
        if self.draining:
            self.check_drained()

    def flush(self, link: Link) -> None:
        """Write what the session has to send, in one go (unless the socket cannot take more:
        then when it can)."""
        link.flush_due = False
        ws, conn = link.ws, link.conn
        protocol = ws.protocol
        if protocol.state is not WsState.OPEN or self.links.get(conn.session.id) is not link:
            return
        if conn.close_code is not None:
            if not link.closing:
                link.closing = True
                for frame, is_text, _ in conn.data_to_send():  # a refusal's server_busy
                    if is_text:
                        protocol.send_text(frame)
                    else:
                        protocol.send_binary(frame)
                asyncio.get_running_loop().create_task(ws.close(conn.close_code, conn.close_reason))
            return
        if ws.paused:
            return  # the client does not read: it piles up in the outbox (shed there)
        frames = conn.data_to_send()
        if not frames:
            return
        out: list[bytes] = []
        for frame, is_text, _ in frames:
            out.append(framing.frame_head(len(frame), is_text))
            out.append(frame)
        ws.transport.writelines(out)
