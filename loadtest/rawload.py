"""The raw load generator: many real-time clients on one event loop, cheap enough to sit beside
the server on a 2-core machine.

Each client is one connection (:mod:`loadtest.rawws`, not the websockets library) with one
stream. One timer drives every client of the process: chunk ``k`` of a client is due at
``start + phase + k * period`` and goes out at the first tick at or after that time, never
before it (the event loop's timers round to the millisecond and can fire early: the old
client's early sends made echo answers arrive *before* their due time). Latency counts from
the due time, so a client that falls behind, or a server that stalls it, shows as latency and
not as fewer requests (no coordinated omission). Answers are recorded per chunk in
:class:`loadtest.clients.Records`, the same records the websockets client fills.

Against ``realtime`` a client sends ``hello`` and ``open`` first and reads JSON or binary
results (``Plan.results``); the baselines get the chunk frames alone. The echo answers each
chunk with the same frame, which the client recognises by its frame type (1: a chunk).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import os
import random
import struct
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import orjson

from loadtest.clients import KINDS, OK, PENDING, UNUSED, Plan, Records, payloads, place_process
from loadtest.rawws import (
    OP_BINARY,
    OP_TEXT,
    ChunkTemplate,
    HandshakeRefused,
    RawConnection,
)
from realtime.protocol import FRAME_CHUNK, FRAME_RESULT, Chunk, encode_frame

CONNECTS_AT_ONCE = 64
_TIMING = struct.Struct("<II")  # queue_us, infer_us at offset 24 of a result frame


class _Client:
    """One simulated client: its connection, its frames, and its rows of the records."""

    __slots__ = (
        "codes",
        "conn",
        "control",
        "due",
        "frames",
        "i",
        "infer_ms",
        "n",
        "next",
        "offset",
        "outcome",
        "queue_ms",
        "received",
        "run",
        "sent",
    )

    def __init__(self, run: _Run, i: int, frames: list[ChunkTemplate], offset: int) -> None:
        rec = run.rec
        self.run = run
        self.i = i
        self.frames = frames
        self.offset = offset
        self.due, self.sent, self.received = rec.due[i], rec.sent[i], rec.received[i]
        self.outcome, self.queue_ms, self.infer_ms = (
            rec.outcome[i],
            rec.queue_ms[i],
            rec.infer_ms[i],
        )
        self.n = 0
        self.next = 0
        self.codes = run.codes
        self.conn: RawConnection | None = None
        self.control: asyncio.Queue[dict[str, Any]] | None = None

    def send_next(self) -> None:
        """Send chunk ``next`` now (the tick saw it due)."""
        k = self.next
        self.next = k + 1
        transport = self.conn.transport if self.conn is not None else None
        if k >= self.n or transport is None or transport.is_closing():
            return  # the server closed us: this chunk is never sent and stays unanswered
        frames = self.frames
        self.sent[k] = time.monotonic()
        transport.write(frames[(self.offset + k) % len(frames)].frame(k))

    def on_message(self, opcode: int, payload: bytes) -> None:
        """Record an answer (or, while opening, hand a control message to ``control``)."""
        now = time.monotonic()
        if opcode == OP_BINARY:
            kind = payload[1]
            if kind == FRAME_RESULT:
                if payload[14] != payload[15] - 1:
                    return  # not the last frame of this chunk's result
                seq = int.from_bytes(payload[8:12], "little")
                queue_us, infer_us = _TIMING.unpack_from(payload, 24)
                self.queue_ms[seq], self.infer_ms[seq] = queue_us / 1000.0, infer_us / 1000.0
                self._answered(seq, now, OK)
            elif kind == FRAME_CHUNK:  # the echo server
                self._answered(int.from_bytes(payload[8:12], "little"), now, OK)
            return
        if opcode != OP_TEXT:
            return
        msg = orjson.loads(payload)
        kind = msg.get("type")
        if kind == "result":
            seq = msg["seq"]
            timing = msg["timing"]
            self.queue_ms[seq], self.infer_ms[seq] = timing["queue_ms"], timing["infer_ms"]
            self._answered(seq, now, OK)
        elif kind == "error":
            code = msg.get("code", "?")
            if code not in self.codes:
                self.codes[code] = len(self.codes) + 1
            seq = msg.get("seq")
            if seq is not None and self.control is None:
                self._answered(seq, now, self.codes[code])
            elif code == "server_busy" and self.control is None and self.run.rec.admitted[self.i]:
                self._taken_back(now)
            elif self.control is not None:
                self.control.put_nowait(msg)
            else:
                self.run.unattributed[code] = self.run.unattributed.get(code, 0) + 1
        elif self.control is not None and kind != "event":
            self.control.put_nowait(msg)

    def _taken_back(self, now: float) -> None:
        """The server ended this admitted session (it fell behind): the chunks sent and not
        answered get none (they count as failed, ``taken_back``); those not yet sent are not
        this session's any more, and are never sent."""
        run = self.run
        run.rec.taken_back[self.i] = True
        if "taken_back" not in self.codes:
            self.codes["taken_back"] = len(self.codes) + 1
        for seq in range(self.n):
            if self.outcome[seq] == PENDING:
                if seq < self.next:
                    self._answered(seq, now, self.codes["taken_back"])
                else:
                    self.outcome[seq] = UNUSED
                    run.answered()
        self.n = min(self.n, self.next)

    def _answered(self, seq: int, now: float, outcome: int) -> None:
        if 0 <= seq < self.n and self.outcome[seq] == PENDING:
            self.received[seq], self.outcome[seq] = now, outcome
            self.run.answered()


class _Run:
    """One process's run: its clients, the shared tick, and how many answers are still due."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.rec = Records.empty(plan)
        self.codes: dict[str, int] = {}
        self.unattributed: dict[str, int] = {}
        self.pending = 0
        self.loop = asyncio.get_running_loop()
        self.all_answered: asyncio.Future[None] = self.loop.create_future()
        self.clients: list[_Client] = []
        self._heap: list[tuple[float, int]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._arriving = 0  # clients still to arrive (Plan.arrivals)
        self._phases: list[float] = []  # with arrivals: each client's offset into its period
        self._sending_done: asyncio.Future[None] = self.loop.create_future()
        self.key = os.urandom(4)

    def answered(self) -> None:
        self.pending -= 1
        if self.pending == 0 and self._sending_done.done() and not self.all_answered.done():
            self.all_answered.set_result(None)

    def _schedule(self) -> None:
        """Run the tick at the earliest due chunk (sooner than planned, if one just came in)."""
        if not self._heap:
            return
        at = self._heap[0][0]
        if self._timer is not None:
            if self._timer_at <= at:
                return
            self._timer.cancel()
        self._timer_at = at
        # Whole milliseconds, at least one: uvloop runs a delay under 0.5 ms as call_soon, and
        # with thousands of chunks a second the next is nearly always that close, so the loop
        # would spin. A chunk thus goes out up to ~1 ms after it is due (send_lag).
        delay = max(math.ceil((at - time.monotonic()) * 1000.0), 1) / 1000.0
        self._timer = self.loop.call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        heap, clients = self._heap, self.clients
        while heap and heap[0][0] <= time.monotonic():
            i = heap[0][1]
            client = clients[i]
            client.send_next()
            if client.next < client.n:
                heapq.heapreplace(heap, (client.due[client.next], i))
            else:
                heapq.heappop(heap)
        if heap:
            self._schedule()
        elif not self._arriving and not self._sending_done.done():
            self._sending_done.set_result(None)

    async def _connect(self, client: _Client, gate: asyncio.Semaphore) -> float | None:
        """Connect, say hello and open the stream; when refused ``server_busy`` at hello or
        open, the ``retry_after_ms`` it carried (else None)."""
        plan = self.plan
        url = urlsplit(plan.url)
        host, port = url.hostname or "127.0.0.1", url.port or 80
        model, stream_kind, dtype, _, _ = KINDS[plan.kinds[client.i]]
        hello_at, hello_ms = self.rec.hello_at, self.rec.hello_ms
        async with gate:
            hello_at[client.i] = time.monotonic()
            try:
                _, conn = await self.loop.create_connection(
                    lambda: RawConnection(host, port, url.path or "/", self.key, client.on_message),
                    host,
                    port,
                )
                await asyncio.wait_for(conn.opened, 30)
            except HandshakeRefused as exc:
                hello_ms[client.i] = (time.monotonic() - hello_at[client.i]) * 1000.0
                self.rec.handshake_refusals += 1
                return self._refuse(client, _typed(exc))
            except (OSError, TimeoutError, ConnectionError):
                self.rec.connect_failures += 1
                return None
            client.conn = conn
            if plan.target != "realtime":  # a baseline takes every connection it completes
                self.rec.admitted[client.i] = True
                return None
            client.control = asyncio.Queue()
            hello_at[client.i] = time.monotonic()
            conn.send(OP_TEXT, orjson.dumps({"type": "hello", "protocol": 1}))
            welcome = await asyncio.wait_for(client.control.get(), 30)
            hello_ms[client.i] = (time.monotonic() - hello_at[client.i]) * 1000.0
            if welcome.get("type") != "welcome":
                client.control = None
                return self._refuse(client, welcome)
            opened = {
                "type": "open",
                "stream": 1,
                "model": model,
                "kind": stream_kind,
                "dtype": dtype,
                "results": plan.results,
                **({"sample_rate": 16000} if stream_kind == "audio" else {}),
            }
            conn.send(OP_TEXT, orjson.dumps(opened))
            answer = await asyncio.wait_for(client.control.get(), 30)
            client.control = None
            if answer.get("type") != "opened":
                return self._refuse(client, answer)
            self.rec.admitted[client.i] = True
            return None

    def _refuse(self, client: _Client, why: str | dict[str, Any]) -> float | None:
        """A client the server would not take (``why``: a code, or the error it sent): its
        chunks count as refused, never sent. Returns ``retry_after_ms`` when the client is to
        try again (``Plan.retry`` and a ``server_busy`` that carries one)."""
        rec = self.rec
        if isinstance(why, str):
            code, retry = why, None
        else:
            code = str(why.get("code", why.get("type")))
            retry = why.get("retry_after_ms") if code == "server_busy" else None
        rec.refusal_at.append(rec.hello_at[client.i])
        rec.refusal_ms.append(rec.hello_ms[client.i])
        rec.refusals[client.i] += 1
        rec.refused_codes[code] = rec.refused_codes.get(code, 0) + 1
        if client.conn is not None and client.conn.transport is not None:
            client.conn.transport.abort()
        client.conn = None
        if self.plan.retry and isinstance(retry, int | float):
            return float(retry)
        rec.refused += 1
        key = f"refused:{code}"
        if key not in self.codes:
            self.codes[key] = len(self.codes) + 1
        used = client.outcome != UNUSED
        client.outcome[used] = self.codes[key]
        self.pending -= int(used.sum())
        return None

    async def run(self) -> Records:
        plan, rec = self.plan, self.rec
        frames: dict[str, list[ChunkTemplate]] = {}
        for i, kind in enumerate(plan.kinds):
            rng = np.random.default_rng(plan.first_client + i)
            if kind not in frames:
                frames[kind] = [
                    ChunkTemplate(encode_frame(Chunk(1, 0, 0.0, a)), self.key)
                    for a in payloads(kind, rng)
                ]
            rate = KINDS[kind][4]
            client = _Client(self, i, frames[kind], int(rng.integers(0, len(frames[kind]))))
            phase = rng.uniform(0, 1.0 / rate)
            self.clients.append(client)
            if plan.arrivals is not None:  # its chunks are due from its arrival on
                rec.outcome[i, :] = UNUSED
                self._phases.append(phase)
                continue
            client.n = n = int(plan.seconds * rate)
            rec.due[i, :n] = plan.start + phase + np.arange(n) / rate
            rec.outcome[i, n:] = UNUSED
            self.pending += n
        gate = asyncio.Semaphore(CONNECTS_AT_ONCE)
        if plan.arrivals is not None:
            return await self._run_arrivals(gate)
        await asyncio.gather(*(self._connect(c, gate) for c in self.clients))
        late = time.monotonic() - plan.start
        if late > 0:
            print(
                f"loadtest: {len(self.clients)} clients connected {late:.2f} s after the start: "
                "their first chunks are late from their due time (send_lag_ms)",
                file=sys.stderr,
                flush=True,
            )
        for c in self.clients:
            if c.conn is None and c.outcome[0] == PENDING:
                self.pending -= c.n  # never connected: its chunks stay pending (lost)
                c.n = 0
        self._heap = [(c.due[0], c.i) for c in self.clients if c.conn is not None and c.n]
        heapq.heapify(self._heap)
        if self.pending <= 0 and not self.all_answered.done():
            self.all_answered.set_result(None)
        cpu0 = time.process_time()
        if self._heap:
            self._schedule()
            await self._sending_done
        rec.cpu_seconds = time.process_time() - cpu0
        return await self._finish()

    async def _run_arrivals(self, gate: asyncio.Semaphore) -> Records:
        """Each client connects at its arrival time and, if admitted, streams from then on."""
        plan = self.plan
        assert plan.arrivals is not None
        self._arriving = len(self.clients)
        cpu0 = time.process_time()
        await asyncio.gather(
            *(self._arrive(c, gate, plan.start + plan.arrivals[c.i]) for c in self.clients)
        )
        if not self._sending_done.done() and not self._heap:
            self._sending_done.set_result(None)
        await self._sending_done
        self.rec.cpu_seconds = time.process_time() - cpu0
        return await self._finish()

    async def _arrive(self, client: _Client, gate: asyncio.Semaphore, at: float) -> None:
        plan, rec, i = self.plan, self.rec, client.i
        jitter = random.Random(plan.first_client + i)
        try:
            for attempt in itertools.count():
                delay = at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)  # a timer per client: its (next) arrival time
                retry_ms = await self._connect(client, gate)
                if retry_ms is None:
                    break
                # Polite: the server's wait, doubled at each refusal, jittered.
                at = time.monotonic() + retry_ms / 1000.0 * 2**attempt * jitter.uniform(0.5, 1.5)
                if at > plan.start + plan.seconds - 1.0:  # too late to stream a second
                    rec.refused += 1
                    break
        except (TimeoutError, ConnectionError):
            self.rec.connect_failures += 1
            client.conn = None
        finally:
            self._arriving -= 1
        if client.conn is not None and rec.admitted[i]:
            rate = KINDS[plan.kinds[i]][4]
            first = time.monotonic() + self._phases[i]
            stop = plan.start + plan.seconds
            if plan.stream_seconds is not None:
                stop = min(stop, first + plan.stream_seconds[i])
            n = min(rec.due.shape[1], max(0, int((stop - first) * rate + 1e-6)))
            rec.due[i, :n] = first + np.arange(n) / rate
            rec.outcome[i, :n] = PENDING
            client.n = n
            self.pending += n
            if n:
                heapq.heappush(self._heap, (rec.due[i, 0], i))
                self._schedule()
        if not self._arriving and not self._heap and not self._sending_done.done():
            self._sending_done.set_result(None)

    async def _finish(self) -> Records:
        """Wait for late answers, close every connection, and hand the records over."""
        plan, rec = self.plan, self.rec
        if self.pending <= 0 and not self.all_answered.done():
            self.all_answered.set_result(None)
        # Late answers still count (late is not lost) up to settle_seconds after the last send.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.all_answered), plan.settle_seconds)
        for c in self.clients:
            if c.conn is not None:
                c.conn.close()
        closing = [c.conn.closed for c in self.clients if c.conn is not None]
        if closing:
            await asyncio.wait(closing, timeout=2.0)
        for c in self.clients:
            if c.conn is not None and c.conn.transport is not None:
                c.conn.transport.abort()
        rec.codes = [c for c, _ in sorted(self.codes.items(), key=lambda kv: kv[1])]
        rec.unattributed = dict(self.unattributed)
        return rec


def run_process(plan: Plan) -> Records:
    """Entry point of one raw client process (placed as ``plan`` says)."""
    import uvloop

    place_process(plan)

    async def main() -> Records:
        return await _Run(plan).run()

    return uvloop.run(main())


def _typed(refusal: HandshakeRefused) -> str | dict[str, Any]:
    """A refused handshake's typed error (a 503's ``server_busy`` body), else ``http_<status>``."""
    try:
        body = orjson.loads(refusal.body)
    except orjson.JSONDecodeError:
        body = None
    return body if isinstance(body, dict) and "code" in body else f"http_{refusal.status}"
