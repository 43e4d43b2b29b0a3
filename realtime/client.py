"""The Python asyncio client: one connection, many streams, results as async iterators.

Used by ``realtime stream``, the tests and the load tester. Errors the server sends about a
request (an open, a close) are raised as the same :mod:`realtime.errors` leaf the server raised;
errors about a chunk arrive in the stream's results in sequence order.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from ssl import SSLContext
from typing import Any

import numpy as np
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from realtime import errors
from realtime.protocol import (
    FLAG_END_OF_SEGMENT,
    Chunk,
    Close,
    Closed,
    Error,
    Event,
    GoingAway,
    Hello,
    Message,
    Open,
    Opened,
    Overflow,
    Ping,
    Pong,
    Result,
    ResultFrame,
    Timing,
    Welcome,
    decode_frame,
    decode_text,
    encode_frame,
    encode_text,
)

StreamMessage = Result | Error | Event
_CODES = errors.all_codes()


def raise_error(err: Error) -> errors.RealtimeError:
    """The error-tree exception for an error message (unknown codes become RealtimeError)."""
    cls = _CODES.get(err.code, errors.RealtimeError)
    if cls is errors.ServerBusy:  # try again after retry_after_ms
        retry = 0.0 if err.retry_after_ms is None else err.retry_after_ms
        return errors.ServerBusy(err.message, retry_after_ms=retry, stream=err.stream, seq=err.seq)
    exc = cls(err.message, stream=err.stream, seq=err.seq)
    if isinstance(exc, errors.Overloaded) and err.reason in ("inflight", "queue"):
        exc.reason = "inflight" if err.reason == "inflight" else "queue"
    return exc


def _handshake_error(refused: InvalidStatus) -> Exception:
    """A refused handshake's typed error (from its JSON body's ``code``: ``server_busy`` in a
    503), else the refusal itself."""
    try:
        body = orjson.loads(refused.response.body or b"")
    except orjson.JSONDecodeError:
        return refused
    cls = _CODES.get(str(body.get("code"))) if isinstance(body, dict) else None
    if cls is None:
        return refused
    message = str(body.get("error", ""))
    if cls is errors.ServerBusy:
        return errors.ServerBusy(message, retry_after_ms=float(body.get("retry_after_ms") or 0))
    return cls(message)


class Stream:
    """One open stream on a :class:`Client`: send chunks, iterate results in order.

    Iteration (and :meth:`next`) yields each chunk's result or error in sequence order, and the
    stream's events (``speech_start``, ``note_on``, ...) where the server sent them: after the
    result of the chunk that completed them. With ``on_event`` given to :meth:`Client.open`,
    events go to that callback instead and iteration yields results and errors only.
    """

    def __init__(
        self, client: Client, opened: Opened, on_event: Callable[[Event], None] | None = None
    ) -> None:
        self.client = client
        self.opened = opened
        self.on_event = on_event
        self.id = opened.stream
        self.output_names = [o["name"] for o in opened.outputs]
        self._seq = itertools.count()
        self._queue: asyncio.Queue[StreamMessage | Closed | ConnectionError] = asyncio.Queue()
        self._partial: dict[int, list[ResultFrame]] = {}
        #: Chunks sent and not answered yet, by seq: sent again after a resume if the server
        #: did not get them.
        self._unanswered: dict[int, bytes] = {}
        self.closed: Closed | None = None

    async def send(
        self,
        data: np.ndarray[Any, Any],
        *,
        t: float | None = None,
        seq: int | None = None,
        deadline_ms: int = 0,
        end_of_segment: bool = False,
    ) -> int:
        """Send one chunk; returns its sequence number. ``t`` is your clock, in ms.

        While the client resumes a lost connection this waits for it; the chunk is kept until
        its answer comes, and sent again after a resume if the server did not get it.
        """
        n = next(self._seq) if seq is None else seq
        chunk = Chunk(
            self.id,
            n,
            time.time() * 1000.0 if t is None else t,
            data,
            deadline_ms=deadline_ms,
            flags=FLAG_END_OF_SEGMENT if end_of_segment else 0,
        )
        frame = encode_frame(chunk)
        self._unanswered[n] = frame
        await self.client._send(frame)
        return n

    async def next(self) -> StreamMessage:
        """The next result, chunk error or event, in sequence order."""
        msg = await self._get()
        if isinstance(msg, Closed):
            raise EOFError(f"stream {self.id} is closed")
        return msg

    async def _get(self) -> StreamMessage | Closed:
        msg = await self._queue.get()
        if isinstance(msg, ConnectionError):
            raise msg
        return msg

    async def close(self) -> Closed:
        """Close the stream and wait until the server has sent every result of it.

        Results still queued stay readable (iteration ends after the last one).
        """
        closed = await self.client._request(Close(self.id), ("closed", self.id))
        assert isinstance(closed, Closed)
        self.closed = closed
        return closed

    async def collect(self) -> list[StreamMessage]:
        """Everything not yet read, up to the end of the stream (after :meth:`close`)."""
        return [msg async for msg in self]

    def __aiter__(self) -> AsyncIterator[StreamMessage]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[StreamMessage]:
        while True:
            msg = await self._get()
            if isinstance(msg, Closed):
                self.closed = msg
                return
            yield msg

    def _on_frame(self, frame: ResultFrame) -> None:
        parts = self._partial.setdefault(frame.seq, [])
        parts.append(frame)
        if len(parts) == frame.count:
            del self._partial[frame.seq]
            self._unanswered.pop(frame.seq, None)
            parts.sort(key=lambda f: f.index)
            timing = Timing(frame.queue_us / 1000.0, frame.infer_us / 1000.0, 0)
            names = self.output_names
            outputs = {name: f.data for name, f in zip(names, parts[: len(names)], strict=True)}
            windows = parts[-1].data if len(parts) > len(names) else None
            self._queue.put_nowait(Result(self.id, frame.seq, frame.t, outputs, timing, windows))


class Client:
    """A connection to a `realtime` server.

    When the connection is lost (not closed by either side), the client dials again with
    jittered back-off and resumes its session (``hello.resume``) for as long as the server keeps
    it (``resume_seconds``): streams, their models' state and every answer come back, in order,
    none twice; chunks the server did not get are sent again. Meanwhile :meth:`Stream.send` waits.
    If the session cannot be resumed, every stream gets a ``ConnectionError``.
    """

    def __init__(
        self,
        ws: ClientConnection,
        welcome: Welcome,
        dial: Callable[[bool], Awaitable[ClientConnection]] | None = None,
        name: str = "realtime.client",
    ) -> None:
        self.ws = ws
        self.welcome = welcome
        self._dial = dial
        self._name = name
        #: The token that resumes this session (from the welcome, or a later going_away).
        self.resume_token = welcome.resume_token
        #: Times this client resumed its session after a lost connection.
        self.resumes = 0
        #: Set once the client has resumed its session (await it; ``resumes`` counts them).
        self.resumed = asyncio.Event()
        self._received = 0  # messages read since the first welcome (a resume says how many)
        self._online = asyncio.Event()  # set while connected (cleared while resuming)
        self._online.set()
        self._closing = False
        self.streams: dict[int, Stream] = {}
        #: Requests sent and not answered, by the key of their answer: the future the answer
        #: resolves, and the request (sent again on a resume if the server did not get it).
        self._waiting: dict[tuple[str, int], tuple[asyncio.Future[Message], Message]] = {}
        self._stream_ids = itertools.count(1)
        self._ping_ids = itertools.count(1)
        self._unrouted: asyncio.Queue[Error] = asyncio.Queue()
        #: Set when the server announced its shutdown (send nothing more; reconnect later).
        self.going_away: GoingAway | None = None
        #: Set when the server ended this session ``server_busy`` after admitting it (it fell
        #: behind: connect again after ``retry_after_ms``, or elsewhere).
        self.taken_back: errors.ServerBusy | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(
        cls,
        url: str = "ws://127.0.0.1:8765/",
        name: str = "realtime.client",
        *,
        token: str | None = None,
        api_key: str | None = None,
        ssl: SSLContext | None = None,
    ) -> Client:
        """Connect, say hello and wait for the welcome. ``token`` (minted by a backend) or
        ``api_key`` authenticate; ``ssl`` verifies a ``wss://`` server (default: system CAs)."""
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if api_key is not None:
            headers["X-Api-Key"] = api_key
        tls: dict[str, Any] = {} if ssl is None else {"ssl": ssl}

        def dial(resume: bool = False) -> Awaitable[ClientConnection]:
            # A resume says so in its URL: a full server refusing a crowd at the door lets it in.
            to = with_query(url, "resume=1") if resume else url
            return connect(to, compression=None, max_size=None, additional_headers=headers, **tls)

        try:
            ws = await dial()
        except InvalidStatus as e:  # refused at the handshake: its typed error, if it has one
            raise _handshake_error(e) from e
        msg = await _greet(ws, Hello(client=name))
        return cls(ws, msg, dial, name)

    @property
    def models(self) -> list[dict[str, Any]]:
        """The server's model catalog, from the welcome."""
        return self.welcome.models

    def model(self, name: str, version: str | None = None) -> dict[str, Any]:
        """The catalog entry of a model (its default version unless one is named)."""
        for m in self.models:
            if m["name"] == name and (
                m["version"] == version or (version is None and m["default"])
            ):
                return m
        raise errors.UnknownModel(f"no model {name!r} in the catalog")

    async def open(
        self,
        model: str,
        *,
        version: str | None = None,
        kind: str | None = None,
        dtype: str | None = None,
        shape: tuple[int, ...] | None = None,
        sample_rate: int | None = None,
        deadline_ms: float | None = None,
        results: str = "json",
        options: dict[str, Any] | None = None,
        overflow: Overflow | None = None,
        stream_id: int | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> Stream:
        """Open a stream; kind, dtype and sample rate default to what the catalog says.

        Audio chunks may then be of any length, at ``sample_rate`` (the server resamples).
        ``on_event``, if given, is called with each event of the stream (see :class:`Stream`).
        """
        entry = next((m for m in self.models if m["name"] == model), None)
        info = entry["input"] if entry else {}
        sid = next(self._stream_ids) if stream_id is None else stream_id
        msg = Open(
            stream=sid,
            model=model,
            version=version,
            kind=kind or (entry["kind"] if entry else "tensor"),  # type: ignore[arg-type]
            dtype=dtype or info.get("dtype", "float32"),
            shape=shape,
            sample_rate=sample_rate or info.get("sample_rate"),
            deadline_ms=deadline_ms,
            results=results,  # type: ignore[arg-type]
            options=options or {},
            overflow=overflow,
        )
        # The stream must exist before the server can answer, so no result is ever unrouted.
        stream = Stream(self, Opened(sid, model, "", {}, [], 0.0), on_event)
        self.streams[sid] = stream
        try:
            opened = await self._request(msg, ("opened", sid))
        except BaseException:
            self.streams.pop(sid, None)
            raise
        assert isinstance(opened, Opened)
        stream.opened = opened
        stream.output_names = [o["name"] for o in opened.outputs]
        return stream

    async def ping(self) -> tuple[float, float]:
        """Round trip and server-minus-client clock offset, both in ms."""
        t0 = time.time() * 1000.0
        pid = next(self._ping_ids)
        pong = await self._request(Ping(pid, t0), ("pong", pid))
        assert isinstance(pong, Pong)
        t1 = time.time() * 1000.0
        return t1 - t0, pong.server_time - (t0 + t1) / 2

    async def next_error(self) -> Error:
        """The next error that concerns no open stream (bad frames, unknown streams)."""
        return await self._unrouted.get()

    async def close(self) -> None:
        """Close the connection (the session ends: it is not kept to resume)."""
        self._closing = True
        await self.ws.close()
        self._reader.cancel()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _send(self, data: bytes | str) -> None:
        """Send a frame already kept for a resume (in ``_unanswered`` or ``_waiting``); while
        resuming, wait until the session is back: the resume sent it if the server lacked it."""
        if not self._online.is_set():
            await self._online.wait()
            if self._reader.done():
                raise ConnectionError("the connection was lost and the session not resumed")
            return
        try:
            await self.ws.send(data)
        except ConnectionClosed:
            if self._reader.done() or not self._may_resume():
                raise ConnectionError(
                    f"connection closed ({self.ws.close_code} {self.ws.close_reason})"
                ) from None

    async def _request(self, msg: Message, key: tuple[str, int]) -> Message:
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[key] = (fut, msg)
        try:
            await self._send(encode_text(msg).decode())
            return await fut
        finally:
            self._waiting.pop(key, None)

    def _may_resume(self) -> bool:
        """Whether the session can be resumed: the connection was lost (not closed by us or
        the server), or the server handed the session to its next process (going_away with a
        resume token)."""
        handed_off = self.going_away is not None and self.going_away.resume_token is not None
        return (
            not self._closing
            and self._dial is not None
            and self.resume_token is not None
            and (self.ws.protocol.close_rcvd is None or handed_off)
        )

    async def _read(self) -> None:
        exc: BaseException | None = None
        try:
            while True:
                try:
                    async for raw in self.ws:
                        self._received += 1
                        if isinstance(raw, bytes):
                            frame = decode_frame(raw)
                            if isinstance(frame, ResultFrame) and frame.stream in self.streams:
                                self.streams[frame.stream]._on_frame(frame)
                            continue
                        self._route(decode_text(raw))
                except ConnectionClosed:
                    pass
                if not self._may_resume():
                    return
                try:
                    await self._resume()
                except (OSError, errors.RealtimeError, InvalidHandshake, ConnectionClosed) as e:
                    exc = e
                    return
        finally:
            self._online.set()  # senders waiting for a resume wake up and see it failed
            lost = ConnectionError(
                f"connection closed ({self.ws.close_code} {self.ws.close_reason})"
                + ("" if exc is None else f"; not resumed: {exc}")
                + ("" if self.taken_back is None else f": {self.taken_back}")
            )
            lost.__cause__ = self.taken_back
            for fut, _ in self._waiting.values():
                if not fut.done():
                    fut.set_exception(lost)
            for stream in self.streams.values():
                stream._queue.put_nowait(lost)

    async def _resume(self) -> None:
        """Dial again (jittered back-off, for as long as the server keeps the session), take
        the session back, and send again what the server did not get."""
        assert self._dial is not None and self.resume_token is not None
        self._online.clear()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + float(self.welcome.limits.get("resume_seconds", 30.0))
        hello = Hello(client=self._name, resume=self.resume_token, received=self._received)
        delay = 0.05
        while True:
            try:
                ws = await self._dial(True)
                welcome = await _greet(ws, hello)  # a refusal raises its error: no retry
                break
            except (OSError, InvalidHandshake, ConnectionClosed):
                if loop.time() + delay > give_up:
                    raise
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # back-off, not a wait
                delay = min(2 * delay, 2.0)
        assert welcome.resumed is not None
        self.ws = ws
        self.welcome = welcome  # its ``resumed`` says where each stream's chunks got to
        self._received = int(welcome.resumed["from"])
        held = {int(s["stream"]): s for s in welcome.resumed["streams"]}
        # No await from here to _online.set(): every frame kept so far is sent again if the
        # server lacks it, and senders that waited for the resume must not send it twice.
        protocol = ws.protocol
        for (kind, sid), (_, msg) in self._waiting.items():
            # Answers the server produced are in the replay; requests it never got go again.
            if (
                kind == "pong"
                or (kind == "opened" and sid not in held)
                or (kind == "closed" and sid in held and not held[sid]["closing"])
            ):
                protocol.send_text(encode_text(msg))
        for sid, stream in self.streams.items():
            if sid in held:
                received = int(held[sid]["received"])
                for seq, frame in sorted(stream._unanswered.items()):
                    if seq > received:
                        protocol.send_binary(frame)
        ws.send_data()
        self.resumes += 1
        self.resumed.set()
        self.going_away = None  # a new process took the session over, if one was going away
        self._online.set()

    def _route(self, msg: Message) -> None:
        key: tuple[str, int] | None = None
        if isinstance(msg, GoingAway):
            self.going_away = msg  # results of what was sent still come; then the close
            if msg.resume_token is not None and self._dial is not None:
                # The session moves to the next server process: hold new chunks until it
                # resumes there (those sent meanwhile are refused with going_away errors).
                self.resume_token = msg.resume_token
                self._online.clear()
            return
        if isinstance(msg, Opened):
            key = ("opened", msg.stream)
        elif isinstance(msg, Pong):
            key = ("pong", msg.id)
        elif isinstance(msg, Closed):
            key = ("closed", msg.stream)
            if msg.stream in self.streams:
                self.streams.pop(msg.stream)._queue.put_nowait(msg)
        if key is not None:
            waiting = self._waiting.get(key)
            if waiting is not None and not waiting[0].done():
                waiting[0].set_result(msg)
            return
        if isinstance(msg, Error):
            if msg.stream is None and msg.code == errors.ServerBusy.code:
                busy = raise_error(msg)  # the server took this session back; the close follows
                assert isinstance(busy, errors.ServerBusy)
                self.taken_back = busy
            if msg.seq is None and msg.stream is not None:
                for kind in ("opened", "closed"):
                    waiting = self._waiting.get((kind, msg.stream))
                    if waiting is not None and not waiting[0].done():
                        waiting[0].set_exception(raise_error(msg))
                        return
            stream = self.streams.get(msg.stream) if msg.stream is not None else None
            if stream is not None and msg.seq is not None:
                stream._unanswered.pop(msg.seq, None)
                stream._queue.put_nowait(msg)
            else:
                self._unrouted.put_nowait(msg)
            return
        if isinstance(msg, Result | Event):
            stream = self.streams.get(msg.stream)
            if stream is None:
                return
            if isinstance(msg, Result):
                stream._unanswered.pop(msg.seq, None)
            if isinstance(msg, Event) and stream.on_event is not None:
                stream.on_event(msg)
            else:
                stream._queue.put_nowait(msg)


async def _greet(ws: ClientConnection, hello: Hello) -> Welcome:
    """Say hello on a new connection and return the welcome (raise the error instead)."""
    await ws.send(encode_text(hello).decode())
    msg = decode_text(await ws.recv())
    if isinstance(msg, Error):
        await ws.close()
        raise raise_error(msg)
    if not isinstance(msg, Welcome):
        await ws.close()
        raise errors.BadMessage(f"expected welcome, got {msg!r}")
    return msg


def with_query(url: str, param: str) -> str:
    """``url`` with ``param`` (``name=value``) added to its query, before any fragment."""
    base, hash_, fragment = url.partition("#")
    return base + ("&" if "?" in base else "?") + param + hash_ + fragment
