"""The real server on loopback, driven by the Python client and by raw WebSocket frames."""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from realtime import errors
from realtime.client import Client
from realtime.protocol import Chunk, Error, Event, Result, ResultFrame, encode_frame
from realtime.server import Server
from realtime.session import Limits
from tests.conftest import (
    REPO,
    ServerFactory,
    double_graph,
    hold,
    needs_shared,
    read_clip,
    write_model,
)


async def _server(start_server: ServerFactory, tiny_models: Path, **kw: Any) -> Server:
    server: Server = await start_server((tiny_models,), builtin=False, **kw)
    return server


async def test_tensor_stream_results_arrive_in_order_with_timings(
    start_server: ServerFactory, tiny_models: Path
) -> None:
    server = await _server(start_server, tiny_models)
    async with await Client.connect(server.url) as client:
        stream = await client.open("double")
        assert stream.opened.version == "1"
        xs = [np.full(4, i, np.float32) for i in range(50)]
        for i, x in enumerate(xs):
            await stream.send(x, t=1000.0 + i)
        closed = await stream.close()
        got = await stream.collect()
    assert closed.results == 50 and closed.errors == 0
    assert [m.seq for m in got] == list(range(50))
    for i, msg in enumerate(got):
        assert isinstance(msg, Result)
        assert msg.t == 1000.0 + i
        np.testing.assert_array_equal(msg.outputs["y"], 2 * xs[i])
        assert msg.timing.queue_ms >= 0 and msg.timing.infer_ms > 0 and msg.timing.batch >= 1


async def test_stateful_streams_keep_their_own_state(
    start_server: ServerFactory, tiny_models: Path
) -> None:
    server = await _server(start_server, tiny_models)
    async with await Client.connect(server.url) as client:
        # A long deadline: an unwarmed server's first batches are slow, and admission control
        # would refuse chunks against that estimate; this test is about state, not deadlines.
        streams = [await client.open("accumulate", deadline_ms=10_000) for _ in range(5)]
        for _step in range(20):
            for k, stream in enumerate(streams):
                await stream.send(np.full(3, k + 1, np.float32))
        for stream in streams:
            await stream.close()
        results = [await s.collect() for s in streams]
    for k, got in enumerate(results):
        totals = [float(m.outputs["total"][0]) for m in got if isinstance(m, Result)]
        assert totals == [(k + 1) * (step + 1) for step in range(20)]


async def test_audio_stream_gets_context_and_pcm_conversion(
    start_server: ServerFactory, tiny_models: Path
) -> None:
    server = await _server(start_server, tiny_models)
    async with await Client.connect(server.url) as client:
        stream = await client.open("window", dtype="int16", sample_rate=8000)
        pcm = (np.arange(48, dtype=np.int16) * 512).reshape(3, 16)
        for chunk in pcm:
            await stream.send(chunk)
        await stream.close()
        got = [m.outputs["window"][0] for m in await stream.collect() if isinstance(m, Result)]
    flat = pcm.reshape(-1).astype(np.float32) / 32768
    np.testing.assert_array_equal(got[0], np.concatenate([np.zeros(4, np.float32), flat[:16]]))
    np.testing.assert_array_equal(got[1], flat[12:32])
    np.testing.assert_array_equal(got[2], flat[28:48])


@pytest.mark.parametrize("results", ["json", "binary"])
async def test_audio_chunks_of_any_length_each_get_one_result(
    start_server: ServerFactory, tiny_models: Path, results: str
) -> None:
    server = await _server(start_server, tiny_models)
    sizes = [5, 0, 40, 7, 16, 1, 60]  # 129 samples at 8 kHz: windows of 16 new samples
    async with await Client.connect(server.url) as client:
        stream = await client.open("window", dtype="float32", sample_rate=8000, results=results)
        assert stream.opened.input["shape"] == [None]
        assert stream.opened.outputs[0]["shape"] == [None, 20]
        sent = 0
        for size in sizes:
            await stream.send(np.arange(sent, sent + size, dtype=np.float32), t=10 + sent / 8)
            sent += size
        await stream.close()
        got = await stream.collect()
    assert [m.seq for m in got] == list(range(len(sizes)))
    assert all(isinstance(m, Result) and m.windows is not None for m in got)
    counts = [len(m.windows) for m in got if isinstance(m, Result) and m.windows is not None]
    assert counts == [0, 0, 2, 1, 1, 0, 4]  # each chunk holds the windows it completed
    windows = np.concatenate([m.outputs["window"] for m in got if isinstance(m, Result)])
    times = np.concatenate(
        [m.windows for m in got if isinstance(m, Result) and m.windows is not None]
    )
    assert windows.shape == (8, 20)
    np.testing.assert_array_equal(times, 10 + np.arange(8) * 2.0)  # 16 samples at 8 kHz: 2 ms
    for i in range(1, 8):  # each window: 4 samples of context, then its 16 new ones
        np.testing.assert_array_equal(windows[i], np.arange(16 * i - 4, 16 * i + 16))


async def test_binary_results(start_server: ServerFactory, tiny_models: Path) -> None:
    server = await _server(start_server, tiny_models)
    async with await Client.connect(server.url) as client:
        stream = await client.open("double", results="binary")
        await stream.send(np.arange(4, dtype=np.float32))
        msg = await stream.next()
    assert isinstance(msg, Result)
    np.testing.assert_array_equal(msg.outputs["y"], np.arange(4) * 2)


async def test_ping_measures_round_trip(start_server: ServerFactory, tiny_models: Path) -> None:
    server = await _server(start_server, tiny_models)
    async with await Client.connect(server.url) as client:
        rtt, offset = await client.ping()
    assert 0 <= rtt < 5000 and abs(offset) < 5000


async def test_http_endpoints(start_server: ServerFactory, tiny_models: Path) -> None:
    server = await _server(start_server, tiny_models)
    base = f"http://127.0.0.1:{server.port}"

    def get(path: str) -> tuple[int, str, bytes]:
        try:
            with urllib.request.urlopen(base + path, timeout=5) as r:
                return r.status, r.headers["Content-Type"], r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers["Content-Type"], e.read()

    status, ctype, body = await asyncio.to_thread(get, "/v1/models")
    assert status == 200 and ctype == "application/json"
    names = {m["name"] for m in orjson.loads(body)["models"]}
    assert names == {"double", "accumulate", "window"}
    assert (await asyncio.to_thread(get, "/healthz"))[0] == 200
    assert (await asyncio.to_thread(get, "/../etc/passwd"))[0] == 404


# --- Bad input: every kind gets its typed error and the session keeps working -------------


class Raw:
    """A bare WebSocket session for sending what a well-behaved client never would."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    @classmethod
    async def connect(cls, url: str, hello: bool = True) -> Raw:
        raw = cls(await connect(url, compression=None, max_size=None))
        if hello:
            await raw.text({"type": "hello", "protocol": 1})
            assert (await raw.recv())["type"] == "welcome"
        return raw

    async def text(self, msg: Any) -> None:
        await self.ws.send(msg if isinstance(msg, str) else orjson.dumps(msg).decode())

    async def recv(self) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), 10)
        assert isinstance(raw, str), "expected a text frame"
        msg: dict[str, Any] = orjson.loads(raw)
        return msg

    async def open(self, stream: int, model: str = "double", **kw: Any) -> dict[str, Any]:
        """Open a stream; with a long deadline unless ``kw`` says otherwise (None: the model's):
        these tests are about the protocol, and a busy machine must not shed their chunks."""
        msg = {
            "type": "open",
            "stream": stream,
            "model": model,
            "kind": "tensor",
            "dtype": "float32",
            "deadline_ms": 60_000,
        }
        await self.text({k: v for k, v in {**msg, **kw}.items() if v is not None})
        return await self.recv()

    async def chunk(self, stream: int, seq: int, data: np.ndarray[Any, Any]) -> None:
        await self.ws.send(encode_frame(Chunk(stream, seq, 0.0, data)))

    async def still_works(self, stream: int, seq: int) -> None:
        """A good chunk on an open ``double`` stream still gets its result."""
        await self.chunk(stream, seq, np.ones(4, np.float32))
        msg = await self.recv()
        assert (msg["type"], msg["seq"], msg["outputs"]["y"]["data"]) == ("result", seq, [2.0] * 4)


GOOD = np.ones(4, np.float32)
BAD_TEXT: list[tuple[str, Any, str]] = [
    ("invalid JSON", "{not json", "bad_message"),
    ("deeply nested JSON", "[" * 30_000 + "]" * 30_000, "bad_message"),
    ("a text message over max_text_bytes", " " * 70_000, "message_too_big"),
    ("not an object", "[1,2,3]", "bad_message"),
    ("unknown type", {"type": "teleport"}, "bad_message"),
    (
        "server message",
        {"type": "welcome", "session": "x", "server": "x", "models": [], "protocol": 1},
        "bad_message",
    ),
    ("second hello", {"type": "hello", "protocol": 1}, "bad_message"),
    ("wrong protocol version", {"type": "hello", "protocol": 99}, "unsupported_version"),
    ("resume on an open session", {"type": "hello", "protocol": 1, "resume": "t"}, "bad_message"),
    ("resume token not a string", {"type": "hello", "protocol": 1, "resume": 5}, "bad_message"),
    (
        "negative received count",
        {"type": "hello", "protocol": 1, "resume": "t", "received": -1},
        "bad_message",
    ),
    ("close unknown stream", {"type": "close", "stream": 77}, "stream_not_open"),
    ("huge text", "x" * 300_000, "message_too_big"),
]


@pytest.mark.parametrize(("why", "msg", "code"), BAD_TEXT, ids=[b[0] for b in BAD_TEXT])
async def test_bad_text_gets_typed_error(
    start_server: ServerFactory, tiny_models: Path, why: str, msg: Any, code: str
) -> None:
    server = await _server(start_server, tiny_models, limits=Limits(max_message_bytes=200_000))
    raw = await Raw.connect(server.url)
    assert (await raw.open(1))["type"] == "opened"
    await raw.text(msg)
    err = await raw.recv()
    assert err["type"] == "error" and err["code"] == code, err
    assert isinstance(err["message"], str) and isinstance(err["retryable"], bool)
    await raw.still_works(1, 0)


BAD_OPEN: list[tuple[str, dict[str, Any], str]] = [
    ("unknown model", {"model": "nope"}, "unknown_model"),
    ("unknown version", {"version": "9"}, "unknown_version"),
    ("kind mismatch", {"kind": "audio"}, "kind_mismatch"),
    ("dtype mismatch", {"dtype": "int16"}, "dtype_mismatch"),
    ("shape mismatch", {"shape": [5]}, "shape_mismatch"),
    ("already open", {"stream": 1}, "stream_already_open"),
    (
        "wrong sample rate",
        {"model": "window", "kind": "audio", "sample_rate": 500},
        "unsupported_sample_rate",
    ),
    (
        "bad audio dtype",
        {"model": "window", "kind": "audio", "dtype": "bool", "sample_rate": 8000},
        "dtype_mismatch",
    ),
    ("bad deadline", {"deadline_ms": -5}, "bad_message"),
    ("bad results mode", {"results": "xml"}, "bad_message"),
]


@pytest.mark.parametrize(("why", "fields", "code"), BAD_OPEN, ids=[b[0] for b in BAD_OPEN])
async def test_bad_open_gets_typed_error(
    start_server: ServerFactory, tiny_models: Path, why: str, fields: dict[str, Any], code: str
) -> None:
    server = await _server(start_server, tiny_models)
    raw = await Raw.connect(server.url)
    assert (await raw.open(1))["type"] == "opened"
    err = await raw.open(fields.pop("stream", 2), **fields)
    assert err["type"] == "error" and err["code"] == code, err
    if code != "bad_message":
        assert err["stream"] == 1 if why == "already open" else err["stream"] == 2
    await raw.still_works(1, 0)


BAD_CHUNKS: list[tuple[str, Any, str]] = [
    ("garbage bytes", b"\x00garbage", "bad_frame"),
    ("truncated header", encode_frame(Chunk(1, 5, 0.0, GOOD))[:20], "bad_frame"),
    ("truncated payload", encode_frame(Chunk(1, 5, 0.0, GOOD))[:-1], "bad_frame"),
    ("result frame from client", encode_frame(ResultFrame(1, 5, 0.0, GOOD)), "bad_frame"),
    ("stream not open", encode_frame(Chunk(9, 5, 0.0, GOOD)), "stream_not_open"),
    ("wrong dtype", encode_frame(Chunk(1, 5, 0.0, GOOD.astype(np.float64))), "dtype_mismatch"),
    ("wrong shape", encode_frame(Chunk(1, 5, 0.0, np.ones(5, np.float32))), "shape_mismatch"),
    (
        "NaN",
        encode_frame(Chunk(1, 5, 0.0, np.array([1, np.nan, 0, 0], np.float32))),
        "non_finite_input",
    ),
    (
        "Inf",
        encode_frame(Chunk(1, 5, 0.0, np.array([1, np.inf, 0, 0], np.float32))),
        "non_finite_input",
    ),
    ("repeated seq", encode_frame(Chunk(1, 0, 0.0, GOOD)), "bad_sequence"),
    ("huge frame", encode_frame(Chunk(1, 5, 0.0, np.ones(100_000, np.float32))), "message_too_big"),
]


@pytest.mark.parametrize(("why", "frame", "code"), BAD_CHUNKS, ids=[b[0] for b in BAD_CHUNKS])
async def test_bad_chunk_gets_typed_error_and_session_goes_on(
    start_server: ServerFactory, tiny_models: Path, why: str, frame: bytes, code: str
) -> None:
    server = await _server(start_server, tiny_models, limits=Limits(max_message_bytes=200_000))
    raw, bystander = await Raw.connect(server.url), await Raw.connect(server.url)
    assert (await raw.open(1))["type"] == "opened"
    assert (await bystander.open(1))["type"] == "opened"
    await raw.still_works(1, 0)
    await raw.ws.send(frame)
    err = await raw.recv()
    assert err["type"] == "error" and err["code"] == code, err
    if code not in ("bad_frame", "message_too_big"):
        assert (err["stream"], err["seq"]) == (
            (9 if why == "stream not open" else 1),
            5 if why != "repeated seq" else 0,
        )
    await raw.still_works(1, 6)
    await bystander.still_works(1, 0)


async def test_hello_comes_first(start_server: ServerFactory, tiny_models: Path) -> None:
    server = await _server(start_server, tiny_models)
    raw = await Raw.connect(server.url, hello=False)
    err = await raw.open(1)
    assert err["code"] == "hello_required"
    await raw.text({"type": "hello", "protocol": 1})
    assert (await raw.recv())["type"] == "welcome"
    assert (await raw.open(1))["type"] == "opened"
    await raw.still_works(1, 0)


async def test_stream_limit(start_server: ServerFactory, tiny_models: Path) -> None:
    server = await _server(start_server, tiny_models, limits=Limits(max_streams=2))
    raw = await Raw.connect(server.url)
    assert (await raw.open(1))["type"] == "opened"
    assert (await raw.open(2))["type"] == "opened"
    assert (await raw.open(3))["code"] == "too_many_streams"
    await raw.text({"type": "close", "stream": 2})
    assert (await raw.recv())["type"] == "closed"
    assert (await raw.open(3))["type"] == "opened"


async def test_in_flight_limit_refuses_with_overloaded(
    start_server: ServerFactory, tiny_models: Path
) -> None:
    server = await _server(start_server, tiny_models, limits=Limits(max_inflight_per_stream=4))
    raw = await Raw.connect(server.url)
    assert (await raw.open(1, "accumulate", shape=[3]))["type"] == "opened"
    n = 200
    for seq in range(n):
        await raw.chunk(1, seq, np.ones(3, np.float32))
    got = [await raw.recv() for _ in range(n)]
    results = [m["seq"] for m in got if m["type"] == "result"]
    refused = [m for m in got if m["type"] == "error"]
    assert results == sorted(results) and len(results) >= 4
    assert refused and all(m["code"] == "overloaded" and m["retryable"] for m in refused)
    assert sorted(results + [m["seq"] for m in refused]) == list(range(n))
    # The accepted chunks alone fed the state, once each and in order.
    totals = [m["outputs"]["total"]["data"][0] for m in got if m["type"] == "result"]
    assert totals == [float(k + 1) for k in range(len(results))]


async def test_drop_oldest_streams_shed_old_chunks_with_a_typed_error(
    start_server: ServerFactory, tmp_path: Path, held: list[threading.Event]
) -> None:
    # The model is held while the client sends (one batch running, the rest queued), so what
    # the policy does does not depend on how fast this machine runs batches.
    root = tmp_path / "models"
    write_model(root, "double", double_graph(), "max_delay_ms = 0\n")
    server = await start_server(
        (root,), builtin=False, workers=1, limits=Limits(max_inflight_per_stream=4)
    )
    gate = hold(server, "double", held)
    raw = await Raw.connect(server.url)
    opened = await raw.open(1, "double", shape=[4], overflow="drop_oldest")
    assert opened["overflow"] == "drop_oldest"
    n = 200
    for seq in range(n):  # far faster than served
        await raw.chunk(1, seq, np.full(4, seq, np.float32))
    await raw.text({"type": "ping", "id": 1, "t": 0.0})  # answered once all the above was read
    got = []
    while len(got) < n:
        msg = await raw.recv()
        if msg["type"] == "pong":
            gate.set()
        else:
            got.append(msg)
    assert sorted(m["seq"] for m in got) == list(range(n))  # one outcome per chunk
    results = [m for m in got if m["type"] == "result"]
    dropped = [m for m in got if m["type"] == "error" and m["code"] == "dropped"]
    refused = [m for m in got if m["type"] == "error" and m["code"] == "overloaded"]
    assert len(results) + len(dropped) + len(refused) == n
    # Accepted chunks (run or dropped) come back in order; a refused one's error comes at once.
    accepted = [m["seq"] for m in got if m["type"] == "result" or m["code"] == "dropped"]
    assert accepted == sorted(accepted)
    assert all(m["outputs"]["y"]["data"] == [2.0 * m["seq"]] * 4 for m in results)
    assert dropped and all(m["retryable"] for m in dropped + refused)
    # Dropping makes room: every chunk is accepted (0 runs; 1 is cut as the worker's next batch;
    # 2, 3 wait, and each newer one takes the oldest waiting one's place), where reject would
    # have refused all but 4.
    assert [m["seq"] for m in results] == [0, 1, n - 2, n - 1] and not refused
    await raw.still_works(1, n)


async def test_shed_by_age_without_admission_drops_a_chunk_gone_stale_behind_a_newer_one(
    start_server: ServerFactory, tmp_path: Path, held: list[threading.Event]
) -> None:
    """``--admit-load 0 --shed-by-age on``: every session is admitted, and a live stream's chunk
    that waited longer than 0.3 of its deadline with a newer one behind it is still dropped for
    the newer one (the load tester's capacity runs: the server's own shedding, no refusals).
    Chunk 0 runs held and 1 waits for the worker in the next batch (two a worker); 2 and 3
    wait in the queue. Past 0.3 of their 3 s deadline (the wait is what is tested, and the
    chunks expire only at 3 s), 2 is dropped and 3 runs."""
    root = tmp_path / "models"
    write_model(root, "double", double_graph(), "max_delay_ms = 0\n")
    server = await start_server((root,), builtin=False, workers=1, shed_by_age=True)
    assert not server.config.admission.enabled and server.config.sheds_by_age
    gate = hold(server, "double", held)
    raw = await Raw.connect(server.url)
    await raw.open(1, "double", shape=[4], overflow="drop_oldest", deadline_ms=3000)
    for seq in range(4):
        await raw.chunk(1, seq, np.full(4, seq, np.float32))
    await raw.text({"type": "ping", "id": 1, "t": 0.0})  # answered once all four were read
    assert (await raw.recv())["type"] == "pong"
    await asyncio.sleep(1.2)
    gate.set()
    got = [await raw.recv() for _ in range(4)]
    assert [(m["type"], m["seq"]) for m in got] == [
        ("result", 0),
        ("result", 1),
        ("error", 2),
        ("result", 3),
    ]
    assert got[2]["code"] == "dropped" and "newer chunk" in got[2]["message"]


async def test_client_raises_typed_errors(start_server: ServerFactory, tiny_models: Path) -> None:
    server = await _server(start_server, tiny_models)
    async with await Client.connect(server.url) as client:
        with pytest.raises(errors.UnknownModel):
            await client.open("nope", kind="tensor", dtype="float32")
        stream = await client.open("double")
        await stream.send(np.ones(3, np.float32))
        msg = await stream.next()
    assert isinstance(msg, Error) and msg.code == "shape_mismatch" and msg.seq == 0


# --- The real third-party models, through the real server ------------------------------------


def _segments_mask(times_s: np.ndarray[Any, Any], margin: float) -> tuple[Any, Any]:
    """Chunks well inside speech, and well inside silence, per ../shared/data/README.md."""
    speech_segments = [(1.01, 2.99), (4.93, 6.71)]
    inside = np.zeros(len(times_s), bool)
    near = np.zeros(len(times_s), bool)
    for a, b in speech_segments:
        inside |= (times_s >= a + margin) & (times_s <= b - margin)
        near |= (times_s >= a - margin) & (times_s <= b + margin)
    return inside, ~near


@needs_shared
async def test_silero_vad_through_the_server(start_server: ServerFactory) -> None:
    server = await start_server((REPO / "examples" / "models",), builtin=False)
    pcm, rate = read_clip("speech_16k.wav")
    n = len(pcm) // 512
    async with await Client.connect(server.url) as client:
        # A long deadline: 32 chunks of one stateful stream run one batch each, in turn, and a
        # busy CI machine must not shed them; this test is about the model's answers.
        stream = await client.open(
            "silero_vad", dtype="int16", sample_rate=rate, deadline_ms=10_000
        )
        got = []
        for i in range(n):  # at most 32 in flight, well under the stream's limit
            await stream.send(pcm[i * 512 : (i + 1) * 512], t=1000.0 * i * 512 / rate)
            if i >= 31:
                got.append(await stream.next())
        closed = await stream.close()
        got += await stream.collect()
    got = [m for m in got if not isinstance(m, Event)]  # speech events: tests/events
    assert (closed.results, closed.errors) == (n, 0)
    assert [m.seq for m in got] == list(range(n))
    probs = np.array([float(m.outputs["output"][0, 0]) for m in got if isinstance(m, Result)])
    speech, silence = _segments_mask(np.array([m.t / 1000 + 0.016 for m in got]), 0.3)
    assert probs[speech].mean() > 0.8 and probs[silence].mean() < 0.1


@needs_shared
async def test_basic_pitch_through_the_server(start_server: ServerFactory) -> None:
    server = await start_server((REPO / "examples" / "models",), builtin=False)
    pcm, rate = read_clip("melody_22k.wav")
    window = np.zeros(43844, np.int16)
    window[: min(len(pcm), 43844)] = pcm[:43844]
    async with await Client.connect(server.url) as client:
        stream = await client.open("basic_pitch", dtype="int16", sample_rate=rate)
        await stream.send(window)
        msg = await stream.next()
    assert isinstance(msg, Result)
    notes = msg.outputs["StatefulPartitionedCall:1"][0]  # the one window of the chunk
    assert notes.shape == (172, 88)
    # The window is 7680 samples of (zero) context, then the clip's first 36164 samples.
    frame = lambda s: int((s * 22050 + 7680) / 256)  # noqa: E731 - frames of 256 samples
    assert int(notes[frame(0.75)].argmax()) + 21 == 60  # C4 in the middle of the first note
    assert int(notes[frame(1.5)].argmax()) + 21 == 64  # E4 in the middle of the second


async def _stream_all(stream: Any, chunks: list[np.ndarray[Any, Any]], dt_ms: float) -> list[Any]:
    """Send every chunk with at most 32 in flight; return the results in arrival order."""
    got = []
    for i, chunk in enumerate(chunks):
        await stream.send(chunk, t=i * dt_ms)
        if i >= 31:
            got.append(await stream.next())
    closed = await stream.close()
    got += await stream.collect()
    got = [m for m in got if not isinstance(m, Event)]  # events: tests/events
    assert not [m for m in got if isinstance(m, Error)]
    assert (closed.results, closed.errors) == (len(chunks), 0)
    assert [m.seq for m in got] == list(range(len(chunks)))
    return got


@needs_shared
async def test_builtin_models_serve_all_three_kinds(start_server: ServerFactory) -> None:
    server = await start_server()  # the built-in models only, as `realtime serve` with no flags
    pcm, rate = read_clip("speech_16k.wav")
    n = len(pcm) // 320
    rng = np.random.default_rng(0)
    poses = np.zeros((40, 3, 7), np.float32)
    poses[:, :, 6] = 1  # identity orientation
    poses[:, 0, :3] = rng.normal(0, 0.01, (40, 3)).cumsum(axis=0)  # a wandering head
    frames = [np.full((96, 96, 3), 60, np.uint8) for _ in range(12)]
    for i, f in enumerate(frames):
        f[30:50, 8 * i : 8 * i + 16] = 255  # a white square moving right
    async with await Client.connect(server.url) as client:
        assert {m["name"] for m in client.models} >= {"speech_activity", "pitch", "pose", "motion"}
        # Chunks go out in bursts of 32, far faster than real time: relax the deadlines.
        speech, pose, video = await asyncio.gather(
            client.open("speech_activity", dtype="int16", sample_rate=rate, deadline_ms=5000),
            client.open("pose", deadline_ms=5000),
            client.open("motion", deadline_ms=5000),
        )
        audio_got, pose_got, video_got = await asyncio.gather(
            _stream_all(speech, [pcm[i * 320 : (i + 1) * 320] for i in range(n)], 20.0),
            _stream_all(pose, list(poses), 12.5),
            _stream_all(video, frames, 66.7),
        )
    probs = np.array([float(m.outputs["speech_prob"][0]) for m in audio_got])
    assert all(m.outputs["speech_prob"].shape == (1,) for m in audio_got)  # one window each
    inside, outside = _segments_mask(np.array([m.t / 1000 + 0.01 for m in audio_got]), 0.1)
    assert probs[inside].mean() > 0.5 > 0.05 > probs[outside].mean()
    assert all(m.outputs["smoothed"].shape == (3, 7) for m in pose_got)
    np.testing.assert_allclose(pose_got[0].outputs["smoothed"], poses[0], atol=1e-6)
    assert all(m.outputs["mean_rgb"].shape == (3,) for m in video_got)
    motion = [float(m.outputs["motion"]) for m in video_got]
    assert motion[0] == 0 and min(motion[1:]) > 0.01  # the square moved in every later frame
    xs = [float(m.outputs["motion_xy"][0]) for m in video_got[1:]]
    assert xs == sorted(xs)  # ... to the right


async def test_an_idle_session_is_closed_with_4001(
    start_server: ServerFactory, tiny_models: Path
) -> None:
    server = await _server(start_server, tiny_models, limits=Limits(idle_seconds=0.2))
    raw = await Raw.connect(server.url)  # says hello, then nothing
    await raw.ws.wait_closed()
    assert raw.ws.close_code == 4001 and "nothing received" in (raw.ws.close_reason or "")


async def test_a_slow_reader_loses_its_oldest_results_with_a_typed_error(
    start_server: ServerFactory, tiny_models: Path
) -> None:
    import socket

    from realtime.config import Config

    # Nothing refused (in-flight bounds out of the way): only results pile up unread.
    roomy = Limits(max_inflight_per_stream=10_000, max_inflight_per_session=10_000)
    server = Server(
        Config(
            port=0,
            model_dirs=(tiny_models,),
            builtin_models=False,
            warm_up=False,
            reload_seconds=0,
            max_outbox=64,
            limits=roomy,
        )
    )
    await server.start()
    try:
        listener = server._ws.sockets[0]  # type: ignore[union-attr]
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # accepted ones inherit
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        raw = Raw(await connect(server.url, sock=sock, compression=None, max_size=None))
        await raw.text({"type": "hello", "protocol": 1})
        assert (await raw.recv())["type"] == "welcome"
        # Raw.open's long deadline matters here: on a busy machine chunks would miss 100 ms, and
        # their typed errors (never shed) would fill the outbox; this is about results piling up.
        assert (await raw.open(1, "double", shape=[4]))["type"] == "opened"
        n = 3000
        for seq in range(n):  # and read nothing meanwhile
            await raw.chunk(1, seq, np.ones(4, np.float32))
        got = []
        while True:
            msg = await raw.recv()
            got.append(msg)
            if msg["type"] == "result" and msg["seq"] == n - 1:
                break
        notices = [m for m in got if m.get("code") == "results_dropped"]
        results = [m["seq"] for m in got if m["type"] == "result"]
        assert notices and all(
            m["retryable"] and "reads too slowly" in m["message"] for m in notices
        )
        dropped = sum(int(m["message"].split()[0]) for m in notices)
        refused = [m["seq"] for m in got if m["type"] == "error" and "seq" in m]
        # every chunk answered (a result or its own typed error) or counted in a notice
        assert len(results) + len(refused) + dropped == n
        assert results == sorted(results)  # what is left is in order, the newest kept
    finally:
        await server.close()


async def test_a_session_over_its_rate_is_told_and_slowed_not_cut(
    start_server: ServerFactory, tiny_models: Path
) -> None:
    # In-flight bounds above the 250 sent: the burst of 100 arrives at once.
    limits = Limits(max_messages_per_second=200, max_inflight_per_stream=512)
    server = await start_server((tiny_models,), builtin=False, limits=limits)
    raw = await Raw.connect(server.url)
    assert (await raw.open(1))["type"] == "opened"
    for seq in range(250):  # a burst of 100 is free, then 200 a second: 0.75 s over the rate
        await raw.chunk(1, seq, GOOD)
    got = [await raw.recv() for _ in range(251)]
    notices = [m for m in got if m["type"] == "error"]
    assert [(m["code"], m["retryable"]) for m in notices] == [("rate_limited", True)]
    assert "reading paused" in notices[0]["message"] and "stream" not in notices[0]
    assert [m["seq"] for m in got if m["type"] == "result"] == list(range(250))  # none lost
