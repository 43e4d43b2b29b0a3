"""Hot reload through a real server: versions appear and go while clients stream."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from realtime.client import Client
from realtime.protocol import Error, Result
from realtime.server import Server
from tests.conftest import ServerFactory, double_graph, write_model


def scale_graph(factor: float) -> onnx.GraphProto:
    """y = factor * x for x of shape [batch, 4]."""
    k = helper.make_tensor("k", TensorProto.FLOAT, [], [factor])
    return helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [k],
    )


async def stream_until(client: Client, stop: asyncio.Event) -> tuple[str, list[object]]:
    """Send a chunk, read its result, until told to stop; then close and collect the rest."""
    # A deadline far past any stall of a busy CI machine: this test is about versions, and a
    # chunk shed as late would read as a chunk the reload lost.
    stream = await client.open("double", deadline_ms=10_000)
    version = stream.opened.version
    got: list[object] = []
    seq = 0
    while not stop.is_set():
        await stream.send(np.full(4, seq, np.float32))
        got.append(await stream.next())
        seq += 1
    await stream.close()
    got += await stream.collect()
    return version, got


async def test_a_new_version_serves_new_streams_while_old_streams_keep_theirs(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    write_model(root, "double", double_graph())
    server: Server = await start_server((root,), builtin=False)
    clients = [await Client.connect(server.url) for _ in range(10)]
    stop = asyncio.Event()
    streaming = [asyncio.create_task(stream_until(c, stop)) for c in clients]

    write_model(root, "double", scale_graph(3.0), version="2")
    assert await server.reload() == {"added": ["double@2"], "removed": [], "refused": []}
    async with await Client.connect(server.url) as late:
        assert late.model("double")["version"] == "2"  # the catalog's default now
        new = await late.open("double")
        assert new.opened.version == "2"
        await new.send(np.ones(4, np.float32))
        result = await new.next()
        assert isinstance(result, Result) and result.outputs["y"].tolist() == [3.0] * 4

    # A broken version is refused; the versions loaded keep serving.
    broken = root / "double" / "3"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"\x08\x07not onnx")
    assert await server.reload() == {"added": [], "removed": [], "refused": ["double@3"]}
    assert server.repository.get("double") is not None
    assert server.repository.get("double").version == "2"  # type: ignore[union-attr]
    assert await server.reload() == {"added": [], "removed": [], "refused": []}  # not retried

    # A version whose folder is gone leaves the catalog; streams on it go on.
    shutil.rmtree(broken)
    shutil.rmtree(root / "double" / "2")
    assert (await server.reload())["removed"] == ["double@2"]
    assert server.repository.get("double").version == "1"  # type: ignore[union-attr]

    stop.set()
    for version, got in await asyncio.gather(*streaming):
        assert version == "1"  # opened before the reload: stays on its version
        assert got and not [m for m in got if isinstance(m, Error)]  # no chunk lost or failed
        values = [m.outputs["y"][0] for m in got if isinstance(m, Result)]
        assert values == [2.0 * k for k in range(len(values))]  # in order, all from version 1
    for c in clients:
        await c.close()
    assert server.traffic.reloads == {"added": 1, "refused": 1, "removed": 1}


async def test_the_poller_finds_a_new_version(start_server: ServerFactory, tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_model(root, "double", double_graph())
    server: Server = await start_server((root,), builtin=False, reload_seconds=0.05)
    write_model(root, "double", scale_graph(3.0), version="2")
    while server.repository.get("double").version != "2":  # type: ignore[union-attr]
        await asyncio.wait_for(server.reloaded.wait(), timeout=10)
