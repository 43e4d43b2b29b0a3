"""``python -m loadtest.hotpath_bench``: the server's per-chunk CPU cost without sockets.

Drives the real per-chunk path (:class:`realtime.connection.Connection` ->
:class:`realtime.scheduler.Scheduler` -> ONNX Runtime -> back -> frames to send) with encoded
chunk frames, as the server's glue does, for ``--streams`` real-time streams of the built-in
``speech_activity`` model (or ``--model``), and reports the CPU seconds spent per chunk by the
whole process (event loop and ONNX Runtime's worker threads), split into the event loop's share
and the rest, and how often the garbage collector ran. Nothing here waits on a network or
another process, so the figure is steady on a busy machine (CPU time, not wall time); it is the
part of the server's cost that the hot-path work changes, beside the transport's (measured by
``python -m loadtest`` against the echo).

    python -m loadtest.hotpath_bench --streams 100 --seconds 5
    python -m loadtest.hotpath_bench --profile       # and print cProfile's top functions
    python -m loadtest.hotpath_bench --models examples/models --model silero_vad --chunk-ms 32
    python -m loadtest.hotpath_bench --stale-ms 200  # every chunk refused for its age

``--stale-ms`` hands each chunk over as if the loop had read its bytes that long before (a
waiting session's, let go; or the loop fell behind): past its deadline, it is refused
``deadline_exceeded`` before any work. Against a run without it, this is what shedding a chunk
saves over serving it; the cost of the refusals is what a server that fell behind pays to
catch up (docs/scheduler.md, "Session 39").
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from realtime.config import Config
from realtime.connection import Connection
from realtime.errors import ServingError
from realtime.protocol import Chunk, encode_frame
from realtime.server import Server
from realtime.session import Outcome, Session, WorkItem


async def run(
    model: str,
    streams: int,
    seconds: float,
    binary: bool,
    models: tuple[Path, ...] = (),
    chunk_ms: float = 20.0,
    rounds_wanted: int = 0,
    warm_up: bool = True,
    deadline_ms: int = 0,
    stale_ms: float = 0.0,
) -> dict[str, Any]:
    """Offer ``streams`` real-time streams' worth of chunks (``chunk_ms`` of 16 kHz int16 each,
    or one tensor) as fast as the loop takes them, in rounds of one chunk per stream, for
    ``seconds`` (or ``rounds_wanted`` rounds); the CPU seconds per chunk answered. The streams
    ask for ``deadline_ms`` (0: the model's); each chunk is handed over ``stale_ms`` after its
    bytes were read."""
    server = Server(Config(port=0, warm_up=warm_up, workers=2, model_dirs=models))
    if warm_up:
        await asyncio.get_running_loop().run_in_executor(None, server.scheduler.warm_up)
    spec = server.repository.get(model)
    assert spec is not None
    conns: list[Connection] = []
    answered = 0
    waiting = [0]  # chunks whose outcome has not come back in this round
    done: list[asyncio.Future[None]] = []

    def deliver(item: WorkItem, outcome: Outcome) -> None:
        conn = conns_by_id[item.stream.session]
        before = conn.inflight
        conn.outcome(item, outcome)
        waiting[0] -= before - conn.inflight
        if not waiting[0] and done:
            done.pop().set_result(None)

    server.scheduler._deliver = deliver
    for q in server.scheduler.queues.values():
        q._deliver = deliver
    conns_by_id: dict[str, Connection] = {}
    for i in range(streams):
        session = Session(f"s{i}", server.repository, server.config.limits, "bench")
        conn = Connection(session, server.traffic, 1 << 20, server.scheduler.drop_oldest)
        conn.receive_text(orjson.dumps({"type": "hello", "protocol": 1}).decode())
        kind = spec.kind
        opened: dict[str, Any] = {"type": "open", "stream": 1, "model": model, "kind": kind}
        if kind == "audio":
            opened |= {"dtype": "int16", "sample_rate": 16000}
        else:
            opened |= {"dtype": spec.input.dtype.name}
        if deadline_ms:
            opened["deadline_ms"] = deadline_ms
        if binary:
            opened["results"] = "binary"
        conn.receive_text(orjson.dumps(opened).decode())
        sent = conn.data_to_send()
        if 1 not in session.streams:
            raise SystemExit(f"the stream was not opened: {sent}")
        conns.append(conn)
        conns_by_id[session.id] = conn
    rng = np.random.default_rng(0)
    if spec.kind == "audio":
        payload = rng.integers(-3000, 3000, round(16 * chunk_ms), np.int16)
    else:
        payload = rng.normal(0, 0.1, spec.item_shape).astype(spec.input.dtype)
    frames = [encode_frame(Chunk(1, seq, chunk_ms * seq, payload)) for seq in range(4096)]
    submit = server.scheduler.submit
    age = stale_ms / 1000.0
    rounds = 0
    loop_cpu = 0.0
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    gc0 = gc.get_stats()
    start = time.monotonic()
    loop_cpu0 = time.thread_time()
    while rounds < rounds_wanted if rounds_wanted else time.monotonic() - start < seconds:
        frame = frames[rounds % len(frames)]
        now = time.monotonic()
        for conn in conns:
            for item in conn.receive_binary(frame, now, False, age):
                try:
                    submit(item)
                except ServingError as e:  # refused at the queue: answered typed at once
                    conn.outcome(item, e)
        rounds += 1
        waiting[0] = sum(c.inflight for c in conns)
        if waiting[0]:
            done.append(asyncio.get_running_loop().create_future())
            await done[-1]  # the batches run; their outcomes come back on this loop
        for conn in conns:
            answered += len(conn.data_to_send())
        if rounds % len(frames) == 0:  # sequence numbers must increase: new streams' worth
            break
    loop_cpu = time.thread_time() - loop_cpu0
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    gc1 = gc.get_stats()
    await server.scheduler.close()
    chunks = rounds * streams
    cpu = (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
    return {
        "model": model,
        "streams": streams,
        "chunks": chunks,
        "frames_out": answered,
        "errors": dict(server.traffic.errors),  # sent, by code (--stale-ms: the refusals)
        "cpu_us_per_chunk": round(1e6 * cpu / chunks, 1),
        "event_loop_us_per_chunk": round(1e6 * loop_cpu / chunks, 1),
        # The garbage collector's runs per 1000 chunks, by generation, and what they freed: what
        # refcounting frees never reaches it.
        "gc_runs_per_1000_chunks": [
            round(1000 * (b["collections"] - a["collections"]) / chunks, 2)
            for a, b in zip(gc0, gc1, strict=True)
        ],
        "gc_collected_per_chunk": round(
            sum(b["collected"] - a["collected"] for a, b in zip(gc0, gc1, strict=True)) / chunks, 2
        ),
    }


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="speech_activity")
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--binary", action="store_true", help="binary results")
    parser.add_argument(
        "--models", type=Path, action="append", default=[], help="a model folder (repeatable)"
    )
    parser.add_argument("--chunk-ms", type=float, default=20.0, help="audio per chunk")
    parser.add_argument("--rounds", type=int, default=0, help="this many rounds, not --seconds")
    parser.add_argument("--no-warm-up", action="store_true", help="skip the model warm-up")
    parser.add_argument("--deadline-ms", type=int, default=0, help="the streams' deadline")
    parser.add_argument(
        "--stale-ms", type=float, default=0.0, help="hand each chunk over this long after its read"
    )
    parser.add_argument("--profile", action="store_true", help="print cProfile's top lines")
    args = parser.parse_args()
    import uvloop

    profile = cProfile.Profile() if args.profile else None
    if profile is not None:
        profile.enable()
    out = uvloop.run(
        run(
            args.model,
            args.streams,
            args.seconds,
            args.binary,
            tuple(args.models),
            args.chunk_ms,
            args.rounds,
            not args.no_warm_up,
            args.deadline_ms,
            args.stale_ms,
        )
    )
    if profile is not None:
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
