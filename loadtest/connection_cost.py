"""``python -m loadtest.connection_cost``: the server CPU one WebSocket connection costs.

Admission control counts every arriving handshake, admitted or refused, as
``realtime.admission.CONNECTION_COST`` of CPU, so that a crowd's handshakes are not taken for
what streaming sessions cost (docs/scheduler.md). That figure depends on the host: 0.6 ms in
session 11, 1.3-1.6 ms on session 13's. This measures it here: it starts ``realtime serve`` on
loopback (pinned to ``--server-cpu`` when the machine has another core for the clients) and
opens ``--connections`` connections, ``--concurrency`` at a time, each a handshake, a hello, the
welcome and a close: an admitted session that does nothing, which costs at least what a refused
one does (a refusal builds no session). With ``--door``, every handshake is refused at the front
door instead (HTTP 503 ``server_busy`` before websockets takes it, as a crowd is refused: the
server is started with ``--max-connections 0``, which refuses there too): that is
``realtime.admission.DOOR_COST``. The server's CPU (user + system, from /proc) over those
connections, per connection, is printed as JSON. Bounded: loopback only, a few seconds.

    python -m loadtest.connection_cost
    python -m loadtest.connection_cost --connections 3000 --concurrency 20
    python -m loadtest.connection_cost --door
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

import orjson
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from loadtest.scale_bench import REPO, free_port, stop
from realtime.admission import CONNECTION_COST, DOOR_COST


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def connections(url: str, count: int, concurrency: int, door: bool = False) -> None:
    """``count`` connections, ``concurrency`` at a time: handshake, hello, welcome, close (or,
    ``door``: a handshake answered 503 ``server_busy``)."""
    hello = orjson.dumps({"type": "hello", "protocol": 1}).decode()
    left = iter(range(count))

    async def client() -> None:
        for _ in left:
            if door:
                try:
                    await connect(url, compression=None)
                except InvalidStatus as e:
                    if orjson.loads(e.response.body or b"{}").get("code") == "server_busy":
                        continue
                raise SystemExit("the server did not refuse the handshake server_busy")
            async with connect(url, compression=None) as ws:
                await ws.send(hello)
                welcome = orjson.loads(await ws.recv())
                if welcome.get("type") != "welcome":
                    raise SystemExit(f"the server answered hello with {welcome}")

    await asyncio.gather(*(client() for _ in range(concurrency)))


def main() -> None:
    """Command-line entry point: prints the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument(
        "--door", action="store_true", help="every handshake refused at the door (HTTP 503)"
    )
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    pinned = len(cpus) > 1 and args.server_cpu in cpus
    port = free_port()
    command = [
        *(sys.executable, "-m", "realtime", "serve", "--port", str(port)),
        *("--max-sessions-per-ip", "100000", "--max-connections", "0" if args.door else "100000"),
        *("--max-rate-per-ip", "10000000", str(2**40)),
    ]
    if pinned:  # the server on its core, these clients on the others
        command = ["taskset", "-c", str(args.server_cpu), *command]
        os.sched_setaffinity(0, [c for c in cpus if c != args.server_cpu])
    proc = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stdout is not None
        if "serving" not in proc.stdout.readline():
            raise SystemExit("the server did not start")
        url = f"ws://127.0.0.1:{port}/"
        asyncio.run(connections(url, max(1, args.concurrency), args.concurrency, args.door))
        cpu0, t0 = process_cpu(proc.pid), time.monotonic()
        asyncio.run(connections(url, args.connections, args.concurrency, args.door))
        cpu, seconds = process_cpu(proc.pid) - cpu0, time.monotonic() - t0
    finally:
        stop(proc)
    print(
        orjson.dumps(
            {
                "connections": args.connections,
                "concurrency": args.concurrency,
                "server_pinned": pinned,
                "seconds": round(seconds, 2),
                "server_cpu_ms_per_connection": round(1000 * cpu / args.connections, 3),
                "refused_at_the_door": args.door,
                "connection_cost_ms_assumed": round(
                    1000 * (DOOR_COST if args.door else CONNECTION_COST), 3
                ),
            }
        ).decode()
    )


if __name__ == "__main__":
    main()
