"""The ``realtime`` command as a person runs it: serve, stream a WAV file, stop with SIGTERM."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soxr

from tests.conftest import REPO, SHARED, double_graph, needs_shared, read_clip, write_model


class Served:
    """A ``realtime serve`` subprocess on an ephemeral port."""

    def __init__(self, *args: str, processes: int | None = 1) -> None:
        # One process unless a test is about several (None: the default, one per core).
        more = () if processes is None else ("--processes", str(processes))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "realtime", "serve", "--port", "0", *more, *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()  # blocks until the server is listening (or died)
        match = re.search(r"on (ws://\S+)", first)
        if match is None:
            self.proc.kill()
            raise AssertionError(f"no URL in {first!r}; stderr: {self.proc.stderr.read()}")  # type: ignore[union-attr]
        self.url = match.group(1)
        self.banner = [first]

    def stop(self) -> tuple[int, str]:
        """SIGTERM, as a supervisor would; returns the exit code and stderr."""
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err


@pytest.fixture
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    server = Served(*getattr(request, "param", ()))
    yield server
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait()


#: Stream a file as fast as the server takes it, every chunk wanted (no deadline shedding).
FAST = ("--fast", "--deadline-ms", "60000")


def stream(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "realtime", "stream", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@needs_shared
def test_stream_prints_one_result_per_chunk_and_the_end(served: Served) -> None:
    clip = SHARED / "data" / "speech_16k.wav"
    # A long deadline: on a busy machine --fast's 320 ms in flight would miss 100 ms; this test
    # is about what the command prints.
    r = stream(str(clip), "--model", "speech_activity", "--url", served.url, *FAST)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    results = [ln for ln in lines if re.match(r"seq +\d+ ", ln)]
    n_chunks = -(-129_600 // 320)  # 8.10 s at 16 kHz in 20 ms chunks
    assert lines[0].startswith("streaming speech_16k.wav (8.10 s, 16000 Hz) to speech_activity@1")
    assert len(results) == n_chunks
    assert [int(ln.split()[1]) for ln in results] == list(range(n_chunks))
    assert all("speech_prob=" in ln and "error" not in ln for ln in results)
    events = [ln.split()[:3] for ln in lines if re.match(r" +\d+\.\d{3} s  speech_", ln)]
    assert [e[2] for e in events] == ["speech_start", "speech_end"] * 2
    assert lines[-1] == (
        f"end of stream: {n_chunks} results, 0 errors (server: {n_chunks} results, 0 errors)"
    )
    code, err = served.stop()
    assert code == 0, err
    assert "event=shutdown" in err


@needs_shared
@pytest.mark.parametrize("served", [("--models", str(REPO / "examples" / "models"))], indirect=True)
def test_stream_any_rate_prints_events_only(served: Served, tmp_path: Path) -> None:
    pcm, rate = read_clip("speech_16k.wav")
    resampled = soxr.resample(pcm.astype(np.float32) / 32768, rate, 44100)
    path = tmp_path / "speech_44k.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(44100)
        w.writeframes((resampled * 32767).astype("<i2").tobytes())
    r = stream(str(path), "--model", "silero_vad", "--url", served.url, *FAST, "--events-only")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("streaming speech_44k.wav (8.10 s, 44100 Hz) to silero_vad@1")
    assert not [ln for ln in lines if ln.startswith("seq")]
    events = [ln.split() for ln in lines[1:-1]]
    assert [e[2] for e in events] == ["speech_start", "speech_end"] * 2
    times = [float(e[0]) for e in events]
    assert all(abs(a - b) <= 0.15 for a, b in zip(times, [1.01, 2.99, 4.93, 6.71], strict=True))
    assert lines[-1].startswith("end of stream: 405 results, 0 errors")


def test_sigterm_stops_the_server_cleanly(served: Served) -> None:
    assert served.url.startswith("ws://127.0.0.1:")
    code, err = served.stop()
    assert code == 0, err
    assert "Traceback" not in err


def test_a_bad_model_folder_is_one_clear_line(tmp_path: Path) -> None:
    write_model(tmp_path, "good", double_graph())
    bad = tmp_path / "bad" / "1"
    bad.mkdir(parents=True)
    (bad / "model.onnx").write_bytes(b"\x08\x07garbage")
    r = subprocess.run(
        [sys.executable, "-m", "realtime", "serve", "--no-builtin", "--models", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert f"model_load_failed: {bad / 'model.onnx'}: ONNX Runtime cannot load it" in r.stderr


def test_stream_reports_an_unreadable_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF....not a wav")
    r = stream(str(junk), "--url", "ws://127.0.0.1:9/")
    assert (
        r.returncode == 2 and "cannot read as PCM WAV" in r.stderr and "Traceback" not in r.stderr
    )


@pytest.mark.parametrize("served", [("--log-format", "json")], indirect=True)
def test_json_logs_are_one_object_per_line_with_the_fields(served: Served) -> None:
    code, err = served.stop()
    assert code == 0, err
    records = [json.loads(line) for line in err.splitlines()]
    events = [r.get("event") for r in records]
    assert events[:2] == ["warm", "listening"] and "shutdown" in events
    assert all(r["level"] == "info" and r["logger"] == "realtime" for r in records)
    assert records[1]["url"] == served.url
