"""Patches written for kpatch-build or upstream klp-build build unchanged with ``dynamos build --patch``.

dynamos ships its own ``kpatch-macros.h``, ``kpatch-syscall.h`` and ``linux/livepatch_helpers.h``
(runtime/compat). A patched file's ``#include`` of one of them is pointed at dynamos' copy (on the
same line: line numbers stay). Their macros write directives into ``.dynamos.*`` sections of the
patched object (the DIRECTIVE rows of the special-section table, elf/sections.py); the builder
reads them here: callbacks become the update's livepatch callbacks (as update.toml's [hooks]),
ignored functions and sections are left out of the update.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from dynamos.abi import VMLINUX
from dynamos.builder.elf import SECTION_RULES, STT_FUNC, STT_SECTION, Handling, Rela, RelocatableElf
from dynamos.builder.objdiff import Change, DiffResult
from dynamos.errors import BuildError

COMPAT_DIR = Path(__file__).resolve().parent.parent / "runtime" / "compat"
COMPAT_HEADERS = ("kpatch-macros.h", "kpatch-syscall.h", "linux/livepatch_helpers.h")
CALLBACK_KINDS = ("pre_patch", "post_patch", "pre_unpatch", "post_unpatch")
_INCLUDE_RE = re.compile(rb'^([ \t]*#[ \t]*include[ \t]*)(?:"([^"\n]+)"|<([^>\n]+)>)', re.M)
_DIRECTIVES = {rule.pattern: rule.directive for rule in SECTION_RULES if rule.handling is Handling.DIRECTIVE}


def with_compat_headers(files: dict[str, bytes]) -> dict[str, bytes]:
    """The patched files with their includes of the compatibility headers pointed at dynamos' copies."""
    def point(m: re.Match[bytes]) -> bytes:
        name = (m.group(2) or m.group(3)).decode(errors="replace")
        if name not in COMPAT_HEADERS:
            return m.group(0)
        path = str(COMPAT_DIR / name)
        if '"' in path or "\\" in path or "\n" in path:
            raise BuildError(f"dynamos' {name} is at {path!r}, which a C #include cannot name")
        return m.group(1) + b'"' + path.encode() + b'"'
    return {rel: _INCLUDE_RE.sub(point, content) for rel, content in files.items()}


@dataclass
class Directives:
    """What the compatibility macros of one patched unit asked for."""

    callbacks: dict[str, str] = field(default_factory=dict)  # pre_patch... -> function in the object
    ignored_functions: set[str] = field(default_factory=set)
    ignored_sections: set[str] = field(default_factory=set)
    ignored: list[str] = field(default_factory=list)  # what was left out of the diff, for explain()


def read_directives(patched: bytes | RelocatableElf, unit: str) -> Directives:
    """The directives in the ``.dynamos.*`` sections of a patched object."""
    obj = patched if isinstance(patched, RelocatableElf) else RelocatableElf.parse(patched, f"patched {unit}")
    relocs = obj.relocations_by_target()
    out = Directives()
    for index, sec in enumerate(obj.sections):
        kind = _DIRECTIVES.get(sec.name)
        if kind is None:
            continue
        if kind == "ignore-section":
            out.ignored_sections |= {n.decode(errors="replace") for n in sec.data.split(b"\0") if n}
            continue
        names = [_pointed_function(obj, r, unit, sec.name) for r in relocs.get(index, [])]
        if kind == "ignore-function":
            out.ignored_functions |= set(names)
        elif len(names) > 1:
            raise BuildError(f"{unit}: {len(names)} {kind} callbacks ({', '.join(names)}): livepatch runs one "
                             f"per object, so call the others from one of them")
        elif names:
            out.callbacks[kind] = names[0]
    return out


def _pointed_function(obj: RelocatableElf, r: Rela, unit: str, section: str) -> str:
    """The function a pointer in a directive section names (by symbol, or section + offset)."""
    sym = obj.symbols[r.sym]
    if sym.type == STT_FUNC and r.addend == 0:
        return sym.name
    if sym.type == STT_SECTION:
        for candidate in obj.symbols:
            if candidate.type == STT_FUNC and candidate.shndx == sym.shndx and candidate.value == r.addend:
                return candidate.name
    raise BuildError(f"{unit}: {section} points at {sym.name or 'a section'}+{r.addend}, which is no function "
                     f"of the file (a callback or ignored function must be one)")


def apply_directives(diff: DiffResult, patched: bytes, unit: str) -> Directives:
    """Read a unit's directives and apply them to its diff: ignored functions and everything the
    ignored sections define leave every list (changed, new, new data, refused); callbacks join
    the new functions the update carries."""
    obj = RelocatableElf.parse(patched, f"patched {unit}")
    found = read_directives(obj, unit)
    in_sections = {i for i, s in enumerate(obj.sections) if s.name in found.ignored_sections}
    ignored = found.ignored_functions | found.ignored_sections | {
        s.name for s in obj.symbols if s.name and s.shndx in in_sections}
    for name in sorted(found.ignored_functions | found.ignored_sections):
        found.ignored.append(name)
    diff.changed = [c for c in diff.changed if c.name not in ignored]
    diff.new = [c for c in diff.new if c.name not in ignored]
    diff.new_data = [c for c in diff.new_data if c.name not in ignored]
    diff.refused = [r for r in diff.refused if r.name not in ignored]
    for kind, function in found.callbacks.items():
        if function in {c.name for c in diff.changed}:
            raise BuildError(f"{unit}: {kind} callback {function} is a function of the running kernel the patch "
                             f"changes; a callback must be a function of its own")
        diff.new = [c for c in diff.new if c.name != function]
        diff.new.append(Change("new", function, f"{kind} callback (KPATCH_/KLP_ macro)"))
    diff.new.sort(key=lambda c: c.name)
    return found


def callback_hooks(units: list[tuple[str, str, Directives, dict[str, str]]], objects: list[str]) -> dict[str, str]:
    """[hooks] for the update: each callback's edition name, from (unit, its object, its
    directives, its editions). They run with the update's hook object (vmlinux when patched,
    else the first), so a callback of a unit of another object is refused."""
    hook_object = VMLINUX if VMLINUX in objects else (objects[0] if objects else VMLINUX)
    hooks: dict[str, str] = {}
    first: dict[str, str] = {}
    for path, obj, directives, editions in units:
        for kind, function in directives.callbacks.items():
            if kind in hooks:
                raise BuildError(f"two {kind} callbacks, in {first[kind]} and {path}: livepatch runs one per "
                                 f"object, so call the other from one of them")
            if obj != hook_object:
                raise BuildError(f"{path}: its {kind} callback {function} is in {obj}, but an update's callbacks "
                                 f"run with {hook_object}: put the callback in a file built into {hook_object}")
            hooks[kind], first[kind] = editions[function], path
    return hooks
