"""The compiled unit as the fidelity check sees it: functions and data with their relocation fields.

A view on the one ELF model (``builder/elf``): each item is its symbol's range, so it works the same
with or without ``-ffunction-sections``.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

from dynamos.builder.elf import (
    REL32_SIZE,
    SHF_ALLOC,
    SHF_EXECINSTR,
    SHF_MERGE,
    SHF_STRINGS,
    SHN_LORESERVE,
    SHT_PROGBITS,
    STB_LOCAL,
    STB_WEAK,
    STT_FUNC,
    STT_OBJECT,
    STT_SECTION,
    Rela,
    RelocatableElf,
    RelocKind,
    Section,
    Symbol,
    plain_reloc_kind,
)
from dynamos.errors import BuildError

NUMBERED_LOCAL = re.compile(r"^(?P<base>.+?)\.\d+$")


@dataclass(frozen=True)
class FieldReloc:
    """A relocation field inside a function or data object; ``anchor`` names what it refers to."""

    offset: int  # in the item
    kind: RelocKind
    anchor: str  # "sym:<name>" or "sec:<index>"
    target: str  # the symbol's or section's name
    addend: int
    local_code: bool = False  # refers to code of the same unit (a branch the assembler may shorten)
    # A reference into a merged constant section (string literals): the linker places each
    # constant on its own, so the field cannot be checked, but what it points to can.
    constant: bytes | None = None
    constant_offset: int = 0  # the constant's offset from the section start the field encodes

    @property
    def label(self) -> str:
        """For messages: ``saved_command_line-0x4``."""
        return self.target + (f"{self.addend:+#x}" if self.addend else "")


@dataclass(frozen=True)
class ObjectItem:
    """A function or data object of the compiled unit: its bytes and relocation fields."""

    name: str
    section: str
    section_index: int
    offset: int  # in its section
    data: bytes
    relocs: tuple[FieldReloc, ...]
    weak: bool = False


@dataclass
class ObjectUnit:
    """What the fidelity check needs of a compiled translation unit."""

    functions: dict[str, ObjectItem]
    data: list[ObjectItem]  # initialised data with relocations: where its pointers lead is learnt
    # Per section: (name, value) of its strong named symbols; the linker moves a section as a
    # whole, so one such symbol's kernel address places the section.
    placement: dict[int, list[tuple[str, int]]]
    merged: set[int]  # SHF_MERGE sections: the linker reorders their contents, they cannot be placed
    # File-local names with gcc's number (``count.1``, ``__func__.3``): the kernel's copy was numbered by
    # another compile, so a same-named kernel symbol may be another file's; only what matched tells.
    numbered: set[str] = field(default_factory=set)


def read_object_unit(data: bytes, what: str = "object") -> ObjectUnit:
    """Functions (``STT_FUNC`` with a size, in executable sections) and initialised data objects.

    Works the same with or without ``-ffunction-sections``: an item is its symbol's range.
    """
    obj = RelocatableElf.parse(data, what)
    relas = obj.relocations_by_target()
    rela_offsets = {index: [r.offset for r in rows] for index, rows in relas.items()}
    merged = {i for i, sec in enumerate(obj.sections) if sec.flags & SHF_MERGE}
    local_code = {i for i, sec in enumerate(obj.sections) if sec.flags & SHF_EXECINSTR}
    local_code |= {s.name for s in obj.symbols if s.type == STT_FUNC and 0 < s.shndx < SHN_LORESERVE}
    placement: dict[int, list[tuple[str, int]]] = {}
    functions: dict[str, ObjectItem] = {}
    items: list[ObjectItem] = []
    for sym in obj.symbols:
        kind = sym.type
        if not sym.name or kind == STT_SECTION or not 0 < sym.shndx < SHN_LORESERVE:
            continue
        if sym.binding != STB_WEAK:
            placement.setdefault(sym.shndx, []).append((sym.name, sym.value))
        sec = obj.sections[sym.shndx]
        if sym.size == 0 or not sec.flags & SHF_ALLOC or sec.type != SHT_PROGBITS or sym.shndx in merged:
            continue
        is_code = kind == STT_FUNC and bool(sec.flags & SHF_EXECINSTR)
        if not is_code and (kind != STT_OBJECT or sym.shndx not in relas):
            continue
        start, end = sym.value, sym.value + sym.size
        offsets, rows = rela_offsets.get(sym.shndx, []), relas.get(sym.shndx, [])
        fields = tuple(_field_reloc(obj, r, r.offset - start, what, is_code, local_code)
                       for r in rows[bisect.bisect_left(offsets, start):bisect.bisect_left(offsets, end)])
        item = ObjectItem(sym.name, sec.name, sym.shndx, start, sec.data[start:end],
                          tuple(f for f in fields if f is not None), sym.binding == STB_WEAK)
        if is_code:
            functions.setdefault(sym.name, item)
        elif item.relocs:
            items.append(item)
    numbered = {s.name for s in obj.symbols if s.binding == STB_LOCAL and s.type != STT_SECTION
                and NUMBERED_LOCAL.match(s.name)}
    return ObjectUnit(functions, items, placement, merged, numbered)


def _field_reloc(obj: RelocatableElf, rela: Rela, offset: int, what: str, strict: bool,
                 local_code: set[int | str]) -> FieldReloc | None:
    """The field of one relocation; an unknown type fails for code (it cannot be masked safely)
    and is skipped in data (data only teaches addresses)."""
    kind = plain_reloc_kind(rela.type)
    if kind is None:
        if strict:
            raise BuildError(f"{what}: relocation type {rela.type} at {offset:#x} is not supported by the "
                             f"fidelity check")
        return None
    if kind.width == 0:
        return None  # a dropped relocation: the bytes are plain code
    target: Symbol = obj.symbols[rela.sym]
    if target.type == STT_SECTION:
        sec = obj.sections[target.shndx]
        # The referenced byte: S + A, and for a pc-relative operand at an instruction's end, its size more.
        at = rela.addend + (REL32_SIZE if kind.pc_relative else 0)
        return FieldReloc(offset, kind, f"sec:{target.shndx}", sec.name, rela.addend, target.shndx in local_code,
                          _merged_constant(sec, at), at)
    return FieldReloc(offset, kind, f"sym:{target.name}", target.name, rela.addend, target.name in local_code)


def _merged_constant(sec: Section, at: int) -> bytes | None:
    """The constant at ``at`` of a merged section: a whole string with its NUL, or one entry.

    None when ``at`` is not the start of a constant (an operand that is not at the end of its
    instruction, or the middle of a string): then the reference cannot be followed safely.
    """
    if not sec.flags & SHF_MERGE or not 0 <= at < len(sec.data):
        return None
    if sec.flags & SHF_STRINGS:
        end = sec.data.find(b"\0", at)
        starts_string = at == 0 or sec.data[at - 1] == 0
        return sec.data[at:end + 1] if end >= 0 and starts_string else None
    size = sec.entsize
    return sec.data[at:at + size] if size and at % size == 0 else None
