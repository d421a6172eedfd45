"""One lock for every operation that changes a kernel, and the journal of what is in flight.

Two dynamos processes changing one kernel at once would each reason about a kernel the other is
changing; one killed midway leaves a change nobody has accounted for. So every change takes
``<root>/run/dynamos/lock`` (flock, held for the whole operation, released by the kernel when
the process dies, however it dies) and writes an *intent* line to the action log before touching
anything, then the result after. An intent with no result is an interrupted operation: ``status``
shows it, ``recover`` finishes or undoes it.

Without ``wait``, a held lock is refused at once naming the holder's pid (an operator should know
another change is under way rather than queue behind it silently); with ``wait`` seconds, the
operation waits that long for the lock and is then refused the same way.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dynamos.errors import RefusedError
from dynamos.kernel.actionlog import ActionLog

LOCK_FILE = "run/dynamos/lock"
INTENT = "intent"


def lock_path(root: Path) -> Path:
    return root / LOCK_FILE


def lock_holder(root: Path) -> int | None:
    """The pid of the dynamos process holding the lock now (None: nobody holds it)."""
    try:
        fd = os.open(lock_path(root), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_pid(fd) or -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


class OperationLock:
    """The exclusive lock on changing the kernel under ``root``."""

    def __init__(self, root: Path):
        self.path = lock_path(root)
        self.fd: int | None = None

    def acquire(self, what: str, wait: float | None = None) -> None:
        """Take the lock, or RefusedError naming the holder (after ``wait`` seconds, if given)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            why = "it is a symbolic link" if e.errno == errno.ELOOP else (e.strerror or str(e))
            raise RefusedError(f"{what}: refused, nothing was changed: cannot open the lock {self.path}: {why}") from e
        deadline = time.monotonic() + (wait or 0.0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise RefusedError(f"{what}: refused, nothing was changed: cannot lock {self.path}: "
                                       f"{e.strerror}") from e
                if time.monotonic() >= deadline:
                    pid = _read_pid(fd)
                    os.close(fd)
                    holder = f"pid {pid}" if pid else "another process"
                    waited = f" (waited {wait:g} s)" if wait else " (pass --wait SECONDS to wait for it)"
                    raise RefusedError(f"{what}: refused, nothing was changed: another dynamos ({holder}) is "
                                       f"changing this kernel and holds {self.path}{waited}") from None
                time.sleep(0.1)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:  # a full disk: refuse, as for any lock that cannot be taken
            os.close(fd)
            raise RefusedError(f"{what}: refused, nothing was changed: cannot write the lock {self.path}: "
                               f"{e.strerror or e}") from e
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None


class Journal:
    """Intent and result lines in the action log, under the operation lock."""

    def __init__(self, root: Path, log: ActionLog, wait: float | None = None):
        self.root = root
        self.log = log
        self.wait = wait
        self._lock = OperationLock(root)
        self._depth = 0

    @contextmanager
    def locked(self, what: str) -> Iterator[None]:
        """Hold the operation lock (re-entrant within this process: recover inside apply)."""
        if self._depth == 0:
            self._lock.acquire(what, self.wait)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._lock.release()

    def intent(self, action: str, name: str, details: dict[str, Any]) -> str:
        """Write (and fsync) the intent line of a change about to be made; its operation id.
        RefusedError if it cannot be written: a change the log cannot account for is not made."""
        op = f"{os.getpid()}-{time.time_ns()}"
        try:
            self.log.write({"action": action, "name": name, "result": INTENT, "op": op, "pid": os.getpid(),
                            "details": details}, strict=True)
        except OSError as e:
            raise RefusedError(f"{name}: refused, nothing was changed: cannot write the action log "
                               f"{self.log.path}: {e.strerror or e}") from e
        self.log.current_op = op
        return op

    def done(self) -> None:
        """The operation's result is written: later lines are not part of it."""
        self.log.current_op = None

    def pending(self) -> list[dict[str, Any]]:
        """Intents with no result line: operations that were interrupted (or run now)."""
        entries = self.log.entries()
        closed = {(e.get("op"), e.get("action")) for e in entries if e.get("op") and e.get("result") != INTENT}
        return [e for e in entries
                if e.get("result") == INTENT and (e.get("op"), e.get("action")) not in closed]

    @contextmanager
    def operation(self, action: str, name: str, details: dict[str, Any],
                  reached: Callable[[str], None] = lambda phase: None) -> Iterator[dict[str, Any]]:
        """Lock, intent, the change (the body), result: for changes with no undo of their own
        (switch, retire); the body may add to the yielded details. ``reached`` is told each phase
        (``locked``, ``intent-logged``, ``result-logged``: see ``phases``)."""
        start = time.monotonic()
        with self.locked(name):
            reached("locked")
            self.intent(action, name, details)
            try:
                reached("intent-logged")
                yield details
            except BaseException as e:
                result = "refused" if isinstance(e, RefusedError) else (
                    "interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
                self.log.record(action, name, result, time.monotonic() - start, {**details, "error": str(e)})
                raise
            else:
                self.log.record(action, name, "ok", time.monotonic() - start, details)
                reached("result-logged")
            finally:
                self.done()
