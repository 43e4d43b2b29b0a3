"""``python -m loadtest.hostprobe``: how the host treated the server's core during a run.

A run that misses its on-time bar for half a second may be the server's doing or the host's:
this machine is a VM, and its cores stop or slow with no trace in the guest (no steal time).
The probe is pinned to the server's core at real-time priority (``SCHED_FIFO``: it runs the
moment it wakes, ahead of the server), wakes every :data:`PERIOD` and times a fixed bit of work:

- a wake-up late by :data:`STOP_MS` or more is the core **stopped** (the hypervisor ran
  something else, or the kernel did, with interrupts off);
- the work taking on average :data:`SLOW_FACTOR` times its pace in the run's faster windows
  (:data:`BASE_PERCENTILE`) or more over a window of :data:`WINDOW` wake-ups is the core
  **slowed** (a busy sibling hyperthread, a hypervisor sharing it out). Not its median: in
  one of session 32's runs the host slowed the core for 6 s of a 9 s window (the server's CPU
  a chunk 53.5 µs against 42-43 in the runs beside it, 107 sessions taken back), and against
  the slowed median the probe saw nothing. On a steady busy core the tenth percentile of the
  windows is 0.99 of the median. Only while the server keeps the core busy: an idle core
  reads slow too (here 21 % of an idle minute's windows, up to 1.8x: the probe's short bursts
  then run on a core that was resting). On a busy one the work's pace is steady, and in
  session 29 a silero dip (0 % on time for 300 ms, 250 sessions at ~0.85 of the core) came
  with the work 1.35-1.97x slower for exactly those 300 ms, and no stop.

It costs the core ~0.5 % (~50 µs every 10 ms) and holds it off the server for 50 µs at a time.
Without the right to real-time priority (not root) it runs as it may, and says so: it then
waits behind the server too, and its figures are the server's as much as the host's.

It also makes such a spell, at a known time (:func:`slow`, ``--slow``): a spinner at the same
priority takes a share of every millisecond of the core, so that whatever else runs there runs
``factor`` times slower, as the host's spells slow it (session 30: ``--stall`` stops the server
outright, which is not what this host does to it).

    python -m loadtest.hostprobe --cpu 0 --seconds 20 --out probe.npz
    python -m loadtest.hostprobe --cpu 0 --seconds 0.2 --slow 1.5 --at 12345.6
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

#: Seconds between wake-ups.
PERIOD = 0.01
#: Seconds of work timed at each wake-up (calibrated at the start).
WORK_SECONDS = 50e-6
#: A wake-up this late (ms) is a stop.
STOP_MS = 2.0
#: Work this many times its pace in the faster windows, on average over a window, is a slowed
#: core.
SLOW_FACTOR = 1.3
#: Wake-ups per window (50 ms).
WINDOW = 5
#: The windows' pace the slowed ones are measured against: this percentile of their means.
BASE_PERCENTILE = 10
#: The most stops, and slowed spells, a summary lists (the longest first), and so the most the
#: figure outside them and the plot see: all of a run's on this machine (one of session 29's
#: burst runs had more than the 12 listed at first, 850 ms of spells in all).
LISTED = 100


def _work(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def probe(cpu: int, seconds: float) -> tuple[dict[str, np.ndarray[Any, Any]], bool]:
    """Run the probe on ``cpu`` for ``seconds``: the samples (``t``, monotonic seconds at each
    wake-up; ``late``, seconds it woke late; ``work``, seconds the work took) and whether it
    ran at real-time priority."""
    realtime = realtime_on(cpu)
    n = 64
    while True:  # calibrate: n iterations take about WORK_SECONDS
        t0 = time.perf_counter()
        _work(n)
        if time.perf_counter() - t0 >= WORK_SECONDS or n > 1 << 24:
            break
        n *= 2
    count = max(int(seconds / PERIOD), 1)
    t, late, work = np.zeros(count), np.zeros(count), np.zeros(count)
    due = time.monotonic() + PERIOD
    for i in range(count):
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        woke = time.monotonic()
        t0 = time.perf_counter()
        _work(n)
        work[i] = time.perf_counter() - t0
        t[i], late[i] = woke, max(woke - due, 0.0)
        due += PERIOD
        if due < time.monotonic():  # a stop longer than a period: start again from now
            due = time.monotonic() + PERIOD
    normal_priority(realtime)
    return {"t": t, "late": late, "work": work}, realtime


#: Seconds of a slowdown's cycle: it spins a share of each, and sleeps the rest.
SLOW_PERIOD = 0.001


def realtime_on(cpu: int) -> bool:
    """Pin this process to ``cpu`` at real-time priority (``SCHED_FIFO``); whether it may."""
    os.sched_setaffinity(0, {cpu})
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))
    except OSError:  # not allowed (not root): it runs as it may, and says so
        return False
    return True


def slow(cpu: int, at: float, seconds: float, factor: float) -> bool:
    """From ``at`` (monotonic seconds) for ``seconds``, slow whatever else runs on ``cpu``
    ``factor`` times: spin ``1 - 1 / factor`` of every :data:`SLOW_PERIOD` at real-time
    priority, sleep the rest. Whether it had real-time priority (without it, the kernel
    shares the core out and the slowdown is less than asked)."""
    realtime = realtime_on(cpu)
    spin = (1.0 - 1.0 / factor) * SLOW_PERIOD
    wait = at - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    clock = time.perf_counter
    end = clock() + seconds
    due = clock()
    while due < end:
        while clock() < due + spin:
            pass
        due += SLOW_PERIOD
        rest = due - clock()
        if rest > 0:
            time.sleep(rest)
    normal_priority(realtime)
    return realtime


def normal_priority(realtime: bool) -> None:
    """Leave real-time priority (if ``realtime``) once done, before anything else: saving the
    samples and the interpreter's exit took 13-14 ms, and at real-time priority on the server's
    core that was a stop of it (half a second after a run's last chunk was due: after its
    answers, unless they were late)."""
    if realtime:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def summarize(
    t: np.ndarray[Any, Any],
    late: np.ndarray[Any, Any],
    work: np.ndarray[Any, Any],
    start: float,
    realtime: bool = True,
    within: tuple[float, float] = (-math.inf, math.inf),
) -> dict[str, Any]:
    """What a report says of one probe: its stops, and its spells of windows slowed (merged
    when one follows another: start, length in ms, the work's mean over it as a multiple of
    its pace in the faster windows), at seconds after ``start`` (the run's start), the longest
    first. Slowed windows count only ``within`` those seconds: while the server is busy (see
    above). Stops count from the run's start to the end of ``within``: a stopped core stops a
    server that is not yet busy too (the ramp's first seconds, while clients arrive: session
    32 saw 20-55 % of a half-second's chunks on time there, and the probe did not look)."""
    since = t - start
    whole = (since >= min(0.0, within[0])) & (since <= within[1])
    keep = (since >= within[0]) & (since <= within[1])
    stop_at, stop_late = since[whole], late[whole] * 1000.0
    t, work = t[keep], work[keep]
    if not t.size:
        return {"samples": 0, "realtime": realtime}
    at = t - start
    median = max(float(np.median(work)), 1e-9)
    stops = np.flatnonzero(stop_late >= STOP_MS)
    n = t.size // WINDOW
    means = work[: n * WINDOW].reshape(n, WINDOW).mean(axis=1)
    base = max(float(np.percentile(means, BASE_PERCENTILE)), 1e-9) if n else median
    ratio = means / base
    window_ms = WINDOW * PERIOD * 1000.0
    spells: list[list[float]] = []  # [start, windows, sum of their ratios, last window]
    for w in map(int, np.flatnonzero(ratio >= SLOW_FACTOR)):
        if spells and w == spells[-1][3] + 1:
            spells[-1][1] += 1
            spells[-1][2] += float(ratio[w])
            spells[-1][3] = w
        else:
            spells.append([float(at[w * WINDOW]), 1, float(ratio[w]), w])
    spells.sort(key=lambda s: -s[1])
    return {
        "start": start,
        "samples": int(t.size),
        "realtime": realtime,
        "work_median_us": round(median * 1e6, 1),
        "work_base_us": round(base * 1e6, 1),
        "stops": len(stops),
        "stopped_ms": round(float(stop_late[stops].sum()), 1),
        "longest_stops": [
            [round(float(stop_at[i]), 2), round(float(stop_late[i]), 1)]
            for i in stops[np.argsort(-stop_late[stops])][:LISTED]
        ],
        "slowed_ms": round(sum(s[1] for s in spells) * window_ms),
        "longest_slowed": [
            [round(a, 2), round(k * window_ms), round(total / k, 2)]
            for a, k, total, _ in spells[:LISTED]
        ],
    }


def spells(summary: dict[str, Any]) -> list[tuple[float, float]]:
    """The listed stops and slowed spells of a summary, as (from, to) monotonic seconds."""
    start = summary.get("start", 0.0)
    out = [(start + at, start + at + ms / 1000.0) for at, ms in summary.get("longest_stops", ())]
    out += [
        (start + at, start + at + ms / 1000.0) for at, ms, _ in summary.get("longest_slowed", ())
    ]
    return out


def describe(summary: dict[str, Any]) -> str:
    """One line of a summary, for a person."""
    if not summary.get("samples"):
        return f"no samples ({summary.get('error', 'probe not run')})"
    stops = ", ".join(f"{ms:g} ms at {at:g} s" for at, ms in summary["longest_stops"][:3])
    slowed = ", ".join(
        f"{ms:g} ms at {at:g} s ({x:g}x)" for at, ms, x in summary["longest_slowed"][:3]
    )
    return (
        f"{summary['stops']} stops of {STOP_MS:g} ms or more ({summary['stopped_ms']:g} ms in "
        f"all{'; the longest: ' + stops if stops else ''}), slowed {SLOW_FACTOR:g}x or more "
        f"for {summary['slowed_ms']:g} ms in all"
        + (f" (the longest: {slowed})" if slowed else "")
        + (
            ""
            if summary["realtime"]
            else "; not at real-time priority: it waited behind the server too"
        )
    )


def load(
    path: Path, start: float, within: tuple[float, float] = (-math.inf, math.inf)
) -> dict[str, Any]:
    """The summary of a probe's file (see :func:`summarize`)."""
    with np.load(path) as d:
        return summarize(d["t"], d["late"], d["work"], start, bool(d["realtime"]), within)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.hostprobe", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--cpu", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, help="the samples (.npz); required unless --slow")
    parser.add_argument(
        "--slow",
        type=float,
        metavar="FACTOR",
        help="do not probe: slow the core FACTOR times for --seconds from --at",
    )
    parser.add_argument("--at", type=float, default=0.0, help="monotonic seconds (--slow)")
    args = parser.parse_args()
    if args.slow is not None:
        if args.slow <= 1:
            parser.error("--slow: a factor above 1 please")
        slow(args.cpu, args.at, args.seconds, args.slow)
        return
    if args.out is None:
        parser.error("--out is required")
    samples, realtime = probe(args.cpu, args.seconds)
    np.savez(
        args.out,
        realtime=np.array(realtime),
        t=samples["t"],
        late=samples["late"],
        work=samples["work"],
    )


if __name__ == "__main__":
    main()
