"""Micro-batching: one queue per model version, batches run off the event loop.

:meth:`Scheduler.submit` takes an accepted :class:`WorkItem` and returns a future of its
:class:`Prediction` (or a :class:`realtime.errors.ServingError`). Each model version has a queue
and a fixed number of batch slots; whenever a slot is free and items wait, a batch is cut from
the queue and run in the worker pool. Stateful streams never have two chunks in one batch or in
flight at once, and their recurrent state is gathered into the batch and scattered back on the
event loop, so no thread ever touches a stream or an asyncio object.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from realtime import errors
from realtime.models.repository import Model
from realtime.session import Prediction, Stream, WorkItem

Clock = Callable[[], float]


@dataclass(slots=True)
class QueueStats:
    """What one model queue has done, for metrics: counters only ever grow."""

    submitted: int = 0
    batches: int = 0
    items: int = 0
    deadline_misses: int = 0
    rejected: int = 0
    failures: int = 0
    queue_seconds: float = 0.0
    infer_seconds: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)


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
        self.states = [
            np.empty(
                [n if i == s.batch_axis else d for i, d in enumerate(s.initial.shape)],
                s.initial.dtype,
            )
            for s in model.states
        ]


class ModelQueue:
    """The queue and batch slots of one model version."""

    def __init__(
        self,
        model: Model,
        pool: ThreadPoolExecutor,
        slots: int,
        max_queue: int,
        clock: Clock,
    ) -> None:
        self.model = model
        self.stats = QueueStats()
        self._pool = pool
        self._clock = clock
        self._max_queue = max_queue
        self._items: deque[tuple[WorkItem, asyncio.Future[Prediction]]] = deque()
        self._free = [_Slot(model) for _ in range(slots)]
        self._busy: set[Stream] = set()  # stateful streams with an item in flight
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def depth(self) -> int:
        """Items waiting for a batch."""
        return len(self._items)

    def submit(self, item: WorkItem) -> asyncio.Future[Prediction]:
        """Queue an item; its future resolves on the event loop."""
        if len(self._items) >= self._max_queue:
            self.stats.rejected += 1
            raise errors.Overloaded(
                f"{self.model.key} has {len(self._items)} chunks queued",
                stream=item.stream.id,
                seq=item.seq,
            )
        fut: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
        self._items.append((item, fut))
        self.stats.submitted += 1
        self._dispatch()
        return fut

    def _dispatch(self) -> None:
        """Start batches while a slot is free and something is runnable."""
        while self._free and self._items:
            batch = self._cut()
            if not batch:
                return
            slot = self._free.pop()
            task = asyncio.get_running_loop().create_task(self._run(batch, slot))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _cut(self) -> list[tuple[WorkItem, asyncio.Future[Prediction]]]:
        """Take up to ``max_batch`` runnable items in queue order, shedding expired ones."""
        now = self._clock()
        stateful = bool(self.model.states)
        batch: list[tuple[WorkItem, asyncio.Future[Prediction]]] = []
        skipped: list[tuple[WorkItem, asyncio.Future[Prediction]]] = []
        taken: set[Stream] = set()
        items = self._items
        while items and len(batch) < self.model.max_batch:
            entry = items.popleft()
            item, fut = entry
            stream = item.stream
            if not stream.live or fut.done():
                if not fut.done():
                    fut.cancel()
                continue
            if stateful and (stream in self._busy or stream in taken):
                skipped.append(entry)
                continue
            if now > item.deadline:
                self.stats.deadline_misses += 1
                fut.set_exception(
                    errors.DeadlineExceeded(
                        f"waited {1000 * (now - item.received):.1f} ms, deadline was "
                        f"{1000 * (item.deadline - item.received):.1f} ms",
                        stream=stream.id,
                        seq=item.seq,
                    )
                )
                continue
            taken.add(stream)
            batch.append(entry)
        items.extendleft(reversed(skipped))
        if stateful:
            self._busy |= taken
        return batch

    async def _run(
        self, batch: list[tuple[WorkItem, asyncio.Future[Prediction]]], slot: _Slot
    ) -> None:
        model = self.model
        n = len(batch)
        started = self._clock()
        try:
            feeds: dict[str, np.ndarray[Any, Any]] = dict(model.constants)
            if slot.inputs is not None:
                np.stack([it.inputs for it, _ in batch], out=slot.inputs[:n])
                feeds[model.input.name] = slot.inputs[:n]
            else:
                feeds[model.input.name] = np.stack([it.inputs for it, _ in batch])
            for k, spec in enumerate(model.states):
                buf = slot.states[k]
                view = buf[(slice(None),) * spec.batch_axis + (slice(0, n),)]
                np.concatenate(
                    [it.stream.state[k] for it, _ in batch], axis=spec.batch_axis, out=view
                )
                feeds[spec.input] = view
            loop = asyncio.get_running_loop()
            outputs, infer_seconds = await loop.run_in_executor(
                self._pool, _timed_run, model, feeds
            )
        except Exception as e:  # the model raised: every item of the batch gets the error
            self.stats.failures += 1
            for it, fut in batch:
                if not fut.done():
                    fut.set_exception(
                        errors.InferenceFailed(
                            f"{model.key} failed: {str(e)[:300]}", stream=it.stream.id, seq=it.seq
                        )
                    )
        else:
            by_name = dict(zip((o.name for o in model.runner.outputs), outputs, strict=True))
            results = [by_name[o.name] for o in model.outputs]
            new_states = [by_name[s.output] for s in model.states]
            stats = self.stats
            stats.batches += 1
            stats.items += n
            stats.infer_seconds += infer_seconds
            stats.batch_sizes[n] = stats.batch_sizes.get(n, 0) + 1
            infer_ms = infer_seconds * 1000.0
            for i, (it, fut) in enumerate(batch):
                for k, spec in enumerate(model.states):
                    index = (slice(None),) * spec.batch_axis + (slice(i, i + 1),)
                    np.copyto(it.stream.state[k], new_states[k][index])
                queue_s = started - it.received
                stats.queue_seconds += queue_s
                if not fut.done():
                    fut.set_result(
                        Prediction([r[i] for r in results], queue_s * 1000.0, infer_ms, n)
                    )
        finally:
            if model.states:
                self._busy.difference_update(it.stream for it, _ in batch)
            self._free.append(slot)
            self._dispatch()

    def fail_all(self, exc_type: type[errors.ServingError], why: str) -> None:
        """Resolve every queued item with an error (shutdown)."""
        while self._items:
            item, fut = self._items.popleft()
            if not fut.done():
                fut.set_exception(exc_type(why, stream=item.stream.id, seq=item.seq))

    async def drain(self) -> None:
        """Wait for the batches in flight."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _timed_run(
    model: Model, feeds: dict[str, np.ndarray[Any, Any]]
) -> tuple[list[np.ndarray[Any, Any]], float]:
    """Run one batch in a worker thread; returns the outputs and the seconds it took."""
    t0 = time.perf_counter()
    outputs = model.runner.run(feeds)
    return outputs, time.perf_counter() - t0


class Scheduler:
    """Every model version's queue, sharing one worker pool."""

    def __init__(
        self,
        models: Iterable[Model],
        workers: int = 2,
        max_queue: int = 4096,
        clock: Clock = time.monotonic,
    ) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="realtime-infer")
        self.queues = {m.key: ModelQueue(m, self._pool, workers, max_queue, clock) for m in models}

    def submit(self, item: WorkItem) -> asyncio.Future[Prediction]:
        """Queue an accepted item for its model version."""
        return self.queues[item.stream.model.key].submit(item)

    async def close(self) -> None:
        """Fail what is queued, finish what is running, stop the workers."""
        for q in self.queues.values():
            q.fail_all(errors.ShuttingDown, "the server is shutting down")
        for q in self.queues.values():
            await q.drain()
        self._pool.shutdown(wait=True)
