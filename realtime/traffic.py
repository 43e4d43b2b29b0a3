"""What crossed the server's sockets: counters the per-chunk path adds to (compiled with it, see
setup.py), turned into Prometheus families only when scraped (:mod:`realtime.metrics`)."""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

from realtime.scheduler import LATENCY_BOUNDS_MS, new_histogram


@dataclass
class Traffic:
    """What crossed the server's sockets; counters only grow (gauges are read live)."""

    sessions_total: int = 0
    messages_in: int = 0
    bytes_in: int = 0
    messages_out: int = 0
    bytes_out: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # by wire code
    reloads: dict[str, int] = field(default_factory=dict)  # model versions added/removed/refused
    resumes: dict[str, int] = field(default_factory=dict)  # sessions parked/resumed/expired/refused
    #: Open Inference Protocol requests, by front door (``rest``, ``grpc``).
    requests: dict[str, int] = field(default_factory=dict)
    #: Per model key: server-side latency (chunk received -> its outcome queued to send), ms.
    latency_ms: dict[str, list[int]] = field(default_factory=dict)
    latency_sum_ms: dict[str, float] = field(default_factory=dict)

    def outcome(self, model: str, ms: float) -> None:
        """Count one chunk's server-side latency."""
        hist = self.latency_ms.get(model)
        if hist is None:
            hist = self.latency_ms[model] = new_histogram()
            self.latency_sum_ms[model] = 0.0
        hist[bisect_left(LATENCY_BOUNDS_MS, ms)] += 1
        self.latency_sum_ms[model] += ms
