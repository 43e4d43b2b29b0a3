"""``python -m loadtest``: simulated clients against `realtime` and two baselines, side by side.

Starts each server itself on 127.0.0.1 (loopback only), pinned to the first CPU (the clients to
the others; ``--server-cpus any`` to let both float), drives it with N real-time clients from
the raw client (:mod:`loadtest.rawload`: one event loop, a hand-rolled WebSocket client, cheap;
``--client websockets`` for one websockets connection object per client), stops it, and writes
``report.json``, ``summary.md`` and PNG plots to ``--out``. Latency counts from each chunk's due
time. Per target: the share of chunks answered within 50 ms of due, percentiles, losses,
refusals, throughput, and the server's CPU per chunk answered (utime + stime from /proc over the
steady state). With ``--capacity`` it also steps the number of clients up, per target, until
fewer than 99 % are answered within 50 ms.

    python -m loadtest                                  # 100 audio clients, all three targets
    python -m loadtest --kind vad --clients 150         # silero VAD streams (examples/models)
    python -m loadtest --mix audio=60,pose=30,video=10 --targets realtime
    python -m loadtest --capacity                       # + the capacity search
    python -m loadtest.table                            # the issue-15 table, in one run
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import itertools
import multiprocessing
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest import hostprobe, rawload, report
from loadtest.clients import (
    Plan,
    Records,
    all_ready,
    keep_barrier,
    run_process,
    set_nice,
)

REPO = Path(__file__).resolve().parents[1]
DEADLINE_MS = 100.0  # the built-in speech model's deadline
CAPACITY_SHARE = 0.99  # the capacity bar: this share of chunks within report.BAR_MS


class ServerProcess:
    """One server under test, started on an ephemeral loopback port, pinned to ``cpus`` where
    given, and sampled (CPU seconds, RSS) every 0.1 s while it runs."""

    def __init__(
        self,
        target: str,
        kinds: list[str],
        cpus: set[int] | None = None,
        nice: int = 0,
        processes: int = 1,
        args: tuple[str, ...] = (),
    ) -> None:
        self.proc = subprocess.Popen(
            [*server_command(target, kinds, processes), *(args if target == "realtime" else ())],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=bool(nice),  # its own autogroup, to which the nice applies
        )
        # Before the server has started a thread: its threads (ORT workers) inherit both.
        if cpus:
            os.sched_setaffinity(self.proc.pid, cpus)
        if nice:
            set_nice(self.proc.pid, nice)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"(ws://\S+)", line)
        if match is None:
            self.proc.kill()
            raise SystemExit(f"{target} did not start: {line!r}")
        self.url = match.group(1)
        #: The server's processes: itself, or a supervisor's children (all listen by now).
        self.pids = [self.proc.pid, *(_children(self.proc.pid) if processes > 1 else ())]
        self.samples: list[tuple[float, float, float]] = []  # (t, cpu seconds, rss MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
        while not self._stop.is_set():
            try:
                cpu = rss = 0.0
                for pid in self.pids:
                    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    cpu += (int(stat[11]) + int(stat[12])) / tick  # utime + stime, every thread
                    rss += int(stat[21]) * page_mb
                self.samples.append((time.monotonic(), cpu, rss))
            except (OSError, IndexError):
                return
            self._stop.wait(0.1)

    def stats(self, start: float, end: float, rec: Records | None = None) -> dict[str, Any]:
        """Server CPU (cores) and RSS (MB) over ``start..end``, and, given the records, the CPU
        per chunk answered in that window (the steady state: callers leave out the ramp-up)."""
        inside = [s for s in self.samples if start <= s[0] <= end] or self.samples[-2:]
        if len(inside) < 2:
            return {"cpu_cores_mean": None, "rss_mb_max": None, "cpu_us_per_chunk": None}
        (t0, c0, _), (t1, c1, _) = inside[0], inside[-1]
        series = [
            {
                "t": round(b[0] - start, 2),
                "cpu_cores": round((b[1] - a[1]) / (b[0] - a[0]), 2),
                "rss_mb": round(b[2], 1),
            }
            for a, b in itertools.pairwise(inside[::5])  # every 0.5 s
        ]
        per_chunk = None
        if rec is not None:
            answered = int(((rec.received >= t0) & (rec.received <= t1)).sum())
            per_chunk = round((c1 - c0) / answered * 1e6, 1) if answered else None
        return {
            "cpu_cores_mean": round((c1 - c0) / (t1 - t0), 3),
            "cpu_us_per_chunk": per_chunk,
            "cpu_window_s": round(t1 - t0, 2),
            "rss_mb_max": round(max(s[2] for s in inside), 1),
            "series": series,
            # Every sample, (monotonic seconds, CPU seconds so far): the clients' records are
            # on the same clock, so a caller can place the server's CPU beside them.
            "cpu_samples": [(t, cpu) for t, cpu, _ in self.samples],
        }

    def stop(self) -> None:
        self._stop.set()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _children(pid: int) -> list[int]:
    """The pids of a process's children, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def server_command(target: str, kinds: list[str], processes: int = 1) -> list[str]:
    """How to start ``target`` for clients of ``kinds``: silero VAD (kind ``vad``) needs the
    example models on realtime, and the naive server's silero handler. ``processes``: realtime's
    ``--processes`` (its CPU is then its children's, which ServerProcess adds up)."""
    if target == "realtime":
        return [
            *(sys.executable, "-m", "realtime", "serve", "--port", "0"),
            *("--processes", str(processes)),
            # Every simulated client comes from 127.0.0.1: no per-address bounds.
            *("--max-sessions-per-ip", "100000", "--max-connections", "100000"),
            *("--max-rate-per-ip", "10000000", str(2**40)),
            *(("--models", str(REPO / "examples" / "models")) if "vad" in kinds else ()),
        ]
    if target == "naive":
        model = "silero_vad" if "vad" in kinds else "speech_activity"
        return [
            sys.executable,
            "-m",
            "loadtest.baselines",
            "naive",
            "--model",
            model,
            "--port",
            "0",
        ]
    if target == "echo":
        return [sys.executable, "-m", "loadtest.baselines", "echo", "--port", "0"]
    raise SystemExit(f"unknown target {target!r}")


def default_cpus() -> tuple[set[int] | None, set[int] | None]:
    """Server on CPU 0, load on the others, where there are at least two CPUs to use."""
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        return None, None
    return {usable[0]}, set(usable[1:])


@dataclass
class Setup:
    """How a run is driven: the client, where server and load run, what results to ask for."""

    client: str = "raw"  # "raw" (loadtest.rawload) or "websockets" (loadtest.clients)
    procs: int = 1
    server_cpus: set[int] | None = None
    load_cpus: set[int] | None = None
    results: str = "json"
    nice: int = 0  # server's and clients' nice value: negative puts them ahead of other work
    settle_seconds: float = 15.0
    warmup_seconds: float = 1.0  # left out of the server CPU window (ramp-up)
    processes: int = 1  # realtime's --processes
    server_args: tuple[str, ...] = ()  # more realtime flags (e.g. --redis URL)
    #: (seconds into the run, milliseconds): the server's processes are stopped that long then
    #: (SIGSTOP, SIGCONT): a noisy neighbour or a host's hiccup, at a known time.
    stalls: tuple[tuple[float, float], ...] = ()
    #: (seconds into the run, seconds, share): from then, for that long, the server's processes
    #: are stopped ``share`` of every :data:`THROTTLE_PERIOD`, as a cgroup's CPU quota stops
    #: them: the host slows below what was admitted, for seconds.
    throttles: tuple[tuple[float, float, float], ...] = ()
    #: (seconds into the run, milliseconds, factor): the server's cores run ``factor`` times
    #: slower that long then (:func:`loadtest.hostprobe.slow`), as this host slows them.
    slows: tuple[tuple[float, float, float], ...] = ()
    #: Probe the server's cores during each run (:mod:`loadtest.hostprobe`): the host's stops
    #: and slowdowns go into the server's figures (``host``), to tell a miss of the host's from
    #: one of the server's.
    host_probe: bool = False


#: The period of a throttle (the kernel's CFS quota period, by default).
THROTTLE_PERIOD = 0.1


def stall(pids: list[int], seconds: float) -> None:
    """Stop ``pids`` for ``seconds``, then let them go on (those still there: a process that
    is gone leaves the others stopped no longer than the rest)."""
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        time.sleep(seconds)  # the fault itself: how long the server does not run
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def throttle(pids: list[int], seconds: float, share: float, stop: threading.Event) -> None:
    """Stop ``pids`` ``share`` of every :data:`THROTTLE_PERIOD` for ``seconds`` (or until
    ``stop``)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end and not stop.is_set():
        stall(pids, share * THROTTLE_PERIOD)
        stop.wait((1.0 - share) * THROTTLE_PERIOD)


#: A running host probe and the file it writes.
Probe = tuple["subprocess.Popen[bytes]", Path]


def start_probes(cpus: set[int] | None, until: float) -> dict[int, Probe]:
    """A :mod:`loadtest.hostprobe` process on each of ``cpus`` (none if None) until ``until``
    (monotonic seconds), each with the file it writes."""
    probes: dict[int, Probe] = {}
    for cpu in sorted(cpus or ()):
        out = Path(tempfile.mkdtemp(prefix="hostprobe-")) / "probe.npz"
        seconds = f"{until + 0.5 - time.monotonic():.2f}"
        args = ["--cpu", str(cpu), "--seconds", seconds, "--out", str(out)]
        command = [sys.executable, "-m", "loadtest.hostprobe", *args]
        probes[cpu] = (subprocess.Popen(command, cwd=REPO), out)
    return probes


def read_probe(probe: Probe, start: float, within: tuple[float, float]) -> dict[str, Any]:
    """A probe's summary once it has ended, of its samples ``within`` those seconds after
    ``start`` (see :func:`loadtest.hostprobe.summarize`)."""
    process, out = probe
    try:
        process.wait(timeout=30)
        return hostprobe.load(out, start, within)
    except (OSError, subprocess.TimeoutExpired) as e:
        process.kill()
        return {"samples": 0, "error": str(e)}
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def server_figures(stats: dict[str, Any]) -> dict[str, Any]:
    """The server's figures for a report: :meth:`ServerProcess.stats` without its raw samples."""
    return {k: v for k, v in stats.items() if k != "cpu_samples"}


def run_target(
    target: str,
    kinds: list[str],
    seconds: float,
    setup: Setup | None = None,
    arrivals: list[float] | None = None,
    stream_seconds: list[float] | None = None,
    retry: bool = False,
    warm: float | None = None,
) -> tuple[Records, dict[str, Any]]:
    """Start one server, drive it with ``kinds`` (one client each) from ``setup.procs``
    processes, and return the merged records and the server's figures. With ``arrivals``
    (raw client), client i connects that many seconds after the start and streams from its
    welcome on (for ``stream_seconds[i]``, or to the end); with ``retry``, a client refused
    ``server_busy`` tries again after ``retry_after_ms`` (:attr:`Plan.retry`). The server's
    CPU figures leave out the first ``warm`` seconds (default ``setup.warmup_seconds``, at
    most a quarter of the run): a run whose clients arrive over a ramp leaves the ramp out
    this way, or their handshakes count as the streams' cost."""
    setup = setup or Setup()
    server = ServerProcess(
        target, kinds, setup.server_cpus, setup.nice, setup.processes, setup.server_args
    )
    timers: list[threading.Timer] = []
    stop = threading.Event()
    probes: dict[int, Probe] = {}
    slowing: list[subprocess.Popen[bytes]] = []
    try:
        procs = max(1, min(setup.procs, len(kinds)))
        entry = rawload.run_process if setup.client == "raw" else run_process
        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Barrier(procs)
        with ctx.Pool(procs, initializer=keep_barrier, initargs=(barrier,)) as pool:
            # Every client process started and imported before the start time is set: on a
            # busy machine that alone can take longer than the allowance to connect.
            pool.map(all_ready, range(procs), chunksize=1)
            start = time.monotonic() + 1.0 + len(kinds) / 200  # time to connect everyone
            for at, ms in setup.stalls:
                timer = threading.Timer(
                    start + at - time.monotonic(), stall, (server.pids, ms / 1000.0)
                )
                timer.daemon = True
                timers.append(timer)
                timer.start()
            probes = start_probes(setup.server_cpus if setup.host_probe else None, start + seconds)
            slowing += [
                subprocess.Popen(
                    [
                        *(sys.executable, "-m", "loadtest.hostprobe", "--cpu", str(cpu)),
                        *("--seconds", str(ms / 1000.0), "--slow", str(factor)),
                        *("--at", str(start + at)),
                    ],
                    cwd=REPO,
                )
                for at, ms, factor in setup.slows
                for cpu in sorted(setup.server_cpus or ())
            ]
            for at, length, share in setup.throttles:
                timer = threading.Timer(
                    start + at - time.monotonic(), throttle, (server.pids, length, share, stop)
                )
                timer.daemon = True
                timers.append(timer)
                timer.start()
            plans = [
                Plan(
                    server.url,
                    target,
                    kinds[p::procs],
                    p * 100_000,
                    start,
                    seconds,
                    results=setup.results,
                    settle_seconds=setup.settle_seconds,
                    cpus=setup.load_cpus,
                    nice=setup.nice,
                    arrivals=None if arrivals is None else arrivals[p::procs],
                    stream_seconds=None if stream_seconds is None else stream_seconds[p::procs],
                    retry=retry,
                )
                for p in range(procs)
            ]
            rec = report.merge(pool.map(entry, plans, chunksize=1))
        skip = min(setup.warmup_seconds, seconds / 4) if warm is None else min(warm, seconds / 2)
        stats = server.stats(start + skip, start + seconds, rec)
        if probes:
            busy = (skip, seconds)  # the server's CPU window: its core is busy, as the probe needs
            stats["host"] = {
                str(cpu): read_probe(probe, start, busy) for cpu, probe in probes.items()
            }
        return rec, stats
    finally:
        stop.set()
        for spinner in slowing:  # each ends by itself; a run that failed ends them here
            if spinner.poll() is None:
                spinner.kill()
            spinner.wait()
        for timer in timers:
            timer.cancel()
            if timer.is_alive():
                timer.join()  # a stall under way ends (SIGCONT) before the server is stopped
        for process, out in probes.values():  # a run that failed: its probes end here
            if process.poll() is None:
                process.kill()
                process.wait()
            shutil.rmtree(out.parent, ignore_errors=True)
        server.stop()


def parse_mix(args: argparse.Namespace) -> list[str]:
    if args.mix:
        kinds: list[str] = []
        for part in args.mix.split(","):
            kind, _, count = part.partition("=")
            kinds += [kind.strip()] * int(count)
        return kinds
    return [args.kind] * args.clients


def capacity(
    targets: list[str], kind: str, steps: list[int], seconds: float, setup: Setup, tries: int = 1
) -> dict[str, Any]:
    """Per target, the most real-time clients of ``kind`` with >= 99 % of chunks answered within
    BAR_MS of their due time: steps up until a step misses the bar. With ``tries`` > 1 a step
    holds only if every one of its runs does (on a shared machine one run of a step can pass
    and the next, a minute later, miss by 15 points: such a step is past what the server
    carries dependably)."""
    found: dict[str, Any] = {}
    # An overloaded step answers late for long: past a few seconds it is lost either way.
    setup = dataclasses.replace(setup, settle_seconds=min(setup.settle_seconds, 5.0))
    for target in targets:
        rows = []
        best = 0
        runs = [(n, k) for n in steps for k in range(tries)]
        for n, k in runs:
            rec, server = run_target(target, [kind] * n, seconds, setup)
            s = report.summarize(rec, seconds, DEADLINE_MS)
            ok = s["within_50ms"] >= CAPACITY_SHARE
            rows.append(
                {
                    "clients": n,
                    "ok": ok,
                    "within_50ms": s["within_50ms"],
                    "p99_ms": s["latency_ms"]["p99"],
                    "lost": s["lost"],
                    "refused": s["refused"],
                    "errors": s["errors"],
                    "server_cpu": server["cpu_cores_mean"],
                    "cpu_us_per_chunk": server["cpu_us_per_chunk"],
                    "client_cpu_cores": s["client_cpu_cores"],
                }
            )
            print(
                f"capacity {target} {kind} x{n}: {100 * s['within_50ms']:.1f}% within "
                f"{report.BAR_MS:g} ms, p99 {s['latency_ms']['p99']} ms, lost {s['lost']}, "
                f"errors {s['errors']}",
                flush=True,
            )
            if not ok:
                break
            if k == tries - 1:  # every run of this step held
                best = n
        found[target] = {"clients": best, "steps": rows}
    return {
        "kind": kind,
        "bar": f">= {100 * CAPACITY_SHARE:g} % of chunks answered within {report.BAR_MS:g} ms"
        + (f", in each of {tries} runs of a step" if tries > 1 else ""),
        "targets": found,
    }


def cpus_arg(text: str) -> set[int] | None:
    """``0`` or ``1,2`` -> a CPU set; ``any`` -> not pinned."""
    return None if text == "any" else {int(c) for c in text.split(",")}


def setup_from(args: argparse.Namespace) -> Setup:
    """The run setup the flags ask for (CPU pinning by default where there are 2+ CPUs)."""
    server_cpus, load_cpus = default_cpus()
    return Setup(
        client=args.client,
        procs=args.procs or (1 if args.client == "raw" else 2),
        server_cpus=server_cpus if args.server_cpus is None else cpus_arg(args.server_cpus),
        load_cpus=load_cpus if args.load_cpus is None else cpus_arg(args.load_cpus),
        results=args.results,
        nice=args.nice,
        server_args=tuple(args.server_arg),
        host_probe=args.host_probe,
    )


def add_setup_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that say how the load is driven (shared with ``python -m loadtest.table``)."""
    parser.add_argument(
        "--client",
        choices=["raw", "websockets"],
        default="raw",
        help="raw: the cheap hand-rolled client (default); websockets: one websockets "
        "connection object per client",
    )
    parser.add_argument("--procs", type=int, help="client processes (default: raw 1, else 2)")
    parser.add_argument(
        "--host-probe",
        action="store_true",
        help="probe the server's cores during each run (python -m loadtest.hostprobe: the "
        "host's stops and slowdowns, beside the figures; needs root for real-time priority, "
        "and a pinned server: with --server-cpus any there is no core to probe)",
    )
    parser.add_argument(
        "--server-cpus", help="CPUs the server runs on, e.g. 0 (default: the first; any: free)"
    )
    parser.add_argument(
        "--load-cpus", help="CPUs the clients run on, e.g. 1 (default: the others; any: free)"
    )
    parser.add_argument("--results", choices=["json", "binary"], default="json")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="nice value of server and clients, each in its own session and autogroup "
        "(e.g. -10 on a machine shared with other work; needs root; the same for every target)",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="one more `realtime serve` flag, e.g. --server-arg=--admit-load=0 (repeatable; "
        "realtime only)",
    )


def run_summary(
    target: str, kinds: list[str], seconds: float, setup: Setup
) -> tuple[Records, dict[str, Any]]:
    """One target under one load: its records and its summary with the server's figures."""
    rec, server = run_target(target, kinds, seconds, setup)
    s = {**report.summarize(rec, seconds, DEADLINE_MS), "server": server_figures(server)}
    lat = s["latency_ms"]
    print(
        f"  {target}: {100 * s['within_50ms']:.1f}% within {report.BAR_MS:g} ms, "
        f"p50 {lat['p50']} p99 {lat['p99']} max {lat['max']} ms, "
        f"answered {s['answered_per_s']}/s, lost {s['lost']}, refused {s['refused']}, "
        f"errors {s['errors']}, server {server['cpu_cores_mean']} cores "
        f"{server['cpu_us_per_chunk']} us/chunk, client {s['client_cpu_cores']} cores",
        flush=True,
    )
    return rec, s


def machine() -> dict[str, Any]:
    """The machine a report was taken on, and how busy it was."""
    return {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_before": os.getloadavg(),
        "realtime_build": realtime_build(),
    }


def realtime_build() -> str:
    """Whether the ``realtime`` the server processes import (this interpreter, this working
    directory) has its per-chunk modules compiled (setup.py) or in pure Python."""
    spec = importlib.util.find_spec("realtime.session")
    origin = spec.origin if spec is not None else None
    return "compiled (mypyc)" if origin and origin.endswith(".so") else "pure Python"


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--clients", type=int, default=100, help="clients (default 100)")
    parser.add_argument(
        "--kind", default="audio", help="what --clients stream: audio (default) or vad (silero)"
    )
    parser.add_argument("--mix", help="clients by kind, e.g. audio=60,pose=30,video=10")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--targets", default="realtime,naive,echo")
    add_setup_flags(parser)
    parser.add_argument("--capacity", action="store_true", help="also search the capacity")
    parser.add_argument("--capacity-seconds", type=float, default=8.0)
    parser.add_argument("--capacity-steps", default="25,50,75,100,150,200,250,300,400,500,700,1000")
    parser.add_argument("--out", type=Path, default=REPO / "loadtest" / "results" / "latest")
    parser.add_argument("--label", default="")
    args = parser.parse_args()

    setup = setup_from(args)
    kinds = parse_mix(args)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not set(kinds) <= {"audio", "vad"} or len(set(kinds)) > 1:
        targets = [t for t in targets if t == "realtime"]  # the baselines speak one audio kind
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Records] = {}
    summaries: dict[str, Any] = {}
    print(f"{len(kinds)} clients for {args.seconds} s, {setup}", flush=True)
    for target in targets:
        runs[target], summaries[target] = run_summary(target, kinds, args.seconds, setup)

    ratios = {}
    ours = summaries.get("realtime")
    for base in ("naive", "echo"):
        theirs = summaries.get(base)
        if ours and theirs and ours["latency_ms"]["p99"] and theirs["latency_ms"]["p99"]:
            ratios[f"p99 {base} / realtime"] = round(
                theirs["latency_ms"]["p99"] / ours["latency_ms"]["p99"], 2
            )
            ratios[f"answered realtime / {base}"] = round(
                ours["answered_per_s"] / max(theirs["answered_per_s"], 1e-9), 2
            )
            a, b = ours["server"]["cpu_us_per_chunk"], theirs["server"]["cpu_us_per_chunk"]
            if a and b:
                ratios[f"server CPU per chunk realtime / {base}"] = round(a / b, 2)
    result: dict[str, Any] = {
        "label": args.label or f"{len(kinds)} clients",
        "command": "python -m " + " ".join(["loadtest", *sys.argv[1:]]),
        "machine": machine(),
        "setup": setup_json(setup),
        "seconds": args.seconds,
        "deadline_ms": DEADLINE_MS,
        "runs": summaries,
        "ratios": ratios,
    }
    if args.capacity:
        steps = [int(s) for s in args.capacity_steps.split(",")]
        result["capacity"] = capacity(targets, kinds[0], steps, args.capacity_seconds, setup)
    result["machine"]["load_average_after"] = os.getloadavg()
    result["plots"] = report.plot(runs, args.out, DEADLINE_MS) if runs else []
    report.write(args.out, result, report.markdown(result))


def setup_json(setup: Setup) -> dict[str, Any]:
    """The setup as JSON (CPU sets as sorted lists)."""
    return {k: sorted(v) if isinstance(v, set) else v for k, v in dataclasses.asdict(setup).items()}


if __name__ == "__main__":
    main()
