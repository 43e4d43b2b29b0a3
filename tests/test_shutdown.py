"""Faults mid-stream: a cut connection resumes, then SIGTERM drains; nothing accepted is lost.

20 clients (the Python client) stream poses at 80 Hz to a real server process. One client's TCP
connection is cut mid-stream: it dials again and resumes its session. Then the server gets
SIGTERM while they all stream, and a second client's connection is cut as it arrives: it resumes
too, on the draining server if need be. Each client stops sending when told ``going_away`` and reads
until it has an answer to every chunk it sent. From the clients' own records: every chunk sent
got exactly one answer, a result or a typed ``going_away`` error, none twice; the cut client's
pose filter state went on as if nothing happened; and the server exits 0 within its drain time.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

import numpy as np

from realtime.client import Client
from realtime.protocol import Error, Result
from tests.test_cli import Served

CLIENTS = 20


def pose(seq: int) -> np.ndarray[Any, Any]:
    """The same pose track for every client: a head moving along x, unit quaternions."""
    p = np.zeros((3, 7), np.float32)
    p[:, 0] = 0.01 * seq
    p[:, 6] = 1.0
    return p


class Streamer:
    """One client: streams until told ``going_away``, keeps every answer it gets."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.started = asyncio.Event()
        self.sent = 0
        self.answers: dict[int, list[Any]] = {}  # seq -> every answer that came for it
        self.client: Client | None = None

    async def run(self) -> None:
        client = self.client = await Client.connect(self.url)
        stream = await client.open("pose", deadline_ms=10_000)  # no shedding: compare states
        read_all = asyncio.Event()

        async def read() -> None:
            with contextlib.suppress(ConnectionError):
                async for msg in stream:
                    if isinstance(msg, Result | Error):
                        self.answers.setdefault(msg.seq, []).append(msg)
                        if client.going_away is not None and len(self.answers) >= self.sent:
                            read_all.set()

        reader = asyncio.create_task(read())
        self.started.set()
        while client.going_away is None and self.sent < 4000:
            await stream.send(pose(self.sent))
            self.sent += 1
            await asyncio.sleep(1 / 80)  # 80 Hz pacing (a live tracker), not a wait for a state
        if len(self.answers) < self.sent:
            await asyncio.wait([reader, asyncio.ensure_future(read_all.wait())], timeout=10)
        await client.close()
        reader.cancel()


async def test_a_cut_client_resumes_then_sigterm_drains_and_nothing_is_lost() -> None:
    served = Served()
    streamers = [Streamer(served.url) for _ in range(CLIENTS)]
    tasks = [asyncio.create_task(s.run()) for s in streamers]
    for s in streamers:
        await s.started.wait()
    cut, reference = streamers[0], streamers[1]
    await asyncio.sleep(0.3)  # let them stream: this is "mid-stream"
    assert cut.client is not None
    sent_before_cut = cut.sent
    cut.client.ws.transport.abort()
    for _ in range(1000):  # until it has resumed (bounded poll of the client's own count)
        if cut.client.resumes:
            break
        await asyncio.sleep(0.01)
    assert cut.client.resumes == 1
    await asyncio.sleep(0.3)  # stream on after the resume
    # Another client's connection drops as the SIGTERM arrives: whichever the server sees first,
    # the client resumes (on the draining server if need be) and is told going_away there.
    late = streamers[2]
    assert late.client is not None
    served.proc.send_signal(signal.SIGTERM)
    late.client.ws.transport.abort()
    await asyncio.gather(*tasks)
    assert late.client.resumes == 1
    _, err = await asyncio.to_thread(served.proc.communicate, timeout=30)
    assert served.proc.returncode == 0, err
    assert "event=resumed" in err
    for s in streamers:
        assert sorted(s.answers) == list(range(s.sent)), (s.sent, sorted(s.answers)[-5:])
        twice = {seq: a for seq, a in s.answers.items() if len(a) > 1}
        assert not twice  # nothing answered twice
        codes = {a[0].code if isinstance(a[0], Error) else "result" for a in s.answers.values()}
        assert codes <= {"result", "going_away"}, codes
    assert cut.sent > sent_before_cut + 10  # it streamed on after the cut
    assert sum(s.sent for s in streamers) > CLIENTS * 20  # all were streaming
    # The cut client's filter state went on unbroken: its outputs equal the uncut client's.
    common = [
        seq
        for seq in range(min(cut.sent, reference.sent))
        if isinstance(cut.answers[seq][0], Result) and isinstance(reference.answers[seq][0], Result)
    ]
    assert len(common) > sent_before_cut + 10
    for seq in common:
        mine, theirs = cut.answers[seq][0].outputs, reference.answers[seq][0].outputs
        for name in mine:
            np.testing.assert_allclose(mine[name], theirs[name], rtol=1e-6, atol=1e-6)
