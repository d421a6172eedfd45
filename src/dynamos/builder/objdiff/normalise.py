"""An object as the diff compares it: functions and data with their relocations normalised.

A function is compared by its code with the relocation sites masked, and by its relocations with
the referenced symbol *normalised*: section-relative references become the symbol they land in,
string literals become their text, so a string or a function that merely moved in the object does
not look like a change. Data objects get stable keys (gcc's and ``__COUNTER__``'s numbers removed),
and the entries of per-function special tables are grouped by the function they point into.

Read through the one ELF model (``builder/elf``); which sections are special is the one table in
``elf/sections.py``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from dynamos.builder.elf import (
    CARRIED_WRITABLE_SECTIONS,
    DATA_PREFIXES,
    DEFAULT_RULE,
    EM_X86_64,
    FENTRY_RELOC_OFFSETS,
    RELOC_KINDS,
    SHF_ALLOC,
    SHF_EXECINSTR,
    SHF_MERGE,
    SHF_STRINGS,
    SHF_WRITE,
    SHT_GROUP,
    SHT_NOBITS,
    SHT_NULL,
    SHT_REL,
    SHT_RELA,
    SHT_STRTAB,
    SHT_SYMTAB,
    SHT_SYMTAB_SHNDX,
    STB_GLOBAL,
    STB_LOCAL,
    STB_WEAK,
    STT_FUNC,
    STT_OBJECT,
    STT_SECTION,
    STT_TLS,
    Handling,
    Rela,
    RelocatableElf,
    RelocKind,
    Section,
    SectionRule,
    section_rule,
)
from dynamos.errors import BuildError

FENTRY = "__fentry__"

# gcc numbers function-scope statics (calls.1, __func__.0) and the kernel numbers __UNIQUE_ID_
# names with __COUNTER__; both numbers shift when unrelated code is added, so keys drop them.
_NUMBERED_RE = re.compile(r"^(?P<base>.+?)\.\d+$")
_UNIQUE_ID_RE = re.compile(r"^(?P<base>__UNIQUE_ID_\D*?)\d+$")
# A .cold part (foo.cold, foo.cold.3) is the unlikely half of its parent foo, split off by gcc.
_COLD_RE = re.compile(r"^(?P<parent>.+)\.cold(\.\d+)?$")
_META_TYPES = {SHT_NULL, SHT_SYMTAB, SHT_STRTAB, SHT_RELA, SHT_REL, SHT_GROUP, SHT_SYMTAB_SHNDX}


# ---------------------------------------------------------------------------------------------
# The parsed view of one object.


@dataclass(frozen=True)
class Reloc:
    """A relocation with its symbol normalised (see module docstring); offset is within its item."""

    offset: int
    type: int
    symbol: str
    addend: int


@dataclass(frozen=True)
class Function:
    name: str
    section: str
    size: int
    code: bytes  # relocation sites zeroed
    relocs: tuple[Reloc, ...]
    binding: str  # "local", "global" or "weak"
    parent: str | None = None  # for a .cold part, the function it was split from

    @property
    def traceable(self) -> bool:
        """True when the function starts with a call to __fentry__, so livepatch can redirect it."""
        return any(r.symbol == FENTRY and r.offset in FENTRY_RELOC_OFFSETS for r in self.relocs)


@dataclass(frozen=True)
class DataItem:
    name: str  # stable key: gcc's numbering removed where unambiguous (see _data_keys)
    symbol: str  # the ELF symbol name, as the kernel's symbol table knows it
    section: str
    size: int
    contents: bytes | None  # relocation sites zeroed; None for zero-filled (.bss) objects
    relocs: tuple[Reloc, ...]
    binding: str
    writable: bool

    def same_value(self, other: DataItem) -> bool:
        if self.size != other.size or self.relocs != other.relocs:
            return False
        mine = self.contents if self.contents is not None else bytes(self.size)
        theirs = other.contents if other.contents is not None else bytes(other.size)
        return mine == theirs


@dataclass(frozen=True)
class TableEntry:
    """One entry of a per-function special table; ``function`` is the one it points into."""

    function: str | None
    data: bytes
    relocs: tuple[Reloc, ...]


@dataclass
class ObjectInfo:
    functions: dict[str, Function]
    data: dict[str, DataItem]
    special_sections: set[str]  # per-function tables and refuse-on-change sections present
    tables: dict[str, tuple[TableEntry, ...]] = field(default_factory=dict)  # per-function tables
    opaque: dict[str, tuple[object, ...]] = field(default_factory=dict)  # refuse-on-change sections
    mcount_sites: set[str] = field(default_factory=set)  # functions listed in __mcount_loc

    def unit_of(self, name: str) -> str:
        """The function a part belongs to: the parent for a .cold part, else the function itself."""
        fn = self.functions.get(name)
        return fn.parent if fn is not None and fn.parent else name

    def units(self) -> dict[str, list[Function]]:
        """Functions with their .cold parts, keyed by the parent's name."""
        result: dict[str, list[Function]] = {}
        for fn in sorted(self.functions.values(), key=lambda f: (f.parent is not None, f.name)):
            result.setdefault(fn.parent or fn.name, []).append(fn)
        return result


# ---------------------------------------------------------------------------------------------
# Reading.


@dataclass
class _Section:
    """A section of the model with what the diff asks of it: its contents (zeros for .bss) and kind."""

    index: int
    raw: Section
    rule: SectionRule | None

    @property
    def name(self) -> str:
        return self.raw.name

    @property
    def type(self) -> int:
        return self.raw.type

    @property
    def flags(self) -> int:
        return self.raw.flags

    @property
    def entsize(self) -> int:
        return self.raw.entsize

    @property
    def size(self) -> int:
        return self.raw.size

    @cached_property
    def data(self) -> bytes:
        return bytes(self.size) if self.type == SHT_NOBITS else self.raw.data

    @property
    def is_code(self) -> bool:
        return bool(self.flags & SHF_EXECINSTR)

    @property
    def kind(self) -> str:
        """code, data, strings, constants, special or skip (never reaches the kernel or derived)."""
        if self.type in _META_TYPES:
            return "skip"
        if self.rule is not None:
            if self.rule.handling in (Handling.IGNORE, Handling.DIRECTIVE):
                return "skip"
            if self.rule.handling is Handling.BOOT_ONLY:
                return "code" if self.is_code else "data"
            return "special"
        if not self.flags & SHF_ALLOC:
            return "skip"
        if self.is_code:
            return "code"
        if self.flags & SHF_MERGE:
            return "strings" if self.flags & SHF_STRINGS else "constants"
        if self.name.startswith(DATA_PREFIXES) or self.name in CARRIED_WRITABLE_SECTIONS:
            return "data"
        return "special"

    @property
    def special_rule(self) -> SectionRule:
        return self.rule or DEFAULT_RULE


@dataclass(frozen=True)
class _Sym:
    """A symbol with its defining section resolved (extended section numbers included)."""

    index: int
    name: str
    type: int  # STT_FUNC, STT_OBJECT, ...
    bind: int  # STB_LOCAL, ...
    shndx: int | None  # None when undefined, absolute or common
    value: int
    size: int


class _Reader:
    """One pass over a relocatable object of the ELF model; builds the normalised ObjectInfo."""

    def __init__(self, obj: RelocatableElf, where: str):
        self.where = where
        if obj.machine != EM_X86_64:
            raise BuildError(f"{where}: unsupported machine (e_machine {obj.machine}; x86-64 only)")
        self.sections = [_Section(i, s, section_rule(s.name)) for i, s in enumerate(obj.sections)]
        self.syms = [_Sym(i, s.name, s.type, s.binding, obj.symbol_section(i), s.value, s.size)
                     for i, s in enumerate(obj.symbols)]
        self.relocs: dict[int, list[Rela]] = obj.relocations_by_target()
        for target, rows in self.relocs.items():
            unknown = next((r.type for r in rows if r.type not in RELOC_KINDS), None)
            if unknown is not None:
                raise BuildError(f"{where}: unsupported relocation type {unknown} for {obj.sections[target].name}")
        # Defined functions and objects per section, by address: what a section-relative reference hits.
        self.defined: dict[int, list[_Sym]] = {}
        for s in self.syms:
            if s.shndx is not None and s.type in (STT_FUNC, STT_OBJECT, STT_TLS) and s.name:
                self.defined.setdefault(s.shndx, []).append(s)
        for rows in self.defined.values():
            rows.sort(key=lambda s: (s.value, -s.size))
        self.anchors = self._anchors()
        self.keys: dict[int, str] = {}

    # -- resolution of references -------------------------------------------------------------

    def _bias(self, host: _Section, kind: RelocKind) -> int:
        """How far past its addend a reference lands: a pc-relative instruction operand ends the
        instruction (almost always), while ``.long x - .`` in a table carries the exact offset."""
        return kind.width if kind.pc_relative and host.is_code else 0

    def _anchors(self) -> dict[int, list[int]]:
        """Every offset referenced through a section symbol, per section: the boundaries of the
        anonymous pieces (alternative replacements, unnamed constants) a reference can land in."""
        anchors: dict[int, set[int]] = {}
        for host_index, rows in self.relocs.items():
            host = self.sections[host_index]
            for r in rows:
                sym = self.syms[r.sym] if r.sym < len(self.syms) else None
                if sym is not None and _section_like(sym):
                    target = sym.value + r.addend + self._bias(host, RELOC_KINDS[r.type])
                    anchors.setdefault(sym.shndx, set()).add(target)
        return {k: sorted(v) for k, v in anchors.items()}

    def hit(self, shndx: int, target: int) -> _Sym | None:
        """The function or object a section-relative reference lands in (or just past)."""
        best = None
        for s in self.defined.get(shndx, ()):
            if s.value <= target < s.value + max(s.size, 1):
                return s
            if s.value <= target:
                best = s
        return best

    def target_symbol(self, host: _Section, r: Rela) -> _Sym | None:
        """The defined function/object a raw relocation refers to, if any."""
        sym = self.syms[r.sym]
        if _section_like(sym):
            return self.hit(sym.shndx, sym.value + r.addend + self._bias(host, RELOC_KINDS[r.type]))
        return sym if sym.shndx is not None else None

    def name_of(self, sym: _Sym) -> str:
        return self.keys.get(sym.index, sym.name)

    def normalise(self, host: _Section, r: Rela, base: int) -> Reloc:
        """A relocation as a comparable value: symbol by name, strings by text, pieces by content."""
        sym = self.syms[r.sym]
        if not _section_like(sym):
            return Reloc(r.offset - base, r.type, self.name_of(sym), r.addend)
        target_sec = self.sections[sym.shndx]
        target = sym.value + r.addend + self._bias(host, RELOC_KINDS[r.type])
        addend = sym.value + r.addend
        if target_sec.kind == "strings":
            text, start = _string_at(target_sec, target)
            return Reloc(r.offset - base, r.type, f".rodata.str:{text}", addend - start)
        if target_sec.kind == "constants" and target_sec.entsize:
            start = target - target % target_sec.entsize
            blob = target_sec.data[start:start + target_sec.entsize]
            return Reloc(r.offset - base, r.type, f".rodata.cst:{blob.hex()}", addend - start)
        hit = self.hit(sym.shndx, target)
        if hit is not None:
            return Reloc(r.offset - base, r.type, self.name_of(hit), addend - hit.value)
        start, digest = self._piece(target_sec, target)
        return Reloc(r.offset - base, r.type, f"{target_sec.name}:{digest}", addend - start)

    def _piece(self, sec: _Section, target: int, length: int | None = None) -> tuple[int, str]:
        """Identity of unnamed bytes (alternative replacements, static_cpu_has() tests): ``length``
        bytes from the target when the reference says how many, else from the referenced offset to
        the next one. Its own relocations count by what they hit (a function and the offset in it) or
        else by raw name, without recursing into other pieces, so moving a piece is no change."""
        if length is not None:
            start, end = target, target + length
        else:
            anchors = self.anchors.get(sec.index, [])
            start = max([a for a in anchors if a <= target], default=0)
            end = min([a for a in anchors if a > start] + [sec.size])
        rows = [r for r in self.relocs.get(sec.index, ()) if start <= r.offset < end]
        h = hashlib.sha256(_mask(sec.data[start:end], rows, start))
        for r in rows:
            sym = self.syms[r.sym]
            hit = self.target_symbol(sec, r) if _section_like(sym) else None
            name, addend = (hit.name, sym.value + r.addend - hit.value) if hit is not None else (sym.name, r.addend)
            h.update(f"{r.offset - start}:{r.type}:{name}:{addend};".encode())
        return start, h.hexdigest()[:16]

    def sized_piece(self, host: _Section, offset: int, length: int, base: int) -> Reloc | None:
        """The relocation at ``offset`` of a table entry that names ``length`` bytes of unnamed code
        (an alternative's replacement), as that exact piece; None when it names a symbol."""
        r = next((r for r in self.relocs.get(host.index, ()) if r.offset == offset), None)
        if r is None or not _section_like(self.syms[r.sym]):
            return None
        sym = self.syms[r.sym]
        target = sym.value + r.addend + self._bias(host, RELOC_KINDS[r.type])
        target_sec = self.sections[sym.shndx]
        if self.hit(sym.shndx, target) is not None:
            return None
        _start, digest = self._piece(target_sec, target, length)
        return Reloc(r.offset - base, r.type, f"{target_sec.name}:{digest}", 0)

    def item_relocs(self, sec: _Section, start: int, end: int) -> tuple[tuple[Reloc, ...], bytes]:
        """Normalised relocations of [start, end) in ``sec`` and its bytes with their sites zeroed."""
        rows = [r for r in self.relocs.get(sec.index, ()) if start <= r.offset < end]
        relocs = tuple(self.normalise(sec, r, start) for r in rows)
        return relocs, _mask(sec.data[start:end], rows, start)

    # -- building ------------------------------------------------------------------------------

    def read(self) -> ObjectInfo:
        functions = self._functions_raw()
        self.keys = _data_keys(self, functions)
        info = ObjectInfo(functions={}, data={}, special_sections=set())
        for name, (sym, sec, parent) in functions.items():
            end = sym.value + (sym.size or self._extent(sym, sec))
            relocs, code = self.item_relocs(sec, sym.value, end)
            info.functions[name] = Function(name, sec.name, end - sym.value, code, relocs,
                                            _binding(sym.bind), parent)
        for sym in self.syms:
            if sym.type not in (STT_OBJECT, STT_TLS) or sym.shndx is None or not sym.name:
                continue
            sec = self.sections[sym.shndx]
            if sec.kind not in ("data", "strings", "constants"):
                continue
            relocs, contents = self.item_relocs(sec, sym.value, sym.value + sym.size)
            if sec.type == SHT_NOBITS:
                contents = None
            key = self.name_of(sym)
            info.data[key] = DataItem(key, sym.name, sec.name, sym.size, contents, relocs, _binding(sym.bind),
                                      bool(sec.flags & SHF_WRITE))
        for sec in self.sections:
            if sec.kind != "special":
                continue
            info.special_sections.add(sec.name)
            rule = sec.special_rule
            if rule.handling is Handling.PER_FUNCTION and sec.size % rule.entry_size == 0:
                info.tables[sec.name] = info.tables.get(sec.name, ()) + tuple(self._entries(sec, rule, info))
            else:
                relocs, blob = self.item_relocs(sec, 0, sec.size)
                info.opaque[sec.name] = info.opaque.get(sec.name, ()) + ((sec.size, blob, relocs),)
        for sec in self.sections:
            if sec.name == "__mcount_loc":
                for r in self.relocs.get(sec.index, ()):
                    hit = self.target_symbol(sec, r)
                    if hit is not None and hit.type == STT_FUNC:
                        info.mcount_sites.add(hit.name)
        return info

    def _functions_raw(self) -> dict[str, tuple[_Sym, _Section, str | None]]:
        names = {s.name for s in self.syms if s.type == STT_FUNC}
        found: dict[str, tuple[_Sym, _Section, str | None]] = {}
        for sym in self.syms:
            if sym.type != STT_FUNC or sym.shndx is None or not sym.name:
                continue
            sec = self.sections[sym.shndx]
            if sec.kind != "code":
                continue
            cold = _COLD_RE.match(sym.name)
            parent = cold["parent"] if cold and cold["parent"] in names else None
            found.setdefault(sym.name, (sym, sec, parent))
        return found

    def _extent(self, sym: _Sym, sec: _Section) -> int:
        """Size of a function without .size (hand-written asm): up to the next symbol."""
        after = [s.value for s in self.defined.get(sec.index, ()) if s.value > sym.value]
        return min(after, default=sec.size) - sym.value

    def _entries(self, sec: _Section, rule: SectionRule, info: ObjectInfo) -> Iterator[TableEntry]:
        layout = rule.layout
        for start in range(0, sec.size, rule.entry_size):
            relocs, blob = self.item_relocs(sec, start, start + rule.entry_size)
            if layout is not None and layout.piece_offset is not None and layout.piece_length_offset is not None:
                # The piece is as long as the entry says, not up to whatever comes next (the next
                # function's replacement may start where an empty one is).
                piece = self.sized_piece(sec, start + layout.piece_offset, sec.data[start + layout.piece_length_offset],
                                         start)
                relocs = tuple(piece if piece is not None and r.offset == piece.offset else r for r in relocs)
            owner = next((info.unit_of(r.symbol) for r in relocs if r.symbol in info.functions), None)
            yield TableEntry(owner, blob, relocs)


def _section_like(sym: _Sym) -> bool:
    """A reference to be identified by what it points at, not by its symbol's name: section
    symbols, and the assembler's local labels (``.LC5``), whose numbers shift when a patch adds
    a string anywhere earlier in the file."""
    return sym.shndx is not None and (sym.type == STT_SECTION or sym.name.startswith(".L"))


def _binding(bind: int) -> str:
    return {STB_LOCAL: "local", STB_GLOBAL: "global", STB_WEAK: "weak"}.get(bind, f"binding {bind}")


def _mask(blob: bytes, rows: Iterable[Rela], base: int) -> bytes:
    out = bytearray(blob)
    for r in rows:
        off = r.offset - base
        size = RELOC_KINDS[r.type].width
        out[off:off + size] = bytes(len(out[off:off + size]))
    return bytes(out)


def _string_at(sec: _Section, target: int) -> tuple[str, int]:
    """The NUL-terminated string a reference lands in, and where it starts."""
    data = sec.data
    unit = max(sec.entsize, 1)
    target = min(max(target, 0), len(data))
    start = target - target % unit
    while start >= unit and data[start - unit:start] != bytes(unit):
        start -= unit
    end = start
    while end < len(data) and data[end:end + unit] != bytes(unit):
        end += unit
    raw = data[start:end]
    text = raw.decode("utf-8", "backslashreplace") if unit == 1 else raw.hex()
    return text, start


def _data_keys(reader: _Reader, functions: dict[str, tuple[_Sym, _Section, str | None]]) -> dict[int, str]:
    """Stable names for file-local objects whose ELF names carry a compiler or __COUNTER__ number.

    ``calls.1`` becomes ``calls`` when it is the only one of that base name in the file; otherwise
    it is named by the function that uses it, ``withstatic/calls`` (``#2``... when one function has
    several). Other objects keep their ELF names. Keys only have to match between the original and
    the patched object; the ELF name stays in DataItem.symbol.
    """
    owners: dict[int, set[str]] = {}
    for name, (sym, sec, parent) in functions.items():
        for r in reader.relocs.get(sec.index, ()):
            if sym.value <= r.offset < sym.value + max(sym.size, 1):
                hit = reader.target_symbol(sec, r)
                if hit is not None and hit.type != STT_FUNC:
                    owners.setdefault(hit.index, set()).add(parent or name)
    # An object only data refers to (__func__ in a pr_debug descriptor) belongs to that data's owners.
    for _ in range(3):
        for obj in reader.syms:
            if obj.index not in owners or obj.shndx is None:
                continue
            sec = reader.sections[obj.shndx]
            for r in reader.relocs.get(obj.shndx, ()):
                if obj.value <= r.offset < obj.value + obj.size:
                    hit = reader.target_symbol(sec, r)
                    if hit is not None and hit.type != STT_FUNC and hit.index not in owners:
                        owners[hit.index] = set(owners[obj.index])
    reserved: set[str] = set()
    numbered: dict[str, list[_Sym]] = {}
    for sym in reader.syms:
        if sym.type not in (STT_OBJECT, STT_TLS) or sym.shndx is None or not sym.name:
            continue
        base = _unnumbered(sym.name) if sym.bind == STB_LOCAL else sym.name
        if base != sym.name:
            numbered.setdefault(base, []).append(sym)
        else:
            reserved.add(sym.name)
    keys: dict[int, str] = {}
    for base, syms in numbered.items():
        if len(syms) == 1 and base not in reserved:
            keys[syms[0].index] = base
            continue
        by_owner: dict[str, list[_Sym]] = {}
        for sym in syms:
            users = owners.get(sym.index)
            if users:
                by_owner.setdefault(f"{min(users)}/{base}", []).append(sym)
        for key, group in by_owner.items():
            group.sort(key=lambda s: _number(s.name))
            for i, sym in enumerate(group):
                keys[sym.index] = key if i == 0 else f"{key}#{i + 1}"
    return keys


def _unnumbered(name: str) -> str:
    """``__UNIQUE_ID_ddebug3.3`` -> ``__UNIQUE_ID_ddebug``, ``calls.1`` -> ``calls``."""
    numbered = _NUMBERED_RE.match(name)
    base = numbered["base"] if numbered else name
    unique = _UNIQUE_ID_RE.match(base)
    return unique["base"] if unique else base


def _number(name: str) -> int:
    digits = re.search(r"(\d+)$", name)
    return int(digits.group(1)) if digits else 0


def read_object(source: str | Path | bytes) -> ObjectInfo:
    """Parse a relocatable x86-64 object (a path or its bytes) into comparable functions and data."""
    where = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        blob = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as exc:
        raise BuildError(f"cannot read object: {exc.strerror}", path=where) from exc
    return _Reader(RelocatableElf.parse(blob, where), where).read()

