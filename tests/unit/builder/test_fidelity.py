"""Fidelity check: masked comparison, relocation verification, branch relaxation, sympos resolution.

The pure parts run on small byte strings and hand-made relocation fields. The whole check runs on
C files compiled here by gcc the way the kernel compiles, "linked" into a fake kernel image by a
few lines of Python below (place sections, resolve symbols, apply relocations), with a kallsyms
text written from the result: a kernel whose every address is known to the test.
"""

from __future__ import annotations

import io
import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from dynamos.builder.elf import RELOC_KINDS, SHF_ALLOC, SHORT_BRANCHES, SHT_PROGBITS, SHT_RELA, RelocatableElf
from dynamos.builder.fidelity import (
    CandidateCheck,
    Comparison,
    FidelityReport,
    FieldReloc,
    FunctionCheck,
    ObjectItem,
    Status,
    check_fidelity,
    check_item,
    compare_masked,
    read_object_unit,
)
from dynamos.errors import BuildError, TargetError
from dynamos.lab.kallsyms import lab_symbol_table
from dynamos.target import TargetKernel
from dynamos.target.images import KernelText
from dynamos.target.modimage import module_image
from dynamos.target.symtab import SymbolTable, check_link_time, kallsyms_path
from tests.support.gcc import compile_kernel_like

PC32, PLT32, ABS64, ABS32S = RELOC_KINDS[2], RELOC_KINDS[4], RELOC_KINDS[1], RELOC_KINDS[11]
BASE = 0xFFFFFFFF81000000


def nothing_known(_anchor: str) -> int | None:
    return None


# ----- relocation kinds and masked comparison --------------------------------------------------


def test_relocation_widths_come_from_the_table() -> None:
    widths = {RELOC_KINDS[t].name: RELOC_KINDS[t].width for t in (1, 2, 4, 10, 11)}
    assert widths == {"R_X86_64_64": 8, "R_X86_64_PC32": 4, "R_X86_64_PLT32": 4, "R_X86_64_32": 4,
                      "R_X86_64_32S": 4}


def test_linked_field_and_recovered_symbol_agree() -> None:
    place, symbol = BASE + 0x101, BASE + 0x7650
    field = PLT32.field(symbol, -4, place)
    assert struct.unpack("<i", field)[0] == symbol - 4 - place
    assert PLT32.symbol(field, -4, place) == symbol
    assert ABS64.symbol(ABS64.field(symbol, 8, 0), 8, 0) == symbol
    assert ABS32S.symbol(ABS32S.field(symbol, 0, 0), 0, 0) == symbol  # sign extension gives the top half back
    assert RELOC_KINDS[10].symbol(b"\0\0\0\0", 0, 0) is None  # zero-extended: a kernel address does not fit


def test_masked_bytes_are_not_compared() -> None:
    assert compare_masked(b"\xe8\0\0\0\0\x53", b"\xe8\xab\x60\xc6\xff\x53", [(1, 5)]) == Comparison(2, 4, 0, None)


def test_differences_outside_masks_are_counted_from_the_first() -> None:
    got = compare_masked(b"\x01\x02\x03\x04\x05", b"\x01\x09\x03\x09\x05", [(4, 5)])
    assert (got.compared, got.masked, got.differing, got.first_difference) == (4, 1, 2, 1)
    assert not got.equal


def test_missing_kernel_bytes_differ() -> None:
    got = compare_masked(b"\x01\x02\x03", b"\x01", [])
    assert (got.differing, got.first_difference) == (2, 1)


# ----- one item against the kernel's bytes ------------------------------------------------------


def item(data: bytes, *relocs: FieldReloc, name: str = "f") -> ObjectItem:
    return ObjectItem(name, f".text.{name}", 1, 0, data, tuple(relocs))


def reloc(offset: int, anchor: str, kind=PLT32, addend: int = -4, **kw) -> FieldReloc:
    return FieldReloc(offset, kind, anchor, anchor.partition(":")[2], addend, **kw)


# call callee; mov 0(%rip),%rsi; ret
CODE = b"\xe8\0\0\0\0\x48\x8b\x35\0\0\0\0\xc3"
CODE_RELOCS = (reloc(1, "sym:callee"), reloc(8, "sec:7", kind=PC32))


def linked(addr: int, callee: int, data_section: int) -> bytes:
    return (b"\xe8" + PLT32.field(callee, -4, addr + 1) + b"\x48\x8b\x35" + PC32.field(data_section, -4, addr + 8)
            + b"\xc3")


def test_unknown_anchor_is_masked_known_anchor_is_verified() -> None:
    kernel = linked(BASE, BASE + 0x5000, BASE + 0x9000)
    check = check_item(item(CODE, *CODE_RELOCS), BASE, kernel, {"sym:callee": BASE + 0x5000}.get)
    assert check.equal and check.verified == 1
    assert (check.comparison.masked, check.comparison.compared) == (4, 9)


def test_known_anchor_pointing_elsewhere_is_a_difference() -> None:
    kernel = linked(BASE, BASE + 0x5000, BASE + 0x9000)
    check = check_item(item(CODE, *CODE_RELOCS), BASE, kernel, {"sym:callee": BASE + 0x6000}.get)
    assert not check.equal
    assert check.wrong == ("+0x1 callee-0x4",)
    assert check.comparison.first_difference == 2  # the low byte of the displacement happens to agree


def test_non_relocated_byte_difference_is_found() -> None:
    kernel = bytearray(linked(BASE, BASE + 0x5000, BASE + 0x9000))
    kernel[5] ^= 0x01  # the REX prefix of the mov
    check = check_item(item(CODE, *CODE_RELOCS), BASE, bytes(kernel), nothing_known)
    assert (check.comparison.differing, check.comparison.first_difference) == (1, 5)


# jne over the tail jump; jmp <neighbour, another function of the same file>; ret
RELAXABLE = b"\x75\x05\xe9\0\0\0\0\xc3"


def test_short_branch_in_the_kernel_is_recomputed_with_the_branches_across_it() -> None:
    neighbour = BASE + 0x40
    tail = reloc(3, "sym:neighbour", local_code=True)
    # The kernel's build (one .text): jne +2; jmp rel8 neighbour; ret
    kernel = b"\x75\x02\xeb" + bytes([(neighbour - (BASE + 4)) & 0xFF]) + b"\xc3"
    check = check_item(item(RELAXABLE, tail), BASE, kernel, {"sym:neighbour": neighbour}.get)
    assert check.equal and check.relaxed == 1 and check.verified == 1
    unknown = check_item(item(RELAXABLE, tail), BASE, kernel, nothing_known)
    assert unknown.equal and unknown.comparison.masked == 1  # the rel8 of an unplaced target is masked


def test_short_branch_only_for_code_of_the_same_file() -> None:
    kernel = b"\x75\x02\xeb\x3c\xc3"
    check = check_item(item(RELAXABLE, reloc(3, "sym:elsewhere")), BASE, kernel, nothing_known)
    assert not check.equal and check.relaxed == 0


def test_branch_across_a_short_branch_must_land_on_the_same_instruction() -> None:
    kernel = b"\x75\x03\xeb\x3c\xc3"  # jne now skips one byte too many
    check = check_item(item(RELAXABLE, reloc(3, "sym:n", local_code=True)), BASE, kernel, nothing_known)
    assert not check.equal and check.comparison.first_difference == 1


def test_short_branch_table_covers_jmp_and_every_condition() -> None:
    assert SHORT_BRANCHES[b"\xe9"] == b"\xeb"
    assert {SHORT_BRANCHES[bytes([0x0F, 0x80 + cc])][0] for cc in range(16)} == set(range(0x70, 0x80))


def test_string_literal_is_followed_and_compared() -> None:
    code = b"\x48\xc7\xc7\0\0\0\0\xc3"  # mov $str, %rdi; ret
    ref = reloc(3, "sec:5", kind=ABS32S, addend=0x10, constant=b"hello\0", constant_offset=0x10)
    strings = BASE + 0x8000
    kernel = b"\x48\xc7\xc7" + ABS32S.field(strings, 0x10, 0) + b"\xc3"
    memory = {strings + 0x10: b"hello\0"}

    def read(addr: int, size: int) -> bytes:
        return memory.get(addr, b"")[:size]

    assert check_item(item(code, ref), BASE, kernel, nothing_known, read).equal
    memory[strings + 0x10] = b"hellO\0"
    check = check_item(item(code, ref), BASE, kernel, nothing_known, read)
    assert not check.equal and check.comparison.equal  # the code is the same, the string is not
    assert "hello" in check.wrong_constants[0]


# ----- the symbol table --------------------------------------------------------------------------

KALLSYMS = """\
0000000000000000 A fixed_percpu_data
ffffffff81000000 T _text
ffffffff81000100 t show
ffffffff81000140 T other
ffffffff81000200 d show
ffffffff81000300 t show
ffffffffc0001000 t show\t[9p]
"""


def test_lookup_keeps_table_order_and_derives_sizes() -> None:
    table = SymbolTable.parse(KALLSYMS)
    found = table.lookup("show")
    assert [(s.addr, s.type) for s in found] == [(0xFFFFFFFF81000100, "t"), (0xFFFFFFFF81000200, "d"),
                                                 (0xFFFFFFFF81000300, "t")]
    assert [table.sympos(s) for s in found] == [1, 2, 3]  # livepatch counts symbols of every type
    assert found[0].size == 0x40 and found[2].size is None
    assert table.lookup("show", "9p")[0].addr == 0xFFFFFFFFC0001000
    assert table.unique_address("other") == 0xFFFFFFFF81000140
    assert table.unique_address("show") is None and table.lookup("missing") == []


def test_symbol_table_must_be_at_link_time_addresses() -> None:
    table = SymbolTable.parse(KALLSYMS)
    check_link_time(table, BASE, "6.1.0-56-amd64")
    with pytest.raises(TargetError, match="nokaslr"):
        check_link_time(table, BASE + 0x2000000, "6.1.0-56-amd64")
    with pytest.raises(TargetError, match="hidden"):
        check_link_time(SymbolTable.parse("0000000000000000 T _text\n"), BASE, "6.1.0-56-amd64")


def test_cached_symbol_table_needs_no_lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYNAMOS_CACHE", str(tmp_path))
    target = fake_target()
    path = kallsyms_path(target)
    path.parent.mkdir(parents=True)
    path.write_text(KALLSYMS)
    assert len(lab_symbol_table(target)) == 7


# ----- whole units: compiled by gcc, linked by a few lines of Python ---------------------------


# How the test linker writes each relocation type: (width, pc-relative).
LINK_RULES = {1: (8, False), 2: (4, True), 4: (4, True), 10: (4, False), 11: (4, False)}

UNIT_A = """
extern int printk(const char *fmt, ...);
extern int shared_counter;
static int table[4] = {1, 2, 3, 4};

static int __attribute__((noinline)) twin(int x) { return x * 5 + 3; }
static int __attribute__((noinline)) lookup(int x) { return table[x & 3]; }
int use_a(int x) { return twin(x) * 2 + shared_counter + lookup(x); }
static int __attribute__((noinline)) show(int x) { return printk("a says %d\\n", x); }
int call_show_a(int x) { return show(x + 1); }
int __attribute__((weak)) hook(int x) { return x; }
int __attribute__((noinline)) neighbour(int x) { return printk("n %d\\n", x) + x; }
int tail(int x) { return neighbour(x + 1); }
"""

UNIT_B = """
extern int printk(const char *fmt, ...);
static int table[4] = {1, 2, 3, 4};

static int __attribute__((noinline)) twin(int x) { return x * 5 + 3; }
static int __attribute__((noinline)) lookup(int x) { return table[x & 3]; }
int use_b(int x) { return twin(x) * 3 + lookup(x); }
static int __attribute__((noinline)) show(int x) { return printk("b says %d, %d\\n", x, x * 2); }
int call_show_b(int x) { return show(x - 1); }
int hook(int x) { return x + 1; }
"""


def compile_unit(directory: Path, name: str, text: str, sections: bool = True) -> bytes:
    return compile_kernel_like(directory, name, text, sections=sections).read_bytes()


def link(objects: list[bytes]) -> tuple[KernelText, SymbolTable]:
    """Lay the objects' allocated sections out from BASE, resolve and apply their relocations,
    and list their symbols (and the undefined ones, as kernel functions) as kallsyms would."""
    units = [RelocatableElf.parse(o) for o in objects]
    image, placed = bytearray(), {}
    for u, obj in enumerate(units):
        for i, sec in enumerate(obj.sections):
            if sec.flags & SHF_ALLOC and sec.type == SHT_PROGBITS:
                image += b"\0" * (-len(image) % 16)
                placed[(u, i)] = BASE + len(image)
                image += sec.data
    strong, weak, listing = {}, {}, []
    for u, obj in enumerate(units):
        for sym in obj.symbols:
            if sym.name and sym.info & 0xF in (1, 2) and (u, sym.shndx) in placed:
                addr = placed[(u, sym.shndx)] + sym.value
                letter = "t" if sym.info & 0xF == 2 else "d"
                if sym.binding == 2:
                    weak.setdefault(sym.name, (addr, letter.upper().replace("T", "W").replace("D", "V")))
                elif sym.binding == 1:
                    strong[sym.name] = (addr, letter.upper())
                else:
                    listing.append((addr, letter, sym.name))
    listing += [(a, t, n) for n, (a, t) in strong.items()]
    listing += [(a, t, n) for n, (a, t) in weak.items() if n not in strong]
    exported = {n: a for a, _t, n in listing if n in strong or n in weak}
    undefined = sorted({s.name for obj in units for s in obj.symbols if s.name and s.shndx == 0} - set(exported))
    for k, name in enumerate(undefined):
        exported[name] = BASE + 0x1000000 + 0x100 * k
        listing.append((exported[name], "T", name))
    for u, obj in enumerate(units):
        for i, sec in enumerate(obj.sections):
            if sec.type != SHT_RELA or (u, sec.info) not in placed:
                continue
            for r in obj.relocations(i):
                sym = obj.symbols[r.sym]
                local = sym.binding == 0 and (u, sym.shndx) in placed
                value = placed[(u, sym.shndx)] + sym.value if local else exported[sym.name]
                width, pc_relative = LINK_RULES[r.type]
                place = placed[(u, sec.info)] + r.offset
                value += r.addend - (place if pc_relative else 0)
                start = place - BASE
                image[start:start + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    text = "".join(f"{a:016x} {t} {n}\n" for a, t, n in sorted(listing))
    return KernelText(bytes(image), [(BASE, BASE + len(image), 0, ".text")]), SymbolTable.parse(text)


def fake_target() -> TargetKernel:
    return TargetKernel("6.1.0-99-test", Path("/nonexistent"), None, None, None)


def check(unit: bytes, kernel: tuple[KernelText, SymbolTable], **kw) -> FidelityReport:
    text, symtab = kernel
    return check_fidelity(unit, fake_target(), symtab, text=text, **kw)


@pytest.fixture(scope="module")
def units(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("units")
    return {"a": compile_unit(d, "a", UNIT_A), "b": compile_unit(d, "b", UNIT_B),
            "a_whole": compile_unit(d / "whole", "a", UNIT_A, sections=False)}


def test_every_function_of_a_faithful_unit_matches(units: dict[str, bytes]) -> None:
    report = check(units["a"], link([units["b"], units["a"]]))
    assert report.ok and not report.ambiguous and not report.absent, report.summary()
    assert set(report.resolved) == {"twin", "lookup", "use_a", "show", "call_show_a", "neighbour", "tail"}


def test_same_named_statics_resolve_to_this_files_copy(units: dict[str, bytes]) -> None:
    kernel = link([units["b"], units["a"]])  # b's copies come first in the table: a's are sympos 2
    report = check(units["a"], kernel)
    assert report.resolved["show"] == 2  # different code: the bytes decide
    assert report.resolved["lookup"] == 2  # the same code, but it reads this file's table: use_a placed it
    assert report.resolved["twin"] == 2  # the same code in both files: use_a's call decides
    twin = report.functions["twin"]
    assert sum(c.comparison.equal for c in twin.candidates) == 2 and twin.addr == kernel[1].lookup("twin")[1].addr
    assert check(units["b"], kernel).resolved == {"twin": 1, "lookup": 1, "use_b": 1, "show": 1,
                                                  "call_show_b": 1, "hook": 1}


def test_a_changed_byte_stops_the_build_naming_the_function(units: dict[str, bytes]) -> None:
    kernel = link([units["b"], units["a"]])
    obj = RelocatableElf.parse(units["a"])
    section = obj.sections[obj.section_index(".text.use_a")]
    relocated = {r.offset + k for i, s in enumerate(obj.sections) if s.type == SHT_RELA and
                 obj.sections[s.info] is section for r in obj.relocations(i) for k in range(4)}
    offset = next(o for o in range(len(section.data)) if o not in relocated and o > 5)
    corrupted = bytearray(units["a"])
    corrupted[_file_offset(units["a"], ".text.use_a") + offset] ^= 0x40
    report = check(bytes(corrupted), kernel)
    assert [f.name for f in report.mismatches] == ["use_a"]
    assert report.mismatches[0].closest.comparison.first_difference == offset
    with pytest.raises(BuildError, match=r"use_a: differs.*") as caught:
        report.raise_on_mismatch()
    assert "wrong source, config or compiler" in str(caught.value)
    assert caught.value.code == "fidelity"  # what build --to reports for the file


def _file_offset(data: bytes, section: str) -> int:
    return ELFFile(io.BytesIO(data)).get_section_by_name(section)["sh_offset"]


def test_a_changed_string_is_a_mismatch(units: dict[str, bytes], tmp_path: Path) -> None:
    other = compile_unit(tmp_path, "a", UNIT_A.replace("a says", "A says"))
    report = check(units["a"], link([units["b"], other]))
    assert [f.name for f in report.mismatches] == ["show"]
    assert "a says" in report.mismatches[0].describe()


def test_overridden_weak_definition_is_not_a_mismatch(units: dict[str, bytes]) -> None:
    report = check(units["a"], link([units["b"], units["a"]]))
    assert report.functions["hook"].status is Status.OVERRIDDEN and report.ok


def test_unit_not_in_the_kernel_is_absent(units: dict[str, bytes]) -> None:
    report = check(units["a"], link([units["b"]]), functions=["use_a"])
    assert list(report.functions) == ["use_a"] and report.absent and report.ok
    with pytest.raises(BuildError, match="defines no function nope"):
        check(units["a"], link([units["b"]]), functions=["nope"])


def test_kernel_built_without_function_sections_holds_short_tail_jumps(units: dict[str, bytes]) -> None:
    """The kernel compiles a file into one .text: the assembler shortens ``jmp neighbour``."""
    kernel = link([units["b"], units["a_whole"]])
    tail = kernel[0].read(kernel[1].lookup("tail")[0].addr, 18)
    assert tail[16] == 0xEB  # after fentry, sub, add, add: a two-byte jmp to neighbour
    report = check(units["a"], kernel)
    assert report.ok, report.summary()
    assert report.functions["tail"].match.relaxed == 1 and report.functions["call_show_a"].match.relaxed == 1
    assert check(units["a_whole"], kernel).ok  # an object compiled like the kernel needs no relaxation


def test_functions_are_symbol_ranges_with_or_without_function_sections(units: dict[str, bytes]) -> None:
    split, whole = read_object_unit(units["a"]), read_object_unit(units["a_whole"])
    assert set(split.functions) == set(whole.functions)
    assert split.functions["use_a"].section == ".text.use_a" and split.functions["use_a"].offset == 0
    assert whole.functions["use_a"].section == ".text" and whole.functions["tail"].offset > 0
    assert [d.name for d in split.data] == []  # table has no pointers: nothing to learn from it
    assert split.functions["hook"].weak and not split.functions["use_a"].weak


def test_every_status_has_a_description() -> None:
    for status in Status:
        f = FunctionCheck("f", 10, ".text.f", status, (CandidateCheck(BASE, 1, "t", Comparison(10, 0, 3, 4)),))
        assert f.describe().startswith("f: ")


def module_of(directory: Path, objects: list[bytes]) -> bytes:
    """The objects linked the way a .ko is: ``ld -r`` into one relocatable file."""
    paths = []
    for i, data in enumerate(objects):
        paths.append(directory / f"part{i}.o")
        paths[-1].write_bytes(data)
    subprocess.run(["ld", "-r", "-o", str(directory / "m.ko"), *map(str, paths)], check=True)
    return (directory / "m.ko").read_bytes()


def test_a_unit_of_a_module_matches_the_shipped_module_and_finds_its_twins(units: dict[str, bytes],
                                                                           tmp_path: Path) -> None:
    b_whole = compile_unit(tmp_path / "b", "b", UNIT_B, sections=False)
    symtab, text = module_image(module_of(tmp_path, [b_whole, units["a_whole"]]), "m")
    report = check(units["a"], (text, symtab), against="module m")
    assert report.ok and not report.ambiguous, report.summary()
    # b's copies come first in the module's table: a's are sympos 2, told apart as in vmlinux
    assert (report.resolved["show"], report.resolved["lookup"], report.resolved["twin"]) == (2, 2, 2)
    assert report.summary().startswith("object against module m:")
    # References were relocated: a call that lands elsewhere in the module is a difference.
    twisted = UNIT_A.replace("int tail(int x) { return neighbour(x + 1); }", "int tail(int x) { return use_a(x + 1); }")
    bad = check(compile_unit(tmp_path / "twisted", "a", twisted), (text, symtab))
    assert [f.name for f in bad.mismatches] == ["tail"], bad.summary()
