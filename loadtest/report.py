"""Figures from the clients' records: percentiles, throughput, drops; JSON, PNG plots, markdown."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from loadtest.clients import OK, PENDING, UNUSED, Records

#: The real-time bar of issue 15: a chunk counts as on time if answered within this of its due time.
BAR_MS = 50.0
PERCENTILES = [("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9), ("max", 100.0)]


def write(out: Path, result: dict[str, Any], summary: str) -> None:
    """Write a run's ``report.json`` and ``summary.md`` to ``out``, and print the summary."""
    (out / "report.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    (out / "summary.md").write_text(summary)
    print(summary)
    print(f"wrote {out}")


def save_plot(fig: Any, out: Path, file: str) -> str:
    """Lay out a matplotlib figure, write it to ``out / file`` and close it; the file's name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / file, dpi=110)
    plt.close(fig)
    return file


def merge(records: list[Records]) -> Records:
    """One set of records from every client process (error codes renumbered to one table)."""
    codes: list[str] = []
    outcomes = []
    for r in records:
        table = np.arange(len(r.codes) + 1)
        for j, code in enumerate(r.codes, start=1):
            if code not in codes:
                codes.append(code)
            table[j] = codes.index(code) + 1
        o = r.outcome.copy()
        hit = o > 0
        o[hit] = table[o[hit]]
        outcomes.append(o)
    width = max((r.due.shape[1] for r in records), default=0)

    def cat(arrays: list[np.ndarray[Any, Any]], fill: float) -> np.ndarray[Any, Any]:
        padded = [
            np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=fill) for a in arrays
        ]
        return np.concatenate(padded) if padded else np.empty((0, width))

    return Records(
        due=cat([r.due for r in records], np.nan),
        sent=cat([r.sent for r in records], np.nan),
        received=cat([r.received for r in records], np.nan),
        queue_ms=cat([r.queue_ms for r in records], np.nan),
        infer_ms=cat([r.infer_ms for r in records], np.nan),
        outcome=cat(outcomes, UNUSED).astype(np.int32),
        codes=codes,
        kinds=[k for r in records for k in r.kinds],
        cpu_seconds=sum(r.cpu_seconds for r in records),
        connect_failures=sum(r.connect_failures for r in records),
        refused=sum(r.refused for r in records),
        refused_codes=dict(sum((Counter(r.refused_codes) for r in records), Counter())),
        handshake_refusals=sum(r.handshake_refusals for r in records),
        hello_at=np.concatenate([r.hello_at for r in records]) if records else np.empty(0),
        hello_ms=np.concatenate([r.hello_ms for r in records]) if records else np.empty(0),
        admitted=np.concatenate([r.admitted for r in records]) if records else np.empty(0, bool),
        taken_back=(
            np.concatenate([r.taken_back for r in records]) if records else np.empty(0, bool)
        ),
        refusal_at=[t for r in records for t in r.refusal_at],
        refusal_ms=[t for r in records for t in r.refusal_ms],
        refusals=np.concatenate([r.refusals for r in records]) if records else np.empty(0, int),
        unattributed=dict(sum((Counter(r.unattributed) for r in records), Counter())),
    )


def percentiles(values: np.ndarray[Any, Any]) -> dict[str, float | None]:
    """``values`` at each of :data:`PERCENTILES` (None each, if there are none)."""
    if not values.size:
        return {name: None for name, _ in PERCENTILES}
    return {name: round(float(np.percentile(values, q)), 2) for name, q in PERCENTILES}


def summarize(rec: Records, seconds: float, deadline_ms: float) -> dict[str, Any]:
    """The figures of one run: latency from each chunk's due time, split, throughput, losses."""
    used = rec.outcome != UNUSED
    ok = rec.outcome == OK
    latency = (rec.received - rec.due) * 1000.0
    lat_ok = latency[ok & used]
    server = rec.queue_ms + rec.infer_ms
    offered = int(used.sum())
    answered_ok = int((ok & used).sum())
    errors = {code: int((rec.outcome == j).sum()) for j, code in enumerate(rec.codes, start=1)}
    by_kind = {}
    for kind in sorted(set(rec.kinds)):
        rows = np.array([k == kind for k in rec.kinds])
        sel = ok[rows] & used[rows]
        by_kind[kind] = {
            "clients": int(rows.sum()),
            "latency_ms": percentiles(latency[rows][sel]),
        }
    return {
        "clients": len(rec.kinds),
        "offered": offered,
        "offered_per_s": round(offered / seconds, 1),
        "answered_per_s": round(answered_ok / seconds, 1),
        "latency_ms": percentiles(lat_ok),
        "split_ms": {
            "queue": percentiles(rec.queue_ms[ok & used & ~np.isnan(rec.queue_ms)]),
            "inference": percentiles(rec.infer_ms[ok & used & ~np.isnan(rec.infer_ms)]),
            "network_and_other": percentiles(
                (latency - np.nan_to_num(server))[ok & used & ~np.isnan(server)]
            ),
        },
        "send_lag_ms": percentiles(((rec.sent - rec.due) * 1000.0)[used & ~np.isnan(rec.sent)]),
        "within_deadline": round(float((lat_ok <= deadline_ms).sum()) / max(offered, 1), 4),
        # Share of every chunk due (refused, lost and failed ones included) answered within
        # BAR_MS of its due time.
        "within_50ms": round(float((lat_ok <= BAR_MS).sum()) / max(offered, 1), 4),
        "early_answers": int((lat_ok < 0).sum()),  # answered before due: a clock bug if not 0
        "lost": int(((rec.outcome == PENDING) & used).sum()),
        "errors": errors,
        "errors_without_seq": rec.unattributed,
        "connect_failures": rec.connect_failures,
        "refused": rec.refused,
        "client_cpu_cores": round(rec.cpu_seconds / seconds, 2),
        "by_kind": by_kind,
    }


def plot(runs: dict[str, Records], out: Path, deadline_ms: float) -> list[str]:
    """latency over time, latency CDF and throughput, each target a line; the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, rec in runs.items():
        ok = rec.outcome == OK
        if not ok.any():
            continue
        t0 = np.nanmin(rec.due)
        t = rec.due[ok] - t0
        lat = (rec.received[ok] - rec.due[ok]) * 1000.0
        order = np.argsort(t)
        t, lat = t[order], lat[order]
        edges = np.arange(0, float(np.nanmax(t)) + 0.5, 0.5)
        idx = np.digitize(t, edges)
        p99 = [
            np.percentile(lat[idx == i], 99) if (idx == i).any() else np.nan
            for i in range(1, len(edges))
        ]
        p50 = [
            np.percentile(lat[idx == i], 50) if (idx == i).any() else np.nan
            for i in range(1, len(edges))
        ]
        (line,) = ax.plot(edges[1:], p99, label=f"{name} p99")
        ax.plot(edges[1:], p50, linestyle="--", color=line.get_color(), label=f"{name} p50")
    ax.axhline(deadline_ms, color="grey", linewidth=0.8, linestyle=":", label="deadline")
    ax.set(
        xlabel="time (s)", ylabel="end-to-end latency (ms)", yscale="log", title="Latency over time"
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency_over_time.png", dpi=110)
    files.append("latency_over_time.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, rec in runs.items():
        ok = rec.outcome == OK
        lat = np.sort((rec.received[ok] - rec.due[ok]) * 1000.0)
        if lat.size:
            ax.plot(lat, np.arange(1, lat.size + 1) / lat.size, label=name)
    ax.axvline(deadline_ms, color="grey", linewidth=0.8, linestyle=":", label="deadline")
    ax.set(
        xlabel="end-to-end latency (ms)",
        ylabel="share of chunks",
        xscale="log",
        title="Latency CDF",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=110)
    files.append("latency_cdf.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, rec in runs.items():
        ok = rec.outcome == OK
        t0 = np.nanmin(rec.due)
        got = rec.received[ok] - t0
        edges = np.arange(0, float(np.nanmax(got)) + 0.5, 0.5) if got.size else np.array([0, 1])
        counts, _ = np.histogram(got, edges)
        ax.plot(edges[1:], counts / 0.5, label=f"{name} answered")
    ax.set(xlabel="time (s)", ylabel="results per second", title="Throughput")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    files.append("throughput.png")
    plt.close(fig)
    return files


def markdown(report: dict[str, Any]) -> str:
    """A short summary a person reads first."""
    lines = [
        f"# Load test: {report['label']}",
        "",
        f"`{report['command']}` on {report['machine']['cores']} cores "
        f"({report['machine']['platform']}, load average before "
        f"{', '.join(f'{x:.1f}' for x in report['machine']['load_average_before'])}), "
        f"{report['seconds']} s per run, deadline {report['deadline_ms']} ms.",
        "",
        f"| target | clients | offered/s | answered/s | within {BAR_MS:g} ms | p50 | p90 | p99 "
        "| max (ms) | within deadline | lost | refused | errors | server CPU (cores) "
        "| server CPU/chunk (us) | client CPU (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["runs"].items():
        lat = r["latency_ms"]
        lines.append(
            f"| {name} | {r['clients']} | {r['offered_per_s']} | {r['answered_per_s']} | "
            f"{100 * r['within_50ms']:.1f}% | "
            + " | ".join(f"{lat[k]}" for k in ("p50", "p90", "p99", "max"))
            + f" | {100 * r['within_deadline']:.1f}% | {r['lost']} | {r['refused']} | "
            + (", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "0")
            + f" | {r['server']['cpu_cores_mean']} | {r['server']['cpu_us_per_chunk']} "
            f"| {r['client_cpu_cores']} |"
        )
    if report.get("ratios"):
        lines += ["", "Ratios:", ""]
        lines += [f"- {k}: {v}" for k, v in report["ratios"].items()]
    if report.get("capacity"):
        lines += ["", *capacity_lines(report["capacity"])]
    lines += ["", "Plots: " + ", ".join(f"[{f}]({f})" for f in report.get("plots", []))]
    return "\n".join(lines) + "\n"


def capacity_lines(cap: dict[str, Any]) -> list[str]:
    """The capacity search as markdown: per target the largest count that met the bar."""
    lines = [f"Capacity ({cap['kind']} clients, {cap['bar']}):", ""]
    for target, found in cap["targets"].items():
        steps = ", ".join(
            f"{s['clients']}: {100 * s['within_50ms']:.1f}%{'' if s['ok'] else ' ✗'}"
            for s in found["steps"]
        )
        lines.append(f"- {target}: **{found['clients']}** ({steps})")
    return lines
