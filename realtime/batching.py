"""The batching policy of one model version, without asyncio: when to cut, what, and what to shed.

A :class:`BatchQueue` holds the chunks waiting for one model version. It is told the time and
asked two questions: :meth:`BatchQueue.due` (when should the next batch be cut?) and
:meth:`BatchQueue.cut` (which items make it, and which are shed because their deadline passed or
their client is gone?). A batch is due when it would be full (``max_batch``), when its oldest item
has waited the delay in force (``max_delay``, longer while the server is busy: see
:attr:`BatchQueue.delay`), or when waiting longer would make its earliest deadline unreachable
given the model's measured run time (:class:`RunTimes`), whichever comes first.

Items of different input shapes never share a batch: each shape has its own bucket. Within a
bucket, sessions are served round-robin, one item per session per turn, so a flooding client
cannot starve the others. A stateful stream never has two items in one batch or in flight at once,
and its items run in order. Everything here is plain code over an injected clock, so the policy is
tested with a fake clock and no sleeps.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass, field

from mypy_extensions import mypyc_attr

from realtime.session import Stream, WorkItem


@dataclass(frozen=True, slots=True)
class Policy:
    """How one model version cuts batches (seconds)."""

    max_batch: int
    max_delay: float
    #: Time kept in hand before a deadline for splitting and sending the results.
    margin: float = 0.001


# Built per chunk: its own __init__, which mypyc compiles (see setup.py).
@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(slots=True, eq=False, init=False)
class Entry:
    """One queued item."""

    item: WorkItem
    taken: bool
    #: When it was queued (clock seconds; 0: unknown). Its wait since counts towards
    #: :attr:`BatchQueue.late`, not its age before: a chunk that waited elsewhere first (a
    #: deferred client's, see ``realtime.relay.Reader.defer``) does not say the queue is behind.
    queued: float

    def __init__(self, item: WorkItem, taken: bool = False, queued: float = 0.0) -> None:
        self.item = item
        self.taken = taken
        self.queued = queued


class RunTimes:
    """A running estimate of a model's run time (seconds) for each batch size."""

    def __init__(self, max_batch: int, prior: float = 0.002, weight: float = 0.2) -> None:
        self._seconds = [math.nan] * (max_batch + 1)
        self._prior = prior
        self._weight = weight

    def observe(self, n: int, seconds: float) -> None:
        """Fold in one batch of ``n`` items that ran in ``seconds``."""
        old = self._seconds[n]
        self._seconds[n] = seconds if math.isnan(old) else old + self._weight * (seconds - old)

    def estimate(self, n: int) -> float:
        """Expected run time of a batch of ``n``: measured, else the nearest larger measured size,
        else the largest smaller one scaled up by size, else the prior."""
        known = self._seconds
        if not math.isnan(known[n]):
            return known[n]
        for m in range(n + 1, len(known)):
            if not math.isnan(known[m]):
                return known[m]
        for m in range(n - 1, 0, -1):
            if not math.isnan(known[m]):
                return known[m] * n / m
        return self._prior

    def best_per_item(self) -> float | None:
        """The least run time per item over the measured batch sizes (seconds): what an item
        costs once batches are large; None before any is measured."""
        best = math.inf
        for n, seconds in enumerate(self._seconds):
            if n and seconds < best * n:  # NaN compares False
                best = seconds / n
        return None if best == math.inf else best

    def as_dict(self) -> dict[int, float]:
        """The measured sizes and their estimates (seconds)."""
        return {n: s for n, s in enumerate(self._seconds) if not math.isnan(s)}


@mypyc_attr(serializable=True)
@dataclass(slots=True, eq=False)
class _Bucket:
    """The items of one input shape: a FIFO per session, served round-robin."""

    sessions: dict[str, deque[Entry]] = field(default_factory=dict)
    ring: deque[str] = field(default_factory=deque)  # sessions with items, next to serve first
    arrivals: deque[Entry] = field(default_factory=deque)  # arrival order (lazily pruned)
    deadlines: list[tuple[float, int, Entry]] = field(default_factory=list)  # lazy min-heap
    count: int = 0

    def oldest(self) -> WorkItem:
        arrivals = self.arrivals
        while arrivals[0].taken:
            arrivals.popleft()
        return arrivals[0].item

    def earliest_deadline(self) -> float:
        heap = self.deadlines
        while heap[0][2].taken:
            heapq.heappop(heap)
        return heap[0][0]


@mypyc_attr(serializable=True)
@dataclass(slots=True)
class Cut:
    """What one call to :meth:`BatchQueue.cut` took out of the queue."""

    batch: list[Entry] = field(default_factory=list)
    expired: list[Entry] = field(default_factory=list)  # deadline passed before running
    gone: list[Entry] = field(default_factory=list)  # stream closed or client disconnected
    stale: list[Entry] = field(default_factory=list)  # a live stream's, behind a newer chunk


#: The share of its deadline a live stream's chunk waits behind a newer one of its stream before
#: it is dropped for it, while the server sheds by age (admission control on): 30 ms of the
#: usual 100. Behind a slowed core, serving every chunk in order made every later chunk late
#: too, for as long as the backlog took to drain; a 200 ms slowdown at 1.5x then cost 2-4 % of a
#: run's chunks past 50 ms, and dropping at this share ~1 % (docs/scheduler.md, session 30). Of
#: the deadline the client gave, not a fixed time: a client that said its results stay useful
#: for 2 s has its chunks served, not dropped after 30 ms.
STALE_SHARE = 0.3


#: An item taken for a batch (or shed for its age) after waiting in the queue this share of
#: its deadline was taken late (:attr:`BatchQueue.late`): the server is behind. Batches wait a
#: few ms to fill, longer while the server is busy (``Scheduler.pace``): 25 ms of the usual 100
#: is past that.
BEHIND_SHARE = 0.25


def _late(entry: Entry, now: float) -> bool:
    """Whether ``entry`` waited in the queue :data:`BEHIND_SHARE` of its deadline."""
    item = entry.item
    queued = entry.queued or item.received
    return now - queued > BEHIND_SHARE * (item.deadline - item.received)


def _stale(item: WorkItem, now: float, share: float) -> bool:
    """Whether ``item`` has waited ``share`` of its deadline."""
    received = item.received
    return now - received > share * (item.deadline - received)


def _superseded(line: deque[Entry], i: int) -> bool:
    """Whether ``line[i]`` belongs to a live stream (``overflow: drop_oldest``) with a newer
    chunk queued behind it in its session's line."""
    item = line[i].item
    stream = item.stream
    if stream.overflow != "drop_oldest":
        return False
    for j in range(i + 1, len(line)):
        later = line[j].item
        if later.stream is stream and later.seq != item.seq:
            return True
    return False


class BatchQueue:
    """The waiting items of one model version and the policy that batches them."""

    def __init__(self, policy: Policy, run_times: RunTimes, stateful: bool) -> None:
        self.policy = policy
        self.run_times = run_times
        self.stateful = stateful
        #: Seconds the oldest item may wait for a fuller batch: the policy's ``max_delay``, or
        #: longer while the server is busy (set by the scheduler: fewer, fuller batches cost
        #: less CPU). The deadline still bounds it.
        self.delay = policy.max_delay
        #: Share of its deadline a live stream's chunk (``overflow: drop_oldest``) may wait with
        #: a newer chunk of its stream queued behind it; past it, it is dropped for the newer one
        #: (0: never; see :data:`STALE_SHARE`).
        self.stale = 0.0
        #: Items taken for batches, and those taken or shed for their age (expired, stale)
        #: after waiting here :data:`BEHIND_SHARE` of their deadline: read and reset by the
        #: server a few times a second, to tell whether it is behind.
        self.served = 0
        self.late = 0
        self._buckets: dict[tuple[int, ...], _Bucket] = {}
        self._order = itertools.count()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def push(self, entry: Entry) -> None:
        """Queue an item at the back of its session's line in its shape's bucket."""
        item = entry.item
        bucket = self._buckets.get(item.inputs.shape)
        if bucket is None:
            bucket = self._buckets[item.inputs.shape] = _Bucket()
        line = bucket.sessions.get(item.stream.session)
        if line is None:
            line = bucket.sessions[item.stream.session] = deque()
            bucket.ring.append(item.stream.session)
        line.append(entry)
        bucket.arrivals.append(entry)
        heapq.heappush(bucket.deadlines, (item.deadline, next(self._order), entry))
        bucket.count += 1
        self._len += 1

    def _bucket_due(self, bucket: _Bucket) -> float:
        policy = self.policy
        oldest = bucket.oldest().received
        if bucket.count >= policy.max_batch:
            return oldest
        n = bucket.count
        by_deadline = bucket.earliest_deadline() - self.run_times.estimate(n) - policy.margin
        by_delay = oldest + self.delay
        return by_delay if by_delay < by_deadline else by_deadline

    def due(self) -> float:
        """When the next batch should be cut (clock seconds; ``inf`` if nothing waits). A time in
        the past means now."""
        best = math.inf  # a loop, not min() over a generator: this runs for every chunk
        for bucket in self._buckets.values():
            if bucket.count:
                due = self._bucket_due(bucket)
                if due < best:
                    best = due
        return best

    def cut(self, now: float, busy: set[Stream]) -> Cut:
        """Take the next batch from the bucket most due, round-robin over its sessions, shedding
        the items whose deadline has passed or whose stream is gone. ``busy`` holds the stateful
        streams with an item in flight: their items wait."""
        out: Cut = Cut()
        live = [b for b in self._buckets.values() if b.count]
        if not live:
            return out
        bucket = min(live, key=self._bucket_due)
        taken: set[Stream] = set()
        blocked = busy if self.stateful else set()
        ring, sessions, max_batch = bucket.ring, bucket.sessions, self.policy.max_batch
        progress = True
        while progress and ring and len(out.batch) < max_batch:
            progress = False
            for _ in range(len(ring)):
                if len(out.batch) >= max_batch:
                    break
                sid = ring[0]
                line = sessions[sid]
                entry = self._take_one(line, now, blocked, taken, out)
                if line:
                    ring.rotate(-1)
                else:
                    ring.popleft()
                    del sessions[sid]
                if entry is not None:
                    out.batch.append(entry)
                    progress = True
        self.served += len(out.batch)
        removed = len(out.batch) + len(out.expired) + len(out.gone) + len(out.stale)
        bucket.count -= removed
        self._len -= removed
        if not bucket.count:
            bucket.arrivals.clear()
            bucket.deadlines.clear()
        return out

    def _take_one(
        self,
        line: deque[Entry],
        now: float,
        blocked: set[Stream],
        taken: set[Stream],
        out: Cut,
    ) -> Entry | None:
        """The first runnable entry of a session's line, shedding dead and late ones on the way."""
        i = 0
        while i < len(line):
            entry = line[i]
            item = entry.item
            stream = item.stream
            if not stream.live:
                out.gone.append(entry)
            elif now > item.deadline:
                out.expired.append(entry)
                if _late(entry, now):
                    self.late += 1
            elif self.stale and _stale(item, now, self.stale) and _superseded(line, i):
                out.stale.append(entry)
                if _late(entry, now):
                    self.late += 1
            elif stream in blocked or stream in taken:
                i += 1
                continue
            else:
                del line[i]
                entry.taken = True
                if self.stateful:
                    taken.add(stream)
                if _late(entry, now):
                    self.late += 1
                return entry
            del line[i]
            entry.taken = True
        return None

    def drop_oldest(self, stream: Stream) -> list[Entry]:
        """Remove the stream's oldest queued chunk (every window of it); empty if none waits."""
        for bucket in self._buckets.values():
            line = bucket.sessions.get(stream.session)
            if not line:
                continue
            seq = next((e.item.seq for e in line if e.item.stream is stream), None)
            if seq is None:
                continue
            dropped = [e for e in line if e.item.stream is stream and e.item.seq == seq]
            for e in dropped:
                line.remove(e)
                e.taken = True
            if not line:
                bucket.ring.remove(stream.session)
                del bucket.sessions[stream.session]
            bucket.count -= len(dropped)
            self._len -= len(dropped)
            return dropped
        return []

    def clear(self) -> list[Entry]:
        """Take every queued entry out (shutdown)."""
        entries = [e for b in self._buckets.values() for line in b.sessions.values() for e in line]
        for entry in entries:
            entry.taken = True
        self._buckets, self._len = {}, 0
        return entries
