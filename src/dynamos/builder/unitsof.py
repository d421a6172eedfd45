"""Which translation units compile a source file, and which module each is built into.

Read from the tree alone (Makefiles, ``#include "..."`` lines): what the patch builder and
``build --to`` need before compiling anything.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from dynamos.errors import BuildError

_OBJ_LINE_RE = re.compile(r"^\s*obj-\$\((CONFIG_[A-Za-z0-9_]+)\)\s*[+:]?=\s*(.*)$")
_COMPOSITE_RE = re.compile(r"^\s*([A-Za-z0-9_-]+)-(?:y|objs|\$\(CONFIG_[A-Za-z0-9_]+\))\s*[+:]?=\s*(.*)$")


def module_of(tree: Path, rel: str, config: dict[str, str]) -> str | None:
    """The loadable module a source file is built into under the target's config, or None when
    it is built into vmlinux. Reads the directory's Kbuild/Makefile (``obj-$(CONFIG_X) += m.o``,
    ``m-y += file.o``): enough for the common layouts, and a wrong answer fails loudly later
    (livepatch finds no such function in that object)."""
    directory = (tree / rel).parent
    makefile = next((directory / n for n in ("Kbuild", "Makefile") if (directory / n).is_file()), None)
    if makefile is None:
        return None
    text = makefile.read_text(errors="replace").replace("\\\n", " ")
    obj = Path(rel).with_suffix(".o").name
    owners = {obj[:-2]}  # a single-file module is named after its file
    for line in text.splitlines():
        m = _COMPOSITE_RE.match(line)
        if m and obj in m.group(2).split():
            owners.add(m.group(1))
    for line in text.splitlines():
        m = _OBJ_LINE_RE.match(line)
        if not m:
            continue
        for item in m.group(2).split():
            if item.endswith(".o") and item[:-2] in owners and config.get(m.group(1)) == "m":
                return item[:-2].replace("-", "_")
    return None


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


def header_includers(tree: Path, rel: str) -> list[str]:
    """Files of the tree that ``#include "..."`` the header ``rel`` by a path relative to
    themselves. One that names a header of that file name its own directory does not have (so the
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
            elif not target.is_file():
                raise BuildError(f'{rel}: {hit.removeprefix("./")} includes "{quoted}" through the compiler\'s '
                                 f"include path, which may be this header: the files it reaches cannot be told")
    return sorted(set(found))
