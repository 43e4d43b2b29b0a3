"""``realtime models quantize``: an int8 version of a model version, and what it costs and saves.

ONNX Runtime's own dynamic quantization (int8 weights, activations quantized on the fly) writes
``<name>/<version>-int8/model.onnx`` next to the float version, with the same ``model.toml``. The
report runs both on the same sample input: file size, mean run time at batch 1 and at
``max_batch``, and the largest difference of each output. A version named ``1-int8`` never
becomes a name's default (numeric versions sort above it): clients ask for ``name@1-int8``, or
an operator renames it once the report satisfies them.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from realtime.errors import ModelLoadError
from realtime.models.repository import load_model
from realtime.models.spec import Model

REPEATS = 30


def sample_input(model: Model, batch: int) -> dict[str, np.ndarray[Any, Any]]:
    """A deterministic, plausible input batch: a tone in noise for audio, noise otherwise."""
    rng = np.random.default_rng(0)
    shape = [batch, *(d or 1 for d in model.item_shape)]
    if model.kind == "audio":
        n = int(np.prod(shape[1:]))
        t = np.arange(n) / (model.sample_rate or 16000)
        wave = 0.3 * np.sin(2 * np.pi * 220 * t) + rng.normal(0, 0.02, n)
        x = np.tile(wave, (batch, 1)).reshape(shape).astype(model.input.dtype)
    elif model.input.dtype == np.uint8:
        x = rng.integers(0, 256, shape, np.uint8)
    else:
        x = rng.normal(0, 1, shape).astype(model.input.dtype)
    feeds: dict[str, np.ndarray[Any, Any]] = dict(model.constants)
    feeds[model.input.name] = x
    for spec in model.states:
        feeds[spec.input] = np.concatenate([spec.initial] * batch, axis=spec.batch_axis)
    return feeds


def _time(model: Model, feeds: dict[str, np.ndarray[Any, Any]]) -> tuple[float, list[Any]]:
    outputs = model.runner.run(feeds)  # first run: allocations
    started = time.perf_counter()
    for _ in range(REPEATS):
        model.runner.run(feeds)
    return (time.perf_counter() - started) / REPEATS * 1000.0, outputs


def quantize(folder: Path) -> dict[str, Any]:
    """Write ``folder``'s int8 sibling and return the comparison report."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder = folder.resolve()
    name, version = folder.parent.name, folder.name
    original = load_model(name, version, folder)
    target = folder.parent / f"{version}-int8"
    if target.exists():
        raise ModelLoadError(f"{target} already exists")
    target.mkdir()
    try:
        logging.getLogger().setLevel(logging.ERROR)  # the quantizer's advice goes to the root log
        quantize_dynamic(
            folder / "model.onnx",
            target / "model.onnx",
            weight_type=QuantType.QInt8,
            extra_options={"EnableSubgraph": True},
        )
        if (folder / "model.toml").exists():
            shutil.copy(folder / "model.toml", target / "model.toml")
        quantized = load_model(name, f"{version}-int8", target)
    except Exception as e:
        shutil.rmtree(target, ignore_errors=True)
        raise ModelLoadError(f"{folder}: ONNX Runtime cannot quantize it: {e}") from None

    report: dict[str, Any] = {
        "model": original.key,
        "int8": quantized.key,
        "path": str(target / "model.onnx"),
        "bytes": {
            "float": (folder / "model.onnx").stat().st_size,
            "int8": (target / "model.onnx").stat().st_size,
        },
        "ms_per_batch": {},
        "max_abs_diff": {},
    }
    for batch in sorted({1, original.max_batch}):
        feeds = sample_input(original, batch)
        ms_float, out_float = _time(original, feeds)
        ms_int8, out_int8 = _time(quantized, feeds)
        report["ms_per_batch"][batch] = {"float": round(ms_float, 3), "int8": round(ms_int8, 3)}
        if batch == 1:
            for info, a, b in zip(original.runner.outputs, out_float, out_int8, strict=True):
                diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                report["max_abs_diff"][info.name] = float(diff.max()) if diff.size else 0.0
    return report
