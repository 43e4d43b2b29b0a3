"""The built-in models: rebuilt byte for byte, and each computes what its description says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from realtime.models.build_builtin import BUILDERS, build_all
from realtime.models.repository import BUILTIN_DIR, scan
from tests.conftest import needs_shared, read_clip

RATE = 16000


def test_rebuilding_gives_identical_bytes() -> None:
    built = build_all()
    assert set(built) == {p.name for p in BUILTIN_DIR.iterdir() if p.is_dir()}
    for name, (onnx_bytes, toml) in built.items():
        folder = BUILTIN_DIR / name / "1"
        assert (folder / "model.onnx").read_bytes() == onnx_bytes, (
            f"{name}: committed model differs; run python -m realtime.models.build_builtin"
        )
        assert (folder / "model.toml").read_text() == toml
    assert build_all() == built  # and twice in one process


def test_builtin_folder_loads() -> None:
    models = {m.name: m for m in scan(BUILTIN_DIR)}
    assert set(models) == set(BUILDERS)
    assert models["speech_activity"].kind == "audio" and models["speech_activity"].chunk == 320
    assert models["pitch"].chunk == 320 and models["pitch"].context == 704
    assert models["pose"].kind == "tensor" and models["pose"].item_shape == (3, 7)
    assert models["motion"].kind == "video" and models["motion"].item_shape == (96, 96, 3)
    assert len(models["motion"].states) == 2 and len(models["pose"].states) == 1


def run(name: str, **feeds: Any) -> list[np.ndarray[Any, Any]]:
    session = ort.InferenceSession(str(BUILTIN_DIR / name / "1" / "model.onnx"))
    return session.run(None, feeds)  # type: ignore[no-any-return]


def tone(hz: float, n: int, amplitude: float = 0.5) -> np.ndarray[Any, Any]:
    t = np.arange(n) / RATE
    wave = np.sin(2 * np.pi * hz * t) + 0.4 * np.sin(2 * np.pi * 2 * hz * t + 1.0)
    return (amplitude * wave / 1.4).astype(np.float32)


@needs_shared
def test_speech_activity_tells_speech_from_silence_on_the_clip() -> None:
    pcm, rate = read_clip("speech_16k.wav")
    assert rate == RATE
    n = len(pcm) // 320
    chunks = pcm[: n * 320].reshape(n, 320).astype(np.float32) / 32768
    prob, level = run("speech_activity", audio=chunks)
    mid = np.arange(n) * 0.02 + 0.01
    speech = ((mid > 1.1) & (mid < 2.9)) | ((mid > 5.0) & (mid < 6.6))
    silence = (mid < 0.9) | ((mid > 3.1) & (mid < 4.8)) | (mid > 6.9)
    assert prob[speech].mean() > 0.5 > 0.05 > prob[silence].mean()
    assert np.median(level[silence]) < -80  # the clip's silence is 1-LSB dither
    assert level[speech].max() > -30


def test_speech_activity_scores_noise_and_hum_low() -> None:
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.05, (50, 320)).astype(np.float32)
    hum = np.stack([tone(50, 320, 0.3)] * 4)  # mains hum: loud, but all below the speech band
    quiet = rng.normal(0, 0.0005, (10, 320)).astype(np.float32)  # -66 dBFS
    for chunks in (noise, hum, quiet):
        assert run("speech_activity", audio=chunks)[0].max() < 0.2


@pytest.mark.parametrize("hz", [65.41, 110.0, 261.63, 440.0, 523.25, 880.0])
def test_pitch_finds_the_fundamental(hz: float) -> None:
    f0, confidence, midi = run("pitch", audio=tone(hz, 1024)[None])
    assert f0[0] == pytest.approx(hz, rel=0.005)  # under 9 cents
    assert confidence[0] > 0.9
    assert midi[0] == pytest.approx(69 + 12 * np.log2(hz / 440), abs=0.1)


def test_pitch_is_zero_when_unvoiced() -> None:
    rng = np.random.default_rng(1)
    audio = np.stack([np.zeros(1024, np.float32), rng.normal(0, 0.1, 1024).astype(np.float32)])
    f0, confidence, midi = run("pitch", audio=audio)
    assert list(f0) == [0, 0] and list(midi) == [0, 0]
    assert confidence[0] == 0 and confidence[1] < 0.5


def pose_step(
    poses: np.ndarray[Any, Any], state: np.ndarray[Any, Any], lookahead: float = 2.0
) -> tuple[np.ndarray[Any, Any], ...]:
    smoothed, predicted, new_state = run(
        "pose",
        pose=poses,
        filter_state=state,
        alpha=np.array(0.5, np.float32),
        beta=np.array(0.1, np.float32),
        lookahead=np.array(lookahead, np.float32),
    )
    return smoothed, predicted, new_state


def test_pose_filter_passes_first_frame_then_tracks_and_predicts_motion() -> None:
    identity = np.array([0, 0, 0, 1], np.float32)
    state = np.zeros((1, 3, 15), np.float32)
    frames = []
    for i in range(60):  # the head moves along x at 1 cm per frame; hands stay put
        p = np.zeros((1, 3, 7), np.float32)
        p[0, :, 3:] = identity
        p[0, 0, 0] = 0.01 * i
        frames.append(p)
    smoothed, predicted, state = pose_step(frames[0], state)
    np.testing.assert_allclose(smoothed, frames[0], atol=1e-6)
    for p in frames[1:]:
        smoothed, predicted, state = pose_step(p, state)
    # After settling, the filter tracks a constant velocity without lag and predicts ahead.
    assert smoothed[0, 0, 0] == pytest.approx(0.59, abs=1e-3)
    assert predicted[0, 0, 0] == pytest.approx(0.61, abs=1e-3)
    np.testing.assert_allclose(predicted[0, 1:], frames[-1][0, 1:], atol=1e-6)


def test_pose_quaternions_stay_unit_and_on_one_hemisphere() -> None:
    state = np.zeros((2, 3, 15), np.float32)
    q = np.array([0.1, 0.2, 0.3, 0.9], np.float32)
    q /= np.linalg.norm(q)
    p = np.zeros((2, 3, 7), np.float32)
    p[:, :, 3:] = q
    _, _, state = pose_step(p, state)
    flipped = p.copy()
    flipped[:, :, 3:] = -q  # the same rotation, written on the other hemisphere
    smoothed, predicted, _ = pose_step(flipped, state)
    np.testing.assert_allclose(smoothed[..., 3:], np.broadcast_to(q, (2, 3, 4)), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(predicted[..., 3:], axis=-1), 1, atol=1e-5)


def test_motion_sees_a_moving_square_and_where_it_is() -> None:
    def frame(x0: int) -> np.ndarray[Any, Any]:
        f = np.full((1, 96, 96, 3), 40, np.uint8)
        f[0, 40:56, x0 : x0 + 16] = (250, 200, 10)
        return f

    prev = np.zeros((1, 96, 96), np.float32)
    seen = np.zeros(1, np.float32)
    motion, xy, brightness, rgb, prev, seen = run(
        "motion", frame=frame(10), prev_luma=prev, frames_seen=seen
    )
    assert motion[0] == 0 and list(xy[0]) == [0.5, 0.5] and seen[0] == 1
    _, _, _, _, prev, seen = run("motion", frame=frame(10), prev_luma=prev, frames_seen=seen)
    motion, xy, brightness, rgb, _, _ = run(
        "motion", frame=frame(70), prev_luma=prev, frames_seen=seen
    )
    assert motion[0] == pytest.approx(2 * 16 * 16 / 96**2)  # old and new place of the square
    assert xy[0, 0] == pytest.approx((18 + 78) / 2 / 96, abs=0.01)
    assert xy[0, 1] == pytest.approx(48 / 96, abs=0.01)
    assert 0 < brightness[0] < 1 and rgb[0, 0] > rgb[0, 2]


def test_builder_writes_a_loadable_folder(tmp_path: Path) -> None:
    from realtime.models.build_builtin import write_all

    write_all(tmp_path)
    assert sorted(m.name for m in scan(tmp_path)) == sorted(BUILDERS)
