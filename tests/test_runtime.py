"""ONNX Runtime sessions: the optimized-graph cache that makes restarts fast."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from realtime.models.repository import BUILTIN_DIR
from realtime.runtime import ModelRunner, RuntimeOptions


def test_the_optimized_graph_is_kept_and_reused(tmp_path: Path) -> None:
    model = BUILTIN_DIR / "pitch" / "1" / "model.onnx"
    options = RuntimeOptions(cache_dir=tmp_path / "graphs")
    first = ModelRunner(model, options)
    assert first.cached_graph is not None and first.cached_graph.exists()
    assert [p.name for p in (tmp_path / "graphs").iterdir()] == [first.cached_graph.name]
    second = ModelRunner(model, options)
    assert first.loaded_from == model  # optimized on the way in, and saved
    assert second.loaded_from == first.cached_graph  # same bytes, ORT and machine: reused
    feeds = {first.inputs[0].name: np.random.default_rng(0).normal(0, 0.3, (2, 1024))}
    feeds = {k: v.astype(np.float32) for k, v in feeds.items()}
    for a, b in zip(first.run(feeds), second.run(feeds), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    plain = ModelRunner(model, RuntimeOptions())
    assert plain.cached_graph is None
