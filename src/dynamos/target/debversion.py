"""Debian package versions (dpkg's order), the archive's versions of a package, and changelogs,
read with python-debian (Debian's own library for both).

Pure logic apart from ``archive_versions`` (apt-cache): what ``build --to`` needs to tell whether
a version exists and comes after the running one, and what the changelog says between them.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from debian.changelog import Changelog
from debian.debian_support import Version

from dynamos.errors import RefusedError

# --------------------------------------------------------------------------------------------------
# Debian versions


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as Debian version ``a`` sorts before, with or after ``b`` (dpkg's order)."""
    va, vb = Version(a), Version(b)
    return (va > vb) - (va < vb)


def archive_versions(package: str) -> list[str]:
    """The versions of ``package`` apt can download, newest first."""
    r = subprocess.run(["apt-cache", "madison", package], capture_output=True, text=True)
    known = list(dict.fromkeys(line.split("|")[1].strip() for line in r.stdout.splitlines() if "|" in line))
    return sorted(known, key=Version, reverse=True)


def check_to_version(running: str, to: str, known: list[str], package: str) -> None:
    """Refuse a ``--to`` the archive does not have (naming those it has), or one not newer than
    the version the kernel runs."""
    if to not in known:
        have = ", ".join(known) if known else "none (is the archive in apt's sources? run 'apt-get update')"
        raise RefusedError(f"--to {to}: the archive has no {package} of that version; it has {have}")
    if compare_versions(to, running) <= 0:
        same = "is the version" if to == running else "is older than the version"
        raise RefusedError(f"--to {to} {same} the kernel runs ({running}): build --to only goes forward")


# --------------------------------------------------------------------------------------------------
# Changelog


@dataclass(frozen=True)
class ChangelogEntry:
    version: str
    distribution: str
    lines: tuple[str, ...]  # the change lines, continuation lines joined

    def to_text(self) -> str:
        return f"{self.version}: " + " | ".join(self.lines)


_CVE_RE = re.compile(r"CVE-\d{4}-\d{4,}")


def parse_changelog(text: str) -> list[ChangelogEntry]:
    """Entries of a debian/changelog, newest first; each change line with its continuation lines."""
    return [ChangelogEntry(str(block.version), " ".join(block.distributions.split()), _change_lines(block.changes()))
            for block in Changelog(text, strict=False)]


def _change_lines(raw_lines: Iterable[str]) -> tuple[str, ...]:
    """A block's ``*``/``-``/``+`` items, each with the lines that continue it."""
    lines: list[str] = []
    for raw in raw_lines:
        stripped = raw.strip()
        if not stripped:
            continue
        if stripped[:1] in "*-+" and stripped[1:2] == " ":
            lines.append(stripped[2:].strip())
        elif lines and raw.startswith(" "):
            lines[-1] += " " + stripped
        else:
            lines.append(stripped)
    return tuple(lines)


def entries_between(entries: Iterable[ChangelogEntry], running: str, to: str) -> list[ChangelogEntry]:
    """The entries newer than ``running`` up to and including ``to``."""
    return [e for e in entries if compare_versions(e.version, running) > 0 and compare_versions(e.version, to) <= 0]


def cves_of(entries: Iterable[ChangelogEntry]) -> list[str]:
    return sorted({c for e in entries for line in e.lines for c in _CVE_RE.findall(line)})
