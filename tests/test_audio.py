"""The re-chunker: what a model sees does not depend on how the client cut its audio."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime.audio import Rechunker


def _cuts(total: int, sizes: list[int]) -> list[tuple[int, int]]:
    """Consecutive [a, b) spans covering ``total`` samples, cycling through ``sizes``."""
    spans, a, i = [], 0, 0
    while a < total:
        b = min(total, a + sizes[i % len(sizes)])
        spans.append((a, b))
        a, i = b, i + 1
    return spans


def _feed(
    r: Rechunker, x: np.ndarray[Any, Any], sizes: list[int], rate: int, t0: float = 0.0
) -> tuple[list[np.ndarray[Any, Any]], list[float], list[int]]:
    """Push ``x`` in chunks; the windows, their times, and how many each chunk completed."""
    windows: list[np.ndarray[Any, Any]] = []
    times: list[float] = []
    per_chunk = []
    for a, b in _cuts(len(x), sizes):
        out = r.push(x[a:b], t0 + 1000.0 * a / rate)
        windows += out.data
        times += out.t.tolist()
        per_chunk.append(len(out.data))
    return windows, times, per_chunk


_PCM = np.random.default_rng(1).integers(-30000, 30000, 4000).astype(np.int16)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 700), min_size=1, max_size=6))
def test_rechunking_does_not_change_what_the_model_sees(sizes: list[int]) -> None:
    whole = Rechunker(16000, "int16", 16000, 512, 64)
    expected, expected_t, _ = _feed(whole, _PCM, [len(_PCM)], 16000)
    got, got_t, per_chunk = _feed(Rechunker(16000, "int16", 16000, 512, 64), _PCM, sizes, 16000)
    assert len(got) == len(expected) == (len(_PCM) - 0) // 512
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    assert got_t == expected_t == [1000.0 * i * 512 / 16000 for i in range(len(got))]
    assert sum(per_chunk) == len(got)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 2000), min_size=1, max_size=5))
def test_resampled_windows_do_not_depend_on_chunking(sizes: list[int]) -> None:
    x = np.random.default_rng(2).standard_normal(12000).astype(np.float32) * 0.2
    expected, expected_t, _ = _feed(Rechunker(48000, "float32", 16000, 320, 0), x, [480], 48000)
    got, got_t, _ = _feed(Rechunker(48000, "float32", 16000, 320, 0), x, sizes, 48000)
    n = min(len(got), len(expected))  # the resampler's latency may hold back the last window
    assert n >= len(expected) - 1 and len(expected) >= 9  # about 21 ms of filter latency
    for a, b in zip(got[:n], expected[:n], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert got_t[:n] == expected_t[:n]


def test_windows_carry_context_and_pcm_scaling() -> None:
    r = Rechunker(8000, "uint8", 8000, 4, 2)
    out = r.push(np.array([128, 192, 64, 128, 0, 255], np.uint8), 100.0)
    assert len(out.data) == 1 and out.t.tolist() == [100.0]
    np.testing.assert_array_equal(out.data[0], [0, 0, 0, 0.5, -0.5, 0])
    out = r.push(np.array([128, 128], np.uint8), 100.75)
    np.testing.assert_array_equal(out.data[0], [-0.5, 0, -1, 255 / 128 - 1, 0, 0])
    assert out.t.tolist() == [100.5]  # 4 samples at 8 kHz after the first


def test_a_resampled_tone_keeps_its_pitch_and_timing() -> None:
    rate = 48000
    t = np.arange(rate) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    tone[: rate // 2] = 0  # silence, then the tone from 500 ms
    windows, times, _ = _feed(Rechunker(rate, "float32", 16000, 1600, 0), tone, [128], rate)
    level = [float(np.abs(w).max()) for w in windows]
    first_loud = times[next(i for i, v in enumerate(level) if v > 0.25)]
    assert first_loud == 500.0  # the 100 ms window starting at 500 ms is the first with the tone
    spectrum = np.abs(np.fft.rfft(windows[-1]))
    assert abs(float(np.argmax(spectrum)) * 16000 / 1600 - 440) <= 10


def test_end_of_segment_pads_a_last_window_and_keeps_the_client_timeline() -> None:
    r = Rechunker(16000, "float32", 16000, 320, 0)
    out = r.push(np.ones(500, np.float32), 1000.0, end_of_segment=True)
    assert out.t.tolist() == [1000.0, 1020.0]
    np.testing.assert_array_equal(out.data[1][:180], 1.0)
    np.testing.assert_array_equal(out.data[1][180:], 0.0)
    assert r.pending == 0
    # The next segment starts where the client's samples ended (500 samples = 31.25 ms), not
    # after the padding.
    out = r.push(np.ones(320, np.float32), 1031.25)
    assert out.t.tolist() == [1031.25]


def test_a_chunk_completing_no_window_gets_none() -> None:
    r = Rechunker(16000, "int16", 16000, 512, 64)
    assert r.push(np.zeros(100, np.int16), 0.0).data == []
    assert r.push(np.zeros(0, np.int16), 6.25).data == []
    assert r.pending == 100


def test_a_long_chunk_costs_what_its_header_says_and_its_memory_is_given_back() -> None:
    r = Rechunker(1000, "uint8", 16000, 320, 0)
    assert r.decoded(1000) == 16000  # known before decoding: 16 model samples per byte
    small = r._buf.nbytes
    windows = r.push(np.full(5000, 128, np.uint8), 0.0)  # 80 000 samples at 16 kHz
    assert len(windows.data) >= 200  # 250 less the resampling filter's delay
    assert r._buf.nbytes == small and r._scratch.nbytes <= small
    assert r.decoded(0) == r.pending < 320


def test_a_pickled_rechunker_goes_on_as_if_never_moved_and_pickles_small() -> None:
    """A session's checkpoint holds its streams' re-chunkers: only the samples they hold."""
    import pickle

    whole = Rechunker(16000, "int16", 16000, 512, 64)
    moved = Rechunker(16000, "int16", 16000, 512, 64)
    a, _, _ = _feed(whole, _PCM, [300], 16000)
    b, _, _ = _feed(moved, _PCM[:2100], [300], 16000)
    data = pickle.dumps(moved)
    assert len(data) < 4 * (512 + 64) + 1000  # not its buffers' spare room
    moved = pickle.loads(data)
    c, _, _ = _feed(moved, _PCM[2100:], [300], 16000, t0=1000.0 * 2100 / 16000)
    assert len(a) == len(b) + len(c)
    for x, y in zip(a, b + c, strict=True):
        np.testing.assert_array_equal(x, y)
