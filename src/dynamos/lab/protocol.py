"""Framing of the lab's command channel (one virtio-serial port), shared by host and guest.

A frame is one type byte, a 4-byte big-endian length and the payload.  Structured payloads use
``marshal``: the guest runs the host's own interpreter (same binary, through the shared root), and
marshal is built in, where json would cost the agent ~0.2 s of imports under TCG at every boot.
"""

from __future__ import annotations

import marshal
import os
import struct

HEADER = struct.Struct("!cI")

# host -> guest
PING = b"P"  # asks the agent for HELLO: proves the guest is up
RUN = b"R"  # {argv, cwd, env, pty, winsize}
STDIN = b"I"  # bytes for the command's stdin
STDIN_EOF = b"D"
SIGNAL = b"K"  # {signal}
RESIZE = b"Z"  # {rows, cols} for a pty
# guest -> host
HELLO = b"H"  # {release, uptime}
STDOUT = b"O"
STDERR = b"E"
EXIT = b"X"  # {status, signal, seconds}
START_FAILED = b"F"  # {error}


def encode(kind: bytes, payload: bytes | dict) -> bytes:
    if isinstance(payload, dict):
        payload = marshal.dumps(payload)
    return HEADER.pack(kind, len(payload)) + payload


def decode(payload: bytes) -> dict:
    """The dict a structured frame carries."""
    value = marshal.loads(payload)
    if not isinstance(value, dict):
        raise ValueError("structured frame does not hold a dict")
    return value


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
