"""Build the built-in models as plain ONNX graphs: ``python -m realtime.models.build_builtin``.

Each model is signal processing written out in ONNX operators (no trained weights), so that
``realtime serve`` does something real with no flags and no downloads, and anyone can read what it
computes here. The output is deterministic: rebuilding gives identical bytes (a test checks it).

- ``speech_activity`` (audio, 16 kHz, 20 ms chunks): speech probability from loudness, the share
  of spectral power in the speech band and spectral flatness.
- ``pitch`` (audio, 16 kHz, 20 ms hop over a 64 ms window): the YIN fundamental-frequency
  estimator, with its confidence and the (fractional) MIDI note number.
- ``pose`` (tensor, stateful): an alpha-beta filter per VR tracked device (head, left and right
  hand): smoothed pose and a pose predicted a few frames ahead, quaternions kept on one
  hemisphere and normalised.
- ``motion`` (video, stateful): frame differencing on 96x96 RGB frames: how much moved and where,
  brightness and mean colour.

Needs the ``onnx`` package (a test dependency); the server itself only loads the files.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from realtime.models.repository import BUILTIN_DIR

OPSET = 17
IR_VERSION = 8
SAMPLE_RATE = 16000
FLOAT = TensorProto.FLOAT


class GraphBuilder:
    """Appends nodes with generated, stable names; ``build`` returns the finished model."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0

    def input(self, name: str, elem: int, shape: Sequence[int | str]) -> str:
        """Declare a graph input."""
        self.inputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
        return name

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        """A constant tensor (initializer)."""
        self._count += 1
        name = f"c{self._count}"
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        """Append one node and return the name of its (single) output."""
        self._count += 1
        output = out or f"t{self._count}"
        self.nodes.append(
            helper.make_node(op_type, list(inputs), [output], name=f"n{self._count}", **attrs)
        )
        return output

    def output(self, value: str, name: str, elem: int, shape: Sequence[int | str]) -> None:
        """Expose ``value`` as graph output ``name``."""
        self.op("Identity", value, out=name)
        self.outputs.append(helper.make_tensor_value_info(name, elem, list(shape)))

    # Shorthands for the few patterns every graph here uses.
    def slice(self, x: str, start: int, end: int, axis: int) -> str:
        """``x[..., start:end, ...]`` along ``axis``."""
        return self.op(
            "Slice",
            x,
            self.const([start], np.int64),
            self.const([end], np.int64),
            self.const([axis], np.int64),
        )

    def reduce_sum(self, x: str, axes: Sequence[int], keepdims: int = 0) -> str:
        """Sum over ``axes``."""
        return self.op("ReduceSum", x, self.const(list(axes), np.int64), keepdims=keepdims)

    def reduce_mean(self, x: str, axes: Sequence[int], keepdims: int = 0) -> str:
        """Mean over ``axes``."""
        return self.op("ReduceMean", x, axes=list(axes), keepdims=keepdims)

    def db(self, power: str) -> str:
        """``10 * log10(power + 1e-10)``: decibels of a mean power."""
        floored = self.op("Add", power, self.const(1e-10))
        return self.op("Mul", self.op("Log", floored), self.const(10 / math.log(10)))

    def sigmoid_of(self, x: str, centre: float, scale: float) -> str:
        """``sigmoid((x - centre) / scale)``."""
        z = self.op("Div", self.op("Sub", x, self.const(centre)), self.const(scale))
        return self.op("Sigmoid", z)

    def build(self, doc: str) -> onnx.ModelProto:
        """The model, checked by ONNX's own checker."""
        graph = helper.make_graph(
            self.nodes, self.name, self.inputs, self.outputs, self.initializers
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="realtime.models.build_builtin",
            doc_string=doc,
        )
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model, full_check=True)
        return model


# --------------------------------------------------------------------------------------------
# speech_activity

SPEECH_CHUNK = 320  # 20 ms at 16 kHz
SPEECH_BAND_HZ = (300.0, 3400.0)
#: speech_prob = loud * in_band * structured, each a logistic: (centre, scale).
SPEECH_LOUDNESS = (-50.0, 3.0)  # dBFS of the chunk
SPEECH_BAND_SHARE = (0.45, 0.08)  # share of power between 300 and 3400 Hz
SPEECH_FLATNESS = (0.45, 0.07)  # spectral flatness (1 = white noise); speech is well below


def speech_activity() -> tuple[onnx.ModelProto, str]:
    """Per-chunk speech probability and level of 20 ms of 16 kHz audio."""
    n = SPEECH_CHUNK
    g = GraphBuilder("speech_activity")
    audio = g.input("audio", FLOAT, ["batch", n])
    x = g.op("Sub", audio, g.reduce_mean(audio, [1], keepdims=1))  # remove DC
    energy_db = g.db(g.reduce_mean(g.op("Mul", x, x), [1]))

    # Power spectrum of the Hann-windowed chunk, as two matrix products (a real DFT).
    bins = n // 2 + 1
    t = np.arange(n)[:, None]
    k = np.arange(bins)[None, :]
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n))[:, None]
    cos = (window * np.cos(2 * np.pi * t * k / n)).astype(np.float32)
    sin = (window * -np.sin(2 * np.pi * t * k / n)).astype(np.float32)
    re = g.op("MatMul", x, g.const(cos))
    im = g.op("MatMul", x, g.const(sin))
    power = g.op("Add", g.op("Add", g.op("Mul", re, re), g.op("Mul", im, im)), g.const(1e-12))
    total = g.reduce_sum(power, [1])
    freqs = np.arange(bins) * SAMPLE_RATE / n
    band = ((freqs >= SPEECH_BAND_HZ[0]) & (freqs <= SPEECH_BAND_HZ[1])).astype(np.float32)
    share = g.op("Div", g.op("MatMul", power, g.const(band)), total)
    # Flatness over bins 1.. (DC removed): geometric mean / arithmetic mean.
    ac = g.slice(power, 1, bins, 1)
    geo = g.op("Exp", g.reduce_mean(g.op("Log", ac), [1]))
    flatness = g.op("Div", geo, g.reduce_mean(ac, [1]))

    loud = g.sigmoid_of(energy_db, *SPEECH_LOUDNESS)
    in_band = g.sigmoid_of(share, *SPEECH_BAND_SHARE)
    structured = g.op("Sub", g.const(1.0), g.sigmoid_of(flatness, *SPEECH_FLATNESS))
    prob = g.op("Mul", g.op("Mul", loud, in_band), structured)
    g.output(prob, "speech_prob", FLOAT, ["batch"])
    g.output(energy_db, "energy_db", FLOAT, ["batch"])
    doc = (
        "Speech activity of each 20 ms chunk of 16 kHz mono audio. speech_prob in [0, 1] is the "
        "product of three logistic scores: chunk level (centre -50 dBFS), share of spectral "
        "power between 300 and 3400 Hz (centre 0.45) and 1 - spectral flatness (flatness "
        "centre 0.45, so white noise scores low). energy_db is the chunk's level in dBFS "
        "(-100 for digital silence)."
    )
    toml = f'''description = """
{doc}
"""
kind = "audio"
input = "audio"
sample_rate = {SAMPLE_RATE}
chunk = {n}
max_batch = 64
# A batch costs the server ~300 us of CPU whatever its size (the event loop's turn and a
# worker's): at 100 clients, 5 ms batches of ~28 instead of 2 ms batches of ~13 cut the CPU a
# chunk by a quarter, for ~2 ms more latency. Speech events are confirmed after 100 ms anyway.
max_delay_ms = 5.0
deadline_ms = 100

# speech_start / speech_end (docs/protocol.md). The score dips for a chunk or two inside words,
# so speech is confirmed after 100 ms rather than 250.
[[postprocess]]
kind = "speech"
output = "speech_prob"
threshold = 0.5
off_threshold = 0.35
min_speech_ms = 100
min_silence_ms = 300
pad_ms = 30

# partial / final: mean speech_prob and level of each utterance; partials when a stream asks
# (open option partial_ms).
[[postprocess]]
kind = "segments"
segment_by = "speech"
outputs = ["speech_prob", "energy_db"]
reduce = "mean"
'''
    return g.build(doc), toml


# --------------------------------------------------------------------------------------------
# pitch

PITCH_HOP = 320  # 20 ms of new samples per chunk
PITCH_WINDOW = 1024  # 64 ms analysed per chunk (hop + context)
PITCH_MIN_HZ = 55.0  # A1
PITCH_MAX_HZ = 1000.0  # about B5
YIN_THRESHOLD = 0.15
VOICED_CONFIDENCE = 0.5
VOICED_DB = -55.0


def pitch() -> tuple[onnx.ModelProto, str]:
    """YIN fundamental frequency of a 64 ms window, hopped by 20 ms."""
    n = PITCH_WINDOW
    max_lag = int(SAMPLE_RATE / PITCH_MIN_HZ)  # 290
    min_lag = math.ceil(SAMPLE_RATE / PITCH_MAX_HZ)  # 16
    width = n - max_lag  # samples compared at each lag
    g = GraphBuilder("pitch")
    audio = g.input("audio", FLOAT, ["batch", n])
    base = g.slice(audio, 0, width, 1)  # [B, W]
    energy_db = g.db(g.reduce_mean(g.op("Mul", base, base), [1]))

    # YIN difference function d(tau) = sum_n (x[n] - x[n + tau])^2 for tau = 1 .. max_lag.
    lags = np.arange(1, max_lag + 1)
    index = g.op(
        "Add", g.const(lags[:, None], np.int64), g.const(np.arange(width)[None, :], np.int64)
    )
    shifted = g.op("Gather", audio, index, axis=1)  # [B, L, W]
    diff = g.op("Sub", shifted, g.op("Unsqueeze", base, g.const([1], np.int64)))
    d = g.reduce_sum(g.op("Mul", diff, diff), [2])  # [B, L]
    # Cumulative mean normalised difference: d'(tau) = d(tau) * tau / sum_{j<=tau} d(j).
    running = g.op("CumSum", d, g.const(1, np.int64))
    cmnd = g.op(
        "Div",
        g.op("Mul", d, g.const(lags.astype(np.float32))),
        g.op("Add", running, g.const(1e-9)),
    )
    # Lags shorter than the highest pitch are never candidates.
    too_short = np.where(lags < min_lag, 10.0, 0.0).astype(np.float32)
    cmnd = g.op("Add", cmnd, g.const(too_short))

    # YIN's choice: the first dip under the threshold, refined to that dip's minimum; where no
    # lag dips under it, the global minimum.
    below = g.op("Cast", g.op("Less", cmnd, g.const(YIN_THRESHOLD)), to=FLOAT)
    has_dip = g.op("Greater", g.op("ReduceMax", below, axes=[1], keepdims=1), g.const(0.5))
    first = g.op("ArgMax", below, axis=1, keepdims=1)  # first occurrence: first dip
    iota = g.const(np.arange(max_lag), np.int64)
    # The dip's minimum lies within half a period of where it first crosses the threshold.
    upto = g.op("Add", first, g.op("Div", first, g.const(2, np.int64)))
    in_dip = g.op(
        "And",
        g.op("GreaterOrEqual", iota, first),
        g.op("LessOrEqual", iota, g.op("Add", upto, g.const(1, np.int64))),
    )
    dip = g.op("ArgMin", g.op("Where", in_dip, cmnd, g.const(10.0)), axis=1, keepdims=1)
    best = g.op("Where", has_dip, dip, g.op("ArgMin", cmnd, axis=1, keepdims=1))  # [B, 1]

    # Parabolic interpolation around the chosen lag for sub-sample precision.
    before = g.op("Max", g.op("Sub", best, g.const(1, np.int64)), g.const(0, np.int64))
    after = g.op("Min", g.op("Add", best, g.const(1, np.int64)), g.const(max_lag - 1, np.int64))
    a = g.op("GatherElements", cmnd, before, axis=1)
    b = g.op("GatherElements", cmnd, best, axis=1)
    c = g.op("GatherElements", cmnd, after, axis=1)
    curvature = g.op("Add", g.op("Sub", a, g.op("Mul", b, g.const(2.0))), c)
    safe = g.op("Greater", g.op("Abs", curvature), g.const(1e-6))
    shift = g.op(
        "Where",
        safe,
        g.op(
            "Div",
            g.op("Mul", g.op("Sub", a, c), g.const(0.5)),
            g.op("Where", safe, curvature, g.const(1.0)),
        ),
        g.const(0.0),
    )
    shift = g.op("Clip", shift, g.const(-1.0), g.const(1.0))
    lag = g.op("Add", g.op("Add", g.op("Cast", best, to=FLOAT), g.const(1.0)), shift)
    f0 = g.op("Div", g.const(float(SAMPLE_RATE)), lag)  # [B, 1]

    audible = g.op("Greater", energy_db, g.const(VOICED_DB))  # [B]
    squeeze1 = g.const([1], np.int64)
    confidence = g.op(
        "Clip", g.op("Sub", g.const(1.0), g.op("Squeeze", b, squeeze1)), g.const(0.0), g.const(1.0)
    )
    confidence = g.op("Where", audible, confidence, g.const(0.0))
    voiced = g.op("GreaterOrEqual", confidence, g.const(VOICED_CONFIDENCE))
    f0 = g.op("Where", voiced, g.op("Squeeze", f0, squeeze1), g.const(0.0))
    semis = g.op(
        "Mul",
        g.op("Log", g.op("Div", g.op("Max", f0, g.const(1.0)), g.const(440.0))),
        g.const(12 / math.log(2)),
    )
    midi = g.op("Where", voiced, g.op("Add", semis, g.const(69.0)), g.const(0.0))
    g.output(f0, "f0_hz", FLOAT, ["batch"])
    g.output(confidence, "confidence", FLOAT, ["batch"])
    g.output(midi, "midi", FLOAT, ["batch"])
    doc = (
        f"Fundamental frequency of 16 kHz mono audio by YIN (threshold {YIN_THRESHOLD}, "
        f"{PITCH_MIN_HZ:g}-{PITCH_MAX_HZ:g} Hz, parabolic interpolation) over a 64 ms window "
        "hopped by 20 ms chunks. f0_hz and midi (fractional MIDI note number, 69 = A4) are 0 "
        f"where the window is unvoiced: confidence (1 - the YIN dip depth) below "
        f"{VOICED_CONFIDENCE} or level below {VOICED_DB:g} dBFS."
    )
    toml = f'''description = """
{doc}
"""
kind = "audio"
input = "audio"
sample_rate = {SAMPLE_RATE}
chunk = {PITCH_HOP}
context = {n - PITCH_HOP}
max_batch = 32
max_delay_ms = 2.0
deadline_ms = 100

# note_on / note_off (docs/protocol.md): a voiced pitch held for 60 ms is a note, on the nearest
# MIDI number (kept while within 0.75 semitone, so vibrato does not split it).
[[postprocess]]
kind = "notes"
layout = "midi"
output = "midi"
confidence_output = "confidence"
note_threshold = 0.5
frame_threshold = 0.5
min_note_ms = 60
min_gap_ms = 40
'''
    return g.build(doc), toml


# --------------------------------------------------------------------------------------------
# pose

DEVICES = 3  # head, left hand, right hand
POSE = 7  # position x y z (metres), orientation quaternion x y z w


def _normalise_quaternions(g: GraphBuilder, pose: str) -> str:
    """``pose`` [..., 7] with its quaternion part scaled to unit length."""
    position = g.slice(pose, 0, 3, -1)
    q = g.slice(pose, 3, 7, -1)
    norm = g.op("Sqrt", g.op("Add", g.reduce_sum(g.op("Mul", q, q), [-1], 1), g.const(1e-12)))
    return g.op("Concat", position, g.op("Div", q, norm), axis=-1)


def pose() -> tuple[onnx.ModelProto, str]:
    """Alpha-beta filtering and short-term prediction of head and hand poses."""
    g = GraphBuilder("pose")
    z = g.input("pose", FLOAT, ["batch", DEVICES, POSE])
    state = g.input("filter_state", FLOAT, ["batch", DEVICES, 2 * POSE + 1])
    alpha = g.input("alpha", FLOAT, [])
    beta = g.input("beta", FLOAT, [])
    lookahead = g.input("lookahead", FLOAT, [])
    estimate = g.slice(state, 0, POSE, -1)
    velocity = g.slice(state, POSE, 2 * POSE, -1)
    seen = g.slice(state, 2 * POSE, 2 * POSE + 1, -1)  # 0 before the first pose

    # q and -q are the same rotation: flip the measurement onto the estimate's hemisphere.
    zq = g.slice(z, 3, 7, -1)
    dot = g.reduce_sum(g.op("Mul", zq, g.slice(estimate, 3, 7, -1)), [-1], 1)
    sign = g.op("Where", g.op("Less", dot, g.const(0.0)), g.const(-1.0), g.const(1.0))
    z = g.op("Concat", g.slice(z, 0, 3, -1), g.op("Mul", zq, sign), axis=-1)

    predicted = g.op("Add", estimate, velocity)
    residual = g.op("Sub", z, predicted)
    new_estimate = g.op("Add", predicted, g.op("Mul", residual, alpha))
    new_velocity = g.op("Add", velocity, g.op("Mul", residual, beta))
    started = g.op("Greater", seen, g.const(0.5))
    new_estimate = g.op("Where", started, new_estimate, z)
    new_velocity = g.op("Mul", new_velocity, seen)
    ones = g.op("Max", seen, g.const(1.0))
    next_state = g.op("Concat", new_estimate, new_velocity, ones, axis=-1)

    ahead = g.op("Add", new_estimate, g.op("Mul", new_velocity, lookahead))
    shape: list[int | str] = ["batch", DEVICES, POSE]
    g.output(_normalise_quaternions(g, new_estimate), "smoothed", FLOAT, shape)
    g.output(_normalise_quaternions(g, ahead), "predicted", FLOAT, shape)
    g.output(next_state, "next_filter_state", FLOAT, ["batch", DEVICES, 2 * POSE + 1])
    doc = (
        "Head, left-hand and right-hand poses (rows; position x y z in metres, quaternion "
        "x y z w) of a VR rig, one frame per chunk. An alpha-beta filter per component "
        "(alpha 0.5, beta 0.1 by default) gives `smoothed`; `predicted` extrapolates it "
        "`lookahead` frames ahead (2 by default: about 25 ms at 80 Hz) to hide latency. "
        "Quaternions are kept on the filter's hemisphere and normalised; the first frame of "
        "a stream passes through unchanged. The filter state is carried per stream."
    )
    toml = f'''description = """
{doc}
"""
kind = "tensor"
input = "pose"
max_batch = 64
max_delay_ms = 1.0
deadline_ms = 50

[constants]
alpha = 0.5
beta = 0.1
lookahead = 2.0

[[state]]
input = "filter_state"
output = "next_filter_state"
batch_axis = 0
'''
    return g.build(doc), toml


# --------------------------------------------------------------------------------------------
# motion

FRAME = 96
MOTION_PIXEL = 0.04  # a pixel "moved" when its luma changed by more than this (0..1)


def motion() -> tuple[onnx.ModelProto, str]:
    """Frame differencing: how much of a 96x96 RGB frame moved, where, and its colour."""
    g = GraphBuilder("motion")
    frame = g.input("frame", TensorProto.UINT8, ["batch", FRAME, FRAME, 3])
    prev = g.input("prev_luma", FLOAT, ["batch", FRAME, FRAME])
    seen = g.input("frames_seen", FLOAT, ["batch"])
    rgb = g.op("Div", g.op("Cast", frame, to=FLOAT), g.const(255.0))
    luma = g.op("MatMul", rgb, g.const([0.299, 0.587, 0.114]))  # [B, H, W]
    brightness = g.reduce_mean(luma, [1, 2])
    mean_rgb = g.reduce_mean(rgb, [1, 2])  # [B, 3]

    started = g.op("Greater", seen, g.const(0.5))  # [B]
    change = g.op("Abs", g.op("Sub", luma, prev))
    moved = g.op("Cast", g.op("Greater", change, g.const(MOTION_PIXEL)), to=FLOAT)
    motion_share = g.op("Where", started, g.reduce_mean(moved, [1, 2]), g.const(0.0))
    # Where it moved: centroid of the moved pixels in [0, 1] image coordinates (x right, y down).
    grid = (np.arange(FRAME, dtype=np.float32) + 0.5) / FRAME
    count = g.op("Add", g.reduce_sum(moved, [1, 2]), g.const(1e-6))
    x = g.op("Div", g.reduce_sum(g.op("Mul", moved, g.const(grid[None, :])), [1, 2]), count)
    y = g.op("Div", g.reduce_sum(g.op("Mul", moved, g.const(grid[:, None])), [1, 2]), count)
    any_motion = g.op("Greater", motion_share, g.const(0.0))
    unsq = g.const([1], np.int64)
    centre = g.op(
        "Concat", g.op("Unsqueeze", x, unsq), g.op("Unsqueeze", y, unsq), axis=1
    )  # [B, 2]
    centre = g.op("Where", g.op("Unsqueeze", any_motion, unsq), centre, g.const([0.5, 0.5]))

    g.output(motion_share, "motion", FLOAT, ["batch"])
    g.output(centre, "motion_xy", FLOAT, ["batch", 2])
    g.output(brightness, "brightness", FLOAT, ["batch"])
    g.output(mean_rgb, "mean_rgb", FLOAT, ["batch", 3])
    g.output(luma, "next_luma", FLOAT, ["batch", FRAME, FRAME])
    g.output(
        g.op("Min", g.op("Add", seen, g.const(1.0)), g.const(1e6)),
        "next_frames_seen",
        FLOAT,
        ["batch"],
    )
    doc = (
        f"Motion in {FRAME}x{FRAME} RGB uint8 video frames (height, width, channel), one per "
        f"chunk: `motion` is the share of pixels whose luma changed by more than "
        f"{MOTION_PIXEL} since the stream's previous frame (0 on the first frame), "
        "`motion_xy` the centroid of those pixels (x right, y down, 0..1; 0.5 0.5 when "
        "nothing moved), `brightness` the mean luma and `mean_rgb` the mean colour, all 0..1."
    )
    toml = f'''description = """
{doc}
"""
kind = "video"
input = "frame"
max_batch = 16
max_delay_ms = 2.0
deadline_ms = 100

[[state]]
input = "prev_luma"
output = "next_luma"
batch_axis = 0

[[state]]
input = "frames_seen"
output = "next_frames_seen"
batch_axis = 0
'''
    return g.build(doc), toml


BUILDERS = {
    "speech_activity": speech_activity,
    "pitch": pitch,
    "pose": pose,
    "motion": motion,
}


def build_all() -> dict[str, tuple[bytes, str]]:
    """Every built-in model as ``name -> (model.onnx bytes, model.toml text)``."""
    out = {}
    for name, builder in BUILDERS.items():
        model, toml = builder()
        out[name] = (model.SerializeToString(deterministic=True), toml)
    return out


def write_all(root: Path) -> list[Path]:
    """Write ``root/<name>/1/model.onnx`` and ``model.toml`` for every built-in model."""
    written = []
    for name, (onnx_bytes, toml) in build_all().items():
        folder = root / name / "1"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.onnx").write_bytes(onnx_bytes)
        (folder / "model.toml").write_text(toml)
        written.append(folder)
    return written


def main(argv: list[str] | None = None) -> None:
    """Rebuild the built-in models into ``realtime/models/builtin`` (or ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=BUILTIN_DIR)
    args = parser.parse_args(argv)
    for folder in write_all(args.out):
        print(folder)


if __name__ == "__main__":
    main()
