"""Cutting changed functions out of a compiled unit (objects compiled here with kernel-like flags)."""

from __future__ import annotations

import dataclasses
import io
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from dynamos.builder.elf import sections
from dynamos.builder.elf.sections import SECTION_RULES, Carry, Handling
from dynamos.builder.extract import extract_functions
from dynamos.builder.klp import KlpSymbol
from dynamos.errors import BuildError
from tests.support.gcc import compile_kernel_like
from tests.support.kernel_asm import STATIC_CPU_HAS

SOURCE = """
static int counter;
static const char *msgs[] = {"a", "b"};
int exported_fn(int);
int internal_global;
static int helper(int x) { return x * 3 + counter; }
static int __attribute__((noinline)) helper2(int x) { counter++; return x + 1; }
int show(int v) { return helper(v) + helper2(v) + exported_fn(v) + msgs[v][0] + internal_global; }
int other(void) { return helper2(2); }
"""


def compile_c(tmp_path: Path, text: str) -> bytes:
    return compile_kernel_like(tmp_path, "u", text).read_bytes()


def resolve(name: str, local: bool) -> KlpSymbol | None:
    if name in ("exported_fn", "__fentry__", "__x86_return_thunk"):  # the kernel exports these
        return None
    return KlpSymbol(name, "vmlinux", 2 if local else 0)


def test_only_the_changed_function_and_its_strings_are_kept(tmp_path: Path):
    e = extract_functions(compile_c(tmp_path, SOURCE), {"show"}, set(), resolve)
    elf = ELFFile(io.BytesIO(e.object))
    sizes = {s.name: s["sh_size"] for s in elf.iter_sections()}
    assert sizes[".text.show"] > 0
    assert sizes[".text.helper2"] == 0 and sizes[".text.other"] == 0 and sizes[".bss.counter"] == 0
    assert e.editions == {"show": "dynamos_edition__show"}
    # File-local state and the non-exported global are the kernel's own, reached by livepatch.
    assert e.klp_placeholders == {
        "dynamos_klp__vmlinux__counter__2": KlpSymbol("counter", "vmlinux", 2),
        "dynamos_klp__vmlinux__helper2__2": KlpSymbol("helper2", "vmlinux", 2),
        "dynamos_klp__vmlinux__internal_global__0": KlpSymbol("internal_global", "vmlinux", 0),
        "dynamos_klp__vmlinux__msgs__2": KlpSymbol("msgs", "vmlinux", 2),
    }
    symtab = elf.get_section_by_name(".symtab")
    names = {s.name: s for s in symtab.iter_symbols()}
    assert names["dynamos_edition__show"]["st_info"]["bind"] == "STB_GLOBAL"
    assert names["exported_fn"]["st_shndx"] == "SHN_UNDEF"  # left to the module loader
    assert "other" not in names and "helper2" not in names  # nothing left to look up
    first_global = symtab["sh_info"]
    assert all(s["st_info"]["bind"] == "STB_LOCAL" for s in list(symtab.iter_symbols())[:first_global])
    # The ftrace site table keeps exactly the kept function's entry.
    mcount = elf.get_section_by_name(".rela__mcount_loc")
    show_index = next(i for i, sec in enumerate(elf.iter_sections()) if sec.name == ".text.show")
    assert [symtab.get_symbol(r["r_info_sym"])["st_shndx"] for r in mcount.iter_relocations()] == [show_index]


def test_what_travels_is_looked_up_in_the_one_section_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Extraction has no table of its own: change a row's carry and extraction follows."""
    unit = compile_c(tmp_path, SOURCE)

    def mcount_size() -> int:
        elf = ELFFile(io.BytesIO(extract_functions(unit, {"show"}, set(), resolve).object))
        return elf.get_section_by_name("__mcount_loc")["sh_size"]

    assert mcount_size() == 8  # one entry: the kept function's ftrace site
    rows = tuple(dataclasses.replace(r, carry=Carry.DROP) if r.pattern == "__mcount_loc" else r
                 for r in sections.SECTION_RULES)
    monkeypatch.setattr(sections, "SECTION_RULES", rows)
    assert mcount_size() == 0


def test_extracted_object_links(tmp_path: Path):
    e = extract_functions(compile_c(tmp_path, SOURCE), {"show", "other"}, set(), resolve)
    (tmp_path / "x.o").write_bytes(e.object)
    subprocess.run(["ld", "-r", "-o", str(tmp_path / "linked.o"), str(tmp_path / "x.o")], check=True)
    assert set(e.editions) == {"show", "other"}


def test_new_data_is_carried(tmp_path: Path):
    text = SOURCE.replace("int show(int v) {", "static int calls;\nint show(int v) { calls++;")
    e = extract_functions(compile_c(tmp_path, text), {"show"}, {"calls"}, resolve)
    elf = ELFFile(io.BytesIO(e.object))
    assert elf.get_section_by_name(".bss.calls")["sh_size"] == 4
    assert not any("calls" in p for p in e.klp_placeholders)


def test_missing_function_is_an_error(tmp_path: Path):
    with pytest.raises(BuildError, match="no section for function.*nosuch"):
        extract_functions(compile_c(tmp_path, SOURCE), {"nosuch"}, set(), resolve)


def test_local_symbol_must_resolve(tmp_path: Path):
    with pytest.raises(BuildError, match="file-local symbol .* must be resolved"):
        extract_functions(compile_c(tmp_path, SOURCE), {"show"}, set(), lambda name, local: None)


def test_undefined_symbols_only_left_behind_code_uses_are_dropped(tmp_path: Path):
    text = SOURCE + "int unused_extern(void);\nint third(void) { return unused_extern(); }\n"
    e = extract_functions(compile_c(tmp_path, text), {"show"}, set(), resolve)
    names = {s.name for s in ELFFile(io.BytesIO(e.object)).get_section_by_name(".symtab").iter_symbols()}
    assert "unused_extern" not in names and "exported_fn" in names


# Two functions with an alternative each, whose replacement calls a different function.
ALTERNATIVES = """
void show_target(void);
void other_target(void);
#define ALT(repl) asm volatile("661:\\n\\t.skip 5, 0x90\\n662:\\n" \\
    ".pushsection .altinstructions,\\"a\\"\\n .long 661b - .\\n .long 663f - .\\n .word 0\\n" \\
    " .byte 662b-661b\\n .byte 664f-663f\\n.popsection\\n" \\
    ".pushsection .altinstr_replacement,\\"ax\\"\\n663:\\n\\t" repl "\\n664:\\n.popsection\\n")
int show(int v) { ALT("call show_target"); return v; }
int other(int v) { ALT("call other_target"); return v + 1; }
"""


def test_replacement_code_of_left_behind_alternatives_asks_for_nothing(tmp_path: Path):
    e = extract_functions(compile_c(tmp_path, ALTERNATIVES), {"show"}, set(), resolve)
    assert [k.name for k in e.klp_placeholders.values()] == ["show_target"]
    elf = ELFFile(io.BytesIO(e.object))
    assert len(list(elf.get_section_by_name(".rela.altinstr_replacement").iter_relocations())) == 1
    assert elf.get_section_by_name(".altinstructions")["sh_size"] == 12


def test_replacement_code_using_a_symbol_of_a_module_is_refused(tmp_path: Path):
    """apply_alternatives copies a replacement into the update's code as it loads, before livepatch
    resolves a module's symbols: the copy would keep an unrelocated call."""
    def in_module(name: str, local: bool) -> KlpSymbol | None:
        return KlpSymbol(name, "crc_t10dif") if name == "show_target" else resolve(name, local)

    with pytest.raises(BuildError, match="altinstr_replacement uses show_target of module crc_t10dif"):
        extract_functions(compile_c(tmp_path, ALTERNATIVES), {"show"}, set(), in_module)
    e = extract_functions(compile_c(tmp_path, ALTERNATIVES), {"other"}, set(), in_module)  # other_target: vmlinux
    assert [k.name for k in e.klp_placeholders.values()] == ["other_target"]


def test_a_module_symbol_tied_to_the_patched_module_is_refused_in_code_copied_at_load(tmp_path: Path):
    """raid10's update: md_mod's symbols are written when raid10 loads, long after the loader copied
    the update's replacement code and read its jump table (module_finalize, jump_label_module_notify):
    a replacement calling md_mod would stay unrelocated. A jump label on a key of md_mod becomes a
    test of the key (test_modkeys.py), which this object, without objtool's ORC data, cannot unwind."""
    def other_module(name: str, local: bool) -> KlpSymbol | None:
        if name in ("show_target", "the_key"):
            return KlpSymbol(name, "md_mod", patched="raid10")
        return resolve(name, local)

    with pytest.raises(BuildError, match="altinstr_replacement uses show_target of module md_mod"):
        extract_functions(compile_c(tmp_path, ALTERNATIVES), {"show"}, set(), other_module)
    with pytest.raises(BuildError, match="static key the_key of module md_mod"):
        extract_functions(compile_c(tmp_path / "jl", JUMP_LABEL), {"user"}, set(), other_module)


def test_plain_code_may_use_a_module_symbol_tied_to_the_patched_module(tmp_path: Path):
    """A call or data access in the function itself is relocated when raid10 loads, before any of it runs."""
    def other_module(name: str, local: bool) -> KlpSymbol | None:
        return KlpSymbol(name, "md_mod", patched="raid10") if name == "exported_fn" else resolve(name, local)

    e = extract_functions(compile_c(tmp_path, SOURCE), {"show"}, set(), other_module)
    assert KlpSymbol("exported_fn", "md_mod", patched="raid10") in e.klp_placeholders.values()


CPU_FEATURES = STATIC_CPU_HAS + """
extern int printk(const char *fmt, ...);
int first(int x) { if (static_cpu_has(4 * 32 + 31)) return printk("first %d", x); return x; }
int second(int x) { if (static_cpu_has(1 * 32 + 5)) return printk("second %d", x); return x + 1; }
"""


def relocations(elf: ELFFile, name: str) -> list[tuple[str, int]]:
    """(symbol or section, addend) of each relocation of section ``name``."""
    symtab, sections_ = elf.get_section_by_name(".symtab"), list(elf.iter_sections())
    out = []
    for r in elf.get_section_by_name(f".rela{name}").iter_relocations():
        sym = symtab.get_symbol(r["r_info_sym"])
        out.append((sym.name or sections_[sym["st_shndx"]].name, r["r_addend"]))
    return out


def test_static_cpu_has_travels_with_the_changed_function(tmp_path: Path):
    """The loader applies the update's alternatives to the update's copy (module_finalize): the kept
    function's entries, its replacement and its run-time test travel; that test jumps back into the
    copy, and nothing of second()'s is linked or asked for."""
    def exported(name: str, local: bool) -> KlpSymbol | None:
        return None if name in ("printk", "boot_cpu_data") else resolve(name, local)

    e = extract_functions(compile_c(tmp_path, CPU_FEATURES), {"first"}, set(), exported)
    assert e.klp_placeholders == {}
    elf = ELFFile(io.BytesIO(e.object))
    assert elf.get_section_by_name(".altinstructions")["sh_size"] == 2 * 12
    entries = relocations(elf, ".altinstructions")
    assert [name for name, _ in entries] == [".text.first", ".altinstr_replacement"] * 2
    assert relocations(elf, ".altinstr_replacement") == [(".text.first", 0x24)]  # jmp t_no, in first
    aux = relocations(elf, ".altinstr_aux")
    assert sorted(aux) == [(".text.first", 0xA), (".text.first", 0x24), ("boot_cpu_data", 0xE)]
    (tmp_path / "x.o").write_bytes(e.object)
    subprocess.run(["ld", "-r", "-o", str(tmp_path / "linked.o"), str(tmp_path / "x.o")], check=True)


def test_alternatives_no_kept_code_uses_are_not_carried(tmp_path: Path):
    text = CPU_FEATURES + "int third(int x) { return printk(\"third %d\", x); }\n"
    e = extract_functions(compile_c(tmp_path, text), {"third"}, set(), resolve)
    elf = ELFFile(io.BytesIO(e.object))
    for name in (".altinstructions", ".altinstr_replacement", ".altinstr_aux"):
        assert elf.get_section_by_name(name)["sh_size"] == 0, name
    assert {".altinstr_replacement", ".altinstr_aux"} <= set(e.dropped_sections)


PER_FUNCTION = [r for r in SECTION_RULES if r.handling is Handling.PER_FUNCTION]


@pytest.mark.parametrize("rule", PER_FUNCTION, ids=[r.pattern for r in PER_FUNCTION])
def test_every_table_the_diff_compares_per_function_travels_with_the_function(tmp_path: Path, rule):
    """What the diff compares per function (its entries decide whether the function changed),
    extraction carries with the function: the diff and extraction cannot disagree about a table."""
    assert rule.layout is not None and not any(c in rule.pattern for c in "*?[")
    size, at = rule.layout.entry_size, rule.layout.code_offset
    entry = (f'.pushsection {rule.pattern},\\"a\\"\\n.skip {at}\\n.quad 1b\\n.skip {size - at - 8}\\n'
             '.popsection\\n')
    text = "".join(f'int {name}(int v) {{ asm volatile("1: nop\\n{entry}"); return v + {n}; }}\n'
                   for n, name in enumerate(("kept", "left")))
    e = extract_functions(compile_c(tmp_path, text), {"kept"}, set(), resolve)
    elf = ELFFile(io.BytesIO(e.object))
    assert elf.get_section_by_name(rule.pattern)["sh_size"] == size, rule.pattern
    assert [name for name, _ in relocations(elf, rule.pattern)] == [".text.kept"]


JUMP_LABEL = """
struct static_key { int enabled; };
extern struct static_key the_key;
int printk(const char *fmt, ...);
static inline int key_on(void)
{
    asm goto("1: .byte 0x0f,0x1f,0x44,0x00,0x00\\n\\t.pushsection __jump_table, \\"aw\\"\\n\\t.balign 8\\n\\t"
             ".long 1b - ., %l[yes] - .\\n\\t.quad %c0 - .\\n\\t.popsection" : : "i"(&the_key) : : yes);
    return 0;
yes:
    return 1;
}
int user(int x) { return key_on() ? printk("on %d\\n", x) : x; }
"""


@pytest.mark.parametrize("where, refused", [("vmlinux", False), ("crc_t10dif", True)])
def test_jump_labels_on_keys_livepatch_resolves_before_the_jump_table_is_read(tmp_path: Path, where: str,
                                                                             refused: bool):
    def resolve_key(name: str, local: bool) -> KlpSymbol | None:
        return KlpSymbol(name, where) if name == "the_key" else resolve(name, local)

    if refused:  # a test of the key would need ORC data, which gcc alone does not write (test_modkeys.py)
        with pytest.raises(BuildError, match="static key the_key of module crc_t10dif .* no ORC entry"):
            extract_functions(compile_c(tmp_path, JUMP_LABEL), {"user"}, set(), resolve_key)
        return
    e = extract_functions(compile_c(tmp_path, JUMP_LABEL), {"user"}, set(), resolve_key)
    assert KlpSymbol("the_key", "vmlinux") in e.klp_placeholders.values()
    elf = ELFFile(io.BytesIO(e.object))
    assert elf.get_section_by_name("__jump_table")["sh_size"] == 16


def test_a_gcc_clone_gets_an_edition_with_a_c_name(tmp_path: Path):
    text = 'int clone(int x) __asm__("helper.constprop.0");\nint clone(int x) { return x * 7; }\n'
    e = extract_functions(compile_c(tmp_path, text), {"helper.constprop.0"}, set(), resolve)
    assert e.editions == {"helper.constprop.0": "dynamos_edition__helper_constprop_0"}
