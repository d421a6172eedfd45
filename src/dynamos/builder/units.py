"""Compiling single units of a prepared source tree: the original and the patched text of a file.

The tree is shared by every build of its release, so a patched compile puts its files in place
under the tree's lock, journals their originals first, and restores them whatever happens.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dynamos.builder.refusals import BUILD_FAILED
from dynamos.builder.unitsof import kbuild_object
from dynamos.errors import BuildError
from dynamos.target.make import error_lines
from dynamos.target.source import (
    DEFAULT_EXTRA_CFLAGS,
    READY,
    SETTINGS,
    KernelSource,
    journal_path,
    load_settings,
    make_command,
    recover,
    remove_object,
    run_make,
    say_nothing,
    tree_lock,
    with_cflags,
    write_journal,
)

ORIGINALS = "originals"  # compiled unpatched units, reused by later builds (compile_original)
_GCC_ERROR_RE = re.compile(r"^(?P<file>[^:\s]+):(?P<line>\d+):(?:\d+:)? (?:fatal )?error: ")


@dataclass(frozen=True)
class CompiledUnit:
    """One object compiled from the target's source (original or patched text of a file)."""

    object_path: Path
    source_path: str  # relative to the tree, e.g. ``fs/proc/cmdline.c``
    patched: bool
    seconds: float
    command: list[str] = field(default_factory=list)
    log: str = ""
    cached: bool = False  # an original compiled by an earlier build, from the tree's object cache
    # The files the compiler read for it (its -MMD output, as fixdep records it in the .o.cmd file),
    # relative to the tree; None when Kbuild left no record.
    deps: tuple[str, ...] | None = None


def _resolve_unit(source: KernelSource, relpath: str) -> tuple[str, str]:
    """(source file, object target) relative to the tree, for ``x.c``, ``x.S`` or ``x.o``."""
    rel = Path(relpath)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise BuildError(f"{relpath!r} is not a path inside the kernel source tree")
    if rel.suffix == ".o":
        candidates = [rel.with_suffix(".c"), rel.with_suffix(".S")]
    elif rel.suffix in (".c", ".S"):
        candidates = [rel]
    else:
        raise BuildError(f"{relpath}: not a translation unit (expected a .c or .S file, or its .o)")
    for cand in candidates:
        if (source.tree / cand).is_file():
            return cand.as_posix(), kbuild_object(source.tree, cand.as_posix())
    raise BuildError(f"{candidates[0].as_posix()} does not exist in the source of kernel {source.release} "
                     f"({source.tree})")


def compile_unit(source: KernelSource, relpath: str, out: Path, *, text: bytes | None = None,
                 sources: Mapping[str, bytes] | None = None,
                 extra_cflags: Sequence[str] = DEFAULT_EXTRA_CFLAGS,
                 progress: Callable[[str], None] | None = None) -> CompiledUnit:
    """Compile one translation unit of the target's source into ``out`` (a file, or a directory).

    With ``text``, the unit is the file with that content (the patched version); ``sources``
    gives patched contents for other files of the tree too (a ``.c`` file the unit includes).
    They are put in place for the compile and the original contents and mtimes are restored
    afterwards, whatever happens. The tree's own object and its ``.cmd`` file are removed after
    every compile, so Kbuild never takes a patched object for the current one.
    """
    say = progress or say_nothing
    started = time.monotonic()
    settings = load_settings(source)
    src_rel, obj_rel = _resolve_unit(source, relpath)
    replaced = dict(sources or {})
    if text is not None:
        replaced[src_rel] = text
    for rel in replaced:
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not (source.tree / rel).is_file():
            raise BuildError(f"{rel!r} is not a file of the kernel source tree ({source.tree})")
    out = Path(out)
    if out.is_dir():
        out = out / Path(obj_rel).name
    cmd_settings = with_cflags(settings, extra_cflags)
    cmd = make_command(source.tree, cmd_settings, obj_rel)
    obj_path = source.tree / obj_rel
    obj_dir = obj_path.parent
    kind = "patched" if replaced else "original"
    with tree_lock(source.release):
        recover(source)
        before = set(os.listdir(obj_dir))
        originals = {rel: ((source.tree / rel).read_bytes(), (source.tree / rel).stat()) for rel in replaced}
        remove_object(obj_path)
        try:
            if replaced:
                write_journal(source, obj_rel, originals)
                for rel, content in replaced.items():
                    (source.tree / rel).write_bytes(content)
            say(f"compiling {kind} {src_rel}")
            status, log = run_make(cmd, cmd_settings, say, f"compiling {kind}")
            if status != 0 or not obj_path.is_file():
                raise _compile_error(log, [src_rel, *replaced], kind, source.release, status)
            deps = read_dependencies(obj_path, source.tree)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(obj_path, out)
        finally:
            for rel, (content, stat) in originals.items():
                (source.tree / rel).write_bytes(content)
                os.utime(source.tree / rel, ns=(stat.st_atime_ns, stat.st_mtime_ns))
            journal_path(source).unlink(missing_ok=True)
            remove_object(obj_path)
            for name in set(os.listdir(obj_dir)) - before:  # temporaries of this compile (.d, .tmp_*)
                leftover = obj_dir / name
                if leftover.is_file() or leftover.is_symlink():
                    leftover.unlink()
    return CompiledUnit(object_path=out, source_path=src_rel, patched=bool(replaced),
                        seconds=time.monotonic() - started, command=cmd, log=log, deps=deps)


def compile_original(source: KernelSource, relpath: str, out: Path, *,
                     progress: Callable[[str], None] | None = None) -> CompiledUnit:
    """The unpatched unit, compiled once per prepared tree: the tree is restored after every
    patched compile, so its original object never changes, and a rebuild of a patch (a fix to a
    fix) compiles only the patched side. Kept with the tree, so dropping the tree drops them.
    Its dependency list is kept next to it (``.deps``); an object cached without one (by an older
    dynamos) is compiled again once, so a cached original always says which files it read."""
    src_rel, obj_rel = _resolve_unit(source, relpath)
    out = Path(out)
    if out.is_dir():
        out = out / Path(obj_rel).name
    root = source.tree.parent
    with tree_lock(source.release, shared=True):
        # A re-prepared tree, other make settings or other flags start afresh.
        key = hashlib.sha256(b"%d\0%s\0%s" % ((root / READY).stat().st_mtime_ns, (root / SETTINGS).read_bytes(),
                                                " ".join(DEFAULT_EXTRA_CFLAGS).encode())).hexdigest()[:16]
        cached = root / ORIGINALS / f"{obj_rel.replace('/', '__')}-{key}.o"
        deps_file = cached.with_suffix(".deps")
        if cached.is_file() and deps_file.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cached, out)
            return CompiledUnit(object_path=out, source_path=src_rel, patched=False, seconds=0.0, cached=True,
                                deps=tuple(deps_file.read_text().splitlines()))
    unit = compile_unit(source, relpath, out, progress=progress)
    cached.parent.mkdir(exist_ok=True)
    if unit.deps is not None:  # first the list, then the object: an object in the cache has its list
        tmp = deps_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("".join(f"{d}\n" for d in unit.deps))
        os.replace(tmp, deps_file)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    shutil.copyfile(out, tmp)
    os.replace(tmp, cached)
    return unit


def read_dependencies(obj_path: Path, tree: Path) -> tuple[str, ...] | None:
    """What the compiler read to make ``obj_path``: Kbuild compiles with ``-Wp,-MMD,.x.o.d`` and
    fixdep turns that file into ``.x.o.cmd`` (removing the ``.d``); either is read, the ``.cmd``
    first. None when neither exists."""
    for name in (f".{obj_path.name}.cmd", f".{obj_path.name}.d"):
        path = obj_path.with_name(name)
        if path.is_file():
            return parse_dependencies(path.read_text(errors="surrogateescape"), tree)
    return None


_DEPS_START_RE = re.compile(r"^(?:deps_\S+\s*:=|[^\s:$][^:]*:(?!=))(.*)$")


def parse_dependencies(text: str, tree: Path) -> tuple[str, ...]:
    """The files of a dependency record, relative to ``tree``, in order, each once.

    Two forms: the compiler's make rule (``x.o: x.c a.h \\``) and fixdep's ``.cmd`` file, whose
    ``deps_x.o := \\`` list holds the files and ``$(wildcard include/config/...)`` entries for the
    options the sources test (those are not files the compiler read, so they are left out), and
    whose ``source_x.o :=`` line names the unit itself.
    """
    files: list[str] = []
    lines = text.splitlines()
    fixdep = any(line.startswith("deps_") for line in lines)
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^source_\S+\s*:=\s*(\S+)", line) if fixdep else None
        if m:
            files.append(m.group(1))
        start = _DEPS_START_RE.match(line) if (not fixdep or line.startswith("deps_")) else None
        i += 1
        if start is None:
            continue
        body = [start.group(1)]
        while body[-1].rstrip().endswith("\\") and i < len(lines):
            body[-1] = body[-1].rstrip()[:-1]
            body.append(lines[i])
            i += 1
        words = re.sub(r"\$\(wildcard [^)]*\)", " ", " ".join(body)).replace("\\ ", "\0").split()
        files += [w.replace("\0", " ") for w in words]
        if not fixdep:
            break  # the compiler writes one rule (with -MP, empty rules for headers follow: not more files)
    root = str(tree).rstrip("/") + "/"
    out: dict[str, None] = {}
    for f in files:
        if f.startswith(root):
            f = f[len(root):]
        elif f.startswith("/"):
            continue  # outside the tree: the compiler's own headers
        out[os.path.normpath(f)] = None
    return tuple(out)


def _compile_error(log: str, files: Sequence[str], kind: str, release: str, status: int) -> BuildError:
    errors = error_lines(log) or [line for line in log.splitlines() if line.strip()][-15:]
    path, line = files[0], None
    for text in errors:
        m = _GCC_ERROR_RE.match(text)
        if m and m.group("file") in files:
            path, line = m.group("file"), int(m.group("line"))
            break
    what = "failed" if status != 0 else "produced no object"
    return BuildError(f"compiling the {kind} {files[0]} for kernel {release} {what}:\n" + "\n".join(errors),
                      path=path, line=line, code=BUILD_FAILED)
