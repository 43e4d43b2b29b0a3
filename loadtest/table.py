"""``python -m loadtest.table``: issue 15's side-by-side table and capacities, in one run.

Each load (by default 100 and 150 ``speech_activity`` clients, 150 and 200 silero VAD streams)
drives ``realtime``, the naive per-message server and the bare echo server in turn, from the raw
client (server on CPU 0, load on CPU 1 by default, as ``python -m loadtest``). Then, per kind and
per target, the capacity: the most clients with >= 99 % of chunks answered within 50 ms of their
due time. Writes ``report.json``, ``table.md`` and plots (latency CDF per load, capacity curves)
to ``--out``.

    python -m loadtest.table                                       # ~10 minutes
    python -m loadtest.table --seconds 10 --no-capacity            # the table alone, ~3 minutes
    python -m loadtest.table --points audio=100 --targets realtime,echo --no-capacity
    python -m loadtest.table --points audio=100 --no-capacity --repeat 3   # rounds, interleaved

On a machine shared with others (a VM's host, a neighbour), one run's CPU per chunk moves by
10 % from one minute to the next, and a burst of it lands on one target and not the others.
``--repeat N`` runs every target N times per load, in turn (realtime, naive, echo, realtime,
...); each cell shows the round with the median CPU per chunk, and lists every round's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from loadtest import report
from loadtest.__main__ import (
    REPO,
    add_setup_flags,
    capacity,
    machine,
    run_summary,
    setup_from,
    setup_json,
)
from loadtest.clients import KINDS, OK

NAMES = {"audio": "speech_activity (20 ms chunks)", "vad": "silero VAD (32 ms chunks)"}
STEPS = {"audio": "25,50,75,100,125,150,175,200,250,300", "vad": "25,50,100,150,200,250,300"}


def parse_points(text: str) -> list[tuple[str, int]]:
    """``audio=100,vad=150`` -> [("audio", 100), ("vad", 150)]."""
    points = []
    for part in text.split(","):
        kind, _, count = part.partition("=")
        if kind.strip() not in KINDS:
            raise SystemExit(f"unknown kind {kind!r} (one of {', '.join(KINDS)})")
        points.append((kind.strip(), int(count)))
    return points


def cell(s: dict[str, Any]) -> str:
    """One table cell: on-time share, latency, server CPU per chunk, and what went wrong."""
    lat = s["latency_ms"]
    parts = [
        f"{100 * s['within_50ms']:.1f} % within {report.BAR_MS:g} ms",
        f"p50 {lat['p50']} / p99 {lat['p99']} / max {lat['max']} ms",
        f"{s['server']['cpu_us_per_chunk']} us CPU/chunk ({s['server']['cpu_cores_mean']} cores)",
    ]
    wrong = {"lost": s["lost"], "refused": s["refused"], **s["errors"]}
    if any(wrong.values()):
        parts.append(", ".join(f"{k} {v}" for k, v in wrong.items() if v))
    rounds = s.get("cpu_us_per_chunk_rounds")
    if rounds:
        parts.append(f"median of {len(rounds)} rounds: {', '.join(map(str, rounds))} us")
    return "<br>".join(parts)


def ratio_text(point: dict[str, Any]) -> str:
    """realtime's CPU per chunk over the echo's at one load: of the median rounds, and (with
    rounds) each round's own, whose median pairs runs a minute apart, not five."""
    ours, echo = point["runs"]["realtime"], point["runs"]["echo"]
    a, b = ours["server"]["cpu_us_per_chunk"], echo["server"]["cpu_us_per_chunk"]
    if not a or not b:
        return ""
    text = (
        f"{NAMES.get(point['kind'], point['kind'])}, {point['clients']} clients: **{a / b:.2f}x**"
    )
    pairs = list(
        zip(
            ours.get("cpu_us_per_chunk_rounds", []),
            echo.get("cpu_us_per_chunk_rounds", []),
            strict=True,
        )
    )
    if pairs:
        each = sorted(x / y for x, y in pairs if x and y)
        text += (
            f" (medians' ratio); round by round {', '.join(f'{r:.2f}' for r in each)}, "
            f"median **{each[len(each) // 2]:.2f}x**"
        )
    return text


def markdown(result: dict[str, Any]) -> str:
    """The table as the issue lays it out: a row per load, a column per target."""
    targets = result["targets"]
    m = result["machine"]
    lines = [
        "# Hot path side by side (issue 15)",
        "",
        f"`{result['command']}`: {m['cores']} cores, load average "
        f"{', '.join(f'{x:.1f}' for x in m['load_average_before'])} before and "
        f"{', '.join(f'{x:.1f}' for x in m['load_average_after'])} after, "
        f"{result['seconds']} s per point; setup {result['setup']}; realtime "
        f"{m.get('realtime_build', 'pure Python')}. Latency counts from each "
        "chunk's due time; server CPU per chunk is its utime + stime over the steady state "
        "(the first second left out) divided by the chunks answered in that window.",
        "",
        "| load | " + " | ".join(targets) + " | load client CPU (cores) |",
        "|---|" + "---|" * (len(targets) + 1),
    ]
    for point in result["points"]:
        runs = point["runs"]
        client = max(runs[t]["client_cpu_cores"] for t in targets)
        lines.append(
            f"| {NAMES.get(point['kind'], point['kind'])}, {point['clients']} clients ("
            f"{runs[targets[0]]['offered_per_s']:g} chunks/s) | "
            + " | ".join(cell(runs[t]) for t in targets)
            + f" | {client} |"
        )
    ratios = [ratio_text(p) for p in result["points"] if {"realtime", "echo"} <= set(p["runs"])]
    if any(ratios):
        lines += ["", "realtime's CPU per chunk against the echo's: " + "; ".join(ratios) + "."]
    for kind, cap in result.get("capacity", {}).items():
        lines += ["", *report.capacity_lines({**cap, "kind": NAMES.get(kind, kind)})]
    lines += ["", "Plots: " + ", ".join(f"[{f}]({f})" for f in result["plots"])]
    return "\n".join(lines) + "\n"


def plot(
    latencies: dict[tuple[str, int], dict[str, np.ndarray[Any, Any]]],
    result: dict[str, Any],
    out: Path,
) -> list[str]:
    """latency_cdf.png (one panel per load) and capacity.png (on-time share vs clients)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    cols = min(2, len(latencies))
    rows = (len(latencies) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax, ((kind, n), runs) in zip(axes.flat, latencies.items(), strict=False):
        for target, lat in runs.items():
            if lat.size:
                # Answers before due would be a clock bug: shown at the axis floor, not dropped.
                ax.plot(np.maximum(lat, 0.01), np.arange(1, lat.size + 1) / lat.size, label=target)
        ax.axvline(report.BAR_MS, color="grey", linewidth=0.8, linestyle=":", label="50 ms")
        ax.set(
            xscale="log",
            xlabel="latency from due time (ms)",
            ylabel="share of chunks answered",
            title=f"{NAMES.get(kind, kind)}, {n} clients",
        )
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(latencies) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=100)
    plt.close(fig)
    files.append("latency_cdf.png")

    caps = result.get("capacity", {})
    if caps:
        fig, axes = plt.subplots(1, len(caps), figsize=(6 * len(caps), 3.6), squeeze=False)
        for ax, (kind, cap) in zip(axes.flat, caps.items(), strict=True):
            for target, found in cap["targets"].items():
                steps = found["steps"]
                ax.plot(
                    [s["clients"] for s in steps],
                    [100 * s["within_50ms"] for s in steps],
                    marker="o",
                    label=f"{target}: {found['clients']}",
                )
            ax.axhline(99, color="grey", linewidth=0.8, linestyle=":", label="99 %")
            ax.set(
                xlabel="clients",
                ylabel=f"% answered within {report.BAR_MS:g} ms",
                title=f"Capacity, {NAMES.get(kind, kind)}",
                ylim=(0, 101),
            )
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "capacity.png", dpi=100)
        plt.close(fig)
        files.append("capacity.png")
    return files


def main() -> None:
    """Run every load against every target, then the capacity searches; write the report."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.table", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--points", default="audio=100,audio=150,vad=150,vad=200")
    parser.add_argument("--targets", default="realtime,naive,echo")
    parser.add_argument("--seconds", type=float, default=15.0, help="per point (default 15)")
    parser.add_argument("--no-capacity", action="store_true", help="the table alone")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of every target per load, in turn; a cell shows the median round's",
    )
    parser.add_argument("--capacity-seconds", type=float, default=10.0)
    parser.add_argument(
        "--capacity-tries", type=int, default=1, help="runs per capacity step; every one must hold"
    )
    parser.add_argument("--capacity-steps-audio", default=STEPS["audio"])
    parser.add_argument("--capacity-steps-vad", default=STEPS["vad"])
    add_setup_flags(parser)
    parser.add_argument("--out", type=Path, default=REPO / "loadtest" / "results" / "table")
    args = parser.parse_args()

    setup = setup_from(args)
    points = parse_points(args.points)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "command": "python -m " + " ".join(["loadtest.table", *sys.argv[1:]]),
        "machine": machine(),
        "setup": setup_json(setup),
        "seconds": args.seconds,
        "repeat": args.repeat,
        "targets": targets,
        "points": [],
    }
    latencies: dict[tuple[str, int], dict[str, np.ndarray[Any, Any]]] = {}
    for kind, n in points:
        print(f"{NAMES.get(kind, kind)}: {n} clients for {args.seconds} s", flush=True)
        rounds: dict[str, list[tuple[Any, dict[str, Any]]]] = {t: [] for t in targets}
        for _ in range(args.repeat):
            for target in targets:
                rounds[target].append(run_summary(target, [kind] * n, args.seconds, setup))
        runs = {}
        for target, done in rounds.items():
            cpu = [s["server"]["cpu_us_per_chunk"] for _, s in done]
            ranked = sorted(done, key=lambda run: run[1]["server"]["cpu_us_per_chunk"] or 0.0)
            rec, runs[target] = ranked[len(ranked) // 2]
            if len(done) > 1:
                runs[target] = {**runs[target], "cpu_us_per_chunk_rounds": cpu}
            ok = rec.outcome == OK
            latencies.setdefault((kind, n), {})[target] = np.sort(
                (rec.received[ok] - rec.due[ok]) * 1000.0
            )
        result["points"].append({"kind": kind, "clients": n, "runs": runs})
    if not args.no_capacity:
        result["capacity"] = {}
        for kind in dict.fromkeys(k for k, _ in points):
            steps = [int(s) for s in getattr(args, f"capacity_steps_{kind}", "").split(",") if s]
            if steps:
                result["capacity"][kind] = capacity(
                    targets, kind, steps, args.capacity_seconds, setup, args.capacity_tries
                )
    result["machine"]["load_average_after"] = os.getloadavg()
    result["plots"] = plot(latencies, result, args.out)
    (args.out / "report.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    (args.out / "table.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
