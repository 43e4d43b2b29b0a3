"""The asyncio WebSocket server: lifecycle, handshake, and the glue between sockets and sessions.

This is the only module that uses websockets' server API. Each connection's frames go straight
from websockets' parser to its pure :class:`realtime.connection.Connection` (no task switch or
future per message); accepted work goes to the :class:`Scheduler`, whose outcomes come back to
the connection, and what the connection has to send is written once per loop iteration. HTTP
routes, parked sessions and model reload live in their own modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import math
import os
import re
import secrets
import ssl
import sys
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Event
from websockets.protocol import State as WsState
from websockets.server import ServerProtocol

from realtime import __version__, errors, handoff, http11, store
from realtime.admission import (
    Admission,
    Measurement,
    ahead_of_real_time,
    idle_seconds,
    median_over_streams,
)
from realtime.auth import AuthFailed, Grant, check_origin, credential
from realtime.batching import STALE_SHARE
from realtime.config import Config, is_loopback
from realtime.connection import CLOSE_TRY_AGAIN, Connection, State
from realtime.listener import Listener, bind
from realtime.metrics import AdmissionMetrics, Metrics, merge_expositions
from realtime.models.repository import BUILTIN_DIR, ModelRepository, scan
from realtime.models.spec import Model, RuntimeOptions
from realtime.oip_rest import RestRoutes, status_of
from realtime.oip_service import OipService
from realtime.parking import Parking
from realtime.protocol import Open
from realtime.quotas import Quotas
from realtime.relay import Link, Reader, Relay, Socket
from realtime.reload import Reloader
from realtime.routes import SERVER_NAME, Routes, load_static, response
from realtime.scheduler import Scheduler
from realtime.session import Session
from realtime.traffic import Traffic

log = logging.getLogger("realtime")
#: websockets refuses (and closes on) frames this many times over our own limit; below it, an
#: oversize message gets a typed ``message_too_big`` error and the session stays usable.
HARD_SIZE_FACTOR = 4
#: Close code for a session that sent nothing for ``Limits.idle_seconds``.
CLOSE_IDLE = 4001
#: Frames a checkpoint keeps to send again (the newest): what a connection lost when its process
#: died may not have delivered. A bound on Redis traffic per session (docs/deploy.md).
CHECKPOINT_FRAME_BYTES = 4 * 1024
#: Seconds over which live audio streams' late results are counted for admission control.
LATENESS_SECONDS = 1.0
#: Seconds after which a stream's clock minimum moves on (its least arrival lead is then the
#: least of this window and the one before).
CLOCK_SECONDS = 10.0


def load_models(config: Config) -> list[Model]:
    """Every model the config names: the built-ins, then each ``--models`` folder."""
    options = RuntimeOptions(intra_op_threads=config.intra_op_threads, cache_dir=config.graph_cache)
    dirs = ([BUILTIN_DIR] if config.builtin_models else []) + list(config.model_dirs)
    models: list[Model] = []
    seen: dict[str, Path] = {}
    for d in dirs:
        for m in scan(d, options):
            if m.key in seen:
                raise errors.ModelLoadError(
                    f"{m.path}: {m.key} is already loaded from {seen[m.key]}"
                )
            seen[m.key] = m.path
            models.append(m)
    return models


class _Socket(ServerConnection):
    """websockets' server connection, read by a :class:`realtime.relay.Reader`: each whole data
    message goes to the reader's ``on_message`` as it arrives; chunks' frames are split off the
    bytes, every other frame goes through websockets' parser."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_writable: Callable[[], None] | None = None
        self._parts: list[bytes] = []  # a fragmented message so far
        self._text = False
        self.reader = Reader(self, super().data_received)
        #: The fastest way in for bytes (the HTTP front door hands them on here).
        self.receive = self.reader.data_received

    def data_received(self, data: bytes) -> None:
        self.reader.data_received(data)

    def process_event(self, event: Event) -> None:
        if self.request is None or not isinstance(event, Frame):
            super().process_event(event)  # the handshake request
            return
        opcode = event.opcode
        message = self.reader.message
        if opcode is Opcode.BINARY or opcode is Opcode.TEXT:
            if event.fin:
                message(opcode is Opcode.TEXT, bytes(event.data))
            else:
                self._text, self._parts = opcode is Opcode.TEXT, [bytes(event.data)]
        elif opcode is Opcode.CONT:
            self._parts.append(bytes(event.data))
            if event.fin:
                data, self._parts = b"".join(self._parts), []
                message(self._text, data)
        else:
            super().process_event(event)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.on_writable is not None:
            self.on_writable()


def _too_big(ws: Socket) -> bool:
    """Whether the server closed the connection (1009) for a frame it will never take: a resume
    would only have the client send it again, so the session ends."""
    sent = ws.protocol.close_sent
    return sent is not None and sent.code == CloseCode.MESSAGE_TOO_BIG


class Server:
    """A running `realtime` server: lifecycle, connections and the HTTP side."""

    def __init__(self, config: Config, models: list[Model] | None = None) -> None:
        self.config = config
        self.models = load_models(config) if models is None else models
        self.repository = ModelRepository(self.models)
        self.traffic = Traffic()
        self._quotas = Quotas(config.limits, config.keys, config.max_connections)
        #: The per-chunk path: messages to sessions and the scheduler, outcomes back, frames out.
        self.relay = Relay(
            self.traffic,
            self._quotas,
            late_ms=config.admission.late_ms,
            shed_by_age=config.sheds_by_age,
            on_text=self._on_text,
            elsewhere=lambda item, outcome: self.oip.deliver(item, outcome),
            checkpoint=self._checkpoint,
            check_drained=self._check_drained,
        )
        self.scheduler = Scheduler(
            self.models,
            workers=config.workers,
            max_queue=config.max_queue,
            run_timeout=config.batch_timeout_seconds,
            deliver=self.relay.deliver,
            stretch=config.batch_stretch,
            # A live stream's chunk that waited a share of its deadline with a newer one behind
            # it is dropped for the newer one (with admission control, unless told otherwise).
            stale=STALE_SHARE if config.sheds_by_age else 0.0,
        )
        self.relay.scheduler = self.scheduler
        #: Every session with a socket, by session id.
        self._links: dict[str, Link] = self.relay.links
        #: Every session (with a socket or parked), by session id: where outcomes go.
        self._conns: dict[str, Connection] = self.relay.conns
        self._metrics = Metrics(self.traffic, self.scheduler.snapshot, self._open_counts).registry()
        #: Whether a new session or stream is taken (realtime.admission), fed by _measure.
        self.admission = Admission(config.admission)
        self._metrics.register(AdmissionMetrics(self.admission, lambda: len(self._links)))
        self._measuring: asyncio.TimerHandle | None = None
        self._lateness_due = 0.0  # loop time of the next lateness window's end
        self._clocks_due = 0.0  # loop time when the streams' clock minimums move on
        #: Sessions whose messages wait while the server is behind (``Admission.observe_queues``).
        self._deferred: list[Link] = []
        self.ready = False  # models warm and serving; false again once shutting down
        self._ws: WsServer | None = None
        self._reloader = Reloader(
            config, self.models, self.repository, self.scheduler, self.traffic
        )
        self._poller: asyncio.Task[None] | None = None
        #: Set after each reload pass (tests and admins await it).
        self.reloaded = asyncio.Event()
        self._drained = asyncio.Event()
        self._sessions_moved = asyncio.Event()  # set (and replaced) by _sessions_move
        self._catalog = orjson.dumps({"models": self.repository.catalog()})
        self._routes = Routes(
            readiness=self._readiness,
            stuck=lambda: self.scheduler.stuck,
            metrics=lambda: (generate_latest(self._metrics), CONTENT_TYPE_LATEST),
            catalog=lambda: self._catalog,
            static=load_static(),
        )
        #: Where sessions go to and come from other processes (None: they never leave).
        self.store = store.open_store(config)
        self._store_tasks: set[asyncio.Task[None]] = set()
        self._checkpoint_writes: set[asyncio.Task[None]] = set()
        #: Sessions a hand-off waits on until none of their chunks is in flight, by session id.
        self._quiet = self.relay.quiet
        #: Checked at the handshake, taken by the connection's handler.
        #: Weak: a handshake that fails after it was admitted leaves nothing behind.
        self._grants: weakref.WeakKeyDictionary[ServerConnection, Grant] = (
            weakref.WeakKeyDictionary()
        )
        #: Sessions whose connection was lost, until they resume or expire.
        self.parking = Parking(config.limits.resume_seconds, self._expired)
        #: The Open Inference Protocol: REST on this port (the HTTP door), gRPC on --grpc-port.
        self.oip = OipService(config, self.repository, self.scheduler, self.traffic, self._serving)
        self._http_door = http11.HttpDoor(
            RestRoutes(self.oip, partial(self._http, None)).handle,
            config.limits.max_message_bytes,
            config.limits.idle_seconds,
            SERVER_NAME,
            status_of,
            (config.limits.max_messages_per_second, config.limits.max_bytes_per_second),
        )
        self._http_door.gate = self._door
        self._grpc: Any = None  # grpc.aio.Server, imported only when --grpc-port is given
        self.grpc_port: int | None = None

    @property
    def draining(self) -> bool:
        """Shutting down: new chunks are refused, the rest answered."""
        return self.relay.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.relay.draining = value

    @property
    def port(self) -> int:
        """The bound port (useful when the config asked for port 0)."""
        assert self._ws is not None
        port: int = self._ws.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """The WebSocket URL clients connect to."""
        scheme = "wss" if self.config.certfile else "ws"
        return f"{scheme}://{self.config.host}:{self.port}/"

    @property
    def connections(self) -> list[Connection]:
        """The sessions with a socket now."""
        return [link.conn for link in self._links.values()]

    def cut(self, session_id: str) -> None:
        """Drop a session's connection as a failing network would (no close frame): the
        session is kept for its client to resume (tests, and operators moving clients)."""
        self._links[session_id].ws.transport.abort()

    def _serving(self) -> tuple[bool, bool]:
        return self.ready, self.draining

    def _open_counts(self) -> tuple[int, int, int]:
        return (
            len(self._links),
            sum(len(link.conn.session.streams) for link in self._links.values()),
            len(self.parking),
        )

    async def start(self) -> None:
        """Warm every model at every batch size, then bind and start accepting connections."""
        if self.config.warm_up:
            started = time.monotonic()
            await asyncio.get_running_loop().run_in_executor(None, self.scheduler.warm_up)
            took = time.monotonic() - started
            log.info("event=warm models=%d seconds=%.2f", len(self.models), took)
        limits = self.config.limits
        tls = None
        if self.config.certfile is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(self.config.certfile, self.config.keyfile)
        max_size = limits.max_message_bytes * HARD_SIZE_FACTOR
        # websockets' Server runs the handshakes and the handlers; this process accepts the
        # connections itself (realtime.listener), to refuse a crowd at the least cost.
        ws = serve(self._handle, process_request=self._http, server_header=SERVER_NAME)
        door = self._http_door

        def protocol() -> asyncio.Protocol:
            return door.protocol(lambda: _Socket(ServerProtocol(max_size=max_size), ws))

        sockets = bind(self.config.host, self.config.port, self.config.reuse_port)
        timeout = http11.FIRST_BYTES_SECONDS
        listener = Listener(sockets, protocol, self._refusing, self._screen, tls, timeout)
        ws.create_server = listener.start  # type: ignore[assignment]
        self._ws = await ws
        if self.config.grpc_port is not None:
            from realtime import oip_grpc  # grpcio loads only for servers that speak gRPC

            pem = None
            if self.config.certfile is not None and self.config.keyfile is not None:
                pem = (self.config.keyfile.read_bytes(), self.config.certfile.read_bytes())
            self._grpc, self.grpc_port = await oip_grpc.start(
                self.oip,
                self.config.host,
                self.config.grpc_port,
                limits.max_message_bytes,
                pem,
                self.config.reuse_port,
            )
        if self.store is not None:
            await self.store.start(self._give, self._exposition)
            if self.store.checkpoint_seconds > 0:
                self._store_task(self._checkpoints(self.store.checkpoint_seconds))
        self.ready = True
        self._measure(asyncio.get_running_loop().time())
        log.info("event=listening url=%s models=%d", self.url, len(self.models))
        if self.config.reload_seconds > 0 and self.config.model_dirs:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.reload_seconds)  # a period, not a wait for an event
            await self.reload()

    async def reload(self) -> dict[str, list[str]]:
        """Take in model versions that appeared in the model folders, retire the ones that are
        gone (see :mod:`realtime.reload`); what was added, removed and refused."""
        done = await self._reloader.reload()
        if done["added"] or done["removed"]:
            self._catalog = orjson.dumps({"models": self.repository.catalog()})
        self.reloaded.set()
        self.reloaded.clear()
        return done

    async def close(self) -> None:
        """Shut down without losing what was accepted: tell every client ``going_away``, refuse
        new sessions and new chunks (typed ``going_away`` errors) while every chunk in flight is
        run and answered (up to ``drain_seconds``; past that, what is still queued gets
        ``going_away`` errors), then close each connection with 1001. Until then a client whose
        connection drops may still come back to resume (with a resume folder, its session is
        handed to the next process instead, and the port closes once it is written)."""
        self.ready = False
        self.draining = True
        if self._measuring is not None:
            self._measuring.cancel()
        if self._poller is not None:
            self._poller.cancel()
        if self._ws is None:
            await self.scheduler.close()
            return
        drain = self.config.drain_seconds
        hand_off = self.store is not None and self.store.keeps_hand_offs()
        for link in list(self._links.values()):
            token = link.conn.session.resume_token if hand_off else None
            link.conn.going_away(drain * 1000.0, token)
            self.relay.flush(link)
        self._check_drained()
        try:
            await asyncio.wait_for(
                asyncio.gather(self._drained.wait(), self.oip.idle.wait()), drain
            )
        except TimeoutError:
            log.warning("event=drain_timeout seconds=%g", drain)
        await self.scheduler.close()  # fails what is still queued: those errors go out too
        await self._http_door.close(max(1.0, self.config.close_grace_seconds))
        if self._grpc is not None:
            await self._grpc.stop(self.config.close_grace_seconds)
        if hand_off:
            await self._hand_off()
            self._ws.close(close_connections=False)  # resumes go to the next process now
        # Chunks a client sent before the notice reached it are still on the wire: keep reading
        # (and refusing them, typed) until the client closes, and let a client whose connection
        # dropped resume here and read its answers too (unless its session was handed off), for
        # close_grace_seconds at most.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.close_grace_seconds):
                await self.sessions_settle(
                    lambda: not self._links and (hand_off or not self.parking)
                )
        self._ws.close(close_connections=False)  # no new connections; the open ones stay
        await asyncio.gather(*(self._flush_and_close(link) for link in self._links.values()))
        self.parking.expire_all()  # answered, but their clients did not come back in time
        await self._ws.wait_closed()
        if self.store is not None:
            for task in list(self._store_tasks):
                task.cancel()
            await self.store.close()

    async def _hand_off(self) -> None:
        """Write every session to the store (a folder, Redis) for the next server process."""
        assert self.store is not None
        expires_at = time.time() + self.config.limits.resume_seconds
        files: list[tuple[str, str | None, bytes]] = []
        for conn in [*(link.conn for link in self._links.values()), *self.parking.connections()]:
            token = conn.session.resume_token
            if token is None or conn.state not in (State.OPEN, State.PARKED):
                continue
            conn.abandon("the server handed this session off while the chunk ran")
            files.append((token, conn.key, handoff.dump(conn.hand_off(expires_at))))
            conn.session.disconnect()  # late outcomes here change nothing of what was written
        ttl = self.config.limits.resume_seconds
        await self._checkpoints_written()  # an older checkpoint must not land after a hand-off
        for token, key, data in files:
            await self.store.put(token, key, data, ttl)
        log.info("event=handed_off sessions=%d", len(files))

    # --- sessions moving between processes (realtime.store) -----------------------------------

    def _store_task(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._store_tasks.add(task)
        task.add_done_callback(self._store_tasks.discard)
        return task

    async def _give(self, token: str, key: str | None) -> bytes | None:
        """Hand a session this process holds to another one that its client resumed on: its
        chunks in flight are answered first (up to the batch time limit; past it they fail
        typed), then it leaves this process. None if not held here with this key."""
        live = next(
            (link for link in self._links.values() if _same(link.conn.session.resume_token, token)),
            None,
        )
        if live is not None and live.conn.key == key:  # its client saw the connection die first
            live.ws.transport.abort()
            await live.ended.wait()
        conn = self.parking.get(token)
        if conn is None or conn.key != key:
            return None
        if conn.inflight:
            quiet = self._quiet.setdefault(
                conn.session.id, asyncio.get_running_loop().create_future()
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(quiet), self.config.batch_timeout_seconds)
        if self.parking.get(token) is not conn:  # expired or taken meanwhile
            return None
        self.parking.take(token)
        self._sessions_move()
        conn.abandon("the session moved to another server process while the chunk ran")
        data = handoff.dump(conn.hand_off(time.time() + self.config.limits.resume_seconds))
        conn.session.disconnect()
        self._conns.pop(conn.session.id, None)
        await self._checkpoints_written()  # an older checkpoint must not land after a hand-off
        self._count_resume("handed_off")
        log.info("event=handed_off session=%s", conn.session.id)
        return data

    async def _checkpoints(self, period: float) -> None:
        """Every ``period`` seconds, checkpoint each session that changed (or whose checkpoint
        would expire before the next one), as soon as none of its chunks is in flight."""
        refresh = self.config.limits.resume_seconds / 2
        while True:
            await asyncio.sleep(period)  # a period, not a wait for an event
            now = time.monotonic()
            for conn in list(self._conns.values()):
                if conn.state not in (State.OPEN, State.PARKED) or not conn.session.resume_token:
                    continue
                if conn.count != conn.checkpointed or now - conn.checkpointed_at > refresh:
                    if conn.inflight:
                        conn.checkpoint_due = True  # _deliver takes it once the chunks are out
                    else:
                        self._checkpoint(conn)

    async def _checkpoints_written(self) -> None:
        """Return once every checkpoint write under way is done."""
        if self._checkpoint_writes:
            await asyncio.wait(self._checkpoint_writes)

    def _checkpoint(self, conn: Connection) -> None:
        """Write the session's checkpoint now (none of its chunks is in flight)."""
        assert self.store is not None and conn.session.resume_token is not None
        conn.checkpoint_due = False
        if conn.state is State.HANDED_OFF:
            return
        ttl = self.config.limits.resume_seconds
        snapshot = conn.snapshot(time.time() + ttl, CHECKPOINT_FRAME_BYTES)
        conn.checkpointed, conn.checkpointed_at = snapshot.written, time.monotonic()
        data = handoff.dump(snapshot)
        write = self._store_task(
            self.store.checkpoint(conn.session.resume_token, conn.key, data, ttl)
        )
        self._checkpoint_writes.add(write)
        write.add_done_callback(self._checkpoint_writes.discard)

    def _forget(self, conn: Connection) -> None:
        """A session ended here: its checkpoint, if it has one, is deleted."""
        if self.store is not None and conn.checkpointed >= 0 and conn.state is not State.HANDED_OFF:
            assert conn.session.resume_token is not None
            conn.checkpointed = -1
            self._store_task(self.store.forget(conn.session.resume_token, conn.key))

    def _exposition(self) -> bytes:
        return generate_latest(self._metrics)

    async def _all_metrics(self) -> Response:
        """This process's metrics summed with its siblings' (``--processes N``)."""
        assert self.store is not None
        others = await self.store.peer_expositions()
        body = merge_expositions([self._exposition(), *others]) if others else self._exposition()
        return response(HTTPStatus.OK, body, CONTENT_TYPE_LATEST)

    def _readiness(self) -> bytes | None:
        """Why new clients should go elsewhere now (a JSON status), or None: ready."""
        if not self.ready:
            return b'{"status":"not ready"}'
        max_queue = self.config.max_queue
        if any(q.depth >= max_queue for q in self.scheduler.queues.values()):
            # New chunks for that model are refused (overloaded): send new clients elsewhere.
            return b'{"status":"full","reason":"queue"}'
        if self._quotas.connected >= self._quotas.max_connections:  # handshakes get 503
            return b'{"status":"full","reason":"connections"}'
        reason = self.admission.full(len(self._links))
        if reason is not None:  # a new session would be refused server_busy
            return b'{"status":"full","reason":"%s"}' % reason.encode()
        return None

    def _admit_new(self, msg: Open | None) -> errors.ServerBusy | None:
        """Admission control's answer to a new session (None) or stream (its ``open``)."""
        if msg is None:  # this session is among the links already
            return self.admission.admit_session(len(self._links) - 1)
        return self.admission.admit_stream(msg.model, msg.stream)

    def _measure(self, due: float) -> None:
        """Measure the loop's lag and the load for admission control; again in one period."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        models: dict[str, tuple[float, int, int, int]] = {}
        runs: dict[str, tuple[float, int, float | None]] = {}
        workers, max_queue = self.config.workers, self.config.max_queue
        cpus = os.sched_getaffinity(0)
        for key, queue in self.scheduler.queues.items():
            name, stats = queue.model.name, queue.stats
            busy, depth, _, _ = models.get(name, (0.0, 0, 0, 0))
            models[name] = (busy + stats.infer_seconds, depth + queue.depth, workers, max_queue)
            runs[key] = (stats.infer_cpu_seconds, stats.items, queue.run_times.best_per_item())
        streaming = [link for link in self._links.values() if link.conn.session.streams]
        self.admission.observe(
            Measurement(
                now,
                max(0.0, now - due),
                time.thread_time(),
                time.process_time(),
                len(cpus),
                # Waiting sessions cost the loop their reads only: counted, they would make a
                # session look cheap, and admission would take more once they go on.
                len(streaming) - self.admission.waiting,
                models,
                _confined_idle(cpus),
                runs,
            )
        )
        self.scheduler.pace(self.admission.load)
        self._serve_first(now, streaming)
        if now >= self._lateness_due:
            self._lateness(now)
        period = self.config.admission.period
        self._measuring = loop.call_at(now + period, self._measure, now + period)

    def _serve_first(self, now: float, streaming: list[Link]) -> None:
        """While the server is behind, its oldest sessions (``streaming`` is in the order they
        connected) are served and the newest wait (``Admission.observe_queues``,
        ``Reader.defer``); those that wait too long are taken back."""
        served, late = self.scheduler.lateness()
        admission = self.admission
        first = admission.observe_queues(served, late, len(streaming), now)
        if first is None and not self._deferred:
            return
        n = admission.take_back_deferred(len(streaming), now)
        if n:
            seconds = self.config.admission.take_back_seconds
            self._take_back(streaming[-n:], f"its newest sessions waited {seconds:g} s")
        deferred = streaming[len(streaming) if first is None else first :]
        still = {id(link) for link in deferred}
        for link in self._deferred:
            if id(link) not in still:
                link.reader.defer(False)
        for link in deferred:
            link.reader.defer(True)
        self._deferred = deferred

    def _lateness(self, now: float) -> None:
        """Once a :data:`LATENESS_SECONDS` window: the median share of late results over live
        audio streams, for admission control. Every :data:`CLOCK_SECONDS` each stream's clock
        minimum moves on, so that a client's clock drifting from the server's is followed."""
        self._lateness_due = now + LATENESS_SECONDS
        move = now >= self._clocks_due
        if move:
            self._clocks_due = now + CLOCK_SECONDS
        counts: list[tuple[int, int]] = []
        lateness: list[tuple[int, float]] = []
        for conn in self._conns.values():
            for stream in conn.session.streams.values():
                if stream.answered:
                    if not ahead_of_real_time(
                        stream.clock_mark, stream.clock_min, LATENESS_SECONDS
                    ):
                        counts.append((stream.answered, stream.late))
                        lateness.append((stream.answered, stream.lateness_ms))
                    stream.answered = stream.late = 0
                    stream.lateness_ms = 0.0
                stream.clock_mark = stream.clock_min
                if move:
                    stream.clock_prev, stream.clock_min = stream.clock_min, math.inf
        admission = self.admission
        admission.observe_lateness(
            median_over_streams(counts), LATENESS_SECONDS, median_over_streams(lateness)
        )
        streaming = [link for link in self._links.values() if link.conn.session.streams]
        n = admission.take_back(len(streaming))
        if n:
            seconds = self.config.admission.take_back_seconds
            share = 100 * (admission.late_share or 0.0)
            self._take_back(streaming[-n:], f"{share:.0f} % of results late for {seconds:g} s")

    def _take_back(self, links: list[Link], why: str) -> None:
        """End these sessions (the newest connected) ``server_busy``, then close (1013): the
        admitted sessions have been late too long, or these waited too long while the server
        was behind (``why`` says which), and the rest are to be on time again."""
        busy = errors.ServerBusy(
            f"the server fell behind ({why}) and ends the newest sessions: this one ends, and "
            "chunks without an answer yet get none. Try again later or elsewhere",
            retry_after_ms=self.admission.retry_after_ms,
        )
        for link in links:
            conn = link.conn
            if conn.close_code is None:
                conn.error(busy)
                conn.close_code, conn.close_reason = CLOSE_TRY_AGAIN, "server fell behind"
                self.relay.flush(link)
        log.warning("event=take_back sessions=%d why=%r", len(links), why)

    def _check_drained(self) -> None:
        if self.draining and all(conn.inflight == 0 for conn in self._conns.values()):
            self._drained.set()

    # --- HTTP --------------------------------------------------------------------------------

    def _http(
        self, ws: ServerConnection | None, request: Request
    ) -> Response | Awaitable[Response] | None:
        """A plain GET (``ws`` None: one the HTTP door serves), or a handshake to check."""
        if ws is not None and request.headers.get("Upgrade", "").lower() == "websocket":
            self.admission.connected()
            try:
                self._admit(ws, request)
            except AuthFailed as e:
                log.info("event=refused status=%d reason=%s", e.status, e.reason.replace(" ", "_"))
                refusal = orjson.dumps({"error": e.reason})
                return response(HTTPStatus(e.status), refusal, "application/json")
            except errors.ServerBusy as e:  # past --max-connections
                self.admission.figures.refused["connections"] += 1
                return _busy(e)
            return None
        path = request.path.split("?", 1)[0]
        if path in ("/metrics", "/v1/models") and self.config.keys:
            return self._http_with_keys(path, request)
        peers = self.config.peer_dir is not None and self.store is not None
        if peers and path == "/metrics":
            return self._all_metrics()
        return self._routes.respond(request)

    def _http_with_keys(self, path: str, request: Request) -> Response | Awaitable[Response]:
        """With keys, ``/metrics`` (every key's traffic) answers a key marked ``metrics``, and
        ``/v1/models`` any credential, listing only the models it may use."""
        keys = self.config.keys
        try:
            grant = credential(request.path, request.headers, keys, time.time())
            if path == "/metrics" and not (grant.expires is None and keys[grant.key].metrics):
                raise AuthFailed(403, "this credential may not read metrics")
        except AuthFailed as e:
            refusal = orjson.dumps({"error": e.reason})
            return response(HTTPStatus(e.status), refusal, "application/json")
        if path == "/metrics":
            if self.config.peer_dir is not None and self.store is not None:
                return self._all_metrics()
            return response(HTTPStatus.OK, generate_latest(self._metrics), CONTENT_TYPE_LATEST)
        models = [m for m in self.repository.catalog() if grant.allows(m["name"])]
        return response(HTTPStatus.OK, orjson.dumps({"models": models}), "application/json")

    def _refusing(self) -> bool:
        """Whether new handshakes may be refused at the door now (a crowd, or the connection
        cap reached): realtime.listener then looks at their first bytes itself."""
        return self.admission.crowd or self._quotas.at_cap

    def _screen(self, head: bytes) -> bytes | None:
        """A new connection's first bytes, as the listener saw them: the refusal to answer it
        with, or None to let it through (to websockets, or to the HTTP door)."""
        return self._door(head) if http11.wants_websocket(head) else None

    def _door(self, head: bytes) -> bytes | None:
        """A WebSocket handshake at the front door (its whole head): the HTTP 503 that refuses
        it before websockets takes it, or None to let it through. Past ``--max-connections``;
        and, while admission control refuses a crowd, a new session it would refuse (not a
        resume): a seventh of the CPU of a refusal at ``hello``, kept for the admitted sessions."""
        if _UPGRADE.search(head) is None:  # a plain GET (/metrics, /readyz): never refused here
            return None
        busy = self._quotas.full()
        if busy is not None:
            self.admission.figures.refused["connections"] += 1
        else:
            busy = self.admission.refuse_at_door(len(self._links), _resumes(head))
            if busy is None:
                return None
        body, headers = _busy_body(busy)
        return http11.serialize(http11.Reply(503, body, headers=headers), False, SERVER_NAME)

    def _admit(self, ws: ServerConnection, request: Request) -> None:
        """Check a WebSocket handshake: origin, the server's connections, the address's
        sessions, then the credential and its key's sessions (realtime.quotas)."""
        config = self.config
        headers = request.headers
        check_origin(headers.get("Origin"), headers.get("Host"), config.allowed_origins)
        self._quotas.check_address(ws.remote_address[0] if ws.remote_address else "?")
        if config.keys:
            grant = credential(request.path, headers, config.keys, time.time())
            self._quotas.check_key(grant.key)
            self._grants[ws] = grant

    # --- WebSocket ---------------------------------------------------------------------------

    def _new_connection(self, grant: Grant | None, key: str | None) -> Connection:
        session = Session(
            secrets.token_urlsafe(9),
            self.repository,
            self.config.limits,
            SERVER_NAME,
            None if grant is None or grant.models is None else grant.allows,
            secrets.token_urlsafe(24) if self.config.limits.resume_seconds > 0 else None,
        )
        return Connection(
            session,
            self.traffic,
            self.config.max_outbox,
            self.scheduler.drop_oldest,
            key,
            time.monotonic(),
        )

    async def _handle(self, ws: ServerConnection) -> None:
        assert isinstance(ws, _Socket)
        grant = self._grants.pop(ws, None)
        ip = ws.remote_address[0] if ws.remote_address else "?"
        key = None if grant is None else grant.key
        self._quotas.enter(ip, key, time.monotonic())
        conn = self._new_connection(grant, key)
        link = Link(ws, conn, ip, key)
        self._attach(link)
        self.traffic.sessions_total += 1
        log.info("event=connect session=%s peer=%s key=%s", conn.session.id, ip, key or "-")
        ws.reader.on_message = partial(self.relay.on_message, link)
        ws.on_writable = partial(self.relay.flush, link)
        ws.reader.take_backlog()  # what arrived before this handler took the connection
        watchdog = asyncio.get_running_loop().create_task(self._watch_idle(link))
        try:
            await ws.wait_closed()
        finally:
            watchdog.cancel()
            ws.reader.on_message = ws.on_writable = None
            self._end(link)

    def _attach(self, link: Link) -> None:
        sid = link.conn.session.id
        self._links[sid] = link
        self._conns[sid] = link.conn

    def _end(self, link: Link) -> None:
        """The socket is gone: park its session for a resume, or end it."""
        conn, ws = link.conn, link.ws
        sid = conn.session.id
        if self._links.get(sid) is link:
            del self._links[sid]
        parked = (
            ws.protocol.close_rcvd is None  # lost, not closed by the client
            and not _too_big(ws)
            and conn.session.resume_token is not None
            and conn.state is State.OPEN
            and conn.close_code is None
        )
        self._quotas.leave(link.ip, link.key)
        if parked:
            self._park(conn, link.ip)
        elif conn.state is not State.HANDED_OFF:
            self._forget(conn)
            conn.close()
            self._conns.pop(sid, None)
        link.ended.set()
        self._sessions_move()
        log.info(
            "event=disconnect session=%s code=%s too_slow=%s parked=%s",
            sid,
            ws.close_code,
            conn.close_code is not None,
            parked,
        )
        if self.draining:
            self._check_drained()

    def _park(self, conn: Connection, ip: str) -> None:
        """Keep a session whose socket was lost (or whose resume here was refused) for its
        client, within its key's (or address's) bound of kept sessions."""
        conn.lost()
        keys = self.config.keys
        key = conn.key
        bound = (
            keys[key].max_sessions if key is not None else self.config.limits.max_sessions_per_ip
        )
        self._count_resume("parked")
        self._conns[conn.session.id] = conn
        self.parking.park(conn, ip, bound)

    def _expired(self, conn: Connection) -> None:
        """A parked session's time is up: it ends."""
        self._forget(conn)
        conn.close()
        self._conns.pop(conn.session.id, None)
        self._count_resume("expired")
        if self.draining:
            self._check_drained()

    async def _watch_idle(self, link: Link) -> None:
        """Close the connection once it has sent nothing for ``idle_seconds``."""
        idle = self.config.limits.idle_seconds
        while True:
            quiet = time.monotonic() - link.conn.last_seen
            if quiet >= idle:
                log.info("event=idle session=%s seconds=%.0f", link.conn.session.id, quiet)
                await link.ws.close(CLOSE_IDLE, f"nothing received for {idle:g} s")
                return
            await asyncio.sleep(idle - quiet)  # until it could first be idle: a timer

    def _on_text(self, link: Link, data: bytes) -> None:
        conn = link.conn
        try:
            message = data.decode()
        except UnicodeDecodeError:
            conn.error(errors.BadMessage("a text message must be UTF-8"))
            return
        resume = conn.receive_text(message, self.draining, self._admit_new)
        if resume is not None:
            link.held = []
            task = asyncio.get_running_loop().create_task(self._resume(link, resume))
            task.add_done_callback(lambda _: self._release_held(link))

    def _release_held(self, link: Link) -> None:
        held, link.held = link.held or [], None
        for text, data in held:
            self.relay.on_message(link, text, data)
        self.relay.flush(link)

    async def _flush_and_close(self, link: Link) -> None:
        """Send what is queued, then close as going away (1001)."""
        self.relay.flush(link)
        if link.conn.has_output and link.ws.protocol.state is WsState.OPEN:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(link.ws.drain(), 5.0)
            self.relay.flush(link)
        await link.ws.close(1001, "server shutting down")

    async def _resume(self, link: Link, msg: Any) -> None:
        """Give the session ``msg.resume`` names to ``link``'s socket and send it what it
        missed; a typed error to ``link`` if it cannot be resumed. The session is parked here,
        or handed off by the previous server process."""
        token = msg.resume
        fresh = link.conn
        try:
            if fresh.state is not State.AWAITING_HELLO:
                raise errors.BadMessage("hello was already received on this session")
            # A resume is rare: finding the session's connection by a scan beats keeping an index.
            live = next(
                (
                    other
                    for other in self._links.values()
                    if _same(other.conn.session.resume_token, token) and other is not link
                ),
                None,
            )
            if live is not None and live.conn.key == fresh.key:
                # The client saw its connection die before this server did (a half-open TCP
                # connection on a mobile network): end that one, the session is parked.
                live.ws.transport.abort()
                await live.ended.wait()
            parked = self.parking.get(token)
            now = time.monotonic()
            if parked is not None and parked.key == fresh.key:
                # May refuse (a wrong count, a credential not allowed its streams): kept.
                replay = parked.resume(msg.received, now, fresh.session.allows)
                self.parking.take(token)
                resumed = parked
            else:
                taken = None
                if parked is None and self.store is not None:
                    taken = await self._take_over(fresh, token, link.ip)
                if taken is None:  # another credential's session is unknown too
                    if self.parking.expired(token):
                        raise errors.ResumeExpired("the session expired before it was resumed")
                    raise errors.ResumeUnknown("no session to resume with this token")
                try:
                    replay = taken.resume(msg.received, now, fresh.session.allows)
                except errors.RealtimeError:
                    self._keep_refused(taken, link.ip)
                    raise
                resumed = taken
        except errors.RealtimeError as e:
            self._count_resume("refused")
            fresh.error(e)
            return
        self._conns.pop(fresh.session.id, None)
        self._links.pop(fresh.session.id, None)
        fresh.close()
        link.conn = resumed
        self._attach(link)
        protocol = link.ws.protocol
        if protocol.state is WsState.OPEN:
            for frame, is_text, _ in replay:
                if is_text:
                    protocol.send_text(frame)
                else:
                    protocol.send_binary(frame)
            link.ws.send_data()
        if self.draining:  # back on a server that is shutting down: it is told so too
            resumed.going_away(self.config.drain_seconds * 1000.0, None)
        self._count_resume("resumed")
        log.info("event=resumed session=%s received=%d", resumed.session.id, msg.received)

    async def _take_over(self, fresh: Connection, token: str, ip: str) -> Connection | None:
        """A session another server process held (or handed off, or checkpointed); None if no
        process or store has it. Raises a typed refusal."""
        assert self.store is not None
        got = await self.store.take(token, fresh.key)
        if got is None:
            return None
        data, checkpoint = got
        entry = handoff.load(data, self.repository)
        session = entry.session
        session.limits, session.server = self.config.limits, SERVER_NAME
        taken = Connection.taken_over(
            entry,
            self.traffic,
            self.config.max_outbox,
            self.scheduler.drop_oldest,
            time.monotonic(),
            checkpoint,
        )
        if entry.key != fresh.key:  # a hand-off file names no key: it was taken all the same
            self._keep_refused(taken, ip)
            raise errors.ResumeUnknown("no session to resume with this token")
        if checkpoint:
            self._count_resume("from_checkpoint")
        return taken

    def _keep_refused(self, taken: Connection, ip: str) -> None:
        """A session taken from the store for a resume that was then refused (a wrong
        ``received``, another key): kept here, parked, for its rightful client, as a session
        parked here stays parked (other processes find it here as any parked one)."""
        self._park(taken, ip)
        if self.store is not None and self.store.checkpoint_seconds > 0:
            self._checkpoint(taken)  # this process holds it now

    def _count_resume(self, result: str) -> None:
        self.traffic.resumes[result] = self.traffic.resumes.get(result, 0) + 1
        self._sessions_move()

    async def sessions_settle(self, done: Callable[[], bool]) -> None:
        """Wait until ``done()`` holds, checked each time a socket's session ends or is parked,
        resumed, refused a resume or expires (for shutdown, tests and admins)."""
        while not done():
            await self._sessions_moved.wait()

    def _sessions_move(self) -> None:
        self._sessions_moved.set()
        self._sessions_moved = asyncio.Event()


def _same(secret: str | None, given: str) -> bool:
    """Whether a client's resume token is this session's, compared in constant time."""
    return secret is not None and hmac.compare_digest(secret.encode(), given.encode())


def _confined_idle(cpus: set[int]) -> float | None:
    """Idle seconds so far of the cores the process is confined to, from Linux's /proc/stat.
    None if it may use them all (their idle time then says little of its own headroom: the
    kernel shares busy cores fairly, and the loop's lag tells of a neighbour that takes them),
    or where there is no /proc/stat."""
    if len(cpus) >= (os.cpu_count() or 0):
        return None
    try:
        with open("/proc/stat") as f:
            return idle_seconds(f.read(), cpus, os.sysconf("SC_CLK_TCK"))
    except OSError:
        return None


#: Container objects allocated (net) between two collections of the garbage collector's youngest
#: generation; Python's default is 700. At capacity, several thousand objects are in flight at
#: any instant (chunks waiting for their batch, results on their way out): at 700 they were
#: caught by a collection ~100 times a second, promoted, and brought on a full collection, a
#: walk over every admitted session's objects, every 1-2 s at 15-25 ms (a stall of the loop),
#: 2-3 a second at 30-130 ms under a burst of connections, where the server then stayed behind.
#: At 20000 they die young (by reference count), and full collections come every ~10 s or more.
GC_YOUNG = 20_000
#: Young collections between two of the middle generation; Python's default is 10. The objects
#: of a session that lives (its connection's tasks, futures, parsers: ~120) outlive their first
#: young collection and wait in the middle generation: after a ramp of 450 sessions, the first
#: middle collection walked ~75,000 objects, a 17-25 ms stall in every overload run (at 0.9 of
#: the core, the model queue then backed up to 1000-2000 items). Collected every other young
#: collection, the middle generation holds a few seconds' arrivals at most: 6-7 collections of
#: at most 7-8 ms in such a run, and less collector time in all (docs/scheduler.md).
GC_MIDDLE = 1


def _busy_body(e: errors.ServerBusy) -> tuple[bytes, tuple[tuple[str, str], ...]]:
    """A handshake's 503 refusal: the typed error as its JSON body, and its Retry-After."""
    body = {"error": e.message, "code": e.code, "retry_after_ms": e.retry_after_ms}
    return orjson.dumps(body), (("Retry-After", str(math.ceil(e.retry_after_ms / 1000))),)


def _busy(e: errors.ServerBusy) -> Response:
    """A handshake refused at capacity (by websockets): HTTP 503, see :func:`_busy_body`."""
    body, headers = _busy_body(e)
    refusal = response(HTTPStatus.SERVICE_UNAVAILABLE, body, "application/json")
    refusal.headers.update(headers)
    return refusal


_UPGRADE = re.compile(rb"\r\nupgrade:[ \t]*websocket[ \t]*\r\n", re.IGNORECASE)


def _resumes(head: bytes) -> bool:
    """Whether a handshake's request target carries the ``resume`` query parameter: its
    client comes to resume a session (docs/protocol.md), which admission control lets in."""
    parts = head.partition(b"\r\n")[0].split(b" ")
    query = parts[1].partition(b"?")[2] if len(parts) == 3 else b""
    return any(p.partition(b"=")[0] == b"resume" for p in query.split(b"&"))


async def run(config: Config) -> None:
    """Serve until SIGINT or SIGTERM, then shut down cleanly."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before the banner: a supervisor may act on it
        loop.add_signal_handler(sig, stop.set)
    config.check()
    server = Server(config)
    reloads: set[asyncio.Task[dict[str, list[str]]]] = set()

    def reload() -> None:
        task = loop.create_task(server.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    # What imports and models made lives as long as the process: keep it out of the garbage
    # collector's full walks, which otherwise stalled the loop 25-150 ms under load. Before
    # start: admission's first measurements should not count this collection's CPU.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, GC_MIDDLE, gc.get_threshold()[2])
    await server.start()
    print(f"realtime {__version__} serving {len(server.models)} models on {server.url}", flush=True)
    if server.grpc_port is not None:
        print(f"  grpc: {config.host}:{server.grpc_port} (Open Inference Protocol)", flush=True)
    if config.keys:
        print(f"  auth: {len(config.keys)} API keys; tokens or keys required", flush=True)
    else:
        where = "loopback only" if is_loopback(config.host) else "--insecure-no-auth"
        print(f"  auth: off ({where}): anyone who can reach this port can use it", flush=True)
    for entry in server.repository.catalog():
        print(f"  {entry['name']}@{entry['version']}  {entry['kind']}", flush=True)
    await stop.wait()
    log.info("event=shutdown")
    await server.close()
    if server.scheduler.stuck:  # a thread cannot be killed, and exit would wait for it forever
        log.warning("event=exit stuck_batches=%d", server.scheduler.stuck)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
