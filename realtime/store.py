"""Where a session goes when it leaves a server process, and where a process finds a session it
does not hold: the folder of ``--resume-dir``, the sibling processes of ``--processes N``, Redis.

A session lives in the process that serves it. When a client resumes on a process that does not
hold its session (the kernel picked another ``SO_REUSEPORT`` listener; a load balancer another
machine), that process asks the store to :meth:`SessionStore.take` it: a sibling that holds it
hands it off (its chunks in flight are answered first, or failed typed), or a hand-off written at
a drain (or, with Redis, a checkpoint) is claimed. A session is taken once: one process serves it
at a time. The bytes moved are :mod:`realtime.handoff` dumps.

Sibling processes on one machine find each other through Unix sockets in a private folder the
supervisor creates (``peer-<pid>.sock``); the same sockets carry each one's ``/metrics`` so any
of them can answer for all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from realtime import handoff

if TYPE_CHECKING:
    from realtime.config import Config

log = logging.getLogger("realtime")

#: Hands off a held session to another process: its bytes, or None if not held with this key.
Give = Callable[[str, str | None], Awaitable[bytes | None]]
#: This process's metrics, in the Prometheus text format.
Exposition = Callable[[], bytes]
#: How long a process waits for a sibling to hand a session off (its in-flight chunks included).
ASK_SECONDS = 15.0


class SessionStore(Protocol):
    """Sessions moving between server processes (see the module docstring)."""

    #: Seconds between checkpoints of each changed session (0: this store keeps none).
    checkpoint_seconds: float

    async def start(self, give: Give, exposition: Exposition) -> None:
        """Start answering other processes: hand them sessions, tell them our metrics."""

    async def take(self, token: str, key: str | None) -> tuple[bytes, bool] | None:
        """Claim the session ``token`` names for a client with ``key``: its bytes and whether
        they are a checkpoint (older than the session); None if no process or hand-off has it."""

    def keeps_hand_offs(self) -> bool:
        """Whether a draining process hands its sessions here (else they end with it)."""

    async def put(self, token: str, key: str | None, data: bytes, ttl: float) -> None:
        """Keep a drained session for ``ttl`` seconds, for another process to take."""

    async def checkpoint(self, token: str, key: str | None, data: bytes, ttl: float) -> None:
        """Keep a live session's latest checkpoint (stores with ``checkpoint_seconds``)."""

    async def forget(self, token: str, key: str | None) -> None:
        """The session ended here: drop what the store keeps of it."""

    async def peer_expositions(self) -> list[bytes]:
        """The metrics of this machine's sibling processes."""

    async def close(self) -> None:
        """Stop answering; release connections and sockets."""


class Peers:
    """This process's socket among its siblings', in the supervisor's private folder.

    One request per connection, one line: ``take <token> <key or ->`` (the reply is a handed-off
    session, or nothing) or ``metrics`` (the reply is the Prometheus text). A sibling that
    died leaves a socket nobody listens on: asking it fails at once and counts as "not held".
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / f"peer-{os.getpid()}.sock"
        self._server: asyncio.AbstractServer | None = None
        self._give: Give | None = None
        self._exposition: Exposition | None = None

    async def start(self, give: Give, exposition: Exposition) -> None:
        """Listen for siblings' requests."""
        self._give, self._exposition = give, exposition
        self.path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._answer, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            words = (await reader.readline()).decode().split()
            if words == ["metrics"] and self._exposition is not None:
                writer.write(self._exposition())
            elif len(words) == 3 and words[0] == "take" and self._give is not None:
                data = await self._give(words[1], None if words[2] == "-" else words[2])
                if data is not None:
                    writer.write(data)
            await writer.drain()
        except (OSError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

    def siblings(self) -> list[Path]:
        """The other processes' sockets."""
        return [p for p in self.folder.glob("peer-*.sock") if p != self.path]

    async def _ask(self, path: Path, line: str) -> bytes:
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
        except OSError:  # a sibling that died (or is restarting): it holds nothing
            return b""
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            return await reader.read()
        except OSError:
            return b""
        finally:
            writer.close()

    async def take(self, token: str, key: str | None) -> bytes | None:
        """Ask every sibling for the session; the one holding it hands it off."""
        line = f"take {token} {key or '-'}"
        asks = [self._ask(p, line) for p in self.siblings()]
        try:
            replies = await asyncio.wait_for(asyncio.gather(*asks), ASK_SECONDS)
        except TimeoutError:
            log.warning("event=peer_take_timeout seconds=%g", ASK_SECONDS)
            return None
        return next((r for r in replies if r), None)

    async def expositions(self) -> list[bytes]:
        """Every sibling's metrics (a sibling that does not answer within a second is left out)."""
        asks = [asyncio.wait_for(self._ask(p, "metrics"), 1.0) for p in self.siblings()]
        replies = await asyncio.gather(*asks, return_exceptions=True)
        return [r for r in replies if isinstance(r, bytes) and r]

    async def close(self) -> None:
        """Stop listening and remove the socket."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        self.path.unlink(missing_ok=True)


class LocalStore:
    """No Redis: sessions move between the processes of one machine, through siblings' sockets
    (``peers``) and, at a drain, the ``--resume-dir`` folder (``folder``). No checkpoints: a
    process that dies takes its sessions with it."""

    checkpoint_seconds = 0.0

    def __init__(self, folder: Path | None, peers: Peers | None, max_age: float) -> None:
        self.folder = folder
        self.peers = peers
        if folder is not None:
            handoff.check_dir(folder)
            swept = handoff.sweep(folder, max_age)
            log.info("event=resume_dir path=%s expired_removed=%d", folder, swept)

    async def start(self, give: Give, exposition: Exposition) -> None:
        """Start answering siblings (if there are any)."""
        if self.peers is not None:
            await self.peers.start(give, exposition)

    async def take(self, token: str, key: str | None) -> tuple[bytes, bool] | None:
        """A sibling's session, or a drained process's from the folder."""
        if self.folder is not None:
            data = await asyncio.to_thread(handoff.take, self.folder, token)
            if data is not None:
                return data, False
        if self.peers is not None:
            got = await self.peers.take(token, key)
            if got is not None:
                return got, False
        return None

    def keeps_hand_offs(self) -> bool:
        """Only with a folder."""
        return self.folder is not None

    async def put(self, token: str, key: str | None, data: bytes, ttl: float) -> None:
        """Write the session's file in the folder."""
        assert self.folder is not None
        await asyncio.to_thread(handoff.write, self.folder, token, data)

    async def checkpoint(self, token: str, key: str | None, data: bytes, ttl: float) -> None:
        """Never called: no checkpoints without Redis."""

    async def forget(self, token: str, key: str | None) -> None:
        """Nothing is kept of a live session."""

    async def peer_expositions(self) -> list[bytes]:
        """Siblings' metrics."""
        return [] if self.peers is None else await self.peers.expositions()

    async def close(self) -> None:
        """Stop answering siblings."""
        if self.peers is not None:
            await self.peers.close()


def open_store(config: Config) -> SessionStore | None:
    """The store a server's flags ask for: Redis, or siblings and a folder; None for neither
    (one process without ``--resume-dir``: sessions never leave it)."""
    peers = None if config.peer_dir is None else Peers(config.peer_dir)
    if config.redis_url is not None:
        from realtime.redis_store import RedisStore  # the redis package only where it is used

        return RedisStore(config.redis_url, config.checkpoint_seconds, peers)
    if peers is None and config.resume_dir is None:
        return None
    return LocalStore(config.resume_dir, peers, config.limits.resume_seconds)
