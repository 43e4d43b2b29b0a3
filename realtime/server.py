"""The asyncio WebSocket server: handshake, limits, per-connection tasks, plain HTTP GETs.

This is the only module that uses websockets' server API. It feeds frames to the pure
:class:`realtime.session.Session`, hands accepted chunks to the :class:`Scheduler`, and writes
what comes back through one bounded outbox per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import secrets
import ssl
import sys
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from realtime import __version__, errors, handoff, store
from realtime.auth import AuthFailed, Grant, verify_key, verify_token
from realtime.config import Config, is_loopback
from realtime.metrics import Metrics, Traffic, merge_expositions
from realtime.models.repository import (
    BUILTIN_DIR,
    ModelRepository,
    load_model,
    scan,
    versions,
)
from realtime.models.spec import Model, RuntimeOptions
from realtime.protocol import (
    CLIENT_MESSAGES,
    Chunk,
    Close,
    Error,
    GoingAway,
    Hello,
    Message,
    Open,
    Ping,
    Pong,
    Result,
    decode_frame,
    decode_text,
    encode_text,
    result_frames,
)
from realtime.ratelimit import TokenBucket
from realtime.scheduler import Scheduler
from realtime.session import Phase, Prediction, Session, Stream, WorkItem

log = logging.getLogger("realtime")
SERVER_NAME = f"realtime/{__version__}"
#: websockets refuses (and closes on) frames this many times over our own limit; below it, an
#: oversize message gets a typed ``message_too_big`` error and the session stays usable.
HARD_SIZE_FACTOR = 4
#: Close code for a client that does not read its results fast enough.
CLOSE_TOO_SLOW = 4008
#: Kinds of outbox entries (see _Connection).
OTHER, RESULT, NOTICE = 0, 1, 2
#: Close code for a session that sent nothing for ``Limits.idle_seconds``.
CLOSE_IDLE = 4001
#: Frames a checkpoint keeps to send again (the newest): what a connection lost when its process
#: died may not have delivered. A bound on Redis traffic per session (docs/deploy.md).
CHECKPOINT_FRAME_BYTES = 16 * 1024


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


class _Connection:
    """One client's session, outbox and what it keeps to resume; and its socket while it has one.

    Every frame written is counted; the last ``resume_buffer_bytes`` of them are kept, so a
    client that lost its connection and says how many it got can be sent the rest again.
    """

    def __init__(
        self,
        ws: ServerConnection,
        session: Session,
        max_outbox: int,
        traffic: Traffic,
        key: str | None = None,
    ) -> None:
        self.ws = ws
        self.session = session
        self.key = key  # the API key the session was admitted with (a resume must match it)
        self._traffic = traffic
        #: (frame, is_text, kind): kind RESULT may be shed for a slow reader, NOTICE is the one
        #: unsent results_dropped error (it is replaced, not repeated), OTHER is never dropped.
        self._outbox: deque[tuple[bytes, bool, int]] = deque()
        self._unsent_dropped = 0  # results counted by the NOTICE now in the outbox
        self._wakeup = asyncio.Event()
        self._flushed = asyncio.Event()  # set each time the writer has sent everything queued
        self._max_outbox = max_outbox
        self.too_slow = False
        self.last_seen = 0.0  # monotonic time of the last message received
        #: Lost its connection; kept for the client to resume (results go on being queued).
        self.parked = False
        self.ended = asyncio.Event()  # set when its connection's handler has finished
        self._kept: deque[tuple[bytes, bool, int]] = deque()  # written frames, oldest first
        self._kept_bytes = 0
        self._keep_bytes = session.limits.resume_buffer_bytes
        self.written = 0  # frames written on this session since it began
        self.first = 0  # index of the first frame after the welcome
        #: Written to the resume folder for the next server: messages from now on are ignored.
        self.handed_off = False
        #: Set whenever none of its chunks is in flight (a hand-off waits for it).
        self.quiet = asyncio.Event()
        #: Its frame count at its last checkpoint (-1: none), and when (monotonic seconds).
        self.checkpointed = -1
        self.checkpointed_at = 0.0
        self.checkpoint_due = False  # one is due once no chunk is in flight
        self.from_checkpoint = False  # taken over from a checkpoint: the client may be ahead

    def hand_off(self, expires_at: float) -> handoff.HandedOff:
        """The session as the next server needs it. What is still queued counts as written
        (the next server replays it), so whatever reaches the client from here, its count and
        the saved one agree."""
        kept = [*self._kept, *self._outbox]
        written = self.written + len(self._outbox)
        self._outbox.clear()
        self.handed_off = True
        return handoff.HandedOff(self.session, self.key, expires_at, written, self.first, kept)

    def snapshot(self, expires_at: float, max_bytes: int) -> handoff.HandedOff:
        """The session as another process needs it if this one dies: as :meth:`hand_off`, but
        the session stays here, and only the newest ``max_bytes`` of frames are kept."""
        kept, size = [], 0
        for entry in itertools.chain(reversed(self._outbox), reversed(self._kept)):
            size += len(entry[0])
            if size > max_bytes:
                break
            kept.append(entry)
        kept.reverse()
        written = self.written + len(self._outbox)
        return handoff.HandedOff(self.session, self.key, expires_at, written, self.first, kept)

    @classmethod
    def taken_over(
        cls,
        ws: ServerConnection,
        entry: handoff.HandedOff,
        max_outbox: int,
        traffic: Traffic,
        from_checkpoint: bool = False,
    ) -> _Connection:
        """A session another server handed off (or checkpointed), on this server's connection."""
        conn = cls(ws, entry.session, max_outbox, traffic, entry.key)
        conn.from_checkpoint = from_checkpoint
        conn.written, conn.first = entry.written, entry.first
        conn._kept.extend(entry.kept)
        conn._kept_bytes = sum(len(frame) for frame, _, _ in entry.kept)
        return conn

    def welcomed(self) -> None:
        """The welcome was just queued: the frames after it are the ones a client counts."""
        self.first = self.written + len(self._outbox)

    def resume(self, ws: ServerConnection, received: int) -> None:
        """Take a new socket: write the resumed welcome, then every kept frame after the
        ``received`` first ones (a typed ``results_dropped`` first if some were no longer kept);
        the write loop then goes on with the outbox."""
        start = self.first + received
        if self.from_checkpoint:  # the lost process sent more than its checkpoint knows of
            start = min(start, self.written)
            self.from_checkpoint = False
        if start > self.written:
            raise errors.BadMessage(
                f"hello.received is {received}, this session sent {self.written - self.first}"
            )
        oldest = self.written - len(self._kept)
        lost = max(0, oldest - start)
        start += lost
        self.ws = ws
        self.parked = False
        protocol = ws.protocol
        protocol.send_text(encode_text(self.session.welcome(replay_from=start - self.first)))
        kept = self._kept
        for i in range(start - oldest, len(kept)):
            frame, text, _ = kept[i]
            if text:
                protocol.send_text(frame)
            else:
                protocol.send_binary(frame)
        ws.send_data()
        if lost:
            notice = errors.ResultsDropped(
                f"{lost} messages sent before the connection was lost are no longer kept"
            )
            self._outbox.appendleft((encode_text(Error.of(notice)), True, OTHER))
        self._wakeup.set()

    def send_messages(self, messages: list[Message], binary_results: bool) -> None:
        """Queue messages in order, results as binary frames where the stream asked for them."""
        outbox = self._outbox
        for msg in messages:
            if binary_results and isinstance(msg, Result):
                outbox.extend((frame, False, OTHER) for frame in result_frames(msg))
            else:
                if type(msg) is Error:
                    errors_sent = self._traffic.errors
                    errors_sent[msg.code] = errors_sent.get(msg.code, 0) + 1
                outbox.append((encode_text(msg), True, RESULT if type(msg) is Result else OTHER))
        if len(outbox) > self._max_outbox // 2:
            self._shed_results()
        if len(self._outbox) > self._max_outbox and not self.too_slow and not self.parked:
            self.too_slow = True
            self._outbox.clear()
            asyncio.get_running_loop().create_task(
                self.ws.close(CLOSE_TOO_SLOW, "results are not read fast enough")
            )
        self._wakeup.set()

    def _shed_results(self) -> None:
        """A slow reader: drop its oldest unsent JSON results (a live client wants the newest)
        down to a quarter of the bound, and tell it how many with one typed error."""
        keep = self._max_outbox // 4
        excess = len(self._outbox) - keep
        kept: list[tuple[bytes, bool, int]] = []
        dropped = 0
        at = -1  # where the notice goes: in place of the first result dropped, in order
        for entry in self._outbox:
            if entry[2] == NOTICE:
                at = len(kept) if at < 0 else at
                continue  # replaced below, with the new count added
            if dropped < excess and entry[2] == RESULT:
                at = len(kept) if at < 0 else at
                dropped += 1
            else:
                kept.append(entry)
        if dropped:
            if not self._unsent_dropped:
                self._traffic.errors["results_dropped"] = (
                    self._traffic.errors.get("results_dropped", 0) + 1
                )
            self._unsent_dropped += dropped
            notice = errors.ResultsDropped(
                f"{self._unsent_dropped} results were dropped unsent: the client reads too slowly"
            )
            kept.insert(at, (encode_text(Error.of(notice)), True, NOTICE))
            self._outbox = deque(kept)

    async def flush_and_close(self) -> None:
        """Send what is queued, then close as going away (1001)."""
        if self._outbox and self.ws.protocol.state is State.OPEN:
            self._flushed.clear()
            self._wakeup.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flushed.wait(), 5.0)
        await self.ws.close(1001, "server shutting down")

    def error(self, exc: errors.RealtimeError) -> None:
        """Queue a typed error."""
        self.send_messages([Error.of(exc)], False)

    async def write_loop(self) -> None:
        """Write queued frames until the connection closes."""
        # Everything queued goes out in one write and one drain: ``ws.send`` per message costs an
        # async context manager and a drain each, the largest part of a small result's cost.
        ws, traffic = self.ws, self._traffic
        protocol = ws.protocol
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            outbox = self._outbox  # _shed_results may have replaced it
            if not outbox:
                continue
            if protocol.state is not State.OPEN:
                return
            traffic.messages_out += len(outbox)
            self.written += len(outbox)
            kept, size = self._kept, 0
            while outbox:
                entry = outbox.popleft()
                frame, text, kind = entry
                if kind == NOTICE:
                    self._unsent_dropped = 0
                size += len(frame)
                kept.append(entry)
                if text:
                    protocol.send_text(frame)
                else:
                    protocol.send_binary(frame)
            traffic.bytes_out += size
            self._kept_bytes += size
            while self._kept_bytes > self._keep_bytes:
                self._kept_bytes -= len(kept.popleft()[0])
            ws.send_data()
            await ws.drain()
            self._flushed.set()


class Server:
    """A running `realtime` server: lifecycle, connections and the HTTP side."""

    def __init__(self, config: Config, models: list[Model] | None = None) -> None:
        self.config = config
        self.models = load_models(config) if models is None else models
        self.repository = ModelRepository(self.models)
        self.scheduler = Scheduler(
            self.models,
            workers=config.workers,
            max_queue=config.max_queue,
            run_timeout=config.batch_timeout_seconds,
        )
        self.traffic = Traffic()
        self._connections: set[_Connection] = set()
        self._metrics = Metrics(self.traffic, self.scheduler.snapshot, self._open_counts).registry()
        self.ready = False  # models warm and serving; false again once shutting down
        self._ws: WsServer | None = None
        #: Each model folder version's file signature, as last loaded or refused.
        self._seen: dict[Path, tuple[tuple[int, int], ...]] = {
            m.path.parent: _signature(m.path.parent) for m in self.models
        }
        self._reload_lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        #: Set after each reload pass (tests and admins await it).
        self.reloaded = asyncio.Event()
        self.draining = False  # shutting down: new chunks are refused, the rest answered
        self._drained = asyncio.Event()
        self._catalog = orjson.dumps({"models": self.repository.catalog()})
        self._static = load_static()
        #: Where sessions go to and come from other processes (None: they never leave).
        self.store = store.open_store(config)
        self._store_tasks: set[asyncio.Task[None]] = set()
        self._checkpoint_writes: set[asyncio.Task[None]] = set()
        #: Checked at the handshake, taken by the connection's handler.
        #: Weak: a handshake that fails after it was admitted leaves nothing behind.
        self._grants: weakref.WeakKeyDictionary[ServerConnection, Grant] = (
            weakref.WeakKeyDictionary()
        )
        self._sessions_by_key: dict[str, int] = {}
        self._sessions_by_ip: dict[str, int] = {}
        #: Sessions whose connection was lost, by resume token, until they resume or expire.
        self._parked: dict[str, _Parked] = {}
        #: Tokens of sessions that expired unresumed (the latest ones), to say so on a resume.
        self._expired: dict[str, None] = {}

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

    def _open_counts(self) -> tuple[int, int, int]:
        return (
            len(self._connections),
            sum(len(c.session.streams) for c in self._connections),
            len(self._parked),
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
        self._ws = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            ssl=tls,
            process_request=self._http,
            compression=None,
            max_size=limits.max_message_bytes * HARD_SIZE_FACTOR,
            max_queue=64,
            server_header=SERVER_NAME,
            reuse_port=self.config.reuse_port or None,
        )
        if self.store is not None:
            await self.store.start(self._give, self._exposition)
            if self.store.checkpoint_seconds > 0:
                self._store_task(self._checkpoints(self.store.checkpoint_seconds))
        self.ready = True
        log.info("event=listening url=%s models=%d", self.url, len(self.models))
        if self.config.reload_seconds > 0 and self.config.model_dirs:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.reload_seconds)  # a period, not a wait for an event
            await self.reload()

    async def reload(self) -> dict[str, list[str]]:
        """Load model versions that appeared in the model folders (each checked with a warm-up
        run before it takes traffic, then the default for new streams if it is the highest),
        take out of the catalog the ones whose folder is gone (their open streams go on), and
        refuse broken ones with a log line: the versions already loaded keep serving."""
        async with self._reload_lock:
            done: dict[str, list[str]] = {"added": [], "removed": [], "refused": []}
            loop = asyncio.get_running_loop()
            present: dict[Path, tuple[str, str]] = {}
            for root in self.config.model_dirs:
                try:
                    found = await loop.run_in_executor(None, versions, root)
                except errors.ModelLoadError as e:
                    log.error("event=reload_refused error=%s", e)
                    continue
                present.update({folder: (name, version) for name, version, folder in found})
            options = RuntimeOptions(
                intra_op_threads=self.config.intra_op_threads, cache_dir=self.config.graph_cache
            )
            for folder, (name, version) in sorted(present.items()):
                signature = await loop.run_in_executor(None, _signature, folder)
                if self._seen.get(folder) == signature:
                    continue
                self._seen[folder] = signature
                key = f"{name}@{version}"
                loaded = self.repository.get(name, version)
                if loaded is not None and loaded.path.parent == folder:
                    continue  # versions are immutable: a changed file is a new version folder
                try:
                    model = await loop.run_in_executor(
                        None, load_model, name, version, folder, options
                    )
                    queue = self.scheduler.add_model(model)
                    await loop.run_in_executor(None, queue.warm_up)
                except Exception as e:  # any failure refuses this version, nothing else
                    self._count_reload("refused")
                    done["refused"].append(key)
                    log.error("event=reload_refused model=%s error=%s", key, str(e)[:300])
                    continue
                self.repository.add(model)
                self.models.append(model)
                self._count_reload("added")
                done["added"].append(key)
                log.info("event=model_added model=%s path=%s", key, folder)
            for model in list(self.models):
                folder = model.path.parent
                if folder in present or not any(
                    folder.is_relative_to(r) for r in self.config.model_dirs
                ):
                    continue
                self.repository.remove(model.name, model.version)
                self.models.remove(model)
                self._seen.pop(folder, None)
                self._count_reload("removed")
                done["removed"].append(model.key)
                log.info("event=model_removed model=%s", model.key)
            if done["added"] or done["removed"]:
                self._catalog = orjson.dumps({"models": self.repository.catalog()})
            self.reloaded.set()
            self.reloaded.clear()
            return done

    def _count_reload(self, result: str) -> None:
        self.traffic.reloads[result] = self.traffic.reloads.get(result, 0) + 1

    async def close(self) -> None:
        """Shut down without losing what was accepted: tell every client ``going_away``, refuse
        new sessions and new chunks (typed ``going_away`` errors) while every chunk in flight is
        run and answered (up to ``drain_seconds``; past that, what is still queued gets
        ``going_away`` errors), then close each connection with 1001. Until then a client whose
        connection drops may still come back to resume (with a resume folder, its session is
        handed to the next process instead, and the port closes once it is written)."""
        self.ready = False
        self.draining = True
        if self._poller is not None:
            self._poller.cancel()
        if self._ws is None:
            await self.scheduler.close()
            return
        drain = self.config.drain_seconds
        hand_off = self.store is not None and self.store.keeps_hand_offs()
        for conn in list(self._connections):
            token = conn.session.resume_token if hand_off else None
            notice = GoingAway("the server is shutting down", drain * 1000.0, token)
            conn.send_messages([notice], False)
        self._check_drained()
        try:
            await asyncio.wait_for(self._drained.wait(), drain)
        except TimeoutError:
            log.warning("event=drain_timeout seconds=%g", drain)
        await self.scheduler.close()  # fails what is still queued: those errors go out too
        if hand_off:
            await self._hand_off()
            self._ws.close(close_connections=False)  # resumes go to the next process now
        # Chunks a client sent before the notice reached it are still on the wire: keep reading
        # (and refusing them, typed) until the client closes, for close_grace_seconds.
        open_ones = [asyncio.ensure_future(c.ws.wait_closed()) for c in self._connections]
        if open_ones and self.config.close_grace_seconds > 0:
            await asyncio.wait(open_ones, timeout=self.config.close_grace_seconds)
        for waiter in open_ones:
            waiter.cancel()
        self._ws.close(close_connections=False)  # no new connections; the open ones stay
        await asyncio.gather(*(c.flush_and_close() for c in list(self._connections)))
        for token in list(self._parked):  # answered, but their clients did not come back in time
            self._expire(token)
        await self._ws.wait_closed()
        if self.store is not None:
            for task in list(self._store_tasks):
                task.cancel()
            await self.store.close()

    async def _hand_off(self) -> None:
        """Write every session to the store (a folder, Redis) for the next server process."""
        assert self.store is not None
        await asyncio.sleep(0)  # the outcomes scheduler.close() resolved are delivered first
        expires_at = time.time() + self.config.limits.resume_seconds
        files: list[tuple[str, str | None, bytes]] = []
        conns = [*self._connections, *(p.conn for p in self._parked.values())]
        for conn in conns:
            token = conn.session.resume_token
            if token is None or conn.session.phase is not Phase.OPEN:
                continue
            why = "the server handed this session off while the chunk ran"
            conn.send_messages(conn.session.abandon(why), False)
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
        live = next((c for c in self._connections if c.session.resume_token == token), None)
        if live is not None and live.key == key:  # its client saw the connection die first
            live.ws.transport.abort()
            await live.ended.wait()
        parked = self._parked.get(token)
        if parked is None or parked.conn.key != key:
            return None
        conn = parked.conn
        if conn.session.inflight:
            conn.quiet.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(conn.quiet.wait(), self.config.batch_timeout_seconds)
        if self._parked.get(token) is not parked:  # expired or taken meanwhile
            return None
        del self._parked[token]
        parked.expiry.cancel()
        why = "the session moved to another server process while the chunk ran"
        conn.send_messages(conn.session.abandon(why), False)
        data = handoff.dump(conn.hand_off(time.time() + self.config.limits.resume_seconds))
        conn.session.disconnect()
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
            for conn in [*self._connections, *(p.conn for p in self._parked.values())]:
                session = conn.session
                if session.phase is not Phase.OPEN or not session.resume_token or conn.handed_off:
                    continue
                count = conn.written + len(conn._outbox)
                if count != conn.checkpointed or now - conn.checkpointed_at > refresh:
                    if conn.session.inflight:
                        conn.checkpoint_due = True  # _deliver takes it once the chunks are out
                    else:
                        self._checkpoint(conn)

    async def _checkpoints_written(self) -> None:
        """Return once every checkpoint write under way is done."""
        if self._checkpoint_writes:
            await asyncio.wait(self._checkpoint_writes)

    def _checkpoint(self, conn: _Connection) -> None:
        """Write the session's checkpoint now (none of its chunks is in flight)."""
        assert self.store is not None and conn.session.resume_token is not None
        conn.checkpoint_due = False
        if conn.handed_off:
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

    def _forget(self, conn: _Connection) -> None:
        """A session ended here: its checkpoint, if it has one, is deleted."""
        if self.store is not None and conn.checkpointed >= 0 and not conn.handed_off:
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
        return _response(HTTPStatus.OK, body, CONTENT_TYPE_LATEST)

    def _check_drained(self) -> None:
        if self.draining and all(
            c.session.inflight == 0
            for c in itertools.chain(self._connections, (p.conn for p in self._parked.values()))
        ):
            self._drained.set()

    # --- HTTP --------------------------------------------------------------------------------

    def _http(
        self, ws: ServerConnection, request: Request
    ) -> Response | Awaitable[Response] | None:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            try:
                self._admit(ws, request)
            except AuthFailed as e:
                log.info("event=refused status=%d reason=%s", e.status, e.reason.replace(" ", "_"))
                refusal = orjson.dumps({"error": e.reason})
                return _response(HTTPStatus(e.status), refusal, "application/json")
            return None
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            if self.scheduler.stuck:  # a model run that never came back: restart this process
                stuck = orjson.dumps({"status": "stuck", "stuck_batches": self.scheduler.stuck})
                return _response(HTTPStatus.SERVICE_UNAVAILABLE, stuck, "application/json")
            return _response(HTTPStatus.OK, b'{"status":"ok"}', "application/json")
        if path == "/readyz":
            if not self.ready:
                busy = b'{"status":"not ready"}'
                return _response(HTTPStatus.SERVICE_UNAVAILABLE, busy, "application/json")
            max_queue = self.config.max_queue
            if any(q.depth >= max_queue for q in self.scheduler.snapshot().values()):
                # New chunks for that model are refused (overloaded): send new clients elsewhere.
                full = b'{"status":"full"}'
                return _response(HTTPStatus.SERVICE_UNAVAILABLE, full, "application/json")
            return _response(HTTPStatus.OK, b'{"status":"ready"}', "application/json")
        if path == "/metrics":
            if self.config.peer_dir is not None and self.store is not None:
                return self._all_metrics()
            return _response(HTTPStatus.OK, generate_latest(self._metrics), CONTENT_TYPE_LATEST)
        if path == "/v1/models":
            return _response(HTTPStatus.OK, self._catalog, "application/json")
        static = self._static.get(PAGES.get(path, path))
        if static is not None:
            body, content_type, etag = static
            if request.headers.get("If-None-Match") == etag:
                return _response(HTTPStatus.NOT_MODIFIED, b"", content_type, etag)
            return _response(HTTPStatus.OK, body, content_type, etag)
        if path == "/":
            text = f"{SERVER_NAME}: connect a WebSocket to this URL (see docs/protocol.md)\n"
            return _response(HTTPStatus.OK, text.encode(), "text/plain; charset=utf-8")
        return _response(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")

    async def _watch_idle(self, conn: _Connection) -> None:
        """Close the connection once it has sent nothing for ``idle_seconds``."""
        idle = self.config.limits.idle_seconds
        while True:
            quiet = time.monotonic() - conn.last_seen
            if quiet >= idle:
                log.info("event=idle session=%s seconds=%.0f", conn.session.id, quiet)
                await conn.ws.close(CLOSE_IDLE, f"nothing received for {idle:g} s")
                return
            await asyncio.sleep(idle - quiet)  # until it could first be idle: a timer

    def _admit(self, ws: ServerConnection, request: Request) -> None:
        """Check a WebSocket handshake: origin, credential, sessions per key and per address."""
        config = self.config
        origin = request.headers.get("Origin")
        if config.allowed_origins and origin is not None and origin not in config.allowed_origins:
            raise AuthFailed(403, f"origin {origin} is not allowed")
        ip = ws.remote_address[0] if ws.remote_address else "?"
        if self._sessions_by_ip.get(ip, 0) >= config.limits.max_sessions_per_ip:
            raise AuthFailed(
                429, f"at most {config.limits.max_sessions_per_ip} sessions per address"
            )
        if not config.keys:
            return
        query = parse_qs(urlsplit(request.path).query)
        bearer = request.headers.get("Authorization", "")
        if "token" in query:
            grant = verify_token(query["token"][0], config.keys, time.time())
        elif bearer.startswith("Bearer "):
            grant = verify_token(bearer[7:].strip(), config.keys, time.time())
        elif "X-Api-Key" in request.headers:
            grant = verify_key(request.headers["X-Api-Key"], config.keys)
        else:
            raise AuthFailed(401, "no credential: give ?token=, Authorization: Bearer or X-Api-Key")
        if self._sessions_by_key.get(grant.key, 0) >= config.keys[grant.key].max_sessions:
            raise AuthFailed(
                429, f"key {grant.key} has its {config.keys[grant.key].max_sessions} sessions open"
            )
        self._grants[ws] = grant

    # --- WebSocket ---------------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        grant = self._grants.pop(ws, None)
        ip = ws.remote_address[0] if ws.remote_address else "?"
        key = None if grant is None else grant.key
        self._sessions_by_ip[ip] = self._sessions_by_ip.get(ip, 0) + 1
        if key is not None:
            self._sessions_by_key[key] = self._sessions_by_key.get(key, 0) + 1
        session = Session(
            secrets.token_urlsafe(9),
            self.repository,
            self.config.limits,
            SERVER_NAME,
            None if grant is None or grant.models is None else grant.allows,
            secrets.token_urlsafe(24) if self.config.limits.resume_seconds > 0 else None,
        )
        conn = _Connection(ws, session, self.config.max_outbox, self.traffic, key)
        traffic = self.traffic
        traffic.sessions_total += 1
        self._connections.add(conn)
        peer = ws.remote_address[0] if ws.remote_address else "?"
        log.info(
            "event=connect session=%s peer=%s key=%s",
            session.id,
            peer,
            grant.key if grant else "-",
        )
        writer = asyncio.get_running_loop().create_task(conn.write_loop())
        limits = self.config.limits
        conn.last_seen = time.monotonic()
        watchdog = asyncio.get_running_loop().create_task(self._watch_idle(conn))
        max_bytes = limits.max_message_bytes
        now = time.monotonic()
        messages = TokenBucket(
            limits.max_messages_per_second, limits.max_messages_per_second / 2, now
        )
        volume = TokenBucket(limits.max_bytes_per_second, limits.max_bytes_per_second / 2, now)
        told = 0.0  # when the client was last told it is rate limited
        try:
            async for message in ws:
                if conn.handed_off:
                    continue  # the next server process has this session now
                traffic.messages_in += 1
                traffic.bytes_in += len(message)
                if len(message) > max_bytes:
                    conn.error(errors.MessageTooBig(f"{len(message)} bytes, at most {max_bytes}"))
                elif isinstance(message, str):
                    resume = self._on_text(conn, message)
                    resumed = None if resume is None else await self._resume(conn, resume)
                    if resumed is not None:  # this connection took back its lost session
                        self._connections.discard(conn)
                        writer.cancel()
                        watchdog.cancel()
                        conn = resumed
                        self._connections.add(conn)
                        writer = asyncio.get_running_loop().create_task(conn.write_loop())
                        watchdog = asyncio.get_running_loop().create_task(self._watch_idle(conn))
                else:
                    self._on_binary(conn, message)
                now = conn.last_seen = time.monotonic()
                pause = max(messages.take(1, now), volume.take(len(message), now))
                if pause and now - told >= 1.0:
                    told = now
                    conn.error(
                        errors.RateLimited(
                            f"over {limits.max_messages_per_second} messages or "
                            f"{limits.max_bytes_per_second} bytes a second: reading paused "
                            f"{1000 * pause:.0f} ms"
                        )
                    )
                # Yield after each message even when more are buffered: a client with a backlog
                # must not hold the loop while batches wait to be collected and sent.
                await asyncio.sleep(pause)
        except ConnectionClosed:
            pass
        finally:
            self._connections.discard(conn)
            writer.cancel()
            watchdog.cancel()
            session = conn.session
            parked = (
                ws.protocol.close_rcvd is None  # lost, not closed by the client
                and session.resume_token is not None
                and session.phase is Phase.OPEN
                and not conn.too_slow
                and not conn.handed_off
            )
            self._release(ip, key)
            if parked:
                self._park(conn, ip)
            else:
                session.disconnect()
                self._forget(conn)
            conn.ended.set()
            log.info(
                "event=disconnect session=%s code=%s too_slow=%s parked=%s",
                session.id,
                ws.close_code,
                conn.too_slow,
                parked,
            )

    def _release(self, ip: str, key: str | None) -> None:
        """A session ended: its place in the per-address and per-key counts is free."""
        self._sessions_by_ip[ip] -= 1
        if not self._sessions_by_ip[ip]:
            del self._sessions_by_ip[ip]
        if key is not None:
            self._sessions_by_key[key] -= 1

    def _park(self, conn: _Connection, ip: str) -> None:
        """Keep a session whose connection was lost for ``resume_seconds``: its chunks in
        flight are still run and their results queued for when the client resumes.

        Kept sessions do not count against the quotas of connected ones (the client must be
        able to come back to resume), but have the same bounds of their own: past them the
        key's (or address's) oldest kept session ends."""
        token = conn.session.resume_token
        assert token is not None
        conn.parked = True
        ttl = self.config.limits.resume_seconds
        expiry = asyncio.get_running_loop().call_later(ttl, self._expire, token)
        self._parked[token] = _Parked(conn, ip, expiry)
        self._count_resume("parked")
        key, keys = conn.key, self.config.keys
        if key is not None:
            same = [t for t, p in self._parked.items() if p.conn.key == key]
            bound = keys[key].max_sessions
        else:
            same = [t for t, p in self._parked.items() if p.ip == ip]
            bound = self.config.limits.max_sessions_per_ip
        for oldest in same[: max(0, len(same) - bound)]:
            self._expire(oldest)

    def _expire(self, token: str) -> None:
        parked = self._parked.pop(token, None)
        if parked is None:
            return
        parked.expiry.cancel()
        parked.conn.session.disconnect()
        self._forget(parked.conn)
        self._expired[token] = None
        if len(self._expired) > 10_000:
            del self._expired[next(iter(self._expired))]
        self._count_resume("expired")
        log.info("event=resume_expired session=%s", parked.conn.session.id)

    async def _resume(self, conn: _Connection, msg: Hello) -> _Connection | None:
        """Give the session ``msg.resume`` names the connection ``conn`` came in on, and send it
        what it missed; None (and a typed error to ``conn``) if it cannot be resumed. The
        session is parked here, or handed off by the previous server process."""
        token = msg.resume
        assert token is not None
        try:
            if conn.session.phase is not Phase.AWAITING_HELLO:
                raise errors.BadMessage("hello was already received on this session")
            # A resume is rare: finding the session's connection by a scan beats keeping an index.
            live = next((c for c in self._connections if c.session.resume_token == token), None)
            if live is not None and live.key == conn.key:
                # The client saw its connection die before this server did (a half-open TCP
                # connection on a mobile network): end that one, the session is parked.
                live.ws.transport.abort()
                await live.ended.wait()
            parked = self._parked.get(token)
            if parked is not None and parked.conn.key == conn.key:
                resumed = parked.conn
                resumed.resume(conn.ws, msg.received)  # may refuse: the session stays parked
                del self._parked[token]
                parked.expiry.cancel()
            else:
                taken = None
                if parked is None and self.store is not None:
                    taken = await self._take_over(conn, token)
                if taken is None:  # another credential's session is unknown too
                    if token in self._expired:
                        raise errors.ResumeExpired("the session expired before it was resumed")
                    raise errors.ResumeUnknown("no session to resume with this token")
                resumed = taken
                resumed.resume(conn.ws, msg.received)
        except errors.RealtimeError as e:
            self._count_resume("refused")
            conn.error(e)
            return None
        resumed.last_seen = time.monotonic()
        resumed.ended.clear()
        if self.draining:  # back on a server that is shutting down: it is told so too
            notice = GoingAway("the server is shutting down", self.config.drain_seconds * 1000.0)
            resumed.send_messages([notice], False)
        self._count_resume("resumed")
        log.info("event=resumed session=%s received=%d", resumed.session.id, msg.received)
        return resumed

    async def _take_over(self, conn: _Connection, token: str) -> _Connection | None:
        """A session another server process held (or handed off, or checkpointed), resumed on
        ``conn``; None if no process or store has it. Raises a typed refusal."""
        assert self.store is not None
        got = await self.store.take(token, conn.key)
        if got is None:
            return None
        data, checkpoint = got
        entry = handoff.load(data, self.repository)
        if entry.key != conn.key:
            raise errors.ResumeUnknown("no session to resume with this token")
        session = entry.session
        session.limits, session.server = self.config.limits, SERVER_NAME
        if checkpoint:
            self._count_resume("from_checkpoint")
        return _Connection.taken_over(
            conn.ws, entry, self.config.max_outbox, self.traffic, checkpoint
        )

    def _count_resume(self, result: str) -> None:
        self.traffic.resumes[result] = self.traffic.resumes.get(result, 0) + 1

    def _on_text(self, conn: _Connection, text: str) -> Hello | None:
        """Handle a control message; a ``hello`` that asks to resume is returned to act on."""
        session = conn.session
        try:
            msg = decode_text(text)
            if not isinstance(msg, CLIENT_MESSAGES):
                raise errors.BadMessage(f"{type(msg).__name__.lower()} is a server message")
            if isinstance(msg, Hello):
                if msg.resume is not None:
                    return msg
                if self.draining:
                    raise errors.ShuttingDown("the server is shutting down: connect elsewhere")
                reply: list[Message] = [session.hello(msg)]
                conn.send_messages(reply, False)
                conn.welcomed()
                return None
            elif isinstance(msg, Open):
                reply = [session.open_stream(msg)]
                log.info(
                    "event=open session=%s stream=%d model=%s",
                    session.id,
                    msg.stream,
                    session.streams[msg.stream].model.key,
                )
            elif isinstance(msg, Close):
                reply = session.close_stream(msg)
            elif isinstance(msg, Ping):
                reply = [Pong(msg.id, msg.t, time.time() * 1000.0)]
            conn.send_messages(reply, False)
        except errors.RealtimeError as e:
            conn.error(e)
        return None

    def _on_binary(self, conn: _Connection, data: bytes) -> None:
        session = conn.session
        try:
            frame = decode_frame(data)
            if not isinstance(frame, Chunk):
                raise errors.BadFrame("result frames go from server to client only")
            if self.draining:
                session.refused(frame)
                raise errors.ShuttingDown(
                    "the server is shutting down", stream=frame.stream, seq=frame.seq
                )
            items = session.accept(frame, time.monotonic(), partial(self._make_room, conn))
        except errors.RealtimeError as e:
            conn.error(e)
            return
        if not items:  # an audio chunk that completed no model window: its result is due
            stream = session.streams[frame.stream]
            conn.send_messages(session.release(frame.stream), stream.results == "binary")
        for item in items:
            try:
                fut = self.scheduler.submit(item)
            except errors.ServingError as e:
                self._deliver(conn, item, e)
                continue
            fut.add_done_callback(partial(self._on_outcome, conn, item))

    def _make_room(self, conn: _Connection, stream: Stream) -> bool:
        """Drop a live-media stream's oldest queued chunk for a newer one; False if none waits."""
        dropped = self.scheduler.drop_oldest(stream)
        for item in dropped:
            why = "dropped for a newer chunk: the stream sends faster than it is served"
            self._deliver(conn, item, errors.Dropped(why, stream=stream.id, seq=item.seq))
        return bool(dropped)

    def _on_outcome(
        self, conn: _Connection, item: WorkItem, fut: asyncio.Future[Prediction]
    ) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            self._deliver(conn, item, fut.result())
        elif isinstance(exc, errors.ServingError):
            self._deliver(conn, item, exc)
        else:
            log.error("event=internal_error session=%s error=%r", conn.session.id, exc)
            self._deliver(
                conn,
                item,
                errors.InferenceFailed(repr(exc)[:300], stream=item.stream.id, seq=item.seq),
            )

    def _deliver(
        self, conn: _Connection, item: WorkItem, outcome: Prediction | errors.ServingError
    ) -> None:
        ms = (time.monotonic() - item.received) * 1000.0
        self.traffic.outcome(item.stream.model.key, ms)
        messages = conn.session.complete(item, outcome)
        if messages:
            conn.send_messages(messages, item.stream.results == "binary")
        if not conn.session.inflight:
            conn.quiet.set()
            if conn.checkpoint_due:
                self._checkpoint(conn)
        if self.draining:
            self._check_drained()


@dataclass(slots=True)
class _Parked:
    """A session kept for its client to resume: where it came from, and when it expires."""

    conn: _Connection
    ip: str
    expiry: asyncio.TimerHandle


def _signature(folder: Path) -> tuple[tuple[int, int], ...]:
    """Size and mtime of a version folder's files: a change means a copy is under way."""
    out = []
    for name in ("model.onnx", "model.toml"):
        try:
            st = (folder / name).stat()
        except OSError:
            out.append((-1, -1))
        else:
            out.append((st.st_size, st.st_mtime_ns))
    return tuple(out)


#: Static files served under /web/ (the browser client and the demo page), by suffix.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
WEB_DIR = Path(__file__).resolve().parents[1] / "web"
#: Short URLs of the example pages: the demo, the WebXR page and the voice-controlled game.
PAGES = {"/": "/web/index.html", "/xr": "/web/xr.html", "/game": "/web/game.html"}


def load_static(root: Path = WEB_DIR) -> dict[str, tuple[bytes, str, str]]:
    """Every servable file of ``root`` read once at start, by URL path: only these names are
    ever served, so no request can reach outside ``root``."""
    files: dict[str, tuple[bytes, str, str]] = {}
    if not root.is_dir():
        return files
    for path in sorted(root.rglob("*")):
        content_type = CONTENT_TYPES.get(path.suffix)
        if content_type is None or not path.is_file() or path.name.startswith("."):
            continue
        body = path.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        files["/web/" + path.relative_to(root).as_posix()] = (body, content_type, etag)
    return files


def _response(
    status: HTTPStatus, body: bytes, content_type: str, etag: str | None = None
) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            # Static files: cached, revalidated by ETag (a new server version changes them).
            ("Cache-Control", "no-cache" if etag else "no-store"),
            ("Server", SERVER_NAME),
        ]
    )
    if etag:
        headers["ETag"] = etag
    return Response(status.value, status.phrase, headers, body)


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
    await server.start()
    print(f"realtime {__version__} serving {len(server.models)} models on {server.url}", flush=True)
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
