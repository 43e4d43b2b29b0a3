"""The HTTP/1.1 front door: the pure head parser, and raw HTTP on the real server's port."""

from __future__ import annotations

import asyncio

import numpy as np
import orjson
import pytest
from websockets.asyncio.server import ServerConnection

from realtime import errors
from realtime.client import Client
from realtime.http11 import HttpDoor, Reply, Request, parse_head, serialize, wants_websocket
from realtime.server import Server
from tests.conftest import ServerFactory


@pytest.mark.parametrize(
    ("first", "verdict"),
    [
        (b"G", None),
        (b"GET /", None),
        (b"GET / HTTP/1.1\r\n", True),
        (b"GET /\n", True),
        (b"GET /healthz HTTP/1.1", True),
        (b"GET /v20 HTTP/1.1", True),
        (b"GET /v2 HTTP/1.1", False),
        (b"GET /v2/health/ready", False),
        (b"GET /v2?x=1", False),
        (b"P", False),
        (b"POST /v2/models/pose/infer", False),
        (b"HEAD / HTTP/1.1", False),
        (b"\x16\x03\x01", False),
    ],
)
def test_the_first_bytes_decide_who_serves_a_connection(first: bytes, verdict: bool | None) -> None:
    assert wants_websocket(first) is verdict


def test_a_request_head_parses_into_its_parts() -> None:
    head = parse_head(
        b"POST /v2/models/po%73e/infer?a=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n"
        b"X-Twice: a\r\nx-twice: b\r\nExpect: 100-continue\r\n\r\n",
        100,
    )
    assert head.method == "POST" and head.path == "/v2/models/pose/infer" and head.query == "a=1"
    assert head.content_length == 12 and head.keep_alive and head.expect_continue
    assert head.headers["x-twice"] == "a, b" and head.headers["host"] == "x"
    assert not parse_head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", 0).keep_alive
    assert not parse_head(b"GET / HTTP/1.0\r\n\r\n", 0).keep_alive
    assert parse_head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", 0).keep_alive


@pytest.mark.parametrize(
    ("raw", "exc"),
    [
        (b"GET\r\n\r\n", errors.BadMessage),
        (b"GET http://x/ HTTP/1.1\r\n\r\n", errors.BadMessage),
        (b"GET / HTTP/2\r\n\r\n", errors.BadMessage),
        (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", errors.BadMessage),
        (b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", errors.BadMessage),
        (b"GET / HTTP/1.1\r\nName : v\r\n\r\n", errors.BadMessage),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", errors.BadMessage),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", errors.BadMessage),
        (b"POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n", errors.MessageTooBig),
    ],
)
def test_bad_heads_are_refused_typed(raw: bytes, exc: type[errors.RealtimeError]) -> None:
    with pytest.raises(exc):
        parse_head(raw, 100)


def test_a_reply_serializes_with_its_length_and_connection() -> None:
    wire = serialize(Reply(404, b"{}", headers=(("X-A", "1"),)), False, "srv")
    assert wire == (
        b"HTTP/1.1 404 Not Found\r\nServer: srv\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\nX-A: 1\r\nConnection: close\r\n\r\n{}"
    )


# --- on the real server ------------------------------------------------------------------------


async def _read_reply(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ")[1])
    headers = {}
    for line in head[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


def _post(path: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


async def test_one_keep_alive_connection_serves_infer_health_and_the_plain_gets(
    start_server: ServerFactory,
) -> None:
    server: Server = await start_server()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    x = np.zeros((1, 3, 7), np.float32)
    x[0, :, 6] = 1.0
    request = {"inputs": [{"name": "pose", "datatype": "FP32", "shape": [1, 3, 7], "data": x}]}
    # Three requests written at once (pipelined): answered in order on the one connection.
    writer.write(
        _post("/v2/models/pose/infer", orjson.dumps(request, option=orjson.OPT_SERIALIZE_NUMPY))
        + b"GET /v2/health/ready HTTP/1.1\r\nHost: t\r\n\r\n"
        + b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    status, _, body = await _read_reply(reader)
    assert status == 200
    doc = orjson.loads(body)
    assert [o["name"] for o in doc["outputs"]] == ["smoothed", "predicted"]
    np.testing.assert_allclose(np.array(doc["outputs"][0]["data"]).reshape(1, 3, 7), x)
    assert (await _read_reply(reader))[0] == 200
    status, headers, body = await _read_reply(reader)
    assert status == 200 and orjson.loads(body) == {"status": "ok"}
    assert headers["content-type"] == "application/json"
    # A WebSocket session works on the same port meanwhile.
    async with await Client.connect(server.url) as client:
        assert client.model("pose")["name"] == "pose"
    writer.close()


async def test_expect_continue_gets_a_100_before_the_body(start_server: ServerFactory) -> None:
    server: Server = await start_server()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    body = orjson.dumps(
        {"inputs": [{"name": "audio", "datatype": "FP32", "shape": [1, 320], "data": [0] * 320}]}
    )
    head = _post("/v2/models/speech_activity/infer", b"", "Expect: 100-continue\r\n")
    writer.write(head.replace(b"Content-Length: 0", f"Content-Length: {len(body)}".encode()))
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(body)
    status, _, reply = await _read_reply(reader)
    assert status == 200
    assert orjson.loads(reply)["outputs"][1]["data"] == [pytest.approx(-100.0, abs=1e-3)]
    writer.close()


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (
            b"POST /v2/models/pose/infer HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
            413,
            "message_too_big",
        ),
        (
            b"POST /v2/models/pose/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
            "bad_message",
        ),
        (
            b"POST /v2 HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            400,
            "bad_message",
        ),
        (b"GET /v2/models/nope HTTP/1.1\r\nConnection: close\r\n\r\n", 404, "unknown_model"),
        (
            b"GET /v2/models/pose/versions/9 HTTP/1.1\r\nConnection: close\r\n\r\n",
            404,
            "unknown_version",
        ),
        (b"GET /v2/nothing HTTP/1.1\r\nConnection: close\r\n\r\n", 400, "bad_message"),
    ],
)
async def test_bad_http_requests_get_a_typed_json_error_and_the_connection_closes(
    start_server: ServerFactory, raw: bytes, status: int, code: str
) -> None:
    server: Server = await start_server()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(raw)
    got, headers, body = await _read_reply(reader)
    assert got == status
    assert orjson.loads(body)["code"] == code
    assert headers["connection"] == "close"
    assert await reader.read() == b""  # closed by the server
    writer.close()


async def test_a_post_outside_v2_is_not_served(start_server: ServerFactory) -> None:
    server: Server = await start_server()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(_post("/metrics", b"x", "Connection: close\r\n"))
    status, _, body = await _read_reply(reader)
    assert status == 405 and "not served" in orjson.loads(body)["error"]
    writer.close()


async def test_shutdown_closes_idle_http_connections(start_server: ServerFactory) -> None:
    server: Server = await start_server()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /v2/health/live HTTP/1.1\r\n\r\n")
    assert (await _read_reply(reader))[0] == 200
    await server.close()
    assert await reader.read() == b""
    writer.close()


async def test_shutdown_does_not_wait_for_a_body_that_never_comes(
    start_server: ServerFactory,
) -> None:
    server: Server = await start_server()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /v2/models/pose/infer HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
    await writer.drain()
    # Once the head is in, the connection is busy reading a body that never comes: shutdown
    # ends it after its grace (1 s), not after idle_seconds (300 s).
    await server.close()
    assert await reader.read() == b""
    writer.close()


async def test_the_front_door_refuses_a_handshake_the_listener_did_not_see_whole() -> None:
    # The listener refuses a crowd's handshake on the bare socket only when the whole head has
    # come by the accept; one that comes later meets the same gate here, in the front door.
    heads: list[bytes] = []

    def gate(head: bytes) -> bytes | None:
        heads.append(head)
        return b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"

    async def never(_: Request) -> Reply:
        raise AssertionError("a handshake is not the HTTP door's")

    def websocket() -> ServerConnection:
        raise AssertionError("a refused handshake builds no websockets connection")

    door = HttpDoor(never, 1024, 10.0, "test", lambda e: 400)
    door.gate = gate
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: door.protocol(websocket), "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    head = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n"
    writer.write(head[:20])
    await writer.drain()
    writer.write(head[20:])
    assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 503 ")
    assert heads == [head]
    writer.close()
    server.close()
    await server.wait_closed()
