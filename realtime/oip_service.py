"""Open Inference Protocol requests as streams through the scheduler: the one adapter.

Both doors (REST in ``realtime.oip_rest``, gRPC in ``realtime.oip_grpc``) hand checked
:class:`realtime.oip.InferRequest` s here. A one-shot request is a short-lived stream: each item
of its batch becomes a :class:`WorkItem` in the same queue as WebSocket chunks, so one batch can
hold both; a stateful model's items each start from the model's initial state. A sequence
(``sequence_id`` on a gRPC ``ModelStreamInfer`` call, opened by ``sequence_start`` and ended by
``sequence_end``) is a stateful stream like a WebSocket one: its recurrent state is carried from
request to request and batched with every other stream's, and its answers go out in request
order. Credentials, model grants, limits, deadlines and metrics are applied here, the same for
both doors.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from realtime import __version__, errors, oip
from realtime.auth import Grant, credential
from realtime.config import Config
from realtime.models.repository import ModelRepository
from realtime.models.spec import Model
from realtime.scheduler import Scheduler
from realtime.session import Outcome, Prediction, Stream, WorkItem
from realtime.traffic import Traffic

log = logging.getLogger("realtime")
#: What a sequence's callback gets: the request's id, then its response or its error.
Send = Callable[[str, "oip.InferResponse | errors.RealtimeError"], None]


class OipService:
    """Model lookup, credentials and inference for the Open Inference Protocol doors."""

    def __init__(
        self,
        config: Config,
        repository: ModelRepository,
        scheduler: Scheduler,
        traffic: Traffic,
        serving: Callable[[], tuple[bool, bool]],
    ) -> None:
        self.config = config
        self.limits = config.limits
        self._repository = repository
        self._scheduler = scheduler
        self.traffic = traffic
        self._serving = serving  # (ready, draining)
        self._ids = itertools.count()
        #: Items in the scheduler, and where their outcomes go (:meth:`deliver`).
        self._waiting: dict[WorkItem, asyncio.Future[Prediction]] = {}
        self._inflight = 0
        #: Set while no request is in flight on either door (shutdown waits for it).
        self.idle = asyncio.Event()
        self.idle.set()

    def begin(self) -> None:
        """A request is in flight."""
        self._inflight += 1
        self.idle.clear()

    def end(self) -> None:
        """A request was answered."""
        self._inflight -= 1
        if not self._inflight:
            self.idle.set()

    @property
    def ready(self) -> bool:
        """Models warm and serving (``/v2/health/ready``, gRPC ``ServerReady``)."""
        return self._serving()[0]

    def submit(self, item: WorkItem) -> asyncio.Future[Prediction]:
        """Queue an item with the scheduler; its future gets the outcome. Raises the
        scheduler's refusal (``overloaded``)."""
        future: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
        self._waiting[item] = future  # before submit: an item already late is failed in it
        try:
            self._scheduler.submit(item)
        except errors.ServingError:
            del self._waiting[item]
            raise
        return future

    def deliver(self, item: WorkItem, outcome: Outcome) -> None:
        """An item's outcome from the scheduler (the server hands over those of no session)."""
        future = self._waiting.pop(item, None)
        if future is None or future.done():
            return
        if isinstance(outcome, Prediction):
            future.set_result(outcome)
        else:
            future.set_exception(outcome)

    def forget(self, items: list[WorkItem]) -> None:
        """Items whose request is over (refused, failed, cancelled): outcomes still to come are
        dropped (their streams are no longer live, so the queued ones are skipped)."""
        for item in items:
            future = self._waiting.pop(item, None)
            if future is not None:
                future.cancel()

    def counted(self, door: str) -> None:
        """Count one request on a door."""
        requests = self.traffic.requests
        requests[door] = requests.get(door, 0) + 1

    def failed(self, exc: errors.RealtimeError) -> None:
        """Count an error answered on a door (same counter as WebSocket errors)."""
        counts = self.traffic.errors
        counts[exc.code] = counts.get(exc.code, 0) + 1

    def grant(
        self, authorization: str | None, api_key: str | None, target: str = ""
    ) -> Grant | None:
        """The caller's grant, from the same credentials a WebSocket handshake takes
        (``Authorization: Bearer``, ``X-Api-Key``, a REST target's ``?token=``); None when the
        server has no keys. Raises :class:`AuthFailed`."""
        if not self.config.keys:
            return None
        headers = {}
        if authorization is not None:
            headers["Authorization"] = authorization
        if api_key is not None:
            headers["X-Api-Key"] = api_key
        return credential(target, headers, self.config.keys, time.time())

    def model(self, name: str, version: str | None, grant: Grant | None) -> Model:
        """The model version a request names, if the caller may use it."""
        if grant is not None and not grant.allows(name):
            raise errors.ModelForbidden(f"this key may not use model {name!r}")
        model = self._repository.get(name, version or None)
        if model is None:
            if self._repository.has_name(name):
                raise errors.UnknownVersion(f"model {name} has no version {version}")
            raise errors.UnknownModel(f"no model named {name!r}")
        return model

    def metadata(self, name: str, version: str | None, grant: Grant | None) -> dict[str, Any]:
        """A model's OIP metadata."""
        model = self.model(name, version, grant)
        versions = [m.version for m in self._repository if m.name == name]
        return oip.model_metadata(model, versions)

    def server_metadata(self) -> dict[str, Any]:
        """The server's OIP metadata."""
        return oip.server_metadata(__version__)

    def _deadline(self, model: Model, request: oip.InferRequest, now: float) -> float:
        ms = model.deadline_ms if request.deadline_ms is None else request.deadline_ms
        return now + ms / 1000.0

    def _stream(self, model: Model, who: str, deadline_ms: float) -> Stream:
        return Stream(
            session=who,
            id=next(self._ids),
            model=model,
            dtype=model.input.dtype,
            deadline_ms=deadline_ms,
            results="json",
            options={},
            overflow="reject",
            state=[s.initial.copy() for s in model.states],
            rechunker=None,
        )

    def _refuse_if_draining(self) -> None:
        if self._serving()[1]:
            raise errors.ShuttingDown("the server is shutting down: send elsewhere")

    async def infer(
        self, request: oip.InferRequest, grant: Grant | None, who: str
    ) -> oip.InferResponse:
        """Run a one-shot request: each item of its batch through the scheduler, then the
        outputs stacked back. ``who`` is the caller (its key or address): the scheduler serves
        callers round-robin. The first item's error, if any, is the request's."""
        self.begin()
        try:
            return await self._infer(request, grant, who)
        finally:
            self.end()

    async def _infer(
        self, request: oip.InferRequest, grant: Grant | None, who: str
    ) -> oip.InferResponse:
        now = time.monotonic()
        self._refuse_if_draining()
        if request.sequence_id is not None:
            raise errors.BadMessage(
                "sequence_id needs a gRPC ModelStreamInfer call (a sequence lives on one call)"
            )
        model = self.model(request.model, request.version, grant)
        data = oip.model_input(model, request, self.limits.max_inflight_per_session)
        want = oip.requested(model, request)
        deadline = self._deadline(model, request, now)
        n = len(data)
        ms = (deadline - now) * 1000.0
        if model.states:  # each item its own stream: each starts from the initial state
            streams = [self._stream(model, who, ms) for _ in range(n)]
        else:
            streams = [self._stream(model, who, ms)] * n
        items = [WorkItem(streams[i], i, 0.0, data[i], now, deadline) for i in range(n)]
        futures: list[asyncio.Future[Prediction]] = []
        try:
            for item in items:
                futures.append(self.submit(item))
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
        finally:
            for stream in streams[:1] if not model.states else streams:
                stream.live = False  # what is still queued (a refused request) is skipped
            self.forget(items)
        self.traffic.outcome(model.key, (time.monotonic() - now) * 1000.0)
        predictions: list[Prediction] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise _serving_error(outcome)
            predictions.append(outcome)
        return _response(model, request.id, want, predictions)

    def sequences(self, grant: Grant | None, who: str, send: Send) -> Sequences:
        """The sequences of one streaming call; answers go to ``send``."""
        return Sequences(self, grant, who, send)


def _serving_error(exc: BaseException) -> errors.RealtimeError:
    if isinstance(exc, errors.RealtimeError):
        return exc
    if isinstance(exc, asyncio.CancelledError):
        return errors.ShuttingDown("the request was cancelled")
    log.error("event=internal_error door=oip error=%r", exc)
    return errors.InferenceFailed(repr(exc)[:300])


def _response(
    model: Model, request_id: str, want: list[int], predictions: list[Prediction]
) -> oip.InferResponse:
    if len(predictions) == 1:  # the common case: views with a batch axis, no copy
        (p,) = predictions
        outputs = [(model.outputs[k].name, p.outputs[k][np.newaxis]) for k in want]
    else:
        outputs = [
            (model.outputs[k].name, np.stack([p.outputs[k] for p in predictions])) for k in want
        ]
    return oip.InferResponse(
        model.name,
        model.version,
        request_id,
        outputs,
        max(p.queue_ms for p in predictions),
        max(p.infer_ms for p in predictions),
        max(p.batch for p in predictions),
    )


@dataclass(slots=True, eq=False)
class _Pending:
    """A sequence request on its way: its answer, once known, waits for the earlier ones'."""

    id: str
    want: list[int]
    outcome: Prediction | errors.RealtimeError | None = None
    #: The item, once it went to the scheduler (then it counts as in flight for shutdown).
    item: WorkItem | None = None


@dataclass(slots=True, eq=False)
class _Sequence:
    """One open sequence: a stateful stream and its requests in flight, in order."""

    stream: Stream
    pending: deque[_Pending] = field(default_factory=deque)
    seq: int = 0
    ended: bool = False


class Sequences:
    """The requests of one ``ModelStreamInfer`` call: one-shots, and sequences by id.

    Every request gets exactly one answer through ``send``; a sequence's answers go in its
    requests' order (its errors too), other answers as soon as they are known.
    """

    def __init__(self, service: OipService, grant: Grant | None, who: str, send: Send) -> None:
        self._service = service
        self._grant = grant
        self._who = who
        self._send = send
        self._open: dict[int | str, _Sequence] = {}
        self._active: set[_Sequence] = set()  # open, or ended with answers still to send
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Requests without an answer sent yet, on all sequences and one-shots.
        self.inflight = 0

    def request(self, request: oip.InferRequest) -> None:
        """Take one request; its answer comes through ``send`` (at once if it is refused)."""
        service = self._service
        limits = service.limits
        self.inflight += 1
        sequence: _Sequence | None = None
        try:
            service._refuse_if_draining()
            if self.inflight > limits.max_inflight_per_session:
                raise errors.Overloaded(
                    f"{self.inflight - 1} requests in flight on this call; wait for answers"
                )
            if request.sequence_id is None:
                task = asyncio.get_running_loop().create_task(
                    service.infer(request, self._grant, self._who)
                )
                self._tasks.add(task)
                task.add_done_callback(lambda t: self._one_shot_done(request.id, t))
                return
            sequence = self._sequence(request)
            self._submit(sequence, request)
        except errors.RealtimeError as e:
            if sequence is None:
                self._answer(request.id, e)
            else:  # after the sequence's earlier answers
                sequence.pending.append(_Pending(request.id, [], e))
                self._release(sequence)

    def refuse(self, request_id: str, exc: errors.RealtimeError) -> None:
        """Answer a request that could not even be read with its error."""
        self.inflight += 1
        self._answer(request_id, exc)

    def _sequence(self, request: oip.InferRequest) -> _Sequence:
        sid = request.sequence_id
        assert sid is not None
        sequence = self._open.get(sid)
        if request.sequence_start:
            if sequence is not None:
                raise errors.StreamAlreadyOpen(f"sequence {sid!r} is already open")
            limits = self._service.limits
            if len(self._open) >= limits.max_streams:
                raise errors.TooManyStreams(f"at most {limits.max_streams} sequences per call")
            model = self._service.model(request.model, request.version, self._grant)
            stream = self._service._stream(model, self._who, model.deadline_ms)
            sequence = self._open[sid] = _Sequence(stream)
            self._active.add(sequence)
            log.info("event=sequence_start who=%s sequence=%s model=%s", self._who, sid, model.key)
        elif sequence is None:
            raise errors.StreamNotOpen(f"sequence {sid!r} is not open: start it first")
        return sequence

    def _submit(self, sequence: _Sequence, request: oip.InferRequest) -> None:
        stream = sequence.stream
        model = stream.model
        if request.sequence_end:  # the id may start again; this stream's answers still go out
            sequence.ended = True
            del self._open[request.sequence_id]  # type: ignore[arg-type]
        if request.model != model.name or request.version not in (None, "", model.version):
            raise errors.BadMessage(
                f"sequence {request.sequence_id!r} runs {model.key}, not {request.model}"
            )
        data = oip.model_input(model, request, 1)
        want = oip.requested(model, request)
        limits = self._service.limits
        if len(sequence.pending) >= limits.max_inflight_per_stream:
            raise errors.Overloaded(
                f"sequence {request.sequence_id!r} has {len(sequence.pending)} requests in "
                "flight; wait for answers"
            )
        now = time.monotonic()
        item = WorkItem(
            stream, sequence.seq, 0.0, data[0], now, self._service._deadline(model, request, now)
        )
        sequence.seq += 1
        entry = _Pending(request.id, want)
        sequence.pending.append(entry)
        try:
            future = self._service.submit(item)
        except errors.ServingError as e:
            entry.outcome = e
            self._release(sequence)
            return
        entry.item = item
        self._service.begin()
        future.add_done_callback(lambda f: self._done(sequence, entry, item, f))

    def _done(
        self,
        sequence: _Sequence,
        entry: _Pending,
        item: WorkItem,
        future: asyncio.Future[Prediction],
    ) -> None:
        if future.cancelled():
            entry.outcome = errors.ShuttingDown("the call ended before this request ran")
        elif future.exception() is not None:
            entry.outcome = _serving_error(future.exception())  # type: ignore[arg-type]
        else:
            entry.outcome = future.result()
        model = sequence.stream.model
        self._service.traffic.outcome(model.key, (time.monotonic() - item.received) * 1000.0)
        self._release(sequence)

    def _release(self, sequence: _Sequence) -> None:
        pending = sequence.pending
        model = sequence.stream.model
        while pending and pending[0].outcome is not None:
            entry = pending.popleft()
            outcome = entry.outcome
            assert outcome is not None
            if entry.item is not None:
                self._service.end()
            if isinstance(outcome, Prediction):
                self._answer(entry.id, _response(model, entry.id, entry.want, [outcome]))
            else:
                self._answer(entry.id, outcome)
        if sequence.ended and not pending:
            sequence.stream.live = False
            self._active.discard(sequence)

    def _one_shot_done(self, request_id: str, task: asyncio.Task[oip.InferResponse]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        self._answer(request_id, task.result() if exc is None else _serving_error(exc))

    def _answer(self, request_id: str, outcome: oip.InferResponse | errors.RealtimeError) -> None:
        self.inflight -= 1
        if isinstance(outcome, errors.RealtimeError):
            self._service.failed(outcome)
        self._send(request_id, outcome)

    def close(self) -> None:
        """The call ended: what it left queued is skipped, nothing more is sent."""
        for task in self._tasks:
            task.cancel()
        for sequence in self._active:
            sequence.stream.live = False
            for entry in sequence.pending:
                if entry.item is not None:
                    self._service.end()
                    self._service.forget([entry.item])
            sequence.pending.clear()
        self._active.clear()
        self._open.clear()
        self._send = _discard


def _discard(request_id: str, outcome: oip.InferResponse | errors.RealtimeError) -> None:
    pass
