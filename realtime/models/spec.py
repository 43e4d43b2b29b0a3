"""What a model version is, as pure data: its tensors, state, timing and post-processing.

Everything the protocol, the sessions and the batching policy need to know about a model lives
here, with no ONNX Runtime in sight: ``import realtime.session`` (or ``connection``,
``batching``, ``config``) does not load it. The one thing a spec cannot be without is how to run
it, and that is a :class:`Runner`: :class:`realtime.runtime.ModelRunner` in the server, anything
with ``outputs`` and ``run`` in tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from realtime import events
from realtime.protocol import Kind


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """A graph input or output: name, dtype and shape (``None`` for a dynamic dimension)."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | None, ...]


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """How ONNX Runtime sessions are built: threads per call and graph optimisation."""

    intra_op_threads: int = 1
    optimize: bool = True
    #: Where optimized graphs are kept between starts (None: not kept). Keyed by the model's
    #: bytes, the ONNX Runtime version and the machine, since ORT's fused kernels are specific.
    cache_dir: Path | None = None


class Runner(Protocol):
    """Runs one batch of a model: feeds in, outputs (in ``outputs`` order) out, from any thread."""

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        """The graph's outputs, in the order :meth:`run` returns them."""
        ...

    def run(self, feeds: dict[str, np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        """Run one batch."""
        ...


@dataclass(frozen=True, slots=True)
class StateSpec:
    """A recurrent state carried per stream: fed as ``input``, returned as ``output``."""

    input: str
    output: str
    batch_axis: int
    initial: np.ndarray[Any, Any]  # the state at stream start, batch size 1


@dataclass(frozen=True, slots=True)
class Model:
    """One version of one model: what clients must send, what they get back, how to run it."""

    name: str
    version: str
    path: Path
    description: str
    kind: Kind
    input: TensorInfo  # the graph input the client's chunks feed (shape includes batch)
    item_shape: tuple[int | None, ...]  # one item's input shape, batch axis removed
    outputs: tuple[TensorInfo, ...]  # returned to the client; state outputs excluded
    states: tuple[StateSpec, ...]
    constants: dict[str, np.ndarray[Any, Any]]
    sample_rate: int | None
    chunk: int | None  # audio: new samples per chunk
    context: int  # audio: samples of the previous chunk prepended to each chunk
    max_batch: int
    max_delay_ms: float
    deadline_ms: float
    runner: Runner
    #: ``[[postprocess]]`` tables, validated: each makes one stream's processor.
    postprocess: tuple[events.Factory, ...] = ()
    #: The event types those post-processors emit, in chain order.
    event_types: tuple[str, ...] = ()
    #: ``name@version``: the id of this model version in logs, queues and metrics.
    key: str = field(init=False)
    #: The names of ``outputs``, in order (a result's keys).
    output_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.name}@{self.version}")
        object.__setattr__(self, "output_names", tuple(o.name for o in self.outputs))

    @property
    def timebase(self) -> events.Timebase:
        """Where this model's windows sit in time (for post-processors)."""
        if self.kind != "audio":
            return events.Timebase()
        return events.Timebase(self.sample_rate, self.chunk, self.context)

    def catalog_entry(self, default: bool) -> dict[str, Any]:
        """This model version as the welcome message and ``GET /v1/models`` describe it."""
        entry: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "default": default,
            "kind": self.kind,
            "description": self.description,
            "input": {
                "name": self.input.name,
                "dtype": self.input.dtype.name,
                "shape": list(self.chunk_shape),
            },
            "outputs": [
                {"name": o.name, "dtype": o.dtype.name, "shape": list(o.shape[1:])}
                for o in self.outputs
            ],
            "stateful": bool(self.states),
            "events": list(self.event_types),
            "max_batch": self.max_batch,
            "deadline_ms": self.deadline_ms,
        }
        if self.kind == "audio":
            entry["input"]["sample_rate"] = self.sample_rate
            entry["input"]["chunk"] = self.chunk
            entry["input"]["context"] = self.context
        return entry

    @property
    def chunk_shape(self) -> tuple[int | None, ...]:
        """The shape of one chunk as a client sends it (audio: any number of samples)."""
        return (None,) if self.kind == "audio" else self.item_shape
