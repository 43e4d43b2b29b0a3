"""The admission target sweep (loadtest.admit_sweep): its tally, and its rounds' order. The runs
themselves are loadtest.overload's, driven against real servers in test_loadtest_raw.py."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from loadtest import admit_sweep, overload


def run(admitted: int, within: float, **more: Any) -> dict[str, Any]:
    """One run's summary, as loadtest.overload.run_scenario reports it."""
    return {"admitted": admitted, "admitted_within_50ms": within, **more}


def burst(steady: int, within: float, burst_admitted: int = 40) -> dict[str, Any]:
    return run(steady + burst_admitted, 1.0, base=run(steady, within, taken_back=0))


def ran(runs: dict[str, dict[str, Any]], capacity: int) -> dict[str, Any]:
    for r in runs.values():
        r.setdefault("refused_within_100ms", 1.0)
        r.setdefault("admitted_p99_all_ms", 30.0)
        r.setdefault("admitted_lost", 0)
        if "base" in r:
            r["base"].setdefault("admitted_lost", 0)
    return {"runs": runs, "checks": overload.checks({"capacity_clients": capacity, "runs": runs})}


def test_the_tally_sorts_failed_checks_by_kind_and_finds_the_window() -> None:
    """At 0.88 one round admitted too few; at 0.95 one run was late and a burst took steady
    sessions back; only 0.92 held every check in every round. A burst counts its steady
    sessions, less any taken back."""
    rounds = [
        {
            "capacity": 300,
            "targets": {
                "0.88": ran({"2x": run(250, 1.0), "burst": burst(255, 1.0)}, 300),
                "0.92": ran({"2x": run(275, 0.995), "burst": burst(280, 1.0)}, 300),
                "0.95": ran({"2x": run(290, 0.97), "burst": burst(290, 0.999)}, 300),
            },
        },
        {
            "capacity": 250,
            "targets": {
                "0.88": ran({"2x": run(240, 1.0), "burst": burst(230, 1.0)}, 250),
                "0.92": ran({"2x": run(250, 1.0), "burst": burst(250, 1.0)}, 250),
                "0.95": ran({"2x": run(260, 0.999), "burst": burst(260, 1.0)}, 250),
            },
        },
    ]
    rounds[1]["targets"]["0.95"] = ran(
        {"2x": run(260, 0.999), "burst": burst(260, 1.0) | {"base": run(260, 1.0, taken_back=5)}},
        250,
    )
    found = admit_sweep.tally(rounds, [0.88, 0.92, 0.95])
    assert found["0.88"]["ratio_failed"] == 2 and found["0.88"]["on_time_failed"] == 0
    assert found["0.95"]["on_time_failed"] == 1 and found["0.95"]["ratio_failed"] == 0
    assert found["0.95"]["other_failed"] == 1  # the 5 taken back: a steady session dropped
    assert found["0.92"]["held"] == found["0.92"]["checks"] == 2 * 7
    assert found["0.88"]["admitted_share"]["min"] == round(250 / 300, 4)
    assert admit_sweep.admitted_share(rounds[1]["targets"]["0.95"]["runs"]["burst"], 250) == 1.02
    assert found["0.95"]["within_50ms"]["min"] == 0.97
    assert admit_sweep.window(found) == ["0.92"]
    found["0.92"]["held"] -= 1
    assert admit_sweep.window(found) == []


def test_each_round_searches_the_capacity_then_runs_every_target_in_a_rotated_order(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A round searches from the capacity the round before found, every client admitted (its
    chunks still shed by age), and runs each target against it, with ``--admit-load`` last
    among the server's flags; the order turns each round, so that a host slowing through a
    round does not always meet the same target."""
    searched: list[tuple[int, tuple[str, ...]]] = []
    ran_at: list[tuple[str, str, int]] = []

    def capacity_near(kind: str, steps: list[int], near: int, *a: Any) -> dict[str, Any]:
        searched.append((near, a[1].server_args))
        return {"clients": [300, 250][len(searched) - 1], "steps": []}

    def run_scenario(name: str, kind: str, cap: int, args: Any, setup: Any) -> Any:
        target = setup.server_args[-1]
        assert setup.server_args[-2] == "--admit-load"
        ran_at.append((target, name, cap))
        admitted = round(float(target) * cap)
        return None, run(admitted, 1.0, refused_within_100ms=1.0)

    monkeypatch.setattr(overload, "capacity_near", capacity_near)
    monkeypatch.setattr(overload, "run_scenario", run_scenario)
    argv = ["admit_sweep", "--targets", "0.85,0.95", "--rounds", "2", "--runs", "2x,4x"]
    argv += ["--capacity-steps", "200,250,300", "--server-arg=--workers=1", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    admit_sweep.main()
    off = ("--workers=1", "--admit-load", "0", "--shed-by-age", "on")
    assert searched == [(200, off), (300, off)]
    assert ran_at == [
        ("0.85", "2x", 300),
        ("0.85", "4x", 300),
        ("0.95", "2x", 300),
        ("0.95", "4x", 300),
        ("0.95", "2x", 250),
        ("0.95", "4x", 250),
        ("0.85", "2x", 250),
        ("0.85", "4x", 250),
    ]
    result = orjson.loads((tmp_path / "report.json").read_bytes())
    assert result["tally"]["0.85"]["ratio_failed"] == 4  # 255 of 300, 212 of 250
    assert result["window"] == ["0.95"]
    summary = (tmp_path / "summary.md").read_text()
    assert "Every check held in every round at: 0.95." in summary
    assert (tmp_path / result["plot"]).stat().st_size > 0
