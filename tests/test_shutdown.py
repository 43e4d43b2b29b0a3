"""SIGTERM mid-stream: every chunk the server accepted is answered, exactly once, then it exits.

20 clients stream poses at 80 Hz to a real server process; the server gets SIGTERM while they
stream. Each client stops sending when it is told ``going_away`` and reads until the server
closes. From the clients' own records: every chunk sent got exactly one answer, a result or a
typed ``going_away`` error, none twice, and the server exits 0 within its drain time.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

import numpy as np
import orjson
from websockets.asyncio.client import connect

from realtime.protocol import Chunk, encode_frame
from tests.test_cli import Served

CLIENTS = 20


async def client(url: str, started: asyncio.Event) -> tuple[int, list[Any], int | None]:
    """Stream until told going_away; every answer, in arrival order, and the close code."""
    answers: list[Any] = []
    async with connect(url, compression=None, max_size=None) as ws:
        await ws.send(orjson.dumps({"type": "hello", "protocol": 1}).decode())
        await ws.recv()
        await ws.send(
            orjson.dumps(
                {"type": "open", "stream": 1, "model": "pose", "kind": "tensor", "dtype": "float32"}
            ).decode()
        )
        assert orjson.loads(await ws.recv())["type"] == "opened"
        told = asyncio.Event()

        async def read() -> None:
            async for message in ws:
                msg = orjson.loads(message)
                if msg["type"] == "going_away":
                    told.set()
                elif msg["type"] in ("result", "error"):
                    answers.append((msg["seq"], msg.get("code", "result")))
                    answered.set()

        reader = asyncio.create_task(read())
        answered = asyncio.Event()  # every chunk sent so far has its answer
        started.set()
        sent = 0
        pose = np.zeros((3, 7), np.float32)
        while not told.is_set() and sent < 2000:
            await ws.send(encode_frame(Chunk(1, sent, sent * 12.5, pose)))
            sent += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(told.wait(), 1 / 80)  # 80 Hz pacing, or the notice
        while len(answers) < sent and not reader.done():  # as the protocol asks: read the
            answered.clear()  # answers to what was sent, then close
            await asyncio.wait([reader, asyncio.ensure_future(answered.wait())], timeout=5)
        await ws.close()
        await reader
        return sent, answers, ws.close_code


async def test_sigterm_mid_stream_answers_everything_accepted_then_exits() -> None:
    served = Served()
    started = [asyncio.Event() for _ in range(CLIENTS)]
    tasks = [asyncio.create_task(client(served.url, s)) for s in started]
    for s in started:
        await s.wait()
    await asyncio.sleep(0.5)  # let them stream for a while: this is the "mid-stream"
    served.proc.send_signal(signal.SIGTERM)
    outcomes = await asyncio.gather(*tasks)
    _, err = await asyncio.to_thread(served.proc.communicate, timeout=30)
    assert served.proc.returncode == 0, err
    total = 0
    for sent, answers, close_code in outcomes:
        seqs = [seq for seq, _ in answers]
        assert sorted(seqs) == list(range(sent)), (sent, seqs[-5:])  # each exactly once
        assert {code for _, code in answers} <= {"result", "going_away"}
        assert close_code in (1000, 1001)
        total += sent
    assert total > CLIENTS * 30  # they really were streaming when the signal came
