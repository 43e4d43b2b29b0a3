"""Admission at the handshake and the aggregate limits over sessions. Pure, over a given clock.

One :class:`Quotas` per server counts the sessions connected per client address, per API key and
in all, and holds one pair of token buckets (messages, bytes) per address and per key that every
message of their sessions is charged to, on top of its own session's. What happens past each
limit (docs/security.md):

- a handshake past the sessions of its address or key is refused with HTTP 429, past the
  server's connections with HTTP 503 and a typed ``server_busy`` body (``retry_after_ms``);
- a message past its address's or key's rate pauses reading from the session (as the session's
  own rate does), so the aggregate of many sessions is bounded like one session.

As NGINX's ``limit_conn``/``limit_req`` and uvicorn's ``--limit-concurrency`` do. No sockets
here: the server asks, then tells what happened.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from realtime import errors
from realtime.auth import ApiKey, AuthFailed
from realtime.ratelimit import TokenBucket

if TYPE_CHECKING:
    from realtime.session import Limits

#: What a client refused for the server's connection cap is told to wait before trying again.
BUSY_RETRY_MS = 1000.0


@dataclass(slots=True)
class _Holder:
    """The sessions of one address or key, and the buckets their messages are charged to."""

    sessions: int
    messages: TokenBucket
    volume: TokenBucket

    def charge(self, size: int, now: float) -> float:
        return max(self.messages.take(1, now), self.volume.take(size, now))


def _holder(messages_per_second: float, bytes_per_second: float, now: float) -> _Holder:
    """Half a second of either in a burst, as a session's own buckets."""
    return _Holder(
        0,
        TokenBucket(messages_per_second, messages_per_second / 2, now),
        TokenBucket(bytes_per_second, bytes_per_second / 2, now),
    )


class Quotas:
    """Sessions and rates per address, per key and in all, for one server."""

    def __init__(self, limits: Limits, keys: Mapping[str, ApiKey], max_connections: int) -> None:
        self.limits = limits
        self.keys = keys
        self.max_connections = max_connections
        self.connected = 0
        self._by_ip: dict[str, _Holder] = {}
        self._by_key: dict[str, _Holder] = {}

    @property
    def at_cap(self) -> bool:
        """Whether the server has its ``max_connections`` sessions."""
        return self.connected >= self.max_connections

    def full(self) -> errors.ServerBusy | None:
        """The refusal of a new connection past the connection cap, or None."""
        if not self.at_cap:
            return None
        return errors.ServerBusy(
            f"the server has its {self.max_connections} connections: try again later",
            retry_after_ms=BUSY_RETRY_MS,
        )

    def check_address(self, ip: str) -> None:
        """Whether a handshake from ``ip`` may go on (before its credential is checked):
        raises ``errors.ServerBusy`` past the connection cap, AuthFailed 429 past the address's."""
        busy = self.full()
        if busy is not None:
            raise busy
        held = self._by_ip.get(ip)
        if held is not None and held.sessions >= self.limits.max_sessions_per_ip:
            raise AuthFailed(429, f"at most {self.limits.max_sessions_per_ip} sessions per address")

    def check_key(self, key: str) -> None:
        """Whether a handshake whose credential names ``key`` may go on: AuthFailed 429 if not."""
        held = self._by_key.get(key)
        bound = self.keys[key].max_sessions
        if held is not None and held.sessions >= bound:
            raise AuthFailed(429, f"this key has its {bound} sessions open")

    def enter(self, ip: str, key: str | None, now: float) -> None:
        """A session of ``ip`` (and ``key``) is connected."""
        self.connected += 1
        limits = self.limits
        held = self._by_ip.get(ip)
        if held is None:
            held = self._by_ip[ip] = _holder(
                limits.max_messages_per_second_per_ip, limits.max_bytes_per_second_per_ip, now
            )
        held.sessions += 1
        if key is not None:
            held = self._by_key.get(key)
            if held is None:
                api_key = self.keys[key]
                held = self._by_key[key] = _holder(
                    api_key.max_messages_per_second, api_key.max_bytes_per_second, now
                )
            held.sessions += 1

    def leave(self, ip: str, key: str | None) -> None:
        """A session of ``ip`` (and ``key``) is gone: its places are free. An address with no
        session left is forgotten (what is held stays bounded by the sessions connected)."""
        self.connected -= 1
        held = self._by_ip[ip]
        held.sessions -= 1
        if not held.sessions:
            del self._by_ip[ip]
        if key is not None:
            self._by_key[key].sessions -= 1

    def sessions(self, ip: str, key: str | None = None) -> int:
        """Sessions connected from ``ip`` (or with ``key``, when given)."""
        held = self._by_ip.get(ip) if key is None else self._by_key.get(key)
        return 0 if held is None else held.sessions

    def charge(self, ip: str, key: str | None, size: int, now: float) -> float:
        """One message of ``size`` bytes from a session of ``ip`` (and ``key``): the seconds
        to stop reading from it for its address's and key's rates (0: none)."""
        pause = self._by_ip[ip].charge(size, now)
        if key is not None:
            pause = max(pause, self._by_key[key].charge(size, now))
        return pause
