"""The resume folder: private, each session taken once, expired ones refused and swept."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from realtime import errors, handoff
from realtime.models.repository import ModelRepository, scan
from realtime.protocol import Chunk, Hello, Open
from realtime.session import Limits, Session


def test_the_folder_must_be_private(tmp_path: Path) -> None:
    folder = tmp_path / "sessions"
    handoff.check_dir(folder)
    assert folder.stat().st_mode & 0o777 == 0o700
    folder.chmod(0o777)
    with pytest.raises(errors.ConfigError, match="writable by others"):
        handoff.check_dir(folder)


def test_a_session_round_trips_once_with_its_state(tmp_path: Path, tiny_models: Path) -> None:
    repository = ModelRepository(scan(tiny_models))
    session = Session("s1", repository, Limits(), "test", resume_token="tok")
    session.hello(Hello(1))
    session.open_stream(Open(1, "accumulate", "tensor", "float32"))
    session.open_stream(Open(2, "window", "audio", "int16", sample_rate=16000))  # resampled
    session.streams[1].state[0][:] = 7.0
    session.accept(Chunk(2, 0, 0.0, np.ones(100, np.int16)), 0.0)
    entry = handoff.HandedOff(session, "key", time.time() + 30, 5, 1, [(b"x", True, 0)])
    folder = tmp_path / "sessions"
    handoff.check_dir(folder)
    handoff.write(folder, "tok", handoff.dump(entry))
    assert (os.stat(next(folder.iterdir())).st_mode & 0o777) == 0o600
    data = handoff.take(folder, "tok")
    assert data is not None and handoff.take(folder, "tok") is None  # taken once
    other = ModelRepository(scan(tiny_models))  # the next process's own models
    back = handoff.load(data, other)
    streams = back.session.streams
    assert back.session.repository is other and streams[1].model is other.get("accumulate")
    assert streams[1].state[0].tolist() == [[7.0, 7.0, 7.0]]
    assert (back.written, back.first, back.kept, back.key) == (5, 1, [(b"x", True, 0)], "key")
    rechunker = streams[2].rechunker
    assert rechunker is not None and rechunker.pending == session.streams[2].rechunker.pending  # type: ignore[union-attr]
    rechunker.push(np.ones(400, np.int16), 1.0)  # its resampler was made again
    with pytest.raises(errors.ResumeExpired):
        handoff.load(data, other, now=time.time() + 60)


def test_old_files_are_swept(tmp_path: Path) -> None:
    (tmp_path / ("a" + handoff.SUFFIX)).write_bytes(b"")
    old = tmp_path / ("b" + handoff.SUFFIX)
    old.write_bytes(b"")
    os.utime(old, (time.time() - 100, time.time() - 100))
    assert handoff.sweep(tmp_path, 30) == 1 and [p.name for p in tmp_path.iterdir()] == [
        "a" + handoff.SUFFIX
    ]
