"""Admission control (realtime/admission.py): pure, fed measurements over a fake clock."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from realtime import errors
from realtime.admission import (
    CALM_REFUSALS,
    CAPACITY_HOLD_SECONDS,
    CONNECTION_COST,
    COST_MEMORY_SECONDS,
    DOOR_COST,
    ENGAGE_PERIODS,
    FIRST_AT_LEAST,
    FIRST_GROW,
    FIRST_SHRINK,
    MIN_ANSWERED,
    TAKE_BACK_AT_LEAST,
    TAKE_BACK_AT_MOST,
    Admission,
    AdmissionPolicy,
    Measurement,
    ahead_of_real_time,
    idle_seconds,
    median_over_streams,
)
from realtime.client import Client
from realtime.server import Server, _resumes
from tests.conftest import ServerFactory
from tests.test_metrics import get, scrape
from tests.test_security import refused_503
from tests.test_server import Raw


class FakeServer:
    """Measurements of a server whose every streaming session costs ``cost`` of one core."""

    def __init__(self, admission: Admission, cost: float, cores: int = 1) -> None:
        self.admission = admission
        self.cost = cost
        self.cores = cores
        self.now = 0.0
        self.cpu = 0.0
        self.streaming = 0
        self.lag = 0.0
        self.models: dict[str, tuple[float, int, int, int]] = {}
        self.arrivals = 0.0  # new connections a second, each costing CONNECTION_COST
        #: Whether the lag is a busy loop's (its CPU goes on) or a stall's (the process stopped).
        self.busy_lag = False
        #: Whether the cores' idle time is given, as /proc/stat counts it (10 ms ticks).
        self.ticks = False

    def run(self, seconds: float, period: float = 0.05) -> None:
        """Let time pass with the sessions streaming, measured every ``period``."""
        for _ in range(round(seconds / period)):
            elapsed = period + self.lag  # the timer fires ``lag`` late
            self.now += elapsed
            arriving = round(self.arrivals * period)
            for _ in range(arriving):
                self.admission.connected()
            work = self.cost * self.streaming + arriving * CONNECTION_COST / period
            ran = elapsed if self.busy_lag else period
            self.cpu += ran * min(work, float(self.cores))
            idle = None
            if self.ticks:  # the cores are busy with this process alone
                idle = math.floor((self.now * self.cores - self.cpu) * 100) / 100
            self.admission.observe(
                Measurement(
                    self.now,
                    self.lag,
                    self.cpu,
                    self.cpu,
                    self.cores,
                    self.streaming,
                    dict(self.models),
                    idle,
                )
            )


def near_full() -> tuple[Admission, FakeServer]:
    """76 sessions streaming at 1 % of a core each, measured a while: 0.76 of the core, near the
    0.8 target (80 fit)."""
    admission = Admission(AdmissionPolicy(target_load=0.8))
    server = FakeServer(admission, 0.01)
    server.streaming = 76
    server.run(10.0)
    assert admission.capacity == pytest.approx(80, rel=0.02)
    return admission, server


def test_an_idle_server_admits_and_knows_no_capacity_yet() -> None:
    admission = Admission(AdmissionPolicy())
    FakeServer(admission, 0.01).run(1.0)
    assert admission.capacity is None
    assert admission.admit_session(0) is None
    assert admission.full(0) is None


def test_capacity_comes_from_the_measured_cost_of_a_session() -> None:
    admission = Admission(AdmissionPolicy(target_load=0.8))
    server = FakeServer(admission, 0.01)  # 1 % of a core per session: 80 fit in 0.8
    server.streaming = 40
    server.run(5.0)
    assert admission.capacity == pytest.approx(80, rel=0.02)
    assert admission.admit_session(40) is None
    assert admission.admit_session(78) is None
    busy = admission.admit_session(80)
    assert isinstance(busy, errors.ServerBusy)
    assert busy.code == "server_busy" and busy.retryable
    assert busy.retry_after_ms == AdmissionPolicy().retry_after_ms
    assert admission.figures.admitted["session"] == 2
    assert admission.figures.refused["load"] == 1
    assert admission.full(80) == "load"
    assert admission.headroom(60) == pytest.approx(20, abs=2)


def test_a_crowd_arriving_does_not_make_a_streaming_session_look_dearer() -> None:
    # 20 sessions stream at 1 % of a core each while 300 clients a second knock: their
    # handshakes, hellos and refusals take another 18 %. That is the crowd's cost, not the
    # sessions': taken for theirs, one session looked twice as dear and the server, with room
    # for 80, refused from 42 on. But it is real CPU: the sessions get the target less it, or
    # refusing the crowd makes them late.
    admission = Admission(AdmissionPolicy(target_load=0.8))
    server = FakeServer(admission, 0.01)
    server.streaming, server.arrivals = 20, 300.0
    server.run(5.0)
    crowd = 300 * CONNECTION_COST
    assert admission.load == pytest.approx(0.2 + crowd, rel=0.03)
    assert admission.session_cost == pytest.approx(0.01, rel=0.03)
    assert admission.churn == pytest.approx(crowd, rel=0.03)
    assert admission.capacity == pytest.approx((0.8 - crowd) / 0.01, rel=0.03)  # 62
    assert admission.admit_session(60) is None
    assert isinstance(admission.admit_session(62), errors.ServerBusy)
    server.arrivals = 0.0  # the crowd is gone: its share is the sessions' again
    server.run(5.0)
    assert admission.capacity == pytest.approx(80, rel=0.03)
    assert admission.admit_session(62) is None


def test_near_full_a_higher_capacity_counts_once_it_held_a_lower_one_at_once() -> None:
    # Admitted sessions cannot be taken back: a session that reads cheaper for a moment (while
    # sessions come in fast the estimate ran ahead of their cost) must not let more in until it
    # held; a dearer one (a slower machine) refuses at once.
    admission, server = near_full()
    server.cost = 0.0096  # 83 would fit
    server.run(0.5)
    assert admission.capacity == pytest.approx(80, rel=0.02)  # still the least of the window
    assert isinstance(admission.admit_session(80), errors.ServerBusy)
    server.run(CAPACITY_HOLD_SECONDS + 2.0)
    assert admission.capacity == pytest.approx(80, rel=0.02)  # the dearer cost is remembered
    server.run(COST_MEMORY_SECONDS + 5.0)  # and the readings of its fall (smoothed) with it
    assert admission.capacity == pytest.approx(83.3, rel=0.02)
    assert admission.admit_session(80) is None
    server.cost = 0.012  # 66 fit: the estimate falls, and the capacity with it
    server.run(0.1)
    assert admission.capacity is not None and admission.capacity < 83.3 - 3
    server.run(3.0)
    assert admission.capacity == pytest.approx(66.7, rel=0.02)
    server.streaming, server.cost = 0, 0.0  # idle: the capacity is unknown again
    server.run(5.0)
    assert admission.capacity is None


def test_a_fast_spell_near_full_admits_no_more_than_the_slow_one_before_it_left_room_for() -> None:
    # Some hosts run the same work 1.5x faster for seconds, then slow again (session 37): a
    # capacity estimated in the fast spell admits sessions the next slow one cannot carry.
    admission, server = near_full()
    server.cost = 0.01 / 1.5  # 0.51 of the core: "120 fit", for as long as the spell lasts
    server.run(5.0)
    assert admission.load < 0.6
    assert admission.remembered_cost == pytest.approx(0.01, rel=0.01)
    assert admission.capacity == pytest.approx(80, rel=0.02)
    assert admission.admit_session(78) is None
    assert isinstance(admission.admit_session(80), errors.ServerBusy)
    server.run(COST_MEMORY_SECONDS + 5.0)  # a fast spell that lasts: the host is faster now
    assert admission.capacity == pytest.approx(120, rel=0.02)


def test_a_hiccup_near_full_is_not_remembered() -> None:
    # A hiccup (the core slowed 1.5x for 150 ms) is not a slow spell: remembered, it would cut
    # the capacity by a third for half a minute.
    admission, server = near_full()
    server.cost = 0.015
    server.run(0.15)
    assert admission.capacity is not None and admission.capacity < 0.95 * 80  # at once
    server.cost = 0.01
    server.run(CAPACITY_HOLD_SECONDS + 1.0)
    assert admission.capacity == pytest.approx(80, rel=0.01)


def test_far_from_full_the_capacity_follows_its_estimate_and_nothing_is_remembered() -> None:
    # A ramp's first estimates are rough, and the sessions far below them: nothing is held.
    # Nor remembered: while few sessions stream each costs more (the batches are small), which
    # is the ramp's, not the host's, and must not hold the capacity down once they are many.
    admission = Admission(AdmissionPolicy(target_load=0.8))
    server = FakeServer(admission, 0.02)
    server.streaming = 10  # 0.2 of the core
    server.run(5.0)
    assert admission.capacity == pytest.approx(40, rel=0.02)
    server.cost = 0.01
    server.run(0.5)
    assert admission.capacity == pytest.approx(0.8 / (0.01 + 0.01 * math.exp(-1)), rel=0.02)
    server.streaming = 76  # near full
    server.run(4.0)
    assert admission.capacity == pytest.approx(80, rel=0.02)
    assert admission.remembered_cost == pytest.approx(0.01, rel=0.01)


def test_the_bottleneck_is_the_busier_of_the_loop_and_the_cores() -> None:
    admission = Admission(AdmissionPolicy(target_load=0.5))
    cores = 4
    server = FakeServer(admission, 0.01, cores)
    server.streaming = 20
    server.run(5.0)
    # The loop thread (here: all of the CPU) is the bottleneck, not the four cores.
    assert admission.load == pytest.approx(0.2, rel=0.02)
    assert admission.capacity == pytest.approx(50, rel=0.02)


def test_lag_refuses_only_when_the_server_itself_is_loaded() -> None:
    admission = Admission(AdmissionPolicy(target_load=0.8, max_lag_ms=20.0))
    server = FakeServer(admission, 0.001)
    server.streaming = 10
    server.lag = 0.1  # a noisy neighbour: the loop runs 100 ms late, our load is 1 %
    server.run(3.0)
    assert admission.admit_session(10) is None
    server.cost, server.streaming = 0.05, 10  # now 50 % ours, still lagging
    server.run(3.0)
    busy = admission.admit_session(10)
    assert isinstance(busy, errors.ServerBusy) and "late" in busy.message
    assert admission.figures.refused["lag"] == 1
    assert isinstance(admission.admit_stream("speech_activity", 3), errors.ServerBusy)
    server.lag = 0.0
    server.run(5.0)
    assert admission.admit_session(10) is None


def test_a_stall_does_not_make_sessions_look_cheaper() -> None:
    """While the process is stopped (a neighbour, a hiccup) it uses no CPU, and its measuring
    timer fires late by as long: what the sessions cost counts over the time it ran."""
    admission = Admission(AdmissionPolicy(target_load=0.9))
    server = FakeServer(admission, 0.002)
    server.streaming = 440
    server.run(2.0)
    assert admission.capacity == pytest.approx(450, rel=0.02)
    server.lag = 0.06  # stopped for 60 ms: the timer fires that late
    server.run(0.05)
    server.lag = 0.0
    assert admission.load == pytest.approx(0.88, rel=0.02)
    assert admission.capacity == pytest.approx(450, rel=0.02)
    busy = admission.admit_session(455)
    assert isinstance(busy, errors.ServerBusy) and "sessions of about 450" in busy.message


def test_a_busy_loop_that_lags_reads_the_load_it_has() -> None:
    """A timer a few ms late on a busy loop is a turn that used the CPU it took: counted out of
    the time, it made 0.85 of the core read 0.92."""
    admission = Admission(AdmissionPolicy(target_load=0.9))
    server = FakeServer(admission, 0.002)
    server.streaming, server.lag, server.busy_lag = 425, 0.004, True
    server.run(3.0)
    assert admission.load == pytest.approx(0.85, abs=0.005)
    assert admission.capacity == pytest.approx(450, rel=0.01)


def test_the_cores_idle_time_in_ticks_reads_right_on_average() -> None:
    """/proc/stat counts idle time in 10 ms ticks: over a 50 ms period a core's busy share reads
    in fifths. Each period's larger of it and the process's own share made 0.85 read 0.89."""
    admission = Admission(AdmissionPolicy(target_load=0.9))
    server = FakeServer(admission, 0.002)
    server.streaming, server.ticks = 425, True
    server.run(3.0)
    assert admission.load == pytest.approx(0.85, abs=0.01)
    assert admission.capacity == pytest.approx(450, rel=0.02)


def test_a_stream_is_refused_on_a_model_whose_queue_fills_or_workers_are_busy() -> None:
    admission = Admission(AdmissionPolicy(target_load=0.8, queue_share=0.5))
    server = FakeServer(admission, 0.001)
    server.streaming = 1
    server.models = {"a": (0.0, 10, 2, 100), "b": (0.0, 60, 2, 100), "c": (0.0, 0, 2, 100)}
    for _ in range(100):  # model c's two workers are 95 % busy
        busy, depth, workers, max_queue = server.models["c"]
        server.models["c"] = (busy + 0.05 * 2 * 0.95, depth, workers, max_queue)
        server.run(0.05)
    assert admission.admit_stream("a", 1) is None
    refused = admission.admit_stream("b", 2)
    assert isinstance(refused, errors.ServerBusy) and refused.stream == 2
    assert admission.figures.refused["model_queue"] == 1
    assert isinstance(admission.admit_stream("c", 3), errors.ServerBusy)
    assert admission.figures.refused["model_busy"] == 1
    assert admission.admit_stream("unknown", 4) is None  # nothing measured: admitted


def test_off_admits_everything() -> None:
    admission = Admission(AdmissionPolicy(target_load=0.0))
    server = FakeServer(admission, 0.5)
    server.streaming, server.lag = 10, 1.0
    server.run(3.0)
    assert admission.admit_session(1000) is None
    assert admission.full(1000) is None


def test_lag_goes_into_the_histogram() -> None:
    admission = Admission(AdmissionPolicy())
    server = FakeServer(admission, 0.0)
    server.lag = 0.003
    server.run(1.0)
    f = admission.figures
    assert sum(f.lag_buckets) == 20 and f.lag_buckets[2] == 20  # all in (2, 5] ms
    assert f.lag_sum == pytest.approx(0.06)
    assert admission.last_lag == 0.003


# --- through a real server -------------------------------------------------------------------


def _fill(server: Server, sessions_cost: float) -> None:
    """Feed the server's admission two seconds of one streaming session costing
    ``sessions_cost`` of the loop (its own timer waits an hour: the test alone measures)."""
    admission = server.admission
    for k in range(41):
        t = 1000.0 + 0.05 * k
        admission.observe(Measurement(t, 0.0, t * sessions_cost, t * sessions_cost, 1, 1, {}))


async def _one_streaming(start_server: ServerFactory, tiny_models: Path) -> tuple[Server, Raw]:
    """A server (target 0.5, retry_after_ms 750, measured only by the test) and the session
    streaming on it, admitted while nothing was measured."""
    policy = AdmissionPolicy(target_load=0.5, retry_after_ms=750.0, period=3600.0)
    server = await start_server((tiny_models,), builtin=False, admission=policy)
    first = await Raw.connect(server.url)
    assert (await first.open(1, shape=[4]))["type"] == "opened"
    return server, first


async def test_a_full_server_refuses_hello_with_server_busy_then_closes(
    start_server: ServerFactory, tiny_models: Path
) -> None:
    server, first = await _one_streaming(start_server, tiny_models)
    base = f"http://127.0.0.1:{server.port}"
    assert (await asyncio.to_thread(get, base + "/readyz"))[0] == 200
    _fill(server, 0.4)  # one session uses 40 %: a second would pass the 50 % target
    status, _, body = await asyncio.to_thread(get, base + "/readyz")
    assert (status, orjson.loads(body)) == (503, {"status": "full", "reason": "load"})

    late = await Raw.connect(server.url, hello=False)
    await late.text({"type": "hello", "protocol": 1})
    busy = await late.recv()
    assert busy["type"] == "error" and busy["code"] == "server_busy"
    assert busy["retryable"] and busy["retry_after_ms"] == 750.0
    with pytest.raises(ConnectionClosed):
        await late.recv()
    assert late.ws.close_code == 1013  # try again later, closed cleanly by the server
    with pytest.raises(errors.ServerBusy) as refused:  # the Python client raises it typed
        await Client.connect(server.url)
    assert refused.value.retry_after_ms == 750.0
    await first.still_works(1, 0)  # the admitted session is not touched

    samples = await scrape(base)
    assert samples[("realtime_refused_busy_total", (("reason", "load"),))] == 2.0
    assert samples[("realtime_admitted_total", (("what", "session"),))] == 1.0
    assert samples[("realtime_load", ())] == pytest.approx(0.4, abs=0.05)
    assert samples[("realtime_session_load", ())] == pytest.approx(0.4, abs=0.05)
    assert samples[("realtime_batching_slack_cores", ())] == 0.0  # measured without worker runs
    assert samples[("realtime_churn_load", ())] == pytest.approx(0.0, abs=0.05)  # 3 hellos
    assert samples[("realtime_headroom_sessions", ())] == pytest.approx(0.25, abs=0.1)
    assert math.isnan(samples[("realtime_session_cost_remembered", ())])  # 0.4: not near 0.5
    assert ("realtime_loop_lag_seconds_count", ()) in samples


async def test_a_full_server_refusing_a_crowd_answers_the_handshake_503_server_busy(
    start_server: ServerFactory, tiny_models: Path
) -> None:
    server, first = await _one_streaming(start_server, tiny_models)
    base = f"http://127.0.0.1:{server.port}"
    _fill(server, 0.4)  # full, as above
    server.admission.refusal_rate = 10 * CALM_REFUSALS  # and a crowd knocking
    retry_after, body = await refused_503(server.url)
    assert retry_after == "8" and (body["code"], body["retry_after_ms"]) == ("server_busy", 7500.0)
    assert "full" in body["error"]
    with pytest.raises(errors.ServerBusy):  # the Python client raises it typed
        await Client.connect(server.url)

    # A client that comes to resume a session is let through to its hello.
    resuming = await connect(server.url + "?resume=1")
    await resuming.send(
        orjson.dumps({"type": "hello", "protocol": 1, "resume": "x" * 32, "received": 0}).decode()
    )
    assert orjson.loads(await resuming.recv())["code"] == "resume_unknown"
    await resuming.close()
    # Plain GETs are not handshakes: never refused at the door.
    assert (await asyncio.to_thread(get, base + "/healthz"))[0] == 200
    samples = await scrape(base)
    assert samples[("realtime_refused_busy_total", (("reason", "load"),))] == 2.0
    await first.still_works(1, 0)


@pytest.mark.parametrize(
    ("target", "resumes"),
    [
        (b"/?resume=1", True),
        (b"/rt?token=abc&resume", True),
        (b"/", False),
        (b"/?resumes=1", False),
        (b"/resume", False),
    ],
)
def test_a_handshake_comes_to_resume_when_its_query_says_so(target: bytes, resumes: bool) -> None:
    head = b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n"
    assert _resumes(head) is resumes


async def test_a_model_with_its_queue_half_full_refuses_a_new_stream(
    start_server: ServerFactory, tiny_models: Path
) -> None:
    policy = AdmissionPolicy(queue_share=0.5, period=3600.0)
    server = await start_server((tiny_models,), builtin=False, admission=policy, max_queue=4)
    raw = await Raw.connect(server.url)
    server.admission.observe(
        Measurement(
            1.0, 0.0, 0.0, 0.0, 1, 1, {"double": (0.0, 2, 1, 4), "accumulate": (0, 0, 1, 4)}
        )
    )
    refused = await raw.open(1, shape=[4])
    assert (refused["type"], refused["code"], refused["stream"]) == ("error", "server_busy", 1)
    assert refused["retry_after_ms"] == policy.retry_after_ms
    opened = await raw.open(2, "accumulate", shape=[3])  # another model: still taken
    assert opened["type"] == "opened"


def test_a_crowd_of_refused_clients_is_told_to_wait_longer() -> None:
    admission = Admission(AdmissionPolicy(target_load=0.8, retry_after_ms=1000.0))
    server = FakeServer(admission, 0.01)  # full at 80 sessions
    server.streaming = 80
    server.run(5.0)
    first = admission.admit_session(80)
    assert isinstance(first, errors.ServerBusy) and first.retry_after_ms == 1000.0
    for _ in range(100):  # 10 s of 250 refusals a second: ten times what it shrugs off
        for _ in range(round(250 * 0.1)):
            assert admission.admit_session(80) is not None
        server.run(0.1)
    assert admission.refusal_rate == pytest.approx(250, rel=0.05)
    crowded = admission.admit_session(80)
    assert isinstance(crowded, errors.ServerBusy)
    assert crowded.retry_after_ms == pytest.approx(10_000, rel=0.05)
    server.run(20.0)  # nobody knocks for a while: back to the policy's wait
    calm = admission.admit_session(80)
    assert isinstance(calm, errors.ServerBusy) and calm.retry_after_ms == 1000.0


def test_a_crowd_is_refused_at_the_door_but_a_resume_never() -> None:
    admission = Admission(AdmissionPolicy(target_load=0.8))
    server = FakeServer(admission, 0.01)  # full at 80 sessions
    server.streaming = 80
    server.run(5.0)
    assert admission.refuse_at_door(80, resume=False) is None  # not a crowd: refused at hello
    for _ in range(30):  # 3 s of 100 refusals a second at hello
        for _ in range(10):
            assert admission.admit_session(80) is not None
        server.run(0.1)
    assert admission.crowd and admission.refusal_rate > CALM_REFUSALS
    assert admission.refuse_at_door(80, resume=True) is None
    assert admission.refuse_at_door(40, resume=False) is None  # room: let through to its hello
    refused = admission.refuse_at_door(80, resume=False)
    assert isinstance(refused, errors.ServerBusy) and refused.retry_after_ms > 1000.0
    assert admission.figures.refused["load"] == 301

    for _ in range(30):  # 3 s of 100 refusals a second, all at the door: a seventh of the churn
        for _ in range(10):
            assert admission.refuse_at_door(80, resume=False) is not None
        server.run(0.1)
    assert admission.churn == pytest.approx(100 * DOOR_COST, rel=0.1)
    assert DOOR_COST < CONNECTION_COST / 5
    server.run(20.0)  # the crowd is gone: new sessions are refused at hello again
    assert not admission.crowd and admission.refuse_at_door(80, resume=False) is None


def test_connections_let_through_the_door_take_their_room_until_the_next_measurement() -> None:
    admission = Admission(AdmissionPolicy(target_load=0.8))
    server = FakeServer(admission, 0.0099)  # full at 80 sessions (80.8)
    server.streaming = 78
    server.run(5.0)
    for _ in range(30):  # a crowd: 3 s of 100 refusals a second
        for _ in range(10):
            assert admission.admit_session(80) is not None
        server.run(0.1)
    assert admission.crowd and admission.capacity == pytest.approx(80.8, rel=0.01)
    # A batch of the crowd at the door, the sessions still 78: room for two, not for all.
    batch = [admission.refuse_at_door(78, resume=False) for _ in range(5)]
    assert batch[:2] == [None, None]
    assert all(isinstance(busy, errors.ServerBusy) for busy in batch[2:])
    server.run(0.05)  # measured: by now the two are sessions, or gone
    assert admission.crowd and admission.refuse_at_door(78, resume=False) is None


def test_a_crowd_coming_at_once_is_refused_at_the_door_before_the_next_measurement() -> None:
    admission = Admission(AdmissionPolicy(target_load=0.8))
    server = FakeServer(admission, 0.01)  # full at 80 sessions, and calm: nobody refused
    server.streaming = 80
    server.run(5.0)
    assert admission.admit_session(80) is not None  # one refusal at hello: not yet a crowd
    assert not admission.crowd and admission.refuse_at_door(80, resume=False) is None
    assert admission.admit_session(80) is not None  # two within one period: 40 a second
    assert admission.crowd and admission.refusal_rate < CALM_REFUSALS
    assert isinstance(admission.refuse_at_door(80, resume=False), errors.ServerBusy)
    server.run(0.05)  # measured: the rate, smoothed, is far from a crowd's
    assert not admission.crowd and admission.refuse_at_door(80, resume=False) is None


def test_small_batches_cost_of_a_model_does_not_count_as_what_sessions_cost() -> None:
    # Pinned to one core: 60 streams of 31.25 chunks a second each, whose model costs 100 us an
    # item in large batches, but 200 in the small ones it runs at this load. The loop costs
    # 0.4 of the core whatever the batches. The workers' extra 0.1875 of the core is the price
    # of small batches, and it does not grow with the streams: more fill the batches instead.
    items_per_s, best, actual, loop = 60 * 31.25, 0.0001, 0.0002, 0.4

    def run(admission: Admission, runs: bool) -> None:
        now = cpu = workers = 0.0
        items = 0
        for _ in range(100):  # 5 s, measured every 50 ms
            now += 0.05
            items += round(items_per_s * 0.05)
            workers += 0.05 * items_per_s * actual
            cpu = loop * now + workers
            report = {"vad@1": (workers, items, best)} if runs else {}
            admission.observe(Measurement(now, 0.0, loop * now, cpu, 1, 60, {}, None, report))

    counted = Admission(AdmissionPolicy(target_load=0.8))
    run(counted, runs=False)
    assert counted.load == pytest.approx(0.775, abs=0.01)
    assert counted.capacity == pytest.approx(0.8 / (0.775 / 60), rel=0.02)  # 62: refuses the 63rd
    seen = Admission(AdmissionPolicy(target_load=0.8))
    run(seen, runs=True)
    assert seen.load == pytest.approx(0.775, abs=0.01)  # the gross load (lag, lateness) stays
    assert seen.batching_slack == pytest.approx(0.1875, abs=0.01)
    assert seen.capacity == pytest.approx(0.8 / (0.5875 / 60), rel=0.02)  # 82
    assert seen.full(70) is None and counted.full(70) == "load"


def test_a_model_at_its_best_time_per_item_has_no_batching_slack() -> None:
    admission = Admission(AdmissionPolicy(target_load=0.8))
    now = workers = 0.0
    items = 0
    for _ in range(100):
        now += 0.05
        items += 100
        workers += 100 * 0.0001 * 0.95  # CPU time a little under the wall-time best
        cpu = 0.3 * now + workers
        runs = {"vad@1": (workers, items, 0.0001), "new@1": (0.0, 0, None)}
        admission.observe(Measurement(now, 0.0, 0.3 * now, cpu, 1, 50, {}, None, runs))
    assert admission.batching_slack == 0.0
    assert admission.session_load == pytest.approx(0.49, abs=0.01)


def test_the_cores_idle_time_counts_what_the_process_itself_does_not_see() -> None:
    # Pinned to one core, the process never shows more than 85 % of it: the kernel's network
    # work and a neighbour take the rest. Past that, its own share would say "room for more"
    # forever; the core's idle time says it is full.
    admission = Admission(AdmissionPolicy(target_load=0.9))
    now, own, idle = 0.0, 0.0, 0.0
    for _ in range(100):  # 5 s at 100 sessions
        now += 0.05
        own += 0.05 * 0.85
        admission.observe(Measurement(now, 0.0, own, own, 1, 100, {}, idle))  # never idle
    assert admission.load == pytest.approx(1.0, abs=0.01)
    assert admission.full(100) == "load"
    blind = Admission(AdmissionPolicy(target_load=0.9))  # the same without the idle time
    now = own = 0.0
    for _ in range(100):
        now += 0.05
        own += 0.05 * 0.85
        blind.observe(Measurement(now, 0.0, own, own, 1, 100, {}))
    assert blind.full(100) is None  # 0.85 < 0.9: it would take the 101st


def test_idle_seconds_come_from_proc_stat_for_the_cpus_given() -> None:
    stat = (
        "cpu  900 0 300 4000 100 0 50 10 0 0\n"
        "cpu0 400 0 100 1000 20 0 25 5 0 0\n"
        "cpu1 500 0 200 3000 80 0 25 5 0 0\n"
        "intr 12345\n"
    )
    assert idle_seconds(stat, {0}, 100.0) == pytest.approx(10.2)
    assert idle_seconds(stat, {0, 1}, 100.0) == pytest.approx(41.0)
    assert idle_seconds(stat, {2}, 100.0) is None  # not listed: unknown
    assert idle_seconds("", {0}, 100.0) is None


def test_the_late_share_is_the_median_over_streams_with_enough_results() -> None:
    few = MIN_ANSWERED - 1
    # One stream whose clock runs wrong (every result "late") does not make the server late.
    assert median_over_streams([(50, 0), (50, 1), (50, 50), (few, few)]) == pytest.approx(0.02)
    assert median_over_streams([(50, 0), (50, 2), (50, 4), (50, 50)]) == pytest.approx(0.06)
    assert median_over_streams([(few, few)]) is None
    assert median_over_streams([]) is None


def test_late_results_refuse_new_sessions_and_streams_once_the_server_is_loaded() -> None:
    admission = Admission(AdmissionPolicy(target_load=0.8, late_share=0.01))
    server = FakeServer(admission, 0.01)
    server.streaming = 20  # 0.2 of the core: under half the target
    server.run(2.0)
    admission.observe_lateness(0.5, 1.0)
    assert admission.full(20) is None  # lateness on an idle server is not its sessions'
    server.streaming = 50
    server.run(2.0)
    busy = admission.admit_session(50)
    assert isinstance(busy, errors.ServerBusy) and "late" in busy.message
    assert admission.figures.refused["late"] == 1
    refused = admission.admit_stream("m", 3)
    assert isinstance(refused, errors.ServerBusy) and refused.stream == 3
    admission.observe_lateness(0.01, 1.0)  # at the share, not past it
    assert admission.admit_session(50) is None


def test_sessions_late_for_take_back_seconds_lose_the_newest_past_the_capacity() -> None:
    admission = Admission(AdmissionPolicy(target_load=0.8, take_back_seconds=2.0))
    server = FakeServer(admission, 0.01)
    server.streaming = 100  # the whole core: 80 fit within the target
    server.run(2.0)
    assert admission.capacity == pytest.approx(80, abs=1)
    admission.observe_lateness(0.9, 1.0)
    assert admission.take_back(100) == 0  # late for a second: a hiccup may pass
    admission.observe_lateness(0.2, 1.0)  # most streams on time again: it passed
    admission.observe_lateness(0.9, 1.0)
    assert admission.take_back(100) == 0
    admission.observe_lateness(0.9, 1.0)
    capacity = admission.capacity
    assert capacity is not None
    assert admission.take_back(100) == math.ceil(100 - capacity)  # those past the capacity
    assert admission.figures.taken_back == math.ceil(100 - capacity)
    assert admission.take_back(80) == 0  # not again in the same window
    server.streaming, server.cost = 80, 0.02  # the core full: the estimate reads 64 fit
    server.run(1.0)
    admission.observe_lateness(0.9, 1.0)  # still late a window on: more go, in small steps
    assert admission.take_back(80) == math.ceil(TAKE_BACK_AT_LEAST * 80)
    admission.observe_lateness(0.9, 1.0)
    admission.observe_lateness(None, 1.0)  # no live audio stream measured: none late
    admission.observe_lateness(0.9, 1.0)
    assert admission.take_back(72) == 0  # late as long as at first before more go
    admission.observe_lateness(0.9, 1.0)
    assert admission.take_back(72) > 0


def test_lateness_windows_leave_the_cores_busy_share_alone() -> None:
    """Regression: the take-back's window length once shared a name with the busy share's
    window, and each lateness window cut that one short: a core 0.8 busy read near 1.0, and
    the server admitted 349-397 sessions where 420-454 had fit."""
    loads = []
    for lateness in (False, True):
        admission = Admission(AdmissionPolicy())
        server = FakeServer(admission, 0.002)
        server.ticks = True  # confined: the cores' busy share counts
        server.streaming = 400
        for _ in range(6):
            server.run(1.0)
            if lateness:
                admission.observe_lateness(0.0, 1.0, 5.0)
        loads.append(admission.load)
    assert loads[1] == pytest.approx(loads[0]) and loads[0] == pytest.approx(0.8, abs=0.03)


def test_sessions_that_catch_up_are_not_taken_back_while_they_do() -> None:
    admission = Admission(AdmissionPolicy(target_load=0.8, take_back_seconds=2.0))
    server = FakeServer(admission, 0.01)
    server.streaming = 100
    server.run(2.0)
    admission.observe_lateness(0.9, 1.0, 300.0)
    admission.observe_lateness(0.9, 1.0, 200.0)  # a hiccup passing: less late each window
    assert admission.take_back(100) == 0
    admission.observe_lateness(0.9, 1.0, 170.0)  # no longer catching up (past 0.8 of 200)
    assert admission.take_back(100) > 0
    admission.observe_lateness(0.9, 1.0, 120.0)  # the room they left drains the backlog
    assert admission.take_back(90) == 0
    admission.observe_lateness(0.9, 1.0, 130.0)  # stuck again: more go
    assert admission.take_back(90) > 0


def test_how_many_are_taken_back_is_bounded_whatever_the_capacity_reads() -> None:
    admission = Admission(AdmissionPolicy(target_load=0.5, take_back_seconds=1.0))
    server = FakeServer(admission, 0.003)
    server.streaming = 120  # 0.36 of the core: room for 46 more, by the estimate
    server.run(2.0)
    admission.observe_lateness(0.9, 1.0)  # late all the same (a model's queue, say)
    assert admission.take_back(120) == math.ceil(TAKE_BACK_AT_LEAST * 120)
    admission.observe_lateness(0.0, 1.0)  # on time again: that overrun is over
    server.cost = 0.02  # the machine slowed: the core is full, and 60 fit by the estimate
    server.run(2.0)
    admission.observe_lateness(0.9, 1.0)
    assert admission.take_back(120) == math.ceil(TAKE_BACK_AT_MOST * 120)


def test_a_server_stopped_part_of_the_time_takes_back_what_its_run_time_cannot_carry() -> None:
    """A cgroup's CPU quota, or a neighbour: the process is stopped a third of the time. Its
    load leaves the stalls out (it reads 0.8 of the time it runs, room for 12 more), so the
    sessions it takes back are sized by the time it runs."""
    admission = Admission(AdmissionPolicy(target_load=0.9, take_back_seconds=1.0))
    server = FakeServer(admission, 0.008)
    server.streaming = 100
    server.lag = 0.025  # every 50 ms period, stopped 25 ms more
    server.run(3.0)
    assert admission.running == pytest.approx(2 / 3, abs=0.01)
    capacity = admission.capacity
    assert capacity == pytest.approx(112.5, abs=1)
    admission.observe_lateness(0.9, 1.0)
    assert admission.take_back(100) == math.ceil(100 - capacity * admission.running)  # 25


def test_no_session_is_taken_back_from_an_idle_server_or_with_the_policy_off() -> None:
    for policy, cost in (
        (AdmissionPolicy(target_load=0.8, take_back_seconds=1.0), 0.001),  # 0.1 of the core
        (AdmissionPolicy(target_load=0.8, take_back_seconds=0.0), 0.01),
        (AdmissionPolicy(target_load=0.0, take_back_seconds=1.0), 0.01),
    ):
        admission = Admission(policy)
        server = FakeServer(admission, cost)
        server.streaming = 100
        server.run(2.0)
        for _ in range(5):
            admission.observe_lateness(1.0, 1.0)
            assert admission.take_back(100) == 0


async def test_the_newest_session_is_taken_back_once_the_streams_stay_late(
    start_server: ServerFactory, tiny_models: Path
) -> None:
    """Through the real path: live audio streams' results late (by their own clocks) for
    ``take_back_seconds`` end the newest session ``server_busy`` and close it (1013); the
    older ones stream on, and the Python client raises the reason typed."""
    policy = AdmissionPolicy(
        target_load=0.5, late_ms=1000.0, period=3600.0, retry_after_ms=750.0, take_back_seconds=2.0
    )
    server = await start_server((tiny_models,), builtin=False, admission=policy)
    raws = [await Raw.connect(server.url) for _ in range(2)]
    for raw in raws:
        opened = await raw.open(1, "window", kind="audio", dtype="int16", sample_rate=8000)
        assert opened["type"] == "opened"
    newest = await Client.connect(server.url)
    stream = await newest.open("window", kind="audio", dtype="int16", sample_rate=8000)
    _fill(server, 0.4)  # loaded: lateness is the sessions' (capacity 1.25)
    pcm = np.zeros(16, np.int16)  # 2 ms: one window each
    sent = 0

    async def window(late: bool) -> None:
        """A lateness window: every stream answered MIN_ANSWERED times, late or not."""
        nonlocal sent
        if late:  # as if each stream's first chunk had come five seconds sooner
            for conn in server.connections:
                s = conn.session.streams[1]
                # (its mark too: a lead that fell within the window is a stream sending
                # faster than real time, whose lateness does not count)
                least = min(s.clock_min, s.clock_prev) - 5000.0
                s.clock_min = s.clock_prev = s.clock_mark = least
        for seq in range(sent, sent + MIN_ANSWERED):
            for raw in raws:
                await raw.chunk(1, seq, pcm)
            await stream.send(pcm, seq=seq)
        for seq in range(sent, sent + MIN_ANSWERED):
            for raw in raws:
                assert (await raw.recv())["seq"] == seq
            assert (await stream.next()).seq == seq  # type: ignore[union-attr]
        sent += MIN_ANSWERED
        server._lateness(asyncio.get_running_loop().time())

    await window(late=False)
    await window(late=True)
    assert server.admission.late_share == 1.0 and server.admission.figures.taken_back == 0
    await window(late=True)  # two seconds late: the newest session goes
    assert server.admission.figures.taken_back == 1
    with pytest.raises(ConnectionError) as lost:
        await stream.next()
    busy = lost.value.__cause__
    assert isinstance(busy, errors.ServerBusy) and busy.retry_after_ms == 750.0
    assert newest.taken_back is busy and "fell behind" in str(busy)
    assert newest.ws.close_code == 1013
    for raw in raws:  # the older sessions are not touched
        await raw.chunk(1, sent, pcm)
        assert (await raw.recv())["seq"] == sent
    samples = await scrape(f"http://127.0.0.1:{server.port}")
    assert samples[("realtime_taken_back_total", ())] == 1.0


async def test_live_audio_results_are_counted_late_by_the_streams_own_media_clock(
    start_server: ServerFactory, tiny_models: Path
) -> None:
    """Through the real path: each audio result counts on its stream, late when sent more than
    ``late_ms`` after its audio's time on the stream's clock; each window gives admission
    control the median share, and the counters start again."""
    # late_ms far past any stall of a busy machine; the test alone measures.
    policy = AdmissionPolicy(late_ms=1000.0, period=3600.0)
    server = await start_server((tiny_models,), builtin=False, admission=policy)
    raw = await Raw.connect(server.url)
    opened = await raw.open(1, "window", kind="audio", dtype="int16", sample_rate=8000)
    assert opened["type"] == "opened"
    pcm = np.zeros(16, np.int16)  # 2 ms: one window each
    for seq in range(MIN_ANSWERED):  # sent at once: ahead of real time, none late
        await raw.chunk(1, seq, pcm)
    for seq in range(MIN_ANSWERED):
        assert (await raw.recv())["seq"] == seq
    (session,) = (c.session for c in server.connections)
    stream = session.streams[1]
    assert (stream.answered, stream.late) == (MIN_ANSWERED, 0)
    stream.clock_min -= 5000.0  # as if its first chunk had come five seconds sooner
    for seq in range(MIN_ANSWERED, 2 * MIN_ANSWERED):
        await raw.chunk(1, seq, pcm)
    for seq in range(MIN_ANSWERED, 2 * MIN_ANSWERED):
        assert (await raw.recv())["seq"] == seq
    assert (stream.answered, stream.late) == (2 * MIN_ANSWERED, MIN_ANSWERED)
    server._lateness(asyncio.get_running_loop().time())
    assert server.admission.late_share == pytest.approx(0.5)
    # Half on time (a few ms), half five seconds late: 2.5 s on average.
    assert server.admission.lateness_ms == pytest.approx(2500.0, abs=250.0)
    assert (stream.answered, stream.late, stream.lateness_ms) == (0, 0, 0.0)
    samples = await scrape(f"http://127.0.0.1:{server.port}")
    assert samples[("realtime_late_share", ())] == pytest.approx(0.5)


def test_a_stream_sending_faster_than_real_time_is_told_apart() -> None:
    """A live audio stream's least arrival lead (ms) falls when it sends ahead of real time: by
    900 ms in a 1 s window for one sending 10x, by a few ms of jitter for a real-time one."""
    assert ahead_of_real_time(mark=5000.0, least=4100.0, seconds=1.0)  # a flooder
    assert not ahead_of_real_time(mark=5000.0, least=4990.0, seconds=1.0)  # real time, jitter
    assert not ahead_of_real_time(mark=5000.0, least=5400.0, seconds=1.0)  # it fell behind
    assert not ahead_of_real_time(mark=math.inf, least=4100.0, seconds=1.0)  # first window
    assert not ahead_of_real_time(mark=5000.0, least=math.inf, seconds=1.0)  # nothing sent


def test_the_newest_sessions_wait_once_the_server_stays_behind_and_come_back_as_it_catches_up() -> (
    None
):
    """Half the batch items late, period after period: after ``ENGAGE_PERIODS`` (a short
    slowdown's backlog drains by itself), the oldest sessions are served and the newest wait,
    fewer served each period behind down to ``FIRST_AT_LEAST``; with nothing late, more again
    each period, until all are."""
    admission = Admission(AdmissionPolicy(target_load=0.8))
    sessions, now = 200, 0.0
    for _ in range(ENGAGE_PERIODS - 1):
        now += 0.05
        assert admission.observe_queues(100, 50, sessions, now) is None
    assert admission.observe_queues(100, 0, sessions, now) is None  # one on time: one more
    assert admission.observe_queues(100, 50, sessions, now) is None
    first = admission.observe_queues(100, 50, sessions, now)
    assert first == math.floor(FIRST_SHRINK * sessions)
    assert admission.full(sessions) == "behind"  # a new one would wait behind them
    busy = admission.admit_session(sessions)
    assert busy is not None and "30 newest sessions wait" in str(busy)
    for _ in range(20):
        first = admission.observe_queues(100, 50, sessions, now)
    assert first == math.ceil(FIRST_AT_LEAST * sessions)
    assert admission.observe_queues(100, 1, sessions, now) == first  # a few late: held
    assert admission.observe_queues(100, 0, sessions, now) == first + FIRST_GROW * sessions
    while first is not None:
        first = admission.observe_queues(100, 0, sessions, now)
    assert admission.first is None


def test_too_few_items_or_the_policy_off_never_make_sessions_wait() -> None:
    quiet = Admission(AdmissionPolicy(target_load=0.8))
    off = Admission(AdmissionPolicy(target_load=0.0))
    for k in range(3 * ENGAGE_PERIODS):
        assert quiet.observe_queues(5, 5, 100, 0.05 * k) is None  # under BEHIND_MIN_ITEMS
        assert off.observe_queues(100, 100, 100, 0.05 * k) is None


def test_sessions_left_waiting_for_take_back_seconds_are_taken_back_the_newest_first() -> None:
    """Sessions waiting ``take_back_seconds`` in all (less the time none waited since) are
    taken back: those waiting, at most ``TAKE_BACK_AT_MOST`` of the sessions at once."""
    admission = Admission(AdmissionPolicy(target_load=0.8, take_back_seconds=2.0))
    now, sessions = 0.0, 100

    def period(late: int) -> int | None:
        nonlocal now
        now += 0.05
        return admission.observe_queues(100, late, sessions, now)

    while period(100) is None:
        pass
    waited = 0
    while not admission.take_back_deferred(sessions, now):
        period(100)
        waited += 1
    assert 40 <= waited <= 41  # two seconds of 50 ms periods (sums of floats)
    assert admission.figures.taken_back == math.ceil(TAKE_BACK_AT_MOST * 100)  # 50 waited
    sessions = 75
    for _ in range(20):  # waiting one second more ...
        period(100)
    while period(0) is not None:  # ... then all served (2, 4, 8, 16 % more a period) ...
        pass
    for _ in range(10):  # ... for half a second
        period(0)
    assert admission.take_back_deferred(sessions, now) == 0
    waited = 0
    while not admission.take_back_deferred(sessions, now):
        period(100)
        waited += 1
    # 1 s waited, 0.2 s more while some still waited, 0.5 s not: 1.3 s to go, and a period
    # to wait again.
    assert 27 <= waited <= 29
    assert admission.figures.taken_back == 25 + math.ceil(TAKE_BACK_AT_MOST * 75)


async def test_the_newest_sessions_chunks_wait_while_the_server_is_behind(
    start_server: ServerFactory, tiny_models: Path
) -> None:
    """Through the real path: while the queue reports its items late, the newest session's
    chunks wait unread by the scheduler and the older ones' are answered; once it catches up
    they go on in order, with their age; left waiting ``take_back_seconds``, it is taken back
    (``server_busy``, 1013)."""
    policy = AdmissionPolicy(target_load=0.5, period=3600.0, take_back_seconds=2.0)
    server = await start_server((tiny_models,), builtin=False, admission=policy)
    raws = [await Raw.connect(server.url) for _ in range(3)]
    for raw in raws:
        opened = await raw.open(1, "double", deadline_ms=60000)
        assert opened["type"] == "opened"
    late = True
    server.scheduler.lateness = lambda: (100, 50 if late else 0)  # type: ignore[method-assign]
    links = list(server.relay.links.values())
    now = asyncio.get_running_loop().time()
    for _ in range(ENGAGE_PERIODS):
        server._serve_first(now, links)
    assert server.admission.first == 2
    assert [link.reader.deferred for link in links] == [False, False, True]
    x = np.ones(4, np.float32)
    for seq in range(3):
        for raw in raws:
            await raw.chunk(1, seq, x)
    for raw in raws[:2]:
        assert [(await raw.recv())["seq"] for _ in range(3)] == [0, 1, 2]

    async def read(n: int) -> None:
        while len(links[2].reader.backlog) < n:
            await asyncio.sleep(0.005)

    await asyncio.wait_for(read(3), 10)
    assert not server.connections[2].inflight  # read, not handed over
    late = False
    server._serve_first(now, links)  # one more served each period: all of them
    assert server.admission.first is None and not links[2].reader.deferred
    assert [(await raws[2].recv())["seq"] for _ in range(3)] == [0, 1, 2]

    late = True
    for _ in range(ENGAGE_PERIODS):
        server._serve_first(now, links)
    assert links[2].reader.deferred
    for k in range(1, 3):  # (a second a period: only its time counts)
        server._serve_first(now + k, links)
        assert server.admission.figures.taken_back == k - 1
    busy = await raws[2].recv()
    assert busy["code"] == "server_busy" and "waited" in busy["message"]
    with pytest.raises(ConnectionClosed) as closed:
        await raws[2].recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
