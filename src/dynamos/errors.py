"""Error types shared by every layer.

Each error carries an exit status so the CLI can map failures to distinct codes without
inspecting messages, and an optional location (file, line) so authors see where to look.
"""

from __future__ import annotations

from pathlib import Path


class DynamosError(Exception):
    """Base of every error dynamos reports to a user; ``str()`` is the user-facing message."""

    exit_status = 1

    def __init__(self, message: str, *, path: Path | str | None = None, line: int | None = None):
        self.message = message
        self.path = Path(path) if path is not None else None
        self.line = line
        super().__init__(self.__str__())

    def refusals(self) -> list[dict[str, str]]:
        """Machine-readable reasons (``{"code", "message"}``) for ``--json``; [] if it has none."""
        return []

    def details(self) -> dict:
        """More of what happened, merged into the one ``--json`` failure object (e.g. the tasks
        a transition waited for); {} if there is nothing more to say."""
        return {}

    def __str__(self) -> str:
        if self.path is None:
            return self.message
        where = str(self.path) if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.message}"


class UsageError(DynamosError):
    """A command line dynamos cannot make sense of: an unknown option, a missing or malformed
    argument (EX_USAGE, as sysexits.h numbers it)."""

    exit_status = 64


class UpdateSourceError(DynamosError):
    """An update source (``update.toml`` or its C files) is invalid."""

    exit_status = 2


class PackageError(DynamosError):
    """An update package is malformed, tampered with, or for another kernel."""

    exit_status = 3


class BuildError(DynamosError):
    """Building an update package failed (compiler error, missing headers...). ``code``, when the
    raiser knows it, says why in the vocabulary of ``dynamos.builder.refusals`` (``build --to``
    reports it per file); None leaves it to ``refusals.code_of``."""

    exit_status = 4

    def __init__(self, message: str, *, path: Path | str | None = None, line: int | None = None,
                 code: str | None = None):
        self.code = code
        super().__init__(message, path=path, line=line)


class RefusedError(DynamosError):
    """An operation was refused before touching the kernel (nothing was changed)."""

    exit_status = 5


class TransitionError(DynamosError):
    """A transition did not complete; the update was reverted (the message says how far)."""

    exit_status = 6


class OperationInterrupted(DynamosError):
    """An operation was interrupted (Ctrl-C) and dynamos finished or undid it; the message says which."""

    exit_status = 130


class TargetError(DynamosError):
    """A target kernel (its packages, headers, image) could not be obtained or prepared."""

    exit_status = 7


class LabError(DynamosError):
    """The lab VM failed to boot, timed out, or the guest kernel oopsed."""

    exit_status = 8
