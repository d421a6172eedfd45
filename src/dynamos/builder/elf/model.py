"""A small rewriter for ELF64 little-endian relocatable objects (kernel modules).

pyelftools reads; this writes. It keeps every section as (header, bytes), lets callers edit
symbols, relocations and names, add sections at the end (so existing indices never change),
and lays the file out again: ELF header, section contents in index order, section headers.
That is all a livepatch module needs; executables and program headers are out of scope.

It is also the one reader of compiled objects: the object diff, extraction and the fidelity check
build their own views (normalised items, fields to compare) on top of it, never on ELF bytes.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field

from elftools.elf.elffile import ELFFile

from dynamos.errors import BuildError

SHT_NULL, SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_RELA, SHT_NOBITS, SHT_REL = 0, 1, 2, 3, 4, 8, 9
SHT_GROUP, SHT_SYMTAB_SHNDX = 17, 18
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR, SHF_MERGE, SHF_STRINGS, SHF_INFO_LINK = 0x1, 0x2, 0x4, 0x10, 0x20, 0x40
SHN_UNDEF, SHN_LORESERVE, SHN_ABS, SHN_COMMON, SHN_XINDEX = 0, 0xFF00, 0xFFF1, 0xFFF2, 0xFFFF
STT_NOTYPE, STT_OBJECT, STT_FUNC, STT_SECTION, STT_FILE, STT_TLS = 0, 1, 2, 3, 4, 6
STB_LOCAL, STB_GLOBAL, STB_WEAK = 0, 1, 2

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
SHDR = struct.Struct("<IIQQQQIIQQ")
SYM = struct.Struct("<IBBHQQ")
RELA = struct.Struct("<QQq")
REL = struct.Struct("<QQ")


@dataclass
class Section:
    name: str
    type: int
    flags: int
    addr: int
    link: int
    info: int
    addralign: int
    entsize: int
    data: bytes  # for SHT_NOBITS: empty; ``nobits_size`` holds the size
    nobits_size: int = 0

    @property
    def size(self) -> int:
        return self.nobits_size if self.type == SHT_NOBITS else len(self.data)


@dataclass
class Symbol:
    name: str
    info: int  # binding << 4 | type
    other: int
    shndx: int
    value: int
    size: int

    @property
    def binding(self) -> int:
        return self.info >> 4

    @property
    def type(self) -> int:
        return self.info & 0xF


@dataclass
class Rela:
    offset: int
    sym: int
    type: int
    addend: int


@dataclass
class RelocatableElf:
    """An ET_REL object as editable sections; ``symbols`` mirrors ``.symtab``."""

    header: tuple  # EHDR fields, rewritten on output
    sections: list[Section] = field(default_factory=list)
    symbols: list[Symbol] = field(default_factory=list)
    symtab_index: int = 0
    shstrndx: int = 0  # e_shstrndx, or section 0's sh_link when there are too many sections for it
    xindex: list[int] = field(default_factory=list)  # .symtab_shndx: section numbers above 0xFEFF

    # ----- reading ----------------------------------------------------------------------
    @classmethod
    def parse(cls, data: bytes, what: str = "object") -> RelocatableElf:
        try:
            elf = ELFFile(io.BytesIO(data))
        except Exception as e:  # pyelftools raises its own exception types
            raise BuildError(f"{what} is not an ELF file: {e}") from e
        if elf.elfclass != 64 or not elf.little_endian or elf["e_type"] != "ET_REL":
            raise BuildError(f"{what}: only little-endian ELF64 relocatable objects are supported")
        header = EHDR.unpack_from(data, 0)
        shoff, shentsize, shnum, shstrndx = header[6], header[11], header[12], header[13]
        headers = []
        if shoff:
            first = SHDR.unpack_from(data, shoff)
            shnum = shnum or first[5]  # extended numbering: the count is section 0's sh_size
            shstrndx = first[6] if shstrndx == SHN_XINDEX else shstrndx  # ... and the index its sh_link
            headers = [SHDR.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
        obj = cls(header=header, shstrndx=shstrndx)
        for _name, shtype, flags, addr, offset, size, link, info, align, entsize in headers:
            obj.sections.append(Section(
                name="", type=shtype, flags=flags, addr=addr, link=link, info=info, addralign=align,
                entsize=entsize, data=b"" if shtype == SHT_NOBITS else data[offset:offset + size],
                nobits_size=size if shtype == SHT_NOBITS else 0,
            ))
        names = obj.sections[shstrndx].data if shstrndx < len(obj.sections) else b""
        for sec, sh in zip(obj.sections, headers, strict=True):
            sec.name = _cstr(names, sh[0])
        symtabs = [i for i, s in enumerate(obj.sections) if s.type == SHT_SYMTAB]
        if len(symtabs) != 1:
            raise BuildError(f"{what}: expected one symbol table, found {len(symtabs)}")
        obj.symtab_index = symtabs[0]
        symtab = obj.sections[obj.symtab_index]
        strtab = obj.sections[symtab.link].data
        for off in range(0, len(symtab.data), SYM.size):
            st_name, info, other, shndx, value, size = SYM.unpack_from(symtab.data, off)
            obj.symbols.append(Symbol(_cstr(strtab, st_name), info, other, shndx, value, size))
        for sec in obj.sections:
            if sec.type == SHT_SYMTAB_SHNDX and sec.link == obj.symtab_index:
                obj.xindex = list(struct.unpack(f"<{len(sec.data) // 4}I", sec.data[:len(sec.data) // 4 * 4]))
        return obj

    @property
    def machine(self) -> int:
        """e_machine: the architecture the code is for."""
        return self.header[2]

    def symbol_section(self, index: int) -> int | None:
        """The section symbol ``index`` is defined in; None when undefined, absolute or common."""
        shndx = self.symbols[index].shndx
        if shndx == SHN_XINDEX:
            return self.xindex[index] if index < len(self.xindex) else None
        return None if shndx in (SHN_UNDEF, SHN_ABS, SHN_COMMON) else shndx

    def relocations(self, index: int) -> list[Rela]:
        """The entries of a SHT_RELA section (or SHT_REL: addend 0)."""
        sec = self.sections[index]
        out = []
        if sec.type == SHT_REL:
            for off in range(0, len(sec.data), REL.size):
                r_offset, r_info = REL.unpack_from(sec.data, off)
                out.append(Rela(r_offset, r_info >> 32, r_info & 0xFFFFFFFF, 0))
            return out
        for off in range(0, len(sec.data), RELA.size):
            r_offset, r_info, r_addend = RELA.unpack_from(sec.data, off)
            out.append(Rela(r_offset, r_info >> 32, r_info & 0xFFFFFFFF, r_addend))
        return out

    def relocations_by_target(self) -> dict[int, list[Rela]]:
        """Section index -> every relocation that applies to it, by offset: what readers compare."""
        out: dict[int, list[Rela]] = {}
        for index, sec in enumerate(self.sections):
            if sec.type in (SHT_RELA, SHT_REL) and sec.info:
                out.setdefault(sec.info, []).extend(self.relocations(index))
        for rows in out.values():
            rows.sort(key=lambda r: r.offset)
        return out

    def set_relocations(self, index: int, relas: list[Rela]) -> None:
        if self.sections[index].type == SHT_REL:
            self.sections[index].data = b"".join(REL.pack(r.offset, (r.sym << 32) | r.type) for r in relas)
            return
        self.sections[index].data = b"".join(
            RELA.pack(r.offset, (r.sym << 32) | r.type, r.addend) for r in relas)

    def section_index(self, name: str) -> int | None:
        for i, s in enumerate(self.sections):
            if s.name == name:
                return i
        return None

    def add_section(self, section: Section) -> int:
        self.sections.append(section)
        return len(self.sections) - 1

    # ----- writing ----------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Serialise: string tables rebuilt from names, contents laid out in index order."""
        symtab = self.sections[self.symtab_index]
        strtab = _StringTable()
        symtab.data = b"".join(
            SYM.pack(strtab.add(s.name) if s.name else 0, s.info, s.other, s.shndx, s.value, s.size)
            for s in self.symbols)
        self.sections[symtab.link].data = strtab.data()
        shstr = _StringTable()
        name_offsets = [shstr.add(s.name) if s.name else 0 for s in self.sections]
        self.sections[self.shstrndx].data = shstr.data()

        out = bytearray(EHDR.size)
        offsets = []
        for s in self.sections:
            if s.type in (SHT_NULL, SHT_NOBITS):
                offsets.append(0 if s.type == SHT_NULL else len(out))
                continue
            align = max(s.addralign, 1)
            out += b"\0" * (-len(out) % align)
            offsets.append(len(out))
            out += s.data
        out += b"\0" * (-len(out) % 8)
        shoff = len(out)
        for s, name_off, off in zip(self.sections, name_offsets, offsets, strict=True):
            out += SHDR.pack(name_off, s.type, s.flags, s.addr, off, s.size, s.link, s.info, s.addralign,
                             s.entsize)
        h = list(self.header)
        h[6] = shoff  # e_shoff
        h[5] = 0  # e_phoff: relocatable objects have no program headers
        h[12] = len(self.sections)  # e_shnum
        EHDR.pack_into(out, 0, *h)
        return bytes(out)


class _StringTable:
    """An ELF string table: NUL first, each distinct string once."""

    def __init__(self) -> None:
        self.buf = bytearray(b"\0")
        self.seen: dict[str, int] = {}

    def add(self, text: str) -> int:
        if text not in self.seen:
            self.seen[text] = len(self.buf)
            self.buf += text.encode() + b"\0"
        return self.seen[text]

    def data(self) -> bytes:
        return bytes(self.buf)


def _cstr(table: bytes, offset: int) -> str:
    end = table.find(b"\0", offset)
    return table[offset:end if end >= 0 else len(table)].decode("utf-8", errors="replace")
