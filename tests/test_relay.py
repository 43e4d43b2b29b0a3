"""The per-chunk glue: outcomes to their session, frames to the socket, in as few writes as
the order allows."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
from websockets.protocol import State as WsState

from realtime import errors, framing
from realtime.connection import Connection
from realtime.models.repository import ModelRepository, scan
from realtime.protocol import Chunk, decode_frame, encode_frame
from realtime.quotas import Quotas
from realtime.relay import DEFERRED_MAX, Link, Reader, Relay
from realtime.session import Limits, Outcome, Prediction, Session, WorkItem
from realtime.traffic import Traffic


class Transport:
    """What the relay writes, one list per ``writelines``."""

    def __init__(self) -> None:
        self.writes: list[list[bytes]] = []

    def writelines(self, data: list[bytes]) -> None:
        self.writes.append(list(data))

    def is_closing(self) -> bool:
        return False


def messages(parts: list[bytes]) -> list[Any]:
    """One write's frames (head, payload, head, payload...), decoded."""
    out = []
    for head, payload in zip(parts[::2], parts[1::2], strict=True):
        assert head == framing.frame_head(len(payload), head[0] & 0x0F == 1)
        out.append(orjson.loads(payload) if head[0] & 0x0F == 1 else decode_frame(payload))
    return out


async def turn() -> None:
    """Let every callback already scheduled on the loop run (they run first in first out)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.call_soon(done.set_result, None)
    await done


def linked(tiny_models: Path) -> tuple[Relay, Link, Transport, list[WorkItem]]:
    """A relay holding one session with a ``double`` stream and three chunks of it accepted."""
    session = Session("s1", ModelRepository(scan(tiny_models)), Limits(), "test")
    conn = Connection(session, Traffic(), 64, lambda stream: [])
    for msg in (
        {"type": "hello", "protocol": 1},
        {"type": "open", "stream": 1, "model": "double", "kind": "tensor", "dtype": "float32"},
    ):
        assert conn.receive_text(orjson.dumps(msg).decode()) is None
    conn.data_to_send()  # welcome, opened
    relay = Relay(
        Traffic(),
        Quotas(Limits(), {}, 8),
        30.0,
        True,
        lambda link, data: None,
        lambda item, outcome: None,
        lambda conn: None,
        lambda: None,
    )
    transport = Transport()
    socket = SimpleNamespace(
        reader=None,
        loop=asyncio.get_running_loop(),
        transport=transport,
        protocol=SimpleNamespace(state=WsState.OPEN),
        paused=False,
    )
    link = Link(socket, conn, "127.0.0.1", None)  # type: ignore[arg-type]
    relay.conns["s1"] = conn
    relay.links["s1"] = link
    items = [
        item
        for seq in range(3)
        for item in conn.receive_binary(
            encode_frame(Chunk(1, seq, float(seq), np.full(4, seq, np.float32))), 0.0
        )
    ]
    return relay, link, transport, items


def answer(item: WorkItem) -> Outcome:
    return Prediction([item.inputs * 2], 0.1, 0.2, 1)


async def test_a_chunk_dropped_for_a_newer_one_goes_out_with_its_outcome(
    tiny_models: Path,
) -> None:
    """Dropped for a newer chunk of its stream (batching.STALE_SHARE), a chunk's error waits
    for the newer chunk's outcome, which is still to come: one write for both, not one each,
    while the server is behind. Any other outcome is written at once."""
    relay, link, transport, items = linked(tiny_models)
    relay.deliver(items[0], errors.Dropped("dropped for a newer chunk", stream=1, seq=0))
    assert not link.flush_due and link.conn.has_output
    await turn()
    assert transport.writes == []
    relay.deliver(items[1], answer(items[1]))
    await turn()
    assert len(transport.writes) == 1
    dropped, result = messages(transport.writes[0])
    assert (dropped["type"], dropped["code"], dropped["seq"]) == ("error", "dropped", 0)
    assert (result["type"], result["seq"]) == ("result", 1)
    assert result["outputs"]["y"]["data"] == [2.0] * 4
    # Not a drop: out at once, on its own.
    relay.deliver(items[2], errors.DeadlineExceeded("late", stream=1, seq=2))
    await turn()
    assert len(transport.writes) == 2
    assert [(m["code"], m["seq"]) for m in messages(transport.writes[1])] == [
        ("deadline_exceeded", 2)
    ]


class Reading(Transport):
    """A transport that records whether reading is paused."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


async def test_a_deferred_clients_messages_wait_read_with_the_time_they_arrived() -> None:
    """Deferred, a client's messages are read on and kept with their arrival time (the
    server is behind: they are late, and their age must count); once it has room they go on
    in order, a few a turn, each with its own arrival. Past ``DEFERRED_MAX`` kept, reading
    stops until they have gone on."""
    transport = Reading()
    ws = SimpleNamespace(protocol=None, loop=asyncio.get_running_loop(), transport=transport)
    reader = Reader(ws, lambda data: None)
    got: list[tuple[bytes, float]] = []
    reader.on_message = lambda text, data: got.append((data, reader.arrived))
    reader.defer(True)
    for k in range(DEFERRED_MAX):
        reader.arrived = 10.0 + k
        reader.message(False, b"%d" % k)
        assert transport.paused is (k == DEFERRED_MAX - 1)
    await turn()
    assert got == []
    reader.defer(False)
    for _ in range(DEFERRED_MAX):  # BURST a turn
        if len(got) == DEFERRED_MAX:
            break
        await turn()
    assert got == [(b"%d" % k, 10.0 + k) for k in range(DEFERRED_MAX)]
    assert not transport.paused and not reader.backlog
    reader.arrived = 99.0
    reader.message(False, b"now")  # and on as before, straight through
    assert got[-1] == (b"now", 99.0)
