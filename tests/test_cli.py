"""The ``realtime`` command as a person runs it: serve, stream a WAV file, stop with SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED, double_graph, needs_shared, write_model


class Served:
    """A ``realtime serve`` subprocess on an ephemeral port."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "realtime", "serve", "--port", "0", *args],
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
    r = stream(str(clip), "--model", "speech_activity", "--url", served.url, "--fast")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    results = [ln for ln in lines if re.match(r"seq +\d+ ", ln)]
    n_chunks = -(-129_600 // 320)  # 8.10 s at 16 kHz in 20 ms chunks
    assert lines[0].startswith("streaming speech_16k.wav (8.10 s, 16000 Hz) to speech_activity@1")
    assert len(results) == n_chunks
    assert [int(ln.split()[1]) for ln in results] == list(range(n_chunks))
    assert all("speech_prob=" in ln and "error" not in ln for ln in results)
    assert lines[-1] == (
        f"end of stream: {n_chunks} results, 0 errors (server: {n_chunks} results, 0 errors)"
    )
    code, err = served.stop()
    assert code == 0, err
    assert "event=shutdown" in err


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
