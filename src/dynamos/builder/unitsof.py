"""Which translation units compile a source file, and which module each is built into.

Read from the tree alone (Makefiles, ``#include "..."`` lines): what the patch builder and
``build --to`` need before compiling anything.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from dynamos.errors import BuildError

_OBJ_LINE_RE = re.compile(r"^\s*obj-\$\((CONFIG_[A-Za-z0-9_]+)\)\s*[+:]?=\s*(.*)$")
_COMPOSITE_RE = re.compile(r"^\s*([A-Za-z0-9_-]+)-(?:y|objs|\$\(CONFIG_[A-Za-z0-9_]+\))\s*[+:]?=\s*(.*)$")


def makefile_lines(directory: Path) -> list[str]:
    """The lines of a directory's Kbuild (else Makefile), continuations joined; none without one."""
    makefile = next((directory / n for n in ("Kbuild", "Makefile") if (directory / n).is_file()), None)
    return [] if makefile is None else makefile.read_text(errors="replace").replace("\\\n", " ").splitlines()


_DESCENT_RE = re.compile(r"^\s*[a-z]+-\S*\s*[+:]?=\s*(.*)$")  # obj-y, obj-$(CONFIG_X), subdir-y, core-y ...


def _entered(tree: Path, directory: str) -> bool:
    """Whether Kbuild's descent reaches ``directory``: an ancestor's Makefile names it as a
    subdirectory (``obj-$(CONFIG_DRM_AMDGPU) += amd/amdgpu/``). Top-level directories and the
    architecture's are entered from the top Makefile."""
    parts = Path(directory).parts
    if len(parts) <= 1 or parts[:2] == ("arch", "x86"):
        return True
    for depth in range(len(parts) - 1, 0, -1):
        child = "/".join(parts[depth:]) + "/"
        if any((m := _DESCENT_RE.match(line)) and child in m.group(1).split()
               for line in makefile_lines(tree.joinpath(*parts[:depth]))):
            return True
    return False


def includer_of(tree: Path, rel: str) -> str | None:
    """The directory whose Makefile builds ``rel`` by a relative path, when Kbuild's descent never
    enters the file's own directory: amdgpu's Makefile ``include``s ``../amdkfd/Makefile``,
    ``../display`` and ``../pm`` and names their objects ``$(obj)/../amdkfd/x.o``. Found among the
    entered sibling directories of an ancestor whose Makefile includes others and names the
    file's top directory below that ancestor; None when the directory is entered (the usual case)."""
    directory = Path(rel).parent
    if _entered(tree, directory.as_posix()):
        return None
    for depth in range(len(directory.parts) - 1, 0, -1):
        ancestor = Path(*directory.parts[:depth])
        below = directory.parts[depth]
        word = re.compile(rf"(?<![\w-]){re.escape(below)}(?![\w-])")
        for sibling in sorted(p for p in (tree / ancestor).iterdir() if p.is_dir() and p.name != below):
            lines = makefile_lines(sibling)
            if (any(line.startswith("include ") for line in lines) and any(word.search(line) for line in lines)
                    and _entered(tree, (ancestor / sibling.name).as_posix())):
                return (ancestor / sibling.name).as_posix()
    return None


def kbuild_object(tree: Path, rel: str) -> str:
    """The object Kbuild builds the source file ``rel`` as: ``x.o`` beside it, or, for a file an
    includer's Makefile builds (``includer_of``), the path through that directory
    (``drivers/gpu/drm/amd/amdgpu/../amdkfd/kfd_topology.o``), so it gets that Makefile's flags."""
    obj = Path(rel).with_suffix(".o").as_posix()
    includer = includer_of(tree, rel)
    if includer is None:
        return obj
    return f"{includer}/{os.path.relpath(obj, includer)}"


def module_of(tree: Path, rel: str, config: dict[str, str]) -> str | None:
    """The loadable module a source file is built into under the target's config, or None when
    it is built into vmlinux. Reads the directory's Kbuild/Makefile (``obj-$(CONFIG_X) += m.o``,
    ``m-y += file.o``): enough for the common layouts, and a wrong answer fails loudly later
    (livepatch finds no such function in that object). A file an includer's Makefile builds
    belongs to that Makefile's one module (amdkfd's files to amdgpu)."""
    includer = includer_of(tree, rel)
    if includer is not None:
        modules = {item[:-2].replace("-", "_") for line in makefile_lines(tree / includer)
                   if (m := _OBJ_LINE_RE.match(line)) and config.get(m.group(1)) == "m"
                   for item in m.group(2).split() if item.endswith(".o")}
        return modules.pop() if len(modules) == 1 else None
    directory = Path(rel).parent
    for depth in range(len(directory.parts), 0, -1):  # its own Makefile, else the one naming dir/x.o
        here = Path(*directory.parts[:depth])
        makefile = next((tree / here / n for n in ("Kbuild", "Makefile") if (tree / here / n).is_file()), None)
        if makefile is None:
            continue
        named, module = _module_named_in(makefile, Path(rel).relative_to(here).with_suffix(".o").as_posix(), config)
        if named or depth == len(directory.parts):
            return module
    return None


def _module_named_in(makefile: Path, obj: str, config: dict[str, str]) -> tuple[bool, str | None]:
    """Whether ``makefile`` names ``obj`` (``x.o``, or ``ishtp/bus.o`` for a directory without a
    Makefile of its own), and the module it builds it into (None: vmlinux, or not named)."""
    lines = makefile.read_text(errors="replace").replace("\\\n", " ").splitlines()
    owners = {obj[:-2]}  # a single-file module is named after its file
    for line in lines:
        m = _COMPOSITE_RE.match(line)
        if m and obj in m.group(2).split():
            owners.add(m.group(1))
    named = len(owners) > 1
    for line in lines:
        m = _OBJ_LINE_RE.match(line)
        if not m:
            continue
        for item in m.group(2).split():
            if item.endswith(".o") and item[:-2] in owners:
                if config.get(m.group(1)) == "m":
                    return True, item[:-2].replace("-", "_")
                named = True
    return named, None


def translation_units_of(tree: Path, rel: str, _seen: frozenset[str] = frozenset()) -> list[str]:
    """The units that compile ``rel``: for a .c file, the .c files of its directory that
    ``#include`` it (6.1 builds most of kernel/sched/ as build_policy.c and build_utility.c), else
    itself; for a local header, the units of every file that includes it, found in the tree."""
    path = tree / rel
    if rel.endswith(".h"):
        units: set[str] = set()
        for includer in header_includers(tree, rel):
            if includer not in _seen:
                units.update(translation_units_of(tree, includer, _seen | {rel}))
        if not units:
            raise BuildError(f"{rel}: no file of the kernel source includes it, so no running code comes from it")
        return sorted(units)
    included = re.compile(rf'^[ \t]*#[ \t]*include[ \t]+"{re.escape(path.name)}"', re.M)
    return sorted(p.relative_to(tree).as_posix() for p in path.parent.glob("*.c")
                  if p != path and included.search(p.read_text(errors="replace"))) or [rel]


def _could_name(quoted: str, rel: str) -> bool:
    """Whether ``#include "quoted"``, found through an -I path, can be the header ``rel``: its
    directories must end ``rel``'s (``"fpga/core.h"`` is never ``drivers/pinctrl/core.h``)."""
    parts = tuple(p for p in Path(quoted).parts if p not in (".", ".."))
    return Path(rel).parts[-len(parts):] == parts


def header_includers(tree: Path, rel: str) -> list[str]:
    """Files of the tree that ``#include "..."`` the header ``rel`` by a path relative to
    themselves. One that names a header of that path its own directory does not have (so the
    compiler finds it through an -I path) might mean this one: refused, it cannot be told."""
    header = (tree / rel).resolve()
    name = Path(rel).name
    hits = subprocess.run(["grep", "-rlE", "--include=*.c", "--include=*.h",
                           rf'^[[:space:]]*#[[:space:]]*include[[:space:]]+"([^"]*/)?{re.escape(name)}"', "."],
                          cwd=tree, capture_output=True, text=True)
    if hits.returncode > 1:
        raise BuildError(f"searching the kernel source for the files that include {rel} failed: {hits.stderr.strip()}")
    line = re.compile(rf'^[ \t]*#[ \t]*include[ \t]+"((?:[^"]*/)?{re.escape(name)})"', re.M)
    found = []
    for hit in sorted(hits.stdout.split()):
        file = (tree / hit).resolve()
        for quoted in line.findall(file.read_text(errors="replace")):
            target = (file.parent / quoted).resolve()
            if target == header:
                found.append(file.relative_to(tree.resolve()).as_posix())
            elif not target.is_file() and _could_name(quoted, rel):
                raise BuildError(f'{rel}: {hit.removeprefix("./")} includes "{quoted}" through the compiler\'s '
                                 f"include path, which may be this header: the files it reaches cannot be told")
    return sorted(set(found))
