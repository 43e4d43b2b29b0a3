"""Shared fixtures: tiny ONNX models built on the spot, real servers on loopback."""

from __future__ import annotations

import asyncio
import threading
import wave
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from loadtest.clients import Records
from realtime.admission import AdmissionPolicy
from realtime.config import Config
from realtime.scheduler import Scheduler
from realtime.server import Server
from realtime.session import Limits, Outcome, Prediction, WorkItem
from tests.chromium import Browser, find_chromium

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
needs_shared = pytest.mark.skipif(
    not (SHARED / "models").is_dir() or not (SHARED / "data").is_dir(),
    reason=f"{SHARED} (the team's real models and clips) is not beside the repo",
)


def write_model(
    root: Path, name: str, graph: onnx.GraphProto, toml: str = "", version: str = "1"
) -> Path:
    """Write ``root/name/version/model.onnx`` (+ model.toml) and return the version folder."""
    folder = root / name / version
    folder.mkdir(parents=True, exist_ok=True)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "model.onnx")
    if toml:
        (folder / "model.toml").write_text(toml)
    return folder


def _vi(name: str, elem: int, shape: list[Any]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def double_graph() -> onnx.GraphProto:
    """A stateless tensor model: y = 2x for x of shape [batch, 4]."""
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    return helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "double",
        [_vi("x", TensorProto.FLOAT, ["batch", 4])],
        [_vi("y", TensorProto.FLOAT, ["batch", 4])],
        [two],
    )


def accumulate_graph() -> onnx.GraphProto:
    """A stateful tensor model: total = state + x; the new state is the total."""
    return helper.make_graph(
        [
            helper.make_node("Add", ["state", "x"], ["total"]),
            helper.make_node("Identity", ["total"], ["state_out"]),
        ],
        "accumulate",
        [_vi("x", TensorProto.FLOAT, ["batch", 3]), _vi("state", TensorProto.FLOAT, ["batch", 3])],
        [
            _vi("total", TensorProto.FLOAT, ["batch", 3]),
            _vi("state_out", TensorProto.FLOAT, ["batch", 3]),
        ],
    )


def window_graph() -> onnx.GraphProto:
    """An audio model that echoes its whole input window (context + chunk)."""
    return helper.make_graph(
        [helper.make_node("Identity", ["audio"], ["window"])],
        "window",
        [_vi("audio", TensorProto.FLOAT, ["batch", 20])],
        [_vi("window", TensorProto.FLOAT, ["batch", 20])],
    )


ACCUMULATE_TOML = """
kind = "tensor"
[[state]]
input = "state"
output = "state_out"
batch_axis = 0
"""
WINDOW_TOML = """
kind = "audio"
sample_rate = 8000
chunk = 16
context = 4
"""


@pytest.fixture
def tiny_models(tmp_path: Path) -> Path:
    """A model folder with ``double``, ``accumulate`` (stateful) and ``window`` (audio)."""
    root = tmp_path / "models"
    write_model(root, "double", double_graph())
    write_model(root, "accumulate", accumulate_graph(), ACCUMULATE_TOML)
    write_model(root, "window", window_graph(), WINDOW_TOML)
    return root


ServerFactory = Callable[..., Any]


@pytest.fixture
async def start_server() -> AsyncIterator[ServerFactory]:
    """Start real servers on ephemeral loopback ports; all are closed at the end of the test."""
    servers: list[Server] = []

    async def start(
        model_dirs: tuple[Path, ...] = (),
        builtin: bool = True,
        limits: Limits | None = None,
        warm_up: bool = False,
        reload_seconds: float = 0.0,
        **config: Any,
    ) -> Server:
        # Warm-up (every model at every batch size, ~0.6 s for the built-ins) is left to the
        # tests about it and to the real `realtime serve` processes of the CLI and flood tests.
        # No close grace unless a test asks (tests/test_shutdown.py checks it on a real process).
        config.setdefault("close_grace_seconds", 0.0)
        config = Config(
            port=0,
            model_dirs=model_dirs,
            builtin_models=builtin,
            limits=limits or Limits(),
            warm_up=warm_up,
            reload_seconds=reload_seconds,
            # Admission measures the machine, which other tests load, and shedding by age sheds
            # what a stalled test process read: off here. tests/test_admission.py feeds it
            # measurements instead (and the real `realtime serve` tests keep it on).
            **{"admission": AdmissionPolicy(target_load=0.0), **config},
        )
        server = Server(config)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


def read_clip(name: str) -> tuple[np.ndarray[Any, Any], int]:
    """A clip from ../shared/data as int16 samples and its sample rate."""
    with wave.open(str(SHARED / "data" / name), "rb") as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2"), w.getframerate()


@pytest.fixture(scope="session")
def chromium() -> str:
    """Chromium's binary (installed where missing and allowed), or the test skips."""
    return find_chromium()


BrowserFactory = Callable[[Path | None], Browser]


@pytest.fixture
def browser_factory(chromium: str, tmp_path: Path) -> Iterator[BrowserFactory]:
    """Start headless Chromiums whose microphone plays a given WAV file (None: beeps); all stop
    at the end."""
    browsers: list[Browser] = []

    def make(audio: Path | None) -> Browser:
        browser = Browser(chromium, tmp_path / f"profile{len(browsers)}", audio)
        browsers.append(browser)
        return browser

    yield make
    for browser in browsers:
        browser.close()


class Outcomes:
    """Scheduler outcomes as futures, for tests that await each submitted item's."""

    def __init__(self) -> None:
        self._waiting: dict[int, asyncio.Future[Prediction]] = {}

    def deliver(self, item: WorkItem, outcome: Outcome) -> None:
        """The scheduler's ``deliver``: resolve the item's future."""
        fut = self._waiting.pop(id(item))
        if isinstance(outcome, Exception):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)

    def submit(self, scheduler: Scheduler, item: WorkItem) -> asyncio.Future[Prediction]:
        """Submit ``item``; the future of its outcome (raises what ``submit`` raises)."""
        fut: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
        self._waiting[id(item)] = fut
        try:
            scheduler.submit(item)
        except BaseException:
            del self._waiting[id(item)]
            raise
        return fut


@pytest.fixture
def held() -> Iterator[list[threading.Event]]:
    """Gates to hold models' runs with (see :func:`hold`); all opened at the end of the test."""
    gates: list[threading.Event] = []
    yield gates
    for g in gates:
        g.set()


def hold(server: Server, name: str, gates: list[threading.Event]) -> threading.Event:
    """Make every run of model ``name`` wait until the returned gate is opened: its chunks stay
    in flight (one batch running, the rest queued) for as long as the test needs."""
    model = server.repository.get(name, None)
    assert model is not None
    gate = threading.Event()
    gates.append(gate)
    run = model.runner.run

    def held_run(feeds: dict[str, Any]) -> Any:
        gate.wait(30)
        return run(feeds)

    model.runner.run = held_run  # type: ignore[method-assign]
    return gate


def load_records(
    due: np.ndarray[Any, Any],
    received: np.ndarray[Any, Any],
    outcome: np.ndarray[Any, Any],
    admitted: np.ndarray[Any, Any],
    hello_at: np.ndarray[Any, Any] | None = None,
    codes: tuple[str, ...] = (),
) -> Records:
    """A load run's records of clients (rows) by chunk (columns), each sent when due, for the
    load tester's reports and plots."""
    return Records(
        due=due,
        sent=due.copy(),
        received=received,
        queue_ms=np.zeros(due.shape),
        infer_ms=np.zeros(due.shape),
        outcome=outcome,
        codes=list(codes),
        kinds=["vad"] * len(due),
        cpu_seconds=0.0,
        connect_failures=0,
        admitted=admitted,
        **({} if hello_at is None else {"hello_at": hello_at}),
    )
