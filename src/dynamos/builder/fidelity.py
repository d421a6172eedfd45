"""Fidelity check: do the compiled originals byte-match the target kernel's text?

Ksplice's "run-pre" idea. A single-file build is only faithful when compiling the original file
with the target's source, config and compiler reproduces the code the target runs. So every
function of the compiled original is compared with the kernel's bytes at its address (link-time
addresses from the lab's symbol table, bytes from the vmlinux file): a difference stops the build
naming the function, before anything is generated or loaded.

Relocation fields are what the linker filled in, so they are not compared with the object's
zeros; where the referenced symbol's kernel address is known, the field is compared with the value
the linker must have written ("verified"): a call that goes elsewhere is a difference too. An
address is known when its name is unique in the symbol table, or learnt from what already matched:
a matched function or data object places its own section, and its linked fields tell where this
file's static functions and data went (Ksplice's run-pre matching). References to string literals
(merged sections, which the linker lays out anew) are followed and the strings compared. The same
learning picks which of several same-named static functions (livepatch's ``sympos``) is this
file's, even where their code is identical: this file's callers and tables point at one of them.

What differs between the kernel's text and a faithful compile, measured on Debian's 6.1 vmlinux
over 53 translation units compiled with ``-ffunction-sections -fdata-sections`` (4,948 functions,
1.1 MB; of 46,000 relocation fields all but one were checked, 43,800 by value and 2,350 string
references by content; the 54 functions with same-named twins each resolved to one sympos):

- Nothing the kernel build rewrote after compiling. objtool's code edits (jump-label NOPs,
  ``--mcount``) run on each object, so the compiled original has them too; retpoline, return-thunk,
  fentry and static-call sites are plain linked calls and jumps in the file (the 5-byte
  ``call __fentry__`` included); alternatives, ftrace's NOPs and static-call patching happen at
  boot. (A comparison with the *running* text would have to mask those sites; this one reads the
  file.)
- Branch relaxation, from ``-ffunction-sections`` itself (SHORT_BRANCHES): the kernel compiles a
  file into one ``.text``, so the assembler shortens a jump to a nearby function of the same file
  to two bytes, moving the bytes after it and changing the displacement of branches across it; in
  a per-function section the jump keeps its four-byte form. 6 of 4,948 functions (tail calls such
  as ``bcmp`` -> ``memcmp``); both effects are recomputed, not masked. An object compiled without
  ``-ffunction-sections`` has none.
- ``__weak`` definitions another file overrides (37): in the object, absent from the kernel's
  table; reported as overridden, not as a difference.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from dynamos.builder.elf import (
    SHF_ALLOC,
    SHF_EXECINSTR,
    SHT_PROGBITS,
    SHT_RELA,
    Rela,
    RelocatableElf,
    RelocKind,
    Section,
    Symbol,
    plain_reloc_kind,
)
from dynamos.errors import BuildError
from dynamos.target import TargetKernel
from dynamos.target.images import KernelText, kernel_text
from dynamos.target.symtab import SymbolTable

SHF_MERGE = 0x10
SHF_STRINGS = 0x20
STT_OBJECT, STT_FUNC, STT_SECTION = 1, 2, 3
STB_WEAK = 2
SHN_LORESERVE = 0xFF00

# ---------------------------------------------------------------------------------------------
# Branch relaxation: long branch opcode in an object compiled with -ffunction-sections -> the short
# opcode the kernel's own build (one .text per file) may hold instead, with a one-byte displacement.
# Only for branches to code of the same file: elsewhere the linker, not the assembler, decides.

SHORT_BRANCHES: dict[bytes, bytes] = {
    b"\xe9": b"\xeb",  # jmp rel32 -> jmp rel8
    **{bytes([0x0F, 0x80 + cc]): bytes([0x70 + cc]) for cc in range(16)},  # jcc rel32 -> jcc rel8
}
# Branches inside a function carry no relocation; a shortened branch between one's source and
# target changes its displacement. Opcode -> displacement width, for re-targeting them.
BRANCH_DISPLACEMENTS: dict[bytes, int] = {**{long: 4 for long in SHORT_BRANCHES},
                                          **{short: 1 for short in SHORT_BRANCHES.values()}}

# ---------------------------------------------------------------------------------------------
# Pure comparison


@dataclass(frozen=True)
class Comparison:
    """Compared bytes of one function against one kernel candidate."""

    compared: int
    masked: int
    differing: int
    first_difference: int | None  # offset in the kernel's copy (the same as in the object unless relaxed)

    @property
    def equal(self) -> bool:
        return self.differing == 0


def compare_masked(expected: bytes, actual: bytes, masks: Iterable[tuple[int, int]]) -> Comparison:
    """Compare ``expected`` with ``actual`` at every byte outside the ``[start, end)`` masks.

    A shorter ``actual`` (the kernel's text ends) counts its missing bytes as differing.
    """
    size = len(expected)
    covered = bytearray(size)
    for start, end in masks:
        covered[max(start, 0):min(end, size)] = b"\x01" * max(0, min(end, size) - max(start, 0))
    masked = covered.count(1)
    differing = 0
    first: int | None = None
    # Compare the unmasked runs as slices (C speed); scan bytes only inside unequal runs.
    pos = 0
    while pos < size:
        if covered[pos]:
            pos += 1
            continue
        end = covered.find(1, pos)
        end = size if end < 0 else end
        if expected[pos:end] != actual[pos:end]:
            for i in range(pos, end):
                if i >= len(actual) or expected[i] != actual[i]:
                    differing += 1
                    first = i if first is None else first
        pos = end
    return Comparison(size - masked, masked, differing, first)


# ---------------------------------------------------------------------------------------------
# The compiled object: its functions and data with their relocation fields


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


def read_object_unit(data: bytes, what: str = "object") -> ObjectUnit:
    """Functions (``STT_FUNC`` with a size, in executable sections) and initialised data objects.

    Works the same with or without ``-ffunction-sections``: an item is its symbol's range.
    """
    obj = RelocatableElf.parse(data, what)
    relas: dict[int, list[Rela]] = {}
    for index, sec in enumerate(obj.sections):
        if sec.type == SHT_RELA:
            relas.setdefault(sec.info, []).extend(obj.relocations(index))
    for rows in relas.values():
        rows.sort(key=lambda r: r.offset)
    rela_offsets = {index: [r.offset for r in rows] for index, rows in relas.items()}
    merged = {i for i, sec in enumerate(obj.sections) if sec.flags & SHF_MERGE}
    local_code = {i for i, sec in enumerate(obj.sections) if sec.flags & SHF_EXECINSTR}
    local_code |= {s.name for s in obj.symbols if s.info & 0xF == STT_FUNC and 0 < s.shndx < SHN_LORESERVE}
    placement: dict[int, list[tuple[str, int]]] = {}
    functions: dict[str, ObjectItem] = {}
    items: list[ObjectItem] = []
    for sym in obj.symbols:
        kind = sym.info & 0xF
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
    return ObjectUnit(functions, items, placement, merged)


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
    if target.info & 0xF == STT_SECTION:
        sec = obj.sections[target.shndx]
        # The referenced byte: S + A, and for a pc-relative operand at an instruction's end, 4 more.
        at = rela.addend + (4 if kind.pc_relative else 0)
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


# ---------------------------------------------------------------------------------------------
# Checking one function against its candidates


class Status(Enum):
    MATCHED = "matched"  # exactly one same-named kernel symbol has this code
    MISMATCH = "mismatch"  # same-named symbols exist, none has this code
    AMBIGUOUS = "ambiguous"  # several same-named symbols have this code and nothing tells them apart
    OVERRIDDEN = "overridden"  # a __weak definition the kernel replaced by a strong one: never runs
    ABSENT = "absent"  # no code symbol of this name in the kernel (discarded, or another object)


@dataclass(frozen=True)
class CandidateCheck:
    """One function compared with one same-named kernel symbol."""

    addr: int
    sympos: int
    type: str
    comparison: Comparison
    verified: int = 0  # relocation fields whose linked value was checked
    wrong_relocs: tuple[str, ...] = ()  # relocation fields that point elsewhere (offset and label)
    relaxed: int = 0  # branches the kernel holds in their short form
    wrong_constants: tuple[str, ...] = ()  # strings or constants the kernel's code uses that differ
    elsewhere: bool = False  # this file's copy is known to be at another address

    @property
    def equal(self) -> bool:
        return self.comparison.equal and not self.wrong_constants and not self.elsewhere


@dataclass(frozen=True)
class FunctionCheck:
    name: str
    size: int
    section: str
    status: Status
    candidates: tuple[CandidateCheck, ...]

    @property
    def match(self) -> CandidateCheck | None:
        hits = [c for c in self.candidates if c.equal]
        return hits[0] if len(hits) == 1 else None

    @property
    def sympos(self) -> int | None:
        return self.match.sympos if self.match else None

    @property
    def addr(self) -> int | None:
        return self.match.addr if self.match else None

    @property
    def closest(self) -> CandidateCheck | None:
        return min(self.candidates, key=lambda c: (c.elsewhere, c.comparison.differing), default=None)

    def describe(self) -> str:
        """One line for people: where the function is, or how it differs."""
        if self.match is not None:
            c = self.match
            return (f"{self.name}: matches sympos {c.sympos} at {c.addr:#x} ({c.comparison.compared} bytes "
                    f"compared, {c.comparison.masked} masked, {c.verified} relocations verified)")
        return f"{self.name}: {_STATUS_TEXT[self.status](self)}"


def _ambiguous_text(f: FunctionCheck) -> str:
    where = ", ".join(f"sympos {c.sympos} at {c.addr:#x}" for c in f.candidates if c.equal)
    return f"ambiguous, the same code is at {where}"


def _mismatch_text(f: FunctionCheck) -> str:
    c = f.closest
    assert c is not None
    text = (f"differs from the kernel's (closest: sympos {c.sympos} at {c.addr:#x}): "
            f"{c.comparison.differing} of {c.comparison.compared} compared bytes differ")
    if c.comparison.first_difference is not None:
        text += f", first at +{c.comparison.first_difference:#x}"
    if c.wrong_relocs:
        text += "; relocations pointing elsewhere: " + ", ".join(c.wrong_relocs[:3])
    if c.wrong_constants:
        text += "; constants that differ: " + ", ".join(c.wrong_constants[:3])
    if c.elsewhere:
        text += "; this file's references place its copy at another address"
    return text


_STATUS_TEXT: dict[Status, Callable[[FunctionCheck], str]] = {
    Status.MATCHED: lambda f: "matched",
    Status.AMBIGUOUS: _ambiguous_text,
    Status.MISMATCH: _mismatch_text,
    Status.OVERRIDDEN: lambda f: "a __weak definition another file overrides (the kernel never runs it)",
    Status.ABSENT: lambda f: "not in the kernel's symbol table (discarded, or not built into vmlinux)",
}


@dataclass(frozen=True)
class ItemCheck:
    """The outcome of comparing an item with the kernel's bytes at one address."""

    comparison: Comparison
    verified: int = 0  # relocation fields whose linked value was checked
    wrong: tuple[str, ...] = ()  # verified fields holding another value (offset and label)
    relaxed: int = 0  # branches the kernel holds in their short form (SHORT_BRANCHES)
    fields: tuple[tuple[FieldReloc, int], ...] = ()  # each full-size field and its offset in the kernel
    wrong_constants: tuple[str, ...] = ()  # merged constants (strings) the kernel's field leads to that differ

    @property
    def equal(self) -> bool:
        return self.comparison.equal and not self.wrong_constants


def short_branch(data: bytes, reloc: FieldReloc, kernel: bytes, here: int,
                 lowest: int = 0) -> tuple[bytes, bytes] | None:
    """(long, short) opcodes when the kernel holds the short form of the branch at ``reloc``.

    ``here`` is where the field would be in the kernel's bytes; the opcode starts before it, at
    ``lowest`` or later (not inside an earlier field).
    """
    if not (reloc.local_code and reloc.kind.pc_relative and reloc.kind.width == 4 and reloc.addend == -4):
        return None
    for long, short in SHORT_BRANCHES.items():
        start = reloc.offset - len(long)
        if start >= lowest and data[start:reloc.offset] == long and \
                kernel[here - len(long):here - len(long) + len(short)] == short:
            return long, short
    return None


def check_item(item: ObjectItem, addr: int, kernel: bytes, known: Callable[[str], int | None],
               read: Callable[[int, int], bytes] | None = None) -> ItemCheck:
    """Compare ``item`` with the kernel bytes at ``addr``.

    Builds the bytes the kernel should hold: the item's own, with each relocation field whose
    anchor address ``known`` gives set to the value the linker must have written (a "verified"
    field), and masked where the anchor is unknown. A branch the kernel holds in its short form
    (SHORT_BRANCHES) becomes that form, and the following bytes move up by the difference. With
    ``read`` (kernel bytes at an address), a field leading to a merged constant is followed and
    the constant compared.
    """
    expected = bytearray()
    masks: list[tuple[int, int]] = []
    verified, wrong, fields, wrong_constants = 0, [], [], []
    sites: list[tuple[int, int]] = []  # (end in the item, end in the kernel) of each shortened branch
    pos = 0  # next byte of item.data to copy
    for r in item.relocs:
        if r.offset < pos:
            continue  # overlapping relocations do not occur in compiled code; keep the first
        target = known(r.anchor)
        here = len(expected) + r.offset - pos  # the field's offset in the kernel's bytes
        short = short_branch(item.data, r, kernel, here, pos)
        if short is not None:
            long, opcode = short
            expected += item.data[pos:r.offset - len(long)] + opcode
            sites.append((r.offset + r.kind.width, len(expected) + 1))
            if target is None:
                masks.append((len(expected), len(expected) + 1))
                expected += b"\0"
            else:
                verified += 1
                displacement = target + r.addend + 4 - (addr + len(expected) + 1)
                expected.append(displacement & 0xFF)
                if not -128 <= displacement < 128:
                    wrong.append(f"+{r.offset:#x} {r.label}")
        else:
            expected += item.data[pos:r.offset]
            fields.append((r, here))
            if target is None:
                masks.append((here, here + r.kind.width))
                expected += item.data[r.offset:r.offset + r.kind.width]
                same = _same_constant(r, kernel[here:here + r.kind.width], addr + here, read)
                verified += same is not None
                if same is False:
                    wrong_constants.append(f"+{r.offset:#x} {r.target}+{r.constant_offset:#x} ({r.constant!r:.40})")
            else:
                value = r.kind.field(target, r.addend, addr + here)
                verified += 1
                if kernel[here:here + r.kind.width] != value:
                    wrong.append(f"+{r.offset:#x} {r.label}")
                expected += value
        pos = r.offset + r.kind.width
    expected += item.data[pos:]
    comparison = compare_masked(bytes(expected), kernel, masks)
    if sites and not comparison.equal and retarget_branches(expected, kernel, masks, sites):
        comparison = compare_masked(bytes(expected), kernel, masks)
    return ItemCheck(comparison, verified, tuple(wrong), len(sites), tuple(fields), tuple(wrong_constants))


def _same_constant(r: FieldReloc, field: bytes, place: int, read: Callable[[int, int], bytes] | None) -> bool | None:
    """Whether the kernel's field leads to the same constant as the object's; None if not checkable."""
    if r.constant is None or read is None:
        return None
    section = r.kind.symbol(field, r.addend, place)  # where the kernel put "the section" for this field
    if section is None:
        return None
    return read(section + r.constant_offset, len(r.constant)) == r.constant


def retarget_branches(expected: bytearray, kernel: bytes, masks: list[tuple[int, int]],
                      sites: list[tuple[int, int]]) -> int:
    """Correct the displacement of branches inside the item that cross shortened branches.

    Only where the kernel holds exactly the corrected value: a differing byte is explained, not
    ignored. ``sites`` are (end in the item, end in the kernel) of each shortened branch, in order.
    Returns how many displacements were corrected.
    """
    def kernel_of(offset: int) -> int:
        moved = [item_end - kernel_end for item_end, kernel_end in sites if item_end <= offset]
        return offset - (moved[-1] if moved else 0)

    def item_of(offset: int) -> int:
        moved = [item_end - kernel_end for item_end, kernel_end in sites if kernel_end <= offset]
        return offset + (moved[-1] if moved else 0)

    masked = {i for start, end in masks for i in range(start, end)}
    fixed = 0
    k = 0
    while k < min(len(expected), len(kernel)):
        if expected[k] == kernel[k] or k in masked:
            k += 1
            continue
        for opcode, width in BRANCH_DISPLACEMENTS.items():
            start = next((f for f in range(max(len(opcode), k - width + 1), k + 1)
                          if expected[f - len(opcode):f] == opcode), None)
            if start is None or masked.intersection(range(start, start + width)):
                continue
            end = start + width  # the next instruction, in the kernel's bytes
            displacement = int.from_bytes(expected[start:end], "little", signed=True)
            want = kernel_of(item_of(end) + displacement) - end
            if -(1 << (8 * width - 1)) <= want < 1 << (8 * width - 1):
                value = want.to_bytes(width, "little", signed=True)
                if kernel[start:end] == value:
                    expected[start:end] = value
                    fixed += 1
                    k = end
                    break
        else:
            k += 1
    return fixed


# ---------------------------------------------------------------------------------------------
# The report


@dataclass
class FidelityReport:
    unit: str
    against: str  # "kernel <release>", or the module the unit was compared with
    functions: dict[str, FunctionCheck] = field(default_factory=dict)
    passes: int = 0  # resolution passes until nothing more was learnt
    learnt: int = 0  # addresses learnt from matched functions and data

    def _with(self, status: Status) -> list[FunctionCheck]:
        return [f for f in self.functions.values() if f.status is status]

    @property
    def mismatches(self) -> list[FunctionCheck]:
        return self._with(Status.MISMATCH)

    @property
    def ambiguous(self) -> list[FunctionCheck]:
        return self._with(Status.AMBIGUOUS)

    @property
    def absent(self) -> list[FunctionCheck]:
        return self._with(Status.ABSENT)

    @property
    def overridden(self) -> list[FunctionCheck]:
        return self._with(Status.OVERRIDDEN)

    @property
    def matched(self) -> list[FunctionCheck]:
        return self._with(Status.MATCHED)

    @property
    def resolved(self) -> dict[str, int]:
        """Function name -> livepatch sympos of the kernel symbol that is this file's."""
        return {f.name: f.sympos for f in self.matched if f.sympos is not None}

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def summary(self) -> str:
        counts = ", ".join(f"{len(self._with(s))} {s.value}" for s in Status)
        return f"{self.unit} against {self.against}: {counts}"

    def to_json(self) -> dict:
        return {
            "unit": self.unit, "against": self.against, "ok": self.ok, "resolved": self.resolved,
            "functions": {f.name: {"status": f.status.value, "sympos": f.sympos, "addr": f.addr,
                                   "candidates": len(f.candidates), "detail": f.describe()}
                          for f in self.functions.values()},
        }

    def raise_on_mismatch(self) -> None:
        """Stop a build: the compiled original is not what the target runs."""
        if self.ok:
            return
        lines = [f.describe() for f in self.mismatches]
        raise BuildError(f"fidelity check failed: {len(lines)} function(s) of {self.unit} differ from "
                         f"{self.against} (wrong source, config or compiler):\n  " + "\n  ".join(lines[:20]))


# ---------------------------------------------------------------------------------------------
# Resolution: which kernel symbol is each function of this file


class _Resolver:
    """Kernel addresses of the unit's anchors: unique names in the symbol table, then what
    matched functions and data reveal (their own place, and where their fields point)."""

    def __init__(self, unit: ObjectUnit, symtab: SymbolTable):
        self.unit = unit
        self.symtab = symtab
        self.learnt: dict[str, int] = {}
        self.conflicts: set[str] = set()

    def known(self, anchor: str) -> int | None:
        if anchor in self.conflicts:
            return None
        if anchor in self.learnt:
            return self.learnt[anchor]
        kind, _, key = anchor.partition(":")
        if kind == "sym":
            return self.symtab.unique_address(key)
        index = int(key)
        if index in self.unit.merged:
            return None
        for name, value in self.unit.placement.get(index, ()):
            addr = self.learnt.get(f"sym:{name}") or self.symtab.unique_address(name)
            if addr is not None:
                return addr - value
        return None

    def own_address(self, item: ObjectItem) -> int | None:
        """Where this file's copy of ``item`` is, when known (a weak name may be someone else's)."""
        if not item.weak:
            addr = self.known(f"sym:{item.name}")
            if addr is not None:
                return addr
        section = self.known(f"sec:{item.section_index}")
        return None if section is None else section + item.offset

    def learn(self, anchor: str, addr: int) -> bool:
        """Record an anchor's address; a contradiction makes it unknown. True if anything changed."""
        if anchor in self.conflicts or (anchor.startswith("sec:") and int(anchor[4:]) in self.unit.merged):
            return False
        have = self.known(anchor)
        if have is None:
            self.learnt[anchor] = addr
            return True
        if have != addr:
            self.conflicts.add(anchor)
            self.learnt.pop(anchor, None)
            return True
        return False

    def learn_from(self, item: ObjectItem, addr: int, kernel: bytes, check: ItemCheck) -> bool:
        """A matched item places itself, its section, and what its masked fields point to."""
        new = self.learn(f"sym:{item.name}", addr) if not item.weak else False
        new |= self.learn(f"sec:{item.section_index}", addr - item.offset)
        for r, here in check.fields:
            symbol = r.kind.symbol(kernel[here:here + r.kind.width], r.addend, addr + here)
            if symbol is not None:
                new |= self.learn(r.anchor, symbol)
        return new


def check_fidelity(original_object: Path | bytes, target: TargetKernel, symtab: SymbolTable,
                   functions: Iterable[str] | None = None, *, text: KernelText | None = None,
                   against: str | None = None) -> FidelityReport:
    """Compare every function of a compiled original with the target's text (see module docstring).

    ``functions`` limits the report to those names (every function and data object of the unit
    still helps to resolve the others). ``text`` saves reopening vmlinux for each object, or is a
    module's image (``modimage``) with ``symtab`` its table; ``against`` names it in messages.
    """
    if isinstance(original_object, bytes):
        data, unit_name = original_object, "object"
    else:
        data, unit_name = Path(original_object).read_bytes(), Path(original_object).name
    unit = read_object_unit(data, unit_name)
    wanted = list(unit.functions) if functions is None else list(functions)
    missing = [n for n in wanted if n not in unit.functions]
    if missing:
        raise BuildError(f"{unit_name} defines no function {', '.join(missing)}")
    checker = _Checker(unit, symtab, text or kernel_text(target))
    report = FidelityReport(unit_name, against or f"kernel {target.release}")
    report.passes = checker.learn()
    report.learnt = len(checker.resolver.learnt)
    for name in wanted:
        func = unit.functions[name]
        checks = tuple(c for c, _ in checker.evaluate(func))
        report.functions[name] = FunctionCheck(name, len(func.data), func.section, _status(func, checks), checks)
    return report


class _Checker:
    """Compares a unit's items with the kernel while the resolver learns where things are."""

    def __init__(self, unit: ObjectUnit, symtab: SymbolTable, text: KernelText):
        self.unit = unit
        self.symtab = symtab
        self.text = text
        self.resolver = _Resolver(unit, symtab)
        self.candidates = {name: [s for s in symtab.lookup(name) if s.is_text] for name in unit.functions}

    def evaluate(self, func: ObjectItem) -> list[tuple[CandidateCheck, ItemCheck]]:
        own = self.resolver.own_address(func)
        out = []
        for sym in self.candidates[func.name]:
            c = check_item(func, sym.addr, self.text.peek(sym.addr, len(func.data)), self.resolver.known,
                           self.text.peek)
            out.append((CandidateCheck(sym.addr, self.symtab.sympos(sym), sym.type, c.comparison, c.verified,
                                       c.wrong, c.relaxed, c.wrong_constants,
                                       elsewhere=own is not None and own != sym.addr), c))
        return out

    def settle_data(self, item: ObjectItem) -> bool:
        """Learn from a data object once its place is known and its bytes match there."""
        addr = self.resolver.own_address(item)
        if addr is None or self.text.section_at(addr) is None:
            return False
        kernel = self.text.read(addr, len(item.data))
        check = check_item(item, addr, kernel, self.resolver.known, self.text.peek)
        if not check.equal:
            return False
        self.resolver.learn_from(item, addr, kernel, check)
        return True

    def learn(self) -> int:
        """Settle what matches exactly one place and learn from it, until nothing new is learnt.

        Returns the number of passes. Each pass can only add addresses or turn contradicted ones
        unknown, so the loop ends.
        """
        pending_code, pending_data = dict(self.unit.functions), list(self.unit.data)
        passes, progress = 0, True
        while progress:
            passes += 1
            progress = False
            for name, func in list(pending_code.items()):
                hits = [(c, check) for c, check in self.evaluate(func) if c.equal]
                if len(hits) == 1:
                    del pending_code[name]
                    c, check = hits[0]
                    kernel = self.text.peek(c.addr, len(func.data))
                    progress |= self.resolver.learn_from(func, c.addr, kernel, check)
            still = [item for item in pending_data if not self.settle_data(item)]
            progress |= len(still) != len(pending_data)
            pending_data = still
        return passes


def _status(func: ObjectItem, checks: tuple[CandidateCheck, ...]) -> Status:
    hits = sum(1 for c in checks if c.equal)
    if not checks:
        return Status.ABSENT
    if hits:
        return Status.MATCHED if hits == 1 else Status.AMBIGUOUS
    if func.weak and not any(c.type in "wW" for c in checks):
        return Status.OVERRIDDEN  # only strong symbols of that name: the weak copy lost the link
    return Status.MISMATCH
