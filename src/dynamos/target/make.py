"""Running make on a target's kernel tree: one environment, streamed output, the errors of a log.

Every make dynamos runs (an update module against the headers, preparing the source tree,
compiling one unit of it) goes through here, so host settings that would make Kbuild build
something other than the target's objects are dropped in one place.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable

from dynamos.errors import BuildError

MAKE_JOBS = 2

# Environment that would make Kbuild build something else than the target's objects (every
# ``KBUILD_*`` variable is dropped too).
_HOSTILE_ENV = frozenset({
    "MAKEFLAGS", "MFLAGS", "GNUMAKEFLAGS", "MAKELEVEL", "ARCH", "SRCARCH", "CROSS_COMPILE", "LLVM", "LLVM_IAS",
    "CC", "LD", "AS", "HOSTCC", "HOSTCXX", "O", "M", "C", "W", "V",
    "KCFLAGS", "KCPPFLAGS", "KAFLAGS", "KRUSTFLAGS", "KERNELRELEASE", "KERNELVERSION", "LOCALVERSION",
    "CFLAGS_KERNEL", "AFLAGS_KERNEL", "CFLAGS_MODULE", "AFLAGS_MODULE", "LDFLAGS_MODULE",
    "DISTRIBUTION_OFFICIAL_BUILD", "DISTRIBUTOR", "DISTRIBUTION_VERSION",
})

_ERROR_RE = re.compile(r": (?:fatal )?error: |^ERROR: |: undefined reference to ")
_CONTEXT_RE = re.compile(r": In function |^In file included from |^\s+from ")
_EXCERPT_RE = re.compile(r"^\s*\d*\s+\|")
_NOTE_RE = re.compile(r": note: ")  # where the error's names are declared ("declared here")
_MAX_ERROR_LINES = 60


def make_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for make in a source tree: host overrides removed, Debian's stamps set."""
    env = {k: v for k, v in os.environ.items() if k not in _HOSTILE_ENV and not k.startswith("KBUILD_")}
    # English, ASCII diagnostics: error_lines() parses them. Kbuild unexports LC_ALL, hence the rest.
    env.update(LC_ALL="C", LANG="C", LC_MESSAGES="C", LC_CTYPE="C")
    if extra:
        env.update(extra)
    return env


def stream_make(cmd: list[str], env: dict[str, str], on_line: Callable[[str], None]) -> tuple[int, str]:
    """Run make with its output merged, each line passed to ``on_line`` as it comes (progress);
    returns the exit status and the whole log, command first."""
    lines = ["$ " + " ".join(cmd)]
    try:
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, env=env) as proc:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                lines.append(line)
                on_line(line)
            status = proc.wait()
    except FileNotFoundError as e:  # make removed between the toolchain check and now
        raise BuildError(f"cannot run make: {e}") from e
    return status, "\n".join(lines) + "\n"


def error_lines(log: str) -> list[str]:
    """The compiler and modpost errors of a build log, with their source excerpts and context.

    Warnings are left out: they are in the full log, and here they would bury the error.
    """
    out: list[str] = []
    pending: list[str] = []  # "In file included from" / "In function" lines before a diagnostic
    in_error = False  # the excerpt lines that follow belong to a kept diagnostic
    notes = False  # a note now belongs to the last error ("declared here": where its name is)
    for line in log.splitlines():
        if _ERROR_RE.search(line):
            out.extend(pending)
            out.append(line)
            pending, in_error, notes = [], True, True
        elif _EXCERPT_RE.match(line):
            if in_error:
                out.append(line)
        elif _NOTE_RE.search(line):
            if notes:
                out.append(line)
            pending, in_error = [], notes
        elif _CONTEXT_RE.search(line):
            pending.append(line)
            in_error = False
        else:
            pending, in_error, notes = [], False, False
    if len(out) > _MAX_ERROR_LINES:
        out = out[:_MAX_ERROR_LINES] + [f"... ({len(out) - _MAX_ERROR_LINES} more lines in the log)"]
    return out
