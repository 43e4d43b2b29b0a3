"""The listener: accepting connections itself, refusing a crowd's handshakes on the bare socket.

Run on both event loops: the server runs on uvloop, whose ``connect_accepted_socket`` and
``add_reader`` are its own."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from realtime.listener import Listener, bind

HEAD = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
REFUSAL = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


LOOPS = pytest.mark.parametrize("loop", [asyncio.new_event_loop, uvloop.new_event_loop])
Loop = Callable[[], asyncio.AbstractEventLoop]


def run(loop: Loop, test: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=loop) as runner:
        runner.run(test)


class Echo(asyncio.Protocol):
    """Sends back what it gets; keeps it too."""

    made: list[Echo] = []

    def __init__(self) -> None:
        self.got = b""
        self.arrived = asyncio.Event()
        Echo.made.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got += data
        self.arrived.set()
        self.transport.write(data)


class Screen:
    """Refuses every handshake it is shown, or none; counts them."""

    def __init__(self, refuse: bool) -> None:
        self.refuse = refuse
        self.shown: list[bytes] = []

    def __call__(self, head: bytes) -> bytes | None:
        self.shown.append(head)
        return REFUSAL if self.refuse else None


async def listening(busy: bool, screen: Screen, start: bool = True) -> tuple[Listener, int]:
    Echo.made = []
    listener = Listener(bind("127.0.0.1", 0, False), Echo, lambda: busy, screen)
    if start:
        await listener.start()
    return listener, listener.sockets[0].getsockname()[1]


async def read_all(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), 10)


@LOOPS
def test_a_refused_handshake_is_answered_and_closed_on_the_bare_socket(loop: Loop) -> None:
    async def test() -> None:
        screen = Screen(refuse=True)
        listener, port = await listening(True, screen, start=False)
        # Connected (the kernel's backlog takes it) and its head sent before the accept: as a
        # crowd's handshakes mostly are by the time a busy server gets to them.
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(HEAD)
        await listener.start()
        reader, writer = await asyncio.open_connection(sock=client)
        # The whole answer, then a clean end of stream: the head was taken before the close,
        # so the kernel sent FIN, not RST (which could have thrown the answer away).
        assert await read_all(reader) == REFUSAL
        assert listener.refused == 1 and Echo.made == [] and screen.shown == [HEAD]
        writer.close()
        listener.close()
        await listener.wait_closed()

    run(loop, test())


@LOOPS
def test_a_handshake_the_screen_lets_through_reaches_its_protocol_whole(loop: Loop) -> None:
    async def test() -> None:
        screen = Screen(refuse=False)
        listener, port = await listening(True, screen)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HEAD)
        assert await asyncio.wait_for(reader.readexactly(len(HEAD)), 10) == HEAD  # echoed
        # Looked at (when it had come by the accept) without being taken from the socket.
        assert screen.shown in ([], [HEAD])
        assert listener.refused == 0 and Echo.made[0].got == HEAD
        writer.close()
        listener.close()
        await listener.wait_closed()

    run(loop, test())


@LOOPS
def test_a_head_not_yet_whole_goes_to_the_event_loop(loop: Loop) -> None:
    async def test() -> None:
        screen = Screen(refuse=True)
        listener, port = await listening(True, screen)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HEAD[:10])
        assert await asyncio.wait_for(reader.readexactly(10), 10) == HEAD[:10]
        writer.write(HEAD[10:])  # the event loop's protocol decides now (the server's front door)
        assert await asyncio.wait_for(reader.readexactly(len(HEAD) - 10), 10) == HEAD[10:]
        assert screen.shown == [] and listener.refused == 0
        writer.close()
        listener.close()
        await listener.wait_closed()

    run(loop, test())


@LOOPS
def test_while_the_server_is_not_refusing_nothing_is_looked_at(loop: Loop) -> None:
    async def test() -> None:
        screen = Screen(refuse=True)
        listener, port = await listening(False, screen)
        connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        for reader, writer in connections:
            writer.write(HEAD)
            assert await asyncio.wait_for(reader.readexactly(len(HEAD)), 10) == HEAD
            writer.close()
        assert screen.shown == [] and len(Echo.made) == 3
        listener.close()
        await listener.wait_closed()

    run(loop, test())


@LOOPS
def test_a_closed_listener_accepts_no_more_but_leaves_connections_open(loop: Loop) -> None:
    async def test() -> None:
        listener, port = await listening(False, Screen(refuse=False))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x")
        assert await asyncio.wait_for(reader.readexactly(1), 10) == b"x"
        assert listener.is_serving()
        listener.close()
        await listener.wait_closed()
        assert not listener.is_serving()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"y")  # the open connection stays
        assert await asyncio.wait_for(reader.readexactly(1), 10) == b"y"
        writer.close()

    run(loop, test())


def test_sibling_processes_share_a_port_only_with_reuse_port() -> None:
    first = bind("127.0.0.1", 0, True)
    port = first[0].getsockname()[1]
    try:
        second = bind("127.0.0.1", port, True)
        assert second[0].getsockname()[1] == port and not second[0].getblocking()
        second[0].close()
        with pytest.raises(OSError):
            bind("127.0.0.1", port, False)
    finally:
        first[0].close()


def test_a_host_name_binds_every_address_it_resolves_to() -> None:
    families = {info[0] for info in socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)}
    sockets = bind("localhost", 0, False)
    try:
        assert {s.family for s in sockets} == families
    finally:
        for s in sockets:
            s.close()
