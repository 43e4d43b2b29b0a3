"""``python -m loadtest.overload``: admission control under overload (issue 16).

Measures the capacity without overload (the most real-time clients with >= 99 % of chunks
answered within 50 ms of their due time, every client admitted but late chunks still shed by
their age, :data:`CAPACITY_FLAGS`, for as long as a run lasts: up the
``--capacity-steps`` from the lowest, and down below it if that one does not hold), then offers
2x and 4x that many clients arriving over ``--ramp`` seconds, and a burst: the capacity, then 3x
more sessions arriving within 2 seconds (each streaming 2 s). Every client says hello at its
arrival and, if admitted, streams real-time chunks from its welcome on (raw client, latency from
each chunk's due time). A refused client tries again after the ``retry_after_ms`` it was told,
doubled at each refusal and jittered, as docs/protocol.md asks (``--no-retry``: it gives up).
Per run: clients admitted, refusals (how many at the handshake, how fast each came), the
admitted sessions' share of chunks within 50 ms and their percentiles, and a plot over time.
After each run the same clients, arriving at the same times, run against the baselines side by
side (``--baselines``, default the bare websockets echo server and the naive per-message server
of :mod:`loadtest.baselines`, which take every client): what the same load does to a server
without admission control, in the same hour, on the same plot.
After the runs the capacity is run once more, every client admitted (``--no-recheck``: not): on a
shared machine that slows under a long run, the capacity the checks compare with may no longer
hold, and the report says so beside them. With ``--fresh`` each run after the first offers a
multiple of the capacity searched again just before it, from the one before (up a step while a
step holds, down until one does), and is checked against that one; the report gives both.
This machine's speed moves by 15-20 % within an hour, and a capacity searched on a fast
stretch is one the server no longer has ten minutes later (session 21). But each search is
noisy too: a step at the edge passes two tries in one search and fails in the next, and
searching before every run gives it more chances to pass (session 22, docs/scheduler.md:
eleven ratio checks of 30 failed against the fresh capacities, ten against the first).
``--stall AT:MS`` stops the server for MS ms at AT seconds into each run (SIGSTOP, SIGCONT): a
noisy neighbour at a known time, to see what admission and shedding make of it.
``--slow AT:MS:FACTOR`` runs the server's core FACTOR times slower for MS ms from AT seconds into
each run (:func:`loadtest.hostprobe.slow`): the host's own fault, at a known time; with
``--slow-capacity`` the capacity runs are slowed so too, and the checks compare with the
capacity the server keeps through it.
``--host-probe`` runs :mod:`loadtest.hostprobe` on the server's core: the host's stops and slowed
spells are listed per run, shaded on its plot, and the share on time outside them is given
beside the check (session 29: every silero miss measured came with one).
Writes ``report.json``, ``summary.md`` and the plots to ``--out``.

    flock /work/bench.lock python -m loadtest.overload                   # speech_activity
    flock /work/bench.lock python -m loadtest.overload --kind vad        # silero VAD streams
    python -m loadtest.overload --kind vad --host-probe    # and the host's spells beside them
    python -m loadtest.overload --capacity-clients 80 --runs 2x,burst    # capacity known
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from loadtest import hostprobe, report
from loadtest.__main__ import (
    DEADLINE_MS,
    REPO,
    Setup,
    add_setup_flags,
    capacity,
    machine,
    run_target,
    server_figures,
    setup_from,
)
from loadtest.clients import OK, UNUSED, Records

#: A burst: this many times the capacity in more sessions, arriving within BURST_SECONDS.
BURST_FACTOR = 3
BURST_SECONDS = 2.0
#: What a refused client must have been told by (ms after its hello).
REFUSED_WITHIN_MS = 100.0
#: The server of the capacity runs: every client admitted, its live chunks still shed by their
#: age when it falls behind, as the admitted sessions' are in the overload runs. With the
#: shedding off too (before session 35), a host's spell left a backlog that was never shed:
#: on a jumpy hour the capacity searched was what held through the spells (speech_activity 100
#: clients twice, where 150 held with the shedding; silero 100 where 150 held, once), while the
#: overload runs' admitted sessions were on time at twice that.
CAPACITY_FLAGS = ("--admit-load", "0", "--shed-by-age", "on")


def admission_summary(rec: Records, base: np.ndarray[Any, Any] | None = None) -> dict[str, Any]:
    """Admitted and refused clients, how fast refusals came, and the admitted sessions'
    latency from due time (``base``: the clients that form the steady load, for a burst)."""
    admitted = rec.admitted
    refused = ~admitted & ~np.isnan(rec.hello_ms)
    rows = admitted if base is None else admitted & base
    used = (rec.outcome != UNUSED) & rows[:, None]
    ok = (rec.outcome == OK) & used
    sent = used & ~np.isnan(rec.sent)
    latency = (rec.received - rec.due) * 1000.0
    lat_ok = latency[ok]
    offered = int(used.sum())
    errors = {
        code: int(((rec.outcome == j) & used).sum()) for j, code in enumerate(rec.codes, start=1)
    }
    refused_ms = np.asarray(rec.refusal_ms)
    return {
        "clients": len(rec.kinds),
        "admitted": int(admitted.sum()),
        "admitted_after_refusal": int((admitted & (rec.refusals > 0)).sum()),
        # Ended server_busy after they were admitted (the server fell behind): their chunks in
        # flight count as failed (``taken_back``), those after it as never due.
        "taken_back": int((rec.taken_back & rows).sum()),
        "refused": int(refused.sum()),
        "refusals": len(rec.refusal_ms),
        "refusals_by_code": dict(rec.refused_codes),
        "refusals_at_handshake": rec.handshake_refusals,
        "refusal_ms": {
            "p50": round(float(np.percentile(refused_ms, 50)), 1) if refused_ms.size else None,
            "p99": round(float(np.percentile(refused_ms, 99)), 1) if refused_ms.size else None,
            "max": round(float(refused_ms.max()), 1) if refused_ms.size else None,
        },
        "refusals_over_100ms": int((refused_ms > REFUSED_WITHIN_MS).sum()),
        "refused_within_100ms": round(
            float((refused_ms <= REFUSED_WITHIN_MS).mean()) if refused_ms.size else 1.0, 4
        ),
        "admitted_chunks": offered,
        "admitted_within_50ms": round(float((lat_ok <= report.BAR_MS).sum()) / max(offered, 1), 4),
        "admitted_latency_ms": report.percentiles(lat_ok),
        # The same p99 with every chunk not answered by a result (shed, dropped for a newer
        # one, refused, lost) counted as never answered; None: more than 1 % of them were.
        "admitted_p99_all_ms": p99_all(latency[used], ok[used]),
        # How late the load client itself sent them: a late second that shows here too is the
        # client's (or the machine's), not the server's.
        "admitted_send_lag_ms": report.percentiles(((rec.sent - rec.due) * 1000.0)[sent]),
        "admitted_lost": int(((rec.outcome == -1) & used).sum()),
        "admitted_errors": {k: v for k, v in errors.items() if v and not k.startswith("refused")},
    }


def p99_all(latency: np.ndarray[Any, Any], ok: np.ndarray[Any, Any]) -> float | None:
    """The 99th percentile of ``latency`` (ms), a chunk not ``ok`` counted as infinitely late:
    one of the chunks' own figures (no interpolation), None if it is one not answered."""
    if not latency.size:
        return None
    p99 = float(np.percentile(np.where(ok, latency, np.inf), 99, method="higher"))
    return round(p99, 2) if math.isfinite(p99) else None


#: Seconds after a host's stop or slowed spell still set apart: a backlog takes this long to
#: drain with a tenth of the core spare (session 29: 200-250 ms after a 300 ms spell).
HOST_DRAIN_SECONDS = 0.5


def on_time(rec: Records) -> np.ndarray[Any, Any]:
    """Per client and chunk, whether a result answered it within 50 ms of its due time."""
    return (rec.outcome == OK) & ((rec.received - rec.due) * 1000.0 <= report.BAR_MS)


def outside_host_spells(rec: Records, host: dict[str, Any]) -> dict[str, Any]:
    """The admitted sessions' share of chunks within 50 ms, leaving out those due during the
    host probe's stops and slowed spells (``host``: its summaries by CPU) or up to
    :data:`HOST_DRAIN_SECONDS` after one: a figure beside the check, to tell the host's misses
    from the server's, never in its place."""
    used = (rec.outcome != UNUSED) & rec.admitted[:, None]
    near = np.zeros_like(used)
    for summary in host.values():
        for begin, end in hostprobe.spells(summary):
            near |= (rec.due >= begin) & (rec.due <= end + HOST_DRAIN_SECONDS)
    kept = used & ~near
    ok = kept & on_time(rec)
    n = int(kept.sum())
    return {
        "chunks": n,
        "set_apart": int((used & near).sum()),
        "within_50ms": round(float(ok.sum()) / max(n, 1), 4),
    }


#: Seconds of each step of a run's figures over time (the plot's, and ``over_time``).
STEP_SECONDS = 0.5


def on_time_over_time(
    rec: Records, cpu: list[tuple[float, float]] | None = None
) -> dict[str, list[Any]]:
    """The admitted chunks by due time, per :data:`STEP_SECONDS` from the first hello: each
    step's end (``t``, seconds), how many were due (``due``) and the share of them answered
    within 50 ms (``within_50ms``; None where none was). In the report beside the plot, so that
    a miss can be placed in its run (the ramp, a spell, the end) from the figures alone.

    Given the server's CPU samples (``cpu``: (monotonic seconds, CPU seconds so far), on the
    records' clock), also the cores it used in each step (``server_cores``) and its CPU per
    admitted chunk due then (``cpu_us_per_due``, µs; None where none was, or not sampled). With
    the load steady, a step whose chunks cost more CPU ran on a slower host: the outside view of
    a spell that the host probe's small work does not see (docs/scheduler.md, session 38). While
    the core is saturated the figure is only a floor."""
    series: dict[str, list[Any]] = {"t": [], "due": [], "within_50ms": []}
    if cpu is not None:
        series |= {"server_cores": [], "cpu_us_per_due": []}
    if not rec.hello_at.size or np.isnan(rec.hello_at).all():
        return series
    t0 = float(np.nanmin(rec.hello_at))
    used = rec.outcome != UNUSED
    due = rec.due[used] - t0
    ontime = on_time(rec)[used]
    end = float(np.nanmax(due)) + STEP_SECONDS if due.size else 2 * STEP_SECONDS
    edges = np.arange(0.0, end, STEP_SECONDS)
    total, _ = np.histogram(due, edges)
    good, _ = np.histogram(due[ontime], edges)
    series["t"] = [round(float(e), 2) for e in edges[1:]]
    series["due"] = [int(n) for n in total]
    series["within_50ms"] = [
        round(int(g) / int(n), 4) if n else None for g, n in zip(good, total, strict=True)
    ]
    if cpu is not None:
        at = np.array([t for t, _ in cpu] or [np.nan]) - t0
        spent = np.diff(np.interp(edges, at, [c for _, c in cpu] or [0.0]))
        sampled = (edges[:-1] >= at[0]) & (edges[1:] <= at[-1])  # never, with no samples
        series["server_cores"] = [
            round(float(c) / STEP_SECONDS, 3) if ok else None
            for c, ok in zip(spent, sampled, strict=True)
        ]
        series["cpu_us_per_due"] = [
            round(1e6 * float(c) / int(n), 1) if ok and n else None
            for c, n, ok in zip(spent, total, sampled, strict=True)
        ]
    return series


#: A step whose server used this share of a core or more was saturated: its CPU per chunk due
#: is a floor, not what the chunks cost.
SATURATED_CORES = 0.95


def cpu_spread(series: dict[str, list[Any]], after: float) -> dict[str, Any] | None:
    """The server's CPU per chunk due over the steps of ``series`` (:func:`on_time_over_time`,
    with the server's CPU) that end past ``after`` seconds, the run's last step left out (the
    clients stop in it): the least, the median and the most (µs), and how many steps were
    saturated (:data:`SATURATED_CORES`); None without such steps."""
    if "cpu_us_per_due" not in series:
        return None
    steps = [
        (us, cores)
        for t, us, cores in zip(
            series["t"][:-1],
            series["cpu_us_per_due"][:-1],
            series["server_cores"][:-1],
            strict=True,
        )
        if t > after and us is not None
    ]
    if not steps:
        return None
    costs = sorted(us for us, _ in steps)
    return {
        "least": costs[0],
        "median": costs[len(costs) // 2],
        "most": costs[-1],
        "steps": len(steps),
        "saturated": sum(cores >= SATURATED_CORES for _, cores in steps),
    }


def worst_step(series: dict[str, list[Any]]) -> tuple[float, float] | None:
    """The step of ``series`` (:func:`on_time_over_time`) with the least share on time: (its
    end, the share); None if no chunk was due."""
    shares = [
        (s, t) for t, s in zip(series["t"], series["within_50ms"], strict=True) if s is not None
    ]
    if not shares:
        return None
    share, at = min(shares)
    return at, share


def plot_over_time(
    rec: Records,
    series: dict[str, list[Any]],
    out: Path,
    name: str,
    title: str,
    host: dict[str, Any] | None = None,
    baselines: dict[str, dict[str, list[Any]]] | None = None,
) -> str:
    """Sessions admitted and refusals (by hello time) and the share of due chunks answered
    within 50 ms, per 0.5 s (``series``: :func:`on_time_over_time`), with the host probe's stops
    and slowed spells shaded (``host``: its summaries by CPU) and the same share for each
    baseline run on the same clients (``baselines``: their :func:`on_time_over_time`); below,
    the server's cores and CPU per chunk due, where sampled; the file written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = float(np.nanmin(rec.hello_at))
    sampled = "server_cores" in series
    fig, (top, bottom, *cpu) = plt.subplots(
        3 if sampled else 2,
        1,
        figsize=(8, 7.5 if sampled else 5.5),
        sharex=True,
        height_ratios=(1.0, 1.0, 0.7) if sampled else None,
    )
    for label, at, color in (
        ("admitted", rec.hello_at[rec.admitted], "tab:green"),
        ("refusals", np.asarray(rec.refusal_at), "tab:red"),
    ):
        times = np.sort(at - t0)
        top.step(times, np.arange(1, times.size + 1), where="post", label=label, color=color)
    top.set(ylabel="sessions (cumulative)", title=title)
    top.legend(fontsize=8)
    ends = np.asarray(series["t"])
    share = np.array([np.nan if s is None else s for s in series["within_50ms"]])
    total = np.asarray(series["due"])
    bottom.plot(ends, 100 * share, color="tab:blue", label="admitted chunks within 50 ms")
    colors = ("tab:gray", "tab:brown", "tab:olive")
    for k, (target, other) in enumerate((baselines or {}).items()):
        other_share = [np.nan if x is None else 100 * x for x in other["within_50ms"]]
        bottom.plot(
            other["t"],
            other_share,
            color=colors[k % len(colors)],
            linestyle="--",
            label=f"{target}, the same clients, no admission",
        )
    bottom.axhline(99, color="grey", linewidth=0.8, linestyle=":", label="99 %")
    for k, (begin, end) in enumerate(
        spell for summary in (host or {}).values() for spell in hostprobe.spells(summary)
    ):
        bottom.axvspan(
            begin - t0,
            max(end - t0, begin - t0 + 0.05),  # a stop of a few ms still shows
            color="tab:red",
            alpha=0.25,
            label="host slowed or stopped the server's core" if k == 0 else None,
        )
    bottom.set(ylabel="% on time", ylim=(0, 101))
    twin = bottom.twinx()
    twin.plot(ends, total / STEP_SECONDS, color="tab:orange", linewidth=0.8, label="chunks due/s")
    twin.set_ylabel("chunks due per second")
    bottom.legend(fontsize=8, loc="lower left")
    twin.legend(fontsize=8, loc="lower right")
    (cpu[0] if cpu else bottom).set(xlabel="time since the first hello (s)")
    if cpu:
        _plot_cpu(cpu[0], series, baselines or {}, ("tab:blue", *colors))
    return report.save_plot(fig, out, f"overload_{name}.png")


def _plot_cpu(
    ax: Any, series: dict[str, list[Any]], baselines: dict[str, dict[str, list[Any]]], colors: Any
) -> None:
    """The server's cores over a run, each baseline's beside it, and its CPU per chunk due."""
    for k, (target, x) in enumerate([("realtime", series), *baselines.items()]):
        if "server_cores" in x:
            ax.plot(
                x["t"],
                [np.nan if c is None else c for c in x["server_cores"]],
                color=colors[k % len(colors)],
                linestyle="--" if k else "-",
                label=target,
            )
    ax.axhline(SATURATED_CORES, color="grey", linewidth=0.8, linestyle=":")
    ax.set(ylabel="server CPU (cores)", ylim=(0, 1.1))
    ax.legend(fontsize=8, loc="lower left")
    per = ax.twinx()
    per.plot(
        series["t"],
        [np.nan if us is None else us for us in series["cpu_us_per_due"]],
        color="tab:purple",
        linewidth=0.8,
        label="realtime's CPU per chunk due",
    )
    per.set_ylabel("µs per chunk due")
    per.legend(fontsize=8, loc="lower right")


def capacity_near(
    kind: str, steps: list[int], near: int, seconds: float, setup: Setup, tries: int
) -> dict[str, Any]:
    """The capacity searched from ``near``: up the ``steps`` while a step holds (every one of
    its ``tries``), else down until one does, below the lowest step too, by the first two
    steps' spacing: a hiccup in the lowest step's runs no longer leaves nothing to overload
    (session 27); 0 if none does."""
    given = sorted(set(steps))
    gap = given[1] - given[0] if len(given) > 1 else max(given[0] // 2, 1)
    steps = sorted({*range(given[0] - gap, 0, -gap), *given, near})
    rows: list[dict[str, Any]] = []

    def holds(n: int) -> bool:
        found = capacity(["realtime"], kind, [n], seconds, setup, tries)["targets"]["realtime"]
        rows.extend(found["steps"])
        return bool(found["clients"] == n)

    i, best = steps.index(near), 0
    if holds(near):
        best = near
        while i + 1 < len(steps) and holds(steps[i + 1]):
            i += 1
            best = steps[i]
    else:
        while i > 0 and not best:
            i -= 1
            best = steps[i] if holds(steps[i]) else 0
    return {"clients": best, "steps": rows}


def ramp(n: int, start: float, seconds: float) -> list[float]:
    """Arrival offsets of ``n`` clients spread evenly over ``seconds`` from ``start``."""
    return [start + seconds * i / max(n, 1) for i in range(n)]


@dataclasses.dataclass(frozen=True)
class Scenario:
    """Who arrives when in one overload run, and for how long each streams."""

    kinds: list[str]
    arrivals: list[float]
    streams: list[float] | None  # seconds each streams (None: to the end)
    base: np.ndarray[Any, Any] | None  # the steady clients of a burst


def scenario(name: str, kind: str, capacity_clients: int, args: argparse.Namespace) -> Scenario:
    """``2x``/``4x`` the capacity arriving over the ramp, or ``burst``."""
    if name == "burst":
        burst = BURST_FACTOR * capacity_clients
        return Scenario(
            [kind] * (capacity_clients + burst),
            ramp(capacity_clients, 0.0, args.ramp) + ramp(burst, args.burst_at, BURST_SECONDS),
            [args.seconds] * capacity_clients + [BURST_SECONDS] * burst,
            np.array([True] * capacity_clients + [False] * burst),
        )
    n = round(float(name.rstrip("x")) * capacity_clients)
    return Scenario([kind] * n, ramp(n, 0.0, args.ramp), None, None)


def run_plan(
    target: str, plan: Scenario, args: argparse.Namespace, setup: Setup
) -> tuple[Records, dict[str, Any]]:
    """Run one scenario against ``target``: its records and the server's figures. The server's
    CPU counts from the end of the ramp: the sessions and the crowd still knocking (and the
    burst), not the handshakes of the ones admitted. Counted in, they made a session look 5-8 %
    dearer than in the capacity runs, whose clients all connect before the window."""
    return run_target(
        target,
        plan.kinds,
        args.seconds,
        setup,
        plan.arrivals,
        plan.streams,
        args.retry and target == "realtime",
        args.ramp + 1.0,
    )


#: What a baseline's run reports (:func:`run_baseline`), of :func:`admission_summary`'s figures.
BASELINE_FIGURES = (
    "clients",
    "admitted",
    "admitted_chunks",
    "admitted_within_50ms",
    "admitted_latency_ms",
    "admitted_p99_all_ms",
    "admitted_send_lag_ms",
    "admitted_lost",
    "admitted_errors",
)


def server_summary(server: dict[str, Any]) -> dict[str, Any]:
    """The server's figures for a run's report: no raw samples, no series of its own (the
    run's ``over_time`` places its CPU)."""
    return {k: v for k, v in server_figures(server).items() if k != "series"}


def run_baseline(
    target: str, plan: Scenario, args: argparse.Namespace, setup: Setup
) -> dict[str, Any]:
    """The same run against a baseline (``echo``, ``naive``: loadtest.baselines), side by side:
    what a server without admission control does with the same clients arriving at the same
    times, in the same hour. It takes every client (``admitted``: connected); for a burst, the
    figures are of its steady clients, as the burst's check is."""
    rec, server = run_plan(target, plan, args, setup)
    found = admission_summary(rec, plan.base)
    summary = {k: found[k] for k in BASELINE_FIGURES}
    if plan.base is not None:
        summary["admitted"] = int((rec.admitted & plan.base).sum())
    summary["over_time"] = on_time_over_time(rec, server.get("cpu_samples"))
    summary["server"] = server_summary(server)
    if server.get("host"):
        summary["outside_host_spells"] = outside_host_spells(rec, server["host"])
    lat = summary["admitted_latency_ms"]
    print(
        f"{target} {plan.kinds[0]}, the same clients: {summary['admitted']} connected, "
        f"{100 * summary['admitted_within_50ms']:.2f}% within 50 ms, p50 {lat['p50']} p99 "
        f"{lat['p99']} ms, lost {summary['admitted_lost']}, errors {summary['admitted_errors']}",
        flush=True,
    )
    return summary


def run_scenario(
    name: str, kind: str, capacity_clients: int, args: argparse.Namespace, setup: Setup
) -> tuple[Records, dict[str, Any]]:
    """One overload run: ``2x``/``4x`` the capacity arriving over the ramp, or ``burst``."""
    plan = scenario(name, kind, capacity_clients, args)
    kinds, base = plan.kinds, plan.base
    rec, server = run_plan("realtime", plan, args, setup)
    summary = {
        "offered_clients": len(kinds),
        **admission_summary(rec),
        "server": server_summary(server),
        "over_time": on_time_over_time(rec, server.get("cpu_samples")),
    }
    if server.get("host"):
        summary["outside_host_spells"] = outside_host_spells(rec, server["host"])
    if base is not None:
        steady = admission_summary(rec, base)
        summary["base"] = {
            k: steady[k]
            for k in (
                "admitted",
                "taken_back",
                "admitted_chunks",
                "admitted_within_50ms",
                "admitted_latency_ms",
                "admitted_p99_all_ms",
                "admitted_lost",
                "admitted_errors",
            )
        }
        summary["base"]["admitted"] = int((rec.admitted & base).sum())
        summary["burst_admitted"] = int((rec.admitted & ~base).sum())
    lat = summary["admitted_latency_ms"]
    worst = worst_step(summary["over_time"])
    print(
        f"{kind} {name}: {len(kinds)} clients, admitted {summary['admitted']} "
        f"({summary['admitted_after_refusal']} after a refusal, {summary['taken_back']} taken "
        f"back), {summary['refusals']} refusals "
        f"({summary['refusals_at_handshake']} at the handshake, p99 "
        f"{summary['refusal_ms']['p99']} max {summary['refusal_ms']['max']} ms after hello, "
        f"{summary['refusals_over_100ms']} over 100 ms), admitted "
        f"{100 * summary['admitted_within_50ms']:.2f}% within 50 ms, p50 {lat['p50']} p99 "
        f"{lat['p99']} ms ({_shed_p99(summary)} with shed chunks), lost "
        f"{summary['admitted_lost']}, errors {summary['admitted_errors']}, "
        f"sent late by the client max {summary['admitted_send_lag_ms']['max']} ms"
        + (
            f"; worst {STEP_SECONDS:g} s: {100 * worst[1]:.1f}% within 50 ms, to {worst[0]:g} s"
            if worst
            else ""
        )
        + "".join(
            f"; host probe, cpu {cpu}: {hostprobe.describe(h)}"
            for cpu, h in server.get("host", {}).items()
        ),
        flush=True,
    )
    return rec, summary


def checks(result: dict[str, Any]) -> dict[str, bool]:
    """What issue 16 asks, per run: true or false."""
    found: dict[str, bool] = {}
    for name, r in result["runs"].items():
        cap = r.get("capacity_clients", result["capacity_clients"])
        if not cap:
            found[f"{name}: a capacity held before the run"] = False
            continue
        if name == "burst":
            b = r["base"]
            # The steady clients admitted are kept: none taken back, every chunk of theirs
            # answered. A chunk the server shed while it was behind (issue 16's loop-level
            # shedding: `overloaded`, `deadline_exceeded`, `dropped` for a newer chunk) got its
            # typed error; it counts as never answered in the p99, which holds only if fewer
            # than 1 % were. How many were admitted is judged as in the other runs.
            held = b["admitted"] - b.get("taken_back", 0)
            found["burst: no admitted session dropped"] = b["admitted_lost"] == 0 and not b.get(
                "taken_back"
            )
            found["burst: steady clients admitted >= 90 % of capacity"] = held >= 0.9 * cap
            p99 = r["admitted_p99_all_ms"]
            found["burst: admitted p99 under the deadline, a shed chunk never answered"] = (
                p99 is not None and p99 < DEADLINE_MS
            )
        else:
            found[f"{name}: admitted >= 99 % within 50 ms"] = r["admitted_within_50ms"] >= 0.99
            # Sessions taken back do not count: the server did not keep them.
            held = r["admitted"] - r.get("taken_back", 0)
            found[f"{name}: admitted >= 90 % of capacity"] = held >= 0.9 * cap
        found[f"{name}: every refusal within 100 ms"] = r["refused_within_100ms"] == 1.0
    return found


def _shed_p99(r: dict[str, Any]) -> str:
    """A run's p99 with every chunk not answered by a result counted as never answered."""
    if "admitted_p99_all_ms" not in r:
        return "-"  # a run recorded before it was
    p99 = r["admitted_p99_all_ms"]
    return "over 1 % not answered" if p99 is None else f"{p99}"


def _baseline_row(name: str, target: str, x: dict[str, Any]) -> str:
    """A baseline's row in the summary's table (:func:`run_baseline`)."""
    lat = x["admitted_latency_ms"]
    burst = name == "burst"
    who = f"its {x['admitted']} steady clients" if burst else "every client"
    return (
        f"| {name}: {target}, no admission ({who}) | | {'' if burst else x['clients']} "
        f"| {x['admitted']} | | | | {100 * x['admitted_within_50ms']:.2f}% | {lat['p50']} | "
        f"{lat['p99']} ({_shed_p99(x)}) | {lat['max']} | {x['admitted_lost']} | "
        + (", ".join(f"{k} {v}" for k, v in x["admitted_errors"].items()) or "0")
        + f" | {x['admitted_send_lag_ms']['max']} |"
    )


def markdown(result: dict[str, Any]) -> str:
    """The summary a person reads first."""
    m = result["machine"]
    lines = [
        f"# Overload: {result['kind']} (capacity first searched: "
        f"{result['capacity_clients']} clients)",
        "",
        f"`{result['command']}` on {m['cores']} cores, load average before "
        f"{', '.join(f'{x:.1f}' for x in m['load_average_before'])}, after "
        f"{', '.join(f'{x:.1f}' for x in m['load_average_after'])}; "
        f"{result['seconds']} s per run, arrivals over {result['ramp']} s; a client refused "
        + (
            "`server_busy` tries again after `retry_after_ms`, doubled at each refusal, "
            "times 0.5-1.5."
            if result["retry"]
            else "gives up."
        )
        + "".join(
            f" The server was stopped for {ms:g} ms at {at:g} s into each run."
            for at, ms in result.get("stalls", ())
        )
        + "".join(
            f" From {at:g} s into each run, for {n:g} s, the server was stopped {100 * x:g} % of "
            "every 100 ms (throttled)."
            for at, n, x in result.get("throttles", ())
        )
        + "".join(
            f" From {at:g} s into each run, for {ms:g} ms, the server's core ran {x:g}x slower "
            "(--slow)."
            for at, ms, x in result.get("slows", ())
        )
        + (" The capacity runs were slowed so too." if result.get("slow_capacity") else ""),
        "",
        "| run | capacity before it | clients | admitted | of them after a refusal | refusals "
        "| refusal max (ms) | admitted within 50 ms | p50 | p99 (with shed chunks) | max (ms) "
        "| lost | errors "
        "| sent late by the client, max (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    first = result["capacity_clients"]
    for name, r in result["runs"].items():
        cap = r.get("capacity_clients", first)
        if "admitted" not in r:
            lines.append(f"| {name} | none held: not run |" + " |" * 12)
            continue
        lat = r["admitted_latency_ms"]
        share = f"{100 * r['admitted'] / cap:.0f} %"
        if cap != first:  # searched again before this run (--fresh)
            share += f"; {100 * r['admitted'] / first:.0f} % of {first}"
        if r.get("taken_back"):
            share += f"; {r['taken_back']} taken back"
        lines.append(
            f"| {name} | {cap} | {r['offered_clients']} | {r['admitted']} ({share}) "
            f"| {r['admitted_after_refusal']} "
            f"| {r['refusals']} ({r.get('refusals_at_handshake', 0)} at the handshake) | "
            f"{r['refusal_ms']['max']} | {100 * r['admitted_within_50ms']:.2f}% | {lat['p50']} | "
            f"{lat['p99']} ({_shed_p99(r)}) | {lat['max']} | {r['admitted_lost']} | "
            + (", ".join(f"{k} {v}" for k, v in r["admitted_errors"].items()) or "0")
            + f" | {r.get('admitted_send_lag_ms', {}).get('max')} |"
        )
        if "base" in r:
            b = r["base"]
            lines.append(
                f"| burst: the {b['admitted']} admitted first | | | | | | | "
                f"{100 * b['admitted_within_50ms']:.2f}% | {b['admitted_latency_ms']['p50']} | "
                f"{b['admitted_latency_ms']['p99']} ({_shed_p99(b)}) | "
                f"{b['admitted_latency_ms']['max']} | "
                f"{b['admitted_lost']} | "
                + (", ".join(f"{k} {v}" for k, v in b["admitted_errors"].items()) or "0")
                + " | |"
            )
        for target, x in r.get("baselines", {}).items():
            lines.append(_baseline_row(name, target, x))
    if result.get("baselines"):
        lines += [
            "",
            "The rows without admission ran the same clients, arriving at the same times, "
            f"against {' and '.join(result['baselines'])} (loadtest.baselines: the bare "
            "websockets echo server, and a per-message server running the same model on the "
            "event loop), each after the run above it: what the same load does to a server "
            "that takes every client.",
        ]
    # Each run, then each baseline's run beside it.
    runs: list[tuple[str, dict[str, Any]]] = []
    for name, r in result["runs"].items():
        runs.append((name, r))
        runs += [(f"{name}, {b}", x) for b, x in r.get("baselines", {}).items()]
    probed = [
        (name, cpu, h) for name, r in runs for cpu, h in r.get("server", {}).get("host", {}).items()
    ]
    if probed:
        lines += ["", "The host probe on the server's cores (seconds into each run):", ""]
        lines += [f"- {name}, cpu {cpu}: {hostprobe.describe(h)}" for name, cpu, h in probed]
        lines += [
            f"- {name}: {100 * o['within_50ms']:.2f} % within 50 ms of the admitted chunks not "
            f"due during those or {HOST_DRAIN_SECONDS:g} s after ({o['set_apart']} set apart, "
            f"{o['chunks']} left)"
            for name, r in runs
            if (o := r.get("outside_host_spells")) is not None
        ]
    spreads = [
        (name, c)
        for name, r in runs
        if (c := cpu_spread(r.get("over_time", {}), result["ramp"] + STEP_SECONDS)) is not None
    ]
    if spreads:
        lines += [
            "",
            f"The server's CPU per admitted chunk due, per {STEP_SECONDS:g} s once the arrivals "
            "are over (the load then holds: a dearer step ran on a slower host, or the server "
            "did more for its chunks; while its core is saturated, a floor):",
            "",
        ]
        lines += [
            f"- {name}: least {c['least']:g}, median {c['median']:g}, most {c['most']:g} µs"
            # /proc counts in 10 ms ticks: a lightly loaded step can read no CPU at all.
            + (f" ({c['most'] / c['least']:.2f}x)" if c["least"] else "")
            + f"; {c['saturated']} of {c['steps']} steps at "
            f"{SATURATED_CORES:g} of a core or more"
            for name, c in spreads
        ]
    lines += ["", "Checks:", ""]
    lines += [f"- {'yes' if ok else '**no**'}: {what}" for what, ok in result["checks"].items()]
    after = result.get("capacity_after")
    if after is not None:
        held = (
            "held"
            if after["ok"]
            else "**no longer held**: the machine slowed under the runs, and the checks above "
            "compare with a capacity it no longer had"
        )
        lines += [
            "",
            f"The capacity run once more after the runs, every client admitted: {after['clients']} "
            f"clients, {100 * after['within_50ms']:.1f}% within 50 ms, p99 {after['p99_ms']} ms: "
            f"{held}.",
        ]
    lines += ["", "Plots: " + ", ".join(f"[{f}]({f})" for f in result["plots"])]
    return "\n".join(lines) + "\n"


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of the runs themselves (shared with ``python -m loadtest.admit_sweep``)."""
    parser.add_argument("--runs", default="2x,4x,burst")
    parser.add_argument("--seconds", type=float, default=14.0, help="length of each run")
    parser.add_argument("--ramp", type=float, default=4.0, help="seconds over which clients arrive")
    parser.add_argument("--burst-at", type=float, default=7.0, help="seconds to the burst")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.overload", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--kind", default="audio", help="audio (speech_activity) or vad (silero)")
    parser.add_argument(
        "--capacity-clients", type=int, help="the capacity, if known (else it is searched)"
    )
    parser.add_argument(
        "--capacity-steps",
        default="50,60,70,80,90,100,110,120,140,160,180,200",
        help="clients per capacity step, searched up from the lowest (and below it, by the "
        "first two steps' spacing, if the lowest does not hold)",
    )
    parser.add_argument(
        "--capacity-seconds",
        type=float,
        help="length of each capacity run (default: --seconds, the runs' own length: a step "
        "at the edge held 8 s and then collapsed, so the runs were checked against a capacity "
        "the server had only for a moment)",
    )
    parser.add_argument(
        "--capacity-tries",
        dest="tries",
        type=int,
        default=1,
        help="runs per capacity step; every one must hold",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="search the capacity again, from the one before, before each run after the first, "
        "and check the run against it (default: every run against the first search's)",
    )
    add_run_flags(parser)
    parser.add_argument(
        "--no-recheck",
        dest="recheck",
        action="store_false",
        help="do not run the capacity once more after the runs",
    )
    parser.add_argument(
        "--no-retry",
        dest="retry",
        action="store_false",
        help="a client refused server_busy gives up (default: it tries again after "
        "retry_after_ms, doubled at each refusal, jittered, as docs/protocol.md asks)",
    )
    parser.add_argument(
        "--stall",
        action="append",
        default=[],
        metavar="AT:MS",
        help="stop the server for MS ms at AT seconds into each run (SIGSTOP, SIGCONT: a noisy "
        "neighbour at a known time; not in the capacity runs; repeatable)",
    )
    parser.add_argument(
        "--throttle",
        action="append",
        default=[],
        metavar="AT:SECONDS:SHARE",
        help="from AT seconds into each run, for SECONDS, stop the server SHARE of every 100 ms "
        "(a cgroup's CPU quota: the host slows below what was admitted; not in the capacity "
        "runs; repeatable)",
    )
    parser.add_argument(
        "--slow",
        action="append",
        default=[],
        metavar="AT:MS:FACTOR",
        help="from AT seconds into each run, for MS ms, run the server's core FACTOR times "
        "slower (a spinner at real-time priority takes its share of every ms: as this host "
        "slows it; needs a pinned server and root; not in the capacity runs; repeatable)",
    )
    parser.add_argument(
        "--slow-capacity",
        action="store_true",
        help="--slow the capacity runs too: the capacity the checks compare with is then the "
        "one the server keeps through the same slowdown, as on a host that slows it so",
    )
    parser.add_argument(
        "--baselines",
        default="echo,naive",
        help="after each run, the same clients at the same times against these servers, side "
        "by side (loadtest.baselines; without admission control; '' for none)",
    )
    add_setup_flags(parser)
    parser.add_argument("--out", type=Path, default=REPO / "loadtest" / "results" / "overload")
    args = parser.parse_args()
    stalls = tuple((float(a), float(m)) for a, _, m in (s.partition(":") for s in args.stall))
    if args.capacity_seconds is None:
        args.capacity_seconds = args.seconds
    throttles = tuple(
        (float(a), float(n), float(x)) for a, n, x in (t.split(":") for t in args.throttle)
    )
    slows = tuple((float(a), float(m), float(x)) for a, m, x in (t.split(":") for t in args.slow))
    setup = dataclasses.replace(
        setup_from(args), settle_seconds=5.0, stalls=stalls, throttles=throttles, slows=slows
    )
    if slows and not setup.server_cpus:  # it slows the server's cores: there must be some
        parser.error("--slow needs the server pinned to its cores (not --server-cpus any)")
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "kind": args.kind,
        "command": "python -m " + " ".join(["loadtest.overload", *sys.argv[1:]]),
        "machine": machine(),
        "seconds": args.seconds,
        "ramp": args.ramp,
        "retry": args.retry,
        "deadline_ms": DEADLINE_MS,
        "stalls": stalls,
        "throttles": throttles,
        "slows": slows,
        "slow_capacity": bool(slows) and args.slow_capacity,
    }
    cap = args.capacity_clients
    # Without admission control: every client is taken (CAPACITY_FLAGS).
    off = dataclasses.replace(
        setup,
        server_args=(*setup.server_args, *CAPACITY_FLAGS),
        stalls=(),
        throttles=(),
        slows=setup.slows if args.slow_capacity else (),
    )
    steps = [int(s) for s in args.capacity_steps.split(",")]
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    result["baselines"] = baselines
    if cap is None:
        search = capacity_near(args.kind, steps, steps[0], args.capacity_seconds, off, args.tries)
        result["capacity_search"] = search
        cap = search["clients"]
        if not cap:
            sys.exit(f"no capacity found at or below {steps[0]} clients: nothing to overload")
    result["capacity_clients"] = cap
    result["runs"], result["plots"] = {}, []
    fresh = args.fresh and "capacity_search" in result
    for k, name in enumerate(r.strip() for r in args.runs.split(",") if r.strip()):
        if fresh and k:  # the capacity now, from the one before
            near = capacity_near(args.kind, steps, cap, args.capacity_seconds, off, args.tries)
            print(f"capacity before {name}: {near['clients']} (was {cap})", flush=True)
            if not near["clients"]:
                result["runs"][name] = {"capacity_clients": 0, "capacity_search": near["steps"]}
                continue
            cap = near["clients"]
        rec, summary = run_scenario(name, args.kind, cap, args, setup)
        summary["capacity_clients"] = cap
        if fresh and k:
            summary["capacity_search"] = near["steps"]
        plan = scenario(name, args.kind, cap, args)
        summary["baselines"] = {b: run_baseline(b, plan, args, setup) for b in baselines}
        result["runs"][name] = summary
        title = f"{args.kind}, {name}: {summary['offered_clients']} clients (capacity {cap})"
        host = summary["server"].get("host")
        others = {b: x["over_time"] for b, x in summary["baselines"].items()}
        result["plots"].append(
            plot_over_time(
                rec, summary["over_time"], args.out, f"{args.kind}_{name}", title, host, others
            )
        )
    if args.recheck and cap:  # did the capacity still hold after the runs?
        again = capacity(["realtime"], args.kind, [cap], args.capacity_seconds, off)
        step = again["targets"]["realtime"]["steps"][0]
        result["capacity_after"] = {k: step[k] for k in ("clients", "ok", "within_50ms", "p99_ms")}
    result["machine"]["load_average_after"] = os.getloadavg()
    result["checks"] = checks(result)
    report.write(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
