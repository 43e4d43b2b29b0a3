"""The batching policy on a fake clock: when batches are cut, what they hold, what is shed."""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np
import pytest

from realtime.batching import BEHIND_SHARE, BatchQueue, Cut, Entry, Policy, RunTimes
from realtime.session import Stream, WorkItem


def stream(session: str = "a", sid: int = 1, overflow: str = "reject") -> Stream:
    """A stream as the queue sees it: only its session, id, liveness and overflow matter."""
    return Stream(
        session=session,
        id=sid,
        model=cast(Any, None),
        dtype=np.dtype("float32"),
        deadline_ms=100.0,
        results="json",
        options={},
        overflow=cast(Any, overflow),
        state=[],
        rechunker=None,
    )


class Queue:
    """A BatchQueue with a fake clock and helpers to push items and cut at a given time."""

    def __init__(
        self,
        max_batch: int = 4,
        max_delay: float = 0.005,
        stateful: bool = False,
        run_times: RunTimes | None = None,
    ) -> None:
        self.run_times = run_times or RunTimes(max_batch, prior=0.001)
        self.q: BatchQueue = BatchQueue(
            Policy(max_batch, max_delay, margin=0.001), self.run_times, stateful
        )
        self.now = 0.0
        self.n = 0

    def push(
        self, s: Stream, seq: int = 0, deadline: float = 1.0, shape: tuple[int, ...] = (3,)
    ) -> Entry:
        # The item's t is the order it was pushed in: what the tests check batches by.
        t = float(self.n)
        item = WorkItem(s, seq, t, np.zeros(shape, np.float32), self.now, self.now + deadline)
        entry = Entry(item)
        self.n += 1
        self.q.push(entry)
        return entry

    def cut(self, busy: set[Stream] | None = None) -> Cut:
        return self.q.cut(self.now, busy or set())


def tokens(entries: list[Entry]) -> list[int]:
    return [int(e.item.t) for e in entries]


def test_an_empty_queue_is_never_due() -> None:
    queue = Queue()
    assert queue.q.due() == math.inf
    assert queue.cut().batch == []


def test_a_full_batch_is_due_at_once() -> None:
    queue = Queue(max_batch=4, max_delay=0.050)
    s = stream()
    for seq in range(3):
        queue.push(s, seq)
    assert queue.q.due() > queue.now  # 3 of 4: worth waiting
    queue.push(s, 3)
    assert queue.q.due() <= queue.now
    queue.push(s, 4)
    cut = queue.cut()
    assert tokens(cut.batch) == [0, 1, 2, 3]
    assert len(queue.q) == 1


def test_a_partial_batch_is_due_after_max_delay() -> None:
    queue = Queue(max_batch=8, max_delay=0.005)
    queue.push(stream(), deadline=1.0)
    queue.now = 0.002
    queue.push(stream("b"), deadline=1.0)
    assert queue.q.due() == pytest.approx(0.005)  # the oldest item's wait decides
    queue.now = 0.005
    assert tokens(queue.cut().batch) == [0, 1]


def test_a_batch_is_due_when_waiting_longer_would_miss_the_earliest_deadline() -> None:
    run_times = RunTimes(8)
    run_times.observe(2, 0.004)
    queue = Queue(max_batch=8, max_delay=0.050, run_times=run_times)
    queue.push(stream(), deadline=0.100)
    queue.push(stream("b"), deadline=0.020)
    # 20 ms deadline - 4 ms to run two - 1 ms margin, long before the 50 ms max delay
    assert queue.q.due() == pytest.approx(0.015)


def test_run_times_follow_the_measurements() -> None:
    run_times = RunTimes(8, prior=0.003, weight=0.5)
    assert run_times.estimate(4) == 0.003
    run_times.observe(2, 0.002)
    assert run_times.estimate(2) == 0.002
    assert run_times.estimate(1) == 0.002  # a larger measured batch bounds a smaller one
    assert run_times.estimate(4) == pytest.approx(0.004)  # scaled up from the largest smaller
    run_times.observe(2, 0.004)
    assert run_times.estimate(2) == pytest.approx(0.003)
    assert run_times.as_dict() == {2: pytest.approx(0.003)}


def test_the_best_time_per_item_is_the_least_over_the_measured_sizes() -> None:
    run_times = RunTimes(64)
    assert run_times.best_per_item() is None
    run_times.observe(1, 0.000270)  # silero VAD: a fixed cost per run, then ~100 us an item
    assert run_times.best_per_item() == pytest.approx(0.000270)
    run_times.observe(16, 0.0016)
    run_times.observe(64, 0.0064)
    run_times.observe(4, 0.000430)
    assert run_times.best_per_item() == pytest.approx(0.0001)


def test_items_of_different_shapes_never_share_a_batch() -> None:
    queue = Queue(max_batch=4, max_delay=0.0)
    s = stream()
    queue.push(s, 0, shape=(3,))
    queue.push(s, 1, shape=(5,))
    queue.push(s, 2, shape=(3,))
    queue.push(s, 3, shape=(5,))
    first = queue.cut()
    second = queue.cut()
    assert {tuple(tokens(first.batch)), tuple(tokens(second.batch))} == {(0, 2), (1, 3)}
    assert len(queue.q) == 0 and queue.q.due() == math.inf


def test_sessions_are_served_round_robin() -> None:
    queue = Queue(max_batch=4, max_delay=0.0)
    flood = stream("flood")
    for seq in range(20):
        queue.push(flood, seq)  # tokens 0..19
    queue.push(stream("b"), 0)  # token 20
    queue.push(stream("c"), 0)  # token 21
    assert tokens(queue.cut().batch) == [0, 20, 21, 1]  # everyone in the first batch
    queue.push(stream("b"), 1)  # token 22
    # b is back in line behind the flooder: one turn each, then the flooder fills the batch
    assert tokens(queue.cut().batch) == [2, 22, 3, 4]


def test_deadline_passed_items_are_shed_not_run() -> None:
    queue = Queue(max_batch=4, max_delay=0.0)
    s = stream()
    queue.push(s, 0, deadline=0.010)
    queue.push(s, 1, deadline=0.100)
    queue.now = 0.020
    cut = queue.cut()
    assert tokens(cut.expired) == [0]
    assert tokens(cut.batch) == [1]


def test_items_of_closed_streams_are_shed() -> None:
    queue = Queue(max_batch=4, max_delay=0.0)
    gone, alive = stream("a"), stream("b")
    queue.push(gone, 0)
    queue.push(alive, 0)
    gone.live = False
    cut = queue.cut()
    assert tokens(cut.gone) == [0] and tokens(cut.batch) == [1]


def test_a_stateful_stream_has_one_item_per_batch_and_none_while_busy() -> None:
    queue = Queue(max_batch=4, max_delay=0.0, stateful=True)
    a, b = stream("s", 1), stream("s", 2)
    for seq in range(3):
        queue.push(a, seq)  # 0 1 2
    queue.push(b, 0)  # 3
    first = queue.cut()
    assert tokens(first.batch) == [0, 3]  # one per stream, in order
    assert tokens(queue.cut(busy={a, b}).batch) == []  # both in flight: nothing runs
    assert tokens(queue.cut(busy={b}).batch) == [1]
    assert tokens(queue.cut().batch) == [2]


def test_stateless_streams_may_share_a_batch() -> None:
    queue = Queue(max_batch=4, max_delay=0.0)
    s = stream()
    for seq in range(3):
        queue.push(s, seq)
    assert tokens(queue.cut(busy={s}).batch) == [0, 1, 2]


def test_drop_oldest_takes_every_window_of_the_oldest_queued_chunk() -> None:
    queue = Queue(max_batch=8, max_delay=0.0)
    s, other = stream("a", 1), stream("a", 2)
    queue.push(other, 0)  # 0
    queue.push(s, 5)  # 1: two windows of chunk 5
    queue.push(s, 5)  # 2
    queue.push(s, 6)  # 3
    assert tokens(queue.q.drop_oldest(s)) == [1, 2]
    assert len(queue.q) == 2
    assert tokens(queue.q.drop_oldest(stream("z"))) == []
    assert tokens(queue.cut().batch) == [0, 3]


def test_a_live_streams_chunk_behind_a_newer_one_is_dropped_once_stale() -> None:
    """``BatchQueue.stale``: a live stream (``drop_oldest``) whose chunk waited that share of its
    deadline with a newer chunk of its own behind it gets the newer one served, not a backlog in
    order."""
    queue = Queue(max_batch=8, max_delay=0.0, stateful=True)
    queue.q.stale = 0.3  # of a 100 ms deadline: 30 ms
    live, strict, patient = (
        stream("a", 1, "drop_oldest"),
        stream("b", 1),
        stream("c", 1, "drop_oldest"),
    )
    queue.push(live, 0, deadline=0.1)  # 0: two windows of chunk 0
    queue.push(live, 0, deadline=0.1)  # 1
    queue.push(strict, 0, deadline=0.1)  # 2: overflow "reject": never dropped
    queue.push(patient, 0, deadline=2.0)  # 3: a 2 s deadline: 30 ms is not stale for it
    queue.now = 0.020
    for s in (live, strict, patient):
        queue.push(s, 1, deadline=0.1 if s is not patient else 2.0)  # 4, 5, 6
    queue.now = 0.040  # chunk 0 waited 40 ms, chunk 1 only 20
    cut = queue.cut(busy={live, strict, patient})  # their earlier chunks still running
    assert tokens(cut.stale) == [0, 1]  # both windows of live's chunk 0: chunk 1 is behind them
    assert tokens(cut.batch) == []
    assert len(queue.q) == 5
    queue.now = 0.090  # live's chunk 1 waited 70 ms now, but it is its stream's newest: it runs
    cut = queue.cut()
    assert tokens(cut.stale) == [] and sorted(tokens(cut.batch)) == [2, 3, 4]


def test_chunks_are_never_stale_by_default() -> None:
    queue = Queue(max_batch=8, max_delay=0.0)
    live = stream("a", 1, "drop_oldest")
    queue.push(live, 0)
    queue.push(live, 1)
    queue.now = 0.5
    cut = queue.cut()
    assert tokens(cut.stale) == [] and tokens(cut.batch) == [0, 1]


def test_dropping_a_sessions_last_item_takes_it_off_the_ring() -> None:
    queue = Queue(max_batch=8, max_delay=0.0)
    s = stream("a")
    queue.push(s, 0)
    queue.push(stream("b"), 0)
    assert tokens(queue.q.drop_oldest(s)) == [0]
    assert tokens(queue.cut().batch) == [1]
    assert queue.q.due() == math.inf


def test_due_ignores_items_already_taken() -> None:
    queue = Queue(max_batch=2, max_delay=0.005)
    queue.push(stream("a"), 0, deadline=0.003)
    queue.now = 0.001
    queue.push(stream("b"), 0, deadline=1.0)
    queue.push(stream("c"), 0, deadline=1.0)
    assert tokens(queue.cut().batch) == [0, 1]
    # what is left (c, pushed at 1 ms with a 1 s deadline) is due by max_delay alone
    assert queue.q.due() == pytest.approx(0.006)


def test_clear_takes_everything() -> None:
    queue = Queue()
    for sid in "abc":
        queue.push(stream(sid))
    assert sorted(tokens(queue.q.clear())) == [0, 1, 2]
    assert len(queue.q) == 0 and queue.q.due() == math.inf


def test_a_stretched_delay_lets_a_partial_batch_wait_longer_but_not_past_its_deadline() -> None:
    run_times = RunTimes(8)
    run_times.observe(2, 0.004)
    queue = Queue(max_batch=8, max_delay=0.005, run_times=run_times)
    queue.q.delay = 0.020  # what Scheduler.pace sets while the server is busy
    queue.push(stream(), deadline=0.100)
    assert queue.q.due() == pytest.approx(0.020)
    queue.push(stream("b"), deadline=0.015)
    # 15 ms deadline - 4 ms to run two - 1 ms margin comes first
    assert queue.q.due() == pytest.approx(0.010)


def test_items_taken_after_waiting_a_quarter_of_their_deadline_count_as_late() -> None:
    """The queue tells the server whether it is behind: of the items it took (``served``),
    those that waited in it past ``BEHIND_SHARE`` of their deadline, and those it shed for
    their age, are ``late``. Only their wait in the queue counts, not their age before."""
    queue = Queue(max_batch=8)
    a, b, c = stream("a"), stream("b"), stream("c")
    queue.push(a, 0, deadline=0.1)  # waits 30 ms: late
    early = queue.push(b, 0, deadline=0.1)
    early.queued = 0.015  # arrived at 0, queued 15 ms later (a deferred client's): waits 15
    queue.now = 0.030
    queue.push(c, 0, deadline=0.1)  # waits 0
    cut = queue.cut()
    assert len(cut.batch) == 3
    assert (queue.q.served, queue.q.late) == (3, 1)
    assert BEHIND_SHARE * 0.1 < 0.030

    queue.q.served = queue.q.late = 0
    stale = queue.push(a, 1, deadline=0.1)
    stale.queued = 0.125  # arrived at 0.030, queued 95 ms later: expired, not by the queue
    queue.push(b, 1, deadline=0.1)  # expired after waiting here: late
    queue.now = 0.140
    cut = queue.cut()
    assert len(cut.expired) == 2 and not cut.batch
    assert (queue.q.served, queue.q.late) == (0, 1)
