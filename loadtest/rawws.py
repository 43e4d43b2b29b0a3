"""A minimal WebSocket client (RFC 6455) for the load generator: as little CPU per frame as we can.

Only what a load client needs: the HTTP upgrade, unfragmented client frames, a reader of server
frames (fragments joined, pings answered, close echoed), and pre-masked frame templates. It is a
valid client: every frame it sends is masked. The mask key is random per process and fixed for
its frames (RFC 6455 wants a fresh key per frame against proxy cache poisoning, which means
nothing on loopback), so a chunk's frame is a pre-masked template with its 4 sequence bytes
XORed in: no per-byte masking per send, while the server still unmasks every byte as it would
for a browser.

``FrameReader`` is pure (bytes in, messages out) and tested without sockets; ``RawConnection`` is
the thin asyncio Protocol around it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from collections.abc import Callable
from typing import Any, cast

import numpy as np

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")


class HandshakeRefused(Exception):
    """The server answered the upgrade with something other than 101 (e.g. 429, 503), and
    ``body`` (as much of it as came before the connection closed)."""

    def __init__(self, status: int, body: bytes = b"") -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


def mask_bytes(payload: bytes, key: bytes) -> bytes:
    """``payload`` XOR the repeated 4-byte ``key`` (numpy: one pass, no Python loop)."""
    if not payload:
        return b""
    n = len(payload)
    words = np.frombuffer(payload.ljust((n + 3) & ~3, b"\0"), np.uint32)
    return (words ^ np.frombuffer(key, np.uint32)[0]).tobytes()[:n]


def frame_header(opcode: int, length: int, key: bytes) -> bytes:
    """The header of one final, masked client frame of ``length`` payload bytes."""
    if length < 126:
        head = bytes((0x80 | opcode, 0x80 | length))
    elif length < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + _U16.pack(length)
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + _U64.pack(length)
    return head + key


def client_frame(opcode: int, payload: bytes, key: bytes) -> bytes:
    """One whole masked client frame."""
    return frame_header(opcode, len(payload), key) + mask_bytes(payload, key)


class ChunkTemplate:
    """A binary chunk frame, pre-masked, whose u32 at payload offset ``at`` (4-aligned) is
    replaced per send: ``frame(seq)`` costs one join, not a masking pass."""

    __slots__ = ("_key_word", "_prefix", "_suffix")

    def __init__(self, payload: bytes, key: bytes, at: int = 8) -> None:
        assert at % 4 == 0, "the patched word must line up with the mask key"
        head = frame_header(OP_BINARY, len(payload), key)
        masked = mask_bytes(payload, key)
        self._prefix = head + masked[:at]
        self._suffix = masked[at + 4 :]
        self._key_word = int.from_bytes(key, "little")

    def frame(self, value: int) -> bytes:
        """The frame with ``value`` (little-endian u32) at the patched offset."""
        word = (value ^ self._key_word).to_bytes(4, "little")
        return b"".join((self._prefix, word, self._suffix))


class FrameReader:
    """Server-to-client frames from a byte stream: ``feed(data)`` returns whole messages as
    ``(opcode, payload)``; control frames come out as they arrive (a ping, a close)."""

    def __init__(self) -> None:
        self._buf = b""
        self._fragments: list[bytes] = []
        self._fragment_op = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Parse what ``data`` completes; keep the rest for the next call."""
        buf = self._buf + data if self._buf else data
        out: list[tuple[int, bytes]] = []
        pos, end = 0, len(buf)
        while end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            if b1 & 0x80:
                raise ValueError("a server frame must not be masked")
            length = b1 & 0x7F
            start = pos + 2
            if length == 126:
                if end - start < 2:
                    break
                length = _U16.unpack_from(buf, start)[0]
                start += 2
            elif length == 127:
                if end - start < 8:
                    break
                length = _U64.unpack_from(buf, start)[0]
                start += 8
            stop = start + length
            if stop > end:
                break
            payload = buf[start:stop]
            pos = stop
            opcode = b0 & 0x0F
            if not b0 & 0x80 or (opcode == OP_CONT and self._fragments):  # a fragment
                if opcode != OP_CONT:
                    self._fragment_op = opcode
                self._fragments.append(payload)
                if b0 & 0x80:
                    out.append((self._fragment_op, b"".join(self._fragments)))
                    self._fragments = []
                continue
            out.append((opcode, payload))
        self._buf = buf[pos:]
        return out


def upgrade_request(host: str, port: int, path: str) -> tuple[bytes, bytes]:
    """The HTTP upgrade request and the ``Sec-WebSocket-Accept`` the answer must carry."""
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    return request, accept


def check_upgrade(head: bytes, accept: bytes) -> None:
    """Raise unless ``head`` (the response up to its blank line) accepts the upgrade."""
    status_line, _, headers = head.partition(b"\r\n")
    parts = status_line.split()
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    if status != 101:
        raise HandshakeRefused(status)
    for line in headers.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-accept" and value.strip() == accept:
            return
    raise ConnectionError("upgrade answered without the right Sec-WebSocket-Accept")


def content_length(head: bytes) -> int:
    """A response head's ``Content-Length`` (0 without one)."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return int(value)
    return 0


class RawConnection(asyncio.Protocol):
    """One client connection: the upgrade, then ``on_message(opcode, payload)`` for each text or
    binary message. Pings get pongs, a close gets its echo; ``closed`` resolves when the
    transport is gone."""

    def __init__(
        self, host: str, port: int, path: str, key: bytes, on_message: Callable[[int, bytes], Any]
    ) -> None:
        self.key = key
        self.on_message = on_message
        self.transport: asyncio.Transport | None = None
        self._request, self._accept = upgrade_request(host, port, path)
        self._head = b""
        self._reader: FrameReader | None = None
        self._refused: HandshakeRefused | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.close_code: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        if self._reader is None:
            self._head += data
            head, sep, rest = self._head.partition(b"\r\n\r\n")
            if not sep:
                return
            try:
                check_upgrade(head, self._accept)
            except HandshakeRefused as exc:
                # Its body (a 503's typed error) is kept: whole, or what came before the close.
                length = content_length(head)
                exc.body = rest[:length]
                self._refused = exc
                if len(exc.body) == length:
                    self._fail(exc)
                return
            except Exception as exc:
                self._fail(exc)
                return
            self._reader = FrameReader()
            self._head = b""
            self.opened.set_result(None)
            data = rest
            if not data:
                return
        on_message = self.on_message
        for opcode, payload in self._reader.feed(data):
            if opcode <= OP_BINARY:
                on_message(opcode, payload)
            elif opcode == OP_PING:
                self.send(OP_PONG, payload)
            elif opcode == OP_CLOSE:
                if self.close_code is None:
                    self.close_code = _U16.unpack_from(payload)[0] if len(payload) >= 2 else 1005
                    self.send(OP_CLOSE, payload[:2])
                assert self.transport is not None
                self.transport.close()

    def _fail(self, exc: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
        assert self.transport is not None
        self.transport.close()

    def send(self, opcode: int, payload: bytes) -> None:
        """Send one message (masked with this connection's key)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(opcode, payload, self.key))

    def close(self, code: int = 1000) -> None:
        """Start the closing handshake; the transport is dropped when the server echoes it."""
        if self.close_code is None:
            self.close_code = code
            self.send(OP_CLOSE, _U16.pack(code))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(
                self._refused or exc or ConnectionError("closed during the upgrade")
            )
        if not self.closed.done():
            self.closed.set_result(None)
