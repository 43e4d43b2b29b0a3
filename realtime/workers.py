"""The threads that run model batches off the event loop.

A batch goes in through a :class:`queue.SimpleQueue` (in C) and its outcome comes back to the
event loop with ``call_soon_threadsafe``: nothing else per batch. ``ThreadPoolExecutor`` spends
more on each one, in Python and under the GIL the event loop needs: a ``Future`` with its
condition variable (taken three times), a work item, the idle semaphore (itself a condition
variable) at each submit, and the done callback's own call. No thread here touches an asyncio
object but through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

#: A job: the function, its argument, the loop to answer on and what to call there with the
#: argument and the function's result (or the exception it raised).
_Job = tuple[
    Callable[[Any], Any],
    Any,
    asyncio.AbstractEventLoop,
    Callable[[Any, Any], None],
]


class Workers:
    """``count`` daemon threads taking jobs in order. A thread stuck in a job (a model that
    hangs) cannot be killed; :meth:`shutdown` lets the others end, and a stuck one ends when
    its job does. Daemon threads, so that a stuck one never holds up the process's exit."""

    def __init__(self, count: int, name: str = "realtime-infer") -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{k}", daemon=True)
            for k in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def submit(
        self,
        fn: Callable[[Any], Any],
        arg: Any,
        loop: asyncio.AbstractEventLoop,
        done: Callable[[Any, Any], None],
    ) -> None:
        """Run ``fn(arg)`` in a worker thread, then ``done(arg, result)`` on ``loop`` (with the
        exception for the result if it raised; nothing if the loop is closed by then). Raises
        RuntimeError once shut down: no thread would take the job."""
        if self._closed:
            raise RuntimeError("the model workers are shut down")
        self._jobs.put((fn, arg, loop, done))

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is None:
                return
            fn, arg, loop, done = job
            try:
                result = fn(arg)
            except Exception as e:
                result = e
            with contextlib.suppress(RuntimeError):  # the loop may be closed by then
                loop.call_soon_threadsafe(done, arg, result)
            del job, fn, arg, result  # hold nothing of a batch while waiting for the next

    def shutdown(self, wait: bool = True) -> None:
        """No more jobs: each thread ends after the jobs already given (``wait``: join them)."""
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        if wait:
            for thread in self._threads:
                thread.join()
