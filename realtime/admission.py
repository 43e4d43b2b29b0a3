"""Admission control: whether the server takes one more session or stream. Pure, over a given
clock and what the server measured.

Once the server is full, a new session makes every admitted one late: it is better to refuse the
151st player than to lag all 150. :class:`Admission` is fed, a few times a second, what the
server measured (:meth:`Admission.observe`: event-loop lag, the event loop's and the process's
CPU time, its cores' idle time, the sessions streaming, each model's worker time and queue depth)
and keeps smoothed figures of them. From those it estimates what one streaming session costs
and how many the server can carry within ``target_load`` of its bottleneck (the event loop, or
the cores the process may use, busy with it or anything else), and answers at ``hello``
(:meth:`Admission.admit_session`) and at ``open`` (:meth:`Admission.admit_stream`) with None
(admitted) or a typed, retryable :class:`errors.ServerBusy` carrying ``retry_after_ms``. The
policy and its figures are in docs/scheduler.md.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from realtime import errors

#: Loop-lag histogram bucket bounds (ms), for metrics.
LAG_BOUNDS_MS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, math.inf)
#: Time constant (seconds) of the smoothed load, lag and session count.
SMOOTHING_SECONDS = 0.5
#: Below this share of its bottleneck the server counts as idle: what it measures then says
#: nothing of what a session costs, and lag then comes from other processes, not its sessions.
IDLE_LOAD = 0.05
#: CPU seconds one new WebSocket connection costs the event loop and the kernel, admitted or
#: refused (a handshake, a hello, a welcome or a refusal, a close: measured, see
#: docs/scheduler.md). A crowd arriving at once spends this on every connection; taken for
#: what streaming sessions cost, it made one session look several times dearer than it is, and
#: the server refused most of the crowd while it had room. It depends on the host (1.3-1.6 ms
#: on another; ``python -m loadtest.connection_cost`` measures it).
CONNECTION_COST = 0.0006
#: CPU seconds a connection refused at the door costs (a handshake answered 503 before
#: websockets takes it, while a crowd is refused: see :attr:`Admission.crowd`): 0.05-0.07 ms
#: on an idle server against 0.33-0.45 for a connection through a hello (``python -m
#: loadtest.connection_cost --door``). Beside 330 streaming sessions, a crowd refused in
#: batches (``realtime.listener.REST_SECONDS``) costs the core ~0.05 ms a refusal (0.01-0.08),
#: one by one ~0.15 (it slowed the sessions' own code too). What it costs past this figure
#: is taken for the sessions', and admission errs towards refusing.
DOOR_COST = 0.00006
#: Refusals a second the server takes in its stride: 25 a second are ~1.5 % of a core. Past
#: that rate a refused client is told to wait proportionally longer, so that a crowd trying
#: again spreads out instead of taking the admitted sessions' CPU, and new connections are
#: refused at the door (:attr:`Admission.crowd`), at a seventh of the cost.
CALM_REFUSALS = 25.0
#: Time constant (seconds) of the smoothed refusal rate.
REFUSAL_SMOOTHING_SECONDS = 2.0
#: The longest wait told, as a multiple of ``retry_after_ms``.
MAX_RETRY_FACTOR = 30.0
#: Seconds a higher capacity must hold before admission goes by it: sessions admitted cannot
#: be taken back, so the capacity admission uses is the least estimated over this window (a
#: lower one counts at once). While sessions came in fast, each estimate ran ahead of what
#: they would cost: the cost of a session read 2-5 % low, and a server admitted up to 0.93-0.97
#: of its core against a target of 0.9, where one 20 ms stall (a garbage collection) put every
#: session behind for a second (docs/scheduler.md).
CAPACITY_HOLD_SECONDS = 1.0
#: ... from this share of the target load on. Below it the sessions are far from the capacity,
#: and the first estimates of a ramp are rough (the first read 37 sessions, at 26 sessions and
#: 0.09 of the core, while 450 fit): held for a second, it refused every client meanwhile.
HOLD_FROM = 0.9
#: Seconds the dearest a session cost near full load (from :data:`HOLD_FROM` of the target on)
#: is remembered: the capacity is never more than that cost leaves room for. Some hosts run
#: the same work 1.3-1.6x faster for seconds at a time and then slow again (session 37: 400
#: speech_activity streams kept the core 0.66-0.76 busy for most of a minute, and 0.44-0.48 for
#: 4.5 s of it). Estimated in such a fast spell, the capacity admitted sessions that the next
#: slow one could not carry: 126-145 % of the capacity, every session late for seconds until
#: the newest were taken back. Far from full nothing is remembered: a ramp's first sessions
#: cost more each (the batches fill as more come), not what the host does.
COST_MEMORY_SECONDS = 30.0
#: Seconds a session's cost must have held near full before it is remembered (the least of
#: them counts): a hiccup (the core slowed 1.5x for 150 ms) is not a slow spell, and remembered
#: it would cut the capacity by a third for half a minute; and a ramp's first readings near full
#: still weigh in its first, dearer sessions (the smoothed load and sessions lag it).
COST_SETTLE_SECONDS = 2.0
#: A lag of the measuring timer from this long (seconds) is taken for a stall, time the loop
#: could not run, and not counted in the time its shares are of; a shorter one is a turn of a
#: busy loop, which used the CPU it took. At 0.85-0.9 of the core the timer fires a few ms
#: late on average, and counted out, that lag made the load read 3-5 % high (session 25).
STALL_LAG = 0.02
#: Seconds over which the cores' busy share is read from their idle time (in 10 ms ticks).
BUSY_WINDOW = 0.5
#: Lateness: a live audio stream counts in the median once it had this many results in a window.
MIN_ANSWERED = 10
#: A live audio stream whose media clock ran ahead of real time by more than this share of a
#: lateness window sends faster than real time (:func:`ahead_of_real_time`).
AHEAD_SHARE = 0.5
#: Past this median share of late results, a lateness window counts towards taking sessions
#: back (:meth:`Admission.take_back`): most streams are late, not a few.
OVERRUN_SHARE = 0.5
#: ... unless they catch up: results this much less late on average than a window before
#: (the sessions taken back leave room, and the backlog drains; or a hiccup passes).
CATCHING_UP = 0.8
#: The fewest and the most sessions taken back at once, as shares of those streaming: the
#: capacity estimate sizes it, these bound a wrong one (late while it reads room to spare: the
#: bottleneck is a model's queue, not the CPU it sees).
TAKE_BACK_AT_LEAST = 0.1
TAKE_BACK_AT_MOST = 0.25
#: Past this share of the batch items of a measuring period taken late or shed for their age
#: (``realtime.batching.BEHIND_SHARE``), the server is behind, and the newest sessions wait
#: (:meth:`Admission.observe_queues`).
BEHIND_ITEMS = 0.05
#: Items a period must have for its share to count.
BEHIND_MIN_ITEMS = 20
#: Each period behind, the sessions served shrink to this share of themselves ...
FIRST_SHRINK = 0.85
#: ... but not below this share of those streaming: taken back (:data:`TAKE_BACK_AT_MOST` at
#: a time) is better than waiting long.
FIRST_AT_LEAST = 0.5
#: The first period with nothing late, they grow by this share of those streaming, and by
#: twice as many each period on time after it: after a short slowdown the waiting sessions
#: come back within a few periods (their new chunks wait too, while they wait), and a server
#: still slow finds its level again in small steps.
FIRST_GROW = 0.02
#: Sessions start waiting only once the server has been behind this many measuring periods
#: more than it has not (since it last was not at all): a short slowdown's backlog drains
#: faster than the waiting sessions' would.
ENGAGE_PERIODS = 10


@dataclass(frozen=True, slots=True)
class AdmissionPolicy:
    """The knobs of admission control (``realtime serve --admit-*``)."""

    #: Share of the bottleneck (event loop or cores) admitted sessions may use; 0: admit all
    #: (and do not shed chunks by their age either: overload protection off). The rest is the
    #: margin a host's spell eats (a core stopped, or slowed 1.3-2x, for 50 ms to seconds).
    #: Swept with ``python -m loadtest.admit_sweep`` (2x, 4x and a burst, silero and
    #: speech_activity) on two hosts: on session 35-36's 0.92 held 112 checks of 120 (4
    #: missed the on-time bar), 0.88 103 (3 on time, 14 too few admitted); on session 38's,
    #: whose speed swings for seconds, in the same hours 0.88 held 37 of 40 (3 on time), 0.92
    #: 32 (6 on time, 2 other), and 0.86 94 of 100 against 0.92's 83. About as many checks in
    #: all; the lower target's misses are more often a few sessions too few admitted, the
    #: higher's every admitted session late. docs/scheduler.md, "The target load".
    target_load: float = 0.88
    #: Smoothed event-loop lag past which new sessions and streams are refused (when the
    #: server's own load is at least half its target: lag on an idle server is a neighbour's).
    max_lag_ms: float = 20.0
    #: A model whose queue holds this share of ``max_queue`` refuses new streams.
    queue_share: float = 0.5
    #: What a refused client is told to wait before trying again (longer while the server
    #: refuses more than :data:`CALM_REFUSALS` a second).
    retry_after_ms: float = 1000.0
    #: Seconds between measurements (the loop-lag timer's period).
    period: float = 0.05
    #: A result sent this long (ms) after its chunk was due, as the server tells from a live
    #: audio stream's own clock, is late.
    late_ms: float = 30.0
    #: Past this share of late results (median over live audio streams), new sessions and
    #: streams are refused: the admitted ones already miss their deadlines.
    late_share: float = 0.01
    #: Seconds the admitted sessions may stay late (past :data:`OVERRUN_SHARE` of their results,
    #: in each lateness window), or the newest may wait while the server is behind
    #: (:meth:`Admission.observe_queues`), before the newest are taken back (``server_busy``,
    #: then the close): the server slowed (a neighbour took the cores) below what it admitted,
    #: and would otherwise never catch up. 0: never. 1 since session 39: a waiting session
    #: keeps its chunks, and each costs the loop about what serving it would when it is let go
    #: or refused; taken back, they cost nothing more. Under 4 s of a core 1.6x slower, 1 s
    #: held 93.76 / 93.95 % of the admitted chunks within 50 ms against 2 s's 82.52 / 82.53
    #: (docs/scheduler.md, "Session 39"), and took no session back under 300 ms at 1.5x.
    take_back_seconds: float = 1.0

    @property
    def enabled(self) -> bool:
        """Whether anything is ever refused (and chunks shed by their age)."""
        return self.target_load > 0


@dataclass(slots=True)
class Measurement:
    """What the server measured at one instant: cumulative times, and gauges."""

    now: float  # monotonic seconds
    lag: float  # seconds the lag timer fired late
    loop_cpu: float  # CPU seconds of the event-loop thread so far
    process_cpu: float  # CPU seconds of the whole process so far (model workers included)
    cores: int  # cores the process may run on
    streaming: int  # sessions with at least one stream open
    #: Per model name: (worker seconds so far, items queued, workers, max_queue).
    models: dict[str, tuple[float, int, int, int]] = field(default_factory=dict)
    #: Idle seconds so far of the cores the process is confined to, whoever else uses them
    #: (None: unknown, or not confined). Pinned to a core, the process's own share of it stops
    #: short of 1 (the kernel's network work takes the rest), and a target above that share
    #: would admit sessions without end; the core's idle time goes to 0 either way.
    idle: float | None = None
    #: Per model version (its queue's key): (its worker threads' CPU seconds running batches
    #: so far, items run so far, the least run time per item over its batch sizes, seconds, or
    #: None: unknown).
    runs: dict[str, tuple[float, int, float | None]] = field(default_factory=dict)


def idle_seconds(stat: str, cpus: Iterable[int], ticks_per_second: float) -> float | None:
    """Idle (and I/O wait) seconds so far of ``cpus``, from the text of ``/proc/stat``; None
    if it does not list them all."""
    want = {f"cpu{c}" for c in cpus}
    ticks, found = 0, 0
    for line in stat.splitlines():
        name, _, rest = line.partition(" ")
        if name in want:
            fields = rest.split()
            ticks += int(fields[3]) + int(fields[4])  # idle, iowait
            found += 1
    return ticks / ticks_per_second if want and found == len(want) else None


def ahead_of_real_time(mark: float, least: float, seconds: float) -> bool:
    """Whether a live audio stream sent faster than real time over a lateness window of
    ``seconds``: its least arrival lead (``Stream.clock_min``, ms) fell from ``mark`` by more
    than :data:`AHEAD_SHARE` of the window. Its media clock then runs ahead of the server's,
    and its results read late by it however fast they come: a flooder alone on a server read
    80 % late, and took the newest sessions back every second (session 30). Such a stream does
    not count in the median of :func:`median_over_streams`."""
    return math.isfinite(mark) and least < mark - AHEAD_SHARE * seconds * 1000.0


def median_over_streams(counts: Iterable[tuple[int, float]]) -> float | None:
    """The median, over streams, of a per-result average in one window, from each stream's
    (results, total): given (results, late results), the share of results that were late;
    given (results, the sum of how late each was), how late a result was on average. Streams
    with fewer than :data:`MIN_ANSWERED` results do not count; None if none does. The median,
    so that a few clients whose clock does not follow real time (or a paused one) cannot make
    the whole server look late."""
    shares = sorted(late / answered for answered, late in counts if answered >= MIN_ANSWERED)
    if not shares:
        return None
    mid = len(shares) // 2
    return shares[mid] if len(shares) % 2 else (shares[mid - 1] + shares[mid]) / 2


def _slide(
    window: deque[tuple[float, float]],
    now: float,
    value: float,
    seconds: float,
    least: bool = True,
) -> None:
    """Add ``value`` to a sliding window of the last ``seconds`` of (time, value), kept so that
    its first entry is its least value (``least=False``: its greatest): an entry that a newer
    one beats can never be first again, and goes."""
    while window and (window[-1][1] >= value if least else window[-1][1] <= value):
        window.pop()
    window.append((now, value))
    while window[0][0] < now - seconds:
        window.popleft()


def _batching_slack(
    before: dict[str, tuple[float, int, float | None]],
    now: dict[str, tuple[float, int, float | None]],
) -> float:
    """CPU seconds the model workers spent between two measurements past what the items they
    ran cost at each model's least run time per item (its large batches).

    A model with a fixed cost per run (silero VAD here: 270 µs for 1 item, ~100 per item from 4
    on) runs small batches while few sessions stream, and every batch pays that cost again. That
    CPU is real, but it does not grow with the sessions: more sessions fill the batches instead.
    Counted as what sessions cost, it made one look a third again as dear as it is (a server
    pinned to one core read 0.8 busy at 60 silero streams, where 100 fit), and admission
    refused clients the server had room for. The least time per item is wall time (the
    workers' run times, :class:`realtime.batching.RunTimes`), never less than the CPU time,
    and the CPU is the calling thread's (ONNX Runtime's own intra-op threads, when there are
    more than one, are not counted): the slack is never overstated."""
    slack = 0.0
    for name, (cpu, items, best) in now.items():
        old = before.get(name)
        if old is None or best is None:
            continue
        slack += max(0.0, (cpu - old[0]) - (items - old[1]) * best)
    return slack


@dataclass(slots=True)
class AdmissionFigures:
    """Counters for metrics: they only grow (and the lag histogram's buckets)."""

    admitted: Counter[str] = field(default_factory=Counter)  # "session" / "stream"
    refused: Counter[str] = field(default_factory=Counter)  # by reason
    taken_back: int = 0  # sessions ended server_busy after they were admitted
    lag_buckets: list[int] = field(default_factory=lambda: [0] * len(LAG_BOUNDS_MS))
    lag_sum: float = 0.0  # seconds


class Admission:
    """Decides admit or refuse for a new session or stream from smoothed measurements."""

    def __init__(self, policy: AdmissionPolicy) -> None:
        self.policy = policy
        self.figures = AdmissionFigures()
        self._last: Measurement | None = None
        #: Smoothed shares of the event-loop thread, of the process (over its cores) and of
        #: its cores' busy time (all users; None: not known), each on its own: the bottleneck is
        #: the largest of them once smoothed (:attr:`load`).
        self._loop_share = 0.0
        self._cpu_share = 0.0
        self._busy_share: float | None = None
        #: The cores' idle seconds at the start of the busy share's window (None: not known),
        #: the window's length so far, and its time the loop could run.
        self._idle_from: float | None = None
        self._window = self._window_span = 0.0
        #: Smoothed CPU (in cores) the model workers spend past what their items cost in large
        #: batches: the price of small batches, which falls as sessions are added.
        self.batching_slack = 0.0
        self._cores = 1  # cores the process may run on, as last measured
        #: Smoothed share of the bottleneck new connections take (handshakes, hellos,
        #: refusals): kept free of sessions, so that refusing a crowd does not make the
        #: admitted sessions late.
        self.churn = 0.0
        self.lag = 0.0  # smoothed event-loop lag, seconds
        #: Smoothed share of the time the process could run (not stalled: a lag from
        #: STALL_LAG on is time it was stopped, throttled or starved).
        self.running = 1.0
        self.last_lag = 0.0  # the newest lag measured, seconds
        self._streaming = 0.0  # smoothed sessions streaming
        self._model_load: dict[str, float] = {}  # smoothed share of a model's workers in use
        self._model_full: dict[str, bool] = {}  # its queue at queue_share of max_queue
        self.refusal_rate = 0.0  # smoothed refusals a second
        self._refusals = 0  # refusals since the last measurement
        self._connections = 0  # new connections since the last measurement
        self._door = 0  # of them, refused at the door
        #: New connections let through the door to their hello since the last measurement:
        #: not yet among the sessions, they take their room (see :meth:`refuse_at_door`).
        self._passed = 0
        #: Median share of late results over live audio streams, last window (None: unknown).
        self.late_share: float | None = None
        #: Seconds the admitted sessions have been late in a row (lateness windows past
        #: :data:`OVERRUN_SHARE`), less a window for each time sessions were taken back.
        self.overrun = 0.0
        self._late_window = 0.0  # the last lateness window's length, seconds
        self._taken_in_overrun = False  # sessions were taken back since the overrun began
        #: Median over live audio streams of how late a result was on average (ms), in the
        #: last window and the one before (None: unknown).
        self.lateness_ms: float | None = None
        self._lateness_before: float | None = None
        #: While the server is behind: how many sessions (the oldest) are served, the rest
        #: waiting (None: all).
        self.first: int | None = None
        #: Seconds sessions have waited, less those none has since (at least 0), and when
        #: the queues were last observed.
        self._waited = 0.0
        self._queues_at = 0.0
        self._behind = 0  # measuring periods behind, less those not (at least 0)
        self.waiting = 0  # sessions waiting now
        self._grow = FIRST_GROW  # share of the sessions served more after a period on time
        #: Capacity estimates of the last :data:`CAPACITY_HOLD_SECONDS`, (time, sessions), each
        #: lower than the ones after it: the first is the least (a sliding-window minimum).
        self._estimates: deque[tuple[float, float]] = deque()
        #: A session's cost near full over the last :data:`COST_SETTLE_SECONDS` (since the load
        #: came near full), and the least of each such window over the last
        #: :data:`COST_MEMORY_SECONDS`: (time, cost), sliding windows, the first the least and
        #: the dearest (:func:`_slide`).
        self._near: deque[tuple[float, float]] = deque()
        self._near_since: float | None = None  # when the load last came near full
        self._dear: deque[tuple[float, float]] = deque()

    # --- measuring ---------------------------------------------------------------------------

    def observe(self, m: Measurement) -> None:
        """Take in one measurement (every ``policy.period`` seconds)."""
        f = self.figures
        lag_ms = m.lag * 1000.0
        f.lag_buckets[bisect_left(LAG_BOUNDS_MS, lag_ms)] += 1
        f.lag_sum += m.lag
        self.last_lag = m.lag
        for name, (_, depth, _, max_queue) in m.models.items():
            self._model_full[name] = depth >= self.policy.queue_share * max_queue
        last, self._last = self._last, m
        if last is None or m.now <= last.now:
            return
        dt = m.now - last.now
        rate, self._refusals = self._refusals / dt, 0
        # Shares are of the time the loop could run: not a stall's lag, while it did not. A
        # stall (the process stopped, a neighbour's hiccup) used no CPU, and counted as idle it
        # made the sessions look cheap at the worst moment: after a 60 ms stall the smoothed
        # load fell below HOLD_FROM, the capacity held was let go, and a 4x crowd's retries
        # filled the server to 0.95-0.97 of its core (docs/scheduler.md, session 23). A lag
        # shorter than STALL_LAG is a busy loop's turn, which used the CPU it took: taken out
        # too, it made a server at 0.86-0.87 of its core read 0.90 (session 25).
        span = dt - m.lag if STALL_LAG <= m.lag < dt else dt
        through = self._connections - self._door
        churn = (through * CONNECTION_COST + self._door * DOOR_COST) / span
        self._connections = self._door = self._passed = 0
        self.refusal_rate += (1.0 - math.exp(-dt / REFUSAL_SMOOTHING_SECONDS)) * (
            rate - self.refusal_rate
        )
        a = 1.0 - math.exp(-span / SMOOTHING_SECONDS)
        self._cores = cores = max(m.cores, 1)
        loop_share = min((m.loop_cpu - last.loop_cpu) / span, 1.0)
        self._loop_share += a * (loop_share - self._loop_share)
        cpu_share = min((m.process_cpu - last.process_cpu) / (span * cores), 1.0)
        self._cpu_share += a * (cpu_share - self._cpu_share)
        self._busy(m, last, dt, span)
        slack = _batching_slack(last.runs, m.runs) / span
        self.batching_slack += a * (slack - self.batching_slack)
        self.churn += a * (churn - self.churn)
        self.lag += a * (m.lag - self.lag)
        self.running += (1.0 - math.exp(-dt / SMOOTHING_SECONDS)) * (span / dt - self.running)
        self._streaming += a * (m.streaming - self._streaming)
        for name, (busy, _, workers, _) in m.models.items():
            before = last.models.get(name)
            share = 0.0 if before is None else (busy - before[0]) / (span * max(workers, 1))
            old = self._model_load.get(name, 0.0)
            self._model_load[name] = old + a * (share - old)
        self._hold(m.now)

    def _busy(self, m: Measurement, last: Measurement, dt: float, span: float) -> None:
        """The cores' busy share, all users, over windows of :data:`BUSY_WINDOW`. /proc/stat
        counts in ticks (10 ms): over one 50 ms period a core's share reads in steps of a fifth.
        Taken as the larger of it and the process's share in each period, the steps' upper
        halves counted and the lower did not, and a core 0.85 busy read 0.89 (session 25)."""
        if m.idle is None or last.idle is None:
            self._busy_share = self._idle_from = None
            return
        if self._idle_from is None:
            self._idle_from, self._window, self._window_span = last.idle, 0.0, 0.0
        self._window += dt
        self._window_span += span
        if self._window < BUSY_WINDOW:
            return
        idle = (m.idle - self._idle_from) / self._cores
        busy = min((self._window - idle) / self._window_span, 1.0)
        old = busy if self._busy_share is None else self._busy_share
        self._busy_share = old + (1.0 - math.exp(-self._window_span / SMOOTHING_SECONDS)) * (
            busy - old
        )
        self._idle_from, self._window, self._window_span = m.idle, 0.0, 0.0

    def _hold(self, now: float) -> None:
        """Keep the newest capacity estimate among the last :data:`CAPACITY_HOLD_SECONDS`, and
        the dearest cost near full among the last :data:`COST_MEMORY_SECONDS`."""
        estimates, dear = self._estimates, self._dear
        while dear and dear[0][0] < now - COST_MEMORY_SECONDS:
            dear.popleft()
        cost = self.session_cost
        near_full = cost is not None and self.load >= HOLD_FROM * self.policy.target_load
        if not near_full:
            # Idle, or far from full: an estimate running ahead admits nothing amiss, and a
            # ramp's dearer first sessions are not the host's.
            estimates.clear()
            self._near.clear()
            self._near_since = None
        if cost is None:
            return
        if near_full:
            self._remember(now, cost)
        _slide(estimates, now, self._room(cost), CAPACITY_HOLD_SECONDS)

    def _remember(self, now: float, cost: float) -> None:
        """Keep a session's cost near full: the least over :data:`COST_SETTLE_SECONDS`, once
        it was near full that long, goes to the dearest over :data:`COST_MEMORY_SECONDS`."""
        if self._near_since is None:
            self._near_since = now
        _slide(self._near, now, cost, COST_SETTLE_SECONDS)
        if now - self._near_since >= COST_SETTLE_SECONDS:
            _slide(self._dear, now, self._near[0][1], COST_MEMORY_SECONDS, least=False)

    def connected(self) -> None:
        """A new WebSocket connection arrived (admitted or not): its cost is not a session's."""
        self._connections += 1

    def refuse_at_door(self, sessions: int, resume: bool) -> errors.ServerBusy | None:
        """A new connection's handshake, while a crowd is refused (:attr:`crowd`): the refusal
        to answer it with (HTTP 503, before the WebSocket handshake, which would cost the
        admitted sessions' CPU seven times over), or None to let it through to its hello. A
        connection that comes to ``resume`` a session is let through: a resume is admitted.

        ``sessions`` are the ones past their handshake; the connections let through since the
        last measurement count beside them. The listener takes a crowd's connections in a
        batch (realtime.listener): when the room was for one, the whole batch went through to
        its hello, and all but one were refused there, at twelve times the cost (4x runs:
        10-40 % of refusals at hello against 2-5 % before the batches, docs/scheduler.md)."""
        if resume or not self.crowd:
            return None
        reason = self.full(sessions + self._passed)
        if reason is None:
            self._passed += 1
            return None
        self._connections += 1
        self._door += 1
        return self._refuse(reason, sessions)

    def observe_lateness(
        self, share: float | None, seconds: float, lateness_ms: float | None = None
    ) -> None:
        """Take in the newest window's (``seconds`` long) median share of late results and how
        late a result was on average (see :func:`median_over_streams`)."""
        self.late_share = share
        self._lateness_before, self.lateness_ms = self.lateness_ms, lateness_ms
        p = self.policy
        late = share is not None and share > OVERRUN_SHARE and self.load >= p.target_load / 2
        self.overrun = self.overrun + seconds if late and p.enabled else 0.0
        if not self.overrun:
            self._taken_in_overrun = False
        self._late_window = seconds

    def take_back(self, sessions: int) -> int:
        """How many of the ``sessions`` streaming to take back now (the newest: the server ends
        them ``server_busy``), 0 unless they have been late for ``take_back_seconds``.

        Admission keeps the sessions within what the server served in time; when the server
        then slows (a neighbour takes the cores, the host throttles), every admitted session is
        late, and stays late: the chunks shed by their age still cost their reading. Taking
        back those past the estimated capacity (bounded by :data:`TAKE_BACK_AT_LEAST` and
        :data:`TAKE_BACK_AT_MOST` of them) lets the rest be on time again. The capacity is of
        the time the process runs (stalls are not counted in its load): stopped a quarter of
        the time (a cgroup's CPU quota, a neighbour), it carries a quarter less. While the
        sessions stay late and do not catch up (:data:`CATCHING_UP`), :data:`TAKE_BACK_AT_LEAST`
        more go after each further window: a saturated server cannot measure how far past its
        capacity it is, and its backlog only drains with room to spare (sized by the estimate
        again while a backlog drained, a third round took a fifth at once)."""
        p = self.policy
        if not p.take_back_seconds or self.overrun < p.take_back_seconds or not sessions:
            return 0
        now, before = self.lateness_ms, self._lateness_before
        if now is not None and before is not None and now < CATCHING_UP * before:
            return 0  # catching up: late still, but less so each window
        self.overrun -= self._late_window
        capacity = self.capacity
        excess = sessions - (capacity * self.running if capacity is not None else 0.0)
        least = math.ceil(TAKE_BACK_AT_LEAST * sessions)
        n = max(least, min(math.ceil(excess), math.ceil(TAKE_BACK_AT_MOST * sessions)))
        if self._taken_in_overrun:
            n = least
        self._taken_in_overrun = True
        self.figures.taken_back += n
        return n

    def observe_queues(self, served: int, late: int, sessions: int, now: float) -> int | None:
        """Take in a measuring period's batch items (``served``; ``late`` of them taken late or
        shed for their age) and answer how many of the ``sessions`` streaming, the oldest, to
        serve now (None: all); the newest wait (``realtime.relay.Reader.defer``).

        When the server falls behind (a burst, a slowed core), serving every session makes
        every one of them late, and their chunks are dropped as stale in turn: under a core
        1.4x slower for 4 s, 15-40 % of a half-second's chunks were on time, for every session
        alike. With the newest waiting, the oldest stay on time; a waiting session costs the
        event loop its reads, and its chunks go on, with their age, once there is room. Their
        number shrinks by :data:`FIRST_SHRINK` each period behind (a saturated server cannot
        measure how far past its capacity it is), and grows back by :data:`FIRST_GROW` of the
        sessions the first period with nothing late, twice that the next, and so on."""
        behind = (
            self.policy.enabled
            and served + late >= BEHIND_MIN_ITEMS
            and late > BEHIND_ITEMS * served
        )
        first = self.first
        dt = min(max(now - self._queues_at, 0.0), 1.0)
        self._queues_at = now
        self._waited = self._waited + dt if first is not None else max(self._waited - dt, 0.0)
        self._behind = self._behind + 1 if behind else max(self._behind - 1, 0)
        # Again at once while sessions waited lately: the slowdown is not over.
        engaged = first is not None or self._waited > 0 or self._behind >= ENGAGE_PERIODS
        if behind and engaged:
            floor = math.ceil(FIRST_AT_LEAST * sessions)
            shrunk = math.floor(
                FIRST_SHRINK * (sessions if first is None else min(first, sessions))
            )
            first = max(shrunk, floor)
            self._grow = FIRST_GROW
        elif first is not None and not late:
            first += math.ceil(self._grow * sessions)
            self._grow *= 2
        if first is not None and first >= sessions:
            first = None
        self.first = first
        self.waiting = 0 if first is None else sessions - first
        return first

    def take_back_deferred(self, sessions: int, now: float) -> int:
        """How many of the waiting sessions (:meth:`observe_queues`) to take back now (the
        newest), 0 unless sessions have waited ``take_back_seconds`` (less the time none has
        since: a server still slow lets them all go on now and then, and is behind again): the
        server slowed below what it admitted, and they would otherwise wait for as long as
        that lasts. At most :data:`TAKE_BACK_AT_MOST` of the ``sessions`` at once."""
        p, first = self.policy, self.first
        if first is None or not p.take_back_seconds or self._waited < p.take_back_seconds:
            return 0
        self._waited = 0.0
        n = min(sessions - first, math.ceil(TAKE_BACK_AT_MOST * sessions))
        if n <= 0:
            return 0
        self.figures.taken_back += n
        self.overrun = 0.0  # what the lateness window saw was theirs
        return n

    @property
    def load(self) -> float:
        """Smoothed share of the bottleneck in use: the event loop, or the cores the process may
        use (busy with it or anything else)."""
        return max(self._loop_share, self._cores_share)

    @property
    def _cores_share(self) -> float:
        busy = self._busy_share
        return self._cpu_share if busy is None else max(self._cpu_share, busy)

    @property
    def session_load(self) -> float:
        """The same, less what new connections cost (:data:`CONNECTION_COST`) and, on the
        cores, the price of small batches: what the sessions streaming use, and so what one of
        them costs."""
        cores = self._cores
        return max(
            self._loop_share - self.churn,
            self._cores_share - (self.churn + self.batching_slack) / cores,
            0.0,
        )

    @property
    def session_cost(self) -> float | None:
        """Share of the bottleneck one streaming session uses; None while unknown (idle)."""
        if self.session_load < IDLE_LOAD or self._streaming < 0.5:
            return None
        return self.session_load / self._streaming

    @property
    def capacity(self) -> float | None:
        """Sessions the server can carry within its target load (the least estimated over the
        last :data:`CAPACITY_HOLD_SECONDS`, and no more than the dearest cost near full of the
        last :data:`COST_MEMORY_SECONDS` leaves room for); None while unknown."""
        if not self._estimates:
            return None
        held = self._estimates[0][1]
        dear = self.remembered_cost
        return held if dear is None else min(held, self._room(dear))

    def _room(self, cost: float) -> float:
        """Sessions of ``cost`` each that fit in the target load, less the crowd's share."""
        return max(self.policy.target_load - self.churn, 0.0) / cost

    @property
    def remembered_cost(self) -> float | None:
        """The dearest a session cost near full over the last :data:`COST_MEMORY_SECONDS` (the
        least of each :data:`COST_SETTLE_SECONDS`); None if the load was not near full that
        long within them."""
        return self._dear[0][1] if self._dear else None

    def headroom(self, sessions: int) -> float | None:
        """Sessions that may still be admitted beside ``sessions``; None while unknown."""
        capacity = self.capacity
        return None if capacity is None else capacity - sessions

    def _lagging(self) -> bool:
        p = self.policy
        return self.lag * 1000.0 > p.max_lag_ms and self.load >= p.target_load / 2

    def _late(self) -> bool:
        p = self.policy
        share = self.late_share
        return share is not None and share > p.late_share and self.load >= p.target_load / 2

    def full(self, sessions: int) -> str | None:
        """Why a new session would be refused now (``behind``, ``lag``, ``late`` or ``load``),
        or None."""
        if not self.policy.enabled:
            return None
        if self.waiting:  # the newest sessions wait: a new one would, behind them
            return "behind"
        if self._lagging():
            return "lag"
        if self._late():
            return "late"
        capacity = self.capacity
        if capacity is not None and sessions + 1 > capacity:
            return "load"
        return None

    @property
    def crowd(self) -> bool:
        """Whether the server refuses a crowd: more than :data:`CALM_REFUSALS` a second, as
        smoothed, or at that rate already since the last measurement. A crowd that comes at
        once to a calm server is refused at the door from its second refusal on: by the next
        measurement, its first 50 ms had each cost a handshake and a hello (docs/scheduler.md)."""
        return (
            self.refusal_rate > CALM_REFUSALS or self._refusals > CALM_REFUSALS * self.policy.period
        )

    @property
    def retry_after_ms(self) -> float:
        """The wait to tell a refused client: the policy's, stretched in proportion while the
        server refuses more than :data:`CALM_REFUSALS` a second."""
        factor = min(max(1.0, self.refusal_rate / CALM_REFUSALS), MAX_RETRY_FACTOR)
        return round(self.policy.retry_after_ms * factor)

    # --- deciding ----------------------------------------------------------------------------

    def admit_session(self, sessions: int) -> errors.ServerBusy | None:
        """Whether one more session may start beside the ``sessions`` already admitted: None,
        or the typed refusal to send."""
        reason = self.full(sessions)
        if reason is None:
            self.figures.admitted["session"] += 1
            return None
        return self._refuse(reason, sessions)

    def _refuse(self, reason: str, sessions: int) -> errors.ServerBusy:
        self.figures.refused[reason] += 1
        self._refusals += 1
        capacity = self.capacity
        if reason == "lag":
            why = f"the event loop runs {1000 * self.lag:.0f} ms late"
        elif reason == "late":
            why = f"{100 * (self.late_share or 0):.1f} % of its results are late"
        elif reason == "behind":
            why = f"it is behind, and its {self.waiting} newest sessions wait"
        else:
            why = f"it carries {sessions} sessions of about {capacity or 0:.0f} it serves in time"
        return errors.ServerBusy(
            f"the server is full ({why}): try again later or elsewhere",
            retry_after_ms=self.retry_after_ms,
        )

    def admit_stream(self, model: str, stream: int) -> errors.ServerBusy | None:
        """Whether a stream on ``model`` may open: None, or the typed refusal to send."""
        p = self.policy
        reason = None
        if p.enabled:
            if self._lagging():
                reason = "lag"
            elif self._late():
                reason = "late"
            elif self._model_full.get(model, False):
                reason = "model_queue"
            elif self._model_load.get(model, 0.0) > p.target_load:
                reason = "model_busy"
        if reason is None:
            self.figures.admitted["stream"] += 1
            return None
        self.figures.refused[reason] += 1
        self._refusals += 1
        return errors.ServerBusy(
            f"model {model} is full ({reason}): try again later or elsewhere",
            retry_after_ms=self.retry_after_ms,
            stream=stream,
        )
