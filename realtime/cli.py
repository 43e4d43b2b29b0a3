"""The ``realtime`` command: ``serve`` a model folder, ``stream`` a WAV file to a server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np

from realtime import __version__, errors
from realtime.config import Config
from realtime.protocol import Error, Event, Result

DEFAULT_URL = "ws://127.0.0.1:8765/"


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
        "--models",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of DIR/<name>/<version>/model.onnx (repeatable)",
    )
    s.add_argument("--no-builtin", action="store_true", help="do not load the built-in models")
    s.add_argument("--workers", type=int, default=None, help="batches run at once (default: cores)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    st = sub.add_parser("stream", help="stream a WAV file to a server and print what comes back")
    st.add_argument("file", type=Path, help="a PCM WAV file")
    st.add_argument(
        "--model", default="speech_activity", help="model name (default speech_activity)"
    )
    st.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default {DEFAULT_URL})")
    st.add_argument(
        "--fast", action="store_true", help="send as fast as possible, not in real time"
    )
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


def _describe(msg: Result | Error | Event) -> str:
    if isinstance(msg, Error):
        return f"seq {msg.seq}: error {msg.code}: {msg.message}"
    if isinstance(msg, Event):
        return f"t={msg.t / 1000:7.3f}s  event {msg.event} {msg.data}"
    parts = []
    for name, a in msg.outputs.items():
        if a.size <= 4:
            parts.append(f"{name}=" + ",".join(f"{v:.3f}" for v in a.reshape(-1).tolist()))
        else:
            parts.append(f"{name}=<{'x'.join(map(str, a.shape))} max {float(a.max()):.3f}>")
    timing = msg.timing
    return (
        f"seq {msg.seq:5d}  t={msg.t / 1000:7.3f}s  {'  '.join(parts)}  "
        f"(queue {timing.queue_ms:.2f} ms, infer {timing.infer_ms:.2f} ms, batch {timing.batch})"
    )


async def stream_file(path: Path, model: str, url: str, fast: bool, out: Any = sys.stdout) -> int:
    """Stream a WAV file to a model chunk by chunk; print results as they arrive."""
    from realtime.client import Client

    samples, rate = read_wav(path)
    async with await Client.connect(url, name="realtime-stream") as client:
        entry = client.model(model)
        if entry["kind"] != "audio":
            raise errors.KindMismatch(f"{model} is a {entry['kind']} model, not an audio one")
        chunk = int(entry["input"]["chunk"])
        dtype = samples.dtype.name
        stream = await client.open(model, sample_rate=rate, dtype=dtype)
        n_chunks = -(-len(samples) // chunk)
        padded = np.zeros(n_chunks * chunk, samples.dtype)
        padded[: len(samples)] = samples
        print(
            f"streaming {path.name} ({len(samples) / rate:.2f} s, {rate} Hz) to {model}@"
            f"{stream.opened.version}: {n_chunks} chunks of {chunk} samples",
            file=out,
            flush=True,
        )
        counts = {"results": 0, "errors": 0}
        # --fast keeps a window of chunks in flight, well under the server's per-stream limit.
        window = asyncio.Semaphore(min(32, client.welcome.limits["max_inflight_per_stream"]))

        async def receive() -> None:
            async for msg in stream:
                if not isinstance(msg, Event):
                    window.release()
                    counts["errors" if isinstance(msg, Error) else "results"] += 1
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
            await stream.send(padded[i * chunk : (i + 1) * chunk], t=1000.0 * i * chunk / rate)
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``realtime`` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "info").upper(),
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "serve":
            from realtime.server import run

            defaults = Config()
            config = Config(
                host=args.host,
                port=args.port,
                model_dirs=tuple(args.models),
                builtin_models=not args.no_builtin,
                log_level=args.log_level,
                workers=args.workers or defaults.workers,
            )
            _run(run(config))
            return 0
        code: int = _run(stream_file(args.file, args.model, args.url, args.fast))
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
