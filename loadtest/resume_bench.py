"""How long a client is without answers when its connection drops and it resumes.

Not a test: a benchmark. A real ``realtime serve`` process on loopback; a Python client streams
poses, its TCP connection is aborted (as a network drops it), and the time from the cut to the
next answer, which needs the resume to have happened, is measured, ``--cuts`` times.

    python -m loadtest.resume_bench --cuts 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import time

import numpy as np

from realtime.client import Client


async def measure(cuts: int) -> dict[str, float]:
    """Cut-to-next-answer times (ms) over ``cuts`` cuts of one streaming client."""
    server = subprocess.Popen(
        [sys.executable, "-m", "realtime", "serve", "--port", "0", "--processes", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        match = re.search(r"on (ws://\S+)", server.stdout.readline())
        assert match is not None, "the server did not start"
        client = await Client.connect(match.group(1))
        stream = await client.open("pose")
        pose = np.zeros((3, 7), np.float32)
        pose[:, 6] = 1.0
        took: list[float] = []
        for _ in range(cuts):
            await stream.send(pose)
            await stream.next()
            started = time.perf_counter()
            client.ws.transport.abort()
            await stream.send(pose)  # waits for the resume
            await stream.next()
            took.append(1000 * (time.perf_counter() - started))
        await client.close()
        assert client.resumes == cuts
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {
        "cuts": cuts,
        "p50_ms": round(statistics.median(took), 2),
        "p90_ms": round(statistics.quantiles(took, n=10)[-1], 2),
        "max_ms": round(max(took), 2),
    }


def main() -> None:
    """Run the benchmark and print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuts", type=int, default=50)
    print(json.dumps(asyncio.run(measure(parser.parse_args().cuts))))


if __name__ == "__main__":
    main()
