"""A small rewriter for ELF64 little-endian relocatable objects (kernel modules).

pyelftools reads; this writes. It keeps every section as (header, bytes), lets callers edit
symbols, relocations and names, add sections at the end (so existing indices never change),
and lays the file out again: ELF header, section contents in index order, section headers.
That is all a livepatch module needs; executables and program headers are out of scope.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field

from elftools.elf.elffile import ELFFile

from dynamos.errors import BuildError

SHT_NULL, SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_RELA, SHT_NOBITS = 0, 1, 2, 3, 4, 8
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 0x1, 0x2, 0x4
SHF_INFO_LINK = 0x40
SHN_UNDEF = 0

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
SHDR = struct.Struct("<IIQQQQIIQQ")
SYM = struct.Struct("<IBBHQQ")
RELA = struct.Struct("<QQq")


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
        obj = cls(header=header)
        for i in range(elf.num_sections()):
            sh = elf.get_section(i).header
            shtype = struct.unpack_from("<I", data, header[6] + i * header[11] + 4)[0]
            start, size = sh["sh_offset"], sh["sh_size"]
            obj.sections.append(Section(
                name=elf.get_section(i).name, type=shtype, flags=sh["sh_flags"], addr=sh["sh_addr"],
                link=sh["sh_link"], info=sh["sh_info"], addralign=sh["sh_addralign"], entsize=sh["sh_entsize"],
                data=b"" if shtype == SHT_NOBITS else data[start:start + size],
                nobits_size=size if shtype == SHT_NOBITS else 0,
            ))
        symtabs = [i for i, s in enumerate(obj.sections) if s.type == SHT_SYMTAB]
        if len(symtabs) != 1:
            raise BuildError(f"{what}: expected one symbol table, found {len(symtabs)}")
        obj.symtab_index = symtabs[0]
        symtab = obj.sections[obj.symtab_index]
        strtab = obj.sections[symtab.link].data
        for off in range(0, len(symtab.data), SYM.size):
            st_name, info, other, shndx, value, size = SYM.unpack_from(symtab.data, off)
            obj.symbols.append(Symbol(_cstr(strtab, st_name), info, other, shndx, value, size))
        return obj

    def relocations(self, index: int) -> list[Rela]:
        sec = self.sections[index]
        out = []
        for off in range(0, len(sec.data), RELA.size):
            r_offset, r_info, r_addend = RELA.unpack_from(sec.data, off)
            out.append(Rela(r_offset, r_info >> 32, r_info & 0xFFFFFFFF, r_addend))
        return out

    def set_relocations(self, index: int, relas: list[Rela]) -> None:
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
        shstrndx = self.header[13]
        shstr = _StringTable()
        name_offsets = [shstr.add(s.name) if s.name else 0 for s in self.sections]
        self.sections[shstrndx].data = shstr.data()

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
