"""The sans-I/O connection core: messages, outcomes and the clock in; frames and work out.

No socket, task or event loop anywhere: every case is plain values, as python-websockets tests
its ``protocol.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from realtime import errors
from realtime.connection import (
    CLOSE_TOO_SLOW,
    CLOSE_TRY_AGAIN,
    KEPT_OVERHEAD,
    TRANSITIONS,
    Connection,
    State,
)
from realtime.models.repository import ModelRepository, scan
from realtime.protocol import Chunk, Open, decode_frame, encode_frame
from realtime.session import Limits, Prediction, Session, Stream, WorkItem
from realtime.traffic import Traffic


def connect(tiny_models: Path, max_outbox: int = 64, **limits: Any) -> Connection:
    """A connection to a fresh session of the tiny models, nothing dropped on request."""
    session = Session(
        "s1", ModelRepository(scan(tiny_models)), Limits(**limits), "test", resume_token="tok"
    )
    return Connection(session, Traffic(), max_outbox, lambda stream: [])


def text(conn: Connection, **msg: Any) -> None:
    assert conn.receive_text(orjson.dumps(msg).decode()) is None


def sent(conn: Connection) -> list[Any]:
    """What the connection hands out to write now, decoded."""
    out = []
    for frame, is_text, _ in conn.data_to_send():
        out.append(orjson.loads(frame) if is_text else decode_frame(frame))
    return out


def opened(tiny_models: Path, **limits: Any) -> Connection:
    conn = connect(tiny_models, **limits)
    text(conn, type="hello", protocol=1)
    text(conn, type="open", stream=1, model="double", kind="tensor", dtype="float32")
    assert [m["type"] for m in sent(conn)] == ["welcome", "opened"]
    return conn


def chunk(seq: int, value: float = 1.0) -> bytes:
    return encode_frame(Chunk(1, seq, float(seq), np.full(4, value, np.float32)))


def answer(item: WorkItem) -> Prediction:
    """What the ``double`` model says of an item."""
    return Prediction([item.inputs * 2], 0.1, 0.2, 1)


def test_every_transition_is_in_the_table_and_nothing_else_is_allowed(tiny_models: Path) -> None:
    conn = connect(tiny_models)
    assert conn.state is State.AWAITING_HELLO
    text(conn, type="hello", protocol=1)
    assert conn.state is State.OPEN
    conn.lost()
    assert conn.state is State.PARKED
    with pytest.raises(errors.InternalError, match="lost is not allowed in state parked"):
        conn.lost()
    assert (State.PARKED, "resume") in TRANSITIONS and (State.CLOSED, "resume") not in TRANSITIONS
    conn.close()
    assert conn.state is State.CLOSED
    with pytest.raises(errors.InternalError, match="lost is not allowed in state closed"):
        conn.lost()


def test_chunks_become_work_and_outcomes_become_frames_in_order(tiny_models: Path) -> None:
    conn = opened(tiny_models)
    items = [item for seq in range(3) for item in conn.receive_binary(chunk(seq, seq), 0.0)]
    assert [i.seq for i in items] == [0, 1, 2] and conn.inflight == 3
    conn.outcome(items[2], answer(items[2]))  # out of order: held back
    assert not conn.has_output
    conn.outcome(items[0], answer(items[0]))
    conn.outcome(items[1], errors.DeadlineExceeded("late", stream=1, seq=1))
    got = sent(conn)
    assert [(m["type"], m["seq"]) for m in got] == [("result", 0), ("error", 1), ("result", 2)]
    assert got[2]["outputs"]["y"]["data"] == [4.0] * 4
    assert conn.inflight == 0 and conn.written == 5  # welcome, opened and these three


def test_bad_input_is_a_typed_error_and_nothing_else(tiny_models: Path) -> None:
    conn = opened(tiny_models, max_message_bytes=1000)
    assert conn.receive_binary(b"\x01" * 8, 0.0) == []
    assert conn.receive_binary(b"\x00" * 2000, 0.0) == []
    assert conn.receive_text("{not json") is None
    codes = [m["code"] for m in sent(conn)]
    assert codes == ["bad_frame", "message_too_big", "bad_message"]
    assert conn.state is State.OPEN


def test_draining_refuses_chunks_typed_and_counts_them_received(tiny_models: Path) -> None:
    conn = opened(tiny_models)
    assert conn.receive_binary(chunk(0), 0.0, draining=True) == []
    (refused,) = sent(conn)
    assert (refused["code"], refused["seq"]) == ("going_away", 0)
    stream: Stream = conn.session.streams[1]
    assert stream.received == 0  # a resuming client does not send it again


def test_a_slow_reader_is_shed_then_closed(tiny_models: Path) -> None:
    conn = opened(tiny_models, max_inflight_per_stream=1000, max_inflight_per_session=1000)
    for seq in range(40):  # nothing is written meanwhile: the client does not read
        (item,) = conn.receive_binary(chunk(seq), 0.0)
        conn.outcome(item, answer(item))
    kinds = [m.get("code", m["type"]) for m in sent(conn)]
    assert "results_dropped" in kinds and kinds[-1] == "result"  # the newest are kept
    assert len(kinds) < 40 and conn.close_code is None
    for seq in range(40, 200):
        (item,) = conn.receive_binary(chunk(seq), 0.0)
        conn.outcome(item, answer(item))
        for _ in range(3):
            conn.error(errors.BadMessage("never shed"))  # what cannot be shed piles up
    assert conn.close_code == CLOSE_TOO_SLOW and not conn.has_output


def test_resume_replays_exactly_what_the_client_missed(tiny_models: Path) -> None:
    conn = opened(tiny_models)  # welcome and opened written: the client got 1 after welcome
    for seq in range(4):
        (item,) = conn.receive_binary(chunk(seq), 0.0)
        conn.outcome(item, answer(item))
    assert len(sent(conn)) == 4  # written, but the connection drops before they arrive
    conn.lost()
    (item,) = conn.receive_binary(chunk(4), 0.0)  # a chunk already in flight: answered later
    conn.outcome(item, answer(item))
    with pytest.raises(errors.BadMessage, match="received is 9"):
        conn.resume(9, 1.0, None)  # more than was sent: refused, and it stays parked
    assert conn.state is State.PARKED
    replay = conn.resume(3, 1.0, None)  # opened and results 0 and 1 arrived
    welcome = orjson.loads(replay[0][0])
    assert welcome["resumed"]["from"] == 3
    assert [orjson.loads(f)["seq"] for f, _, _ in replay[1:]] == [2, 3]
    assert [m["seq"] for m in sent(conn)] == [4]  # then what came while it was away
    assert conn.state is State.OPEN


def test_a_replay_past_the_kept_frames_says_how_many_are_gone(tiny_models: Path) -> None:
    conn = opened(tiny_models, resume_buffer_bytes=300)  # room for about two results
    for seq in range(6):
        (item,) = conn.receive_binary(chunk(seq), 0.0)
        conn.outcome(item, answer(item))
        sent(conn)
    conn.lost()
    replay = conn.resume(1, 1.0, None)
    gone = len(conn.session.streams[1].pending) + 6 - (len(replay) - 1)
    (notice,) = sent(conn)
    assert notice["code"] == "results_dropped" and f"{gone} messages" in notice["message"]
    assert orjson.loads(replay[0][0])["resumed"]["from"] == 1 + gone


def test_hand_off_and_take_over_keep_the_count_in_step(tiny_models: Path) -> None:
    conn = opened(tiny_models)
    (item,) = conn.receive_binary(chunk(0), 0.0)
    conn.outcome(item, answer(item))  # queued, not written yet: it counts as written
    entry = conn.hand_off(expires_at=0.0)
    assert conn.state is State.HANDED_OFF and not conn.data_to_send()
    taken = Connection.taken_over(entry, Traffic(), 64, lambda stream: [], 1.0)
    replay = taken.resume(1, 1.0, None)  # the client got opened only
    assert [orjson.loads(f)["type"] for f, _, _ in replay] == ["welcome", "result"]


# --- admission control and shedding by age (realtime/admission.py decides) ---------------


def busy(_: Open | None) -> errors.ServerBusy:
    return errors.ServerBusy("full", retry_after_ms=500.0)


def test_a_refused_hello_gets_server_busy_and_the_close(tiny_models: Path) -> None:
    conn = connect(tiny_models)
    conn.receive_text('{"type": "hello", "protocol": 1}', admit=busy)
    [error] = sent(conn)
    assert error == {
        "type": "error",
        "code": "server_busy",
        "message": "full",
        "retryable": True,
        "retry_after_ms": 500.0,
    }
    assert conn.state is State.AWAITING_HELLO and conn.close_code == CLOSE_TRY_AGAIN


def test_a_refused_open_leaves_the_session_open(tiny_models: Path) -> None:
    conn = connect(tiny_models)
    conn.receive_text('{"type": "hello", "protocol": 1}', admit=lambda _: None)
    open_double = (
        '{"type": "open", "stream": 1, "model": "double", "kind": "tensor", "dtype": "float32"}'
    )
    conn.receive_text(open_double, admit=busy)
    welcome, error = sent(conn)
    assert welcome["type"] == "welcome"
    assert (error["code"], error["stream"], error["retry_after_ms"]) == ("server_busy", 1, 500.0)
    assert conn.state is State.OPEN and conn.close_code is None and not conn.session.streams
    conn.receive_text(open_double, admit=lambda _: None)
    assert sent(conn)[0]["type"] == "opened"


def test_a_chunk_older_than_its_deadline_is_refused_before_any_work(tiny_models: Path) -> None:
    conn = connect(tiny_models)
    conn.receive_text('{"type": "hello", "protocol": 1}')
    conn.receive_text(
        '{"type": "open", "stream": 1, "model": "double", "kind": "tensor", "dtype": "float32",'
        ' "deadline_ms": 100}'
    )
    sent(conn)
    frame = encode_frame(Chunk(1, 0, 0.0, np.ones(4, np.float32)))
    assert conn.receive_binary(frame, 10.0, age=0.1) == []  # 100 ms old: its deadline passed
    [error] = sent(conn)
    assert (error["code"], error["stream"], error["seq"]) == ("deadline_exceeded", 1, 0)
    assert conn.session.streams[1].received == 0  # counted as received: a resume skips it
    assert conn.session.inflight == 0
    frame = encode_frame(Chunk(1, 1, 0.0, np.ones(4, np.float32)))
    [item] = conn.receive_binary(frame, 10.0, age=0.04)
    # Its deadline counts from when its bytes arrived, not from when the loop got to it.
    assert item.received == 9.96 and abs(item.deadline - 10.06) < 1e-9


def test_kept_frames_count_what_they_hold_in_memory(tiny_models: Path) -> None:
    # KEPT_OVERHEAD is what a kept (frame, is_text, kind) costs beyond its bytes, here.
    slot = 8  # a deque's pointer to it
    here = sys.getsizeof(b"") + sys.getsizeof((b"", True, 0)) + slot
    assert abs(KEPT_OVERHEAD - here) <= 16, here
    # 20 results of ~170 bytes into a 2,000-byte buffer: with their overhead, 7 fit.
    conn = opened(tiny_models, resume_buffer_bytes=2000)
    for seq in range(20):
        (item,) = conn.receive_binary(chunk(seq), 0.0)
        conn.outcome(item, answer(item))
        sent(conn)
    kept = conn._kept
    held = sum(len(frame) + KEPT_OVERHEAD for frame, _, _ in kept)
    biggest = max(len(frame) for frame, _, _ in kept) + KEPT_OVERHEAD
    assert held <= 2000 < held + biggest and conn._kept_bytes == held
