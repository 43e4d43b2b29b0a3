"""The pure Open Inference Protocol mapping: REST tensors (JSON and binary), checks, metadata."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from realtime import errors, oip
from realtime.config import Config
from realtime.models.spec import Model
from realtime.server import load_models


@pytest.fixture(scope="module")
def models() -> dict[str, Model]:
    return {m.name: m for m in load_models(Config(graph_cache=None))}


def _request(name: str, array: np.ndarray, **kw: object) -> oip.InferRequest:
    return oip.InferRequest("pose", None, "", {name: array}, **kw)  # type: ignore[arg-type]


def test_metadata_lists_the_one_input_and_the_outputs_with_a_batch_axis(
    models: dict[str, Model],
) -> None:
    meta = oip.model_metadata(models["pose"], ["1"])
    assert meta == {
        "name": "pose",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "pose", "datatype": "FP32", "shape": [-1, 3, 7]}],
        "outputs": [
            {"name": "smoothed", "datatype": "FP32", "shape": [-1, 3, 7]},
            {"name": "predicted", "datatype": "FP32", "shape": [-1, 3, 7]},
        ],
    }
    audio = oip.model_metadata(models["pitch"], ["1"])
    assert audio["inputs"] == [{"name": "audio", "datatype": "FP32", "shape": [-1, 1024]}]
    video = oip.model_metadata(models["motion"], ["1"])
    assert video["inputs"] == [{"name": "frame", "datatype": "UINT8", "shape": [-1, 96, 96, 3]}]


def test_json_and_binary_inputs_decode_to_the_same_array() -> None:
    x = np.arange(42, dtype=np.float32).reshape(2, 3, 7)
    as_json = orjson.dumps(
        {
            "id": "a",
            "inputs": [
                {"name": "pose", "datatype": "FP32", "shape": [2, 3, 7], "data": x.tolist()}
            ],
        }
    )
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "pose",
                    "datatype": "FP32",
                    "shape": [2, 3, 7],
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "smoothed", "parameters": {"binary_data": True}}],
        }
    )
    a = oip.decode_rest("pose", None, as_json, None)
    b = oip.decode_rest("pose", "1", head + x.tobytes(), len(head))
    np.testing.assert_array_equal(a.inputs["pose"], x)
    np.testing.assert_array_equal(b.inputs["pose"], x)
    assert a.id == "a" and a.outputs is None and a.binary is False
    assert b.version == "1" and b.outputs == ("smoothed",) and b.binary == {"smoothed"}


@pytest.mark.parametrize(
    ("body", "header", "code"),
    [
        (b"not json", None, "bad_message"),
        (b"[]", None, "bad_message"),
        (b'{"inputs": []}', None, "bad_message"),
        (
            b'{"inputs": [{"name": "pose", "datatype": "FP32", "shape": [2], "data": [1]}]}',
            None,
            "bad_message",
        ),
        (
            b'{"inputs": [{"name": "pose", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}',
            None,
            "dtype_mismatch",
        ),
        (
            b'{"inputs": [{"name": "pose", "datatype": "FP99", "shape": [1], "data": [1]}]}',
            None,
            "bad_message",
        ),
        (
            b'{"inputs": [{"name": "pose", "datatype": "FP32", "shape": [-1], "data": [1]}]}',
            None,
            "bad_message",
        ),
        (
            b'{"inputs": [{"name": "pose", "datatype": "FP32", "shape": [1], '
            b'"parameters": {"binary_data_size": 8}}]}',
            None,
            "bad_message",
        ),
        (
            b'{"inputs": [{"name": "pose", "datatype": "FP32", "shape": [1], "data": [1]}]}xx',
            77,
            "bad_message",
        ),
        (
            b'{"inputs": [{"name": "pose", "datatype": "FP32", "shape": [1], "data": [1]}],'
            b' "parameters": {"sequence_start": true}}',
            None,
            "bad_message",
        ),
        (
            b'{"inputs": [{"name": "pose", "datatype": "FP32", "shape": [1], "data": [1]}],'
            b' "parameters": {"deadline_ms": 0}}',
            None,
            "bad_message",
        ),
        (
            b'{"inputs": [{"name": "pose", "datatype": "FP32", "shape": [1], "data": [1]}]}',
            999,
            "bad_message",
        ),
    ],
)
def test_malformed_rest_requests_are_refused_typed(
    body: bytes, header: int | None, code: str
) -> None:
    with pytest.raises(errors.RealtimeError) as info:
        oip.decode_rest("pose", None, body, header)
    assert info.value.code == code


def test_request_parameters_give_sequence_and_deadline() -> None:
    assert oip.request_options({}) == (None, False, False, None)
    assert oip.request_options(
        {"sequence_id": 7, "sequence_start": True, "sequence_end": False, "timeout": 25_000}
    ) == (7, True, False, 25.0)
    assert oip.request_options({"sequence_id": "s", "deadline_ms": 40}) == ("s", False, False, 40)
    for bad in ({"sequence_id": 0}, {"sequence_id": True}, {"timeout": -1}, {"deadline_ms": 1e9}):
        with pytest.raises(errors.BadMessage):
            oip.request_options(bad)


def test_the_input_is_checked_against_the_model(models: dict[str, Model]) -> None:
    pose = models["pose"]
    good = np.zeros((2, 3, 7), np.float32)
    assert oip.model_input(pose, _request("pose", good), 8) is good
    cases: list[tuple[oip.InferRequest, type[errors.RealtimeError]]] = [
        (_request("frame", good), errors.BadMessage),
        (_request("pose", good.astype(np.float64)), errors.DtypeMismatch),
        (_request("pose", np.zeros((2, 3, 6), np.float32)), errors.ShapeMismatch),
        (_request("pose", np.zeros((3, 7), np.float32)), errors.ShapeMismatch),
        (_request("pose", np.zeros((0, 3, 7), np.float32)), errors.ShapeMismatch),
        (_request("pose", np.zeros((9, 3, 7), np.float32)), errors.ShapeMismatch),
        (_request("pose", np.full((1, 3, 7), np.nan, np.float32)), errors.NonFiniteInput),
    ]
    for request, exc in cases:
        with pytest.raises(exc):
            oip.model_input(pose, request, 8)
    asked = _request("pose", good, outputs=("predicted", "smoothed"))
    assert oip.requested(pose, asked) == [1, 0]
    with pytest.raises(errors.BadMessage):
        oip.requested(pose, _request("pose", good, outputs=("nope",)))


def test_responses_encode_as_json_or_binary_tensors() -> None:
    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    n = np.array([1, 2], np.int64)
    response = oip.InferResponse("m", "1", "r", [("y", y), ("n", n)], 0.5, 1.25, 4)
    body, size = oip.encode_rest(response, False)
    assert size is None
    doc = orjson.loads(body)
    assert doc["id"] == "r" and doc["model_version"] == "1"
    assert doc["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [2, 3], "data": [0, 1, 2, 3, 4, 5]},
        {"name": "n", "datatype": "INT64", "shape": [2], "data": [1, 2]},
    ]
    body, size = oip.encode_rest(response, frozenset({"y"}))
    assert size is not None
    head = orjson.loads(body[:size])
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 24}
    assert body[size:] == y.tobytes()


def test_every_http_status_belongs_to_a_real_code() -> None:
    codes = errors.all_codes()
    assert set(oip.HTTP_STATUS) <= set(codes)
