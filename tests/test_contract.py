"""docs/protocol.md read as a client author reads it, checked against a real server on loopback:
what ``closed`` counts, the two kinds of ``overloaded``, audio time across refusals."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from realtime.protocol import Chunk, ResultFrame, decode_frame, encode_frame
from realtime.server import Server
from realtime.session import Limits
from tests.conftest import (
    WINDOW_TOML,
    ServerFactory,
    double_graph,
    hold,
    window_graph,
    write_model,
)
from tests.test_server import Raw


async def test_closed_counts_every_result_and_error_the_stream_got(
    start_server: ServerFactory, tmp_path: Path, held: list[threading.Event]
) -> None:
    """A client's own tally of the messages that carried its stream id, from ``opened`` to
    ``closed``, equals what ``closed`` reports, on a stream that got refusals of every kind."""
    root = tmp_path / "models"
    write_model(root, "double", double_graph(), "max_delay_ms = 0\n")
    server: Server = await start_server(
        (root,), builtin=False, workers=1, max_queue=2, limits=Limits(max_inflight_per_session=5)
    )
    gate = hold(server, "double", held)
    raw = await Raw.connect(server.url)
    assert (await raw.open(1, shape=[4]))["type"] == "opened"
    good = np.ones(4, np.float32)
    for seq in range(6):
        # 0 runs (held), 1 is cut as the worker's next batch, 2 and 3 fill the model's queue of 2,
        # 4 is refused by the queue (accepted by the session: it keeps its place), 5 meets the
        # session's 5 in flight.
        await raw.chunk(1, seq, good)
    await raw.chunk(1, 6, np.ones(5, np.float32))  # shape_mismatch
    await raw.chunk(1, 7, np.array([1, np.nan, 0, 0], np.float32))  # non_finite_input
    await raw.chunk(1, 8, np.ones(4, np.float64))  # dtype_mismatch
    await raw.chunk(1, 2, good)  # bad_sequence
    header = encode_frame(Chunk(1, 9, 0.0, good))
    await raw.ws.send(header[:20])  # bad_frame: truncated, but stream and seq are there
    await raw.ws.send(b"\x02" + header[1:])  # bad_frame: a version this server does not speak
    await raw.ws.send(encode_frame(ResultFrame(1, 10, 0.0, good, 0, 1, 0, 0)))  # bad_frame
    await raw.ws.send(b"\x01\x01\x01")  # bad_frame naming no stream: not the stream's
    await raw.text({"type": "open", "stream": 1, "model": "double", "kind": "tensor",
                    "dtype": "float32"})  # fmt: skip
    await raw.text({"type": "close", "stream": 1})
    await raw.chunk(1, 11, good)  # stream_not_open: it is closing
    await raw.text({"type": "ping", "id": 1, "t": 0.0})  # answered once all the above was read
    tally: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    while True:
        msg = await raw.recv()
        if msg["type"] == "pong":
            gate.set()  # only now: the server took every frame above while the model was held
            continue
        if msg.get("stream") != 1:
            assert msg["type"] == "error" and msg["code"] == "bad_frame", msg
            continue
        if msg["type"] == "closed":
            break
        tally[msg["type"] if msg["type"] == "result" else msg["code"]] += 1
        if msg.get("code") == "overloaded":
            reasons[msg["reason"]] += 1
    assert tally == {
        "result": 4,
        "overloaded": 2,
        "shape_mismatch": 1,
        "non_finite_input": 1,
        "dtype_mismatch": 1,
        "bad_sequence": 1,
        "bad_frame": 3,
        "stream_already_open": 1,
        "stream_not_open": 1,
    }
    assert reasons == {"queue": 1, "inflight": 1}
    assert (msg["results"], msg["errors"]) == (tally["result"], tally.total() - tally["result"])


async def test_overloaded_says_whose_limit_it_was(
    start_server: ServerFactory, tmp_path: Path, held: list[threading.Event]
) -> None:
    """``reason``: ``inflight`` at the stream's (or session's) bound, ``queue`` at the model's."""
    root = tmp_path / "models"
    write_model(root, "double", double_graph(), "max_delay_ms = 0\n")
    server: Server = await start_server(
        (root,), builtin=False, workers=1, max_queue=1, limits=Limits(max_inflight_per_stream=2)
    )
    gate = hold(server, "double", held)
    raw, other = await Raw.connect(server.url), await Raw.connect(server.url)
    assert (await raw.open(1, shape=[4]))["type"] == "opened"
    assert (await other.open(1, shape=[4]))["type"] == "opened"
    assert (await other.open(2, shape=[4]))["type"] == "opened"
    await raw.chunk(1, 0, np.ones(4, np.float32))  # runs (held)
    await raw.chunk(1, 1, np.ones(4, np.float32))  # cut as the worker's next batch
    await raw.chunk(1, 2, np.ones(4, np.float32))  # the stream's 2 in flight
    stream_bound = await raw.recv()
    await other.chunk(1, 0, np.ones(4, np.float32))  # another session: queued, the queue of 1 full
    await other.chunk(2, 0, np.ones(4, np.float32))  # its other stream: the model's queue
    queue_full = await other.recv()
    gate.set()
    assert (stream_bound["code"], stream_bound["seq"], stream_bound["reason"]) == (
        "overloaded",
        2,
        "inflight",
    )
    assert (queue_full["code"], queue_full["stream"], queue_full["reason"]) == (
        "overloaded",
        2,
        "queue",
    )
    assert stream_bound["retryable"] and queue_full["retryable"]
    assert [(await raw.recv())["seq"] for _ in range(2)] == [0, 1]


def pcm_ramp(start: int, n: int) -> np.ndarray[Any, Any]:
    """Audio whose every sample says where it is: sample ``k`` of the stream holds ``k``."""
    return np.arange(start, start + n, dtype=np.int16)


@pytest.mark.parametrize("overflow", ["reject", "drop_oldest"])
async def test_a_refused_audio_chunk_leaves_a_gap_in_results_not_a_shift_in_time(
    start_server: ServerFactory, tmp_path: Path, held: list[threading.Event], overflow: str
) -> None:
    """Audio time is the audio the client sent: after chunks refused at the stream's bound, each
    window's time still matches the samples in it (the ramp tells which samples they are)."""
    root = tmp_path / "models"
    write_model(root, "window", window_graph(), WINDOW_TOML + "max_delay_ms = 0\n")
    server: Server = await start_server(
        (root,), builtin=False, workers=1, limits=Limits(max_inflight_per_stream=1)
    )
    gate = hold(server, "window", held)
    raw = await Raw.connect(server.url)
    opened = await raw.open(1, "window", kind="audio", dtype="int16", overflow=overflow)
    assert opened["type"] == "opened"
    chunk, rate, t0 = 16, 8000, 500.0  # each chunk: one window's 16 new samples, 2 ms

    async def send(seq: int) -> None:
        t = t0 + 1000.0 * seq * chunk / rate
        await raw.ws.send(encode_frame(Chunk(1, seq, t, pcm_ramp(seq * chunk, chunk))))

    for seq in range(5):  # 0 runs (held); 1 to 4 find the stream's one in flight running
        await send(seq)  # (nothing queued to drop either): refused
    refused = [await raw.recv() for _ in range(4)]
    assert [(m["code"], m["seq"], m["reason"]) for m in refused] == [
        ("overloaded", seq, "inflight") for seq in range(1, 5)
    ]
    gate.set()
    got = [await raw.recv()]
    for seq in range(5, 12):  # one at a time: each is accepted
        await send(seq)
        got.append(await raw.recv())
    assert [(m["type"], m["seq"]) for m in got] == [("result", s) for s in [0, *range(5, 12)]]
    for m in got:
        (row,) = np.array(m["outputs"]["window"]["data"]).reshape(-1, 20)
        (t,) = m["windows"]
        first_new = round(row[4] * 32768)  # the window's first sample after its context
        assert first_new == m["seq"] * chunk  # the refused chunks' audio took its place
        assert t == t0 + 1000.0 * first_new / rate  # and so did their time


async def test_a_frame_over_the_hard_limit_closes_with_1009_and_ends_the_session(
    start_server: ServerFactory, tiny_models: Path
) -> None:
    """1009 is the server's close: the session is not kept (resuming would resend the frame)."""
    server: Server = await start_server(
        (tiny_models,), builtin=False, limits=Limits(max_message_bytes=1000)
    )
    raw = await Raw.connect(server.url, hello=False)
    await raw.text({"type": "hello", "protocol": 1})
    token = (await raw.recv())["resume_token"]
    assert (await raw.open(1))["type"] == "opened"
    await raw.ws.send(b"\0" * 4001)  # over 4 x max_message_bytes
    await raw.ws.wait_closed()
    assert raw.ws.close_code == 1009
    again = await Raw.connect(server.url, hello=False)
    await again.text({"type": "hello", "protocol": 1, "resume": token, "received": 1})
    refused = await again.recv()
    assert refused["code"] == "resume_unknown"
    assert server.traffic.resumes == {"refused": 1}  # never parked


async def test_binary_results_are_laid_out_as_documented(
    start_server: ServerFactory, tiny_models: Path
) -> None:
    """Audio: ``count`` frames per chunk, the outputs then the window times (index count - 1),
    also for a chunk that completed no window (a window axis of 0); no ``batch``; each frame
    repeats the chunk's ``queue_us``/``infer_us``; little-endian payloads."""
    server: Server = await start_server((tiny_models,), builtin=False)
    raw = await Raw.connect(server.url)
    opened = await raw.open(1, "window", kind="audio", dtype="int16", results="binary")
    assert [o["name"] for o in opened["outputs"]] == ["window"]
    for seq, (a, b) in enumerate([(0, 5), (5, 16)]):  # no window yet, then the first one
        frame = encode_frame(Chunk(1, seq, 10.0, np.arange(a, b, dtype="<i2")))
        await raw.ws.send(frame)
    frames = [decode_frame(await asyncio.wait_for(raw.ws.recv(), 10)) for _ in range(4)]
    assert all(isinstance(f, ResultFrame) for f in frames)
    assert [(f.seq, f.index, f.count, f.data.shape) for f in frames] == [
        (0, 0, 2, (0, 20)),  # the output, no window
        (0, 1, 2, (0,)),  # the window times, none
        (1, 0, 2, (1, 20)),
        (1, 1, 2, (1,)),
    ]
    empty, times = frames[0], frames[1]
    assert (empty.queue_us, empty.infer_us) == (times.queue_us, times.infer_us) == (0, 0)
    window, window_t = frames[2], frames[3]
    assert (window.queue_us, window.infer_us) == (window_t.queue_us, window_t.infer_us)
    assert window.infer_us > 0
    assert window_t.data.dtype == np.dtype("<f8") and window_t.data.tolist() == [10.0]
    np.testing.assert_array_equal(window.data[0, 4:] * 32768, np.arange(16))
