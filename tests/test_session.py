"""The pure session: in-flight bounds and what each overflow policy does at them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from realtime import errors
from realtime.models.repository import BUILTIN_DIR, ModelRepository, scan
from realtime.protocol import Chunk, Close, Closed, Hello, Open, Overflow
from realtime.session import Limits, Prediction, Session, Stream, WorkItem


def session(tiny_models: Path, **limits: Any) -> Session:
    s = Session("s1", ModelRepository(scan(tiny_models)), Limits(**limits), "test")
    s.hello(Hello(1))
    return s


def open_double(s: Session, sid: int = 1, overflow: Overflow | None = None) -> Stream:
    s.open_stream(Open(sid, "double", "tensor", "float32", overflow=overflow))
    return s.streams[sid]


def chunk(sid: int, seq: int) -> Chunk:
    return Chunk(sid, seq, float(seq), np.ones(4, np.float32))


def test_overflow_defaults_by_kind(tiny_models: Path) -> None:
    s = session(tiny_models)
    assert open_double(s).overflow == "reject"  # tensors must not be lost
    s.open_stream(Open(2, "window", "audio", "int16", sample_rate=8000))
    assert s.streams[2].overflow == "drop_oldest"  # live media: newer is worth more
    assert open_double(s, 3, "drop_oldest").overflow == "drop_oldest"


def test_reject_refuses_at_the_stream_bound_and_never_asks_for_room(tiny_models: Path) -> None:
    s = session(tiny_models, max_inflight_per_stream=2)
    open_double(s)
    asked: list[Stream] = []

    def make_room(stream: Stream) -> bool:
        asked.append(stream)
        return True

    s.accept(chunk(1, 0), 0.0, make_room)
    s.accept(chunk(1, 1), 0.0, make_room)
    with pytest.raises(errors.Overloaded, match="stream 1 has 2 chunks in flight"):
        s.accept(chunk(1, 2), 0.0, make_room)
    assert not asked and s.inflight == 2


def test_drop_oldest_accepts_when_room_is_made_else_refuses(tiny_models: Path) -> None:
    s = session(tiny_models, max_inflight_per_stream=2)
    stream = open_double(s, overflow="drop_oldest")
    items = [s.accept(chunk(1, seq), 0.0)[0] for seq in range(2)]

    def drop(victim: Stream) -> bool:  # what the server does: the oldest queued gets `dropped`
        assert victim is stream
        s.complete(items[0], errors.Dropped("newer chunk", stream=1, seq=0))
        return True

    (third,) = s.accept(chunk(1, 2), 0.0, drop)
    assert third.seq == 2 and list(stream.pending) == [1, 2]
    with pytest.raises(errors.Overloaded):  # nothing queued to drop (all running): refuse
        s.accept(chunk(1, 3), 0.0, lambda _: False)


def test_the_session_bound_spans_its_streams(tiny_models: Path) -> None:
    s = session(tiny_models, max_inflight_per_stream=8, max_inflight_per_session=3)
    open_double(s, 1)
    open_double(s, 2)
    s.accept(chunk(1, 0), 0.0)
    s.accept(chunk(1, 1), 0.0)
    (item,) = s.accept(chunk(2, 0), 0.0)
    with pytest.raises(errors.Overloaded, match="session has 3 chunks in flight"):
        s.accept(chunk(2, 1), 0.0)
    s.complete(item, Prediction([np.zeros(4, np.float32)], 0.0, 0.0, 1))
    assert s.inflight == 2
    s.accept(chunk(2, 1), 0.0)


def test_outcomes_are_released_in_order_whatever_order_they_come_in(tiny_models: Path) -> None:
    s = session(tiny_models)
    open_double(s)
    items: list[WorkItem] = [s.accept(chunk(1, seq), 0.0)[0] for seq in range(3)]
    ok = Prediction([np.zeros(4, np.float32)], 0.0, 0.0, 1)
    assert s.complete(items[2], ok) == []
    assert s.complete(items[1], errors.Dropped("x", stream=1, seq=1)) == []
    released = s.complete(items[0], ok)
    assert [getattr(m, "seq", None) for m in released] == [0, 1, 2]
    assert s.inflight == 0


def test_abandon_answers_every_unfinished_chunk_in_order(tiny_models: Path) -> None:
    s = session(tiny_models)
    open_double(s)
    items = [s.accept(chunk(1, seq), 0.0)[0] for seq in range(3)]
    done = s.complete(items[1], Prediction([np.zeros(4, np.float32)], 0.0, 0.0, 1))
    assert done == []  # seq 1 waits for seq 0
    out = s.abandon("handed off")
    assert [(type(m).__name__, getattr(m, "code", None), m.seq) for m in out] == [  # type: ignore[attr-defined]
        ("Error", "going_away", 0),
        ("Result", None, 1),
        ("Error", "going_away", 2),
    ]
    assert s.inflight == 0


def test_a_chunk_refused_while_shutting_down_is_not_asked_for_again_on_resume(
    tiny_models: Path,
) -> None:
    s = session(tiny_models)
    stream = open_double(s)
    s.accept(chunk(1, 0), 0.0)
    # refused unchecked (going_away): it is answered, typed
    s.refused(errors.ShuttingDown("shutting down", stream=1, seq=1))
    s.refused(errors.ShuttingDown("shutting down", stream=9, seq=5))  # not open: nothing to note
    assert stream.received == 1 and stream.last_seq == 0
    resumed = s.welcome(replay_from=0).resumed
    assert resumed is not None and resumed["streams"][0]["received"] == 1


def test_open_options_are_checked_against_the_post_processors_and_kept_parsed(
    tiny_models: Path,
) -> None:
    s = session(tiny_models)
    with pytest.raises(errors.BadMessage, match=r"unknown options 'partial_ms'.*reads: none"):
        s.open_stream(Open(1, "double", "tensor", "float32", options={"partial_ms": 5}))
    repository = ModelRepository(scan(BUILTIN_DIR))
    s = Session("s2", repository, Limits(), "test")
    s.hello(Hello(1))
    opened = dict(stream=1, model="speech_activity", kind="audio", dtype="int16")
    with pytest.raises(errors.BadMessage, match=r"unknown options 'x'; .*reads: partial_ms"):
        s.open_stream(Open(**opened, options={"x": 1}))  # type: ignore[arg-type]
    with pytest.raises(errors.BadMessage, match=r"options.partial_ms must be a number in \[0,"):
        s.open_stream(Open(**opened, options={"partial_ms": "soon"}))  # type: ignore[arg-type]
    s.open_stream(Open(**opened, options={"partial_ms": 500}))  # type: ignore[arg-type]
    assert s.streams[1].options == {"partial_ms": 500.0}


def test_an_audio_chunk_is_bounded_by_what_it_decodes_to(tiny_models: Path) -> None:
    """``window`` runs at 8 kHz: a 1 kHz 8-bit chunk brings 8 times its length."""
    s = session(tiny_models, max_audio_chunk_seconds=1.0, max_audio_inflight_seconds=2.0)
    s.open_stream(Open(1, "window", "audio", "uint8", sample_rate=1000))
    with pytest.raises(errors.MessageTooBig, match=r"a chunk may bring at most 1\.0 s"):
        s.accept(Chunk(1, 0, 0.0, np.zeros(1001, np.uint8)), 0.0)
    items = s.accept(
        Chunk(1, 1, 0.0, np.zeros(1000, np.uint8)), 0.0
    )  # 1 s, less the filter's delay
    s.accept(Chunk(1, 2, 0.0, np.zeros(900, np.uint8)), 0.0)
    with pytest.raises(errors.Overloaded, match="s of audio in flight"):
        s.accept(Chunk(1, 3, 0.0, np.zeros(500, np.uint8)), 0.0)
    for item in items:  # the first chunk is answered: its audio no longer counts
        s.complete(item, Prediction([np.zeros(20, np.float32)], 0.0, 0.0, 1))
    s.accept(Chunk(1, 4, 0.0, np.zeros(500, np.uint8)), 0.0)


def test_closed_counts_refusals_sent_while_the_stream_was_open(tiny_models: Path) -> None:
    s = session(tiny_models)
    open_double(s)
    (item,) = s.accept(chunk(1, 0), 0.0)
    for exc in [
        errors.ShapeMismatch("x", stream=1, seq=1),
        errors.BadFrame("x", stream=1, seq=2),
        errors.BadFrame("no stream"),  # names no stream: no stream's count
        errors.ShapeMismatch("x", stream=2, seq=0),  # not open: nobody's
    ]:
        s.refused(exc)
    s.close_stream(Close(1))
    s.refused(errors.StreamNotOpen("closing", stream=1, seq=3))
    out = s.complete(item, Prediction([np.zeros(4, np.float32)], 0.0, 0.0, 1))
    assert out[-1] == Closed(1, 1, 3)
    s.refused(errors.StreamNotOpen("closed", stream=1, seq=4))  # after closed: not counted


def test_an_audio_chunk_refused_for_load_keeps_its_place_in_time(tiny_models: Path) -> None:
    s = session(tiny_models, max_inflight_per_stream=1)
    s.open_stream(Open(1, "window", "audio", "int16", sample_rate=8000))
    ramp = np.arange(48, dtype=np.int16)
    (first,) = s.accept(Chunk(1, 0, 100.0, ramp[:16]), 0.0)
    with pytest.raises(errors.Overloaded) as refused:
        s.accept(Chunk(1, 1, 102.0, ramp[16:32]), 0.0)
    assert refused.value.reason == "inflight"
    s.complete(first, Prediction([np.zeros(20, np.float32)], 0.0, 0.0, 1))
    (third,) = s.accept(Chunk(1, 2, 104.0, ramp[32:]), 0.0)
    assert third.t == 104.0  # 32 samples at 8 kHz after the first: a gap, not a shift
    np.testing.assert_array_equal(third.inputs * 32768, ramp[28:48])  # its context is real audio


def test_an_audio_streams_media_clock_comes_from_its_samples_not_its_t(tiny_models: Path) -> None:
    """Admission control's lateness needs a clock the client cannot get wrong: the stream's
    samples at its rate. The least (arrival - media time) is the stream's clock offset."""
    s = session(tiny_models)
    s.open_stream(Open(1, "window", "audio", "int16", sample_rate=8000))
    stream = s.streams[1]
    pcm = np.zeros(16, np.int16)  # 2 ms at 8 kHz: one window
    (first,) = s.accept(Chunk(1, 0, 0.0, pcm), 1.0)  # t stays 0: it does not matter
    assert first.gather is not None and first.gather.media_ms == pytest.approx(2.0)
    assert stream.clock_min == pytest.approx(1000.0 - 2.0)
    s.accept(Chunk(1, 1, 0.0, pcm), 1.001)  # faster than real time: a new least
    assert stream.media_ms == pytest.approx(4.0)
    assert stream.clock_min == pytest.approx(1001.0 - 4.0)
    (third,) = s.accept(Chunk(1, 2, 0.0, pcm), 1.010)  # 7 ms behind its audio: no new least
    assert third.gather is not None and third.gather.media_ms == pytest.approx(6.0)
    assert stream.clock_min == pytest.approx(997.0)


def test_an_audio_chunk_past_its_deadline_keeps_its_place_in_time_and_clock(
    tiny_models: Path,
) -> None:
    """A chunk older than its deadline when the loop gets to it is refused before any work;
    on an audio stream its samples still count: the windows after it keep their times (a gap,
    not a shift), and the media clock that measures lateness does not fall behind by it."""
    s = session(tiny_models)
    s.open_stream(Open(1, "window", "audio", "int16", sample_rate=8000, deadline_ms=50))
    stream = s.streams[1]
    pcm = np.zeros(160, np.int16)  # 20 ms at 8 kHz

    def send(seq: int, now: float, age: float = 0.0) -> list[WorkItem]:
        return s.accept(Chunk(1, seq, 20.0 * seq, pcm), now, age=age)

    send(0, 1.000)
    with pytest.raises(errors.DeadlineExceeded, match="60 ms old"):
        send(1, 1.080, age=0.06)
    assert stream.received == 1 and stream.last_seq == 0 and s.inflight == 1
    assert stream.media_ms == pytest.approx(40.0)
    items = send(2, 1.061, age=0.001)  # its deadline counts from when its bytes were read
    assert items[0].t == pytest.approx(40.0)  # after the refused chunk's 20 ms
    assert items[0].received == pytest.approx(1.06) and items[0].deadline == pytest.approx(1.11)
    gather = items[0].gather
    assert gather is not None and gather.media_ms == pytest.approx(60.0)
    assert stream.clock_min == pytest.approx(980.0)  # on time: 1060 ms less 60 is no new least
