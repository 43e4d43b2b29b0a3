"""WebSocket frames (RFC 6455, section 5) on the per-chunk path, without websockets' parser and
serializer: pure, bytes in and bytes out.

Nearly every frame a client sends is a whole binary message in one masked frame (a chunk), and
nearly every frame the server sends is a whole message it made. websockets' sans-I/O protocol
costs ~4.5 us per frame received and ~1.7 us per frame sent in Python, more than the rest of
the transport; these functions do the common case and hand everything else back whole, so that
websockets keeps the rest of the protocol: text (it checks UTF-8), fragments, control frames,
the closing handshake, reserved bits, unmasked or oversize frames and their errors.
"""

from __future__ import annotations

from typing import Final

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

#: What :func:`next_frame` found at a position.
INCOMPLETE: Final = 0  # not a whole frame yet: wait until the buffer reaches ``end``
BINARY: Final = 1  # a whole binary message, its payload unmasked
OTHER: Final = 2  # anything else, as its own bytes: for websockets

_FIN_BINARY: Final = 0x82  # FIN, no reserved bits, opcode 2
_MASKED: Final = 0x80


def next_frame(buf: bytes, pos: int, max_size: int) -> tuple[int, bytes, int]:
    """The client frame at ``buf[pos:]``: ``(kind, data, end)``, ``end`` where the next one
    starts (INCOMPLETE: where the buffer must reach before asking again). A frame longer than
    ``max_size`` comes back as OTHER with every byte left (the protocol refuses it and closes,
    1009), without waiting for the rest of it."""
    size = len(buf) - pos
    if size < 2:
        return INCOMPLETE, b"", pos + 2
    first, second = buf[pos], buf[pos + 1]
    length = second & 0x7F
    head = 2
    if length == 126:
        if size < 4:
            return INCOMPLETE, b"", pos + 4
        length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
    elif length == 127:
        if size < 10:
            return INCOMPLETE, b"", pos + 10
        length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
    if length > max_size:
        return OTHER, buf[pos:], len(buf)
    masked = second & _MASKED
    end = pos + head + (4 if masked else 0) + length
    if len(buf) < end:
        return INCOMPLETE, b"", end
    if first != _FIN_BINARY or not masked:
        return OTHER, buf[pos:end], end
    start = end - length
    return BINARY, apply_mask(buf[start:end], buf[start - 4 : start]), end


def frame_head(length: int, text: bool) -> bytes:
    """The header of one whole, unmasked message frame the server sends, ``length`` bytes long
    (its payload follows it)."""
    first = 0x81 if text else _FIN_BINARY
    if length < 126:
        return bytes((first, length))
    if length < 1 << 16:
        return bytes((first, 126)) + length.to_bytes(2, "big")
    return bytes((first, 127)) + length.to_bytes(8, "big")
