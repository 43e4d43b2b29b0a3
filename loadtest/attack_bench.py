"""What one hostile client costs a real server (issue 18): not a test, the figures behind one.

    python -m loadtest.attack_bench [--attack amplification|options|overflow]

Starts ``realtime serve`` on loopback, connects a good client that streams 20 ms of speech and
pings after each chunk, then one attacker: ``amplification`` opens an 8-bit 1 kHz audio stream
and sends 4 MiB chunks (16 times that once resampled to the model's 16 kHz float32);
``options`` opens streams with 3.9 MB ``open.options`` objects; ``overflow`` sends 300 connections'
worth of 48-byte chunks whose dims multiply to 0 but overflow numpy. Prints the attacker's
replies, the server's peak RSS growth (VmHWM), the good client's worst ping and its outcomes,
and the lines the server logged. Bounded: a few seconds, loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from websockets.asyncio.client import connect

from realtime.client import Client
from realtime.protocol import HEADER, Chunk, Result, encode_frame

REPO = Path(__file__).resolve().parents[1]
#: The attacker's own address (all of 127/8 is loopback): the good client's, 127.0.0.1, has its
#: own per-address rate, as a real victim would.
ATTACKER = ("127.0.0.2", 0)
OPEN_WITH_OPTIONS = (
    '{"type":"open","stream":%d,"model":"speech_activity","kind":"audio","dtype":"int16",'
    '"options":%s}'
)


def hwm_mb(pid: int) -> float:
    """Peak resident memory of a process so far (MB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


#: Chunks the good client sends before it waits for the first one's answer, as a live client
#: does. Sent as fast as pings came back and read only at the end, its chunks outran their
#: results (a batch waits up to 20 ms to fill while the server is busy) past the 64 a stream
#: may have in flight, and were refused ``overloaded``, rightly: CI once saw 96 of 493.
IN_FLIGHT = 8


async def good_client(
    url: str, done: asyncio.Event, deadline_ms: float | None = None
) -> tuple[Counter[str], float]:
    """Stream until the attack is over (and at least 50 chunks), asking for ``deadline_ms``
    (None: the model's); its outcomes by code ("result" for a result) and its worst ping round
    trip (ms): the server's event loop stalls show there."""
    async with await Client.connect(url, name="good") as client:
        stream = await client.open(
            "speech_activity", dtype="int16", sample_rate=16000, deadline_ms=deadline_ms
        )
        worst, k, got = 0.0, 0, []
        while not done.is_set() or k < 50:
            await stream.send(np.zeros(320, np.int16))
            worst = max(worst, (await client.ping())[0])
            k += 1
            if k > IN_FLIGHT:
                got.append(await stream.next())
        await stream.close()
        got += await stream.collect()
    return Counter("result" if isinstance(m, Result) else str(m.code) for m in got), worst  # type: ignore[union-attr]


async def attack(url: str, kind: str) -> Counter[str]:
    """One attacker's messages; what it got back, by code."""
    replies: Counter[str] = Counter()

    async def reply(ws: Any) -> None:
        msg = orjson.loads(await asyncio.wait_for(ws.recv(), 120))
        replies[msg.get("code", msg["type"])] += 1

    if kind == "overflow":
        frame = HEADER.pack(1, 1, 5, 3, 7, 9, 0, 0, 0, 0.0, 0, 0)
        frame += struct.pack("<3I4x", 0, 2**32 - 1, 2**32 - 1)
        for _ in range(300):
            async with connect(url, local_addr=ATTACKER) as ws:
                await ws.send(frame)
                try:
                    await reply(ws)
                except Exception as e:  # the connection died: that is the figure
                    replies[type(e).__name__] += 1
        return replies
    async with connect(url, max_size=None, local_addr=ATTACKER) as ws:
        await ws.send(orjson.dumps({"type": "hello", "protocol": 1}).decode())
        await reply(ws)
        if kind == "amplification":
            opened = {"type": "open", "stream": 1, "model": "speech_activity", "kind": "audio"}
            opened |= {"dtype": "uint8", "sample_rate": 1000}
            await ws.send(orjson.dumps(opened).decode())
            await reply(ws)
            payload = np.full(4 * 1024 * 1024 - 48, 128, np.uint8)
            for seq in range(4):
                await ws.send(encode_frame(Chunk(1, seq, 0.0, payload)))
                await reply(ws)
        else:
            # 3.9 MB of JSON, encoded once: building it must not stall this process's good client
            options = orjson.dumps({f"k{i}": i for i in range(240_000)}).decode()
            for sid in range(8):
                await ws.send(OPEN_WITH_OPTIONS % (sid, options))
                await reply(ws)
    return replies


async def main(kind: str) -> None:
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "realtime", "serve", "--port", "0", "--processes", "1"),
            *("--admit-load", "0"),  # the good client must get in on a busy machine
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split(" on ")[1].split()[0]
        done = asyncio.Event()
        good = asyncio.create_task(good_client(url, done))
        await asyncio.sleep(0.5)  # the good client is streaming before the attack starts
        before = hwm_mb(proc.pid)
        replies = await attack(url, kind)
        growth = hwm_mb(proc.pid) - before
        done.set()
        try:
            outcomes, worst = await good
            seen = f"worst ping {worst:.0f} ms, outcomes {dict(outcomes)}"
        except Exception as e:  # its connection died: that is the figure
            seen = f"lost its connection: {e!r}"[:200]
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            err += "\nkilled: no exit within 30 s of SIGTERM"
    print(f"attack={kind} replies={dict(replies)}; server peak RSS growth {growth:.0f} MB")
    print(f"good client: {seen}")
    tracebacks = err.count("Traceback")
    killed = "; killed: no exit within 30 s of SIGTERM" if err.endswith("SIGTERM") else ""
    print(f"server log: {len(err.splitlines())} lines, {tracebacks} tracebacks{killed}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--attack", choices=["amplification", "options", "overflow"])
    args = parser.parse_args()
    for kind in [args.attack] if args.attack else ["amplification", "options", "overflow"]:
        asyncio.run(main(kind))
