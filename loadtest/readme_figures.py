"""``python -m loadtest.readme_figures``: every figure of the README's "Performance" section.

Runs, in order, each ``python -m loadtest...`` command listed in that section (the README is
the single list, so the docs and the run cannot drift apart) and writes
``docs/perf/machine.json`` with the cores and the load average before and after, so figures
taken on a shared machine say how busy it was. ``--list`` prints the commands without running.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parents[1]


def commands(readme: Path = REPO / "README.md") -> list[list[str]]:
    """The indented ``python -m loadtest`` commands of the README's "Performance" section."""
    section = readme.read_text().split("\n## Performance\n", 1)[1].split("\n## ", 1)[0]
    found = []
    for line in section.splitlines():
        words = line.split()
        if line.startswith("    ") and words[:3] in (
            ["python", "-m", "loadtest"],
            ["python", "-m", "loadtest.scheduler_bench"],
            ["python", "-m", "loadtest.oip_bench"],
        ):
            found.append(words)
    return found


def main() -> None:
    """Run every README Performance command and record the machine they ran on."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.readme_figures")
    parser.add_argument("--list", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args()
    todo = commands()
    if args.list:
        for words in todo:
            print(" ".join(words))
        return
    machine: dict[str, object] = {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_before": os.getloadavg(),
        "commands": [" ".join(w) for w in todo],
    }
    started = time.monotonic()
    for words in todo:
        print("$", " ".join(words), flush=True)
        subprocess.run([sys.executable, *words[1:]], cwd=REPO, check=True)
    machine["load_average_after"] = os.getloadavg()
    machine["minutes"] = round((time.monotonic() - started) / 60.0, 1)
    out = REPO / "docs" / "perf" / "machine.json"
    out.write_bytes(orjson.dumps(machine, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
