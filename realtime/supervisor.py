"""``realtime serve --processes N``: one parent starting and watching N server processes.

Each child is a whole server (its own event loop, scheduler and ONNX Runtime sessions) listening
on the same port with ``SO_REUSEPORT``: the kernel spreads new connections over them. The parent
serves nothing itself. It reserves the port (so ``--port 0`` picks one port for all), gives the
children a private folder where they find each other (:class:`realtime.store.Peers`: a session
resumes on whichever child its reconnect lands on; any child's ``/metrics`` covers all of them),
forwards SIGTERM, SIGINT and SIGHUP to every child, restarts a child that exits on its own, and
exits once they all have after a SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from realtime import __version__, errors
from realtime.config import usable_cores

log = logging.getLogger("realtime")
PR_SET_PDEATHSIG = 1  # prctl(2)
#: Seconds a restarted child waits first, doubling while children keep dying, up to the last.
RESTART_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def stop_with_parent() -> None:
    """Have the kernel send this process SIGTERM (a drain) when its parent dies, so that a
    supervisor killed with SIGKILL leaves no server processes behind (Linux; else nothing)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() == 1:  # the parent died before the call: nobody will tell us
        os.kill(os.getpid(), signal.SIGTERM)


def default_processes() -> int:
    """One per core this process may run on."""
    return usable_cores()


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to ``host:port`` with SO_REUSEPORT: it fixes the port
    ``--port 0`` picks and fails early when another program holds it; it takes no connections."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise errors.ConfigError(f"cannot bind {host}:{port}: {e.strerror}") from None
    return sock


class Supervisor:
    """The parent of N server processes (see the module docstring)."""

    def __init__(self, argv: Sequence[str], processes: int, host: str, port: int) -> None:
        self.argv = list(argv)
        self.processes = processes
        self.host = host
        self.port = port
        self.children: list[asyncio.subprocess.Process | None] = [None] * processes
        self.stopping = False
        self.restarts = 0
        self._banner: list[str] = []
        self._announced = False  # the banner is printed
        self._ready: list[asyncio.Event] = []
        self._failed: asyncio.Future[int] | None = None
        self.peer_dir = Path()

    def _command(self, peer_dir: Path) -> list[str]:
        # Flags given last win: the child serves one process on the reserved port. -P: the
        # child imports the realtime this process runs (an installed, compiled one), not a
        # checkout's sources that happen to be in the working directory.
        return [
            sys.executable,
            "-P",
            "-m",
            "realtime",
            "serve",
            *self.argv,
            "--processes",
            "1",
            "--port",
            str(self.port),
            "--peer-dir",
            str(peer_dir),
        ]

    async def run(self) -> int:
        """Start the children, print one banner once all listen, supervise until stopped."""
        reserved = reserve_port(self.host, self.port)
        self.port = reserved.getsockname()[1]
        peer_dir = self.peer_dir = Path(tempfile.mkdtemp(prefix="realtime-peers-"))  # 0700
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        self._failed = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        self._ready = [asyncio.Event() for _ in range(self.processes)]
        command = self._command(peer_dir)
        watchers: list[asyncio.Task[None]] = []
        stopped = loop.create_task(stop.wait())
        try:
            # The first child alone, then the others: a bad flag or model is reported once, and
            # the others start from the graph cache the first one filled.
            for batch in ([0], range(1, self.processes)):
                watchers += [loop.create_task(self._watch(i, command)) for i in batch]
                ready = loop.create_task(_all(self._ready[i] for i in batch))
                waits: list[asyncio.Future[Any]] = [ready, self._failed, stopped]
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                ready.cancel()
                if self._failed.done() or stop.is_set():
                    break
            if self._failed.done():
                code = self._failed.result()
                log.error("event=child_failed_at_start code=%d", code)
            elif not stop.is_set():
                lines = self._banner or [""]
                head = f"{lines[0]} ({self.processes} processes)"
                print(head, *lines[1:], sep="\n", flush=True)
                self._announced = True
                await stop.wait()
            log.info("event=shutdown processes=%d", self.processes)
            self.stopping = True
            self._forward(signal.SIGTERM)
            await asyncio.gather(*watchers, return_exceptions=True)
            return (self._failed.result() or 1) if self._failed.done() else 0
        finally:
            stopped.cancel()
            for w in watchers:
                w.cancel()
            reserved.close()
            shutil.rmtree(peer_dir, ignore_errors=True)

    def _forward(self, sig: signal.Signals) -> None:
        for child in self.children:
            if child is not None and child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(sig)

    async def _watch(self, index: int, command: list[str]) -> None:
        """Run child ``index``; start it again whenever it exits while we are not stopping."""
        failures = 0
        while not self.stopping:
            child = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL
            )
            self.children[index] = child
            log.info("event=child_started index=%d pid=%d", index, child.pid)
            assert child.stdout is not None
            reader = asyncio.get_running_loop().create_task(self._read(index, child.stdout))
            code = await child.wait()
            await reader
            (self.peer_dir / f"peer-{child.pid}.sock").unlink(missing_ok=True)
            if self.stopping:
                return
            if not self._ready[index].is_set():  # died before listening: a config error
                if self._failed is not None and not self._failed.done():
                    self._failed.set_result(code)
                return
            self.restarts += 1
            delay = RESTART_DELAYS[min(failures, len(RESTART_DELAYS) - 1)]
            failures += 1
            log.warning(
                "event=child_exited index=%d pid=%d code=%d restart_in=%.1f",
                index,
                child.pid,
                code,
                delay,
            )
            await asyncio.sleep(delay)  # a back-off, so a child that keeps dying does not spin

    async def _read(self, index: int, out: asyncio.StreamReader) -> None:
        """Every child's "serving" line says it listens; child 0's banner becomes ours."""
        collect = index == 0 and not self._announced
        async for raw in out:
            line = raw.decode(errors="replace").rstrip("\n")
            if " serving " in line:
                self._ready[index].set()
            if not collect:
                continue
            if self._announced:
                print(line, flush=True)
            elif self._banner or " serving " in line:
                self._banner.append(line)


async def _all(events: Iterable[asyncio.Event]) -> None:
    """Return once every one of ``events`` is set."""
    for event in events:
        await event.wait()


def serve(argv: Sequence[str], processes: int, host: str, port: int) -> int:
    """Run the supervisor until SIGTERM or SIGINT; the exit code."""
    log.info("event=supervisor version=%s processes=%d", __version__, processes)
    return asyncio.run(Supervisor(argv, processes, host, port).run())
