"""HTTP/1.1 on the WebSocket port: the front door, and a small server for what is not a WebSocket.

websockets' server parses only GET requests (a handshake, or a plain GET answered by
``process_request``). :class:`HttpDoor` gives the port a front door: the protocol of each new
connection (:meth:`HttpDoor.protocol`) looks at its first bytes before websockets does, and
builds websockets' ``ServerConnection`` only then. A ``GET`` outside ``/v2`` goes on to
websockets as before; anything else (``POST /v2/models/.../infer``, ``GET /v2/...``) is taken
off websockets' hands with ``transport.set_protocol`` and served here: keep-alive,
``Content-Length`` bodies up to a limit, ``Expect: 100-continue``, typed errors. websockets
never sees such a connection, so neither its handshake timeout nor its shutdown touches it; this
door closes its own connections. A handshake the server refuses anyway (:attr:`HttpDoor.gate`: a
full server refusing a crowd) is answered here too, and closed: a seventh of the CPU of going
through websockets' handshake and a hello (when its first bytes had come by the time it was
accepted, ``realtime.listener`` answered it already, on the bare socket).

The request head is parsed by the pure :func:`parse_head` (tested with byte strings); the asyncio
part only reads, calls the handler and writes, one request at a time per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import cast
from urllib.parse import unquote

import orjson
from websockets.asyncio.server import ServerConnection

from realtime import errors
from realtime.ratelimit import TokenBucket

log = logging.getLogger("realtime")
#: Largest request line plus headers.
MAX_HEAD = 64 * 1024
#: Seconds a new connection may take to send its first bytes (websockets' open timeout).
FIRST_BYTES_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Head:
    """A request's line and headers, checked."""

    method: str
    path: str  # percent-decoded, without the query
    query: str
    #: Lower-case names; a repeated header's values joined with ", ".
    headers: dict[str, str]
    content_length: int
    keep_alive: bool
    expect_continue: bool


@dataclass(frozen=True, slots=True)
class Request:
    """A whole request as a handler gets it."""

    head: Head
    body: bytes
    peer: str  # the client's address


@dataclass(frozen=True, slots=True)
class Reply:
    """What a handler answers."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Awaitable[Reply]]


def wants_websocket(first: bytes) -> bool | None:
    """Whether a connection's first bytes are for websockets (a GET outside ``/v2``); None
    until enough bytes have come to tell."""
    if not b"GET ".startswith(first[:4]):
        return False
    if len(first) < 8 and b"\n" not in first:
        return None
    return not (first[4:7] == b"/v2" and first[7:8] in (b"/", b" ", b"?"))


def parse_head(data: bytes, max_body: int) -> Head:
    """Parse a request head (up to and including the blank line). Raises ``bad_message`` for
    anything malformed or unsupported (chunked bodies), ``message_too_big`` past ``max_body``."""
    try:
        text = data.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise errors.BadMessage("request head is not text") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1].startswith("/"):
        raise errors.BadMessage(f"malformed request line {lines[0][:100]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise errors.BadMessage(f"unsupported HTTP version {version[:20]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or line[0] in " \t":
            raise errors.BadMessage(f"malformed header line {line[:100]!r}")
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    if "transfer-encoding" in headers:
        raise errors.BadMessage("bodies must be sent with Content-Length (no Transfer-Encoding)")
    length = headers.get("content-length", "0")
    if not length.isdigit() or len(length) > 18:
        raise errors.BadMessage(f"bad Content-Length {length[:30]!r}")
    content_length = int(length)
    if content_length > max_body:
        raise errors.MessageTooBig(f"a body of {content_length} bytes, at most {max_body}")
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "close" not in tokens if version == "HTTP/1.1" else "keep-alive" in tokens
    path, _, query = target.partition("?")
    return Head(
        method.upper(),
        unquote(path),
        query,
        headers,
        content_length,
        keep_alive,
        headers.get("expect", "").lower() == "100-continue",
    )


def serialize(reply: Reply, keep_alive: bool, server: str) -> bytes:
    """A reply as bytes on the wire."""
    try:
        phrase = HTTPStatus(reply.status).phrase
    except ValueError:
        phrase = "Unknown"
    lines = [
        f"HTTP/1.1 {reply.status} {phrase}",
        f"Server: {server}",
        f"Content-Type: {reply.content_type}",
        f"Content-Length: {len(reply.body)}",
        *(f"{name}: {value}" for name, value in reply.headers),
    ]
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + reply.body


def error_reply(exc: errors.RealtimeError, status: int) -> Reply:
    """A typed error as a JSON reply: ``{"error": message, "code": code}``."""
    return Reply(status, orjson.dumps({"error": exc.message, "code": exc.code}))


class HttpDoor:
    """Serves the HTTP/1.1 connections the front door hands over, with one handler."""

    def __init__(
        self,
        handle: Handler,
        max_body: int,
        idle_seconds: float,
        server_name: str,
        status_of: Callable[[errors.RealtimeError], int],
        rate: tuple[float, float] = (math.inf, math.inf),
    ) -> None:
        self._handle = handle
        #: Requests and bytes a second one connection may send (as a WebSocket session: past
        #: them, reading from it stops for a while and TCP slows the sender).
        self._rate = rate
        self._max_body = max_body
        self._idle = idle_seconds
        self._server = server_name
        self._status_of = status_of
        #: Open connections' writers; True while a request is being handled.
        self._busy: dict[asyncio.StreamWriter, bool] = {}
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        #: Given a WebSocket handshake's whole head as it came in, the response that refuses it
        #: before websockets takes it (then the connection closes), or None to let it through.
        self.gate: Callable[[bytes], bytes | None] | None = None

    def protocol(self, make: Callable[[], ServerConnection]) -> asyncio.Protocol:
        """A new connection's protocol until its first bytes say whose it is: ``make`` builds
        websockets' connection for a WebSocket, this door serves the rest."""
        return _Peek(self, make)

    def take(self, transport: asyncio.Transport, first: bytes) -> None:
        """Serve a connection from here on; ``first`` are the bytes already read from it."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_HEAD, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        reader.feed_data(first)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        peername = transport.get_extra_info("peername")
        peer = str(peername[0]) if peername else "?"
        task = loop.create_task(self._serve(reader, writer, peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        self._busy[writer] = False
        now = time.monotonic()
        requests = TokenBucket(self._rate[0], self._rate[0] / 2, now)
        volume = TokenBucket(self._rate[1], self._rate[1] / 2, now)
        try:
            while not self._closing:
                try:
                    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._idle)
                except asyncio.LimitOverrunError:
                    too_big = errors.MessageTooBig(f"request head over {MAX_HEAD} bytes")
                    await self._write(writer, error_reply(too_big, 431), False)
                    return
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return
                self._busy[writer] = True
                try:
                    head = parse_head(raw, self._max_body)
                except errors.RealtimeError as e:
                    await self._write(writer, error_reply(e, self._status_of(e)), False)
                    return
                if head.expect_continue and head.content_length:
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                try:
                    body = await asyncio.wait_for(
                        reader.readexactly(head.content_length), self._idle
                    )
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return
                try:
                    reply = await self._handle(Request(head, body, peer))
                except Exception as e:  # a bug: answered, logged, and the connection goes on
                    log.exception("event=internal_error door=rest")
                    reply = error_reply(errors.InternalError(repr(e)[:300]), 500)
                keep = head.keep_alive and not self._closing
                await self._write(writer, reply, keep)
                self._busy[writer] = False
                if not keep:
                    return
                now = time.monotonic()
                pause = max(requests.take(1, now), volume.take(len(raw) + len(body), now))
                if pause:
                    await asyncio.sleep(pause)  # not reading is the backpressure
        finally:
            del self._busy[writer]
            writer.close()

    async def _write(self, writer: asyncio.StreamWriter, reply: Reply, keep: bool) -> None:
        writer.write(serialize(reply, keep, self._server))
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    async def close(self, grace: float) -> None:
        """Take no new requests: idle connections close now, busy ones after their reply, or
        after ``grace`` seconds whatever they are doing (a client still sending its body)."""
        self._closing = True
        for writer, busy in list(self._busy.items()):
            if not busy:
                writer.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        for writer in list(self._busy):
            writer.transport.abort()


class _Peek(asyncio.Protocol):
    """A new connection until its first bytes say whose it is: websockets' (a GET outside
    ``/v2``: the connection ``make`` builds then), this door's, or nobody's (refused by the
    door's gate). It holds nothing else: a crowd refused here leaves no websockets connection
    (~40 objects in reference cycles) for the garbage collector, whose full walks over every
    admitted session's objects came 2-3 times a second under a burst, at 30-130 ms each."""

    __slots__ = ("_door", "_first_bytes", "_make", "_peeked", "_transport")

    def __init__(self, door: HttpDoor, make: Callable[[], ServerConnection]) -> None:
        self._door = door
        self._make = make
        self._peeked = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        self._first_bytes = loop.call_later(FIRST_BYTES_SECONDS, self._transport.abort)

    def data_received(self, data: bytes) -> None:
        self._peeked += data
        verdict = wants_websocket(self._peeked)
        if verdict is None:
            return
        self._first_bytes.cancel()
        first, self._peeked, transport = self._peeked, b"", self._transport
        if not verdict:
            self._door.take(transport, first)
            return
        gate = self._door.gate
        if gate is not None and b"\r\n\r\n" in first:
            refusal = gate(first)
            if refusal is not None:  # answered here: websockets never sees it
                transport.write(refusal)
                transport.close()
                return
        conn = self._make()
        conn.connection_made(transport)  # websockets' handshake starts
        # The transport calls the connection's own ``receive`` if it has one, straight away:
        # one Python frame less per read (set_protocol has the event loop look it up).
        receive = cast("Callable[[bytes], None]", getattr(conn, "receive", conn.data_received))
        conn.data_received = receive  # type: ignore[method-assign,assignment]
        transport.set_protocol(conn)
        receive(first)

    def connection_lost(self, exc: Exception | None) -> None:
        self._first_bytes.cancel()
