"""The scheduler with real models: batching many streams changes no stream's outputs."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from realtime import errors
from realtime.models.repository import BUILTIN_DIR, ModelRepository, scan
from realtime.models.spec import Model
from realtime.protocol import Chunk, Event, Hello, Open, Result
from realtime.scheduler import PACE_FROM, Scheduler
from realtime.session import Limits, Outcome, Prediction, Session, Stream, WorkItem
from tests.conftest import REPO, SHARED, Outcomes, needs_shared, read_clip

#: Room for every chunk of every stream to be queued at once: nothing is refused or late.
ROOMY = Limits(max_streams=64, max_inflight_per_stream=100_000, max_inflight_per_session=100_000)

Outputs = list[dict[str, np.ndarray[Any, Any]]]


async def run_streams(
    models: list[Model],
    name: str,
    chunks: list[list[np.ndarray[Any, Any]]],
    together: bool,
    used: list[Scheduler] | None = None,
) -> tuple[list[Outputs], int]:
    """Feed each stream its chunks through sessions and one scheduler; every result's outputs
    per stream, and the largest batch seen. ``together``: all streams' chunks are queued before
    any runs (the scheduler batches across streams); else each stream runs alone, one chunk at a
    time, as if it were the only client."""
    repo = ModelRepository(models)
    outcomes = Outcomes()
    scheduler = Scheduler(models, workers=2, max_queue=1_000_000, deliver=outcomes.deliver)
    if used is not None:
        used.append(scheduler)
    model = repo.get(name)
    assert model is not None
    dtype = "float32" if model.kind == "audio" else model.input.dtype.name
    sessions: list[Session] = []
    results: list[Outputs] = [[] for _ in chunks]
    biggest = 0

    def collect(i: int, messages: list[Any]) -> None:
        nonlocal biggest
        for m in messages:
            if isinstance(m, Event):
                continue
            assert isinstance(m, Result), m
            biggest = max(biggest, m.timing.batch)
            results[i].append(m.outputs)

    async def submit(i: int, seq: int) -> None:
        session = sessions[i // 8]  # 8 streams per session: round-robin across sessions too
        data = chunks[i][seq]
        chunk = Chunk(i, seq, float(seq), data, deadline_ms=60_000)
        items = session.accept(chunk, time.monotonic())
        if not items:
            collect(i, session.release(i))
        futures = [outcomes.submit(scheduler, item) for item in items]
        got = await asyncio.gather(*futures, return_exceptions=True)
        for item, outcome in zip(items, got, strict=True):
            assert not isinstance(outcome, BaseException) or isinstance(
                outcome, errors.ServingError
            ), outcome
            collect(i, session.complete(item, outcome))

    for i in range(len(chunks)):
        if i % 8 == 0:
            sessions.append(Session(f"s{i // 8}", repo, ROOMY, "test"))
            sessions[-1].hello(Hello(1))
        sessions[i // 8].open_stream(
            Open(i, name, model.kind, dtype, sample_rate=model.sample_rate, deadline_ms=60_000)
        )
    try:
        if together:
            await asyncio.gather(
                *(submit(i, seq) for seq in range(len(chunks[0])) for i in range(len(chunks)))
            )
        else:
            for i in range(len(chunks)):
                for seq in range(len(chunks[i])):
                    await submit(i, seq)
    finally:
        await scheduler.close()
    return results, biggest


def assert_same(batched: list[Outputs], alone: list[Outputs]) -> None:
    assert len(batched) == len(alone)
    for b, a in zip(batched, alone, strict=True):
        assert len(b) == len(a) > 0
        for rb, ra in zip(b, a, strict=True):
            assert rb.keys() == ra.keys()
            for k in rb:
                np.testing.assert_allclose(rb[k], ra[k], rtol=1e-5, atol=1e-5, err_msg=k)


def speech_streams(n: int, rate: int, seconds: float) -> list[np.ndarray[Any, Any]]:
    """n different mono float32 signals: the speech clip from n offsets, with a little noise."""
    pcm, clip_rate = read_clip("speech_16k.wav")
    assert clip_rate == rate
    audio = pcm.astype(np.float32) / 32768
    rng = np.random.default_rng(7)
    size = int(seconds * rate)
    out = []
    for i in range(n):
        start = (i * 2099) % (len(audio) - size)
        noise = rng.normal(0, 0.003, size).astype(np.float32)
        out.append(audio[start : start + size] + noise)
    return out


@needs_shared
async def test_silero_vad_32_streams_batched_match_each_stream_run_alone() -> None:
    models = scan(REPO / "examples" / "models")
    signals = speech_streams(32, 16000, 3.0)
    chunk = 320  # 20 ms chunks: windows of 512 straddle them, so the re-chunker is in play
    chunks = [[s[k : k + chunk] for k in range(0, len(s), chunk)] for s in signals]
    batched, biggest = await run_streams(models, "silero_vad", chunks, together=True)
    assert biggest > 8  # it really batched across streams

    # Each stream alone, as ../shared/models/silero-vad/SOURCE.md calls the model.
    session = ort.InferenceSession(
        str(SHARED / "models" / "silero-vad" / "model.onnx"),
        providers=["CPUExecutionProvider"],
    )
    sr = np.array(16000, np.int64)
    for signal, got in zip(signals, batched, strict=True):
        state, ctx = np.zeros((2, 1, 128), np.float32), np.zeros(64, np.float32)
        expected = []
        for k in range(0, len(signal) - 511, 512):
            window = signal[k : k + 512]
            prob, state = session.run(
                None, {"input": np.concatenate([ctx, window])[None], "state": state, "sr": sr}
            )
            ctx = window[-64:]
            expected.append(float(prob[0, 0]))
        probs = np.concatenate([r["output"].reshape(-1) for r in got])
        np.testing.assert_allclose(probs, expected, atol=1e-5)


def builtin_chunks(model: Model, n: int, length: int) -> list[list[np.ndarray[Any, Any]]]:
    """n streams of ``length`` chunks each, different per stream and moving over time."""
    rng = np.random.default_rng(11)
    if model.kind == "audio":
        t = np.arange(length * 320) / 16000
        return [
            [
                c.astype(np.float32)
                for c in np.split(
                    0.3 * np.sin(2 * np.pi * (110 + 37 * i) * t) + rng.normal(0, 0.01, t.size),
                    length,
                )
            ]
            for i in range(n)
        ]
    shape = model.item_shape
    if model.input.dtype == np.uint8:
        return [[rng.integers(0, 256, shape, np.uint8) for _ in range(length)] for _ in range(n)]
    walk = rng.normal(0, 0.05, (n, length, *shape)).cumsum(axis=1).astype(model.input.dtype)
    return [[walk[i, k] for k in range(length)] for i in range(n)]


@pytest.mark.parametrize("name", ["speech_activity", "pitch", "pose", "motion"])
async def test_builtin_models_batched_match_each_stream_run_alone(name: str) -> None:
    models = scan(BUILTIN_DIR)
    model = ModelRepository(models).get(name)
    assert model is not None
    chunks = builtin_chunks(model, 32, 12)
    batched, biggest = await run_streams(models, name, chunks, together=True)
    alone, one = await run_streams(models, name, chunks, together=False)
    assert biggest > 4 and one == 1
    assert_same(batched, alone)


async def test_a_batch_counts_the_wall_and_cpu_time_its_worker_spent() -> None:
    """Admission subtracts what small batches cost past the model's best time per item (see
    realtime.admission._batching_slack): it needs the workers' CPU time, and the best."""
    models = scan(BUILTIN_DIR)
    chunks = builtin_chunks(ModelRepository(models).get("pose"), 16, 8)  # type: ignore[arg-type]
    used: list[Scheduler] = []
    await run_streams(models, "pose", chunks, together=True, used=used)
    queue = used[0].queues["pose@1"]
    stats = queue.stats
    assert stats.items == 16 * 8
    assert 0.0 < stats.infer_cpu_seconds <= stats.infer_seconds * 1.05 + 0.001
    best = queue.run_times.best_per_item()
    assert best is not None and 0.0 < best <= max(queue.run_times.as_dict().values())


async def test_a_batch_leaves_no_reference_cycle_for_the_garbage_collector() -> None:
    """Refcounting frees a batch and its items as it comes back: a cycle per batch (its timer
    and its future's callback both refer back to it) left ~25 000 objects a second at 60
    clients for the collector, and the collections stalled the event loop."""
    models = scan(BUILTIN_DIR)
    chunks = builtin_chunks(ModelRepository(models).get("pose"), 16, 8)  # type: ignore[arg-type]
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds is kept in gc.garbage
    try:
        results, biggest = await run_streams(models, "pose", chunks, together=True)
        gc.collect()
        per_chunk = ("WorkItem", "Entry", "Gather", "Prediction", "_Running", "Future")
        # (The scheduler and its queues refer to each other: one cycle per scheduler is fine.)
        ours = [o for o in gc.garbage if type(o).__qualname__ in per_chunk]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert biggest > 1 and sum(len(r) for r in results) == 16 * 8
    assert ours == []


async def test_a_failing_batch_gives_each_of_its_chunks_a_typed_error() -> None:
    models = scan(BUILTIN_DIR)
    pose = ModelRepository(models).get("pose")
    assert pose is not None

    def explode(feeds: dict[str, np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        raise RuntimeError("ORT says no")

    pose.runner.run = explode  # type: ignore[method-assign]
    try:
        results: list[Outcome] = []
        outcomes = Outcomes()
        scheduler = Scheduler(models, deliver=outcomes.deliver)
        session = Session("s", ModelRepository(models), ROOMY, "test")
        session.hello(Hello(1))
        session.open_stream(Open(1, "pose", "tensor", "float32"))
        items = [
            session.accept(Chunk(1, seq, 0.0, np.zeros((3, 7), np.float32)), time.monotonic())[0]
            for seq in range(5)
        ]
        for f in await asyncio.gather(
            *(outcomes.submit(scheduler, it) for it in items), return_exceptions=True
        ):
            assert isinstance(f, errors.InferenceFailed) and "ORT says no" in str(f)
            results.append(f)
        await scheduler.close()
        assert len(results) == 5
    finally:
        del pose.runner.run


def _one_worker_on_double(tiny_models: Path) -> tuple[Scheduler, Outcomes, Stream]:
    """A scheduler with one worker and a fixed clock, and a stream open on ``double`` (its
    batches hold up to 32)."""
    models = scan(tiny_models)
    double = ModelRepository(models).get("double")
    assert double is not None and double.max_batch == 32
    outcomes = Outcomes()
    scheduler = Scheduler(models, workers=1, clock=lambda: 0.0, deliver=outcomes.deliver)
    session = Session("s", ModelRepository(models), ROOMY, "test")
    session.hello(Hello(1))
    session.open_stream(Open(1, "double", "tensor", "float32"))
    return scheduler, outcomes, session.streams[1]


async def test_a_chunk_that_would_wait_past_its_deadline_is_refused_at_the_door(
    tiny_models: Path,
) -> None:
    scheduler, outcomes, stream = _one_worker_on_double(tiny_models)
    # No batch has run yet, so a batch is taken to cost the prior 2 ms: a queue of 160 is
    # (160 // 32 + 1) * 2 = 12 ms of work, more than a 10 ms deadline allows. (The first 64 make
    # two full batches at once, the worker's and its next, which takes them out of the queue.)
    accepted, refused = [], []
    for seq in range(232):
        item = WorkItem(stream, seq, 0.0, np.zeros(4, np.float32), 0.0, 0.010)
        try:
            accepted.append(outcomes.submit(scheduler, item))
        except errors.Overloaded as e:
            refused.append((seq, str(e)))
    assert len(accepted) == 224 and [s for s, _ in refused] == list(range(224, 232))
    assert "would miss its deadline" in refused[0][1]
    assert scheduler.snapshot()["double@1"].stats.rejected == 8
    await scheduler.close()
    outcomes = await asyncio.gather(*accepted, return_exceptions=True)
    assert all(isinstance(o, (Prediction, errors.ShuttingDown)) for o in outcomes)


async def test_a_worker_has_its_next_batch_waiting(tiny_models: Path) -> None:
    """BATCHES_PER_WORKER: with a backlog, the batch after the running one is cut at once and
    waits in the worker's queue; a batch's end reaches the loop only at its next turn."""
    scheduler, outcomes, stream = _one_worker_on_double(tiny_models)
    done = [
        outcomes.submit(scheduler, WorkItem(stream, seq, 0.0, np.ones(4, np.float32), 0.0, 1.0))
        for seq in range(3 * 32)
    ]
    snapshot = scheduler.snapshot()["double@1"]  # no turn of the loop yet: nothing came back
    assert (snapshot.in_flight, snapshot.depth) == (2, 32)
    for prediction in await asyncio.gather(*done):
        np.testing.assert_array_equal(prediction.outputs[0], np.full(4, 2.0, np.float32))
    assert scheduler.snapshot()["double@1"].stats.batch_sizes == {32: 3}
    await scheduler.close()


class _Gate:
    """A runner whose next run, once armed, holds until the test opens the gate."""

    def __init__(self, runner: Any) -> None:
        self.runner, self.armed = runner, False
        self.open = threading.Event()

    @property
    def outputs(self) -> Any:
        return self.runner.outputs

    def run(self, feeds: dict[str, np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        if self.armed:
            self.armed = False
            self.open.wait(30)
        return list(self.runner.run(feeds))


async def test_a_batch_waiting_behind_the_running_one_counts_that_wait(tiny_models: Path) -> None:
    """The queue wait an item reports (and realtime_queue_wait_seconds counts) runs to its
    batch's start in the worker, so it takes in the wait behind the worker's running batch."""
    models = scan(tiny_models)
    double = next(m for m in models if m.name == "double")
    gate = _Gate(double.runner)
    double = dataclasses.replace(double, runner=gate)
    outcomes = Outcomes()
    scheduler = Scheduler([double], workers=1, clock=lambda: 0.0, deliver=outcomes.deliver)
    session = Session("s", ModelRepository([double]), ROOMY, "test")
    session.hello(Hello(1))
    session.open_stream(Open(1, "double", "tensor", "float32"))
    gate.armed = True
    done = [
        outcomes.submit(
            scheduler, WorkItem(session.streams[1], seq, 0.0, np.ones(4, np.float32), 0.0, 60.0)
        )
        for seq in range(2 * 32)
    ]
    handed = time.perf_counter()  # both batches are cut and handed over by now
    snapshot = scheduler.snapshot()["double@1"]
    assert (snapshot.in_flight, snapshot.depth) == (2, 0)  # one held, one waiting behind it
    held_ms = (time.perf_counter() - handed) * 1000.0
    gate.open.set()
    predictions = await asyncio.gather(*done)
    # The clock stands still, so all of the second batch's wait is the worker's.
    assert all(p.queue_ms >= held_ms for p in predictions[32:])
    stats = scheduler.snapshot()["double@1"].stats
    assert stats.queue_seconds * 1000.0 >= 32 * held_ms
    await scheduler.close()


async def test_a_live_streams_chunk_gone_stale_behind_a_newer_one_is_dropped(
    tiny_models: Path,
) -> None:
    """``stale``: with the worker held, a live stream's (``drop_oldest``) chunks queue up; once
    they waited that share of their deadline with a newer chunk behind them, they are dropped
    (``dropped``, counted) and the newest runs, instead of the backlog in order."""
    models = scan(tiny_models)
    double = next(m for m in models if m.name == "double")
    gate = _Gate(double.runner)
    double = dataclasses.replace(double, runner=gate)
    now = [0.0]
    outcomes = Outcomes()
    scheduler = Scheduler(
        [double], workers=1, clock=lambda: now[0], deliver=outcomes.deliver, stale=0.3
    )
    session = Session("s", ModelRepository([double]), ROOMY, "test")
    session.hello(Hello(1))
    session.open_stream(Open(1, "double", "tensor", "float32", overflow="drop_oldest"))
    stream = session.streams[1]

    def submit(seq: int) -> asyncio.Future[Prediction]:
        item = WorkItem(stream, seq, 0.0, np.ones(4, np.float32), now[0], now[0] + 0.1)
        return outcomes.submit(scheduler, item)

    gate.armed = True
    running = [submit(seq) for seq in range(64)]  # two batches: one held, one behind it
    waiting = [submit(seq) for seq in range(64, 68)]  # queued at 0 ms
    now[0] = 0.040
    newest = submit(68)  # queued at 40 ms: chunks 64-67 waited 40 ms of 100 behind it
    gate.open.set()
    await asyncio.gather(*running)
    for fut in waiting:
        with pytest.raises(errors.Dropped, match=r"dropped for a newer chunk: it waited 40\.0 ms"):
            await fut
    np.testing.assert_array_equal((await newest).outputs[0], np.full(4, 2.0, np.float32))
    assert scheduler.snapshot()["double@1"].stats.dropped == 4
    await scheduler.close()


async def test_a_busy_server_lets_batches_wait_longer_to_fill(tiny_models: Path) -> None:
    """Scheduler.pace: from PACE_FROM load up to full, a batch may wait up to ``stretch`` times
    its model's max_delay_ms; when the load falls again, a batch already past the shorter wait
    is cut at once, not when the longer wait's timer fires."""
    models = scan(tiny_models)
    double, accumulate = (m for name in ("double", "accumulate") for m in models if m.name == name)
    now = [0.0]
    outcomes = Outcomes()
    scheduler = Scheduler(
        [double], workers=1, clock=lambda: now[0], deliver=outcomes.deliver, stretch=10.0
    )
    queue = scheduler.queues["double@1"]
    delay = double.max_delay_ms / 1000.0
    for load, stretch in [(0.0, 1.0), (PACE_FROM, 1.0), (0.75, 5.5), (1.0, 10.0), (3.0, 10.0)]:
        scheduler.pace(load)
        assert queue.delay == pytest.approx(stretch * delay), load
    # A model version loaded while busy waits as long as the others.
    assert scheduler.add_model(accumulate).delay == pytest.approx(
        10.0 * accumulate.max_delay_ms / 1000.0
    )
    session = Session("s", ModelRepository(models), ROOMY, "test")
    session.hello(Hello(1))
    session.open_stream(Open(1, "double", "tensor", "float32"))
    item = WorkItem(session.streams[1], 0, 0.0, np.ones(4, np.float32), 0.0, 1.0)
    done = outcomes.submit(scheduler, item)
    now[0] = 2 * delay  # past the model's own wait, within the stretched one
    scheduler.pace(0.9)
    assert queue.depth == 1
    scheduler.pace(0.0)
    assert queue.depth == 0  # cut at once
    prediction = await done
    np.testing.assert_array_equal(prediction.outputs[0], np.full(4, 2.0, np.float32))
    await scheduler.close()
