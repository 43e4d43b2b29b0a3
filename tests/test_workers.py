"""The model worker threads (realtime/workers.py): jobs in, results back on the event loop."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from realtime.workers import Workers


async def _results(workers: Workers, jobs: list[tuple[Any, Any]]) -> list[tuple[Any, Any, int]]:
    """Run ``(fn, arg)`` jobs; what came back: (arg, result, the thread it came back on)."""
    loop = asyncio.get_running_loop()
    back: list[tuple[Any, Any, int]] = []
    finished = loop.create_future()

    def done(arg: Any, result: Any) -> None:
        back.append((arg, result, threading.get_ident()))
        if len(back) == len(jobs):
            finished.set_result(None)

    for fn, arg in jobs:
        workers.submit(fn, arg, loop, done)
    await asyncio.wait_for(finished, 10)
    return back


async def test_results_and_exceptions_come_back_on_the_event_loop_with_their_argument() -> None:
    workers = Workers(1)
    ran_on: list[int] = []

    def square(x: int) -> int:
        ran_on.append(threading.get_ident())
        return x * x

    def fail(x: int) -> int:
        raise ValueError(f"no {x}")

    back = await _results(workers, [(square, 3), (fail, 4), (square, 5)])
    workers.shutdown()
    assert [(arg, result) for arg, result, _ in back[::2]] == [(3, 9), (5, 25)]  # in order
    arg, error, _ = back[1]
    assert arg == 4 and isinstance(error, ValueError) and str(error) == "no 4"
    loop_thread = threading.get_ident()
    assert {thread for *_, thread in back} == {loop_thread}
    assert ran_on and loop_thread not in ran_on


async def test_jobs_run_side_by_side_on_as_many_threads() -> None:
    workers = Workers(2)
    both = threading.Barrier(2, timeout=5)  # only two threads at once get past it

    def meet(x: int) -> int:
        both.wait()
        return x

    back = await _results(workers, [(meet, 1), (meet, 2)])
    workers.shutdown()
    assert sorted(result for _, result, _ in back) == [1, 2]
    with pytest.raises(RuntimeError):  # shut down: no thread would take it
        workers.submit(meet, 3, asyncio.get_running_loop(), lambda *_: None)


def test_a_job_that_ends_after_its_loop_closed_is_dropped_quietly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raised: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_value))
    workers = Workers(1, name="closed-loop")
    release = threading.Event()
    loop = asyncio.new_event_loop()
    workers.submit(lambda _: release.wait(5), None, loop, lambda *_: None)
    loop.close()  # the server is gone before the model answered
    release.set()
    workers.shutdown(wait=True)  # the thread came back, let go of the job and ended
    assert raised == []
    assert not any(t.name.startswith("closed-loop") for t in threading.enumerate())
