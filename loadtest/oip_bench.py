"""One-shot requests per second on the three front doors: REST, gRPC and WebSocket, same model.

Not a test: a benchmark. One real ``realtime serve --processes 1 --grpc-port`` process on
loopback; for each door, ``concurrency`` callers each send one request for one ``pose`` frame,
wait for its answer and send the next, for ``seconds``. REST and gRPC requests are Open Inference
Protocol infer calls (binary tensors over REST, raw contents over gRPC), made by lean asyncio
clients so that the figures are the server's; a WebSocket caller is ``realtime.client`` with a
session and one stream of its own, results as binary frames. The doors take turns in
``--rounds`` rounds, so that a change in the machine's load falls on all three. Run it under
``flock /work/bench.lock`` on a shared machine.

    python -m loadtest.oip_bench --seconds 6 --concurrency 1,32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson

from realtime import oip_grpc
from realtime.client import Client
from realtime.protocol import Result

MODEL = "pose"
Call = Callable[[], Awaitable[None]]


def _frame() -> np.ndarray[Any, Any]:
    pose = np.zeros((1, 3, 7), np.float32)
    pose[..., 6] = 1.0
    return pose


async def _rest_callers(port: int, n: int) -> tuple[list[Call], Call]:
    """Keep-alive HTTP/1.1 connections, each sending binary-tensor infer requests."""
    x = _frame()
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "pose",
                    "datatype": "FP32",
                    "shape": [1, 3, 7],
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    body = head + x.tobytes()
    request = (
        f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: bench\r\n"
        f"Inference-Header-Content-Length: {len(head)}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(n)]

    def caller(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Call:
        async def call() -> None:
            writer.write(request)
            raw = await reader.readuntil(b"\r\n\r\n")
            status = raw[9:12]
            length = int(re.search(rb"Content-Length: (\d+)", raw).group(1))  # type: ignore[union-attr]
            body = await reader.readexactly(length)
            if status != b"200":
                raise RuntimeError(orjson.loads(body).get("code", status.decode()))

        return call

    async def close() -> None:
        for _, writer in conns:
            writer.close()

    return [caller(r, w) for r, w in conns], close


async def _grpc_callers(port: int, n: int) -> tuple[list[Call], Call]:
    """ModelInfer calls on one channel (HTTP/2 multiplexes the callers)."""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    infer = channel.unary_unary(
        f"/{oip_grpc.SERVICE}/ModelInfer",
        request_serializer=oip_grpc.M["ModelInferRequest"].SerializeToString,
        response_deserializer=oip_grpc.M["ModelInferResponse"].FromString,
    )
    x = _frame()
    request = oip_grpc.M["ModelInferRequest"](model_name=MODEL)
    request.inputs.add(name="pose", datatype="FP32", shape=[1, 3, 7])
    request.raw_input_contents.append(x.tobytes())

    async def call() -> None:
        try:
            await infer(request)
        except grpc.aio.AioRpcError as e:
            raise RuntimeError((e.details() or "").split(":")[0]) from None

    async def close() -> None:
        await channel.close()

    return [call] * n, close


async def _ws_callers(url: str, n: int) -> tuple[list[Call], Call]:
    """One WebSocket session per caller (as one connection per REST caller), one stream each,
    results as binary frames (as REST's binary tensors)."""
    clients = [await Client.connect(url) for _ in range(n)]
    x = _frame()[0]
    streams = [await c.open(MODEL, results="binary") for c in clients]

    def caller(stream: Any) -> Call:
        async def call() -> None:
            await stream.send(x)
            msg = await stream.next()
            if not isinstance(msg, Result):
                raise RuntimeError(getattr(msg, "code", type(msg).__name__))

        return call

    async def close() -> None:
        for client in clients:
            await client.close()

    return [caller(s) for s in streams], close


class Tally:
    """One door's answers over its rounds: latencies (seconds), errors by code, time driven."""

    def __init__(self) -> None:
        self.took: list[float] = []
        self.failed: Counter[str] = Counter()
        self.elapsed = 0.0

    def figures(self) -> dict[str, Any]:
        """Requests a second, answered, errors, p50 and p99 (ms)."""
        took = sorted(self.took)
        return {
            "requests_per_second": round(len(took) / self.elapsed, 1),
            "answered": len(took),
            "errors": dict(self.failed),
            "p50_ms": round(1000 * statistics.median(took), 3) if took else None,
            "p99_ms": round(1000 * took[int(0.99 * (len(took) - 1))], 3) if took else None,
        }


async def _drive(callers: list[Call], seconds: float, tally: Tally) -> None:
    """Each caller in a closed loop for ``seconds``; answers and errors go to ``tally``."""
    took, failed = tally.took, tally.failed
    stop = time.perf_counter() + seconds

    async def loop(call: Call) -> None:
        while (now := time.perf_counter()) < stop:
            try:
                await call()
            except Exception as e:
                failed[str(e)] += 1
            else:
                took.append(time.perf_counter() - now)

    started = time.perf_counter()
    await asyncio.gather(*(loop(c) for c in callers))
    tally.elapsed += time.perf_counter() - started


async def measure(seconds: float, levels: list[int], rounds: int = 3) -> dict[str, Any]:
    """Start the server, drive each door at each concurrency (``seconds`` in all, in
    ``rounds`` turns), stop it."""
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "realtime", "serve", "--port", "0", "--grpc-port", "0"),
            # One process: a gRPC channel is one connection, so it would reach one process of
            # several while the WebSocket and REST callers were spread over all of them.
            *("--processes", "1", "--max-sessions-per-ip", "100000"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        url = grpc_port = None
        while grpc_port is None:
            line = server.stdout.readline()
            if not line:
                raise SystemExit("the server did not start")
            if match := re.search(r"on (ws://\S+)", line):
                url = match.group(1)
            if match := re.search(r"grpc: \S+:(\d+)", line):
                grpc_port = int(match.group(1))
        assert url is not None
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        doors: dict[str, Callable[[int], Awaitable[tuple[list[Call], Call]]]] = {
            "rest": lambda n: _rest_callers(port, n),
            "grpc": lambda n: _grpc_callers(grpc_port, n),
            "websocket": lambda n: _ws_callers(url, n),
        }
        runs: dict[str, dict[str, Any]] = {}
        for n in levels:
            opened = {door: await make(n) for door, make in doors.items()}
            tallies = {door: Tally() for door in doors}
            for callers, _ in opened.values():
                await _drive(callers, min(0.5, seconds), Tally())  # warm: first batches
            for _ in range(rounds):
                for door, (callers, _) in opened.items():
                    await _drive(callers, seconds / rounds, tallies[door])
            runs[f"concurrency {n}"] = {door: t.figures() for door, t in tallies.items()}
            for _, close in opened.values():
                await close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {
        "model": MODEL,
        "seconds": seconds,
        "rounds": rounds,
        "load_before_after": os.getloadavg(),
        "cores": os.cpu_count(),
        "runs": runs,
    }


def main() -> None:
    """Run the benchmark; print (and with --out, write) its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per door and concurrency")
    parser.add_argument("--concurrency", default="1,32", help="callers at once, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="turns the doors take")
    parser.add_argument("--out", type=Path, help="write the figures to this JSON file too")
    args = parser.parse_args()
    levels = [int(n) for n in args.concurrency.split(",")]
    load = os.getloadavg()
    figures = asyncio.run(measure(args.seconds, levels, args.rounds))
    figures["load_before_after"] = [load, figures["load_before_after"]]
    text = json.dumps(figures, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
