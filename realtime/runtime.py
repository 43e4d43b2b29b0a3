"""ONNX Runtime sessions. Knows nothing of asyncio, clients or sessions: feeds in, arrays out.

The scheduler calls :meth:`ModelRunner.run` from its worker threads; ONNX Runtime's ``run`` is
thread-safe, so one runner serves every concurrent batch of its model.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from realtime.models.spec import RuntimeOptions, TensorInfo

#: ONNX Runtime's tensor type names -> numpy dtypes (the ones the wire protocol can carry).
ORT_DTYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype("float32"),
    "tensor(float16)": np.dtype("float16"),
    "tensor(double)": np.dtype("float64"),
    "tensor(int8)": np.dtype("int8"),
    "tensor(uint8)": np.dtype("uint8"),
    "tensor(int16)": np.dtype("int16"),
    "tensor(uint16)": np.dtype("uint16"),
    "tensor(int32)": np.dtype("int32"),
    "tensor(int64)": np.dtype("int64"),
    "tensor(bool)": np.dtype("bool"),
}


def _cached_graph(path: Path, options: RuntimeOptions) -> Path | None:
    if options.cache_dir is None:
        return None
    digest = hashlib.sha256(path.read_bytes())
    digest.update(f"{ort.__version__}/{platform.machine()}/{options.intra_op_threads}".encode())
    return options.cache_dir / f"{digest.hexdigest()[:32]}.onnx"


def _info(arg: Any) -> TensorInfo:
    dtype = ORT_DTYPES.get(arg.type)
    if dtype is None:
        raise ValueError(f"{arg.name} has type {arg.type}, which the wire protocol cannot carry")
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in arg.shape)
    return TensorInfo(arg.name, dtype, shape)


class ModelRunner:
    """One loaded ONNX model, runnable from any thread."""

    def __init__(self, path: Path, options: RuntimeOptions) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if options.optimize
            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        so.log_severity_level = 3
        source = path
        cached = _cached_graph(path, options) if options.optimize else None
        if cached is not None and cached.exists():
            source = cached  # optimized already: skip the optimizer
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        elif cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(f".{os.getpid()}.tmp")
            so.optimized_model_filepath = str(partial)
        self.cached_graph = cached
        #: The file ONNX Runtime loaded: the model, or its cached optimized graph.
        self.loaded_from = source
        self._session = ort.InferenceSession(
            str(source), sess_options=so, providers=["CPUExecutionProvider"]
        )
        if cached is not None and source is path:
            with contextlib.suppress(OSError):
                os.replace(partial, cached)  # whole or not at all, whoever wins a race
        self.inputs = tuple(_info(a) for a in self._session.get_inputs())
        self.outputs = tuple(_info(a) for a in self._session.get_outputs())
        self._output_names = [o.name for o in self.outputs]

    def run(self, feeds: dict[str, np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        """Run one batch; outputs in graph order."""
        return self._session.run(self._output_names, feeds)  # type: ignore[no-any-return]
