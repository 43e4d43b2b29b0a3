"""Simulated clients, run in worker processes so that the load generator is not the bottleneck.

Each client is one WebSocket connection with one stream of one kind:

- ``audio``: 20 ms of 16 kHz int16 PCM every 20 ms (50 chunks/s) to the built-in speech model;
- ``pose``: a VR rig's three poses ([3, 7] float32) at 80 Hz to the built-in pose filter;
- ``video``: a 96x96 RGB frame at 20 fps to the built-in motion model.

Pacing is open loop: chunk k of a client is due at ``start + phase + k * period`` and its latency
is measured from that due time, whether or not the process managed to send it on time, so a
slow server (or a slow generator) shows up as latency instead of as fewer requests (no
coordinated omission). Times are ``time.monotonic()``, one clock for every process on the
machine: the load test targets loopback only, so there is no offset between client and server.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from websockets.asyncio.client import connect

from realtime.protocol import Chunk, encode_frame

#: kind -> (model, stream kind, dtype, chunk shape, chunks per second)
KINDS: dict[str, tuple[str, str, str, tuple[int, ...], float]] = {
    "audio": ("speech_activity", "audio", "int16", (320,), 50.0),
    "pose": ("pose", "tensor", "float32", (3, 7), 80.0),
    "video": ("motion", "video", "uint8", (96, 96, 3), 20.0),
    # silero VAD from examples/models: 32 ms of 16 kHz int16 PCM every 32 ms
    "vad": ("silero_vad", "audio", "int16", (512,), 31.25),
}
SPEECH_CLIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech_16k.wav"
OK = 0  # outcome code of a result; errors are numbered in ``Records.codes`` (from 1)
PENDING = -1  # no answer (yet)
UNUSED = -2  # past the end of this client's run (slower kinds send fewer chunks)


@dataclass
class Plan:
    """What one worker process does: its clients, the target and the shared start time."""

    url: str
    target: str  # "realtime", "naive" or "echo"
    kinds: list[str]  # one per client
    first_client: int
    start: float  # monotonic time of the first due chunk
    seconds: float
    results: str = "json"  # what realtime streams ask for: "json" or "binary" results
    settle_seconds: float = 15.0  # the longest wait for late answers after the last send
    cpus: set[int] | None = None  # CPUs the client process is pinned to (None: any)
    nice: int = 0  # the client process's nice value (negative: ahead of other work)
    #: Raw client only. Per client, seconds after ``start`` it connects and says hello; it
    #: streams from its ``opened`` on (None: everyone connects first and streams from start).
    arrivals: list[float] | None = None
    #: With arrivals, per client, how long it streams (None: until start + seconds).
    stream_seconds: list[float] | None = None
    #: With arrivals: a client refused ``server_busy`` tries again, as docs/protocol.md asks,
    #: after ``retry_after_ms``, doubled at each refusal, times a jitter of 0.5-1.5 (False: never).
    retry: bool = False


@dataclass
class Records:
    """Per chunk (rows: this process's clients; columns: chunk index) what happened to it."""

    due: np.ndarray[Any, Any]  # scheduled send time
    sent: np.ndarray[Any, Any]  # actual send time (nan: never sent)
    received: np.ndarray[Any, Any]  # answer time (nan: none)
    queue_ms: np.ndarray[Any, Any]
    infer_ms: np.ndarray[Any, Any]
    outcome: np.ndarray[Any, Any]  # OK, PENDING or an index into codes (+1)
    codes: list[str]
    kinds: list[str]
    cpu_seconds: float
    connect_failures: int
    refused: int = 0  # clients the server turned away (HTTP status, or an error at hello/open)
    refused_codes: dict[str, int] = field(default_factory=dict)  # refusals, by code
    handshake_refusals: int = 0  # of them, at the handshake (an HTTP status, not at hello)
    #: Per client (raw client): when it said hello, ms until the welcome or the refusal, and
    #: whether it was admitted (welcome and opened; by a baseline, connected).
    hello_at: np.ndarray[Any, Any] = field(default_factory=lambda: np.empty(0))
    hello_ms: np.ndarray[Any, Any] = field(default_factory=lambda: np.empty(0))
    admitted: np.ndarray[Any, Any] = field(default_factory=lambda: np.empty(0, bool))
    #: Per client: whether the server ended its session ``server_busy`` after admitting it.
    taken_back: np.ndarray[Any, Any] = field(default_factory=lambda: np.empty(0, bool))
    #: Every refusal (a client that tries again can have several): when its hello went out
    #: (monotonic seconds) and ms until the refusal came; and per client, how many it had.
    refusal_at: list[float] = field(default_factory=list)
    refusal_ms: list[float] = field(default_factory=list)
    refusals: np.ndarray[Any, Any] = field(default_factory=lambda: np.empty(0, np.int32))
    unattributed: dict[str, int] = field(default_factory=dict)  # errors with no seq, by code

    @classmethod
    def empty(cls, plan: Plan) -> Records:
        """Nothing happened yet to any chunk of ``plan``'s clients (one row each, one column per
        chunk of the fastest kind)."""
        n_clients = len(plan.kinds)
        width = max(int(plan.seconds * max(KINDS[k][4] for k in plan.kinds)), 1) if n_clients else 0
        shape = (n_clients, width)
        return cls(
            due=np.full(shape, np.nan),
            sent=np.full(shape, np.nan),
            received=np.full(shape, np.nan),
            queue_ms=np.full(shape, np.nan),
            infer_ms=np.full(shape, np.nan),
            outcome=np.full(shape, PENDING, np.int32),
            codes=[],
            kinds=plan.kinds,
            cpu_seconds=0.0,
            connect_failures=0,
            hello_at=np.full(n_clients, np.nan),
            hello_ms=np.full(n_clients, np.nan),
            admitted=np.zeros(n_clients, bool),
            taken_back=np.zeros(n_clients, bool),
            refusals=np.zeros(n_clients, np.int32),
        )


@functools.cache
def _speech_clip() -> np.ndarray[Any, Any]:
    """../shared/data/speech_16k.wav as int16 samples (a 44-byte WAV header, then PCM)."""
    return np.frombuffer(SPEECH_CLIP.read_bytes()[44:], "<i2")


def payloads(kind: str, rng: np.random.Generator) -> list[np.ndarray[Any, Any]]:
    """The arrays a client of ``kind`` cycles through: real speech for silero VAD when
    ../shared is there (so its events fire as in use), noise otherwise."""
    _, _, dtype, shape, _ = KINDS[kind]
    if kind == "vad" and SPEECH_CLIP.exists():
        pcm = _speech_clip()
        whole = len(pcm) // shape[0]
        return list(pcm[: whole * shape[0]].reshape(whole, *shape))
    if dtype == "int16":
        return [rng.integers(-3000, 3000, shape, np.int16) for _ in range(8)]
    if dtype == "uint8":
        return [rng.integers(0, 256, shape, np.uint8) for _ in range(8)]
    return [rng.normal(0, 0.1, shape).astype(np.float32) for _ in range(8)]


async def _client(i: int, plan: Plan, rec: Records, codes: dict[str, int]) -> None:
    kind = plan.kinds[i]
    model, stream_kind, dtype, _, rate = KINDS[kind]
    period = 1.0 / rate
    rng = np.random.default_rng(plan.first_client + i)
    frames = [encode_frame(Chunk(1, 0, 0.0, a)) for a in payloads(kind, rng)]
    phase = rng.uniform(0, period)
    n = int(plan.seconds * rate)
    rec.due[i, :n] = plan.start + phase + np.arange(n) * period
    rec.outcome[i, n:] = UNUSED
    try:
        ws = await connect(plan.url, compression=None, max_size=None, open_timeout=30)
    except (TimeoutError, OSError):
        rec.connect_failures += 1
        return
    async with ws:
        if plan.target == "realtime":
            await ws.send(orjson.dumps({"type": "hello", "protocol": 1}).decode())
            await ws.recv()
            await ws.send(
                orjson.dumps(
                    {
                        "type": "open",
                        "stream": 1,
                        "model": model,
                        "kind": stream_kind,
                        "dtype": dtype,
                        "results": plan.results,
                        **({"sample_rate": 16000} if stream_kind == "audio" else {}),
                    }
                ).decode()
            )
            opened = orjson.loads(await ws.recv())
            if opened.get("type") != "opened":
                raise RuntimeError(f"open failed: {opened}")

        received, outcome = rec.received[i], rec.outcome[i]
        queue_ms, infer_ms = rec.queue_ms[i], rec.infer_ms[i]

        async def read() -> None:
            async for message in ws:
                now = time.monotonic()
                if isinstance(message, bytes):  # the echo server, or a binary result
                    if message[1] == 2 and message[14] != message[15] - 1:
                        continue  # not the last frame of a binary result
                    seq = int.from_bytes(message[8:12], "little")
                    received[seq], outcome[seq] = now, OK
                    continue
                msg = orjson.loads(message)
                kind = msg.get("type")
                if kind == "result":
                    seq = msg["seq"]
                    received[seq], outcome[seq] = now, OK
                    timing = msg["timing"]
                    queue_ms[seq], infer_ms[seq] = timing["queue_ms"], timing["infer_ms"]
                elif kind == "error" and msg.get("seq") is not None:
                    seq = msg["seq"]
                    code = msg["code"]
                    if code not in codes:
                        codes[code] = len(codes) + 1
                    received[seq], outcome[seq] = now, codes[code]

        reader = asyncio.create_task(read())
        due, sent = rec.due[i], rec.sent[i]
        try:
            for k in range(n):
                # Pacing to the schedule. The loop's timers round to the millisecond and start
                # from a cached clock, so a sleep can end before the due time: sleep again until
                # it has come (an early send made fast answers look faster than instant), in
                # whole milliseconds (uvloop runs a sleep under 0.5 ms as call_soon: a spin).
                delay = due[k] - time.monotonic()
                while delay > 0:
                    await asyncio.sleep(max(math.ceil(delay * 1000.0), 1) / 1000.0)
                    delay = due[k] - time.monotonic()
                frame = bytearray(frames[k % len(frames)])
                frame[8:12] = k.to_bytes(4, "little")  # seq, in place in the header
                sent[k] = time.monotonic()
                await ws.send(bytes(frame))
            # Answers still on their way are waited for (an overloaded server answers late, and
            # late is not lost), up to settle_seconds after the last send; what is still pending
            # then is lost.
            give_up = time.monotonic() + plan.settle_seconds
            while (outcome == PENDING).any() and time.monotonic() < give_up:
                await asyncio.sleep(0.05)  # a poll of this client's own records
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def _run(plan: Plan) -> Records:
    n_clients = len(plan.kinds)
    rec = Records.empty(plan)
    codes: dict[str, int] = {}
    cpu0 = time.process_time()
    await asyncio.gather(*(_client(i, plan, rec, codes) for i in range(n_clients)))
    rec.codes = [c for c, _ in sorted(codes.items(), key=lambda kv: kv[1])]
    rec.cpu_seconds = time.process_time() - cpu0
    return rec


def run_process(plan: Plan) -> Records:
    """Entry point of one client process."""
    import uvloop

    place_process(plan)
    return uvloop.run(_run(plan))


_barrier: Any = None


def keep_barrier(barrier: Any) -> None:
    """Pool initializer: keep the barrier that ``all_ready`` waits on."""
    global _barrier
    _barrier = barrier


def all_ready(_: int) -> None:
    """One task per pool process: returns once every process of the pool has started."""
    _barrier.wait(timeout=120)


def place_process(plan: Plan) -> None:
    """Pin this client process to ``plan.cpus`` and give it ``plan.nice``, where asked."""
    if plan.cpus:
        os.sched_setaffinity(0, plan.cpus)
    if plan.nice:
        with contextlib.suppress(OSError):
            os.setsid()  # its own session, so its own autogroup (see set_nice)
        set_nice(0, plan.nice)


def set_nice(pid: int, nice: int) -> None:
    """Give process ``pid`` (0: this one) the nice value ``nice``. Where the kernel groups
    processes by session (sched_autogroup), nice only orders processes inside their group and
    groups share the CPU equally, so the group of a session leader gets the same nice."""
    os.setpriority(os.PRIO_PROCESS, pid, nice)
    if pid == 0:
        pid = os.getpid()
    if os.getsid(pid) == pid:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/autogroup").write_text(str(nice))
