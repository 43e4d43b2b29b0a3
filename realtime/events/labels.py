"""Classification: scores per item -> ``label`` events when the top label changes, debounced.

The top label is the highest-scoring class if its score reaches ``threshold``, else none. A new
top label is announced once it has held for ``debounce_ms`` (flicker between two classes, or a
single odd frame, is not), with ``t`` where it began and the ``top_k`` best classes then.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from mypy_extensions import mypyc_attr

from realtime.events import Batch, ConfigError, Emitted, Factory, Options, OutputInfo, Timebase
from realtime.frozen import by_fields


@dataclass(frozen=True, slots=True)
class LabelsConfig:
    """Which output holds the scores, the class names, and how to decide."""

    output: str
    labels: tuple[str, ...]
    top_k: int = 1
    threshold: float = 0.5
    debounce_ms: float = 200.0
    softmax: bool = False  # the output is logits: turn them into probabilities first

    def __reduce__(self) -> tuple[Any, ...]:
        return by_fields(self)


def factory(table: Mapping[str, Any], outputs: list[OutputInfo], timebase: Timebase) -> Factory:
    """Validate a ``kind = "labels"`` table; the factory of its per-stream processors."""
    o = Options(table, {"output", "labels", "top_k", "threshold", "debounce_ms", "softmax"})
    output = o.output("output", outputs)
    labels = table.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise ConfigError("postprocess labels: labels must be a list of class names")
    shape = next(info.shape for info in outputs if info.name == output)
    if len(shape) != 1 or shape[0] not in (None, len(labels)):
        raise ConfigError(
            f"postprocess labels: {output} must hold one score per label ({len(labels)})"
        )
    softmax = table.get("softmax", False)
    if not isinstance(softmax, bool):
        raise ConfigError("postprocess labels: softmax must be true or false")
    config = LabelsConfig(
        output,
        tuple(labels),
        o.integer("top_k", 1, 1, len(labels)),
        o.number("threshold", 0.5, 0.0, 1.0),
        o.number("debounce_ms", 200.0, 0.0, 60_000.0),
        softmax,
    )
    return Factory(lambda options: LabelTracker(config))


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class LabelTracker:
    """One stream's announced label and the candidate that may replace it."""

    def __init__(self, config: LabelsConfig) -> None:
        self.config = config
        self._shown: int | None = None  # class index last announced (None: nothing)
        self._candidate: int | None = None
        self._since = 0.0
        #: Scores where the candidate peaked; None while there is no candidate.
        self._best: np.ndarray[Any, Any] | None = None

    def process(self, batch: Batch) -> list[Emitted]:
        """A ``label`` event for each debounced change of the top label in these items."""
        cfg = self.config
        out: list[Emitted] = []
        if not len(batch.t):
            return out
        scores = batch.outputs[cfg.output].reshape(len(batch.t), -1).astype(np.float64)
        if cfg.softmax:
            scores = np.exp(scores - scores.max(axis=1, keepdims=True))
            scores /= scores.sum(axis=1, keepdims=True)
        for t, row in zip(batch.t.tolist(), scores, strict=True):
            best = int(row.argmax())
            top: int | None = best if row[best] >= cfg.threshold else None
            if top == self._shown:
                self._best = None  # no candidate
                continue
            if top != self._candidate or self._best is None:
                self._candidate, self._since, self._best = top, t, row
            elif top is not None and row[top] > self._best[top]:
                self._best = row
            if t - self._since >= cfg.debounce_ms:
                out.append(self._announce())
        return out

    def _announce(self) -> Emitted:
        cfg = self.config
        assert self._best is not None
        row, top = self._best, self._candidate
        order = np.argsort(-row, kind="stable")[: cfg.top_k].tolist()
        self._shown, self._best = top, None
        return Emitted(
            "label",
            self._since,
            {
                "label": None if top is None else cfg.labels[top],
                "score": None if top is None else round(float(row[top]), 4),
                "top": [{"label": cfg.labels[i], "score": round(float(row[i]), 4)} for i in order],
            },
        )
