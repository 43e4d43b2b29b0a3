"""Faults through a real server: a model that raises inside ONNX Runtime, a worker that hangs, a
model that returns a broken state, a client that vanishes with chunks queued. Invariant: every
accepted chunk gets one result or one typed error, and the other sessions notice nothing."""

from __future__ import annotations

import asyncio
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import orjson
from onnx import TensorProto, helper

from realtime.client import Client
from realtime.protocol import Error, Result
from realtime.server import Server
from tests.conftest import ServerFactory, double_graph, write_model
from tests.test_cli import Served
from tests.test_server import Raw


def get(url: str) -> tuple[int, bytes]:
    """An HTTP GET's status and body."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def lookup_graph() -> onnx.GraphProto:
    """y = table[int(x)] for x [batch, 1]: an index past the table makes ORT raise at run time."""
    table = helper.make_tensor("table", TensorProto.FLOAT, [4], [10.0, 11.0, 12.0, 13.0])
    return helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "i"], ["y"], axis=0),
        ],
        "lookup",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [table],
    )


async def test_a_model_that_raises_fails_only_its_batch(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    write_model(root, "lookup", lookup_graph(), "max_delay_ms = 0\n")
    write_model(root, "double", double_graph())
    server: Server = await start_server((root,), builtin=False)
    bystander = await Client.connect(server.url)
    other = await bystander.open("double")
    raw = await Raw.connect(server.url)
    assert (await raw.open(1, "lookup", shape=[1]))["type"] == "opened"
    await raw.chunk(1, 0, np.array([2.0], np.float32))
    await other.send(np.ones(4, np.float32))
    await raw.chunk(1, 1, np.array([99.0], np.float32))  # out of the table: ORT raises
    await raw.chunk(1, 2, np.array([3.0], np.float32))
    got = [await raw.recv() for _ in range(3)]
    assert [m["seq"] for m in got] == [0, 1, 2]
    assert got[0]["outputs"]["y"]["data"] == [12.0] and got[2]["outputs"]["y"]["data"] == [13.0]
    assert got[1]["type"] == "error" and got[1]["code"] == "inference_failed"
    assert "lookup@1 failed" in got[1]["message"] and got[1]["retryable"]
    answer = await other.next()
    assert isinstance(answer, Result) and answer.outputs["y"].tolist() == [2.0] * 4
    assert server.scheduler.snapshot()["lookup@1"].stats.failures >= 1
    await bystander.close()


async def test_a_client_that_vanishes_mid_stream_leaves_the_others_whole(
    start_server: ServerFactory, tiny_models: Path
) -> None:
    server: Server = await start_server((tiny_models,), builtin=False)
    clients = [await Client.connect(server.url) for _ in range(4)]
    # stateful: per-stream order; a long deadline, so a busy CI machine cannot shed anything
    streams = [await c.open("accumulate", deadline_ms=10_000) for c in clients]
    vanisher = await Raw.connect(server.url)
    assert (await vanisher.open(1, "double", shape=[4]))["type"] == "opened"
    for seq in range(60):
        await vanisher.chunk(1, seq, np.ones(4, np.float32))
    vanisher.ws.transport.abort()  # gone, with chunks queued and results unsent
    n = 50
    for _ in range(n):
        for s in streams:
            await s.send(np.full(3, 1.0, np.float32))
    for s in streams:
        got = [await s.next() for _ in range(n)]
        assert not [m for m in got if isinstance(m, Error)]
        totals = [m.outputs["total"][0] for m in got if isinstance(m, Result)]
        assert totals == [float(k + 1) for k in range(n)]  # each state intact, in order
    for c in clients:
        await c.close()


async def test_a_worker_that_hangs_fails_its_batch_and_the_others_are_served(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    write_model(root, "double", double_graph(), "max_delay_ms = 0\n")
    server: Server = await start_server((root,), builtin=False, batch_timeout_seconds=0.5)
    model = server.repository.get("double", None)
    assert model is not None
    release = threading.Event()
    run = model.runner.run

    def hang_on_99(feeds: dict[str, Any]) -> Any:  # a model run that never comes back
        if (feeds["x"] == 99.0).any():
            release.wait(60)
        return run(feeds)

    model.runner.run = hang_on_99  # type: ignore[method-assign]
    base = f"http://127.0.0.1:{server.port}"
    try:
        hung = await Raw.connect(server.url)
        assert (await hung.open(1, shape=[4]))["type"] == "opened"
        await hung.chunk(1, 0, np.full(4, 99.0, np.float32))
        bystander = await Client.connect(server.url)
        other = await bystander.open("double")
        for _ in range(20):  # served by the other workers while one hangs
            await other.send(np.ones(4, np.float32))
            answer = await other.next()
            assert isinstance(answer, Result) and answer.outputs["y"].tolist() == [2.0] * 4
        failed = await hung.recv()  # after the 0.5 s limit
        assert (failed["type"], failed["seq"], failed["code"]) == ("error", 0, "inference_failed")
        assert "its worker is stuck" in failed["message"]
        status, body = await asyncio.to_thread(get, base + "/healthz")
        assert (status, orjson.loads(body)) == (503, {"status": "stuck", "stuck_batches": 1})
        # Workers are replaced each time: two more hangs, and the bystander is served alongside
        # each (one hang holds one of the model's two batch slots; two at once would hold both
        # until the time limit, by design).
        for seq in (1, 2):
            await hung.chunk(1, seq, np.full(4, 99.0, np.float32))
            await other.send(np.ones(4, np.float32))
            assert isinstance(await other.next(), Result)
            assert (await hung.recv())["code"] == "inference_failed"
        assert server.scheduler.stuck == 3
        release.set()  # the threads come back: their late outputs are thrown away
        for _ in range(500):  # bounded poll of the server's own gauge
            if not server.scheduler.stuck:
                break
            await asyncio.sleep(0.01)
        assert (await asyncio.to_thread(get, base + "/healthz"))[0] == 200
        await hung.still_works(1, 3)
        await bystander.close()
    finally:
        release.set()


def grow_graph() -> onnx.GraphProto:
    """A broken stateful model: its new state is the old one with x appended (it grows)."""
    return helper.make_graph(
        [
            helper.make_node("Concat", ["state", "x"], ["state_out"], axis=1),
            helper.make_node("Identity", ["x"], ["y"]),
        ],
        "grow",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, ["batch", 3]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, ["batch", "n"]),
        ],
    )


async def test_a_model_returning_a_wrong_state_fails_its_chunks_typed(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    toml = 'kind = "tensor"\n[[state]]\ninput = "state"\noutput = "state_out"\nbatch_axis = 0\n'
    write_model(root, "grow", grow_graph(), toml)
    server: Server = await start_server((root,), builtin=False)
    client = await Client.connect(server.url)
    stream = await client.open("grow")
    for _ in range(3):
        await stream.send(np.ones(3, np.float32))
    got = [await stream.next() for _ in range(3)]
    assert all(isinstance(m, Error) and m.code == "inference_failed" for m in got), got
    assert "state state_out came back shaped [1, 6], went in shaped [1, 3]" in got[0].message  # type: ignore[union-attr]
    await client.close()


def spin_graph() -> onnx.GraphProto:
    """y = x + trips, one Loop iteration per trip, trips = max(x): 1e9 is a run that never ends
    (about 40 minutes at 2.3 us an iteration)."""
    body = helper.make_graph(
        [
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None),
        ],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    return helper.make_graph(
        [
            helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
            helper.make_node("Cast", ["m"], ["trips"], to=TensorProto.INT64),
            helper.make_node("Loop", ["trips", "true", "x"], ["y"], body=body),
        ],
        "spin",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor("true", TensorProto.BOOL, [], [True])],
    )


async def test_sigterm_with_a_worker_stuck_in_onnx_runtime_still_exits(tmp_path: Path) -> None:
    """A real process whose model run never ends inside ONNX Runtime: the chunk fails typed,
    /healthz says stuck, and SIGTERM still ends the process at once (a thread cannot be
    joined), exit 0."""
    root = tmp_path / "models"
    write_model(root, "spin", spin_graph(), "max_delay_ms = 0\n")
    served = Served("--models", str(root), "--batch-timeout-seconds", "0.5")
    try:
        raw = await Raw.connect(served.url)
        assert (await raw.open(1, "spin", shape=[1]))["type"] == "opened"
        await raw.chunk(1, 0, np.array([3.0], np.float32))
        assert (await raw.recv())["outputs"]["y"]["data"] == [6.0]
        await raw.chunk(1, 1, np.array([1e9], np.float32))
        failed = await raw.recv()
        assert (failed["seq"], failed["code"]) == (1, "inference_failed")
        base = served.url.replace("ws://", "http://").rstrip("/")
        status, body = await asyncio.to_thread(get, base + "/healthz")
        assert (status, orjson.loads(body)["status"]) == (503, "stuck")
        await raw.chunk(1, 2, np.array([3.0], np.float32))  # a fresh worker serves it
        assert (await raw.recv())["outputs"]["y"]["data"] == [6.0]
    finally:
        code, err = await asyncio.to_thread(served.stop)
    assert code == 0, err
    assert "event=exit stuck_batches=1" in err
