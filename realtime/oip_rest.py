"""The Open Inference Protocol's REST routes (``/v2/...``), served by the HTTP door.

``GET /v2`` and ``GET /v2/health/{live,ready}`` answer anyone (like ``/healthz``); model metadata,
readiness and ``POST .../infer`` need the same credential as a WebSocket session (``Authorization:
Bearer <token>`` or ``X-Api-Key``) when the server has keys. Other paths go to ``fallback`` (the
server's own GET routes), so a keep-alive connection can ask for anything the port serves.
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Awaitable, Callable

import orjson
from websockets.datastructures import Headers
from websockets.http11 import Request as WsRequest
from websockets.http11 import Response as WsResponse

from realtime import errors, oip
from realtime.auth import AuthFailed, Grant
from realtime.http11 import Head, Reply, Request, error_reply
from realtime.oip_service import OipService

_EMPTY = Reply(200, b"{}")


def status_of(exc: errors.RealtimeError) -> int:
    """The HTTP status of a typed error."""
    return oip.HTTP_STATUS.get(exc.code, 400 if isinstance(exc, errors.ProtocolError) else 500)


class RestRoutes:
    """Answers HTTP requests for the Open Inference Protocol through an :class:`OipService`."""

    def __init__(
        self,
        service: OipService,
        fallback: Callable[[WsRequest], WsResponse | Awaitable[WsResponse] | None],
    ) -> None:
        self._service = service
        self._fallback = fallback  # the port's plain GET routes, as websockets serves them

    async def handle(self, request: Request) -> Reply:
        """Route one request; every failure is a typed JSON error."""
        head = request.head
        path = head.path
        if path != "/v2" and not path.startswith("/v2/"):
            if head.method == "GET":
                return await self._plain_get(head)
            return Reply(405, orjson.dumps({"error": f"{head.method} {path} is not served"}))
        service = self._service
        service.counted("rest")
        try:
            return await self._v2(request, path.rstrip("/").split("/")[2:])
        except AuthFailed as e:
            return Reply(e.status, orjson.dumps({"error": e.reason}))
        except errors.RealtimeError as e:
            service.failed(e)
            return error_reply(e, status_of(e))

    async def _plain_get(self, head: Head) -> Reply:
        """A GET outside /v2 (a keep-alive connection's next request): the answer websockets
        would have given it (upgrades are not offered here)."""
        target = head.path + ("?" + head.query if head.query else "")
        headers = Headers((k, v) for k, v in head.headers.items() if k != "upgrade")
        answer = self._fallback(WsRequest(target, headers))
        if inspect.isawaitable(answer):
            answer = await answer
        if answer is None:  # pragma: no cover - only handshakes are let through
            return Reply(404, orjson.dumps({"error": "not found"}))
        extra = tuple(
            (k, v)
            for k, v in answer.headers.raw_items()
            if k not in ("Content-Type", "Content-Length", "Server")
        )
        content_type = answer.headers.get("Content-Type", "text/plain")
        return Reply(answer.status_code, bytes(answer.body), content_type, extra)

    async def _v2(self, request: Request, parts: list[str]) -> Reply:
        head, service = request.head, self._service
        method = head.method
        if not parts:
            _expect(method, "GET")
            return Reply(200, orjson.dumps(service.server_metadata()))
        if parts[0] == "health" and len(parts) == 2 and parts[1] in ("live", "ready"):
            _expect(method, "GET")
            ready = parts[1] == "live" or service.ready
            return _EMPTY if ready else Reply(503, orjson.dumps({"error": "not ready"}))
        if parts[0] != "models" or len(parts) < 2:
            raise errors.BadMessage(f"no route {head.path}")
        name, rest = parts[1], parts[2:]
        version: str | None = None
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        action = rest[0] if len(rest) == 1 else None
        if len(rest) > 1 or action not in (None, "ready", "infer"):
            raise errors.BadMessage(f"no route {head.path}")
        grant = self._grant(head)
        if action is None:
            _expect(method, "GET")
            return Reply(200, orjson.dumps(service.metadata(name, version, grant)))
        if action == "ready":
            _expect(method, "GET")
            service.model(name, version, grant)
            return _EMPTY if service.ready else Reply(503, orjson.dumps({"error": "not ready"}))
        _expect(method, "POST")
        return await self._infer(request, name, version, grant)

    def _grant(self, head: Head) -> Grant | None:
        headers = head.headers
        target = f"{head.path}?{head.query}"
        return self._service.grant(headers.get("authorization"), headers.get("x-api-key"), target)

    async def _infer(
        self, request: Request, name: str, version: str | None, grant: Grant | None
    ) -> Reply:
        head = request.head
        body = _decompressed(request.body, head, self._service.limits.max_message_bytes)
        header_length = head.headers.get("inference-header-content-length")
        if header_length is not None and not header_length.isdigit():
            raise errors.BadMessage("Inference-Header-Content-Length must be an integer")
        infer = oip.decode_rest(
            name, version, body, None if header_length is None else int(header_length)
        )
        who = f"oip:{grant.key}" if grant is not None else f"oip:{request.peer}"
        response = await self._service.infer(infer, grant, who)
        data, json_size = oip.encode_rest(response, infer.binary)
        if json_size is None:
            return Reply(200, data)
        return Reply(
            200,
            data,
            "application/octet-stream",
            (("Inference-Header-Content-Length", str(json_size)),),
        )


def _expect(method: str, allowed: str) -> None:
    if method != allowed:
        raise errors.BadMessage(f"use {allowed} here, not {method}")


def _decompressed(body: bytes, head: Head, limit: int) -> bytes:
    """A gzip or deflate body inflated, up to ``limit`` bytes (else ``message_too_big``)."""
    encoding = head.headers.get("content-encoding", "identity").lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise errors.BadMessage(f"unsupported Content-Encoding {encoding!r}")
    inflate = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflate.decompress(body, limit + 1)
    except zlib.error as e:
        raise errors.BadMessage(f"body is not valid {encoding}: {e}") from None
    if len(out) > limit:
        raise errors.MessageTooBig(f"the inflated body is over {limit} bytes")
    return out
