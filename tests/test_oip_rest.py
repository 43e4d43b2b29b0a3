"""The Open Inference Protocol over REST, driven by Triton's own client (tritonclient[http])."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from realtime.auth import ApiKey, mint
from realtime.client import Client
from realtime.models.spec import Model
from realtime.protocol import Result
from realtime.server import Server
from tests.conftest import ServerFactory, double_graph, write_model

BUILTIN = ("motion", "pitch", "pose", "speech_activity")
SECRET = "s" * 40
#: A request deadline (Triton's timeout, in us) no busy machine misses: an unwarmed server's
#: first batches are slow, and these tests are not about deadlines.
LONG = 10_000_000


def sample_input(model: Model, n: int, seed: int = 0) -> np.ndarray[Any, Any]:
    """A plausible batch of ``n`` inputs for a built-in model."""
    rng = np.random.default_rng(seed)
    shape = (n, *(d or 1 for d in model.item_shape))
    if model.name == "motion":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if model.name == "pose":
        x = rng.normal(0, 0.3, shape).astype(np.float32)
        q = x[..., 3:]
        x[..., 3:] = q / np.linalg.norm(q, axis=-1, keepdims=True)
        return x
    t = np.arange(shape[-1]) / 16000.0
    tone = 0.3 * np.sin(2 * np.pi * 220.0 * t)
    return (tone + rng.normal(0, 0.01, shape)).astype(np.float32)


def run_direct(model: Model, x: np.ndarray[Any, Any]) -> dict[str, np.ndarray[Any, Any]]:
    """The model run on ``x`` by ONNX Runtime directly, each item from the initial state."""
    n = len(x)
    feeds = dict(model.constants)
    feeds[model.input.name] = x
    for spec in model.states:
        feeds[spec.input] = np.concatenate([spec.initial] * n, axis=spec.batch_axis)
    by_name = dict(
        zip((o.name for o in model.runner.outputs), model.runner.run(feeds), strict=True)
    )
    return {o.name: by_name[o.name] for o in model.outputs}


def _client(server: Server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(f"127.0.0.1:{server.port}")


def _input(name: str, x: np.ndarray[Any, Any], binary: bool = True) -> triton.InferInput:
    dtype = {"float32": "FP32", "uint8": "UINT8", "float64": "FP64"}[x.dtype.name]
    tensor = triton.InferInput(name, list(x.shape), dtype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


@pytest.mark.parametrize("name", BUILTIN)
async def test_metadata_and_infer_on_every_builtin_model(
    start_server: ServerFactory, name: str
) -> None:
    server: Server = await start_server()
    model = server.repository.get(name)
    assert model is not None
    x = sample_input(model, 3)

    def call() -> tuple[dict[str, Any], bool, list[tuple[str, np.ndarray[Any, Any]]]]:
        client = _client(server)
        meta = client.get_model_metadata(name)
        ready = client.is_model_ready(name)
        got = []
        for binary in (True, False):  # the binary tensor extension, and plain JSON
            outputs = [
                triton.InferRequestedOutput(o.name, binary_data=binary) for o in model.outputs
            ]
            result = client.infer(
                name, [_input(model.input.name, x, binary)], outputs=outputs, timeout=LONG
            )
            got += [(o.name, result.as_numpy(o.name)) for o in model.outputs]
        client.close()
        return meta, ready, got

    meta, ready, got = await asyncio.to_thread(call)
    assert ready
    assert meta["name"] == name and meta["versions"] == ["1"]
    assert meta["inputs"][0]["name"] == model.input.name
    assert [o["name"] for o in meta["outputs"]] == [o.name for o in model.outputs]
    expected = run_direct(model, x)
    for output_name, array in got:
        np.testing.assert_allclose(array, expected[output_name], rtol=1e-5, atol=1e-5)


async def test_server_metadata_health_and_the_request_counter(
    start_server: ServerFactory,
) -> None:
    server: Server = await start_server()

    def call() -> tuple[bool, bool, dict[str, Any]]:
        client = _client(server)
        out = client.is_server_live(), client.is_server_ready(), client.get_server_metadata()
        client.close()
        return out

    live, ready, meta = await asyncio.to_thread(call)
    assert live and ready
    assert meta["name"] == "realtime" and "binary_tensor_data" in meta["extensions"]
    url = f"http://127.0.0.1:{server.port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())
    assert 'realtime_oip_requests_total{door="rest"} 3.0' in text


def _error(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


async def test_bad_requests_get_the_protocol_error_shape(start_server: ServerFactory) -> None:
    server: Server = await start_server()

    def call() -> list[InferenceServerException]:
        client = _client(server)
        x = np.zeros((1, 3, 7), np.float32)
        out = [
            _error(lambda: client.infer("nope", [_input("pose", x)])),
            _error(lambda: client.infer("pose", [_input("pose", x)], model_version="7")),
            _error(lambda: client.infer("pose", [_input("pose", x[:, :, :6].copy())])),
            _error(lambda: client.infer("pose", [_input("pose", x.astype(np.float64))])),
            _error(lambda: client.infer("pose", [_input("frame", x)])),
            _error(lambda: client.infer("pose", [_input("pose", x + np.nan)])),
            _error(lambda: client.infer("pose", [_input("pose", x)], sequence_id=3)),
            _error(lambda: client.get_model_metadata("nope")),
            _error(
                lambda: client.infer(
                    "pose", [_input("pose", x)], outputs=[triton.InferRequestedOutput("nope")]
                )
            ),
        ]
        client.close()
        return out

    got = await asyncio.to_thread(call)
    assert [(e.status(), e.message().split(" ")[0]) for e in got] == [
        ("404", "no"),
        ("404", "model"),
        ("400", "input"),
        ("400", "pose@1"),
        ("400", "pose@1"),
        ("400", "input"),
        ("400", "sequence_id"),
        ("404", "no"),
        ("400", "pose@1"),
    ]
    assert server.traffic.errors["unknown_model"] == 2
    assert server.traffic.errors["non_finite_input"] == 1


async def test_a_deadline_that_passes_in_the_queue_is_a_504(start_server: ServerFactory) -> None:
    server: Server = await start_server()

    def call() -> InferenceServerException:
        client = _client(server)
        x = np.zeros((1, 3, 7), np.float32)
        # Triton's timeout parameter (microseconds) is the request's deadline: 1 us has always
        # passed by the time a batch is cut.
        error = _error(lambda: client.infer("pose", [_input("pose", x)], timeout=1))
        client.close()
        return error

    error = await asyncio.to_thread(call)
    assert error.status() == "504" and "waited" in error.message()


async def test_compressed_bodies_are_inflated(start_server: ServerFactory) -> None:
    server: Server = await start_server()
    model = server.repository.get("pose")
    assert model is not None
    x = sample_input(model, 2)

    def call() -> np.ndarray[Any, Any]:
        client = _client(server)
        result = client.infer("pose", [_input("pose", x)], request_compression_algorithm="gzip")
        client.close()
        return result.as_numpy("smoothed")  # type: ignore[no-any-return]

    np.testing.assert_allclose(await asyncio.to_thread(call), run_direct(model, x)["smoothed"])


async def test_rest_uses_the_same_credentials_as_websocket_sessions(
    start_server: ServerFactory,
) -> None:
    keys = {"backend": ApiKey("backend", SECRET.encode(), frozenset({"pose"}))}
    server: Server = await start_server(keys=keys)
    token = mint(keys["backend"], 60.0, time.time(), ["pose"])
    x = np.zeros((1, 3, 7), np.float32)
    audio = np.zeros((1, 320), np.float32)

    def call() -> tuple[list[InferenceServerException], bool, bool]:
        client = _client(server)
        refused = [
            _error(lambda: client.infer("pose", [_input("pose", x)])),
            _error(lambda: client.get_model_metadata("pose", headers={"X-Api-Key": "x" * 40})),
            _error(
                lambda: client.infer(
                    "speech_activity",
                    [_input("audio", audio)],
                    headers={"Authorization": f"Bearer {token}"},
                )
            ),
        ]
        by_key = client.infer("pose", [_input("pose", x)], headers={"X-Api-Key": SECRET})
        by_token = client.infer(
            "pose", [_input("pose", x)], headers={"Authorization": f"Bearer {token}"}
        )
        live = client.is_server_live()  # health needs no credential
        client.close()
        return refused, by_key.as_numpy("smoothed") is not None, live and bool(by_token)

    refused, by_key, ok = await asyncio.to_thread(call)
    assert [e.status() for e in refused] == ["401", "401", "403"]
    assert by_key and ok


async def test_one_batch_mixes_websocket_chunks_and_rest_requests(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    # A model that cuts a batch only when it holds two items: a WebSocket chunk and a REST
    # request, sent at once, can only be answered by running together.
    root = tmp_path / "models"
    write_model(
        root, "double", double_graph(), "max_batch = 2\nmax_delay_ms = 30000\ndeadline_ms = 60000\n"
    )
    server: Server = await start_server((root,), builtin=False)
    x = np.arange(4, dtype=np.float32)[np.newaxis]

    def rest() -> Any:
        client = _client(server)
        result = client.infer("double", [_input("x", x)])
        client.close()
        return result

    async with await Client.connect(server.url) as ws:
        stream = await ws.open("double")
        answer = asyncio.ensure_future(asyncio.to_thread(rest))
        await stream.send(np.ones(4, np.float32))
        chunk = await stream.next()
        result = await answer
    assert isinstance(chunk, Result) and chunk.timing.batch == 2
    assert result.get_response()["parameters"]["batch"] == 2
    np.testing.assert_array_equal(result.as_numpy("y"), 2 * x)
