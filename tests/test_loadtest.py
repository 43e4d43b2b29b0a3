"""A short run of the load tester, so it cannot rot: a few clients for a few seconds, bounded."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from loadtest import hotpath_bench
from tests.conftest import REPO

#: The errors a busy machine may give a load run: chunks shed, typed (``dropped``: an audio
#: stream's oldest queued chunk, its default overflow policy being drop_oldest).
LOAD_SHED = {"overloaded", "deadline_exceeded", "dropped"}


def loadtest(out: Path, *args: str) -> dict[str, object]:
    # Not pinned: on a shared CI machine one core for the server is one core others also use.
    unpinned = ("--server-cpus", "any", "--load-cpus", "any")
    r = subprocess.run(
        [sys.executable, "-m", "loadtest", "--out", str(out), *unpinned, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    report: dict[str, object] = orjson.loads((out / "report.json").read_bytes())
    for name in ("summary.md", *report["plots"]):  # type: ignore[misc]
        assert (out / name).stat().st_size > 0
    return report


def test_all_three_targets_and_the_capacity_search(tmp_path: Path) -> None:
    report = loadtest(
        tmp_path,
        *("--clients", "4", "--seconds", "2", "--procs", "2"),
        *("--capacity", "--capacity-steps", "2,3", "--capacity-seconds", "1.5"),
    )
    runs = report["runs"]
    assert isinstance(runs, dict) and set(runs) == {"realtime", "naive", "echo"}
    for name, run in runs.items():
        # 4 clients x 50 chunks/s x 2 s, every one answered (on a busy machine some may be
        # answered late, or with a typed overloaded/deadline_exceeded: no timing asserts here)
        assert run["offered"] == 400, name
        assert run["lost"] == 0 and run["refused"] == 0 and run["early_answers"] == 0, run
        assert set(run["errors"]) <= LOAD_SHED, run
        assert run["server"]["cpu_cores_mean"] is not None
        # None only if nothing was answered in the steady window (a stalled busy machine); 0
        # when the server's CPU in that window is under one /proc tick (10 ms): the echo at
        # 200 chunks a second spends ~5 ms a second on a fast day
        per_chunk = run["server"]["cpu_us_per_chunk"]
        assert per_chunk is None or per_chunk >= 0, run["server"]
    assert runs["realtime"]["split_ms"]["inference"]["p50"] is not None
    cpu_ratios = {
        f"server CPU per chunk realtime / {base}"
        for base in ("naive", "echo")
        if runs["realtime"]["server"]["cpu_us_per_chunk"]
        and runs[base]["server"]["cpu_us_per_chunk"]
    }
    assert set(report["ratios"]) == {  # type: ignore[arg-type]
        "p99 naive / realtime",
        "answered realtime / naive",
        "p99 echo / realtime",
        "answered realtime / echo",
        *cpu_ratios,
    }
    capacity = report["capacity"]
    assert isinstance(capacity, dict) and set(capacity["targets"]) == set(runs)
    for found in capacity["targets"].values():
        # steps up until one misses the bar; the capacity is the last step that met it
        steps = found["steps"]
        assert [s["clients"] for s in steps] == [2, 3][: len(steps)]
        assert all(s["ok"] for s in steps[:-1])
        met = [s["clients"] for s in steps if s["ok"]]
        assert found["clients"] == (met[-1] if met else 0)
    assert "Capacity (audio" in (tmp_path / "summary.md").read_text()


def test_a_mix_of_kinds_against_realtime_alone(tmp_path: Path) -> None:
    report = loadtest(
        tmp_path, "--mix", "audio=1,pose=2,video=1", "--seconds", "2", "--client", "websockets"
    )
    (run,) = report["runs"].values()  # type: ignore[attr-defined]
    assert run["offered"] == 2 * (50 + 2 * 80 + 20)
    assert set(run["by_kind"]) == {"audio", "pose", "video"}
    assert run["lost"] == 0 and set(run["errors"]) <= LOAD_SHED, run


def test_readme_figures_lists_every_performance_command() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "loadtest.readme_figures", "--list"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    listed = r.stdout.splitlines()
    assert len(listed) == 5
    assert sum(c.startswith("python -m loadtest.scheduler_bench") for c in listed) == 1
    assert sum(c.startswith("python -m loadtest.oip_bench") for c in listed) == 1
    assert all("--out docs/perf/" in c for c in listed)


def test_the_side_by_side_table(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            *(sys.executable, "-m", "loadtest.table", "--out", str(tmp_path)),
            *("--points", "audio=2", "--targets", "echo", "--seconds", "1", "--repeat", "2"),
            *("--capacity-steps-audio", "2", "--capacity-seconds", "1", "--capacity-tries", "2"),
            *("--server-cpus", "any", "--load-cpus", "any"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    report = orjson.loads((tmp_path / "report.json").read_bytes())
    (point,) = report["points"]
    echo = point["runs"]["echo"]
    assert (point["kind"], point["clients"], echo["offered"]) == ("audio", 2, 100)
    # CPU is read from /proc in 10 ms ticks: a starved echo's steady window can read 0.
    assert echo["lost"] == 0 and echo["server"]["cpu_us_per_chunk"] is not None
    assert len(echo["cpu_us_per_chunk_rounds"]) == 2  # the cell shows the median round's
    assert echo["server"]["cpu_us_per_chunk"] in echo["cpu_us_per_chunk_rounds"]
    found = report["capacity"]["audio"]["targets"]["echo"]
    assert [s["clients"] for s in found["steps"]] == [2, 2]  # both tries of the step
    assert found["clients"] == (2 if all(s["ok"] for s in found["steps"]) else 0)
    table = (tmp_path / "table.md").read_text()
    assert "| speech_activity (20 ms chunks), 2 clients (100 chunks/s) |" in table
    for name in report["plots"]:
        assert (tmp_path / name).stat().st_size > 0


def test_the_open_inference_protocol_benchmark_drives_each_door(tmp_path: Path) -> None:
    out = tmp_path / "oip.json"
    r = subprocess.run(
        [
            *(sys.executable, "-m", "loadtest.oip_bench", "--seconds", "0.5"),
            *("--concurrency", "2", "--out", str(out)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    figures = orjson.loads(out.read_bytes())
    runs = figures["runs"]["concurrency 2"]
    assert set(runs) == {"rest", "grpc", "websocket"}
    for door, run in runs.items():
        # On a busy machine some requests may be shed (typed); none may fail otherwise.
        assert run["answered"] > 0, (door, run)
        assert set(run["errors"]) <= {"deadline_exceeded", "overloaded"}, (door, run)


def test_the_hot_path_bench_answers_every_chunk_of_a_fixed_number_of_rounds() -> None:
    """The bench :mod:`loadtest.instructions` runs under callgrind: so many rounds, every chunk
    answered (a stream that failed to open would make it measure only refusals)."""
    out = asyncio.run(
        hotpath_bench.run(
            "speech_activity", 4, 0.0, False, rounds_wanted=3, warm_up=False, deadline_ms=60_000
        )
    )
    assert out["chunks"] == out["frames_out"] == 12
    with pytest.raises(SystemExit, match="not opened"):
        asyncio.run(hotpath_bench.run("speech_activity", 1, 0.0, False, deadline_ms=600_000))


def test_the_hot_path_bench_hands_chunks_over_stale_to_measure_what_a_refusal_costs() -> None:
    """``--stale-ms`` past the deadline: every chunk refused ``deadline_exceeded`` before any
    work, each answered by its error; short of it, every chunk served. The deadline is long, so
    that a slow first batch on a busy machine cannot expire a chunk that was to be served."""

    def bench(stale_ms: float) -> dict[str, Any]:
        return asyncio.run(
            hotpath_bench.run(
                "speech_activity",
                4,
                0.0,
                False,
                rounds_wanted=3,
                warm_up=False,
                deadline_ms=60_000,
                stale_ms=stale_ms,
            )
        )

    stale = bench(61_000.0)
    assert stale["chunks"] == stale["frames_out"] == 12
    assert stale["errors"] == {"deadline_exceeded": 12}
    fresh = bench(200.0)
    assert fresh["chunks"] == fresh["frames_out"] == 12 and not fresh["errors"]


@pytest.mark.parametrize("door", [False, True])
def test_the_connection_cost_tool_measures_the_server_per_connection(door: bool) -> None:
    """``loadtest.connection_cost`` gives the figure admission's CONNECTION_COST stands for
    (``--door``: DOOR_COST, every handshake answered 503 server_busy, or the tool fails)."""
    r = subprocess.run(
        [sys.executable, "-m", "loadtest.connection_cost", "--connections", "100"]
        + (["--door"] if door else []),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    figures = orjson.loads(r.stdout)
    assert figures["connections"] == 100 and figures["refused_at_the_door"] is door
    assert figures["connection_cost_ms_assumed"] == (0.06 if door else 0.6)
    if not door:  # 100 connections cost tens of ms at least: ticks of /proc's 10 ms clock
        assert figures["server_cpu_ms_per_connection"] > 0.0
    else:  # 100 refusals at the door may cost less than one tick
        assert figures["server_cpu_ms_per_connection"] >= 0.0
