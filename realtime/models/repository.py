"""Model folders: ``DIR/<name>/<version>/model.onnx`` plus an optional ``model.toml``.

``model.toml`` says what the graph cannot: the stream kind, which input the client's chunks feed,
an audio model's sample rate, chunk and context, recurrent state pairs, constant inputs, and the
batching knobs. Every problem is a :class:`realtime.errors.ModelLoadError` naming the file.
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from realtime import events
from realtime.errors import ModelLoadError
from realtime.models.spec import Model, RuntimeOptions, StateSpec
from realtime.protocol import DTYPE_CODES, KINDS

BUILTIN_DIR = Path(__file__).parent / "builtin"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TOML_KEYS = frozenset(
    {
        "description",
        "kind",
        "input",
        "sample_rate",
        "chunk",
        "context",
        "max_batch",
        "max_delay_ms",
        "deadline_ms",
        "state",
        "constants",
        "postprocess",
    }
)


def _version_order(v: str) -> tuple[int, int, str]:
    return (0, int(v), "") if v.isdigit() else (-1, 0, v)


def _fail(path: Path, why: str) -> ModelLoadError:
    return ModelLoadError(f"{path}: {why}")


def _get(
    toml: dict[str, Any], key: str, typ: type | tuple[type, ...], default: Any, path: Path
) -> Any:
    v = toml.get(key, default)
    if v is not None and (not isinstance(v, typ) or isinstance(v, bool)):
        raise _fail(path, f"{key} must be of type {typ}")
    return v


def load_model(
    name: str, version: str, folder: Path, options: RuntimeOptions | None = None
) -> Model:
    """Load ``folder/model.onnx`` and ``folder/model.toml`` as model ``name@version``."""
    onnx_path = folder / "model.onnx"
    toml_path = folder / "model.toml"
    toml: dict[str, Any] = {}
    if toml_path.exists():
        try:
            toml = tomllib.loads(toml_path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise _fail(toml_path, f"invalid TOML: {e}") from None
        if unknown := set(toml) - _TOML_KEYS:
            raise _fail(toml_path, f"unknown keys {sorted(unknown)}")
    if not onnx_path.is_file():
        raise _fail(onnx_path, "no such file")
    from realtime.runtime import ModelRunner  # the one place ONNX Runtime is loaded

    try:
        runner = ModelRunner(onnx_path, options or RuntimeOptions())
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/... and plain RuntimeError
        raise _fail(onnx_path, f"ONNX Runtime cannot load it: {str(e).strip()[:500]}") from None
    inputs = {i.name: i for i in runner.inputs}
    outputs = {o.name: o for o in runner.outputs}

    states: list[StateSpec] = []
    raw_states = toml.get("state", [])
    if not isinstance(raw_states, list):
        raise _fail(toml_path, "state must be an array of tables ([[state]])")
    for s in raw_states:
        if (
            not isinstance(s, dict)
            or s.get("input") not in inputs
            or s.get("output") not in outputs
        ):
            raise _fail(toml_path, f"state {s!r} must name a graph input and a graph output")
        info = inputs[s["input"]]
        axis = s.get("batch_axis", 0)
        if type(axis) is not int or not 0 <= axis < len(info.shape):
            raise _fail(toml_path, f"state {info.name}: batch_axis {axis!r} out of range")
        dims = [1 if i == axis else d for i, d in enumerate(info.shape)]
        if any(d is None for d in dims):
            raise _fail(toml_path, f"state {info.name} has dynamic dims besides the batch axis")
        states.append(StateSpec(info.name, s["output"], axis, np.zeros(dims, info.dtype)))

    constants: dict[str, np.ndarray[Any, Any]] = {}
    raw_constants = toml.get("constants", {})
    if not isinstance(raw_constants, dict):
        raise _fail(toml_path, "constants must be a table")
    for cname, value in raw_constants.items():
        if cname not in inputs:
            raise _fail(toml_path, f"constant {cname!r} is not a graph input")
        try:
            constants[cname] = np.array(value, dtype=inputs[cname].dtype)
        except (TypeError, ValueError, OverflowError) as e:
            raise _fail(toml_path, f"constant {cname!r}: {e}") from None

    fed = {s.input for s in states} | set(constants)
    free = [n for n in inputs if n not in fed]
    input_name = _get(toml, "input", str, None, toml_path)
    if input_name is None:
        if len(free) != 1:
            raise _fail(
                onnx_path,
                f"inputs {free} are not fed by state or constants; "
                "name the chunk input with `input = ...` in model.toml",
            )
        input_name = free[0]
    if input_name not in inputs or len(free) != 1 or free[0] != input_name:
        raise _fail(toml_path, f"input {input_name!r} must be the one graph input left to feed")
    chunk_input = inputs[input_name]
    if not chunk_input.shape:
        raise _fail(onnx_path, f"input {input_name} is a scalar; it needs a batch axis first")
    if chunk_input.dtype.name not in DTYPE_CODES:
        raise _fail(onnx_path, f"input dtype {chunk_input.dtype} cannot travel on the wire")

    kind = _get(toml, "kind", str, "tensor", toml_path)
    if kind not in KINDS:
        raise _fail(toml_path, f"kind must be one of {KINDS}")
    item_shape = chunk_input.shape[1:]
    sample_rate = _get(toml, "sample_rate", int, None, toml_path)
    chunk = _get(toml, "chunk", int, None, toml_path)
    context = _get(toml, "context", int, 0, toml_path)
    if kind == "audio":
        if sample_rate is None or sample_rate <= 0:
            raise _fail(toml_path, "an audio model needs sample_rate")
        if chunk is None:
            fixed = [d for d in item_shape if d is not None]
            if len(fixed) != len(item_shape) or math.prod(fixed) <= context:
                raise _fail(toml_path, "an audio model with a dynamic input needs chunk")
            chunk = math.prod(fixed) - context
        if chunk <= 0 or context < 0:
            raise _fail(toml_path, "chunk must be positive and context not negative")
        known = [d for d in item_shape if d is not None]
        if len(item_shape) - len(known) > 1 or (
            len(known) == len(item_shape) and math.prod(known) != chunk + context
        ):
            raise _fail(
                toml_path, f"input shape {list(item_shape)} cannot hold {chunk}+{context} samples"
            )
        if not np.issubdtype(chunk_input.dtype, np.floating):
            raise _fail(onnx_path, "an audio model's input must be floating point")
    elif any(d is None for d in item_shape):
        raise _fail(
            onnx_path, f"input {input_name} has dynamic dims {list(item_shape)} besides batch"
        )

    state_outputs = {s.output for s in states}
    max_batch = _get(toml, "max_batch", int, 32, toml_path)
    if chunk_input.shape[0] is not None:
        max_batch = chunk_input.shape[0]  # a fixed batch axis: the graph decides
    max_delay = _get(toml, "max_delay_ms", (int, float), 2.0, toml_path)
    deadline = _get(toml, "deadline_ms", (int, float), 200.0, toml_path)
    if max_batch < 1 or max_delay < 0 or deadline <= 0:
        raise _fail(toml_path, "max_batch >= 1, max_delay_ms >= 0 and deadline_ms > 0 please")
    model_outputs = tuple(o for o in runner.outputs if o.name not in state_outputs)
    timebase = (
        events.Timebase(sample_rate, chunk, context) if kind == "audio" else events.Timebase()
    )
    raw_post = toml.get("postprocess", [])
    if not isinstance(raw_post, list) or not all(isinstance(t, dict) for t in raw_post):
        raise _fail(toml_path, "postprocess must be an array of tables ([[postprocess]])")
    infos = [events.OutputInfo(o.name, o.shape[1:]) for o in model_outputs]
    postprocess = []
    for table in raw_post:
        try:
            postprocess.append(events.build(table, infos, timebase))
        except events.ConfigError as e:
            raise _fail(toml_path, str(e)) from None
    return Model(
        name=name,
        version=version,
        path=onnx_path,
        description=_get(toml, "description", str, "", toml_path).strip(),
        kind=kind,
        input=chunk_input,
        item_shape=item_shape,
        outputs=model_outputs,
        states=tuple(states),
        constants=constants,
        sample_rate=sample_rate,
        chunk=chunk,
        context=context,
        max_batch=max_batch,
        max_delay_ms=float(max_delay),
        deadline_ms=float(deadline),
        runner=runner,
        postprocess=tuple(postprocess),
        event_types=tuple(e for table in raw_post for e in events.EVENTS[table["kind"]]),
    )


class ModelRepository:
    """Every loaded model version, by name and version, with each name's default version."""

    def __init__(self, models: list[Model]) -> None:
        self._by_name: dict[str, dict[str, Model]] = {}
        for m in models:
            self._by_name.setdefault(m.name, {})[m.version] = m
        #: What :meth:`catalog` returns until a version is added or removed.
        self._catalog: list[dict[str, Any]] | None = None

    def get(self, name: str, version: str | None = None) -> Model | None:
        """The named version, or the name's default (highest) version; None if absent."""
        versions = self._by_name.get(name)
        if not versions:
            return None
        if version is None:
            version = max(versions, key=_version_order)
        return versions.get(version)

    def add(self, model: Model) -> None:
        """Make a new version available; it is its name's default if its version is highest."""
        self._by_name.setdefault(model.name, {})[model.version] = model
        self._catalog = None

    def remove(self, name: str, version: str) -> Model | None:
        """Take a version out of the catalog: new streams can no longer open it."""
        versions = self._by_name.get(name, {})
        model = versions.pop(version, None)
        if not versions:
            self._by_name.pop(name, None)
        self._catalog = None
        return model

    def has_name(self, name: str) -> bool:
        """Whether any version of ``name`` is loaded."""
        return name in self._by_name

    def __iter__(self) -> Any:
        for versions in self._by_name.values():
            yield from versions.values()

    def catalog(self) -> list[dict[str, Any]]:
        """Every model version as the welcome message lists it, sorted by name then version.

        Built once per change of the catalog and shared (every welcome lists it: building it
        was ~9 % of a new session's CPU); read it, do not modify it."""
        if self._catalog is not None:
            return self._catalog
        out = []
        for name in sorted(self._by_name):
            versions = self._by_name[name]
            default = self.get(name)
            for v in sorted(versions, key=_version_order):
                out.append(versions[v].catalog_entry(versions[v] is default))
        self._catalog = out
        return out


def scan(root: Path, options: RuntimeOptions | None = None) -> list[Model]:
    """Load every ``root/<name>/<version>/model.onnx``; a broken one raises naming its file."""
    return [load_model(name, version, folder, options) for name, version, folder in versions(root)]


def versions(root: Path) -> list[tuple[str, str, Path]]:
    """Every ``(name, version, folder)`` under ``root``, checked for well-formed names."""
    if not root.is_dir():
        raise ModelLoadError(f"{root}: model folder does not exist")
    found = []
    for name_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not _NAME.match(name_dir.name):
            raise ModelLoadError(f"{name_dir}: model names are letters, digits, '_', '.', '-'")
        dirs = [p for p in name_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if not dirs:
            raise ModelLoadError(
                f"{name_dir}: no version folders (expected {name_dir}/1/model.onnx)"
            )
        for version_dir in sorted(dirs):
            if not _NAME.match(version_dir.name):
                raise ModelLoadError(f"{version_dir}: versions are letters, digits, '_', '.', '-'")
            found.append((name_dir.name, version_dir.name, version_dir))
    return found
