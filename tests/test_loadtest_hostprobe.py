"""The host probe (loadtest.hostprobe): what it reports of stops and slowdowns, and a real run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from loadtest import hostprobe
from tests.conftest import load_records

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str) -> list[bytes]:
    """The words ``code`` prints, run in a Python of its own (priorities are per process)."""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, check=True, timeout=60, capture_output=True
    )
    return out.stdout.split()


def test_stops_and_slowdowns_are_listed_longest_first_at_seconds_into_the_run() -> None:
    start = 100.0
    t = start + np.arange(1000) * hostprobe.PERIOD
    late = np.full(1000, 0.0001)
    work = np.full(1000, 50e-6)
    late[300] = 0.015  # stopped 15 ms at 3 s
    late[700] = 0.004  # 4 ms at 7 s
    late[800] = 0.0019  # under STOP_MS: not a stop
    work[500:503] = 200e-6  # one window (50 ms) 2.8x slower on average, at 5 s
    work[600:610] = 80e-6  # two windows 1.6x, at 6 s: one spell
    work[900] = 120e-6  # its window 1.28x: not slowed
    s = hostprobe.summarize(t, late, work, start)
    assert s["samples"] == 1000 and s["realtime"]
    assert s["stops"] == 2 and s["stopped_ms"] == 19.0
    assert s["longest_stops"] == [[3.0, 15.0], [7.0, 4.0]]
    assert s["slowed_ms"] == 150
    assert s["longest_slowed"] == [[6.0, 100, 1.6], [5.0, 50, 2.8]]
    line = hostprobe.describe(s)
    assert "2 stops" in line and "15 ms at 3 s" in line and "for 150 ms in all" in line
    assert "100 ms at 6 s (1.6x)" in line
    assert "real-time" not in line
    # Slowed windows count only within the given seconds: while the server is busy. Stops
    # count from the run's start to their end: a stopped core stops a server not yet busy too.
    later = hostprobe.summarize(t, late, work, start, within=(5.5, 10.0))
    assert later["samples"] == 450 and later["stops"] == 2
    assert later["longest_stops"] == [[3.0, 15.0], [7.0, 4.0]]
    assert later["longest_slowed"] == [[6.0, 100, 1.6]]
    # ... not before the run's start.
    before = hostprobe.summarize(t, late, work, start + 3.5, within=(2.0, 4.0))
    assert before["stops"] == 1 and before["longest_stops"] == [[3.5, 4.0]]
    assert "not at real-time" in hostprobe.describe(hostprobe.summarize(t, late, work, 0, False))


def test_a_slowdown_longer_than_half_the_run_is_listed() -> None:
    """Slowed windows are measured against the run's faster ones, not the median: a host that
    slowed the core 1.5x for 6 s of 9 made the median the slowed pace, and nothing was seen."""
    start = 100.0
    t = start + np.arange(900) * hostprobe.PERIOD
    work = np.full(900, 50e-6)
    work[250:850] = 75e-6  # 1.5x from 2.5 s to 8.5 s
    s = hostprobe.summarize(t, np.zeros(900), work, start)
    assert s["work_median_us"] == 75.0 and s["work_base_us"] == 50.0
    assert s["slowed_ms"] == 6000
    assert s["longest_slowed"] == [[2.5, 6000, 1.5]]


def test_a_probe_that_did_not_run_says_so() -> None:
    empty = np.zeros(0)
    assert hostprobe.summarize(empty, empty, empty, 0.0)["samples"] == 0
    assert hostprobe.describe({"samples": 0, "error": "gone"}) == "no samples (gone)"


def test_a_real_probe_samples_the_core_for_as_long_as_asked(tmp_path: Path) -> None:
    out = tmp_path / "probe.npz"
    cpu = min(os.sched_getaffinity(0))
    args = ["--cpu", str(cpu), "--seconds", "0.3", "--out", str(out)]
    subprocess.run(
        [sys.executable, "-m", "loadtest.hostprobe", *args],
        cwd=REPO,
        check=True,
        timeout=60,
    )
    with np.load(out) as d:
        t, work = d["t"], d["work"]
        assert t.size == 30 and np.all(np.diff(t) > 0)
        assert np.all(work > 0)
    s = hostprobe.load(out, float(t[0]))
    assert s["samples"] == 30 and s["work_median_us"] > 0


def test_a_probe_leaves_real_time_priority_before_it_saves_and_exits() -> None:
    """The probe's samples are saved and its interpreter exits at normal priority: at real-time
    priority on the server's core that took 13-14 ms, a stop of the core at the end of every
    run (half a second after its last chunk was due)."""
    cpu = min(os.sched_getaffinity(0))
    code = (
        "import os\n"
        "from loadtest import hostprobe\n"
        f"samples, realtime = hostprobe.probe({cpu}, 0.05)\n"
        "print(samples['t'].size, os.sched_getscheduler(0) == os.SCHED_OTHER)\n"
    )
    count, other = run_python(code)
    assert count == b"5"
    assert other == b"True"


def test_chunks_due_in_a_host_spell_or_its_drain_are_set_apart_in_a_figure_beside() -> None:
    from loadtest.clients import OK, UNUSED
    from loadtest.overload import HOST_DRAIN_SECONDS, outside_host_spells

    # Two admitted clients and one refused, a chunk due every 0.1 s from 100.0 s for 2 s;
    # late (80 ms) from 100.5 s to 100.7 s: during a spell of the probe's at 100.5 s.
    due = np.tile(100.0 + 0.1 * np.arange(20), (3, 1))
    received = due + 0.005
    late = (due >= 100.5) & (due < 100.8)
    received[late] += 0.075
    outcome = np.full(due.shape, OK, np.int32)
    outcome[2] = UNUSED
    rec = load_records(due, received, outcome, np.array([True, True, False]))
    host = {"0": {"start": 100.0, "longest_stops": [], "longest_slowed": [[0.5, 200, 1.5]]}}
    out = outside_host_spells(rec, host)
    # Set apart: due from 100.5 to 100.7 + the drain (100.5-101.2: 8 chunks a client).
    assert HOST_DRAIN_SECONDS == 0.5
    assert out == {"chunks": 24, "set_apart": 16, "within_50ms": 1.0}
    # Without the spell the late ones count.
    none = outside_host_spells(rec, {"0": {"start": 100.0}})
    assert none["chunks"] == 40 and none["within_50ms"] == 0.85


def test_the_plot_over_time_shades_the_host_spells(tmp_path: Path) -> None:
    from loadtest.clients import OK
    from loadtest.overload import on_time_over_time, plot_over_time

    due = np.tile(100.0 + 0.1 * np.arange(20), (2, 1))
    outcome = np.full(due.shape, OK, np.int32)
    rec = load_records(due, due + 0.005, outcome, np.array([True, True]), np.array([99.9, 99.95]))
    host = {"0": {"start": 100.0, "longest_stops": [[1.2, 15.0]], "longest_slowed": []}}
    series = on_time_over_time(rec, [(99.9 + 0.1 * k, 0.08 * k) for k in range(25)])
    echo = {**series, "server_cores": [0.5] * len(series["t"])}
    name = plot_over_time(rec, series, tmp_path, "vad_4x", "a run", host, {"echo": echo})
    assert (tmp_path / name).stat().st_size > 10_000
    bare = on_time_over_time(rec)  # no CPU sampled: two panels, no third
    assert plot_over_time(rec, bare, tmp_path, "vad_2x", "a run") == "overload_vad_2x.png"


def test_a_slowdown_takes_its_share_of_the_core_then_ends_at_normal_priority() -> None:
    """``--slow``: the spinner takes ``1 - 1/factor`` of each millisecond of its core for as
    long as asked (here half of 0.4 s), and leaves real-time priority before it exits: the
    interpreter's exit took ~12 ms, a stop of the core at the end of every spell."""
    cpu = min(os.sched_getaffinity(0))
    code = (
        "import os, time\n"
        "from loadtest import hostprobe\n"
        "t0 = time.process_time()\n"
        f"hostprobe.slow({cpu}, time.monotonic(), 0.4, 2.0)\n"
        "print(time.process_time() - t0, os.sched_getscheduler(0) == os.SCHED_OTHER)\n"
    )
    spun, other = run_python(code)
    # 0.2 s of CPU asked: it sleeps between its spins (never the whole 0.4 s), and it spun.
    # How much of its share a busy host left it is the host's, not asserted.
    assert 0.01 < float(spun) < 0.3
    assert other == b"True"


def test_a_slowdown_needs_a_factor_above_one() -> None:
    args = ["--cpu", "0", "--seconds", "0.1", "--slow", "1"]
    run = subprocess.run(
        [sys.executable, "-m", "loadtest.hostprobe", *args],
        cwd=REPO,
        timeout=60,
        capture_output=True,
    )
    assert run.returncode == 2 and b"a factor above 1" in run.stderr
