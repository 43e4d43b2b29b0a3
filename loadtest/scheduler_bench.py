"""The micro-batching scheduler against one-item-at-a-time inference, same model, same load.

Not a test: a benchmark. N streams each produce one model window every ``period`` (open loop:
every chunk has a scheduled time, and its latency is measured from that time, so a backlog shows
as latency instead of slowing the generator down). Each model window goes straight into
the real :class:`realtime.scheduler.Scheduler`, as a session hands it over (no network and no
session: this isolates the scheduler; ``python -m loadtest`` measures the whole server). The
baseline is the same scheduler with batches of one, which is what a server that calls the model on
each message as it arrives does (with the same two worker threads).

    python -m loadtest.scheduler_bench                     # 100 and 1000 streams, both modes
    python -m loadtest.scheduler_bench --streams 100 --seconds 5 --model silero_vad

Writes its figures to ``loadtest/results/scheduler.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from realtime import errors
from realtime.models.repository import BUILTIN_DIR, ModelRepository, scan
from realtime.models.spec import Model
from realtime.protocol import Hello, Open
from realtime.scheduler import Scheduler
from realtime.session import Limits, Outcome, Session, WorkItem

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "models"
STREAMS_PER_SESSION = 8


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


async def run(
    model: Model,
    models: list[Model],
    streams: int,
    seconds: float,
    batched: bool,
    max_delay_ms: float | None = None,
) -> dict[str, Any]:
    """Offer ``streams`` real-time streams for ``seconds``; latency from each chunk's scheduled
    time to its result, and what was shed."""
    model = (
        dataclasses.replace(model, max_batch=1, max_delay_ms=0.0)
        if not batched
        else model
        if max_delay_ms is None
        else dataclasses.replace(model, max_delay_ms=max_delay_ms)
    )
    models = [model if m.key == model.key else m for m in models]
    repo = ModelRepository(models)
    assert model.kind == "audio" and model.chunk and model.sample_rate
    period = model.chunk / model.sample_rate  # one model window per chunk
    rng = np.random.default_rng(0)
    audio = (rng.normal(0, 0.1, model.chunk * 50)).astype(np.float32)
    sessions: list[Session] = []
    for i in range(streams):
        if i % STREAMS_PER_SESSION == 0:
            sessions.append(Session(f"s{i}", repo, Limits(max_streams=STREAMS_PER_SESSION), "b"))
            sessions[-1].hello(Hello(1))
        sessions[-1].open_stream(
            Open(i, model.name, "audio", "float32", version=model.version, deadline_ms=100.0)
        )
    stream_objs = [sessions[i // STREAMS_PER_SESSION].streams[i] for i in range(streams)]
    window = model.chunk + model.context
    # Streams start spread over one period, as real clients do.
    phase = rng.uniform(0, period, streams)
    latencies: list[float] = []
    shed: dict[str, int] = {}
    pending: set[WorkItem] = set()
    warmup = min(1.0, seconds / 5)
    deadline = 0.100

    def done(item: WorkItem, outcome: Outcome) -> None:
        pending.discard(item)
        if isinstance(outcome, errors.RealtimeError):
            shed[outcome.code] = shed.get(outcome.code, 0) + 1
        elif item.received >= start + warmup:
            latencies.append(time.monotonic() - item.received)

    scheduler = Scheduler(models, workers=2, max_queue=1_000_000, deliver=done)
    cpu0 = _cpu_seconds()
    start = time.monotonic() + 0.05
    next_k = np.zeros(streams, np.int64)
    end = start + seconds
    offered = 0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = start + phase + next_k * period
        for i in np.flatnonzero(due <= now).tolist():
            k = int(next_k[i])
            scheduled = float(due[i])
            offset = (k * model.chunk) % (audio.size - window)
            # One model window straight to the scheduler, as Session.accept makes it; its
            # deadline runs from its scheduled time.
            item = WorkItem(
                stream_objs[i],
                k,
                k * period * 1000.0,
                audio[offset : offset + window],
                scheduled,
                scheduled + deadline,
            )
            try:
                scheduler.submit(item)
            except errors.RealtimeError as e:
                shed[e.code] = shed.get(e.code, 0) + 1
            else:
                pending.add(item)
            next_k[i] += 1
            offered += 1
        next_due = float((start + phase + next_k * period).min())
        await asyncio.sleep(max(0.0, min(next_due - time.monotonic(), 0.002)))
    drain_until = time.monotonic() + 5.0
    while pending and time.monotonic() < drain_until:
        await asyncio.sleep(0.1)  # a bounded wait for the last outcomes of a benchmark
    cpu = _cpu_seconds() - cpu0
    wall = time.monotonic() - start
    snapshot = scheduler.snapshot()[model.key]
    await scheduler.close()
    lat = np.array(latencies) * 1000.0
    sizes = snapshot.stats.batch_sizes
    n_batches = sum(sizes.values())
    measured = seconds - warmup
    return {
        "mode": "batched" if batched else "one_at_a_time",
        "streams": streams,
        "offered_per_s": round(offered / seconds, 1),
        "completed_per_s": round(len(lat) / measured, 1),
        "on_time_per_s": round(int((lat <= 1000 * deadline).sum()) / measured, 1),
        "latency_ms": {
            q: round(float(np.percentile(lat, p)), 2) if lat.size else None
            for q, p in [("p50", 50), ("p90", 90), ("p99", 99), ("max", 100)]
        },
        "shed": shed,
        "max_delay_ms": model.max_delay_ms,
        "mean_batch": round(sum(n * c for n, c in sizes.items()) / max(1, n_batches), 1),
        "batches": n_batches,
        "cpu_cores": round(cpu / wall, 2),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    models = scan(EXAMPLES) if args.model == "silero_vad" else scan(BUILTIN_DIR)
    model = ModelRepository(models).get(args.model)
    if model is None:
        raise SystemExit(f"no model {args.model}")
    runs = []
    for streams in args.streams:
        for batched in (True, False):
            r = await run(model, models, streams, args.seconds, batched, args.max_delay_ms)
            print(json.dumps(r), flush=True)
            runs.append(r)
    return {
        "benchmark": "scheduler",
        "model": model.key,
        "window_ms": 1000.0 * (model.chunk or 0) / (model.sample_rate or 1),
        "deadline_ms": 100.0,
        "seconds": args.seconds,
        "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
        "load_average": os.getloadavg(),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--model", default="silero_vad")
    parser.add_argument("--max-delay-ms", type=float, help="override the model's max_delay_ms")
    out = REPO / "loadtest" / "results" / "scheduler.json"
    parser.add_argument("--out", type=Path, default=out)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        result = asyncio.run(main_async(args))
    else:
        result = uvloop.run(main_async(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
