"""web/: static files served by the server, and the JS codec checked byte for byte against ours."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from realtime.admission import AdmissionPolicy
from realtime.protocol import Chunk, ResultFrame, decode_frame, encode_frame
from realtime.server import Server
from tests.conftest import REPO, ServerFactory

NODE = shutil.which("node")
needs_node = pytest.mark.skipif(
    NODE is None, reason="Node.js is not installed (apt install nodejs)"
)

FIELDS = ("stream", "seq", "t", "dtype", "shape", "flags", "deadline")
CASES: list[dict[str, Any]] = [
    dict(zip(FIELDS, case, strict=True))
    for case in [
        (1, 0, 0.0, "float32", [320], 0, 0),
        (7, 123456, 1234.5678, "int16", [5], 1, 150),
        (2, 9, -1.0, "uint8", [4, 4, 3], 0, 0),
        (3, 1, 1e12, "float64", [3, 7], 0, 2**32 - 1),
        (4, 2, 5.0, "int32", [1, 1, 1, 1, 1, 1, 1, 2], 0, 1),
    ]
]


def values(case: dict[str, Any]) -> np.ndarray[Any, Any]:
    n = int(np.prod(case["shape"]))
    rng = np.random.default_rng(case["seq"])
    if case["dtype"].startswith("float"):
        return rng.normal(0, 100, n).astype(case["dtype"]).reshape(case["shape"])
    info = np.iinfo(case["dtype"])
    return rng.integers(info.min, info.max, n, dtype=case["dtype"]).reshape(case["shape"])


def node(script: str, stdin: str) -> str:
    assert NODE is not None
    r = subprocess.run(
        [NODE, "--input-type=module", "-e", script],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


@needs_node
def test_the_js_encoder_makes_the_bytes_the_python_decoder_reads() -> None:
    inputs = [{**c, "data": values(c).reshape(-1).tolist()} for c in CASES]
    script = """
import { encodeChunk, DTYPES } from "./web/realtime.js";
let input = ""; for await (const part of process.stdin) input += part;
for (const c of JSON.parse(input)) {
  const data = DTYPES[c.dtype].array.from(c.data);
  const buf = encodeChunk({ stream: c.stream, seq: c.seq, t: c.t, data, shape: c.shape,
                            deadlineMs: c.deadline, flags: c.flags });
  console.log(Buffer.from(buf).toString("hex"));
}
"""
    lines = node(script, json.dumps(inputs)).split()
    assert len(lines) == len(CASES)
    for case, line in zip(CASES, lines, strict=True):
        data = values(case)
        expected = Chunk(
            case["stream"], case["seq"], case["t"], data, case["deadline"], case["flags"]
        )
        assert bytes.fromhex(line) == encode_frame(expected)  # same bytes as Python makes
        assert decode_frame(bytes.fromhex(line)) == expected


@needs_node
def test_the_js_decoder_reads_python_result_frames() -> None:
    frames = [
        ResultFrame(5, 42, 99.5, values(c), index=1, count=3, queue_us=1500, infer_us=250)
        for c in CASES
    ]
    script = """
import { decodeFrame } from "./web/realtime.js";
let input = ""; for await (const part of process.stdin) input += part;
for (const hex of input.split("\\n").filter(Boolean)) {
  const b = Buffer.from(hex, "hex");
  const f = decodeFrame(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength));
  console.log(JSON.stringify({ ...f, data: Array.from(f.data, Number) }));
}
"""
    out = node(script, "\n".join(encode_frame(f).hex() for f in frames))
    for frame, line in zip(frames, out.splitlines(), strict=True):
        got = json.loads(line)
        assert (got["type"], got["stream"], got["seq"], got["t"]) == ("result", 5, 42, 99.5)
        assert (got["index"], got["count"], got["extra0"], got["extra1"]) == (1, 3, 1500, 250)
        assert got["dtype"] == frame.data.dtype.name and got["shape"] == list(frame.data.shape)
        np.testing.assert_array_equal(np.array(got["data"]), frame.data.reshape(-1))


def get(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


async def test_the_pages_and_the_client_are_served_with_types_and_etags(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    base = f"http://127.0.0.1:{server.port}"
    status, headers, body = await asyncio.to_thread(get, base + "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert body == (REPO / "web" / "index.html").read_bytes()
    for path, page in [("/xr", "xr.html"), ("/game", "game.html"), ("/xr?token=k", "xr.html")]:
        status, headers, body = await asyncio.to_thread(get, base + path)
        assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
        assert body == (REPO / "web" / page).read_bytes()
    status, headers, body = await asyncio.to_thread(get, base + "/web/realtime.js")
    assert status == 200 and headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert headers["Cache-Control"] == "no-cache" and headers["ETag"].startswith('"')
    status, _, body = await asyncio.to_thread(
        get, base + "/web/realtime.js", **{"If-None-Match": headers["ETag"]}
    )
    assert status == 304 and body == b""
    for path in [
        "/web/../README.md",
        "/web/%2e%2e/pyproject.toml",
        "/web/",
        "/web/nope.js",
        "/web//etc/passwd",
        "/../../etc/passwd",
        "/web/realtime.js/..",
        "/xr/",
        "/game.html",
    ]:
        status, _, body = await asyncio.to_thread(get, base + path)
        assert status == 404, path


def node_websocket_flags() -> list[str] | None:
    """Node's flags for a global WebSocket (built in from Node 22, a flag in 20), or None."""
    assert NODE is not None
    for flags in ([], ["--experimental-websocket"]):
        probe = [NODE, *flags, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"]
        if subprocess.run(probe, capture_output=True, timeout=30).returncode == 0:
            return flags
    return None


CLIENT_PRELUDE = """
import { RealtimeClient } from "./web/realtime.js";
import readline from "node:readline";
const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const client = await RealtimeClient.connect(process.argv[1]);
const stream = await client.open("accumulate", { deadlineMs: 10000 });
const got = [];
let want = 0, wake = null;
const note = (entry) => { got.push(entry); if (wake && got.length >= want) wake(); };
stream.onResult = (r) => note([r.seq, r.outputs.total.data[0]]);
stream.onError = (e) => note([e.seq ?? null, e.code, e.message]);
const until = (n) => new Promise((r) => { want = n; wake = r; if (got.length >= n) r(); });
const ones = () => new Float32Array([1, 1, 1]);
"""
REPORT = """
console.log(JSON.stringify({ got, resumes: client.resumes }));
client.close();
process.exit(0);
"""


async def cut_a_node_client(
    server: Server,
    body: str,
    after_cut: Callable[[str], Awaitable[None]] | None = None,
    take_back: bool = False,
) -> dict[str, Any]:
    """Run the browser client in Node on a stateful stream (the prelude above, then ``body``);
    when it prints "cut me", abort the server side of its connection (or, ``take_back``, have
    the server take the session back: ``server_busy``, then 1013), then ``after_cut`` with the
    session's resume token, and tell it to go on; return what it reports."""
    flags = node_websocket_flags()
    if flags is None:
        pytest.skip("this Node.js has no WebSocket (Node 20 with a flag, or 22+)")
    assert NODE is not None
    script = CLIENT_PRELUDE + body + REPORT
    proc = await asyncio.create_subprocess_exec(
        *[NODE, *flags, "--input-type=module", "-e", script, server.url],
        cwd=REPO,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"cut me\n"
        (conn,) = server.connections
        token = conn.session.resume_token
        assert token is not None
        if take_back:
            server._take_back([server.relay.links[conn.session.id]], 1.0)
        else:
            server.cut(conn.session.id)  # the network drops it: no close frame either way
        if after_cut is not None:
            await after_cut(token)
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
        _, err = await proc.communicate()
    assert line, err
    report: dict[str, Any] = json.loads(line)
    return report


@needs_node
async def test_the_js_client_resumes_a_cut_session(
    start_server: ServerFactory, tiny_models: Any
) -> None:
    server = await start_server((tiny_models,), builtin=False)
    body = """
for (let i = 0; i < 20; i++) stream.send(ones());
await until(10);
console.log("cut me");
await lines.next(); // the server cut the connection
for (let i = 0; i < 20; i++) stream.send(ones()); // some while it resumes: kept, sent after
await until(40);
"""
    report = await cut_a_node_client(server, body)
    assert report["resumes"] == 1
    # A stateful model's running total: every chunk answered once, in order, state carried on.
    assert report["got"] == [[k, k + 1.0] for k in range(40)]


@needs_node
async def test_the_js_client_starts_over_typed_when_its_session_is_gone(
    start_server: ServerFactory, tiny_models: Any
) -> None:
    server = await start_server((tiny_models,), builtin=False)
    body = """
for (let i = 0; i < 3; i++) stream.send(ones());
await until(3);
console.log("cut me");
await lines.next(); // cut, and the server no longer keeps the session
for (let i = 0; i < 2; i++) stream.send(ones()); // kept while it tries to resume: no answer
await until(4); // the typed notice for them
for (let i = 0; i < 3; i++) stream.send(ones()); // the same stream object, on a new session
await until(7);
"""

    async def let_go(token: str) -> None:
        # The server parks it, then lets it go at once.
        await asyncio.wait_for(server.sessions_settle(lambda: token in server.parking), 10)
        server.parking.expire(token)  # before the client's first retry (25-50 ms after the cut)

    report = await cut_a_node_client(server, body, let_go)
    got = report["got"]
    assert report["resumes"] == 0
    assert got[:3] == [[0, 1.0], [1, 2.0], [2, 3.0]]
    assert got[3][:2] == [None, "resume_expired"] and "2 chunks got no answer" in got[3][2]
    assert got[4:] == [[0, 1.0], [1, 2.0], [2, 3.0]]  # reopened in place: a new state, seq from 0


@needs_node
async def test_the_js_client_taken_back_is_told_typed_and_waits_as_told_to_start_over(
    start_server: ServerFactory, tiny_models: Any
) -> None:
    policy = AdmissionPolicy(retry_after_ms=1500.0, period=3600.0)
    server = await start_server((tiny_models,), builtin=False, admission=policy)
    body = """
let busyAt = null;
const onError = stream.onError;
stream.onError = (e) => {
  if (e.code === "server_busy") busyAt = [Date.now(), e.retryAfterMs];
  onError(e);
};
for (let i = 0; i < 3; i++) stream.send(ones());
await until(3);
console.log("cut me");
await lines.next(); // the server took the session back
await until(4); // the typed notice
for (let i = 0; i < 3; i++) stream.send(ones()); // kept, sent on the new session
await until(7);
got.push([Date.now() - busyAt[0], busyAt[1]]);
"""
    report = await cut_a_node_client(server, body, take_back=True)
    got = report["got"]
    assert report["resumes"] == 0  # not kept to resume: a new session
    assert got[:3] == [[0, 1.0], [1, 2.0], [2, 3.0]]
    assert got[3][:2] == [None, "server_busy"] and "fell behind" in got[3][2]
    assert got[4:7] == [[0, 1.0], [1, 2.0], [2, 3.0]]  # reopened in place on a new session
    waited, told = got[7]
    assert told == 1500.0 and waited >= 1490  # it dialled again no sooner than told
