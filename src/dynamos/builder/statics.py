"""Static variables the changed code uses: which copy in the running kernel is this file's.

gcc numbers function-scope statics (``count.1``, ``__func__.3``, ``messages.10`` of a function
inlined into its callers) in the order it meets them, so the patched compile, the original
compile and the kernel's own build may each give one variable another number, and several files
of one object often have a ``__func__.10``. A name is therefore never trusted across compiles:

- Read-only data gcc generates (``__func__``, ``CSWTCH`` switch tables, ``.LC`` literals) is
  constant: it travels with the update as a copy (``carried_constant_sections``).
- A variable with state must stay the kernel's. The patched object's variable is tied to the
  original object's by its stable key (base name, and the function using it when the base name
  repeats: objdiff's data keys); the original's to the kernel's copy by address, which the
  fidelity check learnt from the matched functions that use it (their linked fields point at it);
  the address gives the kernel's symbol, whatever its number, and its sympos. Failing that, a base
  name that only one local symbol of the object carries, or only one lying between the file's
  other variables of the same section. Otherwise the build is refused, naming the variable and
  the functions using it.
- A variable of size zero (``static struct lock_class_key __key`` of every mutex_init or
  spin_lock_init when lockdep is off) has no state and often no symbol in the kernel: the update
  carries its own (``StaticLocals.stateless``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from dynamos.abi import VMLINUX
from dynamos.builder.elf import (
    SHF_ALLOC,
    SHF_EXECINSTR,
    SHF_WRITE,
    SHN_LORESERVE,
    STB_LOCAL,
    STT_OBJECT,
    STT_SECTION,
    RelocatableElf,
)
from dynamos.builder.klp import KlpSymbol
from dynamos.builder.objdiff import DataItem, ObjectInfo
from dynamos.errors import BuildError
from dynamos.target.symtab import Sym, SymbolTable

_NUMBER = re.compile(r"\.\d+$")
# Read-only objects only the compiler names: the function name string, switch lookup tables,
# literal pools. Nothing writes them and nothing compares their addresses.
COMPILER_CONSTANT = re.compile(r"^(__func__|__FUNCTION__|__PRETTY_FUNCTION__|CSWTCH|\.LC\d+)(\.\d+)?$")


def base_name(name: str) -> str:
    """``messages.10`` -> ``messages``; a name without gcc's number is its own base."""
    return _NUMBER.sub("", name)


def carried_constant_sections(obj: RelocatableElf) -> set[int]:
    """Sections holding only compiler-generated read-only data (see COMPILER_CONSTANT): the
    update carries its own copy instead of looking up a numbered name in the kernel."""
    holders: dict[int, bool] = {}
    for sym in obj.symbols:
        if not 0 < sym.shndx < SHN_LORESERVE or sym.type == STT_SECTION or not sym.name:
            continue
        sec = obj.sections[sym.shndx]
        constant = (sym.type == STT_OBJECT and sym.binding == STB_LOCAL and bool(COMPILER_CONSTANT.match(sym.name))
                    and bool(sec.flags & SHF_ALLOC) and not sec.flags & (SHF_WRITE | SHF_EXECINSTR))
        holders[sym.shndx] = holders.get(sym.shndx, True) and constant
    return {index for index, only_constants in holders.items() if only_constants}


def data_users(info: ObjectInfo) -> dict[str, set[str]]:
    """ELF name of each data object -> the functions (parents of .cold parts) that reference it."""
    by_key = {key: item.symbol for key, item in info.data.items()}
    users: dict[str, set[str]] = {}
    for fn in info.functions.values():
        for r in fn.relocs:
            if r.symbol in by_key:
                users.setdefault(by_key[r.symbol], set()).add(fn.parent or fn.name)
    return users


@dataclass
class StaticLocals:
    """The patched object's file-local data, resolved to the kernel's copies (or why not)."""

    found: dict[str, KlpSymbol] = field(default_factory=dict)  # patched ELF name -> kernel symbol
    refused: dict[str, str] = field(default_factory=dict)  # patched ELF name -> why it cannot be found
    how: dict[str, str] = field(default_factory=dict)  # patched ELF name -> how it was found (for the log)
    users: dict[str, set[str]] = field(default_factory=dict)  # patched ELF name -> functions using it
    stateless: set[str] = field(default_factory=set)  # patched ELF names of size zero: carried as new data

    def lookup(self, name: str) -> KlpSymbol | None:
        """The kernel's copy of a file-local variable, None if this is not one; refused ones raise."""
        if name in self.refused:
            raise BuildError(self.refused[name])
        return self.found.get(name)


def resolve_static_locals(path: str, original: ObjectInfo, patched: ObjectInfo, addresses: dict[str, int],
                          symtab: SymbolTable, obj: str = VMLINUX) -> StaticLocals:
    """Tie every file-local variable of ``patched`` that has state to the kernel's copy.

    ``addresses`` are the original object's data addresses the fidelity check learnt (vmlinux,
    or the module image that ``symtab`` describes); ``obj`` names the object for livepatch.
    """
    users = data_users(patched)
    out = StaticLocals(users=users)
    index = _BaseIndex(symtab, obj)
    for key, item in patched.data.items():
        if item.binding != "local" or (not item.writable and COMPILER_CONSTANT.match(item.symbol)):
            continue
        before = original.data.get(key)
        if before is None:
            continue  # new data: the update carries it
        if item.size == 0 and before.size == 0:
            out.stateless.add(item.symbol)
            out.how[item.symbol] = "size zero: no state, the update carries its own"
            continue
        used = ", ".join(sorted(users.get(item.symbol, ()))) or "no function"
        what = f"{path}: static variable {base_name(item.symbol)} ({item.symbol}, used by {used})"
        addr = addresses.get(before.symbol)
        if addr is not None:
            sym = index.at(addr, base_name(before.symbol))
            if sym is None:
                out.refused[item.symbol] = (f"{what}: this file's copy is at {addr:#x} in {obj}, where the "
                                            f"kernel's symbol table has no {base_name(before.symbol)}")
                continue
            out.found[item.symbol] = index.klp(sym)
            out.how[item.symbol] = f"{sym.name} at {addr:#x} (the address the matched code uses)"
            continue
        same = index.locals_named(base_name(before.symbol))
        between = _between_neighbours(before, original, addresses, same)
        if len(same) == 1:
            out.found[item.symbol] = index.klp(same[0])
            out.how[item.symbol] = f"{same[0].name} (the only local {base_name(before.symbol)} of {obj})"
        elif between is not None:
            out.found[item.symbol] = index.klp(between)
            out.how[item.symbol] = (f"{between.name} at {between.addr:#x} (between the file's other "
                                    f"{between_kind(before)} variables)")
        elif not same:
            out.refused[item.symbol] = (f"{what}: {obj} has no such variable (optimised away in the running "
                                        f"kernel?), and the changed code must use the kernel's copy")
        else:
            out.refused[item.symbol] = (f"{what}: {obj} has {len(same)} local variables called "
                                        f"{base_name(before.symbol)} and no matched function of the file tells "
                                        f"which is this file's")
    return out


def between_kind(item: DataItem) -> str:
    """The section an object lands in when the kernel compiles the file whole: ``.bss.count.1``
    (this compile's ``-fdata-sections``) is ``.bss``; ``.data.once`` stays itself."""
    suffix = "." + item.symbol
    return item.section[:-len(suffix)] if item.section.endswith(suffix) else item.section


def _between_neighbours(before: DataItem, original: ObjectInfo, addresses: dict[str, int],
                        candidates: list[Sym]) -> Sym | None:
    """The one candidate lying between the file's other variables of the same section whose
    addresses are known: the linker keeps one file's section in one piece, so nothing of another
    file can be there."""
    kind = between_kind(before)
    known = [addresses[o.symbol] for o in original.data.values()
             if o.symbol in addresses and o.symbol != before.symbol and between_kind(o) == kind]
    if len(known) < 2:
        return None
    inside = [c for c in candidates if min(known) < c.addr < max(known)]
    return inside[0] if len(inside) == 1 else None


class _BaseIndex:
    """The symbols of vmlinux (kallsyms) or of a module's image by base name and by address;
    ``obj`` is the object livepatch is to look in."""

    def __init__(self, symtab: SymbolTable, obj: str):
        self.symtab, self.obj = symtab, obj
        self.by_base: dict[str, list[Sym]] = {}
        self.by_addr: dict[int, list[Sym]] = {}
        for sym in symtab.symbols:
            if sym.object == VMLINUX:  # a module's image lists its own symbols as its table's
                self.by_base.setdefault(base_name(sym.name), []).append(sym)
                self.by_addr.setdefault(sym.addr, []).append(sym)

    def at(self, addr: int, base: str) -> Sym | None:
        named = [s for s in self.by_addr.get(addr, ()) if base_name(s.name) == base and not s.is_text]
        return named[0] if len(named) == 1 else None

    def locals_named(self, base: str) -> list[Sym]:
        return [s for s in self.by_base.get(base, ()) if s.type.islower() and not s.is_text]

    def klp(self, sym: Sym) -> KlpSymbol:
        unique = len(self.symtab.lookup(sym.name, sym.object)) == 1
        return KlpSymbol(sym.name, self.obj, 0 if unique else self.symtab.sympos(sym))
