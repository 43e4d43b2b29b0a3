"""The Open Inference Protocol over gRPC, driven by Triton's own client (tritonclient[grpc])."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf import descriptor_pb2
from tritonclient.utils import InferenceServerException

from realtime import errors, oip_grpc
from realtime.auth import ApiKey, mint
from realtime.client import Client
from realtime.protocol import Result
from realtime.server import Server
from tests.conftest import REPO, ServerFactory
from tests.test_oip_rest import BUILTIN, SECRET, run_direct, sample_input

PROTOS = REPO / "realtime" / "protos"
#: A request deadline (Triton's timeout, in us) no busy machine misses: an unwarmed server's
#: first batches are slow, and these tests are not about deadlines.
LONG = 10_000_000


async def _server(start_server: ServerFactory, **kw: Any) -> Server:
    server: Server = await start_server(grpc_port=0, **kw)
    return server


def _client(server: Server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")


def _input(name: str, x: np.ndarray[Any, Any]) -> triton.InferInput:
    dtype = {"float32": "FP32", "uint8": "UINT8", "float64": "FP64"}[x.dtype.name]
    tensor = triton.InferInput(name, list(x.shape), dtype)
    tensor.set_data_from_numpy(x)
    return tensor


def test_the_committed_descriptor_set_is_what_protoc_makes_of_the_proto(tmp_path: Path) -> None:
    out = tmp_path / "grpc_service.binpb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"--descriptor_set_out={out}",
            str(PROTOS / "grpc_service.proto"),
        ],
        check=True,
    )
    made = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    kept = descriptor_pb2.FileDescriptorSet.FromString(oip_grpc.DESCRIPTORS.read_bytes())
    assert made == kept


def test_every_grpc_status_belongs_to_a_real_code() -> None:
    assert set(oip_grpc.GRPC_STATUS) <= set(errors.all_codes())


@pytest.mark.parametrize("name", BUILTIN)
async def test_metadata_and_infer_on_every_builtin_model(
    start_server: ServerFactory, name: str
) -> None:
    server = await _server(start_server)
    model = server.repository.get(name)
    assert model is not None
    x = sample_input(model, 3, seed=1)

    def call() -> tuple[dict[str, Any], bool, dict[str, np.ndarray[Any, Any]]]:
        client = _client(server)
        meta = client.get_model_metadata(name, as_json=True)
        ready = client.is_model_ready(name)
        result = client.infer(name, [_input(model.input.name, x)], timeout=LONG)
        got = {o.name: result.as_numpy(o.name) for o in model.outputs}
        client.close()
        return meta, ready, got

    meta, ready, got = await asyncio.to_thread(call)
    assert ready
    assert meta["name"] == name and meta["versions"] == ["1"]
    assert meta["inputs"][0]["name"] == model.input.name
    assert meta["inputs"][0]["shape"] == ["-1", *(str(d) for d in model.item_shape)]
    assert [o["name"] for o in meta["outputs"]] == [o.name for o in model.outputs]
    expected = run_direct(model, x)
    for output_name, array in got.items():
        np.testing.assert_allclose(array, expected[output_name], rtol=1e-5, atol=1e-5)


async def test_health_and_server_metadata(start_server: ServerFactory) -> None:
    server = await _server(start_server)

    def call() -> tuple[bool, bool, dict[str, Any], bool]:
        client = _client(server)
        out = (
            client.is_server_live(),
            client.is_server_ready(),
            client.get_server_metadata(as_json=True),
            client.is_model_ready("nope"),
        )
        client.close()
        return out

    live, ready, meta, unknown_ready = await asyncio.to_thread(call)
    assert live and ready and not unknown_ready
    assert meta["name"] == "realtime" and "sequence" in meta["extensions"]


def _pose_frames(n: int) -> np.ndarray[Any, Any]:
    """A head and two hands moving smoothly, with some jitter: n frames of [3, 7]."""
    t = np.arange(n, dtype=np.float64)[:, None] / 80.0
    rng = np.random.default_rng(7)
    frames = np.zeros((n, 3, 7), np.float32)
    for row in range(3):
        frames[:, row, 0:3] = np.hstack([np.sin(t + row), np.cos(t), 0.1 * t]) + rng.normal(
            0, 0.01, (n, 3)
        )
        angle = 0.5 * t[:, 0] + row
        frames[:, row, 3:] = np.stack(
            [np.zeros(n), np.sin(angle / 2), np.zeros(n), np.cos(angle / 2)], axis=1
        )
    return frames


def _stream(
    server: Server, requests: list[dict[str, Any]], headers: dict[str, str] | None = None
) -> list[tuple[Any, InferenceServerException | None]]:
    """Send requests on one ModelStreamInfer call; every answer, in arrival order."""
    answers: queue.SimpleQueue[tuple[Any, Any]] = queue.SimpleQueue()
    client = _client(server)
    client.start_stream(
        callback=lambda result, error: answers.put((result, error)), headers=headers
    )
    for request in requests:
        client.async_stream_infer(**request)
    client.stop_stream()  # waits for the call to end: the server answers everything first
    client.close()
    out = []
    while not answers.empty():
        out.append(answers.get())
    return out


async def test_a_pose_sequence_equals_the_same_frames_on_a_websocket_stream(
    start_server: ServerFactory,
) -> None:
    server = await _server(start_server)
    frames = _pose_frames(40)
    requests = [
        {
            "model_name": "pose",
            "inputs": [_input("pose", frames[i : i + 1])],
            "request_id": str(i),
            "sequence_id": 11,
            "sequence_start": i == 0,
            "sequence_end": i == len(frames) - 1,
            "timeout": LONG,
        }
        for i in range(len(frames))
    ]
    answers = await asyncio.to_thread(_stream, server, requests)
    assert [e and e.message() for _, e in answers] == [None] * len(frames)
    assert len(answers) == len(frames)
    assert [r.get_response().id for r, _ in answers] == [str(i) for i in range(len(frames))]
    over_grpc = {
        name: np.concatenate([r.as_numpy(name) for r, _ in answers])
        for name in ("smoothed", "predicted")
    }

    async with await Client.connect(server.url) as client:
        stream = await client.open("pose", deadline_ms=10_000)
        for frame in frames:
            await stream.send(frame)
        await stream.close()
        results = [m for m in await stream.collect() if isinstance(m, Result)]
    assert len(results) == len(frames)
    for name, array in over_grpc.items():
        np.testing.assert_array_equal(array, np.stack([m.outputs[name] for m in results]))
    # The state was carried: a one-shot of the last frame (from the initial state) differs.
    assert not np.allclose(over_grpc["predicted"][-1], run_direct_last(server, frames))


def run_direct_last(server: Server, frames: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    model = server.repository.get("pose")
    assert model is not None
    return run_direct(model, frames[-1:])["predicted"][0]


async def test_interleaved_sequences_keep_their_own_state_and_order(
    start_server: ServerFactory, tiny_models: Path
) -> None:
    server = await _server(start_server, model_dirs=(tiny_models,), builtin=False)
    requests = []
    for step in range(10):
        for k in (1, 2, 3):
            requests.append(
                {
                    "model_name": "accumulate",
                    "inputs": [_input("x", np.full((1, 3), k, np.float32))],
                    "request_id": f"{k}:{step}",
                    "sequence_id": f"seq-{k}",
                    "sequence_start": step == 0,
                    "sequence_end": step == 9,
                    "timeout": LONG,
                }
            )
    answers = await asyncio.to_thread(_stream, server, requests)
    assert all(e is None for _, e in answers)
    totals: dict[str, list[float]] = {}
    for result, _ in answers:
        k = result.get_response().id.split(":")[0]
        totals.setdefault(k, []).append(float(result.as_numpy("total")[0, 0]))
    assert totals == {str(k): [k * (s + 1.0) for s in range(10)] for k in (1, 2, 3)}


async def test_stream_errors_arrive_as_that_requests_error_and_the_call_goes_on(
    start_server: ServerFactory,
) -> None:
    server = await _server(start_server)
    x = np.zeros((1, 3, 7), np.float32)
    x[..., 6] = 1.0

    def req(request_id: str, **kw: Any) -> dict[str, Any]:
        return {
            "model_name": "pose",
            "inputs": [_input("pose", x)],
            "request_id": request_id,
            "timeout": LONG,
            **kw,
        }

    requests = [
        req("not-started", sequence_id=5),
        req("start", sequence_id=5, sequence_start=True),
        req("again", sequence_id=5, sequence_start=True),
        req("bad-shape", sequence_id=5) | {"inputs": [_input("pose", x[:, :2].copy())]},
        req("ok", sequence_id=5, sequence_end=True),
        {"model_name": "nope", "inputs": [_input("pose", x)], "request_id": "unknown"},
        req("one-shot"),
    ]
    answers = await asyncio.to_thread(_stream, server, requests)
    assert len(answers) == len(requests)
    errors_seen = {}
    ok = []
    for result, error in answers:
        if error is None:
            ok.append(result.get_response().id)
        else:
            errors_seen[error.message().split(":")[0]] = error
    assert sorted(ok) == ["ok", "one-shot", "start"]
    assert sorted(errors_seen) == [
        "shape_mismatch",
        "stream_already_open",
        "stream_not_open",
        "unknown_model",
    ]


async def test_unary_errors_are_grpc_status_codes(start_server: ServerFactory) -> None:
    server = await _server(start_server)
    x = np.zeros((1, 3, 7), np.float32)

    def call() -> list[InferenceServerException]:
        client = _client(server)
        out = []
        for name, inputs, kw in [
            ("nope", [_input("pose", x)], {}),
            ("pose", [_input("pose", x[:, :, :6].copy())], {}),
            ("pose", [_input("pose", x.astype(np.float64))], {}),
            ("pose", [_input("pose", x)], {"sequence_id": 4}),
            ("pose", [_input("pose", x)], {"timeout": 1}),
        ]:
            with pytest.raises(InferenceServerException) as info:
                client.infer(name, inputs, **kw)
            out.append(info.value)
        client.close()
        return out

    got = await asyncio.to_thread(call)
    assert [(e.status(), e.message().split(":")[0]) for e in got] == [
        ("StatusCode.NOT_FOUND", "unknown_model"),
        ("StatusCode.INVALID_ARGUMENT", "shape_mismatch"),
        ("StatusCode.INVALID_ARGUMENT", "dtype_mismatch"),
        ("StatusCode.INVALID_ARGUMENT", "bad_message"),
        ("StatusCode.DEADLINE_EXCEEDED", "deadline_exceeded"),
    ]


async def test_the_error_code_is_in_the_trailing_metadata(start_server: ServerFactory) -> None:
    server = await _server(start_server)
    request = oip_grpc.M["ModelInferRequest"](model_name="nope")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        infer = channel.unary_unary(
            f"/{oip_grpc.SERVICE}/ModelInfer",
            request_serializer=oip_grpc.M["ModelInferRequest"].SerializeToString,
            response_deserializer=oip_grpc.M["ModelInferResponse"].FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await infer(request)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    assert (oip_grpc.ERROR_CODE_KEY, "unknown_model") in tuple(info.value.trailing_metadata())


async def test_grpc_uses_the_same_credentials_as_websocket_sessions(
    start_server: ServerFactory,
) -> None:
    keys = {"backend": ApiKey("backend", SECRET.encode(), frozenset({"pose"}))}
    server = await _server(start_server, keys=keys)
    token = mint(keys["backend"], 60.0, time.time())
    x = np.zeros((1, 3, 7), np.float32)
    audio = np.zeros((1, 320), np.float32)

    def call() -> tuple[list[str], Any, list[tuple[Any, Any]]]:
        client = _client(server)
        statuses = []
        for kw in (
            {},
            {"headers": {"x-api-key": "x" * 40}},
            {"headers": {"authorization": f"Bearer {token}"}, "model_name": "speech_activity"},
        ):
            name = kw.pop("model_name", "pose")
            inputs = [_input("audio", audio)] if name == "speech_activity" else [_input("pose", x)]
            with pytest.raises(InferenceServerException) as info:
                client.infer(name, inputs, **kw)  # type: ignore[arg-type]
            statuses.append(info.value.status())
        ok = client.infer("pose", [_input("pose", x)], headers={"x-api-key": SECRET})
        client.close()
        streamed = _stream(
            server,
            [{"model_name": "pose", "inputs": [_input("pose", x)]}],
            headers={"authorization": f"Bearer {token}"},
        )
        return statuses, ok, streamed

    statuses, ok, streamed = await asyncio.to_thread(call)
    assert statuses == [
        "StatusCode.UNAUTHENTICATED",
        "StatusCode.UNAUTHENTICATED",
        "StatusCode.PERMISSION_DENIED",
    ]
    assert ok.as_numpy("smoothed").shape == (1, 3, 7)
    assert [e for _, e in streamed] == [None]


async def test_tls_on_both_doors_with_the_servers_certificate(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    server = await _server(start_server, certfile=cert, keyfile=key)
    x = np.zeros((1, 3, 7), np.float32)
    x[..., 6] = 1.0

    def call() -> tuple[bytes, np.ndarray[Any, Any]]:
        trust = ssl.create_default_context(cafile=str(cert))
        url = f"https://127.0.0.1:{server.port}/v2/health/ready"
        rest = urllib.request.urlopen(url, context=trust).read()
        client = triton.InferenceServerClient(
            f"127.0.0.1:{server.grpc_port}", ssl=True, root_certificates=str(cert)
        )
        result = client.infer("pose", [_input("pose", x)], timeout=LONG)
        client.close()
        return rest, result.as_numpy("smoothed")

    rest, smoothed = await asyncio.to_thread(call)
    assert rest == b"{}"
    np.testing.assert_allclose(smoothed, x)


def test_every_server_process_serves_the_one_grpc_port() -> None:
    # `realtime serve --processes 2 --grpc-port 0`: the parent picks one gRPC port for both
    # children (as for --port 0), and the banner names it.
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "realtime", "serve", "--processes", "2"),
            *("--port", "0", "--grpc-port", "0"),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner = [proc.stdout.readline() for _ in range(2)]
        assert "(2 processes)" in banner[0], banner
        port = int(banner[1].split("grpc: ")[1].split(" ")[0].rsplit(":", 1)[1])
        assert _listening(port) == 2  # each child listens on it (SO_REUSEPORT)
        x = np.zeros((1, 3, 7), np.float32)
        x[..., 6] = 1.0
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        result = client.infer("pose", [_input("pose", x)], timeout=LONG)
        client.close()
        assert result.as_numpy("smoothed").shape == (1, 3, 7)
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


def _listening(port: int) -> int:
    """Sockets listening on a TCP port of this machine (from /proc/net/tcp and tcp6)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            for row in list(rows)[1:]:
                local, state = row.split()[1], row.split()[3]
                count += int(local.rsplit(":", 1)[1], 16) == port and state == "0A"
    return count
