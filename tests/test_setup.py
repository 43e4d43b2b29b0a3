"""The compiled build (setup.py): what ``pip install .`` ships runs the per-chunk tests.

The rest of the suite runs on the editable install, which is pure Python. This builds the wheel
as ``pip install .`` does (mypyc and a C compiler; offline, from this environment's mypy, numpy
and orjson), checks that every module setup.py lists came out compiled, and runs the tests of
those modules, and the resume and hand-off tests that pickle their objects, against it.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_BUILT = shutil.ignore_patterns("*.so", "__pycache__")

#: The tests of the compiled modules, and those that pickle their objects (resume, hand-off).
TESTS = [
    "tests/test_framing.py",
    "tests/test_protocol.py",
    "tests/test_connection.py",
    "tests/test_session.py",
    "tests/test_audio.py",
    "tests/test_batching.py",
    "tests/test_scheduler.py",
    "tests/test_ratelimit.py",
    "tests/events",
    "tests/test_handoff.py",
    "tests/test_resume.py",
    "tests/test_server.py",
]


def _compiler() -> str | None:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc)


@pytest.mark.skipif(_compiler() is None, reason="no C compiler here: the build is pure Python")
def test_the_compiled_build_passes_the_per_chunk_tests(tmp_path: Path) -> None:
    # A copy: setuptools builds in the source's build/, where an older build would leak in.
    source = tmp_path / "source"
    shutil.copytree(REPO / "realtime", source / "realtime", ignore=_BUILT)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    env = {**os.environ, "REALTIME_COMPILE": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "wheel"),
        ],
        cwd=tmp_path,
        env=env,
        check=True,
        timeout=600,
    )
    (wheel,) = (tmp_path / "wheel").glob("realtime-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)

    # -P: not the checkout's own realtime/ (the working directory) ahead of the built one.
    env = {**os.environ, "PYTHONPATH": str(site)}
    listed = [m.removesuffix(".py").replace("/", ".").removesuffix(".__init__") for m in _listed()]
    check = (
        "import importlib, sys\n"
        f"for name in {listed!r}:\n"
        "    path = importlib.import_module(name).__file__\n"
        "    assert path.endswith('.so') and path.startswith(sys.argv[1]), (name, path)\n"
    )
    # -W error: an installed build imports without a warning (its files' times say nothing).
    subprocess.run(
        [sys.executable, "-P", "-W", "error", "-c", check, str(site)], env=env, check=True
    )
    tests = subprocess.run(
        [
            sys.executable,
            "-P",
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--import-mode=append",
            *TESTS,
        ],
        cwd=REPO,
        env=env,
        timeout=600,
        capture_output=True,
        text=True,
    )
    assert tests.returncode == 0, tests.stdout[-6000:] + tests.stderr[-2000:]


def _listed() -> list[str]:
    """setup.py's COMPILED list, read without running setup.py."""
    source = (REPO / "setup.py").read_text()
    block = source.split("COMPILED = [", 1)[1].split("]", 1)[0]
    return [line.strip().strip(",").strip('"') for line in block.splitlines() if line.strip()]


def test_the_build_has_the_types_of_everything_the_compiled_modules_import() -> None:
    """mypyc type-checks the compiled modules and what they import, inside pip's isolated build
    environment, which holds only the build requirements: a typed package missing there fails
    the compile (it did: framing.py's websockets), and `pip install .` falls back to pure
    Python. So every third-party package those modules reach is a build requirement, or one
    mypy is told to ignore (no types)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    required = {
        re.split(r"[<>=!;\[ ]", r, maxsplit=1)[0] for r in config["build-system"]["requires"]
    }
    provided = {name.lower().replace("-", "_") for name in required}
    ignored = {
        m.removesuffix(".*")
        for override in config["tool"]["mypy"]["overrides"]
        if override.get("ignore_missing_imports")
        for m in override["module"]
    }
    provided |= {"mypy_extensions"}  # mypy's own dependency
    seen: set[str] = set()
    todo = [m.removesuffix(".py").replace("/", ".").removesuffix(".__init__") for m in _listed()]
    reached: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = REPO / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = REPO / name.replace(".", "/") / "__init__.py"
        if not path.exists():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            else:
                continue
            for imported in names:
                if imported.split(".")[0] == "realtime":
                    todo.append(imported)
                elif imported.split(".")[0] not in sys.stdlib_module_names:
                    reached.add(imported.split(".")[0])
    missing = {m for m in reached if m not in provided and m not in ignored}
    assert not missing, f"add to [build-system] requires in pyproject.toml: {sorted(missing)}"
