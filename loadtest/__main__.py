"""``python -m loadtest``: simulated clients against `realtime` and two baselines, side by side.

Starts each server itself on 127.0.0.1 (loopback only), drives it with N clients spread over
several processes, stops it, and writes ``report.json``, ``summary.md`` and PNG plots to
``--out``. With ``--capacity`` it also steps the number of real-time audio clients up until p99
latency passes the deadline or anything is dropped.

    python -m loadtest                                  # 100 audio clients, all three targets
    python -m loadtest --clients 1000 --seconds 10
    python -m loadtest --mix audio=60,pose=30,video=10 --targets realtime
    python -m loadtest --capacity                       # + the capacity search
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from loadtest import report
from loadtest.clients import Plan, Records, run_process

REPO = Path(__file__).resolve().parents[1]
DEADLINE_MS = 100.0  # the built-in speech model's deadline


class ServerProcess:
    """One server under test, started on an ephemeral loopback port and sampled while it runs."""

    COMMANDS = {
        # Every simulated client comes from 127.0.0.1.
        "realtime": [
            *(sys.executable, "-m", "realtime", "serve", "--port", "0", "--processes", "1"),
            *("--max-sessions-per-ip", "100000"),
        ],
        "naive": [sys.executable, "-m", "loadtest.baselines", "naive", "--port", "0"],
        "echo": [sys.executable, "-m", "loadtest.baselines", "echo", "--port", "0"],
    }

    def __init__(self, target: str) -> None:
        self.proc = subprocess.Popen(
            self.COMMANDS[target],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"(ws://\S+)", line)
        if match is None:
            self.proc.kill()
            raise SystemExit(f"{target} did not start: {line!r}")
        self.url = match.group(1)
        self.samples: list[tuple[float, float, float]] = []  # (t, cpu seconds, rss MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        pid = self.proc.pid
        while not self._stop.is_set():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                rss = int(stat[21]) * os.sysconf("SC_PAGE_SIZE") / 2**20
                self.samples.append((time.monotonic(), (int(stat[11]) + int(stat[12])) / tick, rss))
            except (OSError, IndexError):
                return
            self._stop.wait(0.25)

    def stats(self, start: float, end: float) -> dict[str, Any]:
        """Server CPU (cores) and RSS (MB) over the run, and the series for the report."""
        inside = [s for s in self.samples if start <= s[0] <= end] or self.samples[-2:]
        if len(inside) < 2:
            return {"cpu_cores_mean": None, "rss_mb_max": None, "series": []}
        (t0, c0, _), (t1, c1, _) = inside[0], inside[-1]
        series = [
            {
                "t": round(b[0] - start, 2),
                "cpu_cores": round((b[1] - a[1]) / (b[0] - a[0]), 2),
                "rss_mb": round(b[2], 1),
            }
            for a, b in itertools.pairwise(inside)
        ]
        return {
            "cpu_cores_mean": round((c1 - c0) / (t1 - t0), 2),
            "rss_mb_max": round(max(s[2] for s in inside), 1),
            "series": series,
        }

    def stop(self) -> None:
        self._stop.set()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_target(
    target: str, kinds: list[str], seconds: float, procs: int
) -> tuple[Records, dict[str, Any]]:
    """Start one server, drive it with ``kinds`` (one client each) from ``procs`` processes."""
    server = ServerProcess(target)
    try:
        procs = max(1, min(procs, len(kinds)))
        start = time.monotonic() + 1.0 + len(kinds) / 500  # time to connect everyone
        plans = [
            Plan(server.url, target, kinds[p::procs], p * 100_000, start, seconds)
            for p in range(procs)
        ]
        with multiprocessing.get_context("spawn").Pool(procs) as pool:
            records = pool.map(run_process, plans)
        return report.merge(records), server.stats(start, start + seconds)
    finally:
        server.stop()


def parse_mix(args: argparse.Namespace) -> list[str]:
    if args.mix:
        kinds: list[str] = []
        for part in args.mix.split(","):
            kind, _, count = part.partition("=")
            kinds += [kind.strip()] * int(count)
        return kinds
    return ["audio"] * args.clients


def capacity(seconds: float, procs: int, steps: list[int]) -> dict[str, Any]:
    """The most real-time audio clients with p99 under the deadline and nothing dropped."""
    results = []
    best = 0
    for n in steps:
        rec, server = run_target("realtime", ["audio"] * n, seconds, procs)
        s = report.summarize(rec, seconds, DEADLINE_MS)
        p99 = s["latency_ms"]["p99"]
        ok = (
            p99 is not None
            and p99 <= DEADLINE_MS
            and s["lost"] == 0
            and not s["errors"]
            and s["connect_failures"] == 0
        )
        results.append(
            {
                "clients": n,
                "p99_ms": p99,
                "ok": ok,
                "errors": s["errors"],
                "lost": s["lost"],
                "server_cpu": server["cpu_cores_mean"],
            }
        )
        print(
            f"capacity step {n} clients: p99 {p99} ms, errors {s['errors']}, lost {s['lost']}",
            flush=True,
        )
        if not ok:
            break
        best = n
    return {"clients": best, "steps": results}


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--clients", type=int, default=100, help="audio clients (default 100)")
    parser.add_argument("--mix", help="clients by kind, e.g. audio=60,pose=30,video=10")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--procs", type=int, default=2, help="client processes (default 2)")
    parser.add_argument("--targets", default="realtime,naive,echo")
    parser.add_argument("--capacity", action="store_true", help="also search the capacity")
    parser.add_argument("--capacity-seconds", type=float, default=8.0)
    parser.add_argument("--capacity-steps", default="25,50,75,100,150,200,250,300,400,500,700,1000")
    parser.add_argument("--out", type=Path, default=REPO / "loadtest" / "results" / "latest")
    parser.add_argument("--label", default="")
    args = parser.parse_args()

    kinds = parse_mix(args)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if set(kinds) != {"audio"}:
        targets = [t for t in targets if t == "realtime"]  # the baselines speak audio only
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Records] = {}
    summaries: dict[str, Any] = {}
    for target in targets:
        print(f"{target}: {len(kinds)} clients for {args.seconds} s ...", flush=True)
        rec, server = run_target(target, kinds, args.seconds, args.procs)
        runs[target] = rec
        summaries[target] = {**report.summarize(rec, args.seconds, DEADLINE_MS), "server": server}
        s = summaries[target]
        print(
            f"  p50 {s['latency_ms']['p50']} p99 {s['latency_ms']['p99']} ms, "
            f"answered {s['answered_per_s']}/s, errors {s['errors']}, lost {s['lost']}",
            flush=True,
        )

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
    result: dict[str, Any] = {
        "label": args.label or f"{len(kinds)} clients",
        "command": "python -m " + " ".join(["loadtest", *sys.argv[1:]]),
        "machine": {
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "load_average_before": os.getloadavg(),
        "seconds": args.seconds,
        "deadline_ms": DEADLINE_MS,
        "runs": summaries,
        "ratios": ratios,
    }
    if args.capacity:
        steps = [int(s) for s in args.capacity_steps.split(",")]
        result["capacity"] = capacity(args.capacity_seconds, args.procs, steps)
    result["plots"] = report.plot(runs, args.out, DEADLINE_MS) if runs else []
    (args.out / "report.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    (args.out / "summary.md").write_text(report.markdown(result))
    print(report.markdown(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
