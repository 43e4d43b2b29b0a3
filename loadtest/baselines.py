"""The two baselines `python -m loadtest` runs next to `realtime`, on the same machine and load.

- ``echo``: a bare websockets server that sends every message straight back. Nothing can answer
  faster over this transport on this machine: the ceiling.
- ``naive``: what most tutorials build. Each binary message is one 20 ms int16 audio chunk; the
  handler runs the same ONNX model (the built-in ``speech_activity``) on it as it arrives, on the
  event loop, and sends the result as JSON. No batching, no queue, no deadlines. With
  ``--model silero_vad`` the same for silero VAD (32 ms chunks), keeping each connection's
  recurrent state and context as silero's own example loop does.

    python -m loadtest.baselines echo --port 0     # prints "listening on ws://127.0.0.1:PORT/"
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
from websockets.asyncio.server import ServerConnection, serve

from realtime.models.repository import BUILTIN_DIR
from realtime.protocol import decode_frame

REPO = Path(__file__).resolve().parents[1]
SILERO = REPO / "examples" / "models" / "silero_vad" / "1" / "model.onnx"


async def echo(ws: ServerConnection) -> None:
    """Send every message back as it came."""
    async for message in ws:
        await ws.send(message)


def _session(model_path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])


def naive_handler(model_path: str) -> object:
    """The per-message handler of the naive server for ``speech_activity`` (one ORT session)."""
    session = _session(model_path)
    input_name = session.get_inputs()[0].name

    async def handle(ws: ServerConnection) -> None:
        async for message in ws:
            if isinstance(message, str):
                continue
            started = time.perf_counter()
            chunk = decode_frame(message)
            stream, seq = chunk.stream, chunk.seq
            x = (chunk.data.astype(np.float32) / 32768.0)[np.newaxis]
            prob, energy = session.run(None, {input_name: x})
            infer_ms = (time.perf_counter() - started) * 1000.0
            await ws.send(
                orjson.dumps(
                    {
                        "type": "result",
                        "stream": stream,
                        "seq": seq,
                        "outputs": {"speech_prob": float(prob[0]), "energy_db": float(energy[0])},
                        "timing": {"queue_ms": 0.0, "infer_ms": infer_ms, "batch": 1},
                    }
                ).decode()
            )

    return handle


def naive_silero_handler(model_path: str) -> object:
    """The naive server for silero VAD, as its own README's loop: per connection a recurrent
    state and 64 samples of context; each 512-sample chunk is one model call as it arrives."""
    session = _session(model_path)
    sr = np.array(16000, np.int64)

    async def handle(ws: ServerConnection) -> None:
        state = np.zeros((2, 1, 128), np.float32)
        context = np.zeros((1, 64), np.float32)
        async for message in ws:
            if isinstance(message, str):
                continue
            started = time.perf_counter()
            chunk = decode_frame(message)
            x = np.concatenate([context, (chunk.data.astype(np.float32) / 32768.0)[np.newaxis]], 1)
            prob, state = session.run(None, {"input": x, "state": state, "sr": sr})
            context = x[:, -64:]
            infer_ms = (time.perf_counter() - started) * 1000.0
            await ws.send(
                orjson.dumps(
                    {
                        "type": "result",
                        "stream": chunk.stream,
                        "seq": chunk.seq,
                        "outputs": {"output": float(prob[0, 0])},
                        "timing": {"queue_ms": 0.0, "infer_ms": infer_ms, "batch": 1},
                    }
                ).decode()
            )

    return handle


async def main_async(kind: str, port: int, model: str = "speech_activity") -> None:
    if kind == "echo":
        handler = echo
    elif model == "silero_vad":
        handler = naive_silero_handler(str(SILERO))
    else:
        handler = naive_handler(str(BUILTIN_DIR / "speech_activity/1/model.onnx"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serve(handler, "127.0.0.1", port, compression=None, max_size=None) as server:  # type: ignore[arg-type]
        bound = server.sockets[0].getsockname()[1]
        print(f"{kind} listening on ws://127.0.0.1:{bound}/", flush=True)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="a baseline server for the load test")
    parser.add_argument("kind", choices=["echo", "naive"])
    parser.add_argument("--model", choices=["speech_activity", "silero_vad"])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    import uvloop

    uvloop.run(main_async(args.kind, args.port, args.model or "speech_activity"))


if __name__ == "__main__":
    main()
