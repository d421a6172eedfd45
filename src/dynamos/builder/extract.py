"""Cut the changed functions out of a compiled translation unit into an object a livepatch
module can link: the core of the source-diff builder.

Input: the patched object (compiled with -ffunction-sections -fdata-sections) and the names of
the functions to keep (changed or new) and of new data. Output: an object holding only those
functions, the string literals they use, the new data, and the entries of the kernel's special
tables (ORC unwind data, mcount sites, bug table, ...) that belong to them. Everything else
the kept code references — the kernel's own copies of the file's static functions and data,
unexported globals — becomes a livepatch symbol resolved in the running kernel at load time,
so the new code works on the kernel's state, not on copies of it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from dynamos.abi import VMLINUX, edition_name, edition_prefix
from dynamos.builder.elf import (
    MAX_PC_BIAS,
    REL32_SIZE,
    RELOC_KINDS,
    SECTION_RULES,
    SHF_ALLOC,
    SHF_EXECINSTR,
    SHF_WRITE,
    SHN_LORESERVE,
    SHN_UNDEF,
    SHT_NOBITS,
    SHT_PROGBITS,
    SHT_RELA,
    STB_GLOBAL,
    STB_LOCAL,
    STT_FUNC,
    STT_OBJECT,
    STT_SECTION,
    Carry,
    Rela,
    RelocatableElf,
    Section,
    SectionRule,
    section_rule,
)
from dynamos.builder.klp import SHN_LIVEPATCH, KlpSymbol
from dynamos.builder.modkeys import DESCRIPTORS, KeySite, carry_module_keys, own_descriptors
from dynamos.builder.statics import carried_constant_sections
from dynamos.errors import BuildError

# String literals (".rodata.str1.1", or per function ".rodata.<func>.str1.1" with -fdata-sections)
# and mergeable constants carry no state: the update may carry its own copy. Which special sections
# travel, and how, is the carry column of the one special-section table (elf/sections.py).
CONSTANTS = re.compile(r"^\.rodata(\.[^.]+)*\.(str|cst)\d")


@dataclass
class Extraction:
    """The cut-out object and what the module generator needs to know about it.

    Symbols to be resolved by livepatch appear in the object as plain undefined globals with
    placeholder names (``klp_placeholders``), so the module links with the ordinary toolchain;
    ``convert_to_klp`` turns them into livepatch symbols in the linked module.
    """

    object: bytes
    editions: dict[str, str]  # kernel function -> edition symbol in the object
    klp_placeholders: dict[str, KlpSymbol] = field(default_factory=dict)
    dropped_sections: list[str] = field(default_factory=list)
    key_sites: list[KeySite] = field(default_factory=list)  # module keys' table entries rewritten away


Resolver = Callable[[str, bool], KlpSymbol | str | None]  # str: a name the update itself defines
"""(symbol name, is a file-local symbol) -> where the kernel has it, or None: exported, the
module loader links it normally."""


def extract_functions(patched: bytes, functions: set[str], new_data: set[str], resolve: Resolver,
                      edition_prefix: str = edition_prefix(0)) -> Extraction:
    """Cut ``functions`` (and ``new_data``) out of ``patched``; see the module docstring."""
    obj = RelocatableElf.parse(patched, "patched object")
    rules = [section_rule(s.name) for s in obj.sections]  # each section's row, looked up once
    keep = _kept_sections(obj, functions, new_data, rules)
    relas_of = {s.info: i for i, s in enumerate(obj.sections) if s.type == SHT_RELA and s.link == obj.symtab_index}
    short_sites = own_descriptors(obj, relas_of, keep, resolve)
    if short_sites:
        keep.add(obj.section_index(DESCRIPTORS))
    for idx, rule in enumerate(rules):
        if rule is not None and rule.carry is Carry.REFUSE and idx in relas_of \
                and _table_mentions(obj, relas_of[idx], keep):
            raise BuildError(f"section {obj.sections[idx].name} has entries in the changed code: {rule.carry_why}")
    tables = {i for i, rule in enumerate(rules) if rule is not None and rule.carry in (Carry.ENTRIES, Carry.PARALLEL)}
    keep -= _prune_pieces(obj, relas_of, keep, rules)
    _filter_tables(obj, relas_of, keep, rules)

    klp: dict[str, KlpSymbol] = {}  # placeholder name -> kernel symbol
    named_at = _named_symbol_lookup(obj)
    converted: set[int] = set()
    for target in sorted(keep | tables):
        ri = relas_of.get(target)
        if ri is None:
            continue
        relas = obj.relocations(ri)
        for r in relas:
            sym = obj.symbols[r.sym]
            if sym.shndx == SHN_UNDEF and sym.name and r.sym not in converted:
                # Defined in another file: exported (the loader links it), else which object has it.
                _make_external(obj, r.sym, resolve, klp)
                converted.add(r.sym)
                continue
            if _is_kept(obj, r.sym, keep):
                continue
            if sym.type == STT_SECTION:
                found = named_at(sym.shndx, r.addend)
                if found is None:
                    raise BuildError(f"{obj.sections[target].name}: reference into "
                                     f"{obj.sections[sym.shndx].name}+{r.addend} matches no symbol")
                r.sym, r.addend = found
            if r.sym not in converted:
                _make_external(obj, r.sym, resolve, klp)
                converted.add(r.sym)
        obj.set_relocations(ri, relas)

    key_sites = short_sites + carry_module_keys(obj, relas_of, klp)
    _check_links_at_load(obj, relas_of, klp)

    dropped = []
    strtab, shstrtab = obj.sections[obj.symtab_index].link, obj.shstrndx
    for i, sec in enumerate(obj.sections):
        if i in keep or i in tables or i in (0, obj.symtab_index, strtab, shstrtab):
            continue
        if sec.type == SHT_RELA and (sec.info in keep or sec.info in tables):
            continue
        if sec.type != SHT_RELA:
            dropped.append(sec.name)
        _empty(sec)

    referenced = {r.sym for i, sec in enumerate(obj.sections) if sec.type == SHT_RELA
                  for r in obj.relocations(i)}
    still_used = {obj.symbols[i].name for i in referenced}
    editions = {}
    for i, sym in enumerate(obj.symbols):
        if sym.shndx == SHN_UNDEF and sym.name and i not in referenced:
            # Used only by code left behind: nothing for the loader or livepatch to look up.
            if sym.name not in still_used:
                klp.pop(sym.name, None)
            sym.name, sym.value, sym.size, sym.info = "", 0, 0, STB_LOCAL << 4
            continue
        if i in converted or _is_special_index(sym.shndx):
            continue
        if sym.shndx not in keep:
            # Defined in a dropped section and never referenced by kept code: a null symbol, so
            # the module loader has nothing to look up.
            sym.name, sym.shndx, sym.value, sym.size, sym.info = "", SHN_UNDEF, 0, 0, STB_LOCAL << 4
        elif sym.type == STT_FUNC and sym.name in functions:
            editions[sym.name] = edition_name(edition_prefix, sym.name)
            sym.name = editions[sym.name]
            sym.info = (STB_GLOBAL << 4) | STT_FUNC
    _locals_first(obj)
    return Extraction(obj.to_bytes(), editions, dict(sorted(klp.items())), sorted(dropped), key_sites)


def _check_links_at_load(obj: RelocatableElf, relas_of: dict[int, int], klp: dict[str, KlpSymbol]) -> None:
    """The kernel registers a module's jump labels and static calls, and copies its alternatives'
    replacement code into place, as the module loads. Livepatch writes the relocations to vmlinux
    symbols before that (klp_apply_section_relocs from the loader), so a key or a symbol of vmlinux,
    exported or not, is linked in time; one of a module is resolved only once that module is
    patched, too late for those tables and copies, and is refused."""
    for rule in SECTION_RULES:
        index = obj.section_index(rule.pattern) if rule.key or rule.copied_at_load else None
        if index is None or index not in relas_of:
            continue
        for r in obj.relocations(relas_of[index]):
            used = klp.get(obj.symbols[r.sym].name)
            if used is None or used.object == VMLINUX:
                continue
            if rule.copied_at_load:
                raise BuildError(f"the changed code's {rule.pattern} uses {used.name} of module {used.object}: the "
                                 f"kernel copies that code into the update as it loads, before livepatch resolves "
                                 f"that module's symbols, so it cannot be carried by an update")
            if rule.layout is not None and r.offset % rule.layout.entry_size == rule.layout.key_offset:
                raise BuildError(f"the changed code uses {rule.key} {used.name} of module {used.object}: the kernel "
                                 f"reads a livepatch module's {rule.pattern} before it resolves that module's "
                                 f"symbols, so it cannot be carried by an update")


def _kept_sections(obj: RelocatableElf, functions: set[str], new_data: set[str],
                   rules: list[SectionRule | None]) -> set[int]:
    func_sections = _function_sections(obj)
    missing = functions - set(func_sections)
    if missing:
        raise BuildError(f"patched object has no section for function(s) {', '.join(sorted(missing))} "
                         f"(compiled without -ffunction-sections?)")
    keep: set[int] = set()
    for name in functions:
        keep |= func_sections[name]
    data_sections = {s.name: s.shndx for s in obj.symbols
                     if s.type == STT_OBJECT and not _is_special_index(s.shndx)}
    for name in new_data:
        if name not in data_sections:
            raise BuildError(f"patched object has no section for new variable {name}")
        keep.add(data_sections[name])
    keep |= {i for i, s in enumerate(obj.sections)
             if CONSTANTS.match(s.name) or (rules[i] is not None and rules[i].carry is Carry.PIECES)}
    keep |= carried_constant_sections(obj)  # __func__.N, CSWTCH.N: gcc's numbers differ from the kernel's
    # Read-only data no symbol names (literals gcc placed in plain .rodata) is stateless too.
    named = {s.shndx for s in obj.symbols if s.type in (STT_OBJECT, STT_FUNC) and s.name}
    keep |= {i for i, s in enumerate(obj.sections)
             if s.type == SHT_PROGBITS and s.flags & SHF_ALLOC and not s.flags & (SHF_WRITE | SHF_EXECINSTR)
             and s.name.startswith(".rodata") and i not in named}
    return keep


def _is_special_index(shndx: int) -> bool:
    return shndx in (SHN_UNDEF, SHN_LIVEPATCH) or shndx >= SHN_LORESERVE


def _is_kept(obj: RelocatableElf, sym_index: int, keep: set[int]) -> bool:
    shndx = obj.symbols[sym_index].shndx
    return shndx in keep or _is_special_index(shndx)


def _make_external(obj: RelocatableElf, sym_index: int, resolve: Resolver, klp: dict[str, KlpSymbol]) -> None:
    """Turn a symbol the kept code uses, but the update does not carry, into a reference to the
    kernel's own: a livepatch symbol, or a plain undefined one the module loader links."""
    sym = obj.symbols[sym_index]
    local = sym.binding == STB_LOCAL
    where = resolve(sym.name, local)
    if isinstance(where, str):  # another unit of the update defines it, under that name
        sym.name, sym.shndx, sym.value, sym.size = where, SHN_UNDEF, 0, 0
        return
    if where is None:
        if local:
            raise BuildError(f"file-local symbol {sym.name} must be resolved in the kernel")
        sym.shndx, sym.value, sym.size = SHN_UNDEF, 0, 0
        return
    placeholder = where.placeholder
    klp[placeholder] = where
    sym.name, sym.shndx, sym.value, sym.size = placeholder, SHN_UNDEF, 0, 0
    sym.info = STB_GLOBAL << 4


def _function_sections(obj: RelocatableElf) -> dict[str, set[int]]:
    """Function name -> its sections (the body and a ``.cold`` part, if any)."""
    out: dict[str, set[int]] = {}
    for sym in obj.symbols:
        if sym.type == STT_FUNC and not _is_special_index(sym.shndx):
            out.setdefault(sym.name.split(".cold")[0], set()).add(sym.shndx)
    return out


def _named_symbol_lookup(obj: RelocatableElf) -> Callable[[int, int], tuple[int, int] | None]:
    """(section, addend) of a section-relative reference -> (named symbol, addend for it).

    The assembler writes references to file-local symbols as section + offset; with one
    function or variable per section the symbol is the one covering that offset. PC-relative
    references carry the instruction's bias (-4, -5...) in the addend, hence the slack.
    """
    by_section: dict[int, list[tuple[int, int, int]]] = {}
    for i, sym in enumerate(obj.symbols):
        if sym.type in (STT_FUNC, STT_OBJECT) and not _is_special_index(sym.shndx):
            by_section.setdefault(sym.shndx, []).append((sym.value, sym.size, i))

    def lookup(shndx: int, addend: int) -> tuple[int, int] | None:
        for value, size, index in sorted(by_section.get(shndx, [])):
            if value - MAX_PC_BIAS <= addend <= value + max(size, 1):
                return index, addend - value
        return None

    return lookup


def _table_mentions(obj: RelocatableElf, rela_index: int, keep: set[int]) -> bool:
    return any(obj.symbols[r.sym].shndx in keep for r in obj.relocations(rela_index))


def _filter_tables(obj: RelocatableElf, relas_of: dict[int, int], keep: set[int],
                   rules: list[SectionRule | None]) -> None:
    """Keep only the table entries about kept code (and the parallel ORC entries with them)."""
    kept_entries: dict[str, list[int]] = {}
    for index, (sec, rule) in enumerate(zip(obj.sections, rules, strict=True)):
        if rule is None or rule.carry is not Carry.ENTRIES or rule.layout is None:
            continue
        size, field_off = rule.layout.entry_size, rule.layout.code_offset
        ri = relas_of.get(index)
        relas = obj.relocations(ri) if ri is not None else []
        about_kept = {r.offset // size for r in relas
                      if r.offset % size == field_off and obj.symbols[r.sym].shndx in keep}
        keep_idx = sorted(about_kept)
        kept_entries[sec.name] = keep_idx
        new_pos = {old: new for new, old in enumerate(keep_idx)}
        sec.data = b"".join(sec.data[i * size:(i + 1) * size] for i in keep_idx)
        if ri is not None:
            obj.set_relocations(ri, [Rela(new_pos[r.offset // size] * size + r.offset % size, r.sym, r.type, r.addend)
                                     for r in relas if r.offset // size in new_pos])
    for sec, rule in zip(obj.sections, rules, strict=True):
        if rule is not None and rule.carry is Carry.PARALLEL and rule.driver is not None:
            size = rule.entry_size
            sec.data = b"".join(sec.data[i * size:(i + 1) * size] for i in kept_entries.get(rule.driver, []))


def _prune_pieces(obj: RelocatableElf, relas_of: dict[int, int], keep: set[int],
                  rules: list[SectionRule | None]) -> set[int]:
    """Sections of code outside any function (alternative replacements, static_cpu_has() tests) hold
    the pieces of every function in the file; they travel whole, but only the pieces kept code jumps
    to, or entries about kept code name, run in the update. Drop the relocations of the others, or
    the update would ask the kernel for symbols (and jump back into functions) only left-behind code
    uses. Returns the sections none of whose pieces is used: they are not carried at all.

    A piece an entry names is as long as the entry says; a piece code jumps to reaches up to the
    next piece any code jumps to.
    """
    pieces = {i for i, rule in enumerate(rules) if rule is not None and rule.carry is Carry.PIECES}
    starts: dict[int, set[int]] = {i: {obj.sections[i].size} for i in pieces}
    used: dict[int, list[tuple[int, int]]] = {i: [] for i in pieces}
    jumps: list[tuple[int, int]] = []
    for host, ri in relas_of.items():
        sec, rule = obj.sections[host], rules[host]
        layout = rule.layout if rule is not None else None
        is_code = bool(sec.flags & SHF_EXECINSTR) and host not in pieces
        if not is_code and (layout is None or layout.piece_offset is None or layout.piece_length_offset is None):
            continue
        relas = obj.relocations(ri)
        kept_entries = {r.offset // layout.entry_size for r in relas if r.offset % layout.entry_size ==
                        layout.code_offset and obj.symbols[r.sym].shndx in keep} if layout is not None else set()
        for r in relas:
            sym = obj.symbols[r.sym]
            if sym.shndx not in pieces:
                continue
            kind = RELOC_KINDS.get(r.type)
            start = sym.value + r.addend
            if is_code:
                start += REL32_SIZE if kind is not None and kind.pc_relative else 0
                starts[sym.shndx].add(start)
                if host in keep:
                    jumps.append((sym.shndx, start))
            elif layout is not None and r.offset % layout.entry_size == layout.piece_offset \
                    and r.offset // layout.entry_size in kept_entries:
                length = sec.data[r.offset - layout.piece_offset + layout.piece_length_offset]
                used[sym.shndx].append((start, start + length))
    for index, start in jumps:
        used[index].append((start, min((a for a in starts[index] if a > start), default=start)))
    for index in pieces:
        if index in relas_of:
            ri = relas_of[index]
            obj.set_relocations(ri, [r for r in obj.relocations(ri) if any(a <= r.offset < b for a, b in used[index])])
    return {index for index in pieces if not used[index]}


def _empty(sec: Section) -> None:
    sec.data = b""
    if sec.type == SHT_NOBITS:
        sec.nobits_size = 0


def _locals_first(obj: RelocatableElf) -> None:
    """ELF wants local symbols before global ones (symtab sh_info = first global)."""
    order = sorted(range(len(obj.symbols)), key=lambda i: (i != 0, obj.symbols[i].binding != STB_LOCAL, i))
    remap = {old: new for new, old in enumerate(order)}
    obj.symbols = [obj.symbols[i] for i in order]
    for index, sec in enumerate(obj.sections):
        if sec.type == SHT_RELA and sec.link == obj.symtab_index:
            relas = obj.relocations(index)
            for r in relas:
                r.sym = remap[r.sym]
            obj.set_relocations(index, relas)
    first_global = next((i for i, s in enumerate(obj.symbols) if i and s.binding != STB_LOCAL), len(obj.symbols))
    obj.sections[obj.symtab_index].info = first_global
