"""The codebase stays `mypy --strict` and `ruff` clean (the commands CI and developers run)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_mypy_strict() -> None:
    r = _run(sys.executable, "-m", "mypy", "--strict", "realtime")
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_check_and_format() -> None:
    r = _run(sys.executable, "-m", "ruff", "check", "realtime", "tests", "loadtest")
    assert r.returncode == 0, r.stdout + r.stderr
    r = _run(sys.executable, "-m", "ruff", "format", "--check", "realtime", "tests", "loadtest")
    assert r.returncode == 0, r.stdout + r.stderr
