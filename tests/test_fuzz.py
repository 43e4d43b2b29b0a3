"""Fuzzing a real server: mutated valid frames, JSON messages and header fields at their limits.

Each example is one connection that sends a few messages (most of them broken somehow) and then
a ping: the pong must come back on the same connection. The test fails on any connection the
server closes on its own (1011 and the like) and on any traceback or error the server logs.
Bounded for CI (``REALTIME_FUZZ_EXAMPLES``, default 150); docs/security.md gives the command of
the longer run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from realtime.admission import AdmissionPolicy
from realtime.config import Config
from realtime.protocol import DTYPE_CODES, HEADER, Chunk, encode_frame
from realtime.server import Server
from realtime.session import Limits
from tests.conftest import (
    ACCUMULATE_TOML,
    WINDOW_TOML,
    accumulate_graph,
    double_graph,
    window_graph,
    write_model,
)

EXAMPLES = int(os.environ.get("REALTIME_FUZZ_EXAMPLES", "150"))
U32 = 2**32 - 1
#: Integers at the edges of every field's type (u8, u16, u32, JSON's 2^53, 2^64 and beyond).
EDGES = [0, 1, 2, 7, 8, 9, 255, 256, 2**16 - 1, 2**16, 2**31 - 1, 2**31, U32, 2**32]
JSON_EDGES = [*EDGES, -1, -(2**31), 2**53, 2**53 + 1, 2**63, 2**64, 10**30]


class Collected(logging.Handler):
    """Every log record of the server at WARNING or above, or with a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.bad.append(record)


class Running:
    """A real server on its own event loop in a thread (the test drives it from outside)."""

    def __init__(self, models: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        config = Config(
            port=0,
            model_dirs=(models,),
            builtin_models=False,
            warm_up=False,
            reload_seconds=0,
            close_grace_seconds=0,
            limits=Limits(max_message_bytes=64 * 1024, idle_seconds=60),
            # Admission measures the (busy) machine: off, as in conftest's test servers.
            admission=AdmissionPolicy(target_load=0.0),
        )
        self.server = self.run(_start(config))

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def stop(self) -> None:
        self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)


async def _start(config: Config) -> Server:
    server = Server(config)
    await server.start()
    return server


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, Collected]]:
    root = tmp_path_factory.mktemp("fuzz") / "models"
    write_model(root, "double", double_graph())
    write_model(root, "accumulate", accumulate_graph(), ACCUMULATE_TOML)
    write_model(root, "window", window_graph(), WINDOW_TOML)
    collected = Collected()
    loggers = [logging.getLogger(name) for name in ("realtime", "websockets", "asyncio")]
    for logger in loggers:
        logger.addHandler(collected)
    running = Running(root)
    yield running, collected
    running.stop()
    for logger in loggers:
        logger.removeHandler(collected)


# --- what a fuzzing client sends ----------------------------------------------------------

OPENS = [
    {"type": "open", "stream": 1, "model": "double", "kind": "tensor", "dtype": "float32"},
    {"type": "open", "stream": 2, "model": "accumulate", "kind": "tensor", "dtype": "float32"},
    {"type": "open", "stream": 3, "model": "window", "kind": "audio", "dtype": "int16"},
    {
        "type": "open",
        "stream": 4,
        "model": "window",
        "kind": "audio",
        "dtype": "uint8",
        "sample_rate": 1000,
        "results": "binary",
    },
]
json_values = st.recursive(
    st.none() | st.booleans() | st.sampled_from(JSON_EDGES) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
FIELDS = ["type", "stream", "model", "kind", "dtype", "shape", "sample_rate", "deadline_ms"]
FIELDS += ["results", "options", "overflow", "id", "t", "protocol", "resume", "received"]
valid_text = st.sampled_from(
    [
        {"type": "hello", "protocol": 1},
        *OPENS,
        {"type": "close", "stream": 1},
        {"type": "close", "stream": 3},
        {"type": "ping", "id": 7, "t": 1.5},
    ]
)


@st.composite
def texts(draw: st.DrawFn) -> str:
    """A valid control message with fields replaced, added or removed; or any JSON at all."""
    if draw(st.integers(0, 9)) == 0:
        return json.dumps(draw(json_values))
    msg = dict(draw(valid_text))
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from(FIELDS))
        if draw(st.booleans()):
            msg.pop(field, None)
        else:
            msg[field] = draw(json_values)
    return json.dumps(msg)  # not orjson: past 64-bit integers and NaN are fuzz too


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """A valid chunk for one of the streams, then mutated: header fields at their limits, and
    dims at theirs or bytes flipped, cut short or extended."""
    sid = draw(st.sampled_from([1, 2, 3, 4, 9]))
    shape = {1: (4,), 2: (3,), 3: (draw(st.integers(0, 64)),), 4: (draw(st.integers(0, 64)),)}
    dtype = {3: np.int16, 4: np.uint8}.get(sid, np.float32)
    data = np.zeros(shape.get(sid, (2,)), dtype)
    seq = draw(st.sampled_from([0, 1, 2, 100, U32]))
    buf = bytearray(encode_frame(Chunk(sid, seq, 0.0, data)))
    fields = list(HEADER.unpack_from(buf))
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(fields) - 1))
        if i == 9:  # t
            fields[i] = draw(st.sampled_from([0.0, -1.0, 1e308, float("inf"), float("nan")]))
        else:
            bits = HEADER.format[1:][i]
            top = {"B": 255, "H": 2**16 - 1, "I": U32}[bits]
            fields[i] = min(draw(st.sampled_from([*EDGES, *DTYPE_CODES.values()])), top)
    if draw(st.booleans()):  # dims at their limits: any count, sizes at the edges
        fields[3] = ndim = draw(st.sampled_from([0, 1, 2, 3, 8, 9]))
        dims = [draw(st.sampled_from([0, 1, 2**31, U32])) for _ in range(ndim)]
        packed = struct.pack(f"<{ndim}I", *dims).ljust((4 * ndim + 7) & ~7, b"\0")
        payload = bytes(draw(st.sampled_from([0, 1, 8, 64])))
        return HEADER.pack(*fields) + packed + payload
    HEADER.pack_into(buf, 0, *fields)
    for _ in range(draw(st.integers(0, 2))):
        if buf:
            buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.sampled_from(["keep", "short", "long"]))
    if cut == "short":
        del buf[draw(st.integers(0, len(buf))) :]
    elif cut == "long":
        buf += bytes(draw(st.integers(1, 64)))
    return bytes(buf)


messages = st.lists(st.one_of(texts(), frames()), min_size=1, max_size=12)


@given(hello=st.booleans(), opens=st.integers(0, 4), sent=messages)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=EXAMPLES <= 150,  # CI: the same examples every run; by hand: new ones
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_nothing_a_client_sends_closes_its_connection_or_logs_a_traceback(
    fuzzed: tuple[Running, Collected], hello: bool, opens: int, sent: list[str | bytes]
) -> None:
    running, collected = fuzzed
    logged = len(collected.bad)
    with connect(running.server.url, max_size=None, open_timeout=30) as ws:
        if hello:
            ws.send(orjson.dumps({"type": "hello", "protocol": 1}).decode())
        for msg in OPENS[:opens]:
            ws.send(orjson.dumps(msg).decode())
        for msg in sent:
            ws.send(msg)
        ws.send(orjson.dumps({"type": "hello", "protocol": 1}).decode())  # a no-op if sent
        ws.send(orjson.dumps({"type": "ping", "id": 424242}).decode())
        try:
            while True:  # typed errors, results, events... then the pong: the session lives
                reply = ws.recv(timeout=30)
                if isinstance(reply, str) and orjson.loads(reply).get("id") == 424242:
                    break
        except ConnectionClosed as e:
            pytest.fail(f"the server closed the connection: {e.rcvd}")
    assert not collected.bad[logged:], [r.getMessage() for r in collected.bad[logged:]]
