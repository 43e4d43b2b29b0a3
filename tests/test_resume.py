"""Session resume through a real server: a lost connection's session comes back whole.

A connection is cut by aborting the client's TCP transport (the server sees it drop without a
close frame, as on a flaky network). The client dials again with ``hello.resume``; its streams,
their recurrent state and every answer produced meanwhile come back, in order, none twice.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest

from realtime import errors
from realtime.admission import CALM_REFUSALS, AdmissionPolicy
from realtime.client import Client
from realtime.protocol import Error, Event, Result
from realtime.server import Server
from realtime.session import Limits
from tests.conftest import ServerFactory
from tests.test_admission import _fill
from tests.test_cli import Served
from tests.test_server import Raw


def totals(answers: list[Any]) -> list[float]:
    """The running totals an ``accumulate`` stream answered (errors fail the test)."""
    assert not [m for m in answers if isinstance(m, Error)], answers
    return [float(m.outputs["total"][0]) for m in answers]


async def test_a_cut_connection_resumes_with_its_state_and_every_answer_once(
    start_server: ServerFactory, tiny_models: Path
) -> None:
    server: Server = await start_server((tiny_models,), builtin=False)
    client = await Client.connect(server.url)
    stream = await client.open("accumulate", deadline_ms=10_000)  # stateful: total = sum
    for _ in range(20):
        await stream.send(np.ones(3, np.float32))
    first = [await stream.next() for _ in range(5)]
    client.ws.transport.abort()  # cut, with 15 answers unread and maybe some chunks unsent
    for _ in range(20):
        await stream.send(np.ones(3, np.float32))  # waits for the resume, then goes on
    rest = [await stream.next() for _ in range(35)]
    assert totals(first + rest) == [float(k + 1) for k in range(40)]  # state carried, in order
    assert [m.seq for m in first + rest] == list(range(40))  # each answered exactly once
    assert client.resumes == 1
    assert server.traffic.resumes == {"parked": 1, "resumed": 1}
    scraped = generate_latest(server._metrics).decode()
    assert 'realtime_session_resumes_total{result="resumed"} 1.0' in scraped
    assert "realtime_sessions_parked 0.0" in scraped
    assert "realtime_sessions 1.0" in scraped  # the resumed one; the socket's own is gone
    closed = await stream.close()
    assert (closed.results, closed.errors) == (40, 0)  # the server counted the same
    await client.close()


async def test_a_full_server_refusing_a_crowd_at_the_door_lets_a_resume_through(
    start_server: ServerFactory, tiny_models: Path
) -> None:
    policy = AdmissionPolicy(target_load=0.5, period=3600.0)
    server: Server = await start_server((tiny_models,), builtin=False, admission=policy)
    client = await Client.connect(server.url)
    stream = await client.open("accumulate", deadline_ms=10_000)
    await stream.send(np.ones(3, np.float32))
    assert totals([await stream.next()]) == [1.0]
    _fill(server, 0.4)  # full (one session uses 40 % of a 50 % target)
    server.admission.refusal_rate = 10 * CALM_REFUSALS  # and refusing a crowd at the door
    with pytest.raises(errors.ServerBusy):
        await Client.connect(server.url)  # a new session: 503 server_busy at the handshake
    client.ws.transport.abort()
    await stream.send(np.ones(3, np.float32))  # the client dials with ?resume=1: let in
    assert totals([await stream.next()]) == [2.0]
    assert client.resumes == 1
    await client.close()


async def test_binary_results_resume_mid_result(
    start_server: ServerFactory, tiny_models: Path
) -> None:
    server: Server = await start_server((tiny_models,), builtin=False)
    client = await Client.connect(server.url)
    stream = await client.open("accumulate", results="binary", deadline_ms=10_000)
    got: list[Any] = []
    for _ in range(3):  # three cuts, each with answers in flight
        for _ in range(20):
            await stream.send(np.ones(3, np.float32))
        got += [await stream.next() for _ in range(12)]
        client.ws.transport.abort()
    got += [await stream.next() for _ in range(60 - len(got))]
    assert totals(got) == [float(k + 1) for k in range(60)]
    assert client.resumes == 3
    await client.close()


async def test_the_server_still_holding_the_old_connection_hands_the_session_over(
    start_server: ServerFactory, tiny_models: Path
) -> None:
    """A half-open connection (the client knows it is gone, the server does not yet)."""
    server: Server = await start_server((tiny_models,), builtin=False)
    client = await Client.connect(server.url)
    stream = await client.open("accumulate", deadline_ms=10_000)
    for _ in range(3):
        await stream.send(np.ones(3, np.float32))
    assert totals([await stream.next() for _ in range(3)]) == [1.0, 2.0, 3.0]
    client._dial = None  # the stale side must not take the session back
    raw = await Raw.connect(server.url, hello=False)
    token = client.resume_token
    assert client._received == 4  # opened and three results
    await raw.text({"type": "hello", "protocol": 1, "resume": token, "received": 4})
    welcome = await raw.recv()
    assert welcome["type"] == "welcome" and welcome["session"] == client.welcome.session
    assert welcome["resumed"] == {
        "streams": [{"stream": stream.id, "received": 2, "closing": False}],
        "from": 4,
    }
    await raw.chunk(stream.id, 3, np.ones(3, np.float32))
    answer = await raw.recv()
    assert (answer["seq"], answer["outputs"]["total"]["data"]) == (3, [4.0, 4.0, 4.0])
    await client.ws.wait_closed()  # the server ended the old connection
    await raw.ws.close()
    await client.close()


async def test_resume_refusals_are_typed(start_server: ServerFactory, tiny_models: Path) -> None:
    limits = Limits(resume_seconds=0.2)
    server: Server = await start_server((tiny_models,), builtin=False, limits=limits)

    async def resume(token: str | None, received: int = 0) -> dict[str, Any]:
        raw = await Raw.connect(server.url, hello=False)
        await raw.text({"type": "hello", "protocol": 1, "resume": token, "received": received})
        reply = await raw.recv()
        await raw.ws.close()
        return reply

    assert (await resume("not-a-token"))["code"] == "resume_unknown"
    closed = await Client.connect(server.url)
    token = closed.resume_token
    await closed.close()  # closed by the client: the session is over, not kept
    assert (await resume(token))["code"] == "resume_unknown"

    cut = await Client.connect(server.url)
    cut._dial = None  # this client must not resume by itself here
    stream = await cut.open("double")
    await stream.send(np.ones(4, np.float32))
    assert isinstance(await stream.next(), Result)
    cut.ws.transport.abort()
    assert cut.resume_token is not None
    too_many = await resume(cut.resume_token, received=10**6)  # more than it was sent
    assert too_many["code"] == "bad_message" and "received" in too_many["message"]
    expired = server.sessions_settle(lambda: bool(server.traffic.resumes.get("expired")))
    await asyncio.wait_for(expired, 10)  # the 0.2 s keep runs out
    reply = await resume(cut.resume_token)
    assert reply["code"] == "resume_expired" and not reply["retryable"]
    assert server.traffic.resumes["refused"] == 4


async def test_answers_no_longer_kept_are_counted_in_a_typed_notice(
    start_server: ServerFactory, tiny_models: Path
) -> None:
    server: Server = await start_server(
        (tiny_models,), builtin=False, limits=Limits(resume_buffer_bytes=1)
    )
    raw = await Raw.connect(server.url, hello=False)
    await raw.text({"type": "hello", "protocol": 1})
    token = (await raw.recv())["resume_token"]
    assert (await raw.open(1))["type"] == "opened"
    for seq in range(10):
        await raw.chunk(1, seq, np.ones(4, np.float32))
    assert [(await raw.recv())["seq"] for _ in range(10)] == list(range(10))
    raw.ws.transport.abort()
    again = await Raw.connect(server.url, hello=False)
    # Claim to have read only the `opened`: the 10 results are past a 1-byte resume buffer.
    parked = server.sessions_settle(lambda: bool(server.traffic.resumes.get("parked")))
    await asyncio.wait_for(parked, 10)  # the server notices the cut
    await again.text({"type": "hello", "protocol": 1, "resume": token, "received": 1})
    welcome = await again.recv()
    assert welcome["resumed"]["from"] == 11
    notice = await again.recv()
    assert notice["code"] == "results_dropped" and notice["message"].startswith("10 messages")
    await again.still_works(1, 10)
    await again.ws.close()


def free_port() -> int:
    """A loopback port nobody listens on (for two server processes in turn)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pose(seq: int) -> np.ndarray[Any, Any]:
    """A head moving along x: unit quaternions, a new position each chunk."""
    p = np.zeros((3, 7), np.float32)
    p[:, 0] = 0.01 * seq
    p[:, 6] = 1.0
    return p


async def answers(stream: Any, n: int) -> list[Any]:
    """The next ``n`` results or errors of a stream (its events are left out)."""
    got: list[Any] = []
    while len(got) < n:
        msg = await stream.next()
        if not isinstance(msg, Event):
            got.append(msg)
    return got


async def test_a_restart_hands_sessions_to_the_next_process(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """SIGTERM with --resume-dir: the session, its pose filter state and its audio stream's
    re-windowing move to the next process on the same port; the client resumes by itself."""
    args = ("--port", str(free_port()), "--resume-dir", str(tmp_path / "sessions"))
    first = Served(*args)
    client = await Client.connect(first.url)
    poses = await client.open("pose", deadline_ms=10_000)
    voice = await client.open("speech_activity", dtype="int16", sample_rate=48000)
    t = np.arange(960) / 48000
    tone = (8000 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)  # 20 ms chunks at 48 kHz
    for seq in range(30):
        await poses.send(pose(seq))
        await voice.send(tone, t=20.0 * seq)
    got = await answers(poses, 20)  # ten left in flight: the draining server answers them
    first.proc.send_signal(signal.SIGTERM)
    got += await answers(poses, 10)
    for _ in range(1000):  # the notice comes right after the last answers (bounded poll)
        if client.going_away is not None:
            break
        await asyncio.sleep(0.01)
    assert client.going_away is not None and client.going_away.resume_token is not None

    async def stream_on() -> None:  # waits while the session moves
        for seq in range(30, 60):
            await poses.send(pose(seq))
            await voice.send(tone, t=20.0 * seq)

    sender = asyncio.create_task(stream_on())
    _, err = await asyncio.to_thread(first.proc.communicate, timeout=30)
    assert first.proc.returncode == 0, err
    assert "event=handed_off sessions=1" in err
    second = Served(*args)
    try:
        await sender
        got += await answers(poses, 30)
        heard = await answers(voice, 60)
    finally:
        code, err = await asyncio.to_thread(second.stop)  # the loop must answer its close
    assert code == 0, err
    assert client.resumes == 1
    assert [m.seq for m in got] == list(range(60)) and all(isinstance(m, Result) for m in got)
    assert [m.seq for m in heard] == list(range(60)) and all(isinstance(m, Result) for m in heard)
    assert sum(len(m.outputs["speech_prob"]) for m in heard) >= 60 * 20 // 32 - 2  # windows
    # The pose filter went on as if nothing happened: same outputs as one uninterrupted run.
    server: Server = await start_server()
    reference = await Client.connect(server.url)
    again = await reference.open("pose", deadline_ms=10_000)
    for seq in range(60):
        await again.send(pose(seq))
    for mine, theirs in zip(got, await answers(again, 60), strict=True):
        for name, value in mine.outputs.items():
            np.testing.assert_allclose(value, theirs.outputs[name], rtol=1e-6, atol=1e-6)
    await reference.close()
    await client.close()
