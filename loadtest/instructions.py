"""``python -m loadtest.instructions``: the event loop's instructions per chunk, by callgrind.

On a shared machine the CPU time of the same code swings by more than most hot-path changes
(by 30 % from one day to the next here). The instructions a thread runs do not: valgrind's
callgrind counts them, the same whatever else the machine is doing. This runs the socketless
hot-path bench (:mod:`loadtest.hotpath_bench`) under callgrind twice, for ``--low`` and
``--high`` rounds of one chunk per stream, and reports the event-loop thread's instructions per
chunk of the difference, so that start-up and model loading cancel out. The streams ask for a
deadline of a minute (valgrind runs some 50x slower: no chunk may expire) and the models are not
warmed up (ONNX Runtime runs in the worker threads, which are not counted).

Compare two builds by running it from each (a compiled checkout: ``REALTIME_COMPILE=1``, see
setup.py). Needs valgrind (Debian's ``valgrind``); a run takes a few minutes.

    python -m loadtest.instructions
    python -m loadtest.instructions --models examples/models --model silero_vad --chunk-ms 32
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def loop_instructions(
    rounds: int, streams: int, model: str, models: list[Path], chunk_ms: float, out: Path
) -> int:
    """Instructions the event-loop thread ran in one bench of ``rounds`` rounds."""
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--separate-threads=yes",
        f"--callgrind-out-file={out}",
        sys.executable,
        "-m",
        "loadtest.hotpath_bench",
        "--model",
        model,
        "--streams",
        str(streams),
        "--rounds",
        str(rounds),
        "--chunk-ms",
        str(chunk_ms),
        "--no-warm-up",
        "--deadline-ms",
        "60000",
        *(arg for m in models for arg in ("--models", str(m))),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    main_thread = Path(f"{out}-01")  # callgrind numbers the threads from 1, the first first
    totals = re.search(r"^(?:summary|totals): (\d+)", main_thread.read_text(), re.MULTILINE)
    if totals is None:
        raise RuntimeError(f"no totals in {main_thread}")
    return int(totals.group(1))


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="speech_activity")
    parser.add_argument("--models", type=Path, action="append", default=[])
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--chunk-ms", type=float, default=20.0)
    parser.add_argument("--low", type=int, default=10, help="rounds of the first run")
    parser.add_argument("--high", type=int, default=30, help="rounds of the second run")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind)")
    with tempfile.TemporaryDirectory() as tmp:
        low, high = (
            loop_instructions(
                r, args.streams, args.model, args.models, args.chunk_ms, Path(tmp) / f"cg.{r}"
            )
            for r in (args.low, args.high)
        )
    chunks = (args.high - args.low) * args.streams
    print(f"{args.model}: {(high - low) / chunks:,.0f} event-loop instructions per chunk")


if __name__ == "__main__":
    main()
