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
from pathlib import Path
from typing import Any

import numpy as np

from realtime.client import Client
from realtime.protocol import Error, Result
from realtime.server import Server
from tests.conftest import ServerFactory
from tests.test_cli import Served
from tests.test_server import Raw

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
        self._progress = asyncio.Event()  # set (and replaced) after each chunk sent
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
            # Counted before the send, which may wait for a resume: the reader must not find
            # every chunk answered while this one is still on its way (it stopped reading with
            # the last chunk unanswered: "seq 45 of 46").
            seq = self.sent
            self.sent += 1
            await stream.send(pose(seq))
            self._progress.set()
            self._progress = asyncio.Event()
            await asyncio.sleep(1 / 80)  # 80 Hz pacing (a live tracker), not a wait for a state
        if len(self.answers) < self.sent:
            await asyncio.wait([reader, asyncio.ensure_future(read_all.wait())], timeout=10)
        await client.close()
        reader.cancel()

    async def until_sent(self, n: int) -> None:
        """Until this client has sent ``n`` chunks (however slow the machine)."""
        async with asyncio.timeout(60):
            while self.sent < n:
                await self._progress.wait()


async def test_a_cut_client_resumes_then_sigterm_drains_and_nothing_is_lost() -> None:
    # A slow machine gets its time: the server waits for every client to read its answers and
    # close (or come back and do so), up to 60 s, and goes as soon as they have.
    # Admission off: on a machine busy with other work it measures the neighbours too, and a
    # refused open would be this test's failure, not the drain's.
    served = Served("--close-grace-seconds", "60", "--admit-load", "0")
    streamers = [Streamer(served.url) for _ in range(CLIENTS)]
    tasks = [asyncio.create_task(s.run()) for s in streamers]
    for s, task in zip(streamers, tasks, strict=True):
        started = asyncio.ensure_future(s.started.wait())
        await asyncio.wait([task, started], return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if task.done():  # it failed before streaming: say why instead of waiting forever
            task.result()
    cut, reference = streamers[0], streamers[1]
    for s in streamers:  # let them stream: this is "mid-stream"
        await s.until_sent(21)
    assert cut.client is not None
    sent_before_cut = cut.sent
    cut.client.ws.transport.abort()
    await asyncio.wait_for(cut.client.resumed.wait(), 30)
    assert cut.client.resumes == 1
    for s in (cut, reference):  # stream on after the resume
        await s.until_sent(sent_before_cut + 11)
    # Another client's connection drops as the SIGTERM arrives: whichever the server sees first,
    # the client resumes (on the draining server if need be) and is told going_away there.
    late = streamers[2]
    assert late.client is not None
    served.proc.send_signal(signal.SIGTERM)
    late.client.ws.transport.abort()
    await asyncio.gather(*tasks)
    assert late.client.resumes == 1
    _, err = await asyncio.to_thread(served.proc.communicate, timeout=90)
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


async def hello(server: Server) -> tuple[Raw, str]:
    """A raw session with stream 1 open on ``double``, and its resume token."""
    raw = await Raw.connect(server.url, hello=False)
    await raw.text({"type": "hello", "protocol": 1})
    token = (await raw.recv())["resume_token"]
    assert (await raw.open(1))["type"] == "opened"
    return raw, token


async def cut(server: Server, raw: Raw) -> None:
    """Lose ``raw``'s connection and wait until the server has parked its session."""
    parked = server.traffic.resumes.get("parked", 0)
    raw.ws.transport.abort()
    await asyncio.wait_for(
        server.sessions_settle(lambda: server.traffic.resumes.get("parked", 0) > parked), 10
    )


async def resume(server: Server, token: str, received: int) -> tuple[Raw, dict[str, Any]]:
    back = await Raw.connect(server.url, hello=False)
    await back.text({"type": "hello", "protocol": 1, "resume": token, "received": received})
    welcome = await back.recv()
    assert welcome["type"] == "welcome", welcome
    return back, welcome


async def test_the_close_grace_waits_for_a_cut_client_to_come_back(
    start_server: ServerFactory, tiny_models: Path
) -> None:
    """The grace was over as soon as the connected clients had closed: a client cut during the
    drain found the port closed and lost its answers."""
    server: Server = await start_server((tiny_models,), builtin=False, close_grace_seconds=60)
    gone, token = await hello(server)
    await gone.chunk(1, 0, np.ones(4, np.float32))
    assert (await gone.recv())["type"] == "result"
    stays = await Raw.connect(server.url)
    await cut(server, gone)
    closing = asyncio.create_task(server.close())
    assert (await stays.recv())["type"] == "going_away"
    await stays.ws.close()  # the only connected client is done
    back, welcome = await resume(server, token, received=2)  # opened and the result
    assert welcome["resumed"]["streams"] == [{"stream": 1, "received": 0, "closing": False}]
    assert (await back.recv())["type"] == "going_away"  # told on the draining server
    await back.chunk(1, 1, np.ones(4, np.float32))
    refused = await back.recv()
    assert (refused["code"], refused["seq"]) == ("going_away", 1)
    await back.ws.close()
    await asyncio.wait_for(closing, 10)  # and then the server is done, before its 60 s


async def test_a_chunk_refused_while_draining_is_not_asked_for_again_on_resume(
    start_server: ServerFactory, tiny_models: Path
) -> None:
    """A resumed client sends again the chunks after each stream's ``received``: a chunk the
    draining server had refused (its answer lost with the connection, then replayed) was not
    counted there, so it was sent again and answered twice."""
    server: Server = await start_server((tiny_models,), builtin=False, close_grace_seconds=60)
    raw, token = await hello(server)
    closing = asyncio.create_task(server.close())
    assert (await raw.recv())["type"] == "going_away"
    await raw.chunk(1, 0, np.ones(4, np.float32))  # it crossed the notice on the wire
    assert (await raw.recv())["code"] == "going_away"
    await cut(server, raw)  # as if the refusal had been lost with the connection
    back, welcome = await resume(server, token, received=2)  # opened and the notice
    assert welcome["resumed"]["streams"] == [{"stream": 1, "received": 0, "closing": False}]
    replayed = await back.recv()
    assert (replayed["type"], replayed["code"], replayed["seq"]) == ("error", "going_away", 0)
    assert (await back.recv())["type"] == "going_away"
    await back.ws.close()
    await asyncio.wait_for(closing, 10)
