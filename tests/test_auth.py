"""API keys, signed tokens, origins, session quotas and TLS, through a real server on loopback."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from realtime import errors
from realtime.auth import ApiKey, AuthFailed, load_keys, mint, verify_key, verify_token
from realtime.client import Client
from realtime.config import Config
from realtime.protocol import Result
from realtime.server import Server
from realtime.session import Limits
from tests.conftest import REPO

SECRET = "s" * 40
KEY = ApiKey("web", SECRET.encode(), frozenset({"pose", "speech_activity"}), max_sessions=2)
OTHER = ApiKey("other", ("o" * 40).encode())
KEYS = {"web": KEY, "other": OTHER}


# --- tokens, pure ------------------------------------------------------------------------------


def test_a_token_carries_its_key_models_and_expiry() -> None:
    token = mint(KEY, ttl=60, now=1000.0, models=["pose"])
    grant = verify_token(token, KEYS, now=1059.0)
    assert (grant.key, grant.models, grant.expires) == ("web", frozenset({"pose"}), 1060.0)
    assert grant.allows("pose") and not grant.allows("speech_activity")
    assert verify_token(mint(KEY, 60, 1000.0), KEYS, 1000.0).models == KEY.models


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (mint(KEY, 60, 1000.0), "token expired"),  # checked at 2000
        # A bad signature and an unknown key get the same answer: no key ids leak (issue 18)
        (mint(KEY, 60, 1990.0)[:-2] + "AA", "^invalid token$"),
        ("x" * 10, "malformed token"),
        ("a.b.c", "malformed token"),
        (mint(ApiKey("gone", b"g" * 40), 60, 1990.0), "^invalid token$"),
    ],
)
def test_bad_tokens_are_refused_with_a_reason(token: str, reason: str) -> None:
    with pytest.raises(AuthFailed, match=reason) as e:
        verify_token(token, KEYS, now=2000.0)
    assert e.value.status == 401


def test_a_forged_payload_fails_the_signature() -> None:
    signature = mint(KEY, 60, 1000.0, ["pose"]).partition(".")[2]
    other_payload = mint(KEY, 99999, 1000.0).partition(".")[0]  # longer expiry, all models
    with pytest.raises(AuthFailed, match="invalid token"):
        verify_token(f"{other_payload}.{signature}", KEYS, 1001.0)


def test_a_key_cannot_grant_more_than_it_has() -> None:
    with pytest.raises(errors.ConfigError, match="may not grant"):
        mint(KEY, 60, 0.0, ["motion"])


def test_api_keys_are_checked_in_constant_time_and_grant_their_models() -> None:
    assert verify_key(SECRET, KEYS).key == "web"
    with pytest.raises(AuthFailed, match="unknown API key"):
        verify_key("nope" * 10, KEYS)


def test_keys_load_from_toml_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(
        '[[key]]\nid = "a"\nsecret_env = "A_SECRET"\nmodels = ["pose"]\nmax_sessions = 3\n'
    )
    env = {"A_SECRET": "a" * 32, "REALTIME_API_KEYS": "b:" + "b" * 32}
    keys = load_keys(path, env)
    assert keys["a"] == ApiKey("a", b"a" * 32, frozenset({"pose"}), 3)
    assert keys["b"].models is None
    with pytest.raises(errors.ConfigError, match=r"\$A_SECRET is not set"):
        load_keys(path, {})
    path.write_text('[[key]]\nid = "short"\nsecret = "tiny"\n')
    with pytest.raises(errors.ConfigError, match="32\\+ characters"):
        load_keys(path, {})


def test_no_auth_is_refused_off_loopback() -> None:
    with pytest.raises(errors.ConfigError, match=r"refusing to serve 0\.0\.0\.0"):
        Config(host="0.0.0.0").check()
    Config(host="0.0.0.0", insecure_no_auth=True).check()
    Config(host="0.0.0.0", keys=KEYS).check()
    Config(host="::1").check()


# --- through a real server ----------------------------------------------------------------------


ServerMaker = Callable[..., Any]


@pytest.fixture
async def make_server() -> AsyncIterator[ServerMaker]:
    servers: list[Server] = []

    async def make(**kw: Any) -> Server:
        server = Server(Config(port=0, warm_up=False, reload_seconds=0, **kw))
        await server.start()
        servers.append(server)
        return server

    yield make
    for s in servers:
        await s.close()


async def refused(url: str, **headers: str) -> tuple[int, bytes]:
    with pytest.raises(InvalidStatus) as e:
        async with connect(url, additional_headers=headers):
            pass
    return e.value.response.status_code, e.value.response.body


async def test_the_handshake_wants_a_credential(make_server: ServerMaker) -> None:
    server = await make_server(keys=KEYS)
    status, body = await refused(server.url)
    assert status == 401 and b"no credential" in body
    status, body = await refused(server.url + "?token=" + mint(KEY, -1, time.time()))
    assert status == 401 and b"token expired" in body
    async with await Client.connect(server.url, api_key="o" * 40) as c:
        assert c.welcome.session


async def test_a_token_limits_the_models_of_its_session(make_server: ServerMaker) -> None:
    server = await make_server(keys=KEYS)
    token = mint(KEY, 60, time.time(), ["pose"])
    async with await Client.connect(server.url, token=token) as client:
        stream = await client.open("pose")
        await stream.send(np.zeros((3, 7), np.float32))
        assert (await stream.next()).seq == 0  # type: ignore[union-attr]
        with pytest.raises(errors.ModelForbidden, match="may not use model 'motion'"):
            await client.open("motion")
    async with connect(f"{server.url}?token={token}"):  # the browser way: a query parameter
        pass


async def test_sessions_per_key_and_per_address_are_bounded(make_server: ServerMaker) -> None:
    server = await make_server(keys=KEYS, limits=Limits(max_sessions_per_ip=3))
    token = mint(KEY, 60, time.time())
    first = await Client.connect(server.url, token=token)
    second = await Client.connect(server.url, token=token)
    status, body = await refused(server.url, Authorization=f"Bearer {token}")
    assert status == 429 and b"this key has its 2 sessions open" in body
    third = await Client.connect(server.url, api_key="o" * 40)  # another key: fine
    status, body = await refused(server.url, **{"X-Api-Key": "o" * 40})
    assert status == 429 and b"at most 3 sessions per address" in body
    for c in (first, second, third):
        await c.close()


async def test_origins_not_on_the_list_are_forbidden(make_server: ServerMaker) -> None:
    server = await make_server(allowed_origins=("https://app.example",))
    status, body = await refused(server.url, Origin="https://evil.example")
    assert status == 403 and b"origin https://evil.example is not allowed" in body
    async with connect(server.url, origin="https://app.example"):  # type: ignore[arg-type]
        pass
    async with connect(server.url):  # no Origin: not a browser
        pass


async def test_tls_with_a_certificate_made_here(make_server: ServerMaker, tmp_path: Path) -> None:
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
    server = await make_server(certfile=cert, keyfile=key)
    assert server.url.startswith("wss://127.0.0.1:")
    trust = ssl.create_default_context(cafile=str(cert))
    async with await Client.connect(server.url, ssl=trust) as client:
        stream = await client.open("pose")
        await stream.send(np.zeros((3, 7), np.float32))
        assert (await stream.next()).seq == 0  # type: ignore[union-attr]
    with pytest.raises(ssl.SSLCertVerificationError):
        await Client.connect(server.url)  # the system CAs do not know this certificate


def test_token_mint_from_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(f'[[key]]\nid = "web"\nsecret = "{SECRET}"\nmodels = ["pose"]\n')
    r = subprocess.run(
        [sys.executable, "-m", "realtime", "token", "mint", "--keys", str(path), "--key", "web"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    grant = verify_token(r.stdout.strip(), load_keys(path, {}), time.time())
    assert grant.key == "web" and grant.models == frozenset({"pose"})
    r = subprocess.run(
        [sys.executable, "-m", "realtime", "serve", "--host", "0.0.0.0", "--port", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "refusing to serve 0.0.0.0 without authentication" in r.stderr


async def test_a_session_at_its_keys_quota_resumes_and_only_with_its_key(
    make_server: ServerMaker,
) -> None:
    server = await make_server(keys=KEYS)
    token = mint(KEY, 60, time.time())
    first = await Client.connect(server.url, token=token)
    second = await Client.connect(server.url, token=token)  # the key's 2 sessions
    stream = await second.open("pose")
    await stream.send(np.zeros((3, 7), np.float32))
    assert isinstance(await stream.next(), Result)
    second.ws.transport.abort()  # its connection drops: it must get back in to resume
    await stream.send(np.zeros((3, 7), np.float32))  # waits for the resume
    assert (await stream.next()).seq == 1  # type: ignore[union-attr]
    assert second.resumes == 1
    # A kept session is another key's secret: the token alone does not resume it.
    first.ws.transport.abort()
    first._dial = None
    assert first.resume_token is not None
    async with connect(server.url, additional_headers={"X-Api-Key": "o" * 40}) as ws:
        hello = {"type": "hello", "protocol": 1, "resume": first.resume_token, "received": 0}
        await ws.send(orjson.dumps(hello).decode())
        assert orjson.loads(await ws.recv())["code"] == "resume_unknown"
    await second.close()


async def test_kept_sessions_have_the_keys_bound_too(make_server: ServerMaker) -> None:
    server = await make_server(keys=KEYS)
    token = mint(KEY, 60, time.time())
    for _ in range(3):  # three cut sessions: the key keeps its 2 newest
        client = await Client.connect(server.url, token=token)
        client._dial = None
        client.ws.transport.abort()
        await client._reader  # it saw the cut; the server parks it soon after
    parked = server.sessions_settle(lambda: server.traffic.resumes.get("parked") == 3)
    await asyncio.wait_for(parked, 10)
    assert server.traffic.resumes == {"parked": 3, "expired": 1}
