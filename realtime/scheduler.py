"""Micro-batching: one queue per model version, batches run off the event loop.

:meth:`Scheduler.submit` takes an accepted :class:`WorkItem`; its :class:`Prediction` (or a
:class:`realtime.errors.ServingError`) is handed to the ``deliver`` callback on the event loop.
Each model version has a queue and a fixed number of batch slots (two per worker: the batch it
runs and the next); whenever a slot is free and its :class:`BatchQueue` says a batch is due
(full, waited ``max_delay_ms``, or its earliest deadline would slip), the batch is cut and run
in the worker pool. While the server is busy, batches wait longer to fill
(:meth:`Scheduler.pace`): a batch costs a fixed share of CPU whatever its size. Stateful
streams never have two chunks in one batch or in flight at once, and their recurrent state is
gathered into the batch and scattered back on the event loop, so no thread ever touches a
stream or an asyncio object.
"""

from __future__ import annotations

import asyncio
import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from mypy_extensions import mypyc_attr

from realtime import errors
from realtime.batching import BatchQueue, Entry, Policy, RunTimes
from realtime.models.spec import Model
from realtime.session import Outcome, Prediction, Stream, WorkItem
from realtime.workers import Workers

Clock = Callable[[], float]


#: Upper bounds (ms) of the queue-wait and run-time histogram buckets; the last is +inf.
LATENCY_BOUNDS_MS: tuple[float, ...] = (
    *(0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
    math.inf,
)


#: Load (share of the server's bottleneck, as admission control measures it) from which
#: batches wait longer than their ``max_delay_ms`` to fill, up to ``stretch`` times it at full
#: load (see :meth:`Scheduler.pace`).
PACE_FROM = 0.5


#: Batches of one model version in flight per worker thread: the one it runs, and the next,
#: waiting in its queue. A batch's end reaches the event loop as a callback, and only there is
#: the next batch cut: with one slot per worker, the worker idled for a turn of the loop after
#: each batch, and a busy loop's turns take milliseconds. On one core at ~445 speech_activity
#: sessions (0.9 of it busy), one slow turn (12 ms) let 7 batches run in 50 ms instead of 17, the
#: queue grew to 914 items, every turn then had more to do, and the server fell behind for a
#: second (docs/scheduler.md, "Threads").
BATCHES_PER_WORKER = 2


def new_histogram() -> list[int]:
    """Zero counts, one per :data:`LATENCY_BOUNDS_MS` bucket."""
    return [0] * len(LATENCY_BOUNDS_MS)


@mypyc_attr(serializable=True)
@dataclass(slots=True)
class QueueStats:
    """What one model queue has done, for metrics: counters only ever grow. Histograms count
    items (queue wait) or batches (run time) per :data:`LATENCY_BOUNDS_MS` bucket."""

    submitted: int = 0
    batches: int = 0
    items: int = 0
    deadline_misses: int = 0
    rejected: int = 0
    dropped: int = 0
    gone: int = 0
    failures: int = 0
    queue_seconds: float = 0.0
    infer_seconds: float = 0.0
    #: CPU seconds the worker threads spent running batches (``infer_seconds`` is wall time).
    infer_cpu_seconds: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    queue_ms: list[int] = field(default_factory=new_histogram)
    infer_ms: list[int] = field(default_factory=new_histogram)


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    """One model queue at one instant: its gauges and a copy of its counters."""

    depth: int
    in_flight: int
    stats: QueueStats
    #: Batches that ran past the time limit and still hold a worker thread.
    stuck: int
    #: Measured run time (seconds) per batch size, as the deadline policy uses it.
    run_times: dict[int, float]


class _Slot:
    """Preallocated batch buffers for one batch in flight."""

    def __init__(self, model: Model) -> None:
        n = model.max_batch
        item_shape = [d for d in model.item_shape]
        self.inputs: np.ndarray[Any, Any] | None = (
            np.empty([n, *item_shape], model.input.dtype)
            if all(d is not None for d in item_shape)
            else None
        )
        #: Rows of the batch input per item along its first axis: the items are concatenated
        #: into it, which skips the view per item that ``np.stack`` makes (0: a scalar item).
        first = item_shape[0] if item_shape else None
        self.rows: int = first if first is not None else 0
        self.states = [
            np.empty(
                [n if i == s.batch_axis else d for i, d in enumerate(s.initial.shape)],
                s.initial.dtype,
            )
            for s in model.states
        ]


#: Where each item's outcome goes, on the event loop: exactly once per submitted item, unless
#: its stream is gone by the time its batch is cut (then nobody is waiting for it).
Deliver = Callable[[WorkItem, Outcome], None]


@mypyc_attr(serializable=True)
@dataclass(slots=True, eq=False)
class _Running:
    """A batch handed to a worker thread, until it comes back or runs out of time."""

    model: Model
    batch: list[Entry]
    slot: _Slot
    started: float  # cut, on the queue's clock
    feeds: dict[str, np.ndarray[Any, Any]] | None = None
    #: Handed to the worker threads (``time.perf_counter``): the batch may wait there behind
    #: the worker's running one (BATCHES_PER_WORKER), and that wait is the items' too.
    handed: float = 0.0
    timer: asyncio.TimerHandle | None = None
    timed_out: bool = False


class ModelQueue:
    """The queue and batch slots of one model version, driven by its :class:`BatchQueue`."""

    def __init__(
        self,
        model: Model,
        pool: Workers,
        slots: int,
        max_queue: int,
        clock: Clock,
        deliver: Deliver,
        run_timeout: float = 10.0,
        on_stuck: Callable[[], None] | None = None,
        stale: float = 0.0,
    ) -> None:
        self.model = model
        self.stats = QueueStats()
        self.run_times = RunTimes(model.max_batch)
        self._queue: BatchQueue = BatchQueue(
            Policy(model.max_batch, model.max_delay_ms / 1000.0),
            self.run_times,
            stateful=bool(model.states),
        )
        self._queue.stale = stale
        self._pool = pool
        self._clock = clock
        self._deliver = deliver
        self._run_timeout = run_timeout
        self._on_stuck = on_stuck
        #: Batches past ``run_timeout`` whose worker thread has not come back yet.
        self.stuck = 0
        self._max_queue = max_queue
        self._slots = slots
        self._free = [_Slot(model) for _ in range(slots)]
        self._busy: set[Stream] = set()  # stateful streams with an item in flight
        self._running: set[_Running] = set()
        self._idle: list[asyncio.Future[None]] = []  # drain() waiters
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        outputs = [o.name for o in model.runner.outputs]
        self._result_at = [outputs.index(o.name) for o in model.outputs]
        self._state_at = [outputs.index(s.output) for s in model.states]

    @property
    def depth(self) -> int:
        """Items waiting for a batch."""
        return len(self._queue)

    def snapshot(self) -> QueueSnapshot:
        """The queue's gauges and counters now."""
        s = self.stats
        copy = replace(
            s,
            batch_sizes=dict(s.batch_sizes),
            queue_ms=list(s.queue_ms),
            infer_ms=list(s.infer_ms),
        )
        return QueueSnapshot(
            len(self._queue),
            self._slots - len(self._free),
            copy,
            self.stuck,
            self.run_times.as_dict(),
        )

    def warm_up(self) -> None:
        """Run the model once at each batch size the scheduler will use (powers of two up to
        ``max_batch``, and ``max_batch``), so that no client pays for ONNX Runtime's first-run
        allocations, and the deadline policy starts from measured run times. Blocking: call it
        before serving, or in a thread."""
        model = self.model
        if any(d is None for d in model.item_shape):
            return  # dynamic input shape: nothing to warm with
        sizes = sorted({*(2**k for k in range(model.max_batch.bit_length())), model.max_batch})
        for n in sizes:
            feeds: dict[str, np.ndarray[Any, Any]] = dict(model.constants)
            feeds[model.input.name] = np.zeros([n, *model.item_shape], model.input.dtype)
            for spec in model.states:
                feeds[spec.input] = np.concatenate([spec.initial] * n, axis=spec.batch_axis)
            _timed_run(model, feeds)  # the first run of a size pays the set-up
            _, seconds, _ = _timed_run(model, feeds)
            self.run_times.observe(n, seconds)

    def submit(self, item: WorkItem) -> None:
        """Queue an item; its outcome is delivered on the event loop. Refused (``overloaded``)
        when the queue is full, or so long that the item would wait past its deadline: shedding
        at the door is cheap, and keeps the queue to what can still be served in time."""
        depth = len(self._queue)
        if depth >= self._max_queue:
            self.stats.rejected += 1
            raise errors.Overloaded(
                f"{self.model.key} has {depth} chunks queued",
                stream=item.stream.id,
                seq=item.seq,
                reason="queue",
            )
        full = self.model.max_batch
        if depth >= full:
            batch_time = self.run_times.estimate(full)
            # Counted as if batches ran one at a time: the slots share the cores with the
            # event loop, and a late answer is worth less than an early "no".
            wait = (depth // full + 1) * batch_time
            if self._clock() + wait > item.deadline:
                self.stats.rejected += 1
                raise errors.Overloaded(
                    f"{self.model.key} has {depth} chunks queued, about {1000 * wait:.0f} ms of "
                    "work: this one would miss its deadline",
                    stream=item.stream.id,
                    seq=item.seq,
                    reason="queue",
                )
        self._queue.push(Entry(item, False, self._clock()))
        self.stats.submitted += 1
        if self._free:
            self._dispatch()

    def drop_oldest(self, stream: Stream) -> list[WorkItem]:
        """Take the stream's oldest queued chunk (each of its windows) out of the queue; the
        caller gives the items their ``dropped`` outcome."""
        dropped = self._queue.drop_oldest(stream)
        self.stats.dropped += len(dropped)
        return [entry.item for entry in dropped]

    @property
    def delay(self) -> float:
        """Seconds the oldest item may wait for a fuller batch now."""
        return self._queue.delay

    def lateness(self) -> tuple[int, int]:
        """Items taken for batches since the last call, and those taken or shed late
        (``BatchQueue.late``); both start again from 0."""
        queue = self._queue
        counts = queue.served, queue.late
        queue.served = queue.late = 0
        return counts

    def pace(self, stretch: float) -> None:
        """Let the oldest item wait ``stretch`` times the model's ``max_delay_ms`` for a
        fuller batch (1: the model's own delay)."""
        queue = self._queue
        delay = self.model.max_delay_ms / 1000.0 * stretch
        shorter = delay < queue.delay
        queue.delay = delay
        if shorter and self._free:  # the timer set for the longer wait would cut late
            self._dispatch()

    def _dispatch(self) -> None:
        """Start batches while a slot is free and one is due; else wake up when one will be."""
        queue = self._queue
        while self._free and len(queue):
            now = self._clock()
            due = queue.due()
            if due > now:
                self._wake_at(due, now)
                return
            cut = queue.cut(now, self._busy)
            for entry in cut.stale:
                self.stats.dropped += 1
                item = entry.item
                self._fail(
                    item,
                    errors.Dropped,
                    f"dropped for a newer chunk: it waited {1000 * (now - item.received):.1f} ms "
                    "and the server is behind",
                )
            for entry in cut.expired:
                self.stats.deadline_misses += 1
                item = entry.item
                self._fail(
                    entry.item,
                    errors.DeadlineExceeded,
                    f"waited {1000 * (now - item.received):.1f} ms, deadline was "
                    f"{1000 * (item.deadline - item.received):.1f} ms",
                )
            self.stats.gone += len(cut.gone)
            if not cut.batch:
                if cut.expired or cut.gone or cut.stale:
                    continue
                return  # only stateful streams with an item in flight wait: their end wakes us
            if queue.stateful:
                self._busy.update(e.item.stream for e in cut.batch)
            self._start(cut.batch, self._free.pop(), now)

    def _wake_at(self, due: float, now: float) -> None:
        if self._timer is not None:
            if self._timer_at <= due:
                return
            self._timer.cancel()
        self._timer_at = due
        self._timer = asyncio.get_running_loop().call_later(due - now, self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, math.inf
        self._dispatch()

    def _start(self, batch: list[Entry], slot: _Slot, started: float) -> None:
        """Gather a batch into its slot's buffers and hand it to a worker thread. The outcome
        comes back through ``call_soon_threadsafe``: no task, future or lock per batch."""
        model = self.model
        n = len(batch)
        running = _Running(model, batch, slot, started)
        self._running.add(running)
        try:
            feeds: dict[str, np.ndarray[Any, Any]] = dict(model.constants)
            if slot.inputs is not None:
                batched = slot.inputs[:n]
                if slot.rows:
                    flat = batched.reshape(n * slot.rows, *batched.shape[2:])
                    np.concatenate([e.item.inputs for e in batch], out=flat)
                else:
                    np.stack([e.item.inputs for e in batch], out=batched)
                feeds[model.input.name] = batched
            else:
                feeds[model.input.name] = np.stack([e.item.inputs for e in batch])
            for k, spec in enumerate(model.states):
                buf = slot.states[k]
                view = buf[(slice(None),) * spec.batch_axis + (slice(0, n),)]
                np.concatenate(
                    [e.item.stream.state[k] for e in batch], axis=spec.batch_axis, out=view
                )
                feeds[spec.input] = view
            running.feeds = feeds
            loop = asyncio.get_running_loop()
            # Its answer comes back through the loop, so after the timer below is set.
            running.handed = time.perf_counter()
            self._pool.submit(_run_batch, running, loop, self._came_back)
        except Exception as e:  # inputs that cannot be stacked, or the workers shut down
            self._finish(running, e)
            return
        running.timer = loop.call_later(self._run_timeout, self._timed_out, running)

    def _came_back(self, running: _Running, result: Any) -> None:
        # The timer refers back to ``running``: let go of it, so that refcounting frees the
        # batch and its items now, not the garbage collector later (a cycle per batch kept
        # every item of it for the collector).
        timer = running.timer
        running.timer = None
        if running.timed_out:  # failed already; its worker thread is free again
            self.stuck -= 1
            return
        assert timer is not None
        timer.cancel()
        if isinstance(result, Exception):
            self._finish(running, result)
        else:
            outputs, seconds, cpu_seconds, waited = result
            self._finish(running, None, outputs, seconds, cpu_seconds, waited)

    def _timed_out(self, running: _Running) -> None:
        """A worker that hangs: give up on it, and on the buffers it reads."""
        running.timed_out = True
        self.stuck += 1
        running.slot = _Slot(self.model)
        if self._on_stuck is not None:
            self._on_stuck()
        self._finish(
            running, TimeoutError(f"no answer in {self._run_timeout:g} s; its worker is stuck")
        )

    def _finish(
        self,
        running: _Running,
        failure: BaseException | None,
        outputs: list[np.ndarray[Any, Any]] | None = None,
        infer_seconds: float = 0.0,
        cpu_seconds: float = 0.0,
        waited: float = 0.0,
    ) -> None:
        model, batch, deliver = self.model, running.batch, self._deliver
        n = len(batch)
        self._running.discard(running)
        try:
            if failure is None:
                assert outputs is not None
                results = [outputs[i] for i in self._result_at]
                new_states = [outputs[i] for i in self._state_at]
                try:
                    assert running.feeds is not None
                    _check_batch(model, n, results, new_states, running.feeds)
                except ValueError as e:
                    failure = e
            if failure is not None:  # the model raised, hung or misbehaved: the batch fails
                self.stats.failures += 1
                why = f"{model.key} failed: {str(failure)[:300]}"
                for entry in batch:
                    self._fail(entry.item, errors.InferenceFailed, why)
                return
            self.run_times.observe(n, infer_seconds)
            stats = self.stats
            stats.batches += 1
            stats.items += n
            stats.infer_seconds += infer_seconds
            stats.infer_cpu_seconds += cpu_seconds
            stats.batch_sizes[n] = stats.batch_sizes.get(n, 0) + 1
            infer_ms = infer_seconds * 1000.0
            stats.infer_ms[bisect_left(LATENCY_BOUNDS_MS, infer_ms)] += 1
            started = running.started + waited  # its run's start, on the queue's clock
            queue_hist = stats.queue_ms
            states = model.states
            queue_sum = 0.0
            for i, entry in enumerate(batch):
                it = entry.item
                if states:
                    for k, spec in enumerate(states):
                        index = (slice(None),) * spec.batch_axis + (slice(i, i + 1),)
                        it.stream.state[k][...] = new_states[k][index]  # 0.61 µs; np.copyto 0.84
                queue_ms = (started - it.received) * 1000.0
                queue_sum += queue_ms
                queue_hist[bisect_left(LATENCY_BOUNDS_MS, queue_ms)] += 1
                deliver(it, Prediction([r[i] for r in results], queue_ms, infer_ms, n))
            stats.queue_seconds += queue_sum / 1000.0
        finally:
            if model.states:
                self._busy.difference_update(e.item.stream for e in batch)
            self._free.append(running.slot)
            if not self._running:
                for waiter in self._idle:
                    if not waiter.done():
                        waiter.set_result(None)
                self._idle.clear()
            self._dispatch()

    def _fail(self, item: WorkItem, exc_type: type[errors.ServingError], why: str) -> None:
        self._deliver(item, exc_type(why, stream=item.stream.id, seq=item.seq))

    def fail_all(self, exc_type: type[errors.ServingError], why: str) -> None:
        """Resolve every queued item with an error (shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, math.inf
        for entry in self._queue.clear():
            if entry.item.stream.live:
                self._fail(entry.item, exc_type, why)

    async def drain(self) -> None:
        """Wait for the batches in flight."""
        while self._running:
            waiter = asyncio.get_running_loop().create_future()
            self._idle.append(waiter)
            await waiter


def _check_batch(
    model: Model,
    n: int,
    results: list[np.ndarray[Any, Any]],
    new_states: list[np.ndarray[Any, Any]],
    feeds: dict[str, np.ndarray[Any, Any]],
) -> None:
    """Refuse a batch's outputs before any is used if one has the wrong batch size, or a new
    state a shape other than the state that went in (no stream's state is then touched)."""
    for output, result in zip(model.outputs, results, strict=True):
        if result.ndim == 0 or result.shape[0] != n:
            raise ValueError(f"output {output.name} is shaped {list(result.shape)} for {n} inputs")
    for spec, state in zip(model.states, new_states, strict=True):
        if state.shape != feeds[spec.input].shape:
            raise ValueError(
                f"state {spec.output} came back shaped {list(state.shape)}, "
                f"went in shaped {list(feeds[spec.input].shape)}"
            )


def _run_batch(
    running: _Running,
) -> tuple[list[np.ndarray[Any, Any]], float, float, float]:
    """A batch's run, in a worker thread (it reads the batch's model, feeds and hand-over
    time, nothing else): the outputs, the seconds it took and its CPU seconds, and the seconds
    it waited for the worker since it was handed over."""
    assert running.feeds is not None
    waited = time.perf_counter() - running.handed
    return (*_timed_run(running.model, running.feeds), waited)


def _timed_run(
    model: Model, feeds: dict[str, np.ndarray[Any, Any]]
) -> tuple[list[np.ndarray[Any, Any]], float, float]:
    """Run one batch in a worker thread; returns the outputs, the seconds it took and the CPU
    seconds the thread spent on it."""
    t0, c0 = time.perf_counter(), time.thread_time()
    outputs = model.runner.run(feeds)
    return outputs, time.perf_counter() - t0, time.thread_time() - c0


class Scheduler:
    """Every model version's queue, sharing one worker pool."""

    def __init__(
        self,
        models: Iterable[Model],
        workers: int = 2,
        max_queue: int = 4096,
        clock: Clock = time.monotonic,
        run_timeout: float = 10.0,
        *,
        deliver: Deliver,
        stretch: float = 1.0,
        stale: float = 0.0,
    ) -> None:
        self._workers, self._max_queue, self._clock = workers, max_queue, clock
        #: Share of its deadline a live stream's chunk may wait behind a newer one
        #: (``BatchQueue.stale``; 0: it waits its turn).
        self._stale = stale
        self._stretch = stretch
        self._stretch_now = 1.0
        self._deliver = deliver
        self._run_timeout = run_timeout
        self._pool = self._new_pool()
        self.queues: dict[str, ModelQueue] = {}
        for m in models:
            self.add_model(m)

    def _new_pool(self) -> Workers:
        return Workers(self._workers)

    def add_model(self, model: Model) -> ModelQueue:
        """A queue for a model version loaded while serving (warm it before taking traffic).
        A version taken out of the catalog keeps its queue: its open streams still use it."""
        queue = ModelQueue(
            model,
            self._pool,
            BATCHES_PER_WORKER * self._workers,
            self._max_queue,
            self._clock,
            self._deliver,
            self._run_timeout,
            self._replace_pool,
            self._stale,
        )
        self.queues[model.key] = queue
        queue.pace(self._stretch_now)
        return queue

    def pace(self, load: float) -> None:
        """Follow the server's load (its bottleneck's busy share, measured a few times a
        second): from :data:`PACE_FROM` up to full load, each model's batches wait up to
        ``stretch`` times its ``max_delay_ms`` to fill (in proportion), and no longer than that
        at low load.

        A batch costs a fixed share of CPU whatever its size: the worker's run set-up (silero
        VAD: ~0.2 ms) and the event loop's turns and thread hops around it (~0.35 ms). While
        the server has room, small batches cut early buy low latency with that CPU. Once it is
        busy, the same CPU serves more sessions: one core carrying 375 silero streams ran
        ~320 batches a second of ~37 at 2 ms, 0.90 of the core busy; paced, ~185 batches of
        63, 0.83 busy, for ~2 ms more latency. The deadline still bounds every wait."""
        share = min(max((load - PACE_FROM) / (1.0 - PACE_FROM), 0.0), 1.0)
        self._stretch_now = 1.0 + (self._stretch - 1.0) * share
        for q in self.queues.values():
            q.pace(self._stretch_now)

    def lateness(self) -> tuple[int, int]:
        """Items taken for batches since the last call, and those taken or shed late
        (``BatchQueue.late``)."""
        served = late = 0
        for q in self.queues.values():
            s, n = q.lateness()
            served, late = served + s, late + n
        return served, late

    def _replace_pool(self) -> None:
        """A worker is stuck in a model run: new batches go to a new pool of full size; the old
        pool's threads end once they come back (a thread cannot be killed)."""
        self._pool.shutdown(wait=False)
        self._pool = self._new_pool()
        for q in self.queues.values():
            q._pool = self._pool

    @property
    def stuck(self) -> int:
        """Model runs past the time limit still holding a worker thread (the server is not
        healthy while there are any: /healthz says so)."""
        return sum(q.stuck for q in self.queues.values())

    def submit(self, item: WorkItem) -> None:
        """Queue an accepted item for its model version (refused typed: ``overloaded``)."""
        self.queues[item.stream.model.key].submit(item)

    def drop_oldest(self, stream: Stream) -> list[WorkItem]:
        """Make room on a live-media stream: take its oldest queued chunk's items out."""
        return self.queues[stream.model.key].drop_oldest(stream)

    def warm_up(self) -> None:
        """Warm every model at every batch size (blocking; see :meth:`ModelQueue.warm_up`)."""
        for q in self.queues.values():
            q.warm_up()

    def snapshot(self) -> dict[str, QueueSnapshot]:
        """Every model queue's gauges and counters, by model key (what metrics export)."""
        return {key: q.snapshot() for key, q in self.queues.items()}

    async def close(self) -> None:
        """Fail what is queued, finish what is running, stop the workers."""
        for q in self.queues.values():
            q.fail_all(errors.ShuttingDown, "the server is shutting down")
        for q in self.queues.values():
            await q.drain()
        self._pool.shutdown(wait=not self.stuck)
