"""``realtime models quantize`` on a model with real weights to quantize."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from realtime.models.repository import ModelRepository, scan
from tests.conftest import REPO, write_model


def dense_graph() -> object:
    """y = x @ W for x [batch, 64]: a weight matrix worth quantizing."""
    w = np.random.default_rng(0).normal(0, 0.1, (64, 64)).astype(np.float32)
    return helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [numpy_helper.from_array(w, "W")],
    )


def quantize(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "realtime", "models", "quantize", str(folder)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_quantize_writes_an_int8_version_next_to_the_float_one(tmp_path: Path) -> None:
    folder = write_model(tmp_path, "dense", dense_graph(), "max_batch = 8\n")  # type: ignore[arg-type]
    r = quantize(folder)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["model"] == "dense@1" and report["int8"] == "dense@1-int8"
    assert report["bytes"]["int8"] < report["bytes"]["float"]  # 64x64 float32 -> int8
    assert set(report["ms_per_batch"]) == {"1", "8"}
    assert 0 < report["max_abs_diff"]["y"] < 0.1  # close, not identical
    assert (tmp_path / "dense" / "1-int8" / "model.toml").read_text() == "max_batch = 8\n"
    repo = ModelRepository(scan(tmp_path))
    assert repo.get("dense", "1-int8") is not None
    assert repo.get("dense").version == "1"  # type: ignore[union-attr]  # not the default
    again = quantize(folder)
    assert again.returncode == 2 and "already exists" in again.stderr
