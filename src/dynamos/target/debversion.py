"""Debian package versions (dpkg's order), the archive's versions of a package, and changelogs.

Pure logic apart from ``archive_versions`` (apt-cache): what ``build --to`` needs to tell whether
a version exists and comes after the running one, and what the changelog says between them.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from dynamos.errors import RefusedError

# --------------------------------------------------------------------------------------------------
# Debian versions


def _order(c: str) -> int:
    """dpkg's character order in the non-digit parts: ~ before everything, letters before others."""
    if c == "~":
        return -1
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _compare_part(a: str, b: str) -> int:
    while a or b:
        na = re.match(r"[^0-9]*", a).group(0)  # type: ignore[union-attr]
        nb = re.match(r"[^0-9]*", b).group(0)  # type: ignore[union-attr]
        for i in range(max(len(na), len(nb))):
            ca = _order(na[i]) if i < len(na) else 0
            cb = _order(nb[i]) if i < len(nb) else 0
            if ca != cb:
                return -1 if ca < cb else 1
        a, b = a[len(na):], b[len(nb):]
        da = re.match(r"[0-9]*", a).group(0)  # type: ignore[union-attr]
        db = re.match(r"[0-9]*", b).group(0)  # type: ignore[union-attr]
        if int(da or 0) != int(db or 0):
            return -1 if int(da or 0) < int(db or 0) else 1
        a, b = a[len(da):], b[len(db):]
    return 0


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as Debian version ``a`` sorts before, with or after ``b`` (epoch, upstream, revision)."""
    def split(v: str) -> tuple[int, str, str]:
        epoch, _, rest = v.rpartition(":") if ":" in v else ("0", "", v)
        upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "0")
        return int(epoch or 0), upstream, revision
    ea, ua, ra = split(a)
    eb, ub, rb = split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _compare_part(ua, ub) or _compare_part(ra, rb)


def archive_versions(package: str) -> list[str]:
    """The versions of ``package`` apt can download, newest first."""
    r = subprocess.run(["apt-cache", "madison", package], capture_output=True, text=True)
    known = list(dict.fromkeys(line.split("|")[1].strip() for line in r.stdout.splitlines() if "|" in line))
    return sorted(known, key=_VersionKey, reverse=True)


class _VersionKey:
    def __init__(self, version: str):
        self.version = version

    def __lt__(self, other: _VersionKey) -> bool:
        return compare_versions(self.version, other.version) < 0


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


_HEAD_RE = re.compile(r"^(\S+) \(([^)]+)\) ([^;]+);")
_CVE_RE = re.compile(r"CVE-\d{4}-\d{4,}")


def parse_changelog(text: str) -> list[ChangelogEntry]:
    """Entries of a debian/changelog, newest first; each change line with its continuation lines."""
    entries: list[ChangelogEntry] = []
    version = dist = ""
    lines: list[str] = []

    def close() -> None:
        if version:
            entries.append(ChangelogEntry(version, dist, tuple(lines)))

    for raw in text.splitlines():
        head = _HEAD_RE.match(raw)
        if head:
            close()
            version, dist, lines = head.group(2), head.group(3).strip(), []
            continue
        stripped = raw.strip()
        if not version or not stripped or raw.startswith(" -- "):
            continue
        if stripped[:1] in "*-+" and stripped[1:2] == " ":
            lines.append(stripped[2:].strip())
        elif lines and raw.startswith(" "):
            lines[-1] += " " + stripped
        else:
            lines.append(stripped)
    close()
    return entries


def entries_between(entries: Iterable[ChangelogEntry], running: str, to: str) -> list[ChangelogEntry]:
    """The entries newer than ``running`` up to and including ``to``."""
    return [e for e in entries if compare_versions(e.version, running) > 0 and compare_versions(e.version, to) <= 0]


def cves_of(entries: Iterable[ChangelogEntry]) -> list[str]:
    return sorted({c for e in entries for line in e.lines for c in _CVE_RE.findall(line)})
