"""``realtime serve`` with several processes on one port: a session resumes on whichever process
its reconnect lands on, one /metrics covers all, the parent forwards signals and restarts a
child that dies."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from realtime.client import Client
from realtime.protocol import Error, Result
from realtime.supervisor import default_processes
from tests.conftest import ACCUMULATE_TOML, accumulate_graph, write_model
from tests.test_cli import Served


def scrape(url: str, path: str = "/metrics") -> str:
    """GET a path of the server (any process answers)."""
    with urllib.request.urlopen(url.replace("ws://", "http://").rstrip("/") + path) as r:
        return str(r.read().decode())


def sample(text: str, name: str) -> float:
    """The value of one sample line of a Prometheus exposition (0 when absent)."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return 0.0 if match is None else float(match.group(1))


def children(parent: int) -> set[int]:
    """The pids of a process's children, from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                found.add(int(entry.name))
    return found


async def test_no_flags_serve_every_core_and_sessions_resume_on_whichever_process(
    tiny_models: Path,
) -> None:
    # No --processes: one per core (at least two here, so that there is a choice to make).
    more = () if default_processes() >= 2 else ("--processes", "2")
    n = max(2, default_processes())
    served = Served(
        "--no-builtin", "--models", str(tiny_models), "--reload-seconds", "0", *more, processes=None
    )
    try:
        assert f"({n} processes)" in served.banner[0], served.banner
        assert len(children(served.proc.pid)) == n
        await _twenty_reconnects(served.url)
        text = await asyncio.to_thread(scrape, served.url)
        # One scrape, every process: 20 resumes (each on whichever process it landed), and
        # some of them moved the session between processes (all 20 landing on the one that
        # held it, with 2 processes, has a chance of 1 in 2**20).
        assert sample(text, "realtime_processes") == n
        assert sample(text, "realtime_sessions_opened_total") == 21
        assert sample(text, 'realtime_session_resumes_total{result="resumed"}') == 20
        assert sample(text, 'realtime_session_resumes_total{result="handed_off"}') >= 1
        assert sample(text, 'realtime_items_run_total{model="accumulate@1"}') == 200

        # SIGHUP reaches every process: each loads the new version (2 adds in one scrape).
        write_model(tiny_models, "accumulate", accumulate_graph(), ACCUMULATE_TOML, version="2")
        served.proc.send_signal(signal.SIGHUP)
        for _ in range(1000):  # bounded poll of the summed count
            text = await asyncio.to_thread(scrape, served.url)
            if sample(text, 'realtime_model_reloads_total{result="added"}') == n:
                break
            await asyncio.sleep(0.02)
        assert sample(text, 'realtime_model_reloads_total{result="added"}') == n

        # A child that dies is started again, and serves.
        before = children(served.proc.pid)
        os.kill(min(before), signal.SIGKILL)
        for _ in range(3000):  # bounded poll: the restart waits 0.1 s, then warms up
            now = children(served.proc.pid)
            if len(now) == n and now != before:
                text = await asyncio.to_thread(scrape, served.url)
                if sample(text, "realtime_processes") == n:  # the new one answers too
                    break
            await asyncio.sleep(0.02)
        assert len(now) == n and min(before) not in now
        async with await Client.connect(served.url) as client:
            stream = await client.open("accumulate", deadline_ms=10_000)
            await stream.send(np.ones(3, np.float32))
            assert isinstance(await stream.next(), Result)
    finally:
        code, err = await asyncio.to_thread(served.stop)
    assert code == 0, err
    assert "event=child_exited" in err and err.count("event=shutdown") == n + 1


async def _twenty_reconnects(url: str) -> None:
    """Stream a stateful model through 20 cut connections: state and answers carry over."""
    client = await Client.connect(url)
    stream = await client.open("accumulate", deadline_ms=10_000)  # total = sum of chunks
    got: list[Any] = []
    for cut in range(20):
        for _ in range(10):
            await stream.send(np.ones(3, np.float32))
        got += [await stream.next() for _ in range(10 * cut + 5 - len(got))]
        client.ws.transport.abort()  # five answers unread; the next send waits for the resume
    got += [await stream.next() for _ in range(200 - len(got))]
    assert not [m for m in got if isinstance(m, Error)], got
    assert [m.seq for m in got] == list(range(200))  # each answered exactly once, in order
    assert [float(m.outputs["total"][0]) for m in got] == [float(k + 1) for k in range(200)]
    # The last cut's answers may all have arrived before it: reading them needed no resume.
    # The close's answer does, so the count is whole once it is back.
    closed = await stream.close()
    assert (closed.results, closed.errors) == (200, 0)
    assert client.resumes == 20
    await client.close()


async def test_children_drain_and_exit_when_the_parent_is_killed(tiny_models: Path) -> None:
    served = Served("--no-builtin", "--models", str(tiny_models), processes=2)
    kids = children(served.proc.pid)
    assert len(kids) == 2
    served.proc.kill()  # SIGKILL: the parent cannot forward anything
    served.proc.wait()
    try:
        for _ in range(1500):  # bounded poll: each child got SIGTERM from the kernel and drains
            if not any(map(running, kids)):
                break
            await asyncio.sleep(0.02)
        assert not any(map(running, kids))
    finally:
        for pid in filter(running, kids):  # the test failed: leave no server behind
            os.kill(pid, signal.SIGKILL)


def running(pid: int) -> bool:
    """Whether a process exists and has not exited (a zombie waiting for init has)."""
    try:
        return (Path(f"/proc/{pid}") / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
