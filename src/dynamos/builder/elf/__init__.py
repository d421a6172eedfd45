"""The object layer: one ELF model and the architecture's relocation table, for every builder step."""

from dynamos.builder.elf.model import (
    EHDR,
    RELA,
    SHDR,
    SHF_ALLOC,
    SHF_EXECINSTR,
    SHF_INFO_LINK,
    SHF_WRITE,
    SHN_UNDEF,
    SHT_NOBITS,
    SHT_NULL,
    SHT_PROGBITS,
    SHT_RELA,
    SHT_STRTAB,
    SHT_SYMTAB,
    SYM,
    Rela,
    RelocatableElf,
    Section,
    Symbol,
)
from dynamos.builder.elf.x86_64 import FENTRY_CALL_SIZE, MASK64, RELOC_KINDS, RelocKind, plain_reloc_kind

__all__ = [
    "EHDR", "RELA", "SHDR", "SHF_ALLOC", "SHF_EXECINSTR", "SHF_INFO_LINK", "SHF_WRITE", "SHN_UNDEF",
    "SHT_NOBITS", "SHT_NULL", "SHT_PROGBITS", "SHT_RELA", "SHT_STRTAB", "SHT_SYMTAB", "SYM", "Rela",
    "RelocatableElf", "Section", "Symbol", "FENTRY_CALL_SIZE", "MASK64", "RELOC_KINDS", "RelocKind",
    "plain_reloc_kind",
]
