"""Where each name a changed unit uses lives in the running kernel: the object (vmlinux or a
module) and, among namesakes, which one (sympos) -- what a livepatch relocation names."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple, Protocol

from dynamos.abi import VMLINUX, edition_name, edition_prefix
from dynamos.builder.elf import STB_LOCAL, RelocatableElf
from dynamos.builder.klp import KlpSymbol
from dynamos.builder.modsyms import OtherModules
from dynamos.builder.refusals import FIDELITY
from dynamos.builder.statics import StaticLocals
from dynamos.errors import BuildError
from dynamos.target import TargetKernel
from dynamos.target.symtab import SymbolTable

# A name gcc or a macro numbered with __COUNTER__ (and __LINE__): BTF_ID's entries.
_COUNTED = re.compile(r"^(__BTF_ID__\w+__)\d+$")


class ResolvedUnit(Protocol):
    """What resolution needs of a unit (the patch builder's UnitReport)."""

    path: str
    object: str
    resolved: dict[str, int]  # static name -> sympos of this file's copy
    statics: StaticLocals


def module_symbols(target: TargetKernel, module: str) -> list[str] | None:
    """Names defined in the shipped module, in symbol-table order (None for vmlinux)."""
    if module == VMLINUX:
        return None
    obj = RelocatableElf.parse(target.module_path(module).read_bytes(), f"{module}.ko")
    return [s.name for s in obj.symbols if s.name and s.shndx != 0]


class SymbolPositions:
    """Where a name one unit uses lives in the kernel, and which of its namesakes it is."""

    def __init__(self, unit: ResolvedUnit, symtab: SymbolTable, module_symbols: list[str] | None):
        self.unit, self.symtab, self.module_symbols = unit, symtab, module_symbols

    def object_of(self, name: str, local: bool) -> str:
        """A module's own file-locals and globals live in the module; everything else in vmlinux."""
        if self.module_symbols is not None and (local or name in self.module_symbols):
            return self.unit.object
        return VMLINUX

    def module_name(self, name: str) -> str:
        """The module's name for a symbol whose name ends in a ``__COUNTER__`` value, which a header
        change shifts in the patched compile (``__BTF_ID__struct__nf_conn__760189``, counter then
        line): the one symbol of the module named alike but for those digits; else ``name``."""
        m = _COUNTED.match(name)
        if m is None or not self.module_symbols or name in self.module_symbols:
            return name
        alike = {s for s in self.module_symbols if s.startswith(m.group(1)) and s[len(m.group(1)):].isdigit()}
        return alike.pop() if len(alike) == 1 else name

    def position(self, name: str, local: bool) -> int:
        """0 when the name is unique in its object, else this file's copy's sympos."""
        if self.object_of(name, local) != VMLINUX:
            count = self.module_symbols.count(name) if self.module_symbols else 0
            if count == 0 and self.module_symbols is not None:
                raise BuildError(f"{self.unit.path}: {name} is used by the changed code but module "
                                 f"{self.unit.object} has no such symbol (renamed or optimised away in the "
                                 f"shipped module?): livepatch could not find it when the module loads")
            if count <= 1:
                return 0
            if local and name in self.unit.resolved:
                return self.unit.resolved[name]  # the fidelity check found this file's copy
            raise BuildError(f"{self.unit.path}: {count} symbols of module {self.unit.object} are named "
                             f"{name} and the fidelity check could not tell which one this file's is", code=FIDELITY)
        candidates = self.symtab.lookup(name)
        if not candidates:
            raise BuildError(f"{self.unit.path}: {name} is used by the changed code but the kernel has no such "
                             f"symbol (inlined or optimised away in the shipped kernel?)")
        if len(candidates) == 1:
            return 0
        if local and name in self.unit.resolved:
            return self.unit.resolved[name]
        globals_ = [c for c in candidates if c.type.isupper()]
        if not local and len(globals_) == 1:
            return self.symtab.sympos(globals_[0])  # a global, with file-local namesakes elsewhere
        raise BuildError(f"{self.unit.path}: {len(candidates)} kernel symbols are named {name} and the "
                         f"fidelity check could not tell which one this file's is", code=FIDELITY)


class Added(NamedTuple):
    """A global function one unit of the update adds."""

    unit: str
    object: str
    edition: str  # its name in the update (builder/extract.py renames what it cuts out)


def update_additions(units: Iterable[tuple[str, str, set[str], Path]]) -> dict[str, Added]:
    """The global functions the units of one update add, by name, from each unit's (path, object,
    new function names, patched object file), in the order their editions are numbered: a fix
    often adds a helper in one file and calls it from another, which reaches it inside the update.
    Only a unit that adds functions has its object read."""
    added: dict[str, Added] = {}
    for index, (path, obj, new, image) in enumerate(units):
        if new:
            for sym in RelocatableElf.parse(image.read_bytes(), path).symbols:
                if sym.name in new and sym.binding != STB_LOCAL and sym.shndx != 0:
                    added[sym.name] = Added(path, obj, edition_name(edition_prefix(index), sym.name))
    return added


def stranded(uses: dict[str, set[str]], added: dict[str, Added], kept: set[str]) -> dict[str, str]:
    """Units that call a function another unit adds when that unit is not in the update: with the
    caller in it, the update would not link. Unit -> why, until no caller is left stranded."""
    out: dict[str, str] = {}
    while True:
        more = {unit: f"{unit}: calls {name}, which {added[name].unit} adds, and that file is not carried"
                for unit, names in uses.items() if unit in kept and unit not in out
                for name in sorted(names) if added[name].unit not in kept or added[name].unit in out}
        if not more:
            return out
        out.update(more)


def resolver(unit: str, others: OtherModules, sympos: SymbolPositions,
             added: dict[str, Added] | None = None, uses: set[str] | None = None):
    """Where the kernel has each name the changed code of ``unit`` uses: None for a vmlinux export
    (the module loader links it), else a livepatch symbol. A symbol of another module than the
    patched one, exported or not, is a livepatch symbol tied to the patched module (see modsyms).
    A function another unit of the update ``added`` is linked inside the update (recorded in
    ``uses``), unless it belongs to another module, which need not be loaded when this code runs."""
    patched = sympos.unit.object

    def resolve(name: str, local: bool) -> KlpSymbol | str | None:
        if not local and added and name in added and not sympos.symtab.lookup(name):
            home = added[name]
            if home.object not in (VMLINUX, patched):
                raise BuildError(f"{unit}: its changed code calls {name}, which this update adds to module "
                                 f"{home.object} ({home.unit}): {patched} could run it while {home.object} "
                                 "is not loaded")
            if uses is not None:
                uses.add(name)
            return home.edition
        obj = sympos.object_of(name, local)
        if obj == VMLINUX and not local:
            home = others.exporter(name)
            if home == VMLINUX:
                return None  # the module loader links it (a module's own exports stay livepatch
                # symbols: linking them would make the update depend on the module being loaded)
            if home is not None and home != patched:
                return others.symbol(unit, patched, name, home)
        if name == "__fentry__" or name.startswith("__x86_") or name == "__stack_chk_fail":
            return None  # exported helpers every module uses
        if local:
            found = sympos.unit.statics.lookup(name)  # raises for a variable that cannot be found
            if found is not None:
                return found
        elif obj == VMLINUX and not sympos.symtab.lookup(name):
            found = others.defined_by_dependency(unit, patched, name)
            if found is not None:
                return found
        if obj != VMLINUX:
            name = sympos.module_name(name)
        return KlpSymbol(name, obj, sympos.position(name, local))
    return resolve
