"""Sibling processes' sockets (realtime.store.Peers): a session is handed off once, by the one
that holds it; a sibling that died holds nothing; metrics are asked of every sibling."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from realtime.store import Peers


@pytest.fixture
async def folder() -> AsyncIterator[Path]:
    # Unix socket paths are short (108 bytes): not under pytest's long tmp_path.
    with tempfile.TemporaryDirectory(prefix="rt-peers-") as d:
        yield Path(d)


class Holder:
    """A fake process holding sessions by (token, key)."""

    def __init__(self, held: dict[tuple[str, str | None], bytes]) -> None:
        self.held = held

    async def give(self, token: str, key: str | None) -> bytes | None:
        return self.held.pop((token, key), None)


async def test_a_session_comes_from_the_sibling_holding_it_once_and_only_with_its_key(
    folder: Path,
) -> None:
    holder = Holder({("tok", "k1"): b"session bytes", ("free", None): b"keyless"})
    a, b, c = Peers(folder), Peers(folder), Peers(folder)
    # One process, three sockets: the pid in the name is made unique by hand.
    b.path, c.path = folder / "peer-b.sock", folder / "peer-c.sock"
    await a.start(holder.give, lambda: b"a 1\n")
    await b.start(Holder({}).give, lambda: b"b 1\n")
    await c.start(Holder({}).give, lambda: b"c 1\n")
    try:
        assert await b.take("tok", "k2") is None  # another key's resume finds nothing
        assert await b.take("tok", "k1") == b"session bytes"
        assert await c.take("tok", "k1") is None  # taken once
        assert await c.take("free", None) == b"keyless"
        assert sorted(await b.expositions()) == [b"a 1\n", b"c 1\n"]
        await a.close()
        assert not a.path.exists()
        dead = folder / "peer-999999.sock"  # a socket nobody listens on: a sibling that died
        dead.touch()
        assert await b.take("anything", None) is None
        assert await b.expositions() == [b"c 1\n"]
    finally:
        for p in (a, b, c):
            await p.close()
