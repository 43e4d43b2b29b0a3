"""``python -m loadtest.admit_sweep``: which ``--admit-load`` suits this host.

Issue 16 asks two things of admission control under overload, and they pull against each
other: the admitted sessions on time (>= 99 % of their chunks within 50 ms of their due time)
and many of them admitted (>= 90 % of the capacity measured without overload). The target load
(``realtime serve --admit-load``) trades one for the other. A higher one admits more sessions
and leaves less of the core for the host's hiccups. A lower one keeps them on time through more
hiccups and admits fewer. Where the two bars meet depends on the host: how far its speed
moves, and how often its cores stop or slow (docs/scheduler.md, "The target load").

This runs :mod:`loadtest.overload`'s runs (``--runs``, default 2x, 4x and the burst) at each
of ``--targets``, in ``--rounds``. Each round first searches the capacity (every client
admitted, :data:`loadtest.overload.CAPACITY_FLAGS`), up or down from the one before. Then it
runs every target against that capacity, in an order rotated each round, so that a host
slowing through a round does not always hit the same target. It reports, per target, how
many of the overload tool's checks held, which ones failed (on time, or too few admitted), and
the runs' figures. Then it reports the targets at which every check held in every round: the
window this host leaves, or none.

Writes ``report.json``, ``summary.md`` and ``admit_sweep_<kind>.png`` to ``--out``.

    flock /work/bench.lock python -m loadtest.admit_sweep --kind vad --targets 0.88,0.92,0.95 \\
        --rounds 3 --capacity-steps 250,300,350,400,450 --capacity-tries 2 --nice -20 --host-probe
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from loadtest import overload, report
from loadtest.__main__ import REPO, add_setup_flags, machine, setup_from


def rotated(targets: list[float], k: int) -> list[float]:
    """The targets in round ``k``'s order: the first ``k`` (mod their number) moved to the end."""
    k %= len(targets)
    return targets[k:] + targets[:k]


def on_time_check(what: str) -> bool:
    """Whether one of :func:`loadtest.overload.checks`' checks is about the admitted sessions'
    lateness (the rest: how many were admitted, how fast refusals came, none dropped)."""
    return "within 50 ms" in what or "under the deadline" in what


def ratio_check(what: str) -> bool:
    """Whether a check is about how many were admitted (or whether a capacity held at all)."""
    return "of capacity" in what or "a capacity held" in what


def admitted_share(run: dict[str, Any], capacity: int) -> float | None:
    """The sessions a run kept (its burst's steady ones), as a share of the capacity."""
    if not capacity or "admitted" not in run:
        return None
    r = run.get("base", run)
    return float(r["admitted"] - r.get("taken_back", 0)) / capacity


def on_time_share(run: dict[str, Any]) -> float | None:
    """A run's admitted chunks answered within 50 ms (a burst's: its steady sessions')."""
    share = run.get("base", run).get("admitted_within_50ms")
    return None if share is None else float(share)


def tally(rounds: list[dict[str, Any]], targets: list[float]) -> dict[str, dict[str, Any]]:
    """Per target (its ``str``), over the ``rounds`` (each: ``capacity``, and per target its
    ``runs`` and ``checks``): checks held of checks, the failed ones by kind, and the runs'
    admitted and on-time shares (least and median)."""
    out: dict[str, dict[str, Any]] = {}
    for t in targets:
        key = str(t)
        done = [r for r in rounds if key in r["targets"]]
        checks = [(w, ok) for r in done for w, ok in r["targets"][key]["checks"].items()]
        shares = [
            s
            for r in done
            for run in r["targets"][key]["runs"].values()
            if (s := admitted_share(run, r["capacity"])) is not None
        ]
        within = [
            s
            for r in done
            for run in r["targets"][key]["runs"].values()
            if (s := on_time_share(run)) is not None
        ]
        out[key] = {
            "rounds": len(done),
            "checks": len(checks),
            "held": sum(ok for _, ok in checks),
            "on_time_failed": sum(not ok for w, ok in checks if on_time_check(w)),
            "ratio_failed": sum(not ok for w, ok in checks if ratio_check(w)),
            "other_failed": sum(
                not ok for w, ok in checks if not on_time_check(w) and not ratio_check(w)
            ),
            "admitted_share": _spread(shares),
            "within_50ms": _spread(within),
        }
    return out


def _spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"min": None, "median": None, "max": None}
    return {
        "min": round(min(values), 4),
        "median": round(statistics.median(values), 4),
        "max": round(max(values), 4),
    }


def window(tallied: dict[str, dict[str, Any]]) -> list[str]:
    """The targets at which every check held in every round they ran."""
    return [t for t, x in tallied.items() if x["checks"] and x["held"] == x["checks"]]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def markdown(result: dict[str, Any]) -> str:
    """The summary a person reads first."""
    m = result["machine"]
    lines = [
        f"# Admission target sweep: {result['kind']}",
        "",
        f"`{result['command']}` on {m['cores']} cores, load average before "
        f"{', '.join(f'{x:.1f}' for x in m['load_average_before'])}, after "
        f"{', '.join(f'{x:.1f}' for x in m['load_average_after'])}. Runs {result['runs']}, "
        f"{result['seconds']} s each, in {len(result['rounds'])} rounds; each round searched the "
        "capacity first (every client admitted, shed by age) and ran every target against it, "
        "in an order rotated "
        "each round.",
        "",
        "| round | capacity | order |",
        "|---|---|---|",
    ]
    lines += [
        f"| {k + 1} | {r['capacity'] or 'none held'} | {', '.join(r['order'])} |"
        for k, r in enumerate(result["rounds"])
    ]
    lines += [
        "",
        "| target | checks held | failed: on time | failed: too few admitted | failed: other "
        "| admitted, % of capacity (least / median) | within 50 ms (least / median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for t, x in result["tally"].items():
        a, w = x["admitted_share"], x["within_50ms"]
        lines.append(
            f"| {t} | {x['held']} of {x['checks']} | {x['on_time_failed']} | "
            f"{x['ratio_failed']} | {x['other_failed']} | {_pct(a['min'])} / {_pct(a['median'])} "
            f"| {_pct(w['min'])} / {_pct(w['median'])} |"
        )
    held = result["window"]
    lines += [
        "",
        (
            f"Every check held in every round at: {', '.join(held)}."
            if held
            else "No target held every check in every round: on this host, in these hours, "
            "the two bars meet within its noise."
        ),
        "",
        "Per run (round, target, run: admitted of capacity, within 50 ms, checks failed):",
        "",
    ]
    for k, r in enumerate(result["rounds"]):
        for t in r["order"]:
            x = r["targets"][t]
            for name, run in x["runs"].items():
                failed = [w for w, ok in x["checks"].items() if not ok and w.startswith(name)]
                lines.append(
                    f"- {k + 1}, {t}, {name}: {_pct(admitted_share(run, r['capacity']))}, "
                    f"{_pct(on_time_share(run))}"
                    + (f"; **failed**: {'; '.join(failed)}" if failed else "")
                )
    lines += ["", f"Plot: [{result['plot']}]({result['plot']})"]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], out: Path) -> str:
    """Each run's admitted share of the capacity and share on time, by target; the file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    names = result["runs"]
    markers = dict(zip(names, "osD^v<>", strict=False))
    for name in names:
        xs, admitted, within = [], [], []
        for r in result["rounds"]:
            for t, x in r["targets"].items():
                run = x["runs"].get(name)
                if run is None or "admitted" not in run:
                    continue
                xs.append(float(t) + 0.002 * (names.index(name) - (len(names) - 1) / 2))
                admitted.append(100 * (admitted_share(run, r["capacity"]) or 0.0))
                within.append(100 * (on_time_share(run) or 0.0))
        label = f"{name} (its steady sessions)" if name == "burst" else name
        top.scatter(xs, admitted, marker=markers.get(name, "o"), label=label)
        bottom.scatter(xs, within, marker=markers.get(name, "o"), label=label)
    top.axhline(90, color="grey", linewidth=0.8, linestyle=":", label="90 %")
    bottom.axhline(99, color="grey", linewidth=0.8, linestyle=":", label="99 %")
    top.set(ylabel="admitted, % of capacity", title=f"{result['kind']}: runs by target load")
    bottom.set(xlabel="--admit-load", ylabel="% within 50 ms")
    top.legend(fontsize=8)
    bottom.legend(fontsize=8, loc="lower left")
    return report.save_plot(fig, out, f"admit_sweep_{result['kind']}.png")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.admit_sweep", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--kind", default="audio", help="audio (speech_activity) or vad (silero)")
    parser.add_argument("--targets", default="0.85,0.88,0.92,0.95", help="--admit-load values")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--capacity-steps",
        default="50,60,70,80,90,100,110,120,140,160,180,200",
        help="clients per capacity step (as loadtest.overload's); each round searches from "
        "the capacity the round before found",
    )
    parser.add_argument(
        "--capacity-tries", dest="tries", type=int, default=2, help="runs per step; all hold"
    )
    overload.add_run_flags(parser)
    add_setup_flags(parser)
    parser.add_argument("--out", type=Path, default=REPO / "loadtest" / "results" / "admit_sweep")
    args = parser.parse_args()
    args.retry = True  # a refused client tries again after retry_after_ms, as the protocol asks
    targets = [float(t) for t in args.targets.split(",")]
    names = [r.strip() for r in args.runs.split(",") if r.strip()]
    steps = [int(s) for s in args.capacity_steps.split(",")]
    setup = dataclasses.replace(setup_from(args), settle_seconds=5.0)
    off = dataclasses.replace(setup, server_args=(*setup.server_args, *overload.CAPACITY_FLAGS))
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "kind": args.kind,
        "command": "python -m " + " ".join(["loadtest.admit_sweep", *sys.argv[1:]]),
        "machine": machine(),
        "seconds": args.seconds,
        "runs": names,
        "rounds": [],
    }
    cap = steps[0]
    for k in range(args.rounds):
        search = overload.capacity_near(args.kind, steps, cap, args.seconds, off, args.tries)
        cap = search["clients"] or steps[0]
        order = rotated(targets, k)
        found: dict[str, Any] = {
            "capacity": search["clients"],
            "capacity_search": search["steps"],
            "order": [str(t) for t in order],
            "targets": {},
        }
        result["rounds"].append(found)
        print(f"round {k + 1}: capacity {search['clients']}", flush=True)
        if not search["clients"]:
            continue
        for t in order:
            flags = (*setup.server_args, "--admit-load", str(t))
            at = dataclasses.replace(setup, server_args=flags)
            runs = {
                name: overload.run_scenario(name, args.kind, cap, args, at)[1] for name in names
            }
            checks = overload.checks({"capacity_clients": cap, "runs": runs})
            found["targets"][str(t)] = {"runs": runs, "checks": checks}
            print(f"  {t}: {sum(checks.values())} of {len(checks)} checks held", flush=True)
    result["machine"]["load_average_after"] = os.getloadavg()
    result["tally"] = tally(result["rounds"], targets)
    result["window"] = window(result["tally"])
    result["plot"] = plot(result, args.out)
    report.write(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
