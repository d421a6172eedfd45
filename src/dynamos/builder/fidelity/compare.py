"""Pure comparison: an item's bytes against the kernel's, relocation fields verified or masked.

Branch relaxation lives here too: the kernel compiles a file into one ``.text``, so the assembler
may hold a branch to a nearby function of the same file in its short form (``SHORT_BRANCHES``, an
x86-64 fact in ``elf/x86_64.py``), where the per-function-section compile keeps the long one. Only
for branches to code of the same file: elsewhere the linker, not the assembler, decides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from dynamos.builder.elf import BRANCH_DISPLACEMENTS, REL32_SIZE, SHORT_BRANCHES
from dynamos.builder.fidelity.unit import FieldReloc, ObjectItem


@dataclass(frozen=True)
class Comparison:
    """Compared bytes of one function against one kernel candidate."""

    compared: int
    masked: int
    differing: int
    first_difference: int | None  # offset in the kernel's copy (the same as in the object unless relaxed)

    @property
    def equal(self) -> bool:
        return self.differing == 0


def compare_masked(expected: bytes, actual: bytes, masks: Iterable[tuple[int, int]]) -> Comparison:
    """Compare ``expected`` with ``actual`` at every byte outside the ``[start, end)`` masks.

    A shorter ``actual`` (the kernel's text ends) counts its missing bytes as differing.
    """
    size = len(expected)
    covered = bytearray(size)
    for start, end in masks:
        covered[max(start, 0):min(end, size)] = b"\x01" * max(0, min(end, size) - max(start, 0))
    masked = covered.count(1)
    differing = 0
    first: int | None = None
    # Compare the unmasked runs as slices (C speed); scan bytes only inside unequal runs.
    pos = 0
    while pos < size:
        if covered[pos]:
            pos += 1
            continue
        end = covered.find(1, pos)
        end = size if end < 0 else end
        if expected[pos:end] != actual[pos:end]:
            for i in range(pos, end):
                if i >= len(actual) or expected[i] != actual[i]:
                    differing += 1
                    first = i if first is None else first
        pos = end
    return Comparison(size - masked, masked, differing, first)


@dataclass(frozen=True)
class ItemCheck:
    """The outcome of comparing an item with the kernel's bytes at one address."""

    comparison: Comparison
    verified: int = 0  # relocation fields whose linked value was checked
    wrong: tuple[str, ...] = ()  # verified fields holding another value (offset and label)
    relaxed: int = 0  # branches the kernel holds in their short form (SHORT_BRANCHES)
    fields: tuple[tuple[FieldReloc, int], ...] = ()  # each full-size field and its offset in the kernel
    wrong_constants: tuple[str, ...] = ()  # merged constants (strings) the kernel's field leads to that differ

    @property
    def equal(self) -> bool:
        return self.comparison.equal and not self.wrong_constants


def short_branch(data: bytes, reloc: FieldReloc, kernel: bytes, here: int,
                 lowest: int = 0) -> tuple[bytes, bytes] | None:
    """(long, short) opcodes when the kernel holds the short form of the branch at ``reloc``.

    ``here`` is where the field would be in the kernel's bytes; the opcode starts before it, at
    ``lowest`` or later (not inside an earlier field).
    """
    if not (reloc.local_code and reloc.kind.pc_relative and reloc.kind.width == REL32_SIZE
            and reloc.addend == -REL32_SIZE):
        return None
    for long, short in SHORT_BRANCHES.items():
        start = reloc.offset - len(long)
        if start >= lowest and data[start:reloc.offset] == long and \
                kernel[here - len(long):here - len(long) + len(short)] == short:
            return long, short
    return None


def check_item(item: ObjectItem, addr: int, kernel: bytes, known: Callable[[str], int | None],
               read: Callable[[int, int], bytes] | None = None) -> ItemCheck:
    """Compare ``item`` with the kernel bytes at ``addr``.

    Builds the bytes the kernel should hold: the item's own, with each relocation field whose
    anchor address ``known`` gives set to the value the linker must have written (a "verified"
    field), and masked where the anchor is unknown. A branch the kernel holds in its short form
    (SHORT_BRANCHES) becomes that form, and the following bytes move up by the difference. With
    ``read`` (kernel bytes at an address), a field leading to a merged constant is followed and
    the constant compared.
    """
    expected = bytearray()
    masks: list[tuple[int, int]] = []
    verified, wrong, fields, wrong_constants = 0, [], [], []
    sites: list[tuple[int, int]] = []  # (end in the item, end in the kernel) of each shortened branch
    pos = 0  # next byte of item.data to copy
    for r in item.relocs:
        if r.offset < pos:
            continue  # overlapping relocations do not occur in compiled code; keep the first
        target = known(r.anchor)
        here = len(expected) + r.offset - pos  # the field's offset in the kernel's bytes
        short = short_branch(item.data, r, kernel, here, pos)
        if short is not None:
            long, opcode = short
            expected += item.data[pos:r.offset - len(long)] + opcode
            sites.append((r.offset + r.kind.width, len(expected) + 1))
            if target is None:
                masks.append((len(expected), len(expected) + 1))
                expected += b"\0"
            else:
                verified += 1
                displacement = target + r.addend + REL32_SIZE - (addr + len(expected) + 1)
                expected.append(displacement & 0xFF)
                if not -128 <= displacement < 128:
                    wrong.append(f"+{r.offset:#x} {r.label}")
        else:
            expected += item.data[pos:r.offset]
            fields.append((r, here))
            if target is None:
                masks.append((here, here + r.kind.width))
                expected += item.data[r.offset:r.offset + r.kind.width]
                same = _same_constant(r, kernel[here:here + r.kind.width], addr + here, read)
                verified += same is not None
                if same is False:
                    wrong_constants.append(f"+{r.offset:#x} {r.target}+{r.constant_offset:#x} ({r.constant!r:.40})")
            else:
                value = r.kind.field(target, r.addend, addr + here)
                verified += 1
                if kernel[here:here + r.kind.width] != value:
                    wrong.append(f"+{r.offset:#x} {r.label}")
                expected += value
        pos = r.offset + r.kind.width
    expected += item.data[pos:]
    comparison = compare_masked(bytes(expected), kernel, masks)
    if sites and not comparison.equal and retarget_branches(expected, kernel, masks, sites):
        comparison = compare_masked(bytes(expected), kernel, masks)
    return ItemCheck(comparison, verified, tuple(wrong), len(sites), tuple(fields), tuple(wrong_constants))


def _same_constant(r: FieldReloc, field: bytes, place: int, read: Callable[[int, int], bytes] | None) -> bool | None:
    """Whether the kernel's field leads to the same constant as the object's; None if not checkable."""
    if r.constant is None or read is None:
        return None
    section = r.kind.symbol(field, r.addend, place)  # where the kernel put "the section" for this field
    if section is None:
        return None
    return read(section + r.constant_offset, len(r.constant)) == r.constant


def retarget_branches(expected: bytearray, kernel: bytes, masks: list[tuple[int, int]],
                      sites: list[tuple[int, int]]) -> int:
    """Correct the displacement of branches inside the item that cross shortened branches.

    Only where the kernel holds exactly the corrected value: a differing byte is explained, not
    ignored. ``sites`` are (end in the item, end in the kernel) of each shortened branch, in order.
    Returns how many displacements were corrected.
    """
    def kernel_of(offset: int) -> int:
        moved = [item_end - kernel_end for item_end, kernel_end in sites if item_end <= offset]
        return offset - (moved[-1] if moved else 0)

    def item_of(offset: int) -> int:
        moved = [item_end - kernel_end for item_end, kernel_end in sites if kernel_end <= offset]
        return offset + (moved[-1] if moved else 0)

    masked = {i for start, end in masks for i in range(start, end)}
    fixed = 0
    k = 0
    while k < min(len(expected), len(kernel)):
        if expected[k] == kernel[k] or k in masked:
            k += 1
            continue
        for opcode, width in BRANCH_DISPLACEMENTS.items():
            start = next((f for f in range(max(len(opcode), k - width + 1), k + 1)
                          if expected[f - len(opcode):f] == opcode), None)
            if start is None or masked.intersection(range(start, start + width)):
                continue
            end = start + width  # the next instruction, in the kernel's bytes
            displacement = int.from_bytes(expected[start:end], "little", signed=True)
            want = kernel_of(item_of(end) + displacement) - end
            if -(1 << (8 * width - 1)) <= want < 1 << (8 * width - 1):
                value = want.to_bytes(width, "little", signed=True)
                if kernel[start:end] == value:
                    expected[start:end] = value
                    fixed += 1
                    k = end
                    break
        else:
            k += 1
    return fixed
