"""Sessions whose connection was lost, kept for their client to resume, until they expire.

A kept session stays alive in full: its chunks in flight still run and their results are queued
for when the client comes back. Kept sessions do not count against the quotas of connected ones
(the client must be able to come back to resume), but have the same bounds of their own: past
them the key's (or address's) oldest kept session ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from realtime.connection import Connection

log = logging.getLogger("realtime")


@dataclass(slots=True)
class Parked:
    """A session kept for its client to resume: where it came from, and when it expires."""

    conn: Connection
    ip: str
    expiry: asyncio.TimerHandle


class Parking:
    """Every kept session, by resume token."""

    def __init__(self, ttl: float, on_expire: Callable[[Connection], None]) -> None:
        self._ttl = ttl
        self._on_expire = on_expire
        self._parked: dict[str, Parked] = {}
        #: Tokens of sessions that expired unresumed (the latest ones), to say so on a resume.
        self._expired: dict[str, None] = {}

    def __len__(self) -> int:
        return len(self._parked)

    def __contains__(self, token: str) -> bool:
        return token in self._parked

    def connections(self) -> list[Connection]:
        """Every kept session."""
        return [p.conn for p in self._parked.values()]

    def park(self, conn: Connection, ip: str, bound: int) -> None:
        """Keep ``conn`` for ``ttl`` seconds; past ``bound`` kept sessions of the same key (or
        address, without keys), the oldest ends."""
        token = conn.session.resume_token
        assert token is not None
        expiry = asyncio.get_running_loop().call_later(self._ttl, self.expire, token)
        self._parked[token] = Parked(conn, ip, expiry)
        key = conn.key
        same = [
            t
            for t, p in self._parked.items()
            if (p.conn.key == key if key is not None else p.ip == ip)
        ]
        for oldest in same[: max(0, len(same) - bound)]:
            self.expire(oldest)

    def get(self, token: str) -> Connection | None:
        """The kept session of ``token``, left kept."""
        parked = self._parked.get(token)
        return None if parked is None else parked.conn

    def take(self, token: str) -> None:
        """The session of ``token`` was resumed: it is no longer kept."""
        parked = self._parked.pop(token)
        parked.expiry.cancel()

    def expired(self, token: str) -> bool:
        """Whether ``token``'s session expired unresumed (lately)."""
        return token in self._expired

    def expire(self, token: str) -> None:
        """End a kept session now."""
        parked = self._parked.pop(token, None)
        if parked is None:
            return
        parked.expiry.cancel()
        self._expired[token] = None
        if len(self._expired) > 10_000:
            del self._expired[next(iter(self._expired))]
        log.info("event=resume_expired session=%s", parked.conn.session.id)
        self._on_expire(parked.conn)

    def expire_all(self) -> None:
        """End every kept session (shutdown)."""
        for token in list(self._parked):
            self.expire(token)
