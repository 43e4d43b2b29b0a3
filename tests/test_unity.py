"""The Unity / C# client package (``clients/unity``), compiled with Mono's ``mcs`` and run
against a real ``realtime serve`` process on loopback.

The runtime code that does not touch UnityEngine is compiled as is; the Unity-facing components,
the WebGL transport and the samples are compiled against small stand-ins of the Unity types they
use (``Tests/CI~/UnityStandIns``), so nothing is left uncompiled. ``Tests/CI~/ConsoleCheck.cs``
then plays a Unity app's part through the public API (the speech clip as 48 kHz float stereo in
1024-frame blocks at real-time pace, pose streams, a cut connection, bad opens) and prints what
it saw, one JSON object per line; the assertions are here. ``.ci/run`` installs Debian's
``mono-mcs`` where it is missing and may.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soxr

from realtime import errors
from tests.conftest import REPO, SHARED, read_clip
from tests.test_cli import Served
from tests.test_resume import free_port
from tests.test_web import node_websocket_flags

PACKAGE = REPO / "clients" / "unity"
MCS, MONO = shutil.which("mcs"), shutil.which("mono")
needs_mono = pytest.mark.skipif(
    MCS is None or MONO is None,
    reason="Mono's mcs is not installed (.ci/run installs Debian's mono-mcs as root or sudo -n)",
)
CLIP = SHARED / "data" / "speech_16k.wav"
TRUTH_MS = [(1010.0, 2990.0), (4930.0, 6710.0)]  # ../shared/data/README.md ground truth


def mcs(
    out: Path, sources: list[Path], *refs: Path, target: str = "library", define: str = ""
) -> None:
    # -noconfig: only the assemblies Debian's mono-mcs brings (no mono-devel defaults).
    args = [MCS or "mcs", "-noconfig", "-r:System.dll", "-r:System.Core.dll"]
    args += [f"-target:{target}", "-warnaserror+", f"-out:{out}"]
    args += [f"-r:{r}" for r in refs] + ([f"-define:{define}"] if define else [])
    r = subprocess.run([*args, *map(str, sources)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def cs(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).glob("*.cs"))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every C# file of the package compiled: the runtime, the Unity-facing code (also as a
    WebGL build), the samples, and the console check."""
    out = tmp_path_factory.mktemp("unity")
    dlls = {name: out / f"{name}.dll" for name in ("Realtime", "UnityEngine", "RealtimeUnity")}
    mcs(dlls["Realtime"], cs("Runtime/Core"))  # no UnityEngine reference at all
    mcs(dlls["UnityEngine"], cs("Tests/CI~/UnityStandIns"))
    mcs(dlls["RealtimeUnity"], cs("Runtime/Unity"), dlls["Realtime"], dlls["UnityEngine"])
    webgl = out / "RealtimeUnityWebGL.dll"
    mcs(webgl, cs("Runtime/Unity"), dlls["Realtime"], dlls["UnityEngine"], define="UNITY_WEBGL")
    samples = sorted((PACKAGE / "Samples~").glob("*/*.cs"))
    mcs(out / "Samples.dll", samples, dlls["Realtime"], dlls["UnityEngine"], dlls["RealtimeUnity"])
    exe = out / "ConsoleCheck.exe"
    mcs(exe, cs("Tests/CI~"), dlls["Realtime"], target="exe")
    return {**dlls, "webgl": webgl, "exe": exe}


@pytest.fixture(scope="module")
def run(
    built: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, list[dict[str, Any]]]]:
    """One run of the console check against a real server: its lines, by check."""
    clip_arg = "none"
    if CLIP.is_file():
        clip, rate = read_clip(CLIP.name)
        mono = soxr.resample(clip.astype(np.float32) / 32768, rate, 48000)
        # Unity's audio: 48 kHz float, stereo (left and right unequal, the mean is the clip).
        stereo = np.stack([1.2 * mono, 0.8 * mono], axis=1).astype("<f4")
        path = tmp_path_factory.mktemp("clip") / "speech_48k_stereo.f32"
        stereo.tofile(path)
        clip_arg = str(path)
    server = Served()
    try:
        r = subprocess.run(
            [MONO or "mono", str(built["exe"]), server.url, clip_arg],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=built["exe"].parent,
        )
    finally:
        server.proc.kill()
        server.proc.wait()
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    by_check: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_check.setdefault(line["check"], []).append(line)
    assert "crash" not in by_check, by_check["crash"][0]["error"]
    assert r.returncode == 0 and by_check.get("done"), r.stdout + r.stderr
    yield by_check


@needs_mono
def test_unity_facing_code_and_samples_compile(built: dict[str, Path]) -> None:
    assert all(path.stat().st_size > 0 for path in built.values())


@needs_mono
@pytest.mark.skipif(not CLIP.is_file(), reason=f"{CLIP} (the team's speech clip) is absent")
def test_48k_stereo_speech_at_real_time_pace_gives_speech_events_within_60_ms(
    run: dict[str, list[dict[str, Any]]],
) -> None:
    # Downmixed and resampled to 16 kHz by the client, and downmixed only (48 kHz, the server
    # resamples): the same events either way.
    assert {line["stream"] for line in run["speech"]} == {"resampled_16k", "native_48k"}
    for line in run["speech"]:
        starts = [e["t"] for e in line["events"] if e["event"] == "speech_start"]
        ends = [e["t"] for e in line["events"] if e["event"] == "speech_end"]
        assert len(starts) == len(ends) == 2, line
        for (start, end), (t0, t1) in zip(zip(starts, ends, strict=True), TRUTH_MS, strict=True):
            assert abs(start - t0) <= 60 and abs(end - t1) <= 60, (line["stream"], start, end)
        assert line["errors"] == 0 and line["in_order"], line
        assert line["results"] == line["closed_results"]  # every chunk answered once
        assert not line["off_main_thread"]  # delivered by Pump, on the "main" thread
    (pacing,) = run["pacing"]
    assert pacing["blocks"] == 380  # 8.10 s of 48 kHz audio in 1024-frame blocks
    # No garbage per chunk on the send path (downmix, resample, chunk, frame, queue): nearly
    # every 1024-frame block (two chunks) allocates nothing beyond new pool buffers; the rare
    # exceptions are the send queue and the maps of unanswered chunks growing (slow server).
    assert pacing["blocks_without_garbage"] >= 0.9 * pacing["blocks_measured"], pacing


@needs_mono
def test_pose_stream_json_and_binary_results_agree(run: dict[str, list[dict[str, Any]]]) -> None:
    (pose,) = run["pose"]
    assert pose["json_results"] == pose["binary_results"] == 40 and pose["errors"] == 0
    assert pose["json_in_order"] and pose["binary_in_order"]
    assert pose["output_names"] == ["smoothed", "predicted"]
    assert pose["json_vs_binary_max_diff"] < 1e-6  # JSON floats read back as the same values
    assert pose["first_frame_passthrough_diff"] < 1e-6  # the filter's first frame is the input
    assert pose["prediction_2_ahead_diff_m"] < 1e-3  # constant velocity: predicted 2 frames on
    # The JSON client pumps on its main thread; the binary one asked for worker-thread callbacks.
    assert not pose["json_off_main_thread"] and pose["binary_off_main_thread"]


@needs_mono
def test_a_cut_connection_resumes_with_no_chunk_lost_or_duplicated(
    run: dict[str, list[dict[str, Any]]],
) -> None:
    (resume,) = run["resume"]
    assert resume["connections_cut"] == 1 and resume["resumes"] == 1
    assert resume["answered_before_cut"] < 40
    assert resume["seqs"] == list(range(40)) and resume["errors"] == []
    assert resume["max_diff_vs_uncut"] < 1e-6  # the filter state saw each frame exactly once
    assert (resume["closed_results"], resume["closed_errors"]) == (40, 0)
    assert resume["states"] == ["Resuming", "Online"]


@needs_mono
def test_bad_opens_and_chunks_raise_typed_errors(run: dict[str, list[dict[str, Any]]]) -> None:
    for line in run["bad_open"]:
        assert line["code"] == line["case"], line
        assert line["enum"] == "".join(p.title() for p in line["case"].split("_")), line
        assert line["type"] == "RealtimeException" and not line["retryable"]
    assert len(run["bad_open"]) == 6
    (chunk,) = run["bad_chunk"]
    assert chunk["errors"] == ["shape_mismatch"] and chunk["seqs"] == [0, 1]
    assert chunk["results"] == 1  # the stream goes on after the bad chunk


@needs_mono
def test_json_reader_and_writer_under_a_comma_decimal_culture(
    run: dict[str, list[dict[str, Any]]],
) -> None:
    (line,) = run["json"]
    assert line["culture_writes"] == "0,5"  # the whole check runs in de-DE...
    originals = [  # ...and what goes on the wire is still JSON with decimal points
        {
            "type": "result",
            "outputs": {"y": {"dtype": "float32", "shape": [2], "data": [None, 1.5e-7]}},
        },
        {
            "shape": [None],
            "s": 'café "q" \n',
            "n": -0.25,
            "big": 2**53 - 1,
            "t": True,
            "f": False,
            "z": None,
        },
        [1, 2.0, -300, {"a": []}],
    ]
    assert [json.loads(doc) for doc in line["reparsed"]] == originals
    assert json.loads(line["written"]) == {
        "id": 7,
        "t": 0.5,
        "nan": None,
        "whole": 1020,
        "s": "tab\there",
    }
    assert '"id":7,' in line["written"] and '"whole":1020,' in line["written"]  # no 7.0: ids


@needs_mono
def test_client_resampler_keeps_a_tone_in_gain_and_time(
    run: dict[str, list[dict[str, Any]]],
) -> None:
    # 1 s of a 1 kHz tone at 48 and 44.1 kHz, fed in 937-sample blocks: 16000 samples out, each
    # within 1e-3 of the tone sampled at 16 kHz (no gain change, no delay).
    assert {line["from"] for line in run["resampler"]} == {48000, 44100}
    for line in run["resampler"]:
        assert line["produced"] == 16000 and line["max_error"] < 1e-3, line


@needs_mono
def test_error_codes_are_the_documented_ones(run: dict[str, list[dict[str, Any]]]) -> None:
    doc = (REPO / "docs" / "protocol.md").read_text()
    table = doc[doc.index("## Error codes") : doc.index("## Connection close codes")]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", table, re.M))
    (codes,) = run["codes"]
    assert set(codes["codes"]) == documented
    assert documented <= set(errors.all_codes())


@needs_mono
def test_ping_and_pooled_chunk_buffers(run: dict[str, list[dict[str, Any]]]) -> None:
    (ping,) = run["ping"]
    assert ping["rtt_ms"] > 0
    (pool,) = run["pool"]
    # Every chunk buffer came back to the pool once answered, and far fewer were made than
    # the ~920 chunks sent (about 100 here; a stalled server makes the pool grow to the peak
    # of unanswered chunks, hence the slack).
    assert pool["idle"] == pool["created"] and pool["created"] < 450
    (done,) = run["done"]
    assert done["state"] == "Closed"


def test_every_imported_asset_has_a_meta_and_scenes_reference_package_scripts() -> None:
    # Unity ignores an asset without a .meta in an immutable (git URL) package, and a scene
    # references scripts by the guid in their .meta.
    guids: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*")):
        rel = path.relative_to(PACKAGE)
        hidden = [p for p in rel.parts if p.endswith("~") and p != "Samples~"]
        if hidden or path.suffix == ".meta" or rel.parts == ("Samples~",):
            continue
        meta = path.with_name(path.name + ".meta")
        assert meta.is_file(), f"{rel} has no .meta"
        guid = re.search(r"^guid: ([0-9a-f]{32})$", meta.read_text(), re.M)
        assert guid is not None and guid.group(1) not in guids, rel
        guids[guid.group(1)] = rel
    scenes = sorted(PACKAGE.glob("Samples~/*/*.unity"))
    assert len(scenes) == 3
    for scene in scenes:
        for guid in re.findall(
            r"m_Script: \{fileID: 11500000, guid: ([0-9a-f]{32})", scene.read_text()
        ):
            assert guid in guids and guids[guid].suffix == ".cs", (scene.name, guid)
    manifest = json.loads((PACKAGE / "package.json").read_text())
    assert {s["path"] for s in manifest["samples"]} == {
        str(s.parent.relative_to(PACKAGE)) for s in scenes
    }


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_webgl_jslib_is_valid_javascript(tmp_path: Path) -> None:
    # Emscripten expands {{{ makeDynCall(...) }}} at build time; stand in a call for it here.
    source = (PACKAGE / "Runtime" / "Plugins" / "WebGL" / "RealtimeWebSocket.jslib").read_text()
    js = re.sub(r"\{\{\{ makeDynCall\('\w+', '([\w.]+)'\) \}\}\}", r"(\1)", source)
    script = tmp_path / "lib.js"
    script.write_text(
        "const LibraryManager = {library: {}};\n"
        "function mergeInto(target, lib) { Object.assign(target, lib); }\n"
        "function autoAddDeps() {}\n" + js + "\n"
        "const names = Object.keys(LibraryManager.library).sort();\n"
        "console.log(JSON.stringify(names));\n"
    )
    r = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    names = set(json.loads(r.stdout))
    declared = set(
        re.findall(
            r"static extern \w+ (RealtimeWS_\w+)\(",
            (PACKAGE / "Runtime" / "Unity" / "WebGLTransport.cs").read_text(),
        )
    )
    assert declared and declared <= names  # every DllImport has its JavaScript


@needs_mono
def test_a_restart_hands_the_session_to_the_next_process(
    built: dict[str, Path], tmp_path: Path
) -> None:
    # --resume-dir: SIGTERM once the client has answers in hand and chunks in flight; it
    # follows going_away's resume token and resumes on the next process, same port, by itself.
    args = ("--port", str(free_port()), "--resume-dir", str(tmp_path / "sessions"))
    first = Served(*args)
    second: Served | None = None
    check = subprocess.Popen(
        [MONO or "mono", str(built["exe"]), first.url, "handoff"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert check.stdout is not None
        ready = json.loads(check.stdout.readline())
        assert ready["check"] == "handoff_ready", ready
        first.proc.send_signal(signal.SIGTERM)
        _, err = first.proc.communicate(timeout=60)
        assert first.proc.returncode == 0 and "event=handed_off sessions=1" in err, err
        second = Served(*args)
        out, err = check.communicate(timeout=120)
    finally:
        for proc in (check, first.proc, *(() if second is None else (second.proc,))):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = {line["check"]: line for line in map(json.loads, out.splitlines())}
    assert "crash" not in lines and "done" in lines, out + err
    handoff = lines["handoff"]
    assert handoff["had_token"] and handoff["resumes"] == 1
    assert handoff["seqs"] == list(range(40)) and handoff["errors"] == []
    assert handoff["max_diff_vs_uncut"] < 1e-6
    assert handoff["states"][-2:] == ["Resuming", "Online"]  # (the first connect's may lead)
    assert handoff["states"].count("Resuming") == 1


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_webgl_jslib_talks_to_a_real_server(tmp_path: Path) -> None:
    # The .jslib's JavaScript run as a WebGL build would run it (Node's WebSocket, a stand-in
    # heap), driven as WebGLTransport.cs drives it, against a real server.
    flags = node_websocket_flags()
    if flags is None:
        pytest.skip("this Node.js has no WebSocket (Node 20.10+ with a flag, 22+ built in)")
    source = (PACKAGE / "Runtime" / "Plugins" / "WebGL" / "RealtimeWebSocket.jslib").read_text()
    js = re.sub(r"\{\{\{ makeDynCall\('\w+', '([\w.]+)'\) \}\}\}", r"(\1)", source)
    script = tmp_path / "harness.js"
    harness = (PACKAGE / "Tests" / "CI~" / "JslibHarness.js").read_text()
    script.write_text(harness.replace("// %JSLIB%", js))
    server = Served()
    try:
        r = subprocess.run(
            ["node", *flags, str(script), server.url], capture_output=True, text=True, timeout=60
        )
    finally:
        server.proc.kill()
        server.proc.wait()
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["seen"] == ["open", "welcome", "opened", "timer 7", "close 1000 done"], out
    # Binary results: one frame per output (smoothed, predicted), seq 0; a stream's first
    # pose passes through the filter unchanged.
    assert [(f["type"], f["seq"], f["index"], f["count"]) for f in out["frames"]] == [
        (2, 0, 0, 2),
        (2, 0, 1, 2),
    ]
    assert out["frames"][1]["first"] == [0, 0, 0, 0, 0, 0, 1]
