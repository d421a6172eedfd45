"""x86-64 facts of the object layer: the relocation table, one row per type.

Every step that reads or writes a relocated field (the object diff, the fidelity check, module
images) looks its type up here: the width of the field, whether the value is relative to the
field's address, whether it is sign-extended, and whether it goes through the GOT (the linker
may then rewrite the instruction, so the field is not plain ``S + A``).
"""

from __future__ import annotations

from dataclasses import dataclass

MASK64 = (1 << 64) - 1
FENTRY_CALL_SIZE = 5  # ``call __fentry__`` at the start of every traced function


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
