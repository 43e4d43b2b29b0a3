"""realtime/framing.py against websockets' own client and server protocols: the same bytes,
the same messages, whatever the reads' boundaries."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from realtime import framing


def client() -> ClientProtocol:
    c = ClientProtocol(parse_uri("ws://127.0.0.1/"))
    c.state = State.OPEN
    return c


def server() -> ServerProtocol:
    """A websockets server protocol past its handshake, its parser at its first frame."""
    c = ClientProtocol(parse_uri("ws://127.0.0.1/"))
    c.send_request(c.connect())
    s = ServerProtocol()
    s.receive_data(b"".join(c.data_to_send()))
    (request,) = s.events_received()
    s.send_response(s.accept(request))  # type: ignore[arg-type]
    assert s.state is State.OPEN
    s.data_to_send()
    return s


def sent(c: ClientProtocol) -> bytes:
    return b"".join(c.data_to_send())


def test_a_whole_binary_message_is_split_off_and_unmasked() -> None:
    c = client()
    for payload in (b"", b"x" * 125, b"y" * 126, os.urandom(70_000)):
        c.send_binary(payload)
        data = b"!!" + sent(c)  # at an offset
        assert framing.next_frame(data, 2, 1 << 20) == (framing.BINARY, payload, len(data))


def test_every_other_frame_comes_back_whole() -> None:
    c = client()
    c.send_text(b'{"type":"hello"}')
    text = sent(c)
    c.send_ping(b"p")
    ping = sent(c)
    c.send_binary(b"first half", fin=False)
    fragment = sent(c)
    c.send_continuation(b"second half", fin=True)
    continuation = sent(c)
    c.send_close(1000, "bye")
    close = sent(c)
    data = text + ping + fragment + continuation + close
    pos, got = 0, []
    while pos < len(data):
        kind, frame, pos = framing.next_frame(data, pos, 1 << 20)
        assert kind == framing.OTHER
        got.append(frame)
    assert got == [text, ping, fragment, continuation, close]


def test_an_unmasked_client_frame_is_left_to_websockets_to_refuse() -> None:
    s = ServerProtocol()
    s.state = State.OPEN
    s.send_binary(b"abc")  # a server's frame: not masked
    data = sent(s)  # type: ignore[arg-type]
    assert framing.next_frame(data, 0, 100) == (framing.OTHER, data, len(data))


def test_a_frame_not_whole_yet_says_how_far_to_read() -> None:
    c = client()
    c.send_binary(os.urandom(300))
    data = sent(c)
    for cut in range(len(data)):
        kind, _, end = framing.next_frame(data[:cut], 0, 1 << 20)
        assert kind == framing.INCOMPLETE and cut < end <= len(data)


def test_an_oversize_frame_hands_over_every_byte_at_once() -> None:
    c = client()
    c.send_binary(b"z" * 1000)
    data = sent(c)[:20]  # its header, and the start of it
    assert framing.next_frame(data, 0, 999) == (framing.OTHER, data, len(data))


@pytest.mark.parametrize("length", [0, 1, 125, 126, 65535, 65536, 100_000])
@pytest.mark.parametrize("text", [True, False])
def test_a_server_frame_is_what_websockets_would_send(length: int, text: bool) -> None:
    s = ServerProtocol()
    s.state = State.OPEN
    payload = b"a" * length
    if text:
        s.send_text(payload)
    else:
        s.send_binary(payload)
    assert framing.frame_head(length, text) + payload == b"".join(s.data_to_send())


messages = st.lists(
    st.tuples(st.sampled_from(["binary", "text", "ping", "fragmented"]), st.binary(max_size=300)),
    max_size=12,
)


@given(messages, st.lists(st.integers(1, 400), max_size=20))
@settings(max_examples=200, deadline=None)
def test_any_reads_give_websockets_whole_frames_and_the_same_messages(
    sends: list[tuple[str, bytes]], reads: list[int]
) -> None:
    """A client's frames, read in pieces of any size: binary messages come out of
    next_frame, everything else goes to a websockets server protocol whole, and together they
    give the messages websockets alone would."""
    c = client()
    expected: list[tuple[str, bytes]] = []
    for kind, payload in sends:
        if kind == "binary":
            c.send_binary(payload)
        elif kind == "text":
            payload = payload.hex().encode()
            c.send_text(payload)
        elif kind == "ping":
            payload = payload[:125]
            c.send_ping(payload)
        else:  # a fragmented message, a ping between its frames (RFC 6455 allows it)
            half = len(payload) // 2
            c.send_binary(payload[:half], fin=False)
            c.send_ping(b"")
            c.send_continuation(payload[half:], fin=True)
            expected.append(("ping", b""))
        expected.append((kind, payload))
    stream = sent(c)

    ws = server()
    got: list[tuple[str, bytes]] = []
    parts: list[bytes] = []

    def to_websockets(frame: bytes) -> None:
        assert not ws.reader.buffer  # websockets was left at the start of a frame
        ws.receive_data(frame)
        assert not ws.reader.buffer  # and was given a whole one
        for event in ws.events_received():
            op = event.opcode.name  # type: ignore[union-attr]
            data = bytes(event.data)  # type: ignore[union-attr]
            if op == "TEXT":
                got.append(("text", data))
            elif op == "PING":
                got.append(("ping", data))
            elif op == "BINARY":  # a fragmented message's first frame
                parts[:] = [data]
            elif op == "CONT":
                got.append(("fragmented", b"".join([*parts, data])))

    rest, cuts, at = b"", [*reads, len(stream)], 0
    for n in cuts:
        chunk, at = stream[at : at + n], at + n
        data, pos = rest + chunk, 0
        while True:  # as realtime.server._Socket.data_received does
            start = pos
            kind, frame, pos = framing.next_frame(data, start, 1 << 20)
            if kind == framing.INCOMPLETE:
                rest = data[start:]
                break
            if kind == framing.BINARY and ws.current_size is None:
                got.append(("binary", frame))
            else:
                to_websockets(data[start:pos])
        if at >= len(stream):
            break
    assert rest == b""
    assert got == expected
