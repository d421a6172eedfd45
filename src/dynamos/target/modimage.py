"""A shipped module laid out as if it were loaded: the fidelity check's "kernel" for module units.

vmlinux is linked, so the check reads its bytes at kallsyms addresses. A ``.ko`` is relocatable:
its code holds zeros where the loader will write addresses. So the module is given addresses
here, the way the loader would (each allocated section placed in turn, every undefined symbol a
made-up address of its own), and its relocations are applied. A faithfully compiled original
then matches the module's functions byte for byte, references included: a call that goes to
another function in the module than in the compile is a difference, as in vmlinux.

The symbol table lists the module's symbols in its own table order, which is the order livepatch
counts same-named symbols of a module in (``sympos``), so the check's answer for a file-local
twin is the position livepatch needs.
"""

from __future__ import annotations

from dynamos.builder.elf import (
    KERNEL_TEXT_START,
    MODULES_VADDR,
    RELOC_KINDS,
    SHF_ALLOC,
    SHF_EXECINSTR,
    SHN_ABS,
    SHN_UNDEF,
    SHT_PROGBITS,
    SHT_RELA,
    STB_LOCAL,
    STT_FUNC,
    STT_SECTION,
    RelocatableElf,
)
from dynamos.errors import BuildError
from dynamos.target.images import KernelText
from dynamos.target.symtab import Sym, SymbolTable

MODULE_BASE = MODULES_VADDR  # the module is laid out where x86-64 loads modules
EXTERNAL_BASE = KERNEL_TEXT_START  # made-up addresses of the symbols the module imports, in kernel text


def module_image(ko: bytes, name: str) -> tuple[SymbolTable, KernelText]:
    """The module's symbols and relocated bytes at made-up load addresses (see module docstring)."""
    obj = RelocatableElf.parse(ko, f"{name}.ko")
    base: dict[int, int] = {}
    ranges: list[tuple[int, int, int, str]] = []
    image = bytearray()
    addr = MODULE_BASE
    for index, sec in enumerate(obj.sections):
        if not sec.flags & SHF_ALLOC:
            continue
        align = max(sec.addralign, 1)
        addr = -(-addr // align) * align
        base[index] = addr
        size = len(sec.data) if sec.type == SHT_PROGBITS else sec.nobits_size or len(sec.data)
        if sec.type == SHT_PROGBITS:
            ranges.append((addr, addr + size, len(image), sec.name))
            image += sec.data
        addr += max(size, 1)

    external: dict[str, int] = {}
    symbols: list[Sym] = []

    def address_of(sym_index: int) -> int | None:
        sym = obj.symbols[sym_index]
        if sym.shndx == SHN_UNDEF:
            if not sym.name:
                return None
            return external.setdefault(sym.name, EXTERNAL_BASE + 64 * len(external))
        if sym.shndx == SHN_ABS:
            return sym.value
        return base[sym.shndx] + sym.value if sym.shndx in base else None

    for sym in obj.symbols:
        if not sym.name or sym.type == STT_SECTION or sym.shndx not in base:
            continue
        sec = obj.sections[sym.shndx]
        kind = "t" if sym.type == STT_FUNC or sec.flags & SHF_EXECINSTR else "d"
        symbols.append(Sym(base[sym.shndx] + sym.value, kind if sym.binding == STB_LOCAL else kind.upper(),
                           sym.name))

    offsets = {start: offset for start, _end, offset, _name in ranges}
    for index, sec in enumerate(obj.sections):
        if sec.type != SHT_RELA or sec.info not in base or base[sec.info] not in offsets:
            continue
        target_base, at = base[sec.info], offsets[base[sec.info]]
        for r in obj.relocations(index):
            kind = RELOC_KINDS.get(r.type)
            if kind is None:
                raise BuildError(f"{name}.ko: relocation type {r.type} in {obj.sections[sec.info].name} is not "
                                 f"supported by the fidelity check")
            value = address_of(r.sym)
            if kind.width == 0 or value is None:
                continue
            place = target_base + r.offset
            image[at + r.offset:at + r.offset + kind.width] = kind.field(value, r.addend, place)
    symbols += [Sym(addr, "T", sym_name) for sym_name, addr in external.items()]
    return SymbolTable(symbols), KernelText(bytes(image), ranges, f"{name}.ko")
