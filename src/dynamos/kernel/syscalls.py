"""The few system calls the kernel layer makes, behind one small object.

Everything else the kernel layer does is reading files under a root directory (``/proc``,
``/sys``); the calls here are the rest, including writes to kernel attributes (writing a livepatch's
``enabled`` starts a transition, as a syscall would). Keeping them in one injectable object lets
unit tests substitute a simulated kernel (with its own clock) for the live one, while the real
implementation stays real: libc through ctypes, errno turned into ``OSError``.
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Protocol


class Syscalls(Protocol):
    """What the kernel layer asks of the running system besides files under its root."""

    def init_module(self, image: bytes, params: str = "") -> None:
        """Load a module from its ELF image (``init_module(2)``); raise OSError on failure."""

    def delete_module(self, name: str, flags: int = os.O_NONBLOCK) -> None:
        """Unload a module by name (``delete_module(2)``); raise OSError on failure."""

    def mount(self, source: str, target: str, fstype: str, flags: int = 0, data: str | None = None) -> None:
        """Mount a filesystem (``mount(2)``); raise OSError on failure."""

    def write_attribute(self, path: str, value: bytes) -> None:
        """Write a kernel attribute file (sysfs) in one write(2); raise OSError (ENOENT if absent).

        A syscall in spirit: for livepatch, the write itself starts or reverses a transition.
        """

    def geteuid(self) -> int:
        """Effective user id of this process."""

    def release(self) -> str:
        """Release of the running kernel, as ``uname -r`` prints it."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (timeouts, phase timings)."""

    def sleep(self, seconds: float) -> None:
        """Wait between polls of the kernel's state."""


class LibcSyscalls:
    """The real thing: libc's wrappers through ctypes, with errno preserved."""

    def __init__(self) -> None:
        self._libc: ctypes.CDLL | None = None

    @property
    def libc(self) -> ctypes.CDLL:
        # Loaded on first use so importing dynamos never depends on a libc being present.
        if self._libc is None:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.init_module.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_char_p]
            libc.init_module.restype = ctypes.c_int
            libc.delete_module.argtypes = [ctypes.c_char_p, ctypes.c_uint]
            libc.delete_module.restype = ctypes.c_int
            libc.mount.argtypes = [
                ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p,
            ]
            libc.mount.restype = ctypes.c_int
            self._libc = libc
        return self._libc

    @staticmethod
    def _raise_errno(what: str) -> None:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")

    def init_module(self, image: bytes, params: str = "") -> None:
        # The image goes straight from memory to the kernel: no temporary file to leak or race.
        buf = ctypes.create_string_buffer(image, len(image))
        if self.libc.init_module(buf, len(image), params.encode()) != 0:
            self._raise_errno("init_module")

    def delete_module(self, name: str, flags: int = os.O_NONBLOCK) -> None:
        if self.libc.delete_module(name.encode(), flags) != 0:
            self._raise_errno("delete_module")

    def mount(self, source: str, target: str, fstype: str, flags: int = 0, data: str | None = None) -> None:
        raw = ctypes.c_char_p(data.encode()) if data is not None else None
        if self.libc.mount(source.encode(), target.encode(), fstype.encode(), flags, raw) != 0:
            self._raise_errno("mount")

    def write_attribute(self, path: str, value: bytes) -> None:
        # No O_CREAT: an attribute that vanished (patch freed) must fail, not become a file.
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, value)
        finally:
            os.close(fd)

    def geteuid(self) -> int:
        return os.geteuid()

    def release(self) -> str:
        return os.uname().release

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)
