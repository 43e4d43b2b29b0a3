"""Model folders: what loads, and a clear error naming the file for what does not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from realtime import errors
from realtime.models.repository import ModelRepository, load_model, scan
from tests.conftest import (
    ACCUMULATE_TOML,
    REPO,
    WINDOW_TOML,
    accumulate_graph,
    double_graph,
    needs_shared,
    window_graph,
    write_model,
)


def test_tiny_models_load_with_their_toml(tiny_models: Path) -> None:
    repo = ModelRepository(scan(tiny_models))
    acc = repo.get("accumulate")
    assert acc is not None and acc.kind == "tensor" and acc.item_shape == (3,)
    assert [s.input for s in acc.states] == ["state"] and acc.states[0].initial.shape == (1, 3)
    assert [o.name for o in acc.outputs] == ["total"]  # the state output is not sent
    win = repo.get("window")
    assert win is not None and (win.chunk, win.context, win.sample_rate) == (16, 4, 8000)
    assert win.chunk_shape == (None,)  # audio chunks of any length; re-cut per stream


def test_default_version_is_the_highest(tmp_path: Path) -> None:
    for v in ("1", "2", "10"):
        write_model(tmp_path, "double", double_graph(), version=v)
    repo = ModelRepository(scan(tmp_path))
    default = repo.get("double")
    assert default is not None and default.version == "10"
    assert [(m["version"], m["default"]) for m in repo.catalog()] == [
        ("1", False),
        ("2", False),
        ("10", True),
    ]
    assert repo.get("double", "3") is None and repo.get("nope") is None


def test_the_catalog_is_built_once_and_again_after_a_change(tmp_path: Path) -> None:
    for v in ("1", "2"):
        write_model(tmp_path, "double", double_graph(), version=v)
    models = scan(tmp_path)
    repo = ModelRepository(models[:1])
    first = repo.catalog()
    assert repo.catalog() is first  # every welcome lists it: not rebuilt per session
    repo.add(models[1])
    added = repo.catalog()
    assert [(m["version"], m["default"]) for m in added] == [("1", False), ("2", True)]
    repo.remove("double", "2")
    assert [(m["version"], m["default"]) for m in repo.catalog()] == [("1", True)]


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        ("kind = ", "invalid TOML"),
        ("colour = 'red'", "unknown keys"),
        ("kind = 'smell'", "kind must be one of"),
        ("kind = 'audio'", "needs sample_rate"),
        ("[[state]]\ninput = 'nope'\noutput = 'y'", "must name a graph input"),
        ("[constants]\nnope = 1", "not a graph input"),
        ("input = 'nope'", "one graph input left to feed"),
        ("max_batch = 0", "max_batch >= 1"),
        ("deadline_ms = 'soon'", "deadline_ms must be of type"),
    ],
)
def test_bad_toml_is_refused_naming_the_file(tmp_path: Path, toml: str, fragment: str) -> None:
    folder = write_model(tmp_path, "double", double_graph(), toml)
    with pytest.raises(errors.ModelLoadError, match=fragment) as info:
        load_model("double", "1", folder)
    assert str(folder / "model.toml") in info.value.message or str(folder) in info.value.message


def test_corrupt_onnx_is_refused_naming_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "broken" / "1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"this is not a protobuf")
    with pytest.raises(errors.ModelLoadError, match="ONNX Runtime cannot load it") as info:
        scan(tmp_path)
    assert str(folder / "model.onnx") in info.value.message


def test_layout_problems_are_named(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.ModelLoadError, match="no version folders"):
        scan(tmp_path)
    with pytest.raises(errors.ModelLoadError, match="does not exist"):
        scan(tmp_path / "absent")
    (tmp_path / "empty").rmdir()
    (tmp_path / "two" / "1").mkdir(parents=True)
    with pytest.raises(errors.ModelLoadError, match=r"model\.onnx: no such file"):
        scan(tmp_path)


def test_stateful_and_audio_builders_roundtrip(tmp_path: Path) -> None:
    acc = load_model("a", "1", write_model(tmp_path, "a", accumulate_graph(), ACCUMULATE_TOML))
    out = acc.runner.run({"x": np.ones((2, 3), np.float32), "state": np.ones((2, 3), np.float32)})
    np.testing.assert_array_equal(out[0], np.full((2, 3), 2.0))
    win = load_model("w", "1", write_model(tmp_path, "w", window_graph(), WINDOW_TOML))
    assert win.input.shape == (None, 20)


@needs_shared
def test_the_real_shared_models_load_through_examples() -> None:
    repo = ModelRepository(scan(REPO / "examples" / "models"))
    vad = repo.get("silero_vad")
    assert vad is not None and vad.kind == "audio" and (vad.chunk, vad.context) == (512, 64)
    assert [s.input for s in vad.states] == ["state"] and vad.states[0].initial.shape == (2, 1, 128)
    assert set(vad.constants) == {"sr"} and [o.name for o in vad.outputs] == ["output"]
    pitch = repo.get("basic_pitch")
    assert pitch is not None and pitch.item_shape == (43844, 1)
    assert (pitch.chunk, pitch.context) == (36164, 7680)  # overlapping 2 s windows
    assert len(pitch.outputs) == 3


def test_postprocess_tables_are_checked_and_listed_in_the_catalog(tmp_path: Path) -> None:
    good = WINDOW_TOML + '[[postprocess]]\nkind = "segments"\nreduce = "max"\n'
    write_model(tmp_path, "window", window_graph(), good)
    (model,) = scan(tmp_path)
    assert model.catalog_entry(True)["events"] == ["partial", "final"]
    bad = WINDOW_TOML + '[[postprocess]]\nkind = "speech"\noutput = "nope"\n'
    write_model(tmp_path, "window", window_graph(), bad)
    with pytest.raises(errors.ModelLoadError, match=r"model\.toml: postprocess output = 'nope'"):
        scan(tmp_path)
    write_model(tmp_path, "window", window_graph(), WINDOW_TOML + "[[postprocess]]\nkind = 1\n")
    with pytest.raises(errors.ModelLoadError, match="postprocess kind 1 is not one of"):
        scan(tmp_path)
