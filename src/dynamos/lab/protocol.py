"""Framing of the lab's command channel (one virtio-serial port), shared by host and guest.

A frame is one type byte, a 4-byte big-endian length and the payload.  Stdlib only: the guest
agent imports this with ``python -S``.
"""

from __future__ import annotations

import json
import os
import struct

HEADER = struct.Struct("!cI")

# host -> guest
PING = b"P"  # asks the agent for HELLO: proves the guest is up
RUN = b"R"  # JSON {argv, cwd, env, pty}
STDIN = b"I"  # bytes for the command's stdin
STDIN_EOF = b"D"
SIGNAL = b"K"  # JSON {signal}
RESIZE = b"Z"  # JSON {rows, cols} for a pty
# guest -> host
HELLO = b"H"  # JSON {release, uptime}
STDOUT = b"O"
STDERR = b"E"
EXIT = b"X"  # JSON {status, signal, seconds}
START_FAILED = b"F"  # JSON {error}


def encode(kind: bytes, payload: bytes | dict) -> bytes:
    if isinstance(payload, dict):
        payload = json.dumps(payload).encode()
    return HEADER.pack(kind, len(payload)) + payload


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class FrameReader:
    """Incremental decoder: feed bytes, get complete (kind, payload) frames."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self.buf += data
        frames = []
        while len(self.buf) >= HEADER.size:
            kind, length = HEADER.unpack_from(self.buf)
            if len(self.buf) < HEADER.size + length:
                break
            frames.append((kind, bytes(self.buf[HEADER.size:HEADER.size + length])))
            del self.buf[:HEADER.size + length]
        return frames
