"""The ``realtime`` command: ``serve`` a model folder, ``stream`` a WAV file to a server."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np

from realtime import __version__, errors
from realtime.admission import AdmissionPolicy
from realtime.config import Config
from realtime.protocol import Error, Event, Result
from realtime.session import Limits

DEFAULT_URL = "ws://127.0.0.1:8765/"
#: ``realtime stream --fast``: the deadline of a file's chunks (not live: late is still useful).
FILE_DEADLINE_MS = 10_000.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="realtime", description="Model predictions over one WebSocket."
    )
    p.add_argument("--version", action="version", version=f"realtime {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve the built-in models and any model folders")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8765, help="port to bind (default 8765; 0: any)")
    s.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help="also serve the Open Inference Protocol over gRPC on this port (tritonclient[grpc] "
        "and other Triton/KServe clients; see docs/invoke.md)",
    )
    s.add_argument(
        "--models",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of DIR/<name>/<version>/model.onnx (repeatable)",
    )
    s.add_argument("--no-builtin", action="store_true", help="do not load the built-in models")
    s.add_argument(
        "--processes",
        type=int,
        default=None,
        help="server processes sharing the port (SO_REUSEPORT), supervised by this one "
        "(default: one per core; see docs/deploy.md)",
    )
    s.add_argument(
        "--workers",
        type=int,
        default=None,
        help="batches run at once per process (default: cores / processes)",
    )
    s.add_argument(
        "--redis",
        metavar="URL",
        help="redis://host:port/db: keep sessions in Redis, to resume on any process or machine "
        "(docs/deploy.md); default: sessions stay on this machine",
    )
    s.add_argument(
        "--checkpoint-seconds",
        type=float,
        default=Config().checkpoint_seconds,
        help="with --redis: checkpoint each changed session this often; a client whose process "
        "dies resumes from its last checkpoint (default %(default)s)",
    )
    s.add_argument("--peer-dir", type=Path, help=argparse.SUPPRESS)  # set by the supervisor
    s.add_argument(
        "--batch-timeout-seconds",
        type=float,
        default=Config().batch_timeout_seconds,
        help="a batch running longer fails its chunks and its worker is replaced; /healthz "
        "reports the stuck worker (default %(default)s)",
    )
    policy = AdmissionPolicy()
    s.add_argument(
        "--admit-load",
        type=float,
        default=policy.target_load,
        help="admission control: new sessions are refused (server_busy) once the admitted ones "
        "would use more than this share of the event loop or the cores (default %(default)s; "
        "0: admit every session, and do not shed chunks by age unless --shed-by-age on; see "
        "docs/scheduler.md)",
    )
    s.add_argument(
        "--shed-by-age",
        choices=["on", "off"],
        help="shed live chunks by their age once the server is behind (dropped for a newer "
        "chunk, or deadline_exceeded when read too late; default: on while admission control "
        "is, so --admit-load 0 --shed-by-age on admits every session and still sheds)",
    )
    s.add_argument(
        "--admit-lag-ms",
        type=float,
        default=policy.max_lag_ms,
        help="admission control: refuse new sessions and streams while the event loop runs "
        "this late on average (default %(default)s)",
    )
    s.add_argument(
        "--admit-late-ms",
        type=float,
        default=policy.late_ms,
        help="admission control: a result sent this long after its live audio chunk was due is "
        "late; past 1 %% of late results (median over live audio streams) new sessions and "
        "streams are refused (default %(default)s)",
    )
    s.add_argument(
        "--admit-take-back-seconds",
        type=float,
        default=policy.take_back_seconds,
        help="admission control: once most live audio streams' results have been late this "
        "long, or the newest sessions have waited this long while the server is behind, the "
        "newest are ended server_busy, so that the rest are on time again (default "
        "%(default)s; 0: never)",
    )
    s.add_argument(
        "--busy-retry-ms",
        type=float,
        default=policy.retry_after_ms,
        help="retry_after_ms told to a client refused server_busy (default %(default)s)",
    )
    s.add_argument(
        "--close-grace-seconds",
        type=float,
        default=Config().close_grace_seconds,
        help="on shutdown, after draining, how long clients get to read their answers and close "
        "(and cut ones to resume) before the server closes their connections (default "
        "%(default)s)",
    )
    s.add_argument(
        "--batch-stretch",
        type=float,
        default=Config().batch_stretch,
        help="while the server is busy, a model's batches wait up to this many times its "
        "max_delay_ms to fill, which costs less CPU a chunk (default %(default)s; 1: never "
        "longer; see docs/scheduler.md)",
    )
    s.add_argument(
        "--intra-op-threads",
        type=int,
        default=1,
        help="ONNX Runtime threads inside one batch (default 1; see docs/scheduler.md)",
    )
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one JSON object per line, key=value pairs as fields (for log shippers)",
    )
    s.add_argument("--keys", type=Path, help="API keys file (TOML; see docs/security.md)")
    s.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a browser origin allowed to connect, e.g. https://app.example (repeatable)",
    )
    s.add_argument(
        "--max-sessions-per-ip",
        type=int,
        default=Limits().max_sessions_per_ip,
        help="sessions open at once from one address (default %(default)s; raise it behind a "
        "proxy on the same host, where every client is 127.0.0.1)",
    )
    s.add_argument(
        "--max-rate-per-ip",
        type=int,
        nargs=2,
        metavar=("MESSAGES", "BYTES"),
        default=(Limits().max_messages_per_second_per_ip, Limits().max_bytes_per_second_per_ip),
        help="messages and bytes a second from all the sessions of one address together "
        "(default %(default)s; raise it where many clients share an address)",
    )
    s.add_argument(
        "--max-connections",
        type=int,
        default=Config().max_connections,
        help="sessions connected at once in all; past it HTTP 503 server_busy (default "
        "%(default)s)",
    )
    s.add_argument(
        "--resume-seconds",
        type=float,
        default=Limits().resume_seconds,
        help="how long a session whose connection was lost is kept for its client to resume "
        "(default %(default)s; 0: no resuming)",
    )
    s.add_argument(
        "--resume-dir",
        type=Path,
        help="a private folder where sessions are handed to the next server process on "
        "SIGTERM: clients resume there with their streams and state (docs/operations.md)",
    )
    s.add_argument("--certfile", type=Path, help="TLS certificate chain (PEM): serve wss://")
    s.add_argument("--keyfile", type=Path, help="TLS private key (PEM)")
    s.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve a non-loopback address without keys (only behind a gateway that checks)",
    )
    s.add_argument(
        "--reload-seconds",
        type=float,
        default=2.0,
        help="look for new or removed model versions this often (0: only on SIGHUP)",
    )

    st = sub.add_parser(
        "stream", help="stream a WAV file to a server and print its results and events"
    )
    st.add_argument(
        "file", type=Path, help="a PCM WAV file, any sample rate (the server resamples)"
    )
    st.add_argument(
        "--model", default="speech_activity", help="model name (default speech_activity)"
    )
    st.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default {DEFAULT_URL})")
    st.add_argument(
        "--fast", action="store_true", help="send as fast as possible, not in real time"
    )
    st.add_argument(
        "--chunk-ms", type=float, default=20.0, help="audio per chunk sent, in ms (default 20)"
    )
    st.add_argument(
        "--events-only", action="store_true", help="print events, not one line per result"
    )
    st.add_argument(
        "--deadline-ms",
        type=float,
        default=None,
        help="how long after arrival a chunk's result is still wanted (default: the model's); "
        "a file processed in full on a busy server wants a long one",
    )
    t = sub.add_parser("token", help="mint a short-lived session token for a browser page")
    tsub = t.add_subparsers(dest="token_command", required=True)
    tm = tsub.add_parser("mint", help="print a token signed with an API key")
    tm.add_argument("--keys", type=Path, help="API keys file (or REALTIME_API_KEYS)")
    tm.add_argument("--key", required=True, help="the id of the key to sign with")
    tm.add_argument("--ttl", type=float, default=300.0, help="seconds it is valid (default 300)")
    tm.add_argument("--models", help="comma-separated models it allows (default: the key's)")

    m = sub.add_parser("models", help="manage model folders")
    msub = m.add_subparsers(dest="models_command", required=True)
    q = msub.add_parser(
        "quantize", help="write an int8 version next to DIR/<name>/<version> and compare them"
    )
    q.add_argument("folder", type=Path, help="a model version folder, DIR/<name>/<version>")
    return p


def read_wav(path: Path) -> tuple[np.ndarray[Any, Any], int]:
    """Samples (mono; int16 or uint8 as stored, else float32) and sample rate of a PCM WAV file."""
    try:
        with wave.open(str(path), "rb") as w:
            rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
            raw = w.readframes(w.getnframes())
    except (OSError, wave.Error, EOFError) as e:
        raise errors.ConfigError(f"{path}: cannot read as PCM WAV: {e}") from None
    dtype = {1: "u1", 2: "<i2", 4: "<i4"}.get(width)
    if dtype is None:
        raise errors.ConfigError(f"{path}: {8 * width}-bit samples are not supported")
    samples = np.frombuffer(raw, dtype=dtype).reshape(-1, channels)
    if channels == 1:
        return samples[:, 0], rate
    scale = {1: 1 / 128, 2: 1 / 32768, 4: 1 / 2147483648}[width]
    mono = samples.astype(np.float32).mean(axis=1) * scale
    return (mono - 1.0 if width == 1 else mono).astype(np.float32), rate


def describe_event(event: Event) -> str:
    """One event as a person reads it: time in seconds, name, then its fields."""
    fields = "  ".join(f"{k}={_value(v)}" for k, v in event.data.items())
    return f"{event.t / 1000:8.3f} s  {event.event:<13} {fields}".rstrip()


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v[:8]) + (", ...]" if len(v) > 8 else "]")
    return str(v)


def _describe(msg: Result | Error | Event) -> str:
    if isinstance(msg, Error):
        return f"seq {msg.seq}: error {msg.code}: {msg.message}"
    if isinstance(msg, Event):
        return describe_event(msg)
    parts = []
    for name, a in msg.outputs.items():
        if a.size <= 4:
            parts.append(f"{name}=" + ",".join(f"{v:.3f}" for v in a.reshape(-1).tolist()))
        else:
            parts.append(f"{name}=<{'x'.join(map(str, a.shape))} max {float(a.max()):.3f}>")
    timing = msg.timing
    windows = "" if msg.windows is None else f"  windows={len(msg.windows)}"
    return (
        f"seq {msg.seq:5d}  t={msg.t / 1000:7.3f}s{windows}  {'  '.join(parts)}  "
        f"(queue {timing.queue_ms:.2f} ms, infer {timing.infer_ms:.2f} ms, batch {timing.batch})"
    )


async def stream_file(
    path: Path,
    model: str,
    url: str,
    fast: bool,
    out: Any = sys.stdout,
    chunk_ms: float = 20.0,
    events_only: bool = False,
    deadline_ms: float | None = None,
) -> int:
    """Stream a WAV file to a model chunk by chunk; print results and events as they arrive.

    The last chunk ends the segment, so the model sees the end of the file and what is still
    open (an utterance, a note) is closed.
    """
    from realtime.client import Client

    samples, rate = read_wav(path)
    if not 0 < chunk_ms <= 10_000:
        raise errors.ConfigError("--chunk-ms must be in (0, 10000]")
    async with await Client.connect(url, name="realtime-stream") as client:
        entry = client.model(model)
        if entry["kind"] != "audio":
            raise errors.KindMismatch(f"{model} is a {entry['kind']} model, not an audio one")
        chunk = max(1, round(rate * chunk_ms / 1000))
        dtype = samples.dtype.name
        # A file sent as fast as it is served is not live: unless told, a result is useful
        # whenever it comes, so a stall of a busy machine must not shed its chunks.
        if deadline_ms is None and fast:
            deadline_ms = FILE_DEADLINE_MS
        stream = await client.open(model, sample_rate=rate, dtype=dtype, deadline_ms=deadline_ms)
        n_chunks = max(1, -(-len(samples) // chunk))
        print(
            f"streaming {path.name} ({len(samples) / rate:.2f} s, {rate} Hz) to {model}@"
            f"{stream.opened.version}: {n_chunks} chunks of {chunk} samples",
            file=out,
            flush=True,
        )
        counts = {"results": 0, "errors": 0}
        # --fast keeps about 320 ms of audio in flight (at most 32 chunks, well under the
        # server's per-stream limit): a stateful model runs a stream's windows one at a time,
        # so more would only queue past the deadline.
        in_flight = max(1, min(32, round(320 / chunk_ms)))
        window = asyncio.Semaphore(min(in_flight, client.welcome.limits["max_inflight_per_stream"]))

        async def receive() -> None:
            async for msg in stream:
                if not isinstance(msg, Event):
                    window.release()
                    counts["errors" if isinstance(msg, Error) else "results"] += 1
                    if events_only and isinstance(msg, Result):
                        continue
                print(_describe(msg), file=out, flush=True)

        reader = asyncio.get_running_loop().create_task(receive())
        start = time.monotonic()
        for i in range(n_chunks):
            if fast:
                await window.acquire()
            else:
                delay = start + i * chunk / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)  # real-time pacing, not synchronisation
            await stream.send(
                samples[i * chunk : (i + 1) * chunk],
                t=1000.0 * i * chunk / rate,
                end_of_segment=i == n_chunks - 1,
            )
        await stream.close()
        await reader
        closed = stream.closed
        print(
            f"end of stream: {counts['results']} results, {counts['errors']} errors "
            f"(server: {closed.results if closed else '?'} results, "
            f"{closed.errors if closed else '?'} errors)",
            file=out,
            flush=True,
        )
        return 0 if counts["errors"] == 0 else 1


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, and the message's ``key=value`` pairs
    as fields (our log lines are written that way), the rest as ``message``."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        fields: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        rest = []
        for word in text.split(" "):
            key, eq, value = word.partition("=")
            if eq and key.isidentifier() and key not in fields:
                fields[key] = value
            else:
                rest.append(word)
        if rest:
            fields["message"] = " ".join(rest)
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return json.dumps(fields)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``realtime`` console script."""
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if getattr(args, "log_format", "text") == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    )
    logging.basicConfig(level=getattr(args, "log_level", "info").upper(), handlers=[handler])
    logging.getLogger("websockets").setLevel(logging.WARNING)  # ours says connect/disconnect
    try:
        if args.command == "token":
            from realtime.auth import load_keys, mint

            keys = load_keys(args.keys)
            if args.key not in keys:
                raise errors.ConfigError(f"no key {args.key!r} in {args.keys or 'the environment'}")
            models = args.models.split(",") if args.models else None
            print(mint(keys[args.key], args.ttl, time.time(), models))
            return 0
        if args.command == "models":
            from realtime.models.quantize import quantize

            report = quantize(args.folder)
            print(json.dumps(report, indent=2))
            return 0
        if args.command == "serve":
            from realtime.auth import load_keys
            from realtime.server import run
            from realtime.supervisor import default_processes

            defaults = Config()
            processes = args.processes or default_processes()
            if processes < 1:
                raise errors.ConfigError("--processes must be at least 1")
            workers = args.workers or max(1, defaults.workers // processes)
            config = Config(
                host=args.host,
                port=args.port,
                grpc_port=args.grpc_port,
                model_dirs=tuple(args.models),
                builtin_models=not args.no_builtin,
                log_level=args.log_level,
                workers=workers,
                batch_timeout_seconds=args.batch_timeout_seconds,
                close_grace_seconds=args.close_grace_seconds,
                resume_dir=args.resume_dir,
                reuse_port=args.peer_dir is not None,
                peer_dir=args.peer_dir,
                redis_url=args.redis,
                checkpoint_seconds=args.checkpoint_seconds,
                intra_op_threads=args.intra_op_threads,
                batch_stretch=args.batch_stretch,
                shed_by_age=None if args.shed_by_age is None else args.shed_by_age == "on",
                admission=AdmissionPolicy(
                    target_load=args.admit_load,
                    max_lag_ms=args.admit_lag_ms,
                    late_ms=args.admit_late_ms,
                    take_back_seconds=args.admit_take_back_seconds,
                    retry_after_ms=args.busy_retry_ms,
                ),
                reload_seconds=args.reload_seconds,
                keys=load_keys(args.keys),
                allowed_origins=tuple(args.allow_origin),
                certfile=args.certfile,
                keyfile=args.keyfile,
                insecure_no_auth=args.insecure_no_auth,
                max_connections=args.max_connections,
                limits=Limits(
                    max_sessions_per_ip=args.max_sessions_per_ip,
                    max_messages_per_second_per_ip=args.max_rate_per_ip[0],
                    max_bytes_per_second_per_ip=args.max_rate_per_ip[1],
                    resume_seconds=args.resume_seconds,
                ),
            )
            if processes > 1:  # a parent for N children, each a server as below
                from realtime.supervisor import serve

                config.check()  # refused here, once, rather than by every child
                given = sys.argv[1:] if argv is None else argv
                child = [*given[given.index("serve") + 1 :], "--workers", str(workers)]
                if args.grpc_port == 0:  # one gRPC port for every child too, as for --port 0
                    from realtime.supervisor import reserve_port

                    held = reserve_port(args.host, 0)
                    child += ["--grpc-port", str(held.getsockname()[1])]
                return serve(child, processes, args.host, args.port)
            if args.peer_dir is not None:  # a supervisor's child: it drains if the parent dies
                from realtime.supervisor import stop_with_parent

                stop_with_parent()
            _run(run(config))
            return 0
        code: int = _run(
            stream_file(
                args.file,
                args.model,
                args.url,
                args.fast,
                chunk_ms=args.chunk_ms,
                events_only=args.events_only,
                deadline_ms=args.deadline_ms,
            )
        )
        return code
    except errors.RealtimeError as e:
        print(f"realtime: {e.code}: {e.message}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"realtime: {e}", file=sys.stderr)
        return 2


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; this keeps Windows usable
        return asyncio.run(coro)
    return uvloop.run(coro)


if __name__ == "__main__":
    sys.exit(main())
