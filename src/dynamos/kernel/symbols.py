"""Symbols of the running kernel: ``/proc/kallsyms`` and ftrace's traceable functions.

Livepatch finds each patched function by name in kallsyms at load time and redirects it through
ftrace, so an update is only loadable when every function exists, is unambiguous (or carries a
``sympos``) and is traceable. Reading both tables first turns the kernel's terse ``-EINVAL`` into a
message that names the function.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from dynamos.abi import TEXT_TYPES, VMLINUX

# nm types kallsyms shows for code: local/global text and weak definitions (weak data is 'v'/'V').

# Where tracefs lives: its own mount point since 4.1, and the debugfs automount for older setups.
TRACEFS_DIRS = ("sys/kernel/tracing", "sys/kernel/debug/tracing")


def _split_module(rest: list[str]) -> str:
    """Object of a kallsyms/ftrace entry: ``[module]`` after the name, else vmlinux."""
    if rest and rest[0].startswith("[") and rest[0].endswith("]"):
        return rest[0][1:-1]
    return VMLINUX


@dataclass
class Kallsyms:
    """``/proc/kallsyms`` as ``(object, name) -> types in table order``.

    The table order matters: livepatch's ``sympos`` is the position of a symbol among the
    same-named symbols of one object, counted in the order kallsyms lists them, and the kernel
    counts symbols of every type (not only code) when it does so.
    """

    entries: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, lines: Iterable[str]) -> Kallsyms:
        table: defaultdict[tuple[str, str], list[str]] = defaultdict(list)
        for line in lines:
            parts = line.split()
            if len(parts) < 3:
                continue
            _addr, kind, name, *rest = parts
            table[(_split_module(rest), name)].append(kind)
        return cls(dict(table))

    @classmethod
    def read(cls, root: Path, names: Iterable[str] | None = None) -> Kallsyms:
        """The table, or with ``names`` only the lines about those names (and their
        compiler-renamed variants): a full parse costs seconds under emulation."""
        with open(root / "proc/kallsyms", "rb") as f:
            data = f.read()
        if names is None:
            return cls.parse(data.decode("utf-8", errors="replace").splitlines())
        return cls.parse(lines_mentioning(data, [b" " + n.encode() for n in names]))

    def count(self, name: str, object: str = VMLINUX) -> int:
        """Number of code symbols called ``name`` in ``object`` (vmlinux or a module)."""
        return sum(1 for kind in self.entries.get((object, name), ()) if kind in TEXT_TYPES)

    def count_all(self, name: str, object: str = VMLINUX) -> int:
        """Number of symbols of any type called ``name``: the range livepatch checks sympos against."""
        return len(self.entries.get((object, name), ()))

    def kind_at(self, name: str, object: str, sympos: int) -> str | None:
        """nm type of the ``sympos``-th (1-based) symbol called ``name``, or None if out of range."""
        kinds = self.entries.get((object, name), [])
        return kinds[sympos - 1] if 1 <= sympos <= len(kinds) else None

    @cached_property
    def objects(self) -> frozenset[str]:
        return frozenset(obj for obj, _ in self.entries)

    def has_object(self, object: str) -> bool:
        """Whether any symbol of ``object`` is listed (a module appears once it is loaded)."""
        return object == VMLINUX or object in self.objects

    def variants(self, name: str, object: str = VMLINUX) -> list[str]:
        """Compiler-renamed copies of ``name`` (``.isra.0``, ``.constprop.0``, ``.part.0``...)."""
        prefix = name + "."
        return sorted(
            n for (obj, n), kinds in self.entries.items()
            if obj == object and n.startswith(prefix) and any(k in TEXT_TYPES for k in kinds)
        )


def lines_mentioning(data: bytes, needles: Iterable[bytes]) -> list[str]:
    """The lines of ``data`` containing any needle, once each, in file order.

    ``bytes.find`` runs at C speed, so picking a few names out of a 200,000-line table this way
    is far cheaper than splitting every line; callers still match fields exactly.
    """
    starts: set[int] = set()
    for needle in needles:
        i = data.find(needle)
        while i >= 0:
            starts.add(data.rfind(b"\n", 0, i + 1) + 1)  # a needle may begin with the newline
            i = data.find(needle, i + 1)
    lines = []
    for start in sorted(starts):
        end = data.find(b"\n", start)
        lines.append(data[start:end if end >= 0 else len(data)].decode("utf-8", errors="replace"))
    return lines


@dataclass
class TraceableFunctions:
    """ftrace's ``available_filter_functions``: the functions livepatch can redirect."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)

    @classmethod
    def parse(cls, lines: Iterable[str]) -> TraceableFunctions:
        table: defaultdict[tuple[str, str], int] = defaultdict(int)
        for line in lines:
            parts = line.split()
            if not parts:
                continue
            name, *rest = parts
            table[(_split_module(rest), name)] += 1
        return cls(dict(table))

    def count(self, name: str, object: str = VMLINUX) -> int:
        return self.counts.get((object, name), 0)

    def __contains__(self, key: tuple[str, str]) -> bool:
        """``(name, object) in traceable``."""
        name, object = key
        return self.count(name, object) > 0


@dataclass
class FtraceUser:
    """One line of ``enabled_functions``: a function some ftrace user currently hooks."""

    name: str
    object: str
    ipmodify: bool  # the hook rewrites the return address (livepatch, kretprobe, other patchers)


def parse_enabled_functions(lines: Iterable[str]) -> list[FtraceUser]:
    """Parse ``enabled_functions`` (``name [module] (count) R I D O  tramp: ...``).

    Only one ftrace user may set IPMODIFY on a function: a second patcher (or a kretprobe on
    an ftrace-based kernel) would make the livepatch load fail with -EBUSY.
    """
    users = []
    for line in lines:
        parts = line.split()
        if not parts:
            continue
        name, *rest = parts
        obj = _split_module(rest)
        if obj != VMLINUX:
            rest = rest[1:]
        flags: set[str] = set()
        for token in rest[1:] if rest and rest[0].startswith("(") else rest:
            if len(token) != 1 or not token.isalpha():
                break  # flags end where the trampoline/ops details begin
            flags.add(token)
        users.append(FtraceUser(name, obj, "I" in flags))
    return users


@dataclass
class Tracefs:
    """Where tracefs was found, and what dynamos did to find it."""

    path: Path | None
    note: str | None = None  # e.g. "mounted tracefs at /sys/kernel/tracing"
    problem: str | None = None  # why it could not be found, when path is None
    mounted: bool | None = None  # None: no mount attempted; else whether mount(2) succeeded

    def read_lines(self, filename: str, names: Iterable[str] | None = None) -> list[str]:
        """Lines of a tracefs file; with ``names``, only those starting with one of them."""
        if self.path is None:
            return []
        try:
            with open(self.path / filename, "rb") as f:
                data = f.read()
        except OSError:
            return []
        if names is None:
            return data.decode("utf-8", errors="replace").splitlines()
        return lines_mentioning(b"\n" + data, [b"\n" + n.encode() for n in names])


def find_tracefs(root: Path, mount: Callable[..., None] | None) -> Tracefs:
    """Locate tracefs under ``root``; mount it on ``sys/kernel/tracing`` when nothing is mounted.

    A kernel with ftrace always has tracefs, but minimal systems (initramfs, containers) may not
    mount it; mounting it is harmless and the only way to learn which functions are traceable.
    ``mount`` is ``Syscalls.mount``, or None where mounting is not allowed (not root).
    """
    for rel in TRACEFS_DIRS:
        if (root / rel / "available_filter_functions").is_file():
            return Tracefs(root / rel)
    mountpoint = root / TRACEFS_DIRS[0]
    if not mountpoint.is_dir():
        return Tracefs(None, problem=f"{mountpoint} does not exist (kernel built without ftrace?)")
    if mount is None:
        return Tracefs(None, problem=f"tracefs is not mounted on {mountpoint} (and only root may mount it)")
    try:
        mount("tracefs", os.fspath(mountpoint), "tracefs", 0, None)
    except OSError as e:
        return Tracefs(None, mounted=False,
                       problem=f"tracefs is not mounted and mounting it on {mountpoint} failed: "
                               f"{os.strerror(e.errno) if e.errno else e}")
    if (mountpoint / "available_filter_functions").is_file():
        return Tracefs(mountpoint, note=f"mounted tracefs at {mountpoint}", mounted=True)
    return Tracefs(None, mounted=True,
                   problem=f"mounted tracefs at {mountpoint} but it has no available_filter_functions "
                           "(kernel built without dynamic ftrace?)")
