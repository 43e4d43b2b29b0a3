"""The Open Inference Protocol (KServe v2, as Triton speaks it) without I/O.

Requests arrive over REST (JSON, with the binary tensor extension) or gRPC; both become one
:class:`InferRequest` holding numpy arrays, checked here against the model's spec, and leave as
one :class:`InferResponse`. What a model looks like to an OIP client is one input (the graph
input the model's chunks feed, with a variable batch axis) and its outputs; recurrent state and
constant inputs stay inside the server. An audio model takes its raw windows (``chunk +
context`` samples at the model's rate, float): resampling, re-chunking and events belong to
WebSocket streams. Every refusal is a :class:`realtime.errors.RealtimeError` leaf; its code picks
the HTTP status (:data:`HTTP_STATUS`) and the gRPC status (``realtime.oip_grpc``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from realtime import errors
from realtime.models.spec import Model

#: OIP datatypes -> numpy dtypes (little-endian on the wire), for every dtype a model may take.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("uint8"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("int8"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_NAMES: dict[str, str] = {dt.name: name for name, dt in DATATYPES.items()}
#: What the model metadata calls every model's platform.
PLATFORM = "onnxruntime_onnx"
#: The protocol extensions served (``GET /v2``).
EXTENSIONS = ("binary_tensor_data", "sequence", "realtime_deadline")

#: HTTP status of each error code (the body is ``{"error": message, "code": code}``).
HTTP_STATUS: dict[str, int] = {
    "bad_message": 400,
    "bad_frame": 400,
    "bad_sequence": 400,
    "dtype_mismatch": 400,
    "shape_mismatch": 400,
    "non_finite_input": 400,
    "kind_mismatch": 400,
    "unsupported_sample_rate": 400,
    "stream_not_open": 400,
    "stream_already_open": 400,
    "too_many_streams": 429,
    "message_too_big": 413,
    "unknown_model": 404,
    "unknown_version": 404,
    "model_forbidden": 403,
    "rate_limited": 429,
    "overloaded": 503,
    "going_away": 503,
    "server_busy": 503,
    "deadline_exceeded": 504,
    "inference_failed": 500,
    "internal_error": 500,
}


def datatype(dtype: np.dtype[Any]) -> str:
    """The OIP datatype name of a numpy dtype."""
    return _NAMES[dtype.name]


def dims(shape: tuple[int | None, ...]) -> list[int]:
    """A shape as OIP metadata writes it: -1 for a variable dimension."""
    return [-1 if d is None else d for d in shape]


def server_metadata(version: str) -> dict[str, Any]:
    """``GET /v2``: who serves, and which protocol extensions."""
    return {"name": "realtime", "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(model: Model, versions: list[str]) -> dict[str, Any]:
    """``GET /v2/models/{name}[/versions/{v}]``: the model's one input and its outputs, each
    with a variable batch axis first."""
    return {
        "name": model.name,
        "versions": versions,
        "platform": PLATFORM,
        "inputs": [
            {
                "name": model.input.name,
                "datatype": datatype(model.input.dtype),
                "shape": [-1, *dims(model.item_shape)],
            }
        ],
        "outputs": [
            {"name": o.name, "datatype": datatype(o.dtype), "shape": [-1, *dims(o.shape[1:])]}
            for o in model.outputs
        ],
    }


@dataclass(frozen=True, slots=True)
class InferRequest:
    """One infer request, from either door: what to run, on what, and how to answer."""

    model: str
    version: str | None
    id: str
    #: Input name -> array shaped as sent (batch axis first).
    inputs: dict[str, np.ndarray[Any, Any]]
    #: Output names asked for, in order; None: every output.
    outputs: tuple[str, ...] | None = None
    #: REST: outputs to return as binary data (the binary tensor extension); True: all.
    binary: frozenset[str] | bool = False
    sequence_id: int | str | None = None
    sequence_start: bool = False
    sequence_end: bool = False
    #: The request's own deadline (parameter ``deadline_ms``, or Triton's ``timeout`` in us).
    deadline_ms: float | None = None


@dataclass(frozen=True, slots=True)
class InferResponse:
    """An answered request: the model version that ran and each output, batch axis first."""

    model: str
    version: str
    id: str
    outputs: list[tuple[str, np.ndarray[Any, Any]]]
    queue_ms: float
    infer_ms: float
    batch: int


def request_options(
    params: dict[str, Any],
) -> tuple[int | str | None, bool, bool, float | None]:
    """Sequence id, start, end and deadline (ms) from an infer request's parameters."""
    seq = params.get("sequence_id")
    if seq is not None and (
        isinstance(seq, bool) or not isinstance(seq, (int, str)) or seq in (0, "")
    ):
        raise errors.BadMessage("sequence_id must be a non-zero integer or a non-empty string")
    start, end = params.get("sequence_start", False), params.get("sequence_end", False)
    if not isinstance(start, bool) or not isinstance(end, bool):
        raise errors.BadMessage("sequence_start and sequence_end must be booleans")
    if seq is None and (start or end):
        raise errors.BadMessage("sequence_start and sequence_end need a sequence_id")
    deadline = params.get("deadline_ms")
    if deadline is None and params.get("timeout") is not None:
        timeout = params["timeout"]
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
            raise errors.BadMessage("timeout must be a positive integer (microseconds)")
        deadline = timeout / 1000.0
    if deadline is not None and (
        isinstance(deadline, bool)
        or not isinstance(deadline, (int, float))
        or not 0 < deadline <= 60_000
    ):
        raise errors.BadMessage("deadline_ms must be in (0, 60000]")
    return seq, start, end, None if deadline is None else float(deadline)


def model_input(model: Model, request: InferRequest, max_items: int) -> np.ndarray[Any, Any]:
    """The request's one input checked against the model: ``[n, *item_shape]`` of the model's
    dtype, finite, with ``1 <= n <= max_items``."""
    name = model.input.name
    extra = [k for k in request.inputs if k != name]
    if extra or name not in request.inputs:
        raise errors.BadMessage(
            f"{model.key} takes one input, {name!r}; got {sorted(request.inputs)}"
        )
    data = request.inputs[name]
    if data.dtype != model.input.dtype:
        raise errors.DtypeMismatch(
            f"{model.key} takes {datatype(model.input.dtype)}, not {_NAMES.get(data.dtype.name)}"
        )
    want = model.item_shape
    if data.ndim != len(want) + 1 or any(
        w is not None and d != w for d, w in zip(data.shape[1:], want, strict=True)
    ):
        raise errors.ShapeMismatch(
            f"input shaped {list(data.shape)}, {model.key} takes {[-1, *dims(want)]}"
        )
    n = data.shape[0]
    if not 1 <= n <= max_items:
        raise errors.ShapeMismatch(f"batch of {n}: send 1 to {max_items} items a request")
    if data.dtype.kind == "f" and not math.isfinite(data.sum(dtype=np.float64)):
        raise errors.NonFiniteInput("input holds NaN or infinity")
    return data


def requested(model: Model, request: InferRequest) -> list[int]:
    """Indexes into ``model.outputs`` of the outputs to return, in the order asked."""
    names = [o.name for o in model.outputs]
    if request.outputs is None:
        return list(range(len(names)))
    out = []
    for name in request.outputs:
        if name not in names:
            raise errors.BadMessage(f"{model.key} has no output {name!r}; it has {names}")
        out.append(names.index(name))
    return out


# --- REST -------------------------------------------------------------------------------------


def _shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise errors.BadMessage("shape must be a list of non-negative integers")
    return tuple(value)


def _dtype(name: Any) -> np.dtype[Any]:
    dtype = DATATYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        if name == "BYTES" or name == "BF16":
            raise errors.DtypeMismatch(f"no model here takes {name} tensors")
        raise errors.BadMessage(f"unknown datatype {name!r}")
    return dtype


def tensor(dtype: np.dtype[Any], shape: tuple[int, ...], buffer: bytes | memoryview) -> Any:
    """An array over raw little-endian bytes (no copy), checked for size."""
    size = math.prod(shape) * dtype.itemsize
    if len(buffer) != size:
        raise errors.BadMessage(
            f"{len(buffer)} bytes of data for a {dtype.name} tensor shaped {list(shape)} "
            f"({size} bytes)"
        )
    return np.frombuffer(buffer, dtype).reshape(shape)


def decode_rest(
    model: str, version: str | None, body: bytes, header_length: int | None
) -> InferRequest:
    """``POST /v2/models/{model}[/versions/{version}]/infer``: the JSON request, and with
    ``Inference-Header-Content-Length`` the binary tensor data after it."""
    size = len(body) if header_length is None else header_length
    if not 0 <= size <= len(body):
        raise errors.BadMessage(f"Inference-Header-Content-Length {size} exceeds the body")
    try:
        doc = orjson.loads(body[:size])
    except orjson.JSONDecodeError as e:
        raise errors.BadMessage(f"request is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise errors.BadMessage("request must be a JSON object")
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise errors.BadMessage("parameters must be an object")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise errors.BadMessage("inputs must be a non-empty list")
    view = memoryview(body)
    offset = size
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    for entry in raw_inputs:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise errors.BadMessage("each input needs a name")
        dtype, shape = _dtype(entry.get("datatype")), _shape(entry.get("shape"))
        eparams = entry.get("parameters") or {}
        binary_size = eparams.get("binary_data_size") if isinstance(eparams, dict) else None
        if binary_size is not None:
            if not isinstance(binary_size, int) or binary_size < 0:
                raise errors.BadMessage("binary_data_size must be a non-negative integer")
            if offset + binary_size > len(body):
                raise errors.BadMessage("binary data runs past the end of the body")
            array = tensor(dtype, shape, view[offset : offset + binary_size])
            offset += binary_size
        else:
            try:
                array = np.asarray(entry.get("data"), dtype)
            except (TypeError, ValueError, OverflowError) as e:
                raise errors.BadMessage(f"input {entry['name']}: bad data: {e}") from None
            if array.size != math.prod(shape):
                raise errors.BadMessage(
                    f"input {entry['name']}: {array.size} values for shape {list(shape)}"
                )
            array = array.reshape(shape)
        inputs[entry["name"]] = array
    if offset != len(body):
        raise errors.BadMessage(f"{len(body) - offset} bytes after the last input's data")
    outputs: tuple[str, ...] | None = None
    binary: frozenset[str] | bool = params.get("binary_data_output") is True
    raw_outputs = doc.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in raw_outputs
        ):
            raise errors.BadMessage("outputs must be a list of objects with a name")
        outputs = tuple(o["name"] for o in raw_outputs)
        if binary is False:
            binary = frozenset(
                o["name"]
                for o in raw_outputs
                if isinstance(o.get("parameters"), dict) and o["parameters"].get("binary_data")
            )
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise errors.BadMessage("id must be a string")
    seq, start, end, deadline = request_options(params)
    return InferRequest(
        model, version, request_id, inputs, outputs, binary, seq, start, end, deadline
    )


def encode_rest(response: InferResponse, binary: frozenset[str] | bool) -> tuple[bytes, int | None]:
    """The response body, and the length of its JSON part when binary data follows it."""
    outputs = []
    blobs: list[bytes] = []
    for name, array in response.outputs:
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatype(array.dtype),
            "shape": list(array.shape),
        }
        if binary is True or (binary is not False and name in binary):
            blob = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:  # orjson writes the array itself (float32 as float32: 1.6, not 1.600000023841858)
            entry["data"] = np.ascontiguousarray(array).reshape(-1)
        outputs.append(entry)
    head = orjson.dumps(
        {
            "model_name": response.model,
            "model_version": response.version,
            **({"id": response.id} if response.id else {}),
            "parameters": {
                "queue_ms": round(response.queue_ms, 3),
                "infer_ms": round(response.infer_ms, 3),
                "batch": response.batch,
            },
            "outputs": outputs,
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def error_body(exc: errors.RealtimeError) -> bytes:
    """The REST error shape: ``{"error": message, "code": code}``."""
    return orjson.dumps({"error": exc.message, "code": exc.code})
