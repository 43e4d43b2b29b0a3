"""Token buckets: how fast one client may send, as a pure object over an injected clock."""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens a second, up to ``burst`` in hand. Taking more than is in hand runs into
    debt, and :meth:`take` says how long to wait until the debt is paid: the server stops reading
    from that client for that long, so TCP slows the sender instead of the server doing the work
    (and answering every excess message with an error)."""

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = now

    def take(self, amount: float, now: float) -> float:
        """Spend ``amount`` tokens; the seconds to wait before taking any more (0 if none)."""
        tokens = min(self.burst, self._tokens + (now - self._at) * self.rate) - amount
        self._tokens, self._at = tokens, now
        return 0.0 if tokens >= 0 else -tokens / self.rate
