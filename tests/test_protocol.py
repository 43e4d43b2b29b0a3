"""The pure wire codec: round trips of every message kind, and no crash on any input."""

from __future__ import annotations

import contextlib
import struct
import tracemalloc
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from realtime import errors
from realtime.protocol import (
    DTYPE_CODES,
    HEADER,
    HEADER_SIZE,
    Chunk,
    Close,
    Closed,
    Error,
    Event,
    GoingAway,
    Hello,
    Open,
    Opened,
    Ping,
    Pong,
    Result,
    ResultFrame,
    Timing,
    Welcome,
    decode_frame,
    decode_text,
    encode_frame,
    encode_text,
    result_frames,
)

ids = st.integers(0, 2**32 - 1)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
names = st.text(max_size=40)
json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | finite | names
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=4),
    max_leaves=12,
)
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)
dtypes = st.sampled_from(sorted(DTYPE_CODES))
arrays = dtypes.flatmap(lambda d: hnp.arrays(np.dtype(d), shapes))
#: JSON has no NaN or infinity; results with them travel as null (see the test below).
finite_arrays = dtypes.flatmap(
    lambda d: hnp.arrays(
        np.dtype(d),
        shapes,
        elements={"allow_nan": False, "allow_infinity": False} if d.startswith("float") else None,
    )
)


def timings() -> st.SearchStrategy[Timing]:
    return st.builds(Timing, finite, finite, st.integers(0, 4096))


messages = st.one_of(
    st.builds(Hello, st.just(1), names),
    st.builds(Hello, st.just(1), names, names, st.integers(0, 2**53)),  # a resume
    st.builds(
        Welcome,
        names,
        names,
        st.dictionaries(names, json_values, max_size=3),
        st.lists(st.dictionaries(names, json_values, max_size=3), max_size=3),
        st.just(1),
        st.none() | names,
        st.none() | st.dictionaries(names, json_values, max_size=3),
    ),
    st.builds(
        Open,
        stream=ids,
        model=names,
        kind=st.sampled_from(["audio", "video", "tensor"]),
        dtype=dtypes,
        version=st.none() | names,
        shape=st.none() | st.lists(ids, max_size=8).map(tuple),
        sample_rate=st.none() | st.integers(1, 1_000_000),
        deadline_ms=st.none() | finite,
        results=st.sampled_from(["json", "binary"]),
        options=st.dictionaries(names, json_values, max_size=3),
    ),
    st.builds(
        Opened,
        ids,
        names,
        names,
        st.dictionaries(names, json_values, max_size=3),
        st.lists(st.dictionaries(names, json_values, max_size=3), max_size=3),
        finite,
    ),
    st.builds(Close, ids),
    st.builds(Closed, ids, ids, ids),
    st.builds(Ping, ids, finite),
    st.builds(Pong, ids, finite, finite),
    st.builds(GoingAway, names, finite, st.none() | names),
    st.builds(
        Result,
        ids,
        ids,
        finite,
        st.dictionaries(names, finite_arrays, max_size=3),
        timings(),
    ),
    st.builds(
        Event,
        ids,
        names,
        finite,
        st.dictionaries(
            names.filter(lambda k: k not in ("type", "stream", "event", "t")),
            json_values,
            max_size=3,
        ),
    ),
    st.builds(
        Error,
        names,
        st.text(max_size=200),
        st.none() | ids,
        st.none() | ids,
        st.booleans(),
        st.none() | finite,
        st.none() | st.sampled_from(["inflight", "queue"]),
    ),
)


@given(messages)
@settings(max_examples=300, deadline=None)
def test_every_message_kind_round_trips(msg: Any) -> None:
    assert decode_text(encode_text(msg)) == msg


@given(arrays, ids, ids, finite, st.integers(0, 2**32 - 1), st.integers(0, 2**16 - 1))
@settings(max_examples=200, deadline=None)
def test_chunks_round_trip(
    data: np.ndarray[Any, Any], stream: int, seq: int, t: float, deadline: int, flags: int
) -> None:
    chunk = Chunk(stream, seq, t, data, deadline_ms=deadline, flags=flags)
    assert decode_frame(encode_frame(chunk)) == chunk


@given(arrays, ids, ids, finite, st.integers(0, 255), st.integers(0, 2**32 - 1))
@settings(max_examples=200, deadline=None)
def test_result_frames_round_trip(
    data: np.ndarray[Any, Any], stream: int, seq: int, t: float, index: int, us: int
) -> None:
    frame = ResultFrame(stream, seq, t, data, index, 255, us, us)
    assert decode_frame(encode_frame(frame)) == frame


def test_binary_results_carry_every_output_in_order() -> None:
    outputs = {"a": np.arange(3, dtype=np.float32), "b": np.ones((2, 2), np.int64)}
    msg = Result(4, 9, 12.5, outputs, Timing(1.25, 0.5, 8))
    frames = [decode_frame(f) for f in result_frames(msg)]
    assert [(f.index, f.count, f.seq, f.queue_us, f.infer_us) for f in frames] == [
        (0, 2, 9, 1250, 500),
        (1, 2, 9, 1250, 500),
    ]
    assert all(isinstance(f, ResultFrame) for f in frames)
    np.testing.assert_array_equal(frames[1].data, outputs["b"])


def test_json_results_send_non_finite_values_as_null() -> None:
    out = np.array([1.0, np.nan, np.inf, -np.inf], np.float32)
    wire = encode_text(Result(1, 2, 0.0, {"y": out}, Timing(0.0, 0.0, 1)))
    assert b'"data":[1.0,null,null,null]' in wire
    back = decode_text(wire)
    assert isinstance(back, Result)
    np.testing.assert_array_equal(back.outputs["y"], [1.0, np.nan, np.nan, np.nan])


def test_encoded_frames_hold_no_more_memory_than_their_bytes() -> None:
    # A session keeps its last frames for a resume: orjson's 4 KiB buffer behind a 100-byte
    # result made that 40x the bytes counted against resume_buffer_bytes.
    msg = Result(1, 2, 0.5, {"y": np.arange(4, dtype=np.float32)}, Timing(0.1, 0.2, 3))
    for encode in (lambda: [encode_text(msg)], lambda: result_frames(msg)):
        tracemalloc.start()
        try:
            kept = [encode() for _ in range(200)]
            held = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        size = sum(len(frame) for frames in kept for frame in frames)
        assert held < size + 200 * 250, (held, size)


def test_chunk_payload_is_a_zero_copy_view() -> None:
    buf = encode_frame(Chunk(1, 0, 0.0, np.arange(320, dtype=np.int16)))
    chunk = decode_frame(buf)
    assert isinstance(chunk, Chunk)
    assert chunk.data.base is not None and not chunk.data.flags.owndata
    assert np.shares_memory(chunk.data, np.frombuffer(buf, np.uint8))
    assert chunk.data.ctypes.data % 8 == np.frombuffer(buf, np.uint8).ctypes.data % 8


@given(st.binary(max_size=200))
@settings(max_examples=500, deadline=None)
def test_arbitrary_bytes_raise_only_protocol_errors(buf: bytes) -> None:
    with contextlib.suppress(errors.ProtocolError):
        decode_frame(buf)


@given(st.binary(min_size=HEADER_SIZE, max_size=120))
@settings(max_examples=500, deadline=None)
def test_arbitrary_bytes_behind_a_valid_version_raise_only_protocol_errors(buf: bytes) -> None:
    with contextlib.suppress(errors.ProtocolError):
        decode_frame(b"\x01" + buf[1:])


@given(st.text(max_size=200) | json_values.map(lambda v: orjson.dumps(v).decode()))
@settings(max_examples=500, deadline=None)
def test_arbitrary_text_raises_only_protocol_errors(text: str) -> None:
    with contextlib.suppress(errors.ProtocolError):
        decode_text(text)


@given(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["hello", "open", "close", "ping", "result", "error", "event"])},
        optional={
            k: json_values
            for k in ("stream", "model", "kind", "dtype", "shape", "seq", "id", "outputs", "code")
        },
    )
)
@settings(max_examples=500, deadline=None)
def test_wrong_field_types_raise_only_protocol_errors(d: dict[str, Any]) -> None:
    with contextlib.suppress(errors.ProtocolError):
        decode_text(orjson.dumps(d))


def _header(**kw: Any) -> bytes:
    fields = dict(
        version=1, kind=1, dtype=1, ndim=1, stream=1, seq=0, flags=0, index=0, count=0, t=0.0
    )
    fields.update(kw)
    return HEADER.pack(*fields.values(), 0, 0)


@pytest.mark.parametrize(
    ("buf", "fragment"),
    [
        (b"", "shorter than the 32-byte header"),
        (b"\x01" * 10, "shorter than the 32-byte header"),
        (_header(version=2) + b"\0" * 8, "frame version 2"),
        (_header(dtype=99) + b"\0" * 8, "unknown dtype code 99"),
        (_header(ndim=9) + b"\0" * 40, "at most 8"),
        (_header(ndim=2), "ends inside its dims"),
        (_header() + struct.pack("<I", 4) + b"\0" * 4 + b"\0" * 15, "payload of 15 bytes"),
        (_header(kind=7) + struct.pack("<I", 0) + b"\0" * 4, "unknown frame type 7"),
        (_header(t=float("nan")) + struct.pack("<I", 0) + b"\0" * 4, "timestamp is not finite"),
        # dims multiplying to 0 pass the length check, but overflow numpy (issue 18)
        (_header(ndim=3) + struct.pack("<3I", 0, 2**32 - 1, 2**32 - 1) + b"\0" * 4, "more than"),
    ],
)
def test_malformed_frames_name_the_problem(buf: bytes, fragment: str) -> None:
    with pytest.raises(errors.BadFrame, match=fragment):
        decode_frame(buf)


@pytest.mark.parametrize(
    ("buf", "ids"),
    [
        (b"\x01\x01\x01\x01" + struct.pack("<I", 7), (None, None)),  # ends inside the seq
        (_header(stream=7, seq=9)[:12], (7, 9)),  # truncated after the seq
        (_header(stream=7, seq=9)[:31], (7, 9)),
        (_header(version=2, stream=7, seq=9) + b"\0" * 8, (7, 9)),
        (_header(dtype=99, stream=7, seq=9) + b"\0" * 8, (7, 9)),
        (_header(kind=7, stream=7, seq=9) + struct.pack("<I", 0) + b"\0" * 4, (7, 9)),
    ],
)
def test_bad_frames_name_their_stream_and_seq_when_the_header_got_that_far(
    buf: bytes, ids: tuple[int | None, int | None]
) -> None:
    with pytest.raises(errors.BadFrame) as refused:
        decode_frame(buf)
    assert (refused.value.stream, refused.value.seq) == ids


@pytest.mark.parametrize(
    ("text", "exc", "fragment"),
    [
        ("{", errors.BadMessage, "invalid JSON"),
        ("[1, 2]", errors.BadMessage, 'string "type"'),
        ('{"type": "nope"}', errors.BadMessage, "unknown message type"),
        ('{"type": "hello", "protocol": 7}', errors.UnsupportedVersion, "protocol 7"),
        ('{"type": "open", "stream": 1}', errors.BadMessage, "open.model must be a string"),
        ('{"type": "close", "stream": -1}', errors.BadMessage, "close.stream"),
        ('{"type": "ping", "id": 1, "t": "x"}', errors.BadMessage, "ping.t"),
        ("[" * 5000 + "]" * 5000, errors.BadMessage, "invalid JSON"),
    ],
)
def test_malformed_text_names_the_problem(text: str, exc: type[Exception], fragment: str) -> None:
    with pytest.raises(exc, match=fragment):
        decode_text(text)


@given(
    ndim=st.integers(0, 8),
    dims=st.lists(st.sampled_from([0, 1, 2, 2**16, 2**31, 2**32 - 1]), min_size=8, max_size=8),
    dtype=st.integers(0, 12),
    payload=st.integers(0, 64),
)
@settings(max_examples=500, deadline=None)
def test_header_fields_at_their_limits_raise_only_bad_frame(
    ndim: int, dims: list[int], dtype: int, payload: int
) -> None:
    buf = _header(ndim=ndim, dtype=dtype, stream=2**32 - 1, seq=2**32 - 1)
    buf += struct.pack(f"<{ndim}I", *dims[:ndim]).ljust((4 * ndim + 7) & ~7, b"\0")
    try:
        decode_frame(buf + b"\0" * payload)
    except errors.BadFrame as e:
        assert (e.stream, e.seq) == (2**32 - 1, 2**32 - 1)


@pytest.mark.parametrize(
    "buf",
    [
        _header(stream=5, seq=6)[:12],
        _header(version=2, stream=5, seq=6) + b"\0" * 8,
        _header(kind=7, stream=5, seq=6) + struct.pack("<I", 0) + b"\0" * 4,
    ],
)
def test_bad_frames_name_stream_and_seq_once_the_header_holds_them(buf: bytes) -> None:
    with pytest.raises(errors.BadFrame) as caught:
        decode_frame(buf)
    assert (caught.value.stream, caught.value.seq) == (5, 6)
