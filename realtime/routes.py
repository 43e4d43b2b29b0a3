"""The plain HTTP side of the server's port: health, readiness, metrics, catalog, static files.

Every route answers from what it is given (no I/O but reading ``web/`` once at start), so it is
tested with request objects alone. WebSocket handshakes never reach it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from realtime import __version__

SERVER_NAME = f"realtime/{__version__}"
#: Static files served under /web/ (the browser client and the demo page), by suffix.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
WEB_DIR = Path(__file__).resolve().parents[1] / "web"
JSON = "application/json"
#: Short URLs of the example pages: the demo, the WebXR page and the voice-controlled game.
PAGES = {"/": "/web/index.html", "/xr": "/web/xr.html", "/game": "/web/game.html"}


def load_static(root: Path = WEB_DIR) -> dict[str, tuple[bytes, str, str]]:
    """Every servable file of ``root`` read once at start, by URL path: only these names are
    ever served, so no request can reach outside ``root``."""
    files: dict[str, tuple[bytes, str, str]] = {}
    if not root.is_dir():
        return files
    for path in sorted(root.rglob("*")):
        content_type = CONTENT_TYPES.get(path.suffix)
        if content_type is None or not path.is_file() or path.name.startswith("."):
            continue
        body = path.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        files["/web/" + path.relative_to(root).as_posix()] = (body, content_type, etag)
    return files


def response(
    status: HTTPStatus, body: bytes, content_type: str, etag: str | None = None
) -> Response:
    """An HTTP response with the server's headers."""
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            # Static files: cached, revalidated by ETag (a new server version changes them).
            ("Cache-Control", "no-cache" if etag else "no-store"),
            ("Server", SERVER_NAME),
        ]
    )
    if etag:
        headers["ETag"] = etag
    return Response(status.value, status.phrase, headers, body)


@dataclass(frozen=True, slots=True)
class Routes:
    """What the HTTP routes read from the running server."""

    readiness: Callable[[], bytes | None]  # why new clients should go elsewhere; None: ready
    stuck: Callable[[], int]  # model runs that never came back
    metrics: Callable[[], tuple[bytes, str]]  # exposition and its content type
    catalog: Callable[[], bytes]
    static: dict[str, tuple[bytes, str, str]]

    def respond(self, request: Request) -> Response:
        """The answer to a plain HTTP GET."""
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            if stuck := self.stuck():  # a model run that never came back: restart this process
                body = b'{"status":"stuck","stuck_batches":%d}' % stuck
                return response(HTTPStatus.SERVICE_UNAVAILABLE, body, JSON)
            return response(HTTPStatus.OK, b'{"status":"ok"}', JSON)
        if path == "/readyz":
            busy = self.readiness()
            if busy is None:
                return response(HTTPStatus.OK, b'{"status":"ready"}', JSON)
            return response(HTTPStatus.SERVICE_UNAVAILABLE, busy, JSON)
        if path == "/metrics":
            body, content_type = self.metrics()
            return response(HTTPStatus.OK, body, content_type)
        if path == "/v1/models":
            return response(HTTPStatus.OK, self.catalog(), JSON)
        static = self.static.get(PAGES.get(path, path))
        if static is not None:
            body, content_type, etag = static
            if request.headers.get("If-None-Match") == etag:
                return response(HTTPStatus.NOT_MODIFIED, b"", content_type, etag)
            return response(HTTPStatus.OK, body, content_type, etag)
        if path == "/":
            text = f"{SERVER_NAME}: connect a WebSocket to this URL (see docs/protocol.md)\n"
            return response(HTTPStatus.OK, text.encode(), "text/plain; charset=utf-8")
        return response(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")
