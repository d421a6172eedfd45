"""x86-64 facts of the object layer, stated once: the relocation table, instruction and table sizes.

Every step that reads or writes a relocated field (the object diff, the fidelity check, module
images) looks its type up here: the width of the field, whether the value is relative to the
field's address, whether it is sign-extended, and whether it goes through the GOT (the linker
may then rewrite the instruction, so the field is not plain ``S + A``). The layouts of the
kernel's per-function tables (kernel 6.1) and the few instruction facts the builder relies on
live here too, so no other module carries a magic size.
"""

from __future__ import annotations

from dataclasses import dataclass

EM_X86_64 = 62  # e_machine
MASK64 = (1 << 64) - 1

# ----- instructions -----------------------------------------------------------------------------
FENTRY_CALL_SIZE = 5  # ``call __fentry__`` at the start of every traced function
ENDBR_SIZE = 4  # ENDBR64, before the fentry call when the kernel is built with IBT
# Offsets of the __fentry__ call's relocation in a traceable function: after the call opcode, right at
# the start or after an ENDBR64.
FENTRY_RELOC_OFFSETS = (1, 1 + ENDBR_SIZE)
REL32_SIZE = 4  # a rel32 operand; a pc-relative reference in code assumes it ends its instruction
# The most an addend of a pc-relative reference to a symbol lies before it: the rel32 operand and an
# immediate after it (``cmpl $1, x(%rip)`` carries -5); extraction allows this much slack.
MAX_PC_BIAS = 8

# Branch relaxation: long branch opcode (rel32) -> the short opcode (rel8) the assembler picks for a
# nearby target.
SHORT_BRANCHES: dict[bytes, bytes] = {
    b"\xe9": b"\xeb",  # jmp rel32 -> jmp rel8
    **{bytes([0x0F, 0x80 + cc]): bytes([0x70 + cc]) for cc in range(16)},  # jcc rel32 -> jcc rel8
}
# Opcode -> width of its displacement, for re-targeting branches that carry no relocation.
BRANCH_DISPLACEMENTS: dict[bytes, int] = {**{long: REL32_SIZE for long in SHORT_BRANCHES},
                                          **{short: 1 for short in SHORT_BRANCHES.values()}}

# ----- addresses --------------------------------------------------------------------------------
MODULES_VADDR = 0xFFFFFFFFC0000000  # where x86-64 loads modules
KERNEL_TEXT_START = 0xFFFFFFFF81000000  # where the kernel's text links (without KASLR)


# ----- the kernel's per-function tables ---------------------------------------------------------
@dataclass(frozen=True)
class TableLayout:
    """One entry of a table the kernel builds from a special section (x86-64, kernel 6.1)."""

    entry_size: int
    code_offset: int = 0  # where an entry's relocation says which code it is about
    key_offset: int | None = None  # where an entry names a key (static key, static call)
    # Where an entry points at code of its own outside any function (an alternative's replacement),
    # and where the entry says how many bytes of it there are (u8): the piece is exactly that long.
    piece_offset: int | None = None
    piece_length_offset: int | None = None


TABLE_LAYOUTS: dict[str, TableLayout] = {
    "__mcount_loc": TableLayout(8),  # ftrace call sites (R_X86_64_64 to the call)
    ".orc_unwind_ip": TableLayout(4),  # unwinder: one IP per ORC entry (s32, relative)
    ".orc_unwind": TableLayout(6),  # struct orc_entry, parallel to .orc_unwind_ip (no relocations)
    "__bug_table": TableLayout(12),  # struct bug_entry: bug_addr_disp, file_disp, line, flags
    "__ex_table": TableLayout(12),  # struct exception_table_entry: insn, fixup, data
    # struct alt_instr: instr_offset (s32), repl_offset (s32), cpuid (u16), instrlen, replacementlen (u8)
    ".altinstructions": TableLayout(12, piece_offset=4, piece_length_offset=11),
    ".parainstructions": TableLayout(16),  # struct paravirt_patch_site: instr (u8 *), type, len (u8)
    ".return_sites": TableLayout(4),  # objtool: return thunk sites (s32)
    ".retpoline_sites": TableLayout(4),  # objtool: indirect call thunk sites (s32)
    ".call_sites": TableLayout(4),  # objtool: call depth tracking sites (s32)
    ".ibt_endbr_seal": TableLayout(4),  # objtool: sealable ENDBR sites (s32)
    ".smp_locks": TableLayout(4),  # LOCK prefixes the kernel may patch out on a uniprocessor (s32)
    ".static_call_sites": TableLayout(8, key_offset=4),  # struct static_call_site: addr, key
    "__jump_table": TableLayout(16, key_offset=8),  # struct jump_entry: code, target, key
}


# ----- relocations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RelocKind:
    name: str
    width: int
    pc_relative: bool
    signed: bool
    via_got: bool = False

    def field(self, symbol: int, addend: int, place: int) -> bytes:
        """The bytes the linker writes: S + A, or S + A - P."""
        value = symbol + addend - (place if self.pc_relative else 0)
        return (value % (1 << (8 * self.width))).to_bytes(self.width, "little")

    def symbol(self, field: bytes, addend: int, place: int) -> int | None:
        """S recovered from a linked field, or None when the field cannot hold a kernel address."""
        if not self.signed and self.width < 8:
            return None  # zero-extended 32-bit: the kernel's upper half is lost
        value = int.from_bytes(field, "little", signed=self.signed)
        return (value - addend + (place if self.pc_relative else 0)) & MASK64


RELOC_KINDS: dict[int, RelocKind] = {
    0: RelocKind("R_X86_64_NONE", 0, False, False),  # objtool's way to drop a relocation (fentry NOPs)
    1: RelocKind("R_X86_64_64", 8, False, False),
    2: RelocKind("R_X86_64_PC32", 4, True, True),
    4: RelocKind("R_X86_64_PLT32", 4, True, True),
    9: RelocKind("R_X86_64_GOTPCREL", 4, True, True, via_got=True),
    10: RelocKind("R_X86_64_32", 4, False, False),
    11: RelocKind("R_X86_64_32S", 4, False, True),
    12: RelocKind("R_X86_64_16", 2, False, False),
    13: RelocKind("R_X86_64_PC16", 2, True, True),
    14: RelocKind("R_X86_64_8", 1, False, False),
    15: RelocKind("R_X86_64_PC8", 1, True, True),
    24: RelocKind("R_X86_64_PC64", 8, True, True),
    41: RelocKind("R_X86_64_GOTPCRELX", 4, True, True, via_got=True),
    42: RelocKind("R_X86_64_REX_GOTPCRELX", 4, True, True, via_got=True),
}


def plain_reloc_kind(rtype: int) -> RelocKind | None:
    """The row of a relocation whose field is plain ``S + A (- P)``; None for unknown or GOT types."""
    kind = RELOC_KINDS.get(rtype)
    return None if kind is None or kind.via_got else kind
