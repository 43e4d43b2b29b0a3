"""The listener: accepting connections itself, refusing a crowd's handshakes on the bare socket.

Run on both event loops: the server runs on uvloop, whose ``connect_accepted_socket`` and
``add_reader`` are its own."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvloop

from realtime.listener import Listener, bind

HEAD = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
REFUSAL = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
LOOPS = pytest.mark.parametrize(
    "loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)
Loop = Callable[[], asyncio.AbstractEventLoop]
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def run(loop: Loop, test: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=loop) as runner:
        runner.run(test)


class Echo(asyncio.Protocol):
    """Sends back what it gets; keeps it too."""

    made: list[Echo] = []

    def __init__(self) -> None:
        self.got = b""
        Echo.made.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got += data
        self.transport.write(data)


class Screen:
    """Refuses every handshake it is shown, or none; keeps what it was shown."""

    def __init__(self, refuse: bool) -> None:
        self.refuse = refuse
        self.shown: list[bytes] = []

    def __call__(self, head: bytes) -> bytes | None:
        self.shown.append(head)
        return REFUSAL if self.refuse else None


@asynccontextmanager
async def listening(busy: bool, screen: Screen, rest: float = 0.0) -> AsyncIterator[Listener]:
    """A listener on loopback, not yet accepting; closed at the end. It rests ``rest`` seconds
    after refusing (0: never; the tests about resting say how long)."""
    Echo.made = []
    listener = Listener(bind("127.0.0.1", 0, False), Echo, lambda: busy, screen, rest=rest)
    try:
        yield listener
    finally:
        listener.close()
        await listener.wait_closed()


async def client(listener: Listener, first: bytes = b"") -> Stream:
    """A client of ``listener`` that sent ``first`` before it was accepted (connected, it waits
    in the kernel's backlog): as a crowd's handshakes mostly have by the time a busy server gets
    to them. The listener accepts from here on."""
    sock = socket.create_connection(("127.0.0.1", listener.sockets[0].getsockname()[1]))
    sock.sendall(first)
    await listener.start()
    return await asyncio.open_connection(sock=sock)


async def echoed(stream: Stream, data: bytes) -> bytes:
    return await asyncio.wait_for(stream[0].readexactly(len(data)), 10)


@LOOPS
def test_a_refused_handshake_is_answered_and_closed_on_the_bare_socket(loop: Loop) -> None:
    async def test() -> None:
        screen = Screen(refuse=True)
        async with listening(True, screen) as listener:
            reader, writer = await client(listener, HEAD)
            # The whole answer, then a clean end of stream: the head was taken before the
            # close, so the kernel sent FIN, not RST (which could have thrown the answer away).
            assert await asyncio.wait_for(reader.read(), 10) == REFUSAL
            assert listener.refused == 1 and Echo.made == [] and screen.shown == [HEAD]
            writer.close()

    run(loop, test())


@LOOPS
def test_a_handshake_the_screen_lets_through_reaches_its_protocol_whole(loop: Loop) -> None:
    async def test() -> None:
        screen = Screen(refuse=False)
        async with listening(True, screen) as listener:
            stream = await client(listener, HEAD)
            assert await echoed(stream, HEAD) == HEAD  # looked at, not taken from the socket
            assert screen.shown == [HEAD] and listener.refused == 0 and Echo.made[0].got == HEAD
            stream[1].close()

    run(loop, test())


@LOOPS
def test_a_head_not_yet_whole_goes_to_the_event_loop(loop: Loop) -> None:
    async def test() -> None:
        screen = Screen(refuse=True)
        async with listening(True, screen) as listener:
            stream = await client(listener, HEAD[:10])
            assert await echoed(stream, HEAD[:10]) == HEAD[:10]
            stream[1].write(HEAD[10:])  # the event loop's protocol decides (the front door)
            assert await echoed(stream, HEAD[10:]) == HEAD[10:]
            assert screen.shown == [] and listener.refused == 0
            stream[1].close()

    run(loop, test())


@LOOPS
def test_while_the_server_is_not_refusing_nothing_is_looked_at(loop: Loop) -> None:
    async def test() -> None:
        screen = Screen(refuse=True)
        async with listening(False, screen) as listener:
            for _ in range(3):
                stream = await client(listener, HEAD)
                assert await echoed(stream, HEAD) == HEAD
                stream[1].close()
            assert screen.shown == [] and len(Echo.made) == 3

    run(loop, test())


@LOOPS
def test_after_refusing_a_crowd_the_listener_rests_and_takes_the_next_in_one_batch(
    loop: Loop,
) -> None:
    async def test() -> None:
        rest = 0.2
        screen = Screen(refuse=True)
        async with listening(True, screen, rest) as listener:
            started = asyncio.get_running_loop().time()  # before the rest can have begun
            first, _ = await client(listener, HEAD)
            assert await asyncio.wait_for(first.read(), 10) == REFUSAL
            # Two more of the crowd while the listener rests: both wait in the backlog, and
            # are refused together when it wakes, no sooner.
            later = [await client(listener, HEAD) for _ in range(2)]
            answers = await asyncio.gather(*(asyncio.wait_for(r.read(), 10) for r, _ in later))
            waited = asyncio.get_running_loop().time() - started
            assert answers == [REFUSAL, REFUSAL] and listener.refused == 3
            # (A loop may fire a timer up to its clock's resolution early.)
            assert waited >= rest - 0.02
            assert len(screen.shown) == 3

    run(loop, test())


@LOOPS
def test_a_connection_let_through_while_resting_is_served_when_the_rest_is_over(
    loop: Loop,
) -> None:
    async def test() -> None:
        screen = Screen(refuse=True)
        async with listening(True, screen, 0.05) as listener:
            refused, _ = await client(listener, HEAD)
            assert await asyncio.wait_for(refused.read(), 10) == REFUSAL
            screen.refuse = False  # a resume, say: let through
            stream = await client(listener, HEAD)
            assert await echoed(stream, HEAD) == HEAD
            assert listener.refused == 1 and len(Echo.made) == 1
            stream[1].close()

    run(loop, test())


@LOOPS
def test_a_listener_closed_while_resting_stays_closed(loop: Loop) -> None:
    async def test() -> None:
        screen = Screen(refuse=True)
        async with listening(True, screen, 3600.0) as listener:
            refused, _ = await client(listener, HEAD)
            assert await asyncio.wait_for(refused.read(), 10) == REFUSAL
            assert listener._resting  # resting, for an hour
        assert not listener._resting and not listener.is_serving()

    run(loop, test())


@LOOPS
def test_a_closed_listener_accepts_no_more_but_leaves_connections_open(loop: Loop) -> None:
    async def test() -> None:
        async with listening(False, Screen(refuse=False)) as listener:
            port = listener.sockets[0].getsockname()[1]
            stream = await client(listener, b"x")
            assert await echoed(stream, b"x") == b"x"
            assert listener.is_serving()
        assert not listener.is_serving()  # closed on leaving the block
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        stream[1].write(b"y")  # the open connection stays
        assert await echoed(stream, b"y") == b"y"
        stream[1].close()

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
