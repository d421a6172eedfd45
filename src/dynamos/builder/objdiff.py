"""Function-level diff of two compiled translation units: the original and the patched file.

Both objects come from the same compiler and flags with ``-ffunction-sections -fdata-sections``,
so every function and data object sits at a known place and can be compared on its own. A
function is compared by its code with the relocation sites masked, and by its relocations with
the referenced symbol *normalised*: section-relative references become the symbol they land in,
string literals become their text, so a string or a function that merely moved in the object does
not look like a change. What cannot be live-patched is refused with a reason that names the symbol.

The result tells the module generator which functions the update must carry (changed and new),
which data it must place in the update module (new data, changed file-local constants), and which
special-section entries (static keys, alternatives, BUG/WARN sites, exception fixups) travel with
those functions.

Both objects must be compiled from the same path (``__FILE__`` is in BUG/WARN entries and strings)
and the patched file with its line numbers stabilised (``linemap``), or every WARN site moves.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection

from dynamos.builder.elf import RELOC_KINDS, RelocKind
from dynamos.errors import BuildError

EM_X86_64 = "EM_X86_64"
FENTRY = "__fentry__"
# Offsets of the __fentry__ call's relocation in a traceable function: right at the start, or
# after a 4-byte ENDBR64 when the kernel is built with IBT.
FENTRY_RELOC_OFFSETS = (1, 5)

# ---------------------------------------------------------------------------------------------
# Special sections, one row per kind. The first matching row decides; sections that match no row
# are code (executable), merged constants, data (.data*, .bss*, .rodata*) or, when allocated and
# unknown, refused on any change (DEFAULT_RULE).


class Handling(Enum):
    IGNORE = "ignore"  # derived per function: rebuilt for the update module, or harmless to leave out
    PER_FUNCTION = "per-function"  # a table whose entries point into functions; entries travel with them
    BOOT_ONLY = "boot-only"  # __init/__exit code and data: used only at boot, load or unload
    REFUSE_CHANGE = "refuse-change"  # a table dynamos does not handle yet: any change refuses the update


@dataclass(frozen=True)
class SectionRule:
    pattern: str  # fnmatch pattern on the section name
    handling: Handling
    why: str
    entry_size: int = 0  # PER_FUNCTION only: size of one table entry (x86-64, kernel 6.1)


SECTION_RULES: tuple[SectionRule, ...] = (
    SectionRule("__mcount_loc", Handling.IGNORE, "fentry call sites; recorded again for the update module"),
    SectionRule("__patchable_function_entries", Handling.IGNORE, "fentry sites; recorded again for the update"),
    SectionRule(".orc_unwind", Handling.IGNORE, "ORC unwind data; objtool writes it again for the update module"),
    SectionRule(".orc_unwind_ip", Handling.IGNORE, "ORC unwind data; objtool writes it again for the update module"),
    SectionRule(".orc_header", Handling.IGNORE, "ORC format header; written again for the update module"),
    SectionRule(".return_sites", Handling.IGNORE, "return-thunk sites; an unlisted site keeps the thunk (correct)"),
    SectionRule(".retpoline_sites", Handling.IGNORE, "retpoline sites; an unlisted site keeps the thunk (correct)"),
    SectionRule(".call_sites", Handling.IGNORE, "call-depth tracking sites; an unlisted site is still correct"),
    SectionRule(".ibt_endbr_seal", Handling.IGNORE, "ENDBR sealing list; only an optimisation"),
    SectionRule(".static_call_sites", Handling.IGNORE, "static-call sites; an unlisted site calls the trampoline"),
    SectionRule(".smp_locks", Handling.IGNORE, "LOCK prefixes kept for UP patching; leaving them is correct"),
    SectionRule(".altinstr_replacement", Handling.IGNORE, "replacement code; compared via .altinstructions entries"),
    SectionRule(".altinstr_aux", Handling.IGNORE, "static_cpu_has fallback code; compared via its users"),
    SectionRule(".discard.*", Handling.IGNORE, "objtool annotations, dropped at link time"),
    SectionRule(".note.*", Handling.IGNORE, "notes (build id, GNU properties), not code or data"),
    SectionRule("__jump_table", Handling.PER_FUNCTION, "static-key sites (struct jump_entry)", 16),
    SectionRule(".altinstructions", Handling.PER_FUNCTION, "CPU-feature alternatives (struct alt_instr)", 12),
    SectionRule("__bug_table", Handling.PER_FUNCTION, "BUG/WARN sites (struct bug_entry)", 12),
    SectionRule("__ex_table", Handling.PER_FUNCTION, "exception fixups (struct exception_table_entry)", 12),
    SectionRule(".parainstructions", Handling.PER_FUNCTION, "paravirt sites (struct paravirt_patch_site)", 16),
    SectionRule(".init.*", Handling.BOOT_ONLY, "__init: runs only at boot or module load and is freed afterwards"),
    SectionRule(".exit.*", Handling.BOOT_ONLY, "__exit: runs only at module unload, or never when built in"),
    SectionRule(".head.text", Handling.BOOT_ONLY, "early boot code: runs once before the kernel is up"),
    SectionRule(".initcall*", Handling.REFUSE_CHANGE, "the initcall list is read only at boot"),
    SectionRule("__ksymtab*", Handling.REFUSE_CHANGE, "exported symbols"),
    SectionRule("___ksymtab*", Handling.REFUSE_CHANGE, "exported symbols"),
    SectionRule("__kcrctab*", Handling.REFUSE_CHANGE, "export CRCs"),
    SectionRule("__param", Handling.REFUSE_CHANGE, "module and boot parameters"),
    SectionRule(".modinfo", Handling.REFUSE_CHANGE, "module metadata"),
    SectionRule("__tracepoint*", Handling.REFUSE_CHANGE, "tracepoint definitions"),
    SectionRule("_ftrace_events", Handling.REFUSE_CHANGE, "trace event definitions"),
    SectionRule("__syscalls_metadata", Handling.REFUSE_CHANGE, "syscall trace metadata"),
)
DEFAULT_RULE = SectionRule("*", Handling.REFUSE_CHANGE, "a special section dynamos does not handle yet")

DATA_PREFIXES = (".data", ".bss", ".rodata", ".tdata", ".tbss", ".ref.data", ".ref.rodata")
# File-local writable data that is, like a constant, owned by the functions that use it: when it
# changes, the update carries a new copy together with those functions (pr_debug descriptors).
CARRIED_WRITABLE_SECTIONS = ("__dyndbg",)

# gcc numbers function-scope statics (calls.1, __func__.0) and the kernel numbers __UNIQUE_ID_
# names with __COUNTER__; both numbers shift when unrelated code is added, so keys drop them.
_NUMBERED_RE = re.compile(r"^(?P<base>.+?)\.\d+$")
_UNIQUE_ID_RE = re.compile(r"^(?P<base>__UNIQUE_ID_\D*?)\d+$")
# A .cold part (foo.cold, foo.cold.3) is the unlikely half of its parent foo, split off by gcc.
_COLD_RE = re.compile(r"^(?P<parent>.+)\.cold(\.\d+)?$")

_SHF_WRITE, _SHF_ALLOC, _SHF_EXECINSTR, _SHF_MERGE, _SHF_STRINGS = 0x1, 0x2, 0x4, 0x10, 0x20
_META_TYPES = {"SHT_NULL", "SHT_SYMTAB", "SHT_STRTAB", "SHT_RELA", "SHT_REL", "SHT_GROUP", "SHT_SYMTAB_SHNDX"}


def section_rule(name: str) -> SectionRule | None:
    """The special-section row for ``name``, or None for ordinary code, data and constants."""
    for rule in SECTION_RULES:
        if fnmatchcase(name, rule.pattern):
            return rule
    return None


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
    index: int
    name: str
    type: str
    flags: int
    entsize: int
    size: int
    raw: Any  # pyelftools section
    rule: SectionRule | None
    _data: bytes | None = None

    @property
    def data(self) -> bytes:
        if self._data is None:
            self._data = bytes(self.size) if self.type == "SHT_NOBITS" else self.raw.data()
        return self._data

    @property
    def is_code(self) -> bool:
        return bool(self.flags & _SHF_EXECINSTR)

    @property
    def kind(self) -> str:
        """code, data, strings, constants, special or skip (never reaches the kernel or derived)."""
        if self.type in _META_TYPES:
            return "skip"
        if self.rule is not None:
            if self.rule.handling is Handling.IGNORE:
                return "skip"
            if self.rule.handling is Handling.BOOT_ONLY:
                return "code" if self.is_code else "data"
            return "special"
        if not self.flags & _SHF_ALLOC:
            return "skip"
        if self.is_code:
            return "code"
        if self.flags & _SHF_MERGE:
            return "strings" if self.flags & _SHF_STRINGS else "constants"
        if self.name.startswith(DATA_PREFIXES) or self.name in CARRIED_WRITABLE_SECTIONS:
            return "data"
        return "special"

    @property
    def special_rule(self) -> SectionRule:
        return self.rule or DEFAULT_RULE


@dataclass(frozen=True)
class _Sym:
    index: int
    name: str
    type: str  # STT_FUNC, STT_OBJECT, ...
    bind: str
    shndx: int | None  # None when undefined, absolute or common
    value: int
    size: int


@dataclass(frozen=True)
class _RawReloc:
    offset: int
    type: int
    sym: int
    addend: int


class _Reader:
    """One pass over an ELF relocatable object; builds the normalised ObjectInfo."""

    def __init__(self, elf: ELFFile, where: str):
        self.where = where
        if elf["e_type"] != "ET_REL":
            raise BuildError(f"{where}: not a relocatable object ({elf['e_type']})")
        if elf["e_machine"] != EM_X86_64:
            raise BuildError(f"{where}: unsupported machine {elf['e_machine']} (x86-64 only)")
        self.sections = [
            _Section(i, s.name, s["sh_type"], s["sh_flags"], s["sh_entsize"], s["sh_size"], s, section_rule(s.name))
            for i, s in enumerate(elf.iter_sections())
        ]
        symtab = elf.get_section_by_name(".symtab")
        xindex = elf.get_section_by_name(".symtab_shndx")  # section numbers of objects with > 65279 sections
        self.syms: list[_Sym] = []
        if symtab is not None:
            for i, s in enumerate(symtab.iter_symbols()):
                shndx = s["st_shndx"] if isinstance(s["st_shndx"], int) else None
                if s["st_shndx"] == "SHN_XINDEX" and xindex is not None:
                    shndx = xindex.get_section_index(i)
                self.syms.append(_Sym(i, s.name, s["st_info"]["type"], s["st_info"]["bind"], shndx,
                                      s["st_value"], s["st_size"]))
        self.relocs: dict[int, list[_RawReloc]] = {}
        for sec in elf.iter_sections():
            if isinstance(sec, RelocationSection) and sec["sh_info"]:
                rows = self.relocs.setdefault(sec["sh_info"], [])
                for r in sec.iter_relocations():
                    if r["r_info_type"] not in RELOC_KINDS:
                        raise BuildError(f"{where}: unsupported relocation type {r['r_info_type']} in {sec.name}")
                    rows.append(_RawReloc(r["r_offset"], r["r_info_type"], r["r_info_sym"],
                                          r["r_addend"] if sec.is_RELA() else 0))
                rows.sort(key=lambda r: r.offset)
        # Defined functions and objects per section, by address: what a section-relative reference hits.
        self.defined: dict[int, list[_Sym]] = {}
        for s in self.syms:
            if s.shndx is not None and s.type in ("STT_FUNC", "STT_OBJECT", "STT_TLS") and s.name:
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

    def target_symbol(self, host: _Section, r: _RawReloc) -> _Sym | None:
        """The defined function/object a raw relocation refers to, if any."""
        sym = self.syms[r.sym]
        if _section_like(sym):
            return self.hit(sym.shndx, sym.value + r.addend + self._bias(host, RELOC_KINDS[r.type]))
        return sym if sym.shndx is not None else None

    def name_of(self, sym: _Sym) -> str:
        return self.keys.get(sym.index, sym.name)

    def normalise(self, host: _Section, r: _RawReloc, base: int) -> Reloc:
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

    def _piece(self, sec: _Section, target: int) -> tuple[int, str]:
        """Identity of unnamed bytes: from the referenced offset to the next referenced offset,
        with its own relocations by raw name (no recursion), so moving the piece is no change."""
        anchors = self.anchors.get(sec.index, [])
        start = max([a for a in anchors if a <= target], default=0)
        end = min([a for a in anchors if a > start] + [sec.size])
        h = hashlib.sha256(_mask(sec.data[start:end], (r for r in self.relocs.get(sec.index, ())
                                                        if start <= r.offset < end), start))
        for r in self.relocs.get(sec.index, ()):
            if start <= r.offset < end:
                h.update(f"{r.offset - start}:{r.type}:{self.syms[r.sym].name}:{r.addend};".encode())
        return start, h.hexdigest()[:16]

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
            if sym.type not in ("STT_OBJECT", "STT_TLS") or sym.shndx is None or not sym.name:
                continue
            sec = self.sections[sym.shndx]
            if sec.kind not in ("data", "strings", "constants"):
                continue
            relocs, contents = self.item_relocs(sec, sym.value, sym.value + sym.size)
            if sec.type == "SHT_NOBITS":
                contents = None
            key = self.name_of(sym)
            info.data[key] = DataItem(key, sym.name, sec.name, sym.size, contents, relocs, _binding(sym.bind),
                                      bool(sec.flags & _SHF_WRITE))
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
                    if hit is not None and hit.type == "STT_FUNC":
                        info.mcount_sites.add(hit.name)
        return info

    def _functions_raw(self) -> dict[str, tuple[_Sym, _Section, str | None]]:
        names = {s.name for s in self.syms if s.type == "STT_FUNC"}
        found: dict[str, tuple[_Sym, _Section, str | None]] = {}
        for sym in self.syms:
            if sym.type != "STT_FUNC" or sym.shndx is None or not sym.name:
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
        for start in range(0, sec.size, rule.entry_size):
            relocs, blob = self.item_relocs(sec, start, start + rule.entry_size)
            owner = next((info.unit_of(r.symbol) for r in relocs if r.symbol in info.functions), None)
            yield TableEntry(owner, blob, relocs)


def _section_like(sym: _Sym) -> bool:
    """A reference to be identified by what it points at, not by its symbol's name: section
    symbols, and the assembler's local labels (``.LC5``), whose numbers shift when a patch adds
    a string anywhere earlier in the file."""
    return sym.shndx is not None and (sym.type == "STT_SECTION" or sym.name.startswith(".L"))


def _binding(bind: str) -> str:
    return {"STB_LOCAL": "local", "STB_GLOBAL": "global", "STB_WEAK": "weak"}.get(bind, bind.lower())


def _mask(blob: bytes, rows: Iterable[_RawReloc], base: int) -> bytes:
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
                if hit is not None and hit.type != "STT_FUNC":
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
                    if hit is not None and hit.type != "STT_FUNC" and hit.index not in owners:
                        owners[hit.index] = set(owners[obj.index])
    reserved: set[str] = set()
    numbered: dict[str, list[_Sym]] = {}
    for sym in reader.syms:
        if sym.type not in ("STT_OBJECT", "STT_TLS") or sym.shndx is None or not sym.name:
            continue
        base = _unnumbered(sym.name) if sym.bind == "STB_LOCAL" else sym.name
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
    try:
        return _Reader(ELFFile(io.BytesIO(blob)), where).read()
    except ELFError as exc:
        raise BuildError(f"{where}: not an ELF object ({exc})") from exc


# ---------------------------------------------------------------------------------------------
# Diffing.


@dataclass
class Change:
    kind: str  # "changed", "new" or "removed"
    name: str
    reason: str


@dataclass
class Refusal:
    name: str
    reason: str


@dataclass
class SpecialUse:
    """Entries of a per-function special table that a changed or new function brings along."""

    section: str
    function: str
    entries: int


@dataclass
class DiffResult:
    """What the update must carry, and what it cannot. A refused function is in no other list."""

    changed: list[Change] = field(default_factory=list)  # replace the kernel's function (livepatch redirects it)
    new: list[Change] = field(default_factory=list)  # include in the update, not redirected (incl. notrace copies)
    removed: list[Change] = field(default_factory=list)  # functions and data gone from the patched file
    refused: list[Refusal] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    new_data: list[Change] = field(default_factory=list)  # new objects and changed local constants to carry
    special: list[SpecialUse] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.refused


def diff_objects(original: ObjectInfo, patched: ObjectInfo) -> DiffResult:
    """Compare two compiled translation units function by function (see module docstring)."""
    result = DiffResult()
    units_o, units_p = original.units(), patched.units()
    changed: dict[str, str] = {}
    for name in sorted(units_o.keys() | units_p.keys()):
        if name not in units_p:
            result.removed.append(Change("removed", name, "function no longer in the patched file"))
        elif name not in units_o:
            result.new.append(Change("new", name, "function added by the patch"))
        else:
            reason = _unit_difference(units_o[name], units_p[name])
            if reason:
                changed[name] = reason

    refused: dict[str, str] = {}
    carried_data = _diff_data(original, patched, result, changed, refused)
    _settle_untraceable(original, patched, result, changed, refused, carried_data)
    for change in list(result.new):
        rule = section_rule(patched.functions[change.name].section)
        if rule is not None and rule.handling is Handling.BOOT_ONLY:
            refused[change.name] = f"{rule.why}; an update cannot add {change.name}"
            result.new.remove(change)
    result.changed = [Change("changed", name, changed[name]) for name in sorted(changed)]
    result.new.sort(key=lambda c: c.name)
    carried = set(changed) | {c.name for c in result.new}
    result.unchanged = sorted(n for n in units_o.keys() & units_p.keys() if n not in carried and n not in refused)
    _diff_tables(original, patched, result, carried, refused)
    _diff_opaque(original, patched, refused)
    result.refused = [Refusal(name, refused[name]) for name in sorted(refused)]
    return result


def _unit_difference(before: list[Function], after: list[Function]) -> str:
    """Why a function (with its .cold parts) differs, or "" when it does not."""
    parts_o = {fn.name: fn for fn in before}
    parts_p = {fn.name: fn for fn in after}
    reasons = []
    for part in sorted(parts_o.keys() | parts_p.keys()):
        prefix = "" if part == after[0].name else f"in {part}: "
        if part not in parts_p:
            reasons.append(f"{prefix}part removed")
        elif part not in parts_o:
            reasons.append(f"{prefix}part added")
        else:
            why = _function_difference(parts_o[part], parts_p[part])
            if why:
                reasons.append(prefix + why)
    return "; ".join(reasons)


def _function_difference(a: Function, b: Function) -> str:
    reasons = []
    if a.code != b.code:
        reasons.append("code changed")
    if a.relocs != b.relocs:
        added = sorted({r.symbol for r in b.relocs} - {r.symbol for r in a.relocs})
        dropped = sorted({r.symbol for r in a.relocs} - {r.symbol for r in b.relocs})
        if added:
            reasons.append("now references " + ", ".join(_describe(s) for s in added))
        if dropped:
            reasons.append("no longer references " + ", ".join(_describe(s) for s in dropped))
        if not added and not dropped and a.code == b.code:
            first = next((y for x, y in zip(a.relocs, b.relocs, strict=False) if x != y), b.relocs[-1])
            reasons.append(f"reference to {_describe(first.symbol)} changed")
    return "; ".join(reasons)


def _describe(symbol: str) -> str:
    if symbol.startswith(".rodata.str:"):
        return f"string {symbol.removeprefix('.rodata.str:')!r}"
    return symbol


def _settle_untraceable(original: ObjectInfo, patched: ObjectInfo, result: DiffResult, changed: dict[str, str],
                        refused: dict[str, str], carried_data: set[str]) -> None:
    """Check that livepatch can redirect each changed function (the original is what it redirects).

    __init/__exit code refuses. A changed function without an fentry site refuses too, unless it is
    file-static (typically an out-of-line ``static inline``, which the kernel marks notrace) and no
    existing data points to it: then the update carries its own copy as a new function and replaces
    every caller instead, repeating for callers that are themselves untraceable statics.
    """
    users = _merge(_users(original), _users(patched))
    units_o, units_p = original.units(), patched.units()
    work = sorted(changed)
    while work:
        name = work.pop(0)
        head = units_o[name][0]
        rule = section_rule(head.section)
        if rule is not None and rule.handling is Handling.BOOT_ONLY:
            refused[name] = f"{rule.why}; {name} is in {head.section}"
            del changed[name]
            continue
        if head.traceable or name in original.mcount_sites:
            continue
        why_changed = changed.pop(name)
        pinned = sorted(original.data[u].symbol for u in users.get(name, ())
                        if u in original.data and u not in carried_data)
        if head.binding != "local" or pinned:
            where = "it is global, so code elsewhere calls it" if head.binding != "local" else \
                f"data points to it: {', '.join(pinned)}"
            refused[name] = (f"not traceable (notrace): {name} has no __fentry__ call at its start, so livepatch "
                             f"cannot redirect it, and {where}")
            continue
        result.new.append(Change("new", name, f"{why_changed}; not traceable (notrace), so the update carries its "
                                 "own copy and replaces its callers"))
        for caller in sorted(users.get(name, ())):
            if caller in units_o and caller in units_p and caller not in changed and caller not in refused \
                    and all(c.name != caller for c in result.new):
                changed[caller] = f"calls {name}, which changed but cannot be patched in place (notrace)"
                work.append(caller)


def _data_kind(item: DataItem) -> str:
    scope = "static" if item.binding == "local" else "global"
    return f"{scope} {'variable' if item.writable else 'constant'} {item.symbol}"


def _carriable(item: DataItem) -> bool:
    """A file-local object only this file's functions can reach: a changed copy can travel with them."""
    if item.binding != "local":
        return False
    return not item.writable or item.section in CARRIED_WRITABLE_SECTIONS


def _diff_data(original: ObjectInfo, patched: ObjectInfo, result: DiffResult, changed: dict[str, str],
               refused: dict[str, str]) -> set[str]:
    """New data is carried; changed data is refused, except file-local constants (and descriptors
    such as pr_debug's), which travel as new copies together with every function that uses them.

    Data is reported by ELF symbol name (what the extractor and the kernel know); keys only match
    objects between the two files. Returns the keys of the data the update carries.
    """
    users = _merge(_users(original), _users(patched))
    refused_keys: set[str] = set()

    def refuse(key: str, reason: str) -> None:
        refused[patched.data[key].symbol] = reason
        refused_keys.add(key)

    new_keys = set(patched.data) - set(original.data)
    for key in sorted(set(original.data) - set(patched.data)):
        result.removed.append(Change("removed", original.data[key].symbol, "data object no longer defined"))
    for key in sorted(new_keys):
        item = patched.data[key]
        rule = section_rule(item.section)
        if rule is not None and rule.handling is Handling.BOOT_ONLY:
            refuse(key, f"{rule.why}; an update cannot add {_data_kind(item)}")
        else:
            result.new_data.append(Change("new", item.symbol, f"new {_data_kind(item)} in {item.section}"))
    differing = {k for k in set(original.data) & set(patched.data) if not original.data[k].same_value(patched.data[k])}
    carried: dict[str, str] = {}
    work = sorted(differing)
    while work:
        key = work.pop(0)
        before, after = original.data[key], patched.data[key]
        rule = section_rule(after.section)
        if rule is not None and rule.handling is Handling.BOOT_ONLY:
            refuse(key, f"{rule.why}; {_data_kind(after)} changed")
            continue
        if not _carriable(after):
            refuse(key, f"data changed: {_data_kind(after)} {_value_change(before, after)}")
            continue
        blockers = []
        for user in sorted(users.get(key, ())):
            if user in patched.data and user not in new_keys and user not in carried and user != key:
                if _carriable(patched.data[user]):
                    carried.setdefault(user, f"{_data_kind(patched.data[user])} points to changed {after.symbol}")
                    work.append(user)
                else:
                    blockers.append(patched.data[user].symbol)
        if blockers:
            refuse(key, f"data changed: {_data_kind(after)} {_value_change(before, after)}, and data that "
                        f"cannot change uses it: {', '.join(blockers)}")
            continue
        carried.setdefault(key, f"{_data_kind(after)} {_value_change(before, after)}; carried with its users")
    for key in sorted(carried):
        if key in refused_keys:
            continue
        result.new_data.append(Change("new", patched.data[key].symbol, carried[key]))
        for user in sorted(users.get(key, ())):
            if user in original.functions and user in patched.functions and user not in changed:
                changed[user] = f"uses changed {_data_kind(patched.data[key])}"
    result.new_data.sort(key=lambda c: c.name)
    return (set(carried) - refused_keys) | new_keys


def _users(info: ObjectInfo) -> dict[str, set[str]]:
    """Data key or function (by unit) -> the functions (by unit) and data objects that reference it."""
    users: dict[str, set[str]] = {}

    def add(target: str, user: str) -> None:
        if target in info.functions:
            target = info.unit_of(target)
        elif target not in info.data:
            return
        if target != user:
            users.setdefault(target, set()).add(user)

    for fn in info.functions.values():
        for r in fn.relocs:
            add(r.symbol, info.unit_of(fn.name))
    for item in info.data.values():
        for r in item.relocs:
            add(r.symbol, item.name)
    return users


def _merge(a: dict[str, set[str]], b: dict[str, set[str]]) -> dict[str, set[str]]:
    return {k: a.get(k, set()) | b.get(k, set()) for k in a.keys() | b.keys()}


def _value_change(before: DataItem, after: DataItem) -> str:
    if before.size != after.size:
        return f"changes size from {before.size} to {after.size} bytes"
    return "has a different initial value"


def _diff_tables(original: ObjectInfo, patched: ObjectInfo, result: DiffResult, carried: set[str],
                 refused: dict[str, str]) -> None:
    """Entries of per-function tables travel with changed/new functions; a difference in the entries
    of a function the update does not replace cannot be applied in place, so it refuses."""
    for section in sorted(original.tables.keys() | patched.tables.keys()):
        before = _group(original.tables.get(section, ()))
        after = _group(patched.tables.get(section, ()))
        for owner in sorted(before.keys() | after.keys(), key=lambda o: (o is None, o or "")):
            if owner in carried:
                if after.get(owner):
                    result.special.append(SpecialUse(section, owner, len(after[owner])))
            elif owner is None:
                if before.get(None) != after.get(None):
                    refused[section] = f"{section} entries that point into no known function changed"
            elif owner in refused or owner not in patched.functions:
                continue
            elif before.get(owner) != after.get(owner):
                refused[owner] = f"{section} entries of {owner} changed although its code did not"


def _group(entries: Iterable[TableEntry]) -> dict[str | None, tuple[TableEntry, ...]]:
    groups: dict[str | None, list[TableEntry]] = {}
    for entry in entries:
        groups.setdefault(entry.function, []).append(entry)
    return {k: tuple(v) for k, v in groups.items()}


def _diff_opaque(original: ObjectInfo, patched: ObjectInfo, refused: dict[str, str]) -> None:
    for section in sorted(original.opaque.keys() | patched.opaque.keys()):
        if original.opaque.get(section) != patched.opaque.get(section):
            rule = section_rule(section) or DEFAULT_RULE
            refused[section] = f"special section {section} changed ({rule.why}); dynamos does not handle it yet"
