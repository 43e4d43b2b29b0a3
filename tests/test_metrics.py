"""GET /metrics through a real server, read with prometheus_client's own parser; /readyz."""

from __future__ import annotations

import asyncio
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from realtime.metrics import merge_expositions
from tests.conftest import ServerFactory, double_graph, write_model
from tests.test_server import Raw, _server

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


async def scrape(base: str) -> Samples:
    status, ctype, text = await asyncio.to_thread(get, base + "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after[key] - before.get(key, 0.0)


async def test_metrics_move_by_what_was_sent(
    start_server: ServerFactory, tiny_models: Path
) -> None:
    server = await _server(start_server, tiny_models, warm_up=True)
    base = f"http://127.0.0.1:{server.port}"
    assert (await asyncio.to_thread(get, base + "/readyz"))[0] == 200
    before = await scrape(base)

    raw = await Raw.connect(server.url)  # hello
    assert (await raw.open(1, "double"))["type"] == "opened"
    for seq in range(10):
        await raw.chunk(1, seq, np.ones(4, np.float32))
    await raw.chunk(1, 10, np.ones(5, np.float32))  # wrong shape: a typed error
    got = [await raw.recv() for _ in range(11)]
    assert [m["type"] for m in got].count("result") == 10
    after = await scrape(base)

    model = {"model": "double@1"}
    assert delta(before, after, "realtime_messages_received_total") == 13  # hello open 10+1
    assert delta(before, after, "realtime_messages_sent_total") == 13  # welcome opened 10+1
    assert delta(before, after, "realtime_sessions_opened_total") == 1
    assert after[("realtime_sessions", ())] == 1 and after[("realtime_streams", ())] == 1
    assert delta(before, after, "realtime_errors_total", code="shape_mismatch") == 1
    assert delta(before, after, "realtime_items_run_total", **model) == 10
    assert delta(before, after, "realtime_items_submitted_total", **model) == 10
    assert delta(before, after, "realtime_batch_size_sum", **model) == 10
    assert delta(before, after, "realtime_latency_seconds_count", **model) == 10
    assert delta(before, after, "realtime_queue_wait_seconds_count", **model) == 10
    batches = delta(before, after, "realtime_batches_total", **model)
    assert 1 <= batches <= 10
    assert delta(before, after, "realtime_inference_seconds_count", **model) == batches
    assert after[("realtime_queue_depth", (("model", "double@1"),))] == 0
    # Warm-up ran every batch size before the first client: its runs are not counted.
    assert before.get(("realtime_batches_total", (("model", "double@1"),)), 0) == 0


async def test_warm_up_measures_every_batch_size_before_serving(
    start_server: ServerFactory, tiny_models: Path
) -> None:
    server = await _server(start_server, tiny_models, warm_up=True)
    double = server.scheduler.snapshot()["double@1"]
    assert sorted(double.run_times) == [1, 2, 4, 8, 16, 32]  # max_batch 32
    assert double.stats.batches == 0  # warm-up runs are not traffic


async def test_the_grafana_dashboard_asks_only_for_metrics_the_server_has(
    start_server: ServerFactory, tiny_models: Path
) -> None:
    import re

    import orjson

    from tests.conftest import REPO

    server = await _server(start_server, tiny_models)
    raw = await Raw.connect(server.url)
    assert (await raw.open(1, "double"))["type"] == "opened"
    await raw.still_works(1, 0)
    _, _, text = await asyncio.to_thread(get, f"http://127.0.0.1:{server.port}/metrics")
    families = {f.name for f in text_string_to_metric_families(text)}  # with or without samples
    dashboard = orjson.loads((REPO / "deploy" / "grafana-dashboard.json").read_bytes())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    wanted = {
        re.sub(r"_(total|bucket|sum|count)$", "", m)
        for e in exprs
        for m in re.findall(r"realtime_\w+", e)
    }
    assert len(wanted) > 10 and wanted <= families, wanted - families


def test_several_processes_metrics_add_up_to_one_exposition() -> None:
    one = b"""# HELP realtime_processes Processes
# TYPE realtime_processes gauge
realtime_processes 1.0
# HELP realtime_errors_total Errors sent, by code
# TYPE realtime_errors_total counter
realtime_errors_total{code="overloaded"} 2.0
# HELP realtime_latency_seconds Latency
# TYPE realtime_latency_seconds histogram
realtime_latency_seconds_bucket{le="0.01",model="m@1"} 3.0
realtime_latency_seconds_bucket{le="+Inf",model="m@1"} 4.0
realtime_latency_seconds_count{model="m@1"} 4.0
realtime_latency_seconds_sum{model="m@1"} 0.5
"""
    two = one.replace(b'"overloaded"} 2.0', b'"dropped"} 5.0')
    merged = merge_expositions([one, two]).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(merged)
        for s in family.samples
    }
    assert samples[("realtime_processes", ())] == 2
    assert samples[("realtime_errors_total", (("code", "overloaded"),))] == 2
    assert samples[("realtime_errors_total", (("code", "dropped"),))] == 5
    assert samples[("realtime_latency_seconds_bucket", (("le", "0.01"), ("model", "m@1")))] == 6
    assert samples[("realtime_latency_seconds_sum", (("model", "m@1"),))] == 1.0
    assert "# TYPE realtime_latency_seconds histogram" in merged


async def test_readyz_says_full_while_a_model_queue_refuses_chunks(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """A load balancer sends new clients elsewhere while a queue is at --max-queue."""
    root = tmp_path / "models"
    write_model(root, "double", double_graph(), "max_delay_ms = 0\n")
    server = await start_server((root,), builtin=False, workers=1, max_queue=2)
    model = server.repository.get("double", None)
    assert model is not None
    release = threading.Event()
    run = model.runner.run

    def hold_99(feeds: dict[str, Any]) -> Any:  # the one worker holds this batch until told
        if (feeds["x"] == 99.0).any():
            release.wait(60)
        return run(feeds)

    model.runner.run = hold_99  # type: ignore[method-assign]
    base = f"http://127.0.0.1:{server.port}"
    raw = await Raw.connect(server.url)
    try:
        assert (await raw.open(1, shape=[4]))["type"] == "opened"
        assert (await raw.open(2, shape=[4]))["type"] == "opened"
        await raw.chunk(1, 0, np.full(4, 99.0, np.float32))  # runs, held
        for seq in (1, 2, 3):  # the worker's next batch, then the queue
            await raw.chunk(1, seq, np.ones(4, np.float32))
        await raw.chunk(2, 0, np.ones(4, np.float32))  # refused (answered at once: stream 2)
        refused = await raw.recv()
        assert (refused["stream"], refused["code"]) == (2, "overloaded")
        status, _, body = await asyncio.to_thread(get, base + "/readyz")
        assert (status, body) == (503, '{"status":"full","reason":"queue"}')
    finally:
        release.set()
    assert [(await raw.recv())["seq"] for _ in range(4)] == [0, 1, 2, 3]
    assert (await asyncio.to_thread(get, base + "/readyz"))[:3:2] == (200, '{"status":"ready"}')
