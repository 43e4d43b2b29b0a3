"""The Open Inference Protocol over gRPC (``--grpc-port``): grpc.aio on the server's event loop.

The service is Triton's ``inference.GRPCInferenceService`` (what tritonclient[grpc] calls),
described by ``protos/grpc_service.proto``. Its message classes are built at import from the
committed descriptor set ``protos/grpc_service.binpb`` in a descriptor pool of their own, so a
process that also imports tritonclient (whose generated code registers the same names in
protobuf's default pool) loads both. Health, metadata, ``ModelInfer`` and ``ModelStreamInfer``
go through :class:`realtime.oip_service.OipService`, like the REST routes. A typed error ends a
unary call with the gRPC status of :data:`GRPC_STATUS` (details ``"<code>: <message>"``, the code
also in the trailing metadata ``realtime-error-code``); on a stream it is that request's
``error_message``, and the call goes on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from realtime import errors, oip
from realtime.auth import AuthFailed, Grant
from realtime.oip_service import OipService
from realtime.ratelimit import TokenBucket

log = logging.getLogger("realtime")
SERVICE = "inference.GRPCInferenceService"
DESCRIPTORS = Path(__file__).parent / "protos" / "grpc_service.binpb"
#: Triton's name for the error code in trailing metadata is ours: this key.
ERROR_CODE_KEY = "realtime-error-code"

#: gRPC status of each error code.
GRPC_STATUS: dict[str, grpc.StatusCode] = {
    "bad_message": grpc.StatusCode.INVALID_ARGUMENT,
    "bad_frame": grpc.StatusCode.INVALID_ARGUMENT,
    "bad_sequence": grpc.StatusCode.INVALID_ARGUMENT,
    "dtype_mismatch": grpc.StatusCode.INVALID_ARGUMENT,
    "shape_mismatch": grpc.StatusCode.INVALID_ARGUMENT,
    "non_finite_input": grpc.StatusCode.INVALID_ARGUMENT,
    "kind_mismatch": grpc.StatusCode.INVALID_ARGUMENT,
    "unsupported_sample_rate": grpc.StatusCode.INVALID_ARGUMENT,
    "stream_not_open": grpc.StatusCode.FAILED_PRECONDITION,
    "stream_already_open": grpc.StatusCode.FAILED_PRECONDITION,
    "too_many_streams": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "message_too_big": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unknown_model": grpc.StatusCode.NOT_FOUND,
    "unknown_version": grpc.StatusCode.NOT_FOUND,
    "model_forbidden": grpc.StatusCode.PERMISSION_DENIED,
    "rate_limited": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "overloaded": grpc.StatusCode.UNAVAILABLE,
    "going_away": grpc.StatusCode.UNAVAILABLE,
    "server_busy": grpc.StatusCode.UNAVAILABLE,
    "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "inference_failed": grpc.StatusCode.INTERNAL,
    "internal_error": grpc.StatusCode.INTERNAL,
}

#: Where ``InferTensorContents`` keeps each datatype's elements (FP16 travels raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def _messages() -> dict[str, Any]:
    """Every message class of the service, by its name without the package."""
    pool = descriptor_pool.DescriptorPool()
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTORS.read_bytes())
    for proto in files.file:
        pool.Add(proto)
    found = pool.FindFileByName("grpc_service.proto")
    return {
        name: message_factory.GetMessageClass(desc)
        for name, desc in found.message_types_by_name.items()
    }


M = _messages()


def status_of(exc: errors.RealtimeError) -> grpc.StatusCode:
    """The gRPC status of a typed error."""
    default = (
        grpc.StatusCode.INVALID_ARGUMENT
        if isinstance(exc, errors.ProtocolError)
        else grpc.StatusCode.INTERNAL
    )
    return GRPC_STATUS.get(exc.code, default)


def _param(value: Any) -> Any:
    which = value.WhichOneof("parameter_choice")
    return None if which is None else getattr(value, which)


def decode_request(request: Any) -> oip.InferRequest:
    """A ``ModelInferRequest`` as an :class:`oip.InferRequest` (tensors from
    ``raw_input_contents`` without a copy beyond protobuf's, or from ``contents``)."""
    params = {key: _param(value) for key, value in request.parameters.items()}
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise errors.BadMessage(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    for i, entry in enumerate(request.inputs):
        name = entry.datatype
        dtype = oip.DATATYPES.get(name)
        if dtype is None:
            if name in ("BYTES", "BF16"):
                raise errors.DtypeMismatch(f"no model here takes {name} tensors")
            raise errors.BadMessage(f"unknown datatype {name!r}")
        shape = tuple(entry.shape)
        if any(d < 0 for d in shape):
            raise errors.BadMessage(f"input {entry.name}: negative dimension in {list(shape)}")
        if raw:
            array = oip.tensor(dtype, shape, raw[i])
        else:
            field = CONTENTS_FIELD.get(name)
            if field is None:
                raise errors.BadMessage(f"{name} tensors travel in raw_input_contents only")
            array = np.asarray(getattr(entry.contents, field), dtype)
            if array.size != math.prod(shape):
                raise errors.BadMessage(
                    f"input {entry.name}: {array.size} values for shape {list(shape)}"
                )
            array = array.reshape(shape)
        inputs[entry.name] = array
    outputs = tuple(o.name for o in request.outputs) or None
    seq, start, end, deadline = oip.request_options(params)
    return oip.InferRequest(
        request.model_name,
        request.model_version or None,
        request.id,
        inputs,
        outputs,
        False,
        seq,
        start,
        end,
        deadline,
    )


def encode_response(response: oip.InferResponse) -> Any:
    """An :class:`oip.InferResponse` as a ``ModelInferResponse`` (outputs as raw bytes)."""
    message = M["ModelInferResponse"](
        model_name=response.model, model_version=response.version, id=response.id
    )
    for name, array in response.outputs:
        message.outputs.add(name=name, datatype=oip.datatype(array.dtype), shape=array.shape)
        message.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
    message.parameters["queue_ms"].double_param = response.queue_ms
    message.parameters["infer_ms"].double_param = response.infer_ms
    message.parameters["batch"].int64_param = response.batch
    return message


class GrpcDoor:
    """The service's handlers, bound to an :class:`OipService`."""

    def __init__(self, service: OipService) -> None:
        self._service = service

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler that serves every method of the service."""

        def unary(method: Any, request: str, response: str) -> Any:
            return grpc.unary_unary_rpc_method_handler(
                method,
                request_deserializer=M[request].FromString,
                response_serializer=M[response].SerializeToString,
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "ServerLive": unary(self.server_live, "ServerLiveRequest", "ServerLiveResponse"),
                "ServerReady": unary(
                    self.server_ready, "ServerReadyRequest", "ServerReadyResponse"
                ),
                "ModelReady": unary(self.model_ready, "ModelReadyRequest", "ModelReadyResponse"),
                "ServerMetadata": unary(
                    self.server_metadata, "ServerMetadataRequest", "ServerMetadataResponse"
                ),
                "ModelMetadata": unary(
                    self.model_metadata, "ModelMetadataRequest", "ModelMetadataResponse"
                ),
                "ModelInfer": unary(self.model_infer, "ModelInferRequest", "ModelInferResponse"),
                "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                    self.model_stream_infer,
                    request_deserializer=M["ModelInferRequest"].FromString,
                    response_serializer=M["ModelStreamInferResponse"].SerializeToString,
                ),
            },
        )

    async def _grant(self, context: grpc.aio.ServicerContext) -> Grant | None:
        metadata = {k.lower(): v for k, v in context.invocation_metadata() or ()}
        try:
            return self._service.grant(metadata.get("authorization"), metadata.get("x-api-key"))
        except AuthFailed as e:
            code = (
                grpc.StatusCode.UNAUTHENTICATED
                if e.status == 401
                else grpc.StatusCode.PERMISSION_DENIED
            )
            await context.abort(code, e.reason)
            raise  # pragma: no cover - abort raises

    async def _fail(self, context: grpc.aio.ServicerContext, exc: errors.RealtimeError) -> None:
        self._service.failed(exc)
        context.set_trailing_metadata(((ERROR_CODE_KEY, exc.code),))
        await context.abort(status_of(exc), f"{exc.code}: {exc.message}")

    async def server_live(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Always live while it answers."""
        self._service.counted("grpc")
        return M["ServerLiveResponse"](live=True)

    async def server_ready(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Ready once the models are warm, not while shutting down."""
        self._service.counted("grpc")
        return M["ServerReadyResponse"](ready=self._service.ready)

    async def server_metadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Name, version and protocol extensions."""
        self._service.counted("grpc")
        return M["ServerMetadataResponse"](**self._service.server_metadata())

    async def model_ready(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Whether the model version exists for this caller (and the server is ready)."""
        self._service.counted("grpc")
        grant = await self._grant(context)
        try:
            self._service.model(request.name, request.version or None, grant)
        except errors.ProtocolError:
            return M["ModelReadyResponse"](ready=False)
        return M["ModelReadyResponse"](ready=self._service.ready)

    async def model_metadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The model's one input and its outputs (batch axis -1)."""
        self._service.counted("grpc")
        grant = await self._grant(context)
        try:
            meta = self._service.metadata(request.name, request.version or None, grant)
        except errors.RealtimeError as e:
            await self._fail(context, e)
        tensor = M["ModelMetadataResponse"].TensorMetadata
        return M["ModelMetadataResponse"](
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    async def model_infer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """One request: the call's deadline is the request's unless it gives its own."""
        service = self._service
        service.counted("grpc")
        grant = await self._grant(context)
        try:
            infer = decode_request(request)
            remaining = context.time_remaining()
            if infer.deadline_ms is None and remaining is not None:
                ms = min(60_000.0, max(0.001, remaining * 1000.0))
                infer = dataclasses.replace(infer, deadline_ms=ms)
            response = await service.infer(infer, grant, _who(grant, context))
        except errors.RealtimeError as e:
            await self._fail(context, e)
        return encode_response(response)

    async def model_stream_infer(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """Many requests on one call, answered as they complete (a sequence's in order); the
        call ends once the client has sent its last request and every one is answered."""
        service = self._service
        grant = await self._grant(context)
        out: asyncio.Queue[Any] = asyncio.Queue()
        room = asyncio.Event()
        bound = service.limits.max_inflight_per_session
        reading = True

        def send(request_id: str, outcome: oip.InferResponse | errors.RealtimeError) -> None:
            if isinstance(outcome, errors.RealtimeError):
                reply = M["ModelStreamInferResponse"](
                    error_message=f"{outcome.code}: {outcome.message}",
                    infer_response=M["ModelInferResponse"](id=request_id),
                )
            else:
                reply = M["ModelStreamInferResponse"](infer_response=encode_response(outcome))
            out.put_nowait(reply)
            if not reading and sequences.inflight == 0:
                out.put_nowait(None)

        sequences = service.sequences(grant, _who(grant, context), send)

        limits = service.limits
        now = time.monotonic()
        messages = TokenBucket(
            limits.max_messages_per_second, limits.max_messages_per_second / 2, now
        )

        async def read() -> None:
            nonlocal reading
            try:
                async for request in requests:
                    service.counted("grpc")
                    pause = messages.take(1, time.monotonic())
                    if pause:  # as a WebSocket session over its rate: stop reading a while
                        await asyncio.sleep(pause)
                    try:
                        sequences.request(decode_request(request))
                    except errors.RealtimeError as e:
                        sequences.refuse(request.id, e)
                    if out.qsize() >= bound:  # the client does not read its answers: wait
                        room.clear()
                        await room.wait()
            finally:
                reading = False
                if sequences.inflight == 0:
                    out.put_nowait(None)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while (reply := await out.get()) is not None:
                if out.qsize() < bound // 2:
                    room.set()
                yield reply
        finally:
            reader.cancel()
            sequences.close()


def _who(grant: Grant | None, context: grpc.aio.ServicerContext) -> str:
    """The caller, for round-robin fairness in the scheduler: its key, else its address."""
    if grant is not None:
        return f"oip:{grant.key}"
    peer: str = context.peer() or "?"  # "ipv4:127.0.0.1:5555"
    return f"oip:{peer.rsplit(':', 1)[0]}"


async def start(
    service: OipService,
    host: str,
    port: int,
    max_message_bytes: int,
    tls: tuple[bytes, bytes] | None = None,
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server, int]:
    """Bind and start the gRPC server on the running loop; returns it and its bound port.
    ``reuse_port``: sibling processes share the port (as with the WebSocket port)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ]
    )
    server.add_generic_rpc_handlers((GrpcDoor(service).handler(),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        key, chain = tls
        bound = server.add_secure_port(address, grpc.ssl_server_credentials([(key, chain)]))
    await server.start()
    log.info("event=grpc_listening address=%s:%d", host, bound)
    return server, bound
