"""Admission and aggregate rates on a fake clock: per address, per key and in all."""

from __future__ import annotations

import pytest

from realtime import errors
from realtime.auth import ApiKey, AuthFailed
from realtime.quotas import BUSY_RETRY_MS, Quotas
from realtime.session import Limits

KEYS = {"k": ApiKey("k", b"s" * 40, max_sessions=2, max_messages_per_second=100)}


def quotas(**limits: int) -> Quotas:
    return Quotas(Limits(**limits), KEYS, max_connections=4)


def test_past_the_connection_cap_a_handshake_is_told_server_busy() -> None:
    q = quotas()
    for i in range(4):
        q.check_address(f"10.0.0.{i}")
        q.enter(f"10.0.0.{i}", None, 0.0)
    with pytest.raises(errors.ServerBusy) as busy:
        q.check_address("10.0.0.9")
    assert busy.value.retryable and busy.value.retry_after_ms == BUSY_RETRY_MS
    q.leave("10.0.0.0", None)
    q.check_address("10.0.0.9")  # a place is free again


def test_sessions_per_address_and_per_key_are_bounded() -> None:
    q = quotas(max_sessions_per_ip=2)
    q.enter("a", "k", 0.0)
    q.enter("a", None, 0.0)
    with pytest.raises(AuthFailed) as e:
        q.check_address("a")
    assert e.value.status == 429
    q.check_address("b")
    q.enter("b", "k", 0.0)
    with pytest.raises(AuthFailed, match="this key has its 2 sessions open"):
        q.check_key("k")
    q.leave("a", "k")
    q.check_key("k")
    assert (q.sessions("a"), q.sessions("b"), q.sessions("", "k"), q.connected) == (1, 1, 1, 2)


def test_an_address_is_forgotten_with_its_last_session() -> None:
    q = quotas()
    for i in range(1000):
        q.enter(f"10.1.{i // 256}.{i % 256}", None, 0.0)
        q.leave(f"10.1.{i // 256}.{i % 256}", None)
    assert q.connected == 0 and not q._by_ip


def test_the_sessions_of_one_address_share_its_rate() -> None:
    """Ten sessions each under their own rate, 1000 messages/s together, against an address
    rate of 100/s (burst 50): past the burst each message waits its share of the debt."""
    q = quotas(max_messages_per_second_per_ip=100)
    for _ in range(10):
        q.enter("a", None, 0.0)
    q.enter("b", None, 0.0)
    pauses = [q.charge("a", None, 10, 0.001 * k) for k in range(1000)]  # one second
    free = sum(1 for p in pauses if p == 0.0)
    assert 50 <= free <= 160  # the burst, plus what refills while it is spent
    assert pauses[-1] == pytest.approx((1000 - 50 - 100 * 0.999) / 100, rel=0.01)
    assert q.charge("b", None, 10, 1.0) == 0.0  # another address has its own


def test_bytes_are_charged_too() -> None:
    q = quotas(max_bytes_per_second_per_ip=1000)
    q.enter("a", None, 0.0)
    assert q.charge("a", None, 500, 0.0) == 0.0  # the burst: half a second
    assert q.charge("a", None, 1000, 0.0) == pytest.approx(1.0)


def test_the_sessions_of_one_key_share_its_rate_across_addresses() -> None:
    q = quotas()
    q.enter("a", "k", 0.0)
    q.enter("b", "k", 0.0)
    pauses = [q.charge("ab"[k % 2], "k", 10, 0.0) for k in range(100)]
    assert pauses[49] == 0.0 and pauses[-1] == pytest.approx(0.5)  # 50 over 100/s
