"""The action log: one JSON line for everything dynamos does to a kernel.

A kernel changed by hand is hard to reason about after the fact; the log answers "what was
loaded, when, and did it work" on the machine itself. Every line is fsynced: it is the journal
``recover`` reads after a crash. An intent (written before a change) that cannot be written
refuses the change (see ``journal``); a result that cannot be written only warns, since the
change it reports has been made and failing it would misreport the kernel.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

LOG_ENV = "DYNAMOS_LOG"
DEFAULT_LOG = "var/log/dynamos/actions.log"

logger = logging.getLogger("dynamos.kernel")


def default_log_path(root: Path) -> Path:
    """``$DYNAMOS_LOG`` if set, else ``<root>/var/log/dynamos/actions.log``."""
    env = os.environ.get(LOG_ENV)
    return Path(env) if env else root / DEFAULT_LOG


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class ActionLog:
    """Append-only JSON-lines log of kernel operations."""

    def __init__(self, path: Path):
        self.path = path
        self.current_op: str | None = None  # the journal's operation in flight: its result carries the id

    def record(
        self,
        action: str,
        name: str,
        result: str,
        seconds: float,
        details: dict[str, Any] | None = None,
    ) -> bool:
        """Append one entry; return False (after a warning) if it could not be written."""
        entry: dict[str, Any] = {
            "action": action,
            "name": name,
            "result": result,
            "seconds": round(seconds, 6),
            "details": details or {},
        }
        if self.current_op is not None:
            entry["op"] = self.current_op
        try:
            self.write(entry, strict=True)
        except OSError as e:
            logger.warning("dynamos: could not write the action log %s: %s", self.path, e)
            return False
        return True

    def write(self, entry: dict[str, Any], strict: bool = False) -> None:
        """Append ``entry`` (time added first) and fsync it; OSError if ``strict`` and it failed."""
        line = json.dumps({"time": now_iso(), **entry}, sort_keys=False, default=str) + "\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # One write() on an O_APPEND descriptor keeps concurrent writers' lines whole.
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                data = line.encode()
                written = os.write(fd, data)
                if written != len(data):
                    # A full disk took part of the line: cut it off, or the next line would be glued
                    # to it and both lost to the reader (an intent lost, or a result, and its op
                    # would look interrupted forever).
                    os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR) - written)
                    raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes): disk full?")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            if strict:
                raise

    def entries(self) -> list[dict[str, Any]]:
        """Every readable entry, oldest first (lines that do not parse are skipped)."""
        try:
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out
