"""The listening sockets, accepted from here: a crowd the server refuses costs it as little as can
be.

The event loop's own server builds, for every connection it accepts, a transport and a protocol
(and websockets a ``ServerProtocol`` beside them) before the first byte is read, and wakes again
to read it. While admission control refuses a crowd (``realtime.admission``), that is all thrown
away at the first bytes. :class:`Listener` accepts the connections itself, in batches, and, while
``busy()`` says the server refuses, looks at a new connection's first bytes without taking them
(``MSG_PEEK``): a WebSocket handshake ``screen`` refuses is answered and closed right there, on the
bare socket. Under 400 streaming sessions that took a refusal from ~200 µs of the server's core
to ~130 (docs/scheduler.md). After a wake-up that refused, accepting rests :data:`REST_SECONDS`,
so that the rest of a crowd is refused in batches (~50 µs each). Every other connection goes to
the event loop as it would have (``loop.connect_accepted_socket``), to the protocol ``factory``
builds.

It stands in for the ``asyncio.Server`` that websockets' ``Server`` drives (``close``,
``wait_closed``, ``sockets``, ``is_serving``...), so websockets' handshakes, handlers and shutdown
work as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl as ssl_module
from collections.abc import Callable
from typing import Any

log = logging.getLogger("realtime")
#: Connections accepted per wake-up at most: the loop gets back to the sessions in between.
ACCEPT_BATCH = 64
#: Pending connections the kernel keeps for each listening socket (asyncio's default is 100: a
#: burst of new clients overflowed it, and the kernel dropped their SYNs for a second).
BACKLOG = 1024
#: Seconds accepting pauses after the process ran out of file descriptors (as asyncio does).
PAUSE_SECONDS = 1.0
#: The most of a new connection's first bytes looked at (a handshake's head is far smaller).
PEEK_BYTES = 16 * 1024
#: Seconds accepting rests after a wake-up that refused connections and emptied the backlog.
#: Meanwhile a crowd's connections wait in the kernel's accept queue, and are refused in a
#: batch at the next wake-up instead of one or two wake-ups each, among the sessions' work.
#: Beside 330 streaming sessions a crowd's refusal took ~0.15 ms of the server's core one by
#: one, ~0.05 in batches (docs/scheduler.md). A refusal, and a connection let through while a
#: crowd is refused, comes up to this much later.
REST_SECONDS = 0.02


def bind(
    host: str | None, port: int, reuse_port: bool, backlog: int = BACKLOG
) -> list[socket.socket]:
    """Listening sockets on every address ``host`` resolves to (all interfaces for None or
    ``""``), as ``loop.create_server`` binds them: non-blocking, ``SO_REUSEADDR``, IPv6 ones
    IPv6-only, ``SO_REUSEPORT`` when sibling processes share the port."""
    infos = socket.getaddrinfo(
        host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Listener:
    """Accepts on ``sockets``: refuses on the bare socket what ``screen`` refuses while
    ``busy()``, and hands every other connection to the event loop with ``factory``'s
    protocol."""

    def __init__(
        self,
        sockets: list[socket.socket],
        factory: Callable[[], asyncio.Protocol],
        busy: Callable[[], bool],
        screen: Callable[[bytes], bytes | None],
        tls: ssl_module.SSLContext | None = None,
        tls_timeout: float | None = None,
        rest: float = REST_SECONDS,
    ) -> None:
        self._sockets = sockets
        self._factory = factory
        self._busy = busy
        self._screen = screen
        self._tls = tls
        self._tls_timeout = tls_timeout
        self._rest = rest
        #: Per listening socket resting (:data:`REST_SECONDS`, or out of file descriptors):
        #: the timer that takes it up again.
        self._resting: dict[int, asyncio.TimerHandle] = {}
        self._loop = asyncio.get_running_loop()
        self._serving = False
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed_waiter: asyncio.Future[None] = self._loop.create_future()
        #: Connections refused here, on the bare socket (admission control counts every refusal
        #: by its reason; this tells how many took the short way).
        self.refused = 0

    # --- what websockets' Server uses of an asyncio.Server ----------------------------------

    async def start(self) -> Listener:
        """Start accepting; what websockets' ``Server`` awaits for its ``asyncio.Server``."""
        await self.start_serving()
        return self

    async def start_serving(self) -> None:
        if self._serving or self._closed:
            return
        self._serving = True
        for sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def is_serving(self) -> bool:
        return self._serving

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def close(self) -> None:
        """Stop accepting and close the listening sockets; open connections stay."""
        if self._closed:
            return
        self._closed, self._serving = True, False
        for timer in self._resting.values():
            timer.cancel()
        self._resting.clear()
        for sock in self._sockets:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(sock.fileno())
            sock.close()
        if not self._tasks and not self._closed_waiter.done():
            self._closed_waiter.set_result(None)

    async def wait_closed(self) -> None:
        """Until closed and every accepted connection is handed to the event loop."""
        if self._closed:
            await asyncio.shield(self._closed_waiter)

    async def serve_forever(self) -> None:
        await self.start_serving()
        await self._loop.create_future()  # until cancelled

    # --- accepting ---------------------------------------------------------------------------

    def _accept(self, listening: socket.socket) -> None:
        refused = False
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = listening.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                if refused and self._rest > 0:  # a crowd: the next of it in one batch
                    self._pause(listening, self._rest)
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("event=accept_paused error=%s seconds=%g", e, PAUSE_SECONDS)
                    self._pause(listening, PAUSE_SECONDS)
                return
            sock.setblocking(False)
            if self._busy() and self._refuse(sock):
                refused = True
                continue
            self._hand_on(sock)

    def _pause(self, listening: socket.socket, seconds: float) -> None:
        self._loop.remove_reader(listening.fileno())
        self._resting[listening.fileno()] = self._loop.call_later(seconds, self._resume, listening)

    def _resume(self, listening: socket.socket) -> None:
        self._resting.pop(listening.fileno(), None)
        if self._serving:
            self._loop.add_reader(listening.fileno(), self._accept, listening)

    def _refuse(self, sock: socket.socket) -> bool:
        """Whether ``sock`` was refused (and closed) here, from the first bytes it has sent."""
        try:
            head = sock.recv(PEEK_BYTES, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return False  # nothing yet: the event loop reads it
        except OSError:
            sock.close()
            return True
        if not head.endswith(b"\r\n\r\n"):
            return False  # not (yet) a whole head alone: not a handshake to refuse here
        refusal = self._screen(head)
        if refusal is None:
            return False
        try:
            sock.recv(len(head))  # taken, so that closing sends FIN, not RST, after the answer
            sock.send(refusal)
        except OSError:
            pass
        sock.close()
        self.refused += 1
        return True

    def _hand_on(self, sock: socket.socket) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls is None:
            connecting = self._loop.connect_accepted_socket(self._factory, sock)
        else:
            connecting = self._loop.connect_accepted_socket(
                self._factory, sock, ssl=self._tls, ssl_handshake_timeout=self._tls_timeout
            )
        task = self._loop.create_task(connecting)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._handed(t, sock))

    def _handed(self, task: asyncio.Task[Any], sock: socket.socket) -> None:
        self._tasks.discard(task)
        error = None if task.cancelled() else task.exception()
        if task.cancelled() or error is not None:
            if error is not None:  # the peer went away during a TLS handshake, or a bug
                log.warning("event=connection_failed error=%r", error)
            sock.close()
        if self._closed and not self._tasks and not self._closed_waiter.done():
            self._closed_waiter.set_result(None)
