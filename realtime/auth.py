"""API keys and short-lived signed session tokens, checked at the WebSocket handshake. Pure.

A backend holds an API key (id + secret, from a TOML file or the environment) and mints tokens
for its browser pages with :func:`mint` (or ``realtime token mint``): a token names the key, an
expiry and optionally fewer models than the key allows, and is signed with the key's secret
(HMAC-SHA256). The page connects with ``?token=...`` (browsers cannot set headers on a
WebSocket) or ``Authorization: Bearer ...``; backends may also present the key itself with
``X-Api-Key: <secret>``. The server never stores tokens: it checks the signature and expiry.

Keys file::

    [[key]]
    id = "web-backend"
    secret_env = "REALTIME_KEY_WEB"     # or: secret = "..." (at least 32 characters)
    models = ["speech_activity", "pose"] # optional: every model
    max_sessions = 200                   # optional: sessions open at once with this key
    max_messages_per_second = 10000      # optional: all its sessions together
    max_bytes_per_second = 67108864      # optional: all its sessions together
    metrics = true                       # optional: may read GET /metrics
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

from realtime.errors import ConfigError

MIN_SECRET = 32
MAX_TOKEN = 4096


class AuthFailed(Exception):
    """The handshake is refused: ``status`` 401 (who are you?) or 403 (not allowed)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One API key: who holds it, which models it may use and how many sessions at once."""

    id: str
    secret: bytes
    models: frozenset[str] | None = None  # None: every model
    max_sessions: int = 100
    #: Inbound rate of all the key's sessions together (each also has its own).
    max_messages_per_second: int = 10_000
    max_bytes_per_second: int = 64 * 1024 * 1024
    #: May read ``GET /metrics`` (every key's traffic) with this key's secret.
    metrics: bool = False


@dataclass(frozen=True, slots=True)
class Grant:
    """What a checked credential allows a session."""

    key: str
    models: frozenset[str] | None
    expires: float | None  # Unix seconds; None for an API key itself

    def allows(self, model: str) -> bool:
        """Whether streams may be opened on ``model``."""
        return self.models is None or model in self.models


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_keys(path: Path | None, environ: Mapping[str, str] = os.environ) -> dict[str, ApiKey]:
    """Keys from a TOML file (see the module doc) and ``REALTIME_API_KEYS=id:secret,...``."""
    keys: dict[str, ApiKey] = {}
    if path is not None:
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{path}: {e}") from None
        for table in doc.get("key", []):
            key = _key_from_table(table, path, environ)
            keys[key.id] = key
    for item in filter(None, environ.get("REALTIME_API_KEYS", "").split(",")):
        key_id, _, secret = item.partition(":")
        keys[key_id] = _key(key_id, secret, None, 100, "REALTIME_API_KEYS")
    return keys


def _key_from_table(table: Any, path: Path, environ: Mapping[str, str]) -> ApiKey:
    if not isinstance(table, dict) or not isinstance(table.get("id"), str):
        raise ConfigError(f"{path}: each [[key]] needs an id")
    secret = table.get("secret")
    if "secret_env" in table:
        secret = environ.get(str(table["secret_env"]))
        if secret is None:
            raise ConfigError(f"{path}: key {table['id']}: ${table['secret_env']} is not set")
    models = table.get("models")
    if models is not None and not (
        isinstance(models, list) and all(isinstance(m, str) for m in models)
    ):
        raise ConfigError(f"{path}: key {table['id']}: models must be a list of names")
    counts: dict[str, int] = {}
    for name in ("max_sessions", "max_messages_per_second", "max_bytes_per_second"):
        value = table.get(name, ApiKey.__dataclass_fields__[name].default)
        if type(value) is not int or value < 1:
            raise ConfigError(f"{path}: key {table['id']}: {name} must be a positive integer")
        counts[name] = value
    metrics = table.get("metrics", False)
    if not isinstance(metrics, bool):
        raise ConfigError(f"{path}: key {table['id']}: metrics must be true or false")
    key = _key(table["id"], secret, models, counts.pop("max_sessions"), str(path))
    return replace(
        key,
        metrics=metrics,
        max_messages_per_second=counts["max_messages_per_second"],
        max_bytes_per_second=counts["max_bytes_per_second"],
    )


def _key(key_id: str, secret: Any, models: Any, max_sessions: int, where: str) -> ApiKey:
    if not key_id or not isinstance(secret, str) or len(secret) < MIN_SECRET:
        raise ConfigError(f"{where}: key {key_id!r} needs a secret of {MIN_SECRET}+ characters")
    return ApiKey(
        key_id, secret.encode(), None if models is None else frozenset(models), max_sessions
    )


def mint(key: ApiKey, ttl: float, now: float, models: list[str] | None = None) -> str:
    """A token for a browser page: valid ``ttl`` seconds, for ``models`` (a subset of the
    key's; default: all of the key's)."""
    if models is not None and key.models is not None and not set(models) <= key.models:
        raise ConfigError(f"key {key.id} may not grant {sorted(set(models) - key.models)}")
    claims: dict[str, Any] = {"k": key.id, "exp": round(now + ttl, 3)}
    if models is not None:
        claims["m"] = sorted(models)
    payload = _b64(orjson.dumps(claims))
    signature = hmac.new(key.secret, payload.encode(), hashlib.sha256).digest()
    return f"{payload}.{_b64(signature)}"


def verify_token(token: str, keys: Mapping[str, ApiKey], now: float) -> Grant:
    """Check a token's signature and expiry; raise :class:`AuthFailed` (401) if it fails."""
    if len(token) > MAX_TOKEN or token.count(".") != 1:
        raise AuthFailed(401, "malformed token")
    payload, _, signature = token.partition(".")
    try:
        claims = orjson.loads(_unb64(payload))
        given = _unb64(signature)
    except (ValueError, orjson.JSONDecodeError):
        raise AuthFailed(401, "malformed token") from None
    if not isinstance(claims, dict):
        raise AuthFailed(401, "malformed token")
    key = keys.get(str(claims.get("k")))
    # One answer for an unknown key and a bad signature: a refusal must not tell which key
    # ids exist.
    if key is None:
        raise AuthFailed(401, "invalid token")
    expected = hmac.new(key.secret, payload.encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, given):
        raise AuthFailed(401, "invalid token")
    expires = claims.get("exp")
    if not isinstance(expires, (int, float)) or now >= expires:
        raise AuthFailed(401, "token expired")
    models = claims.get("m")
    granted = key.models if models is None else frozenset(map(str, models))
    if key.models is not None and granted is not None and not granted <= key.models:
        raise AuthFailed(403, "token grants models its key may not use")
    return Grant(key.id, granted, float(expires))


def verify_key(secret: str, keys: Mapping[str, ApiKey]) -> Grant:
    """Check an API key presented as is (backends); raise :class:`AuthFailed` (401)."""
    for key in keys.values():
        if hmac.compare_digest(key.secret, secret.encode()):
            return Grant(key.id, key.models, None)
    raise AuthFailed(401, "unknown API key")


def credential(
    target: str, headers: Mapping[str, str], keys: Mapping[str, ApiKey], now: float
) -> Grant:
    """The grant of the credential a request carries (``?token=``, ``Authorization: Bearer``
    with a token, or ``X-Api-Key``); raise :class:`AuthFailed` (401) if it has none or a bad one."""
    query = parse_qs(urlsplit(target).query)
    bearer = headers.get("Authorization", "")
    if "token" in query:
        return verify_token(query["token"][0], keys, now)
    if bearer.startswith("Bearer "):  # a token, or a key's secret (as Prometheus sends one)
        given = bearer[7:].strip()
        try:
            return verify_token(given, keys, now)
        except AuthFailed:
            with contextlib.suppress(AuthFailed):
                return verify_key(given, keys)
            raise
    if "X-Api-Key" in headers:
        return verify_key(headers["X-Api-Key"], keys)
    raise AuthFailed(401, "no credential: give ?token=, Authorization: Bearer or X-Api-Key")


def check_origin(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> None:
    """Refuse (403) a browser page the server does not serve: with an allow-list, an origin
    not on it; without one, an origin whose host is not the request's ``Host`` (a page of the
    server itself, as Jupyter does). No ``Origin``: not a browser, nothing to check here."""
    if origin is None:
        return
    if allowed:
        if origin not in allowed:
            raise AuthFailed(403, f"origin {origin[:200]} is not allowed")
        return
    if host is None or urlsplit(origin).netloc.lower() != host.lower():
        raise AuthFailed(
            403,
            f"origin {origin[:200]} is not this server's: give --allow-origin to let its pages in",
        )
