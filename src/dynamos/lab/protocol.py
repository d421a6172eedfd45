"""Framing of the lab's command channel (one virtio-serial port), shared by host and guest.

A frame is one type byte, a 4-byte big-endian length and the payload, at most ``MAX_PAYLOAD``
bytes: a reader refuses a longer one before buffering it. Payloads are data only: raw bytes
(command output, stdin), or fixed fields packed with ``struct`` followed by length-prefixed UTF-8
strings. The host reads what the guest sends, and the guest runs code under test, so nothing it
sends is ever turned into objects by a general-purpose deserialiser. Only ``struct`` is needed on
either side: the agent's start-up pays no imports for it.
"""

from __future__ import annotations

import os
import select
import struct

HEADER = struct.Struct("!cI")
MAX_PAYLOAD = 1 << 20  # the agent sends output in chunks of 64 KiB; a RUN request is far smaller

# host -> guest
PING = b"P"  # asks the agent for HELLO: proves the guest is up
RUN = b"R"  # RunRequest
STDIN = b"I"  # bytes for the command's stdin
STDIN_EOF = b"D"
SIGNAL = b"K"  # !i signal number
RESIZE = b"Z"  # !HH rows, cols of a pty
# guest -> host
HELLO = b"H"  # !d uptime, then the release as UTF-8
STDOUT = b"O"
STDERR = b"E"
EXIT = b"X"  # !iid status, signal (0: none), seconds
START_FAILED = b"F"  # the error as UTF-8

_U32 = struct.Struct("!I")
_RUN_FIELDS = struct.Struct("!BHH")  # pty, rows, cols
_SIGNAL = struct.Struct("!i")
_RESIZE = struct.Struct("!HH")
_HELLO = struct.Struct("!d")
_EXIT = struct.Struct("!iid")


class FrameError(ValueError):
    """A frame that is too long or whose payload does not have the layout its type says."""


def encode(kind: bytes, payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(f"a {kind!r} frame of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(kind, len(payload)) + payload


def _pack_strings(items: list[str]) -> bytes:
    out = [_U32.pack(len(items))]
    for item in items:
        data = item.encode("utf-8", "surrogateescape")
        out += [_U32.pack(len(data)), data]
    return b"".join(out)


def _unpack_strings(payload: bytes, at: int) -> tuple[list[str], int]:
    try:
        (count,) = _U32.unpack_from(payload, at)
        at += _U32.size
        items = []
        for _ in range(count):
            (size,) = _U32.unpack_from(payload, at)
            at += _U32.size
            if at + size > len(payload):
                raise FrameError("a string runs past the end of its frame")
            items.append(payload[at:at + size].decode("utf-8", "surrogateescape"))
            at += size
    except struct.error as e:
        raise FrameError(f"truncated frame: {e}") from None
    return items, at


class RunRequest:
    """A command for the agent. A plain class: the agent imports nothing it can do without."""

    __slots__ = ("argv", "cwd", "env", "pty", "winsize")

    def __init__(self, argv: list[str], cwd: str, env: dict[str, str], pty: bool = False,
                 winsize: tuple[int, int] = (0, 0)) -> None:
        self.argv, self.cwd, self.env, self.pty, self.winsize = argv, cwd, env, pty, winsize  # winsize: rows, cols

    def encode(self) -> bytes:
        env = [f"{k}={v}" for k, v in self.env.items()]
        return encode(RUN, _RUN_FIELDS.pack(int(self.pty), *self.winsize)
                      + _pack_strings(self.argv) + _pack_strings([self.cwd]) + _pack_strings(env))

    @classmethod
    def decode(cls, payload: bytes) -> RunRequest:
        try:
            pty, rows, cols = _RUN_FIELDS.unpack_from(payload)
        except struct.error as e:
            raise FrameError(f"truncated RUN frame: {e}") from None
        argv, at = _unpack_strings(payload, _RUN_FIELDS.size)
        cwd, at = _unpack_strings(payload, at)
        env, at = _unpack_strings(payload, at)
        if at != len(payload) or not argv or len(cwd) != 1 or any("=" not in e for e in env):
            raise FrameError("malformed RUN frame")
        return cls(argv, cwd[0], dict(e.split("=", 1) for e in env), bool(pty), (rows, cols))


def _unpack(layout: struct.Struct, payload: bytes, what: str, exact: bool = True) -> tuple:
    if len(payload) < layout.size or (exact and len(payload) != layout.size):
        raise FrameError(f"{what} frame of {len(payload)} bytes, expected {layout.size}")
    return layout.unpack_from(payload)


def encode_signal(signum: int) -> bytes:
    return encode(SIGNAL, _SIGNAL.pack(signum))


def decode_signal(payload: bytes) -> int:
    return _unpack(_SIGNAL, payload, "SIGNAL")[0]


def encode_resize(rows: int, cols: int) -> bytes:
    return encode(RESIZE, _RESIZE.pack(rows, cols))


def decode_resize(payload: bytes) -> tuple[int, int]:
    return _unpack(_RESIZE, payload, "RESIZE")


def encode_hello(release: str, uptime: float) -> bytes:
    return encode(HELLO, _HELLO.pack(uptime) + release.encode())


def decode_hello(payload: bytes) -> tuple[str, float]:
    """(release, uptime in seconds) of a HELLO frame."""
    (uptime,) = _unpack(_HELLO, payload, "HELLO", exact=False)
    return payload[_HELLO.size:].decode(errors="replace"), uptime


def encode_exit(status: int, signum: int, seconds: float) -> bytes:
    return encode(EXIT, _EXIT.pack(status, signum, seconds))


def decode_exit(payload: bytes) -> tuple[int, int, float]:
    """(status, signal or 0, seconds) of an EXIT frame."""
    return _unpack(_EXIT, payload, "EXIT")


def write_all(fd: int, data: bytes) -> None:
    """Write every byte; on a non-blocking fd, wait until it takes more."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
            continue
        view = view[n:]


class FrameReader:
    """Incremental decoder: feed bytes, get complete (kind, payload) frames. A header that
    announces more than ``max_payload`` bytes raises FrameError at once, before any of it is kept."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.buf = bytearray()
        self.max_payload = max_payload

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self.buf += data
        frames = []
        while len(self.buf) >= HEADER.size:
            kind, length = HEADER.unpack_from(self.buf)
            if length > self.max_payload:
                raise FrameError(f"a {kind!r} frame announces {length} bytes, more than {self.max_payload}")
            if len(self.buf) < HEADER.size + length:
                break
            frames.append((kind, bytes(self.buf[HEADER.size:HEADER.size + length])))
            del self.buf[:HEADER.size + length]
        return frames
