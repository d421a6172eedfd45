"""Type layouts from a compiled object's DWARF, and whether a header change alters one.

A header change is safe to carry only if the running kernel's data keeps its shape: every struct,
union and enum the original and the patched unit both have must keep its size, its members'
offsets, sizes and types, and its enumerators' values. That is decided here from what the
compiler emitted for both units (``-g`` is in the kernel's own flags), not from the source text,
so a macro that sizes a member is seen and a comment inside a struct is not a change.

Speed: a kernel unit's ``.debug_info`` holds a few thousand top-level entries and tens of
thousands of relocations. Only the sections types need are relocated (names live in
``.debug_str``), only the compile unit's top-level entries are read (subprograms are skipped by
their sibling links), and members are read only for types declared in the patched headers; the
other named types of the unit are compared by size alone.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from elftools.dwarf.compileunit import CompileUnit
from elftools.dwarf.die import DIE
from elftools.dwarf.dwarfinfo import DebugSectionDescriptor, DwarfConfig, DWARFInfo

from dynamos.builder.elf.model import SHT_NOBITS, SHT_REL, SHT_RELA, RelocatableElf
from dynamos.builder.elf.x86_64 import RELOC_KINDS
from dynamos.builder.refusals import CHANGED_LAYOUT
from dynamos.errors import BuildError

_SHF_COMPRESSED = 0x800
_CHDR = struct.Struct("<IIQQ")  # Elf64_Chdr: type, reserved, size, addralign
_ELFCOMPRESS_ZLIB = 1
# What type layouts need: entries, their abbreviations, names, and the file table (decl_file).
_SECTIONS = (".debug_info", ".debug_abbrev", ".debug_str", ".debug_line", ".debug_line_str",
             ".debug_str_offsets")
_AGGREGATES = {"DW_TAG_structure_type": "struct", "DW_TAG_union_type": "union", "DW_TAG_enumeration_type": "enum"}
_QUALIFIERS = {"DW_TAG_const_type": "const", "DW_TAG_volatile_type": "volatile", "DW_TAG_restrict_type": "restrict",
               "DW_TAG_atomic_type": "_Atomic"}


@dataclass(frozen=True)
class Member:
    """One member of a struct or union: where it is and what it holds."""

    name: str
    offset: int  # bytes from the start of the outermost type
    type: str  # the member type's name as C spells it (``struct list_head``, ``unsigned int *``)
    size: int | None  # the member type's size in bytes (None: void, function, incomplete)
    bit: int | None = None  # bit-fields: bit position from the start of the outermost type
    bits: int | None = None  # bit-fields: width

    def where(self) -> str:
        return f"bit {self.bit} width {self.bits}" if self.bits is not None else f"offset {self.offset}"


@dataclass(frozen=True)
class TypeLayout:
    """A struct, union or enum as one compiled unit lays it out."""

    kind: str  # struct, union, enum
    name: str  # how a message names it: ``struct foo``, or a typedef's name for an anonymous type
    file: str  # where it is declared, relative to the compile directory
    size: int | None
    members: dict[str, Member] = field(default_factory=dict)  # by name (anonymous members flattened)
    enumerators: dict[str, int] = field(default_factory=dict)


@dataclass
class UnitTypes:
    """The layouts of one object's types: in full for the asked files, by size for the rest."""

    layouts: dict[str, TypeLayout]  # declared in the asked files, by name
    sizes: dict[str, tuple[int, str]]  # every other named type's size and declaring file
    prototypes: dict[str, str] = field(default_factory=dict)  # global function defined -> C prototype


def read_types(data: bytes, files: Iterable[str], what: str = "object", prototypes: bool = False) -> UnitTypes:
    """Read the types of the compiled relocatable object ``data``; ``files`` are the source files
    (relative to the tree the object was compiled in) whose types are read in full; with
    ``prototypes``, also the prototype of every global function it defines (slower: their entries
    are read)."""
    wanted = {os.path.normpath(f) for f in files}
    dwarf = _dwarf_info(data, what)
    layouts: dict[str, TypeLayout] = {}
    sizes: dict[str, tuple[int, str]] = {}
    functions: dict[str, str] = {}
    for cu in dwarf.iter_CUs():
        top = cu.get_top_DIE()
        file_names = _file_names(dwarf, cu, top)
        reader = _Reader(cu)
        for die in top.iter_children():
            if prototypes and die.tag == "DW_TAG_subprogram" and "DW_AT_external" in die.attributes \
                    and "DW_AT_declaration" not in die.attributes and "DW_AT_name" in die.attributes:
                functions[die.attributes["DW_AT_name"].value.decode(errors="replace")] = reader.describe(die)[0]
                continue
            kind = _AGGREGATES.get(die.tag)
            if kind is None and die.tag != "DW_TAG_typedef":
                continue
            attrs = die.attributes
            if "DW_AT_declaration" in attrs:
                continue
            decl = attrs.get("DW_AT_decl_file")
            file = file_names.get(decl.value, "") if decl is not None else ""
            name_attr = attrs.get("DW_AT_name")
            name = name_attr.value.decode(errors="replace") if name_attr is not None else ""
            if kind is None:  # a typedef: names an anonymous struct, union or enum declared with it
                if file not in wanted or "DW_AT_type" not in attrs:
                    continue
                target = die.get_DIE_from_attribute("DW_AT_type")
                kind = _AGGREGATES.get(target.tag)
                if kind is None or "DW_AT_name" in target.attributes or "DW_AT_declaration" in target.attributes:
                    continue
                die, key = target, name
            elif not name:
                continue  # anonymous: reached through its typedef, or a bare ``enum { ... }`` of constants
            else:
                key = f"{kind} {name}"
            if file in wanted:
                if key not in layouts:
                    layouts[key] = reader.layout(die, kind, key, file)
            elif "DW_AT_byte_size" in attrs and key not in sizes:
                sizes[key] = (attrs["DW_AT_byte_size"].value, file)
    return UnitTypes(layouts, sizes, functions)


def layout_changes(before: TypeLayout, after: TypeLayout) -> list[str]:
    """What differs between two layouts of one type, the members added, removed or retyped before
    those that only moved; [] when the running data keeps its shape (an enumerator added, the
    others' values kept, is no change)."""
    out: list[str] = []
    moved: list[str] = []
    if before.kind == "enum":
        for name, value in before.enumerators.items():
            if name not in after.enumerators:
                out.append(f"enumerator {name} removed")
            elif after.enumerators[name] != value:
                out.append(f"enumerator {name} changes value from {value} to {after.enumerators[name]}")
    else:
        out += [f"member {name} added at {n.where()}" for name, n in after.members.items()
                if name not in before.members]
        for name, m in before.members.items():
            n = after.members.get(name)
            if n is None:
                out.append(f"member {name} removed")
                continue
            if m.type != n.type:
                out.append(f"member {name} changes type from {m.type} to {n.type}")
            elif m.size != n.size:
                out.append(f"member {name} ({m.type}) changes size from {m.size} to {n.size}")
            if (m.offset, m.bit) != (n.offset, n.bit):
                to = str(n.offset) if m.bits is None and n.bits is None else n.where()
                moved.append(f"member {name} moved from {m.where()} to {to}")
            elif m.bits != n.bits:
                out.append(f"member {name} changes width from {_width(m)} to {_width(n)}")
    out += moved
    if before.size != after.size:
        out.append(f"size {before.size} -> {after.size}")
    return out


def _shorten(changes: list[str], most: int = 6) -> list[str]:
    """At most ``most`` changes of one type, the size change kept last."""
    if len(changes) <= most:
        return changes
    size = [c for c in changes if c.startswith("size ")]
    rest = [c for c in changes if not c.startswith("size ")]
    keep = most - 1 - len(size)
    return [*rest[:keep], f"{len(rest) - keep} more member changes", *size]


@dataclass(frozen=True)
class LayoutCheck:
    """The types of one unit's patched headers, compared between its original and patched object."""

    headers: list[str]
    compared: int  # types declared in the headers that both objects have, compared member by member
    sized: int  # the unit's other named types both objects have, compared by size
    changes: list[str]  # one message per changed type: ``<header>: struct foo changes layout: ...``

    def summary(self) -> str:
        """What was compared and found, for ``--explain``."""
        found = f"{len(self.changes)} changed" if self.changes else "no layout change"
        return (f"types of {', '.join(self.headers)}: {self.compared} compared member by member, "
                f"{self.sized} other types by size: {found}")


def compare_header_types(original: bytes, patched: bytes, headers: Iterable[str], what: str = "unit",
                         prototypes: bool = False) -> LayoutCheck:
    """Compare the types of ``headers`` in the original and the patched object of one unit.

    Types only the patched object has are new (fine); types only the original has are no longer
    used by the unit (fine). Any other named type of the unit whose size changed is a change too:
    a macro or a type of a patched header can size a type declared elsewhere. With ``prototypes``,
    a global function of the unit whose prototype changes is a change: for a unit compiled with a
    header its other includers do not get, their calls would pass the old arguments."""
    names = sorted({os.path.normpath(h) for h in headers})
    old = read_types(original, names, f"{what} (original)", prototypes)
    new = read_types(patched, names, f"{what} (patched)", prototypes)
    out: list[str] = [f"function {name} changes prototype from {before} to {new.prototypes[name]}: the "
                      f"kernel's callers in other units would call it with the old arguments"
                      for name, before in old.prototypes.items()
                      if name in new.prototypes and new.prototypes[name] != before]
    compared = sized = 0
    for key, before in old.layouts.items():
        after = new.layouts.get(key)
        if after is None:
            continue
        compared += 1
        changes = layout_changes(before, after)
        if before.kind != after.kind:
            changes = [f"a {before.kind} becomes a {after.kind}"]
        if changes:
            out.append(f"{after.file}: {key} changes layout: {'; '.join(_shorten(changes))}")
    for key, (size, file) in old.sizes.items():
        now = new.sizes[key][0] if key in new.sizes else new.layouts[key].size if key in new.layouts else None
        if now is None:
            continue
        sized += 1
        if now != size:
            out.append(f"{file or '(unknown file)'}: {key} changes layout: size {size} -> {now} "
                       f"(sized by what the patch changed in {', '.join(names)})")
    return LayoutCheck(names, compared, sized, out)


def refuse_layout_changes(original: bytes, patched: bytes, files: Iterable[str], unit: str,
                          say: Callable[[str], None], prototypes: bool = False) -> str:
    """For a unit compiled with patched ``files``: raise a BuildError (code ``changed-layout``)
    naming each type the patched headers among them change; else what was compared, for
    ``--explain`` ("" when no header is patched)."""
    headers = sorted(f for f in files if f.endswith(".h"))
    if not headers:
        return ""
    say(f"{unit}: comparing the types of {', '.join(headers)} in the original and patched objects")
    check = compare_header_types(original, patched, headers, unit, prototypes)
    if check.changes:
        raise BuildError("\n".join(check.changes), code=CHANGED_LAYOUT)
    return check.summary()


def _width(m: Member) -> str:
    return f"{m.bits} bits" if m.bits is not None else f"{m.size} bytes"


# --------------------------------------------------------------------------------------------------
# DWARF reading


class _Reader:
    """Names, sizes and members of the type entries of one compile unit (memoised by offset)."""

    def __init__(self, cu: CompileUnit):
        self.cu = cu
        self.described: dict[int, tuple[str, int | None]] = {}

    def layout(self, die: DIE, kind: str, key: str, file: str) -> TypeLayout:
        size = die.attributes["DW_AT_byte_size"].value if "DW_AT_byte_size" in die.attributes else None
        if kind == "enum":
            values = {c.attributes["DW_AT_name"].value.decode(errors="replace"): c.attributes["DW_AT_const_value"].value
                      for c in die.iter_children()
                      if c.tag == "DW_TAG_enumerator" and "DW_AT_const_value" in c.attributes}
            return TypeLayout(kind, key, file, size, enumerators=values)
        members: dict[str, Member] = {}
        self._members(die, 0, "", members, [0])
        return TypeLayout(kind, key, file, size, members=members)

    def _members(self, die: DIE, base: int, prefix: str, out: dict[str, Member], anonymous: list[int]) -> None:
        """Members of ``die`` into ``out``, at ``base`` bytes; the fields of an anonymous struct or
        union member are flattened in (C names them as the outer type's own), numbered anonymous
        members keep their own place and size."""
        for m in die.iter_children():
            if m.tag != "DW_TAG_member":
                continue
            attrs = m.attributes
            type_die = m.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in attrs else None
            type_name, type_size = self.describe(type_die)
            offset, bit, bits = _member_position(m, type_size)
            offset += base
            if bit is not None:
                bit += base * 8
            if "DW_AT_name" in attrs:
                name = prefix + attrs["DW_AT_name"].value.decode(errors="replace")
            else:
                anonymous[0] += 1
                name = f"{prefix}<anonymous {type_name.split(' ')[0]} #{anonymous[0]}>"
            out[name] = Member(name, offset, type_name, type_size, bit, bits)
            if (type_die is not None and type_die.tag in ("DW_TAG_structure_type", "DW_TAG_union_type")
                    and "DW_AT_name" not in type_die.attributes):
                inner = prefix if "DW_AT_name" not in attrs else name + "."
                self._members(type_die, offset, inner, out, anonymous)

    def describe(self, die: DIE | None, depth: int = 0) -> tuple[str, int | None]:
        """(C spelling, size in bytes) of a type entry; aggregates by name only."""
        if die is None:
            return "void", None
        if die.offset in self.described:
            return self.described[die.offset]
        attrs = die.attributes
        name = attrs["DW_AT_name"].value.decode(errors="replace") if "DW_AT_name" in attrs else ""
        size = attrs["DW_AT_byte_size"].value if "DW_AT_byte_size" in attrs else None
        inner = die.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in attrs and depth < 32 else None
        if die.tag in _AGGREGATES:
            text = f"{_AGGREGATES[die.tag]} {name or '<anonymous>'}"
        elif die.tag == "DW_TAG_base_type":
            text = name
        elif die.tag == "DW_TAG_pointer_type":
            text = self.describe(inner, depth + 1)[0] + " *"
        elif die.tag in _QUALIFIERS:
            text, size = self.describe(inner, depth + 1)
            text = f"{_QUALIFIERS[die.tag]} {text}"
        elif die.tag == "DW_TAG_typedef":
            text, size = name, self.describe(inner, depth + 1)[1]
        elif die.tag == "DW_TAG_array_type":
            element, element_size = self.describe(inner, depth + 1)
            dims = [_count(sub) for sub in die.iter_children() if sub.tag == "DW_TAG_subrange_type"]
            text = element + "".join(f"[{'' if n is None else n}]" for n in dims)
            if size is None and element_size is not None and all(n is not None for n in dims):
                size = element_size
                for n in dims:
                    size *= n or 0
        elif die.tag in ("DW_TAG_subroutine_type", "DW_TAG_subprogram"):
            # The prototype, so a callback member whose parameters change is a changed type: the
            # running kernel's callers would call the new code with the old arguments.
            params = []
            for p in die.iter_children():
                if p.tag == "DW_TAG_formal_parameter":
                    params.append(self.describe(p.get_DIE_from_attribute("DW_AT_type"), depth + 1)[0]
                                  if "DW_AT_type" in p.attributes else "?")
                elif p.tag == "DW_TAG_unspecified_parameters":
                    params.append("...")
            text = f"{self.describe(inner, depth + 1)[0]} ({', '.join(params) or 'void'})"
        else:
            text = name or die.tag.removeprefix("DW_TAG_")
        self.described[die.offset] = (text, size)
        return text, size


def _count(subrange: DIE) -> int | None:
    attrs = subrange.attributes
    if "DW_AT_count" in attrs and isinstance(attrs["DW_AT_count"].value, int):
        return attrs["DW_AT_count"].value
    if "DW_AT_upper_bound" in attrs and isinstance(attrs["DW_AT_upper_bound"].value, int):
        return attrs["DW_AT_upper_bound"].value + 1
    return None  # a flexible array member


def _member_position(m: DIE, type_size: int | None) -> tuple[int, int | None, int | None]:
    """(byte offset, bit position, bit width) of a member; the bit fields only for bit-fields.
    DWARF 5 gives a bit-field's position from the start (DW_AT_data_bit_offset); DWARF 4 gives
    the storage unit's offset and the field's place in it counted from its most significant bit."""
    attrs = m.attributes
    bits = attrs["DW_AT_bit_size"].value if "DW_AT_bit_size" in attrs else None
    offset = 0
    if "DW_AT_data_member_location" in attrs:
        loc = attrs["DW_AT_data_member_location"].value
        if isinstance(loc, int):
            offset = loc
        elif isinstance(loc, list) and len(loc) >= 2 and loc[0] == 0x23:  # DW_OP_plus_uconst, ULEB128
            offset = _uleb128(bytes(loc[1:]))
    if bits is None:
        return offset, None, None
    if "DW_AT_data_bit_offset" in attrs:
        bit = attrs["DW_AT_data_bit_offset"].value
    elif "DW_AT_bit_offset" in attrs:  # little-endian: count from the storage unit's low bit
        unit = attrs["DW_AT_byte_size"].value if "DW_AT_byte_size" in attrs else (type_size or 0)
        bit = offset * 8 + unit * 8 - attrs["DW_AT_bit_offset"].value - bits
    else:
        bit = offset * 8
    return bit // 8, bit, bits


def _uleb128(data: bytes) -> int:
    value = shift = 0
    for byte in data:
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return value


def _file_names(dwarf: DWARFInfo, cu: CompileUnit, top: DIE) -> dict[int, str]:
    """DW_AT_decl_file index -> path relative to the compile directory (absolute outside it)."""
    program = dwarf.line_program_for_CU(cu)
    if program is None:
        return {}
    comp_dir = top.attributes["DW_AT_comp_dir"].value.decode(errors="replace") if "DW_AT_comp_dir" in top.attributes \
        else ""
    v5 = program.header.version >= 5
    dirs = [d.decode(errors="replace") if isinstance(d, bytes) else str(d) for d in program["include_directory"]]
    if not v5:
        dirs = [comp_dir, *dirs]  # DWARF 4: directory 0 is the compile directory, the list starts at 1
    out: dict[int, str] = {}
    for index, entry in enumerate(program["file_entry"], 0 if v5 else 1):
        name = entry.name.decode(errors="replace") if isinstance(entry.name, bytes) else str(entry.name)
        directory = dirs[entry.dir_index] if entry.dir_index < len(dirs) else ""
        path = os.path.normpath(os.path.join(comp_dir, directory, name))
        if comp_dir and path.startswith(comp_dir.rstrip("/") + "/"):
            path = path[len(comp_dir.rstrip("/")) + 1:]
        out[index] = path
    return out


def _dwarf_info(data: bytes, what: str) -> DWARFInfo:
    """A DWARFInfo over the sections type layouts need, relocated here (pyelftools would relocate
    every debug section, seconds for a kernel unit)."""
    obj = RelocatableElf.parse(data, what)
    relocations = {s.info: i for i, s in enumerate(obj.sections) if s.type in (SHT_RELA, SHT_REL)}
    found: dict[str, DebugSectionDescriptor] = {}
    for index, sec in enumerate(obj.sections):
        if sec.name not in _SECTIONS or sec.type == SHT_NOBITS:
            continue
        content = bytearray(_contents(sec.data, sec.flags, what, sec.name))
        if index in relocations:
            _relocate(obj, relocations[index], content, what, sec.name)
        found[sec.name] = DebugSectionDescriptor(io.BytesIO(bytes(content)), sec.name, 0, len(content), 0)
    if ".debug_info" not in found or ".debug_abbrev" not in found:
        raise BuildError(f"{what} has no DWARF type information (.debug_info): it was compiled without -g, "
                         f"so whether the patch changes a type's layout cannot be told")
    return DWARFInfo(
        config=DwarfConfig(little_endian=True, default_address_size=8, machine_arch="x64"),
        debug_info_sec=found[".debug_info"], debug_aranges_sec=None, debug_abbrev_sec=found[".debug_abbrev"],
        debug_frame_sec=None, eh_frame_sec=None, debug_str_sec=found.get(".debug_str"), debug_loc_sec=None,
        debug_ranges_sec=None, debug_line_sec=found.get(".debug_line"), debug_pubtypes_sec=None,
        debug_pubnames_sec=None, debug_addr_sec=None, debug_str_offsets_sec=found.get(".debug_str_offsets"),
        debug_line_str_sec=found.get(".debug_line_str"), debug_loclists_sec=None, debug_rnglists_sec=None,
        debug_sup_sec=None, gnu_debugaltlink_sec=None, debug_types_sec=None)


def _contents(data: bytes, flags: int, what: str, name: str) -> bytes:
    if not flags & _SHF_COMPRESSED:
        return data
    kind, _reserved, size, _align = _CHDR.unpack_from(data, 0)
    if kind != _ELFCOMPRESS_ZLIB:
        raise BuildError(f"{what}: {name} is compressed with ELF compression type {kind}; only zlib is read")
    out = zlib.decompress(data[_CHDR.size:])
    if len(out) != size:
        raise BuildError(f"{what}: {name} decompresses to {len(out)} bytes, its header says {size}")
    return out


def _relocate(obj: RelocatableElf, index: int, content: bytearray, what: str, name: str) -> None:
    """Apply a debug section's absolute relocations (string and section offsets, addresses)."""
    sec = obj.sections[index]
    symbols = obj.symbols
    if sec.type == SHT_REL:
        raise BuildError(f"{what}: {name} has REL relocations; x86-64 objects use RELA")
    for r_offset, r_info, r_addend in struct.iter_unpack("<QQq", sec.data):
        kind = RELOC_KINDS.get(r_info & 0xFFFFFFFF)
        if kind is None or kind.width == 0:
            continue
        content[r_offset:r_offset + kind.width] = kind.field(symbols[r_info >> 32].value, r_addend, r_offset)
