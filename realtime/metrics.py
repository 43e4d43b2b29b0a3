"""Prometheus metrics, read from the server's own counters when scraped (``GET /metrics``).

Nothing here runs per chunk: the server and the scheduler keep plain integer counters and
fixed-bucket histograms, and :class:`Metrics` turns them into Prometheus families at scrape time.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from realtime.admission import LAG_BOUNDS_MS, Admission
from realtime.scheduler import LATENCY_BOUNDS_MS, QueueSnapshot
from realtime.traffic import Traffic


def _buckets(counts: list[int], scale: float = 0.001) -> list[tuple[str, float]]:
    """Cumulative Prometheus buckets (seconds) from per-bucket counts over LATENCY_BOUNDS_MS."""
    return [
        ("+Inf" if math.isinf(bound) else repr(bound * scale), float(total))
        for bound, total in zip(LATENCY_BOUNDS_MS, itertools.accumulate(counts), strict=True)
    ]


def _labelled(name: str, doc: str, label: str, counts: dict[str, int]) -> CounterMetricFamily:
    """A counter family with one sample per label value."""
    family = CounterMetricFamily(name, doc, labels=[label])
    for value, n in sorted(counts.items()):
        family.add_metric([value], n)
    return family


class Metrics(Collector):
    """The server's metrics as Prometheus families, computed at each scrape."""

    def __init__(
        self,
        traffic: Traffic,
        queues: Callable[[], dict[str, QueueSnapshot]],
        gauges: Callable[[], tuple[int, int, int]],
    ) -> None:
        self._traffic = traffic
        self._queues = queues
        self._gauges = gauges  # (sessions open, streams open, sessions parked)

    def registry(self) -> CollectorRegistry:
        """A registry holding just this collector (no process-global state)."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return registry

    def collect(self) -> Iterator[Metric]:
        t = self._traffic
        sessions, streams, parked = self._gauges()
        yield GaugeMetricFamily(
            "realtime_processes", "Server processes whose metrics this scrape adds up", 1
        )
        yield GaugeMetricFamily("realtime_sessions", "Sessions open now", sessions)
        yield GaugeMetricFamily(
            "realtime_sessions_parked", "Sessions whose connection was lost, kept to resume", parked
        )
        yield GaugeMetricFamily("realtime_streams", "Streams open now", streams)
        yield CounterMetricFamily("realtime_sessions_opened", "Sessions opened", t.sessions_total)
        yield CounterMetricFamily("realtime_messages_received", "Messages in", t.messages_in)
        yield CounterMetricFamily("realtime_received_bytes", "Bytes in", t.bytes_in)
        yield CounterMetricFamily("realtime_messages_sent", "Messages out", t.messages_out)
        yield CounterMetricFamily("realtime_sent_bytes", "Bytes out", t.bytes_out)
        yield _labelled("realtime_errors", "Errors sent, by code", "code", t.errors)
        yield _labelled(
            "realtime_model_reloads",
            "Model versions added, removed or refused",
            "result",
            t.reloads,
        )
        yield _labelled(
            "realtime_session_resumes",
            "Lost sessions parked, resumed, expired, and resumes refused",
            "result",
            t.resumes,
        )
        yield _labelled(
            "realtime_oip_requests",
            "Open Inference Protocol requests (infer, metadata, health), by front door",
            "door",
            t.requests,
        )

        latency = HistogramMetricFamily(
            "realtime_latency_seconds",
            "Server-side latency of a chunk: received to its result or error queued to send",
            labels=["model"],
        )
        for model, counts in sorted(t.latency_ms.items()):
            latency.add_metric([model], _buckets(counts), t.latency_sum_ms[model] / 1000.0)
        yield latency

        queues = sorted(self._queues().items())
        depth = GaugeMetricFamily("realtime_queue_depth", "Items waiting", labels=["model"])
        running = GaugeMetricFamily(
            "realtime_batches_running",
            "Batches cut and not yet back: each worker's running one and its next, waiting",
            labels=["model"],
        )
        stuck = GaugeMetricFamily(
            "realtime_batches_stuck",
            "Batches past the time limit still holding a worker thread",
            labels=["model"],
        )
        counters = {
            name: CounterMetricFamily(f"realtime_{name}", doc, labels=["model"])
            for name, doc in [
                ("items_submitted", "Items queued for a batch"),
                ("items_run", "Items run in a batch"),
                ("batches", "Batches run"),
                ("deadline_misses", "Items not run: their deadline passed in the queue"),
                ("items_refused", "Items refused at the queue (overloaded)"),
                ("items_dropped", "Items dropped for newer ones (drop_oldest streams)"),
                ("batch_failures", "Batches whose model run raised"),
            ]
        }
        batch = HistogramMetricFamily("realtime_batch_size", "Items per batch", labels=["model"])
        wait = HistogramMetricFamily(
            "realtime_queue_wait_seconds", "Item arrival to its batch start", labels=["model"]
        )
        infer = HistogramMetricFamily(
            "realtime_inference_seconds", "Model run time of one batch", labels=["model"]
        )
        for key, q in queues:
            s = q.stats
            depth.add_metric([key], q.depth)
            running.add_metric([key], q.in_flight)
            stuck.add_metric([key], q.stuck)
            for name, value in [
                ("items_submitted", s.submitted),
                ("items_run", s.items),
                ("batches", s.batches),
                ("deadline_misses", s.deadline_misses),
                ("items_refused", s.rejected),
                ("items_dropped", s.dropped),
                ("batch_failures", s.failures),
            ]:
                counters[name].add_metric([key], value)
            sizes = sorted(s.batch_sizes.items())
            bounds = [1, 2, 4, 8, 16, 32, 64, 128, 256]
            cumulative = [(str(b), float(sum(c for n, c in sizes if n <= b))) for b in bounds] + [
                ("+Inf", float(sum(c for _, c in sizes)))
            ]
            batch.add_metric([key], cumulative, float(sum(n * c for n, c in sizes)))
            wait.add_metric([key], _buckets(s.queue_ms), s.queue_seconds)
            infer.add_metric([key], _buckets(s.infer_ms), s.infer_seconds)
        yield depth
        yield running
        yield stuck
        yield from counters.values()
        yield batch
        yield wait
        yield infer


def merge_expositions(texts: list[bytes]) -> bytes:
    """Several processes' metrics (Prometheus text) as one process's: samples with the same name
    and labels are added up (counters, gauges and histogram buckets alike), as prometheus_client's
    multiprocess mode does, so one scrape of any process covers all of them."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode()):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            summed = values[family.name]
            for sample in family.samples:
                at = (sample.name, tuple(sorted(sample.labels.items())))
                summed[at] = summed.get(at, 0.0) + sample.value
    registry = CollectorRegistry(auto_describe=False)
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


class _Fixed(Collector):
    """Metric families already computed."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


class AdmissionMetrics(Collector):
    """Admission control's figures (realtime.admission), computed at each scrape."""

    def __init__(self, admission: Admission, sessions: Callable[[], int]) -> None:
        self._admission = admission
        self._sessions = sessions

    def collect(self) -> Iterator[Metric]:
        a = self._admission
        f = a.figures
        yield _labelled(
            "realtime_admitted", "New sessions and streams admitted", "what", dict(f.admitted)
        )
        yield _labelled(
            "realtime_refused_busy",
            "New sessions and streams refused server_busy, by reason",
            "reason",
            dict(f.refused),
        )
        yield CounterMetricFamily(
            "realtime_taken_back",
            "Admitted sessions ended server_busy because the admitted ones stayed late, or "
            "they waited too long while the server was behind",
            f.taken_back,
        )
        yield GaugeMetricFamily(
            "realtime_waiting_sessions",
            "The newest sessions, whose chunks wait while the server is behind (the oldest are "
            "served)",
            a.waiting,
        )
        lag = HistogramMetricFamily("realtime_loop_lag_seconds", "Event-loop lag, per measurement")
        lag.add_metric(
            [],
            [
                ("+Inf" if math.isinf(bound) else repr(bound / 1000.0), float(total))
                for bound, total in zip(
                    LAG_BOUNDS_MS, itertools.accumulate(f.lag_buckets), strict=True
                )
            ],
            f.lag_sum,
        )
        yield lag
        yield GaugeMetricFamily(
            "realtime_load", "Smoothed share of the bottleneck (event loop or cores) in use", a.load
        )
        yield GaugeMetricFamily(
            "realtime_session_load",
            "Smoothed share of the bottleneck streaming sessions use (realtime_load less what "
            "new connections cost), what admission divides by the sessions",
            a.session_load,
        )
        yield GaugeMetricFamily(
            "realtime_batching_slack_cores",
            "Smoothed CPU (cores) the model workers spend past what their items cost in large "
            "batches: small batches' price, which more sessions fill; not counted as their cost",
            a.batching_slack,
        )
        yield GaugeMetricFamily(
            "realtime_churn_load",
            "Smoothed share of the bottleneck new connections take (handshakes, hellos, "
            "refusals): kept free of sessions by admission",
            a.churn,
        )
        yield GaugeMetricFamily(
            "realtime_late_share",
            "Median over live audio streams of the share of results sent late, last second (NaN "
            "while no live audio stream is measured)",
            math.nan if a.late_share is None else a.late_share,
        )
        dear = a.remembered_cost
        yield GaugeMetricFamily(
            "realtime_session_cost_remembered",
            "The dearest share of the bottleneck one streaming session used near full load over "
            "the last 30 s, what admission leaves room for (NaN while not near full lately)",
            math.nan if dear is None else dear,
        )
        headroom = a.headroom(self._sessions())
        yield GaugeMetricFamily(
            "realtime_headroom_sessions",
            "Sessions that may still be admitted (NaN while the cost of one is unknown)",
            math.nan if headroom is None else headroom,
        )
