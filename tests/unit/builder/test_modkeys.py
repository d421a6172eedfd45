"""Jump labels and static calls on keys of a module: rewritten so the update needs no table entry
for them, or refused naming the function and the key (builder/modkeys.py).

The functions are written in assembly (top-level asm in C) so that each site's bytes, its table
entries and its ORC data are exactly what objtool leaves in a 6.1 module object.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from dynamos.builder.extract import extract_functions
from dynamos.builder.klp import KlpSymbol
from dynamos.errors import BuildError
from tests.support.gcc import compile_kernel_like

NOP5, NOP2 = ".byte 0x0f,0x1f,0x44,0x00,0x00", ".byte 0x66,0x90"


def source(site: str, key: str, flags: int, *, static_call: bool = False) -> str:
    """``user``: a call (so the section has relocations), a jump-label site on ``key`` + ``flags``
    (objtool's 2: the NOP mark; 1: branch) jumping to ``yes``, ORC entries before and at the site
    and objtool's terminator at the section's end; optionally a static call of a module's key."""
    call = "2: call __SCT__tp_func_x\\n" if static_call else "2: call helper\\n"
    sites = (".pushsection .static_call_sites,\\\"a\\\"\\n.long 2b - ., __SCK__tp_func_x - .\\n"
             ".long 2b - ., __SCK__vmlinux_call - .\\n.popsection\\n") if static_call else ""
    return f"""
asm(".pushsection .text.user,\\"ax\\",@progbits\\n.globl user\\n.type user,@function\\nuser:\\n"
    "push %rbx\\n{call}"
    "1: {site}\\n"
    "xor %eax,%eax\\npop %rbx\\nret\\n"
    "yes: mov $1,%eax\\npop %rbx\\nret\\n"
    "3: .size user, .-user\\n.popsection\\n"
    ".pushsection __jump_table,\\"aw\\"\\n.balign 8\\n.long 1b - ., yes - .\\n"
    ".quad {key} + {flags} - .\\n.popsection\\n"
    "{sites}"
    ".pushsection .orc_unwind_ip,\\"a\\"\\n.long user - ., user + 1 - ., 3b - .\\n.popsection\\n"
    ".pushsection .orc_unwind,\\"a\\"\\n"
    ".ascii \\"start0\\"\\n.ascii \\"pushed\\"\\n.ascii \\"endend\\"\\n.popsection\\n");
"""


def extract(tmp_path: Path, text: str):
    def resolve(name: str, local: bool) -> KlpSymbol | None:
        if name in ("helper", "__SCK__vmlinux_call"):
            return KlpSymbol(name)
        return KlpSymbol(name, "ext4")  # the tracepoint, static call and key are the module's

    return extract_functions(compile_kernel_like(tmp_path, "u", text).read_bytes(), {"user"}, set(), resolve)


def code_of(elf: ELFFile) -> bytes:
    return elf.get_section_by_name(".text.user").data()


def relocations(elf: ELFFile, name: str) -> list[tuple[int, str, int]]:
    symtab, sections = elf.get_section_by_name(".symtab"), list(elf.iter_sections())
    out = []
    for r in elf.get_section_by_name(f".rela{name}").iter_relocations():
        sym = symtab.get_symbol(r["r_info_sym"])
        out.append((r["r_offset"], sym.name or sections[sym["st_shndx"]].name, r["r_addend"]))
    return out


SITE, YES, END = 6, 6 + 5 + 4, 6 + 5 + 4 + 7  # push, call; the site; xor, pop, ret; mov, pop, ret


@pytest.mark.parametrize("branch, jcc", [(0, b"\x0f\x8f"), (1, b"\x0f\x8e")])
def test_a_key_of_a_module_becomes_a_test_of_the_key(tmp_path: Path, branch: int, jcc: bytes):
    """The 5-byte site jumps to ``cmpl $0, key.enabled(%rip); jg/jle yes; jmp back``: taken when
    enabled ^ branch, as the kernel's jump_label_type; the key through a livepatch relocation."""
    e = extract(tmp_path, source(NOP5, "the_key", 2 | branch))
    elf = ELFFile(io.BytesIO(e.object))
    code = code_of(elf)
    assert len(code) == END + 7 + 6 + 5 + 1
    assert code[SITE] == 0xE9 and int.from_bytes(code[SITE + 1:SITE + 5], "little", signed=True) == END - SITE - 5
    stub = code[END:]
    assert stub[:2] == b"\x83\x3d" and stub[6] == 0 and stub[7:9] == jcc
    assert int.from_bytes(stub[9:13], "little", signed=True) == YES - (END + 13)
    assert stub[13] == 0xE9 and int.from_bytes(stub[14:18], "little", signed=True) == SITE + 5 - (END + 18)
    assert stub[18] == 0xCC
    key = [(o, n, a) for o, n, a in relocations(elf, ".text.user") if o == END + 2]
    assert [(a, e.klp_placeholders[n]) for _, n, a in key] == [(-5, KlpSymbol("the_key", "ext4"))]
    assert elf.get_section_by_name("__jump_table").data_size == 0
    user = elf.get_section_by_name(".symtab").get_symbol_by_name(e.editions["user"])[0]
    assert user["st_size"] == len(code)  # livepatch's stack check sees a task in the test as in the function
    # The test unwinds like the site (the state after push), and the terminator moved to the end.
    orc = elf.get_section_by_name(".orc_unwind").data()
    ips = [a for _, _, a in relocations(elf, ".orc_unwind_ip")]
    assert list(zip(ips, [orc[i:i + 6] for i in range(0, len(orc), 6)], strict=True)) == [
        (0, b"start0"), (1, b"pushed"), (len(code), b"endend"), (END, b"pushed")]
    assert [(s.table, s.function, s.key) for s in e.key_sites] == [("__jump_table", "user", "the_key")]


def test_a_tracepoint_site_always_takes_its_branch(tmp_path: Path):
    """trace_x(): its enabled code reads the probes and calls none when there are none, so a
    2-byte site becomes ``jmp yes``; the static call on the module's key is left out of the table
    (the call goes through the trampoline), the one on a vmlinux key stays."""
    e = extract(tmp_path, source(NOP2, "__tracepoint_x", 8 | 2, static_call=True))
    elf = ELFFile(io.BytesIO(e.object))
    code = code_of(elf)
    yes = YES - 3
    assert len(code) == END - 3 and code[SITE:SITE + 2] == bytes([0xEB, yes - SITE - 2])
    assert elf.get_section_by_name("__jump_table").data_size == 0
    sites = relocations(elf, ".static_call_sites")
    assert elf.get_section_by_name(".static_call_sites").data_size == 8 and len(sites) == 2
    assert e.klp_placeholders[sites[1][1]] == KlpSymbol("__SCK__vmlinux_call")
    assert KlpSymbol("__SCT__tp_func_x", "ext4") in e.klp_placeholders.values()  # the call's trampoline
    assert not any(k.name == "__SCK__tp_func_x" for k in e.klp_placeholders.values())
    assert sorted((s.table, s.key) for s in e.key_sites) == [
        (".static_call_sites", "__SCK__tp_func_x"), ("__jump_table", "__tracepoint_x")]


def test_a_short_site_on_a_plain_key_of_a_module_is_refused_naming_both(tmp_path: Path):
    with pytest.raises(BuildError, match=r"user: a jump label on static key the_key of module ext4 .* 2 bytes"):
        extract(tmp_path, source(NOP2, "the_key", 2))


def test_a_tracepoints_likely_branch_is_not_taken_for_a_tracepoint(tmp_path: Path):
    """Only the ``static_key_false()`` of trace_*() is always taken; anything else on the key is a test."""
    e = extract(tmp_path, source(NOP5, "__tracepoint_x", 8 | 1))
    assert code_of(ELFFile(io.BytesIO(e.object)))[END + 7:END + 9] == b"\x0f\x8e"


def test_vmlinux_keys_keep_their_entries(tmp_path: Path):
    def resolve(name: str, local: bool) -> KlpSymbol | None:
        return KlpSymbol(name)

    e = extract_functions(compile_kernel_like(tmp_path, "u", source(NOP2, "the_key", 2)).read_bytes(), {"user"},
                          set(), resolve)
    elf = ELFFile(io.BytesIO(e.object))
    assert elf.get_section_by_name("__jump_table").data_size == 16 and e.key_sites == []
    assert code_of(elf)[SITE:SITE + 2] == b"\x66\x90"


def test_a_test_of_the_key_is_only_appended_to_a_section_of_one_function(tmp_path: Path):
    """The test must lie within the function's own range, or livepatch's stack check would not
    see a task in it as in the function."""
    text = source(NOP5, "the_key", 2).replace(
        '"3: .size user, .-user\\n',
        '".size user, .-user\\n.globl after\\n.type after,@function\\nafter: ret\\n3: .size after, .-after\\n')
    assert "after: ret" in text
    with pytest.raises(BuildError, match="user: the jump label on static key the_key of module ext4 .* more than"):
        extract(tmp_path, text)


COLD = """
asm(".pushsection .text.user,\\"ax\\",@progbits\\n.globl user\\n.type user,@function\\nuser:\\n"
    "call helper\\n1: .byte 0x0f,0x1f,0x44,0x00,0x00\\nret\\n3: .size user, .-user\\n.popsection\\n"
    ".pushsection .text.unlikely.user,\\"ax\\",@progbits\\n.type user.cold,@function\\nuser.cold:\\n"
    "yes: mov $1,%eax\\nret\\n.size user.cold, .-user.cold\\n.popsection\\n"
    ".pushsection __jump_table,\\"aw\\"\\n.balign 8\\n.long 1b - ., yes - .\\n.quad KEY + FLAGS - .\\n.popsection\\n"
    ".pushsection .orc_unwind_ip,\\"a\\"\\n.long user - ., 3b - .\\n.popsection\\n"
    ".pushsection .orc_unwind,\\"a\\"\\n.ascii \\"start0\\"\\n.ascii \\"endend\\"\\n.popsection\\n");
"""


@pytest.mark.parametrize("key, flags, at", [("__tracepoint_x", 8 | 2, 5 + 1), ("the_key", 2, 11 + 9)])
def test_a_target_in_the_cold_part_is_reached_through_a_relocation(tmp_path: Path, key: str, flags: int, at: int):
    """gcc moves unlikely code to ``.text.unlikely.<function>``: the site's jmp (a tracepoint) or
    the test's jg (a plain key) reaches it through a relocation, as objtool's jmp did."""
    e = extract(tmp_path, COLD.replace("KEY", key).replace("FLAGS", str(flags)))
    elf = ELFFile(io.BytesIO(e.object))
    cold = [(o, a) for o, n, a in relocations(elf, ".text.user") if n == ".text.unlikely.user"]
    assert cold == [(at, -4)]
    assert elf.get_section_by_name("__jump_table").data_size == 0
