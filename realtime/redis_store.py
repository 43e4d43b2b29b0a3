"""Redis as the shared session store (``--redis redis://...``): sessions resume on any process of
any machine.

Keys (one Redis, or one primary with replicas, shared by every server of a deployment):

- ``realtime:session:<sha256(token, key)>``: one session's latest bytes (a :mod:`handoff`
  dump), prefixed by its kind (``H`` handed off at a drain, ``C`` a checkpoint of a live session)
  and the id of the process that holds it; it expires ``resume_seconds`` after it was written.
  The API key is part of the name: a resume with another credential finds nothing.
- ``realtime:alive:<process id>``: present while that process lives (rewritten every
  ``ALIVE_SECONDS / 3``).
- channel ``realtime:want:<process id>``: "hand session (token, key) off", to its holder; the
  holder answers on ``realtime:given:<sha>`` once the hand-off is written.

A process resuming a session it does not hold reads the entry: if its holder is alive, it asks
the holder to hand the session off (its chunks in flight answered first) and waits for it;
if the holder is gone (killed, machine lost), it claims the checkpoint. ``GETDEL`` makes the
claim atomic: one process takes a session.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time

import redis.asyncio as redis
from redis.asyncio.client import PubSub

from realtime import errors
from realtime.store import ASK_SECONDS, Exposition, Give, Peers

log = logging.getLogger("realtime")
PREFIX = "realtime:"
#: A process is taken for dead this long after its last sign of life. Short, because a client
#: resuming from a killed process waits up to this long; long enough for a busy event loop.
ALIVE_SECONDS = 1.5
HANDED_OFF, CHECKPOINT = b"H", b"C"
ID_LENGTH = 16


def entry_key(token: str, key: str | None) -> str:
    """The Redis key of a session: its token and API key, hashed."""
    digest = hashlib.sha256(f"{token}\0{key or ''}".encode()).hexdigest()[:40]
    return f"{PREFIX}session:{digest}"


class RedisStore:
    """The :class:`realtime.store.SessionStore` on Redis (see the module docstring)."""

    def __init__(self, url: str, checkpoint_seconds: float, peers: Peers | None) -> None:
        self.url = url
        self.checkpoint_seconds = checkpoint_seconds
        self.peers = peers
        self.id = secrets.token_hex(ID_LENGTH // 2)
        self._redis: redis.Redis = redis.from_url(url)
        self._tasks: list[asyncio.Task[None]] = []
        self._give: Give | None = None
        self._warned = float("-inf")  # monotonic time of the last warning

    async def start(self, give: Give, exposition: Exposition) -> None:
        """Check Redis answers, say this process is alive, and serve hand-off requests."""
        self._give = give
        try:
            await self._redis.ping()
        except (redis.RedisError, OSError) as e:
            raise errors.ConfigError(f"--redis {self.url}: {e}") from None
        await self._alive()
        pubsub = self._redis.pubsub()
        await pubsub.subscribe(f"{PREFIX}want:{self.id}")
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._beat()), loop.create_task(self._serve(pubsub))]
        if self.peers is not None:
            await self.peers.start(give, exposition)
        log.info("event=redis url=%s process=%s", self.url, self.id)

    async def _alive(self) -> None:
        await self._redis.set(f"{PREFIX}alive:{self.id}", b"1", px=int(ALIVE_SECONDS * 1000))

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(ALIVE_SECONDS / 3)  # a period, not a wait for an event
            try:
                await self._alive()
            except (redis.RedisError, OSError) as e:
                self._warn("alive", e)

    async def _serve(self, pubsub: PubSub) -> None:
        """Hand off the sessions other processes ask for, one task each."""
        while True:
            try:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            except (redis.RedisError, OSError) as e:
                self._warn("listen", e)
                await asyncio.sleep(1.0)  # Redis is down: try again later, not in a hot loop
                continue
            if msg is None or not isinstance(msg.get("data"), bytes):
                continue
            token, _, key = msg["data"].decode().partition(" ")
            task = asyncio.get_running_loop().create_task(self._hand(token, key or None))
            self._tasks.append(task)
            task.add_done_callback(self._tasks.remove)

    async def _hand(self, token: str, key: str | None) -> None:
        assert self._give is not None
        name = entry_key(token, key)
        data = await self._give(token, key)
        with contextlib.suppress(redis.RedisError, OSError):
            if data is not None:
                ttl = await self._redis.pttl(name)
                await self._redis.set(name, HANDED_OFF + self.id.encode() + data, px=max(ttl, 1000))
            await self._redis.publish(f"{PREFIX}given:{name}", b"1")

    async def take(self, token: str, key: str | None) -> tuple[bytes, bool] | None:
        """A sibling's session; else the one in Redis, from its holder if it is alive."""
        if self.peers is not None:
            got = await self.peers.take(token, key)
            if got is not None:
                return got, False
        name = entry_key(token, key)
        try:
            value = _bytes(await self._redis.get(name))
            if value is None:
                return None
            holder = value[1 : 1 + ID_LENGTH].decode()
            if value[:1] == CHECKPOINT and holder != self.id:
                await self._ask(name, holder, token, key)
            value = _bytes(await self._redis.getdel(name))
        except (redis.RedisError, OSError) as e:
            self._warn("take", e)
            return None
        if value is None:
            return None
        return value[1 + ID_LENGTH :], value[:1] == CHECKPOINT

    async def _ask(self, name: str, holder: str, token: str, key: str | None) -> None:
        """Ask a live holder to hand the session off; return once it did, or it is gone."""
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(f"{PREFIX}given:{name}")
            await self._redis.publish(f"{PREFIX}want:{holder}", f"{token} {key or ''}".encode())
            give_up = time.monotonic() + ASK_SECONDS
            alive = f"{PREFIX}alive:{holder}"
            while time.monotonic() < give_up and await self._redis.exists(alive):
                # The answer, or a look at the holder's heartbeat every quarter second.
                if await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.25):
                    return
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]

    def _warn(self, op: str, e: Exception) -> None:
        """Log a Redis failure, at most once a second (one per checkpoint would flood)."""
        now = time.monotonic()
        if now - self._warned >= 1.0:
            self._warned = now
            log.warning("event=redis_error op=%s error=%r", op, e)

    def keeps_hand_offs(self) -> bool:
        """Always: a drained session goes to Redis."""
        return True

    async def put(self, token: str, key: str | None, data: bytes, ttl: float) -> None:
        """A drained session, for any process to take."""
        await self._set(HANDED_OFF, token, key, data, ttl)

    async def checkpoint(self, token: str, key: str | None, data: bytes, ttl: float) -> None:
        """A live session's latest state, for the case this process dies."""
        await self._set(CHECKPOINT, token, key, data, ttl)

    async def _set(self, kind: bytes, token: str, key: str | None, data: bytes, ttl: float) -> None:
        value = kind + self.id.encode() + data
        try:
            await self._redis.set(entry_key(token, key), value, px=max(1, int(ttl * 1000)))
        except (redis.RedisError, OSError) as e:
            self._warn("set", e)

    async def forget(self, token: str, key: str | None) -> None:
        """The session ended: delete its entry."""
        try:
            await self._redis.delete(entry_key(token, key))
        except (redis.RedisError, OSError) as e:
            self._warn("delete", e)

    async def peer_expositions(self) -> list[bytes]:
        """This machine's siblings' metrics."""
        return [] if self.peers is None else await self.peers.expositions()

    async def close(self) -> None:
        """Stop serving requests; this process is no longer alive for the others."""
        for task in list(self._tasks):
            task.cancel()
        if self.peers is not None:
            await self.peers.close()
        with contextlib.suppress(redis.RedisError, OSError):
            await self._redis.delete(f"{PREFIX}alive:{self.id}")
        await self._redis.aclose()


def _bytes(value: object) -> bytes | None:
    """A Redis reply as bytes (the client is not asked to decode replies)."""
    return value if isinstance(value, bytes) else None
