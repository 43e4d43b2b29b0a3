"""Scale out for real: three server processes sharing sessions through a real ``redis-server``,
behind a real HAProxy running deploy/haproxy.cfg, all on loopback.

A client streams two stateful models (the built-in ``pose`` filter and silero VAD from
../shared) through HAProxy. The process serving it is killed (SIGKILL): the client resumes
through HAProxy on another process from the session's last checkpoint in Redis; every chunk
gets exactly one result or one typed error, and the outputs after the resume equal an
uninterrupted run from the restored checkpoint. Then the serving process is stopped (SIGTERM):
it hands the session to Redis whole, and nothing is lost at all.
"""

from __future__ import annotations

import asyncio
import functools
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from realtime import handoff
from realtime.client import Client, Stream
from realtime.protocol import Error, Event, Result
from realtime.redis_store import ID_LENGTH, entry_key
from tests.conftest import REPO, needs_shared, read_clip
from tests.test_resume import free_port


def _binary(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")


REDIS, HAPROXY = _binary("redis-server"), _binary("haproxy")
pytestmark = [
    needs_shared,
    pytest.mark.skipif(
        REDIS is None or HAPROXY is None,
        reason="needs redis-server and haproxy (Debian packages redis-server, haproxy; .ci/run "
        "installs them when it runs as root or with passwordless sudo)",
    ),
]
MODELS = REPO / "examples" / "models"


class Fleet:
    """redis-server, three `realtime serve --redis` processes and HAProxy, on loopback."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: list[subprocess.Popen[str]] = []
        self.redis_port = free_port()
        self.redis = self._start(
            [
                *(REDIS or "", "--port", str(self.redis_port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(folder)),
            ],
            "Ready to accept connections",
        )
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        models = folder / "models"  # silero VAD alone: basic_pitch's warm-up is long
        models.mkdir()
        (models / "silero_vad").symlink_to(MODELS / "silero_vad")
        self.ports = [free_port() for _ in range(3)]
        self.servers: dict[int, subprocess.Popen[str]] = {}
        for port in self.ports:
            self.servers[port] = self._popen(
                [
                    *(sys.executable, "-m", "realtime", "serve", "--processes", "1"),
                    *("--port", str(port), "--redis", self.redis_url, "--models", str(models)),
                    *("--max-sessions-per-ip", "10000"),
                ],
                log=folder / f"server-{port}.log",
            )
        for proc in self.servers.values():  # started together, read in turn
            self._wait_for(proc, " serving ")
        self.port = free_port()
        config = (REPO / "deploy" / "haproxy.cfg").read_text()
        config = re.sub(r"bind :\d+", f"bind 127.0.0.1:{self.port}", config)
        for i, port in enumerate(self.ports, 1):
            config = re.sub(rf"server rt{i} \S+", f"server rt{i} 127.0.0.1:{port}", config)
        config = config.replace("inter 1s", "inter 200ms")  # up sooner; the rest as deployed
        (folder / "haproxy.cfg").write_text(config)
        self.haproxy = self._popen(
            [HAPROXY or "", "-db", "-f", str(folder / "haproxy.cfg")], log=folder / "haproxy.log"
        )
        self.url = f"ws://127.0.0.1:{self.port}/"

    def _popen(self, command: list[str], log: Path | None = None) -> subprocess.Popen[str]:
        """Start a process: its first lines are read from stdout, the rest of what it says goes
        to ``log`` (a pipe nobody reads would fill and stop it)."""
        err = subprocess.STDOUT if log is None else log.open("w")
        out = subprocess.PIPE if log is None or "realtime" in command else err
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=err, text=True)
        self.procs.append(proc)
        return proc

    def log(self, port: int) -> str:
        """What a server process logged."""
        return (self.folder / f"server-{port}.log").read_text()

    def _start(self, command: list[str], ready: str) -> subprocess.Popen[str]:
        proc = self._popen(command)
        self._wait_for(proc, ready)
        return proc

    @staticmethod
    def _wait_for(proc: subprocess.Popen[str], text: str) -> None:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # blocks until the line comes (or the process ends)
            seen.append(line)
            if text in line:
                return
        raise AssertionError(f"{proc.args[0]} ended before {text!r}: {''.join(seen)[-2000:]}")

    def serving(self) -> int:
        """The port of the server process holding the one open session (its own /metrics)."""
        holding = [p for p in self.live() if _sample(_get(p, "/metrics"), "realtime_sessions")]
        assert len(holding) == 1, holding
        return holding[0]

    def live(self) -> list[int]:
        return [port for port, proc in self.servers.items() if proc.poll() is None]

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return str(r.read().decode())


def _sample(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return 0.0 if match is None else float(match.group(1))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("fleet"))
    try:
        up = False
        for _ in range(500):  # bounded poll: HAProxy's health checks see every server ready
            try:
                up = "ready" in _get(fleet.port, "/readyz")
            except OSError:
                up = False
            if up:
                break
            subprocess.run(["sleep", "0.02"], check=True)  # a poll interval, in a sync fixture
        assert up, "HAProxy never answered /readyz"
        yield fleet
    finally:
        fleet.close()


def pose(seq: int) -> np.ndarray[Any, Any]:
    """Head and hands on a curve: the filter's state shows in every output."""
    p = np.zeros((3, 7), np.float32)
    p[:, 0] = np.sin(0.1 * seq) + np.arange(3)
    p[:, 1] = 0.02 * seq
    p[:, 6] = 1.0
    return p


CHUNK = 320  # 20 ms at 16 kHz


@functools.cache
def speech() -> np.ndarray[Any, Any]:
    return read_clip("speech_16k.wav")[0]


def audio(seq: int) -> np.ndarray[Any, Any]:
    """20 ms of a speech clip, looped."""
    clip = speech()
    start = (seq * CHUNK) % (len(clip) - CHUNK)
    return np.ascontiguousarray(clip[start : start + CHUNK])


class Streaming:
    """One client streaming pose and silero VAD; every answer recorded with the number of
    resumes the client had made when it was read (0: from the first process)."""

    def __init__(self, client: Client, poses: Stream, voice: Stream) -> None:
        self.client = client
        self.streams = {"pose": poses, "vad": voice}
        self.answers: dict[str, dict[int, list[tuple[Any, int]]]] = {"pose": {}, "vad": {}}
        self.sent = 0
        self._readers = [asyncio.create_task(self._read(name)) for name in self.streams]
        self._more = asyncio.Event()

    @classmethod
    async def start(cls, url: str) -> Streaming:
        client = await Client.connect(url)
        poses = await client.open("pose", deadline_ms=20_000)
        voice = await client.open(
            "silero_vad", dtype="int16", sample_rate=16000, deadline_ms=20_000
        )
        return cls(client, poses, voice)

    async def _read(self, name: str) -> None:
        async for msg in self.streams[name]:
            if not isinstance(msg, Event):
                self.answers[name].setdefault(msg.seq, []).append((msg, self.client.resumes))
                self._more.set()

    async def send(self, n: int) -> None:
        for _ in range(n):
            await self.streams["pose"].send(pose(self.sent))
            await self.streams["vad"].send(audio(self.sent), t=20.0 * self.sent)
            self.sent += 1

    async def all_answered(self) -> None:
        while any(len(a) < self.sent for a in self.answers.values()):
            self._more.clear()
            try:
                await asyncio.wait_for(self._more.wait(), 30)
            except TimeoutError:
                missing = {
                    n: sorted(set(range(self.sent)) - set(a)) for n, a in self.answers.items()
                }
                raise AssertionError(
                    f"unanswered after 30 s: {missing}; resumes {self.client.resumes}, "
                    f"going_away {self.client.going_away}"
                ) from None

    def check_exactly_once(self) -> None:
        """Every chunk sent has exactly one answer: a result or a typed error."""
        for name, answers in self.answers.items():
            assert sorted(answers) == list(range(self.sent)), name
            twice = {seq: a for seq, a in answers.items() if len(a) > 1}
            assert not twice, (name, twice)
            for [(msg, _)] in answers.values():
                assert isinstance(msg, Result) or (isinstance(msg, Error) and msg.code), msg

    async def close(self) -> None:
        await self.client.close()
        for reader in self._readers:
            reader.cancel()


async def checkpointed(fleet: Fleet, s: Streaming, at: int) -> None:
    """Wait until the session's checkpoint in Redis covers chunk ``at`` on both streams."""
    import redis.asyncio as redis

    db = redis.from_url(fleet.redis_url)
    token = s.client.resume_token
    assert token is not None
    try:
        for _ in range(1000):  # bounded poll of Redis
            value = await db.get(entry_key(token, None))
            if value is not None:
                entry = handoff.load(value[1 + ID_LENGTH :], _AnyModel())  # type: ignore[arg-type]
                if all(st.received >= at for st in entry.session.streams.values()):
                    return
            await asyncio.sleep(0.02)
        raise AssertionError("no checkpoint came")
    finally:
        await db.aclose()


class _AnyModel:
    """Stands in for the repository when a test reads a checkpoint: models by name only."""

    def get(self, name: str, version: str) -> tuple[str, str]:
        return (name, version)


async def reference(url: str, seqs: dict[str, list[int]]) -> dict[str, dict[int, Any]]:
    """An uninterrupted run: each stream fed exactly ``seqs`` chunks, in order."""
    client = await Client.connect(url)
    out: dict[str, dict[int, Any]] = {}
    try:
        for name, model, make in [("pose", "pose", pose), ("vad", "silero_vad", audio)]:
            kw: dict[str, Any] = (
                {"deadline_ms": 20_000}
                if name == "pose"
                else {"dtype": "int16", "sample_rate": 16000, "deadline_ms": 20_000}
            )
            stream = await client.open(model, **kw)
            out[name] = {}
            todo = seqs[name]
            for at in range(0, len(todo), 30):  # under the per-stream in-flight limit
                for seq in todo[at : at + 30]:
                    await stream.send(make(seq), seq=seq, t=20.0 * seq)
                while len(out[name]) < min(len(todo), at + 30):
                    msg = await stream.next()
                    if not isinstance(msg, Event):
                        assert isinstance(msg, Result), msg
                        out[name][msg.seq] = msg
    finally:
        await client.close()
    return out


def assert_same(mine: Result, theirs: Result) -> None:
    for key, value in mine.outputs.items():
        np.testing.assert_allclose(value, theirs.outputs[key], rtol=1e-5, atol=1e-5)


async def test_sigkill_resumes_elsewhere_from_the_checkpoint(fleet: Fleet) -> None:
    s = await Streaming.start(fleet.url)
    await s.send(40)
    await s.all_answered()
    await checkpointed(fleet, s, 39)
    victim = fleet.serving()
    await s.send(15)  # some answered, some in flight when the process dies
    fleet.servers[victim].send_signal(signal.SIGKILL)
    fleet.servers[victim].wait()
    await s.send(25)  # these wait for the resume, then go to the new process
    await s.all_answered()
    s.check_exactly_once()
    assert s.client.resumes == 1
    assert fleet.serving() != victim
    resumed = s.client.welcome.resumed
    assert resumed is not None
    restored = {int(st["stream"]): int(st["received"]) for st in resumed["streams"]}
    # What the new process ran: the checkpoint's chunks, then the ones it answered itself.
    seqs: dict[str, list[int]] = {}
    after: dict[str, list[int]] = {}
    for name, stream in s.streams.items():
        at = restored[stream.id]
        assert at >= 39
        after[name] = sorted(
            seq
            for seq, [(msg, resumes)] in s.answers[name].items()
            if seq > at and resumes == 1 and isinstance(msg, Result)
        )
        assert after[name] and after[name][-1] == s.sent - 1, name
        seqs[name] = list(range(at + 1)) + after[name]
    ref = await reference(fleet.url, seqs)
    for name in s.streams:
        for seq in after[name]:
            assert_same(s.answers[name][seq][0][0], ref[name][seq])
    await s.close()


async def test_sigterm_hands_the_session_over_whole(fleet: Fleet) -> None:
    s = await Streaming.start(fleet.url)
    await s.send(40)
    await s.all_answered()
    victim = fleet.serving()
    await s.send(15)
    fleet.servers[victim].send_signal(signal.SIGTERM)
    await s.send(25)
    await s.all_answered()
    code = await asyncio.to_thread(fleet.servers[victim].wait, 60)
    assert code == 0, fleet.log(victim)
    assert "event=handed_off sessions=1" in fleet.log(victim)
    s.check_exactly_once()
    assert s.client.resumes == 1
    # Nothing lost: the answers are one uninterrupted run over the chunks that were accepted
    # (a chunk sent while the session moved may be refused, typed going_away, and not run).
    seqs = {}
    for name in s.streams:
        refused = [m for [(m, _)] in s.answers[name].values() if isinstance(m, Error)]
        assert {m.code for m in refused} <= {"going_away"}, refused
        seqs[name] = sorted(
            seq for seq, [(m, _)] in s.answers[name].items() if isinstance(m, Result)
        )
    ref = await reference(fleet.url, seqs)
    for name in s.streams:
        for seq in seqs[name]:
            assert_same(s.answers[name][seq][0][0], ref[name][seq])
    await s.close()
