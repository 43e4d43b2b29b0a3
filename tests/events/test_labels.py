"""Top-k labels with a threshold and debouncing, on made-up score sequences (10 ms apart)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper

from realtime.client import Client
from realtime.events import Batch, ConfigError, Emitted, OutputInfo, Timebase, labels, run_chain
from realtime.protocol import Event, Result
from tests.conftest import ServerFactory, write_model

NAMES = ["cat", "dog", "bird"]
OUTPUTS = [OutputInfo("scores", (3,))]


def _run(rows: list[list[float]], chunks: int = 1, **table: Any) -> list[Emitted]:
    config = {"kind": "labels", "output": "scores", "labels": NAMES, **table}
    proc = labels.factory(config, OUTPUTS, Timebase())({})
    scores = np.array(rows, np.float32)
    t = 10.0 * np.arange(len(rows))
    out: list[Emitted] = []
    for i in range(0, len(rows), chunks):
        out += run_chain([proc], Batch(t[i : i + chunks], {"scores": scores[i : i + chunks]}))
    return out


CAT, DOG, NONE = [0.8, 0.15, 0.05], [0.1, 0.7, 0.2], [0.4, 0.3, 0.3]


def test_a_held_label_is_announced_at_its_start_with_the_top_k() -> None:
    got = _run([NONE] * 5 + [CAT] * 30, debounce_ms=100, top_k=2)
    assert [(e.t, e.data["label"]) for e in got] == [(50.0, "cat")]
    assert got[0].data["score"] == pytest.approx(0.8)
    assert got[0].data["top"] == [
        {"label": "cat", "score": pytest.approx(0.8)},
        {"label": "dog", "score": pytest.approx(0.15)},
    ]


def test_flicker_shorter_than_the_debounce_is_not_announced() -> None:
    rows = [CAT] * 30 + [DOG] * 5 + [CAT] * 30 + [NONE] * 30
    got = _run(rows, debounce_ms=100)
    assert [(e.t, e.data["label"]) for e in got] == [(0.0, "cat"), (650.0, None)]
    assert got[1].data["score"] is None
    assert _run(rows, chunks=7, debounce_ms=100) == got


def test_logits_go_through_softmax() -> None:
    got = _run([[0.0, 3.0, 0.0]] * 30, debounce_ms=50, softmax=True)
    assert [e.data["label"] for e in got] == ["dog"]
    assert got[0].data["score"] == pytest.approx(np.exp(3) / (np.exp(3) + 2), rel=1e-4)


def test_bad_tables_are_refused() -> None:
    with pytest.raises(ConfigError, match="labels must"):
        labels.factory({"kind": "labels", "output": "scores"}, OUTPUTS, Timebase())
    with pytest.raises(ConfigError, match="one score per label"):
        labels.factory(
            {"kind": "labels", "output": "scores", "labels": ["a", "b"]}, OUTPUTS, Timebase()
        )


async def test_labels_through_the_server_on_a_tensor_stream(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["scores"])],
        "scores",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 3])],
    )
    toml = (
        'kind = "tensor"\n[[postprocess]]\nkind = "labels"\noutput = "scores"\n'
        'labels = ["cat", "dog", "bird"]\ndebounce_ms = 100\n'
    )
    write_model(tmp_path, "classify", graph, toml)
    server = await start_server((tmp_path,), builtin=False)
    rows = [NONE] * 3 + [CAT] * 10 + [DOG] * 2 + [CAT] * 5 + [DOG] * 20
    async with await Client.connect(server.url) as client:
        stream = await client.open("classify")
        for i, row in enumerate(rows):  # a 50 ms frame each, t in the client's clock
            await stream.send(np.array(row, np.float32), t=10_000.0 + 50 * i)
        await stream.close()
        got = await stream.collect()
    assert sum(isinstance(m, Result) for m in got) == len(rows)
    events = [(m.t, m.data["label"]) for m in got if isinstance(m, Event)]
    assert events == [(10_150.0, "cat"), (11_000.0, "dog")]  # the 100 ms dog blip is not one
