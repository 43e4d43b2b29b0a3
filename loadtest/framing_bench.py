"""``python -m loadtest.framing_bench``: a load client's CPU per frame, hand-rolled or websockets.

Why the raw client (:mod:`loadtest.rawws`) frames by hand: per chunk sent and per JSON result
read, in one process with no sockets, the cost of

- the pre-masked chunk template (what the raw client sends), and masking each frame afresh with
  numpy and a new key (what RFC 6455 asks of a browser);
- websockets' sans-I/O ``ClientProtocol`` (``send_binary`` + ``data_to_send``,
  ``receive_data`` + ``events_received``), the cheapest way to use that library.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import time
from collections.abc import Callable

import numpy as np
import orjson
from websockets.client import ClientProtocol
from websockets.protocol import State
from websockets.uri import parse_uri

from loadtest.rawws import OP_BINARY, ChunkTemplate, FrameReader, client_frame
from realtime.protocol import Chunk, encode_frame

CHUNK = encode_frame(Chunk(1, 0, 0.0, np.zeros(320, np.int16)))
RESULT = orjson.dumps(
    {
        "type": "result",
        "stream": 1,
        "seq": 17,
        "t": 0.0,
        "outputs": {
            "speech_prob": {"dtype": "float32", "shape": [1], "data": [0.93]},
            "energy_db": {"dtype": "float32", "shape": [1], "data": [-21.4]},
        },
        "windows": [320.0],
        "timing": {"queue_ms": 0.41, "infer_ms": 0.22, "batch": 12},
    }
)
SERVER_FRAME = bytes((0x81, 126)) + len(RESULT).to_bytes(2, "big") + RESULT


def _open_protocol() -> ClientProtocol:
    """A websockets client protocol taken through a real handshake, no socket."""
    proto = ClientProtocol(parse_uri("ws://127.0.0.1:1/"))
    request = proto.connect()
    proto.send_request(request)
    proto.data_to_send()
    key = request.headers["Sec-WebSocket-Key"].encode()
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    proto.receive_data(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    proto.events_received()
    assert proto.state is State.OPEN
    return proto


def cases(n: int) -> dict[str, Callable[[], None]]:
    """Each way of sending or reading ``n`` frames."""
    template = ChunkTemplate(CHUNK, os.urandom(4))
    reader = FrameReader()
    proto = _open_protocol()

    def raw_send() -> None:
        for k in range(n):
            template.frame(k)

    def raw_send_fresh_mask() -> None:
        for k in range(n):
            frame = bytearray(CHUNK)
            frame[8:12] = k.to_bytes(4, "little")
            client_frame(OP_BINARY, bytes(frame), os.urandom(4))

    def raw_receive() -> None:
        for _ in range(n):
            for _, payload in reader.feed(SERVER_FRAME):
                orjson.loads(payload)

    def websockets_send() -> None:
        for k in range(n):
            frame = bytearray(CHUNK)
            frame[8:12] = k.to_bytes(4, "little")
            proto.send_binary(bytes(frame))
            proto.data_to_send()

    def websockets_receive() -> None:
        for _ in range(n):
            proto.receive_data(SERVER_FRAME)
            for event in proto.events_received():
                orjson.loads(event.data)

    return {
        "raw send (pre-masked template)": raw_send,
        "raw send (numpy mask, fresh key)": raw_send_fresh_mask,
        "raw receive + orjson": raw_receive,
        "websockets ClientProtocol send": websockets_send,
        "websockets ClientProtocol receive + orjson": websockets_receive,
    }


def main() -> None:
    """Print microseconds of CPU per frame for each case."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.framing_bench")
    parser.add_argument("--frames", type=int, default=200_000)
    args = parser.parse_args()
    for name, run in cases(args.frames).items():
        started = time.process_time()
        run()
        print(f"{name}: {(time.process_time() - started) / args.frames * 1e6:.2f} us/frame")


if __name__ == "__main__":
    main()
