"""Token buckets on a fake clock."""

from __future__ import annotations

import pytest

from realtime.ratelimit import TokenBucket


def test_a_burst_is_free_then_the_rate_holds() -> None:
    bucket = TokenBucket(rate=100.0, burst=10.0, now=0.0)
    assert all(bucket.take(1, 0.0) == 0.0 for _ in range(10))
    assert bucket.take(1, 0.0) == pytest.approx(0.01)  # one token in debt: wait 10 ms
    assert bucket.take(1, 0.01) == pytest.approx(0.01)  # the debt was paid, this one is new
    assert bucket.take(1, 1.0) == 0.0  # a quiet second refills (up to the burst only)
    assert all(bucket.take(1, 1.0) == 0.0 for _ in range(9))
    assert bucket.take(1, 1.0) > 0.0


def test_a_large_take_waits_in_proportion() -> None:
    bucket = TokenBucket(rate=1000.0, burst=500.0, now=0.0)
    assert bucket.take(2500, 0.0) == pytest.approx(2.0)
    assert bucket.take(0, 2.0) == 0.0
