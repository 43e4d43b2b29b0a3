"""Scale-out figures: capacity with 1 and 2 server processes, Redis traffic per stream, and how
long a client waits when the process serving it is killed.

Not a test: a benchmark (run it under ``flock /work/bench.lock``). Everything on loopback:

- capacity: the most real-time audio clients (20 ms of 16 kHz audio every 20 ms each, to the
  built-in speech model, from the raw client of :mod:`loadtest.rawload`) a
  ``realtime serve --processes P`` answers >= 99 % within 50 ms of each chunk's due time
  (``python -m loadtest --capacity``'s search), for P = 1 and 2 in the same run, server and
  load unpinned (two processes need both cores);
- Redis: ``--redis`` with the default checkpoints, N audio clients: bytes and commands Redis
  received, per stream per second (``INFO stats`` before and after);
- kill to answer: three ``--redis`` processes behind HAProxy (deploy/haproxy.cfg); a pose client
  streaming at 80 Hz; the process serving it gets SIGKILL; time to its next answer (which needs
  the resume on another process).

    python -m loadtest.scale_bench                       # all three, ~5 minutes
    python -m loadtest.scale_bench --only capacity --steps 50,100,150
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from loadtest import report
from loadtest.__main__ import Setup, run_target
from loadtest.__main__ import capacity as search

REPO = Path(__file__).resolve().parents[1]
WITHIN_MS = 50.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def serve(*args: str) -> tuple[subprocess.Popen[str], str]:
    """A `realtime serve` on loopback; its process and URL once it listens."""
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "realtime", "serve", "--max-sessions-per-ip", "100000"),
            *("--max-connections", "100000", "--max-rate-per-ip", "10000000", str(2**40)),
            *args,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    match = re.search(r"on (ws://\S+)", proc.stdout.readline())
    if match is None:
        proc.kill()
        raise SystemExit(f"the server did not start: {args}")
    return proc, match.group(1)


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def setup(processes: int, *args: str) -> Setup:
    """The raw client (loadtest.rawload), server and load unpinned: two server processes need
    both cores, so one process is measured the same way."""
    return Setup(processes=processes, server_args=args)


def capacity(steps: list[int], seconds: float) -> dict[str, Any]:
    """Per --processes, the most audio clients answered >= 99 % within 50 ms, admission off
    (``--admit-load 0``): what the processes can serve, not where admission would stop."""
    found = {}
    for p in (1, 2):
        print(f"--processes {p}", flush=True)
        run = setup(p, "--admit-load", "0")
        found[f"processes={p}"] = search(["realtime"], "audio", steps, seconds, run)["targets"][
            "realtime"
        ]
    return found


def redis_traffic(clients: int, seconds: float) -> dict[str, Any]:
    """What Redis receives per stream per second with the default checkpoints."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        return {"skipped": "redis-server is not installed"}
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        db = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", folder],
            stdout=subprocess.DEVNULL,
        )
        try:
            client = redis.Redis(port=port)
            for _ in range(500):  # bounded: until it answers
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.01)
            before = client.info("stats")
            url = f"redis://127.0.0.1:{port}"
            rec, server = run_target(
                "realtime", ["audio"] * clients, seconds, setup(1, "--redis", url)
            )
            after = client.info("stats")
            span = seconds + 1.5 + clients / 200  # the run, and its connect time
            got = after["total_net_input_bytes"] - before["total_net_input_bytes"]
            commands = after["total_commands_processed"] - before["total_commands_processed"]
            s = report.summarize(rec, seconds, WITHIN_MS)
            return {
                "streams": clients,
                "seconds": round(span, 1),
                "bytes_in_per_stream_per_s": round(got / clients / span, 1),
                "commands_per_stream_per_s": round(commands / clients / span, 2),
                "bytes_per_command": round(got / max(commands, 1)),
                "within_50ms": s["within_50ms"],
                "p99_ms": s["latency_ms"]["p99"],
                "lost": s["lost"],
                "errors": s["errors"],
                "server_cpu_cores": server["cpu_cores_mean"],
            }
        finally:
            db.terminate()
            db.wait()


async def kill_to_answer(kills: int) -> dict[str, Any]:
    """SIGKILL the process serving a pose stream (behind HAProxy); time to the next answer."""
    from realtime.client import Client

    redis_bin, haproxy = (
        shutil.which("redis-server"),
        shutil.which("haproxy", path="/usr/sbin:/usr/bin"),
    )
    if redis_bin is None or haproxy is None:
        return {"skipped": "needs redis-server and haproxy"}
    with tempfile.TemporaryDirectory() as folder:
        rport = free_port()
        db = subprocess.Popen(
            [redis_bin, "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--dir", folder],
            stdout=subprocess.DEVNULL,
        )
        servers = {}
        for _ in range(kills + 1):
            port = free_port()
            servers[port] = serve(
                "--port", str(port), "--processes", "1", "--redis", f"redis://127.0.0.1:{rport}"
            )[0]
        front = free_port()
        config = (REPO / "deploy" / "haproxy.cfg").read_text()
        config = re.sub(r"bind :\d+", f"bind 127.0.0.1:{front}", config)
        config = re.sub(r"\n    server rt\d \S+", "", config)
        config += "".join(f"    server rt{p} 127.0.0.1:{p}\n" for p in servers)
        (Path(folder) / "haproxy.cfg").write_text(config)
        lb = subprocess.Popen(
            [haproxy, "-db", "-f", str(Path(folder) / "haproxy.cfg")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        took: list[float] = []
        try:
            while sum(map(_ready, servers)) < len(servers):  # each server warm
                await asyncio.sleep(0.1)
            await asyncio.sleep(2.5)  # then HAProxy's health checks see them up (rise 2, 1 s)
            client = await Client.connect(f"ws://127.0.0.1:{front}/")
            stream = await client.open("pose", deadline_ms=10_000)
            pose = np.zeros((3, 7), np.float32)
            pose[:, 6] = 1.0
            for _ in range(kills):
                for _ in range(160):  # 2 s at 80 Hz: a checkpoint is written meanwhile
                    await stream.send(pose)
                    await stream.next()
                    await asyncio.sleep(1 / 80)  # pacing, as a tracker sends
                serving = [p for p, proc in servers.items() if proc.poll() is None and _sessions(p)]
                victim = servers[serving[0]]
                started = time.perf_counter()
                victim.kill()
                await stream.send(pose)  # waits for the resume
                await stream.next()
                took.append(round(1000 * (time.perf_counter() - started), 1))
            await client.close()
        finally:
            lb.terminate()
            for proc in servers.values():
                if proc.poll() is None:
                    stop(proc)
            db.terminate()
            db.wait()
            lb.wait()
    return {"kills": kills, "kill_to_next_answer_ms": took}


def _ready(port: int) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _sessions(port: int) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    match = re.search(r"^realtime_sessions (\S+)$", text, re.MULTILINE)
    return 0.0 if match is None else float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["capacity", "redis", "kill"])
    parser.add_argument("--steps", default="25,50,75,100,125,150,175,200,250,300")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--redis-clients", type=int, default=20)
    parser.add_argument("--out", type=Path, default=REPO / "loadtest" / "results" / "scale.json")
    args = parser.parse_args()
    result: dict[str, Any] = {
        "command": "python -m " + " ".join(["loadtest.scale_bench", *sys.argv[1:]]),
        "cores": os.cpu_count(),
        "load_average_before": os.getloadavg(),
    }
    steps = [int(s) for s in args.steps.split(",")]
    if args.only in (None, "capacity"):
        result["capacity"] = capacity(steps, args.seconds)
    if args.only in (None, "redis"):
        result["redis"] = redis_traffic(args.redis_clients, args.seconds)
        print(f"  redis: {result['redis']}", flush=True)
    if args.only in (None, "kill"):
        result["kill"] = asyncio.run(kill_to_answer(2))
        print(f"  kill: {result['kill']}", flush=True)
    result["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
