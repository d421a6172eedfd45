"""Alternatives and paravirt sites in real units of the target's source (kbuild: compiles them).

The unit tests of test_objdiff/test_extract use a look-alike of static_cpu_has(); these compile the
kernel's own, in fs/proc/cmdline.c (given a feature test) and arch/x86/kernel/process_64.c (full of
them, and of paravirt sites), diff the objects and cut the changed functions out as the builder does.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from dynamos.builder.extract import Extraction, extract_functions
from dynamos.builder.klp import KlpSymbol, exported_symbols
from dynamos.builder.linemap import stabilise_lines
from dynamos.builder.objdiff import DiffResult, ObjectInfo, diff_objects, read_object
from dynamos.builder.units import compile_original, compile_unit
from dynamos.target import TargetKernel
from dynamos.target.source import KernelSource, prepare_source


@pytest.fixture(scope="module")
def source(target: TargetKernel) -> KernelSource:
    return prepare_source(target)


def build(source: KernelSource, target: TargetKernel, tmp_path: Path, rel: str, old: str, new: str
          ) -> tuple[DiffResult, ObjectInfo, Extraction]:
    """Compile ``rel`` as shipped and with ``old`` replaced by ``new``; diff; extract what changed."""
    text = (source.tree / rel).read_text()
    assert old in text, old
    patched = stabilise_lines(text, text.replace(old, new, 1))
    original = compile_original(source, rel, tmp_path / "original.o").object_path
    changed = compile_unit(source, rel, tmp_path / "patched.o", text=patched.encode()).object_path
    diff = diff_objects(read_object(original), read_object(changed))
    exported = exported_symbols(target.headers_dir / "Module.symvers")
    extraction = extract_functions(changed.read_bytes(), {c.name for c in diff.changed + diff.new}, set(),
                                   lambda name, local: None if name in exported else KlpSymbol(name))
    return diff, read_object(changed), extraction


def relocations(obj: bytes, section: str) -> list[tuple[str, int]]:
    """(symbol, or section for a section symbol; addend) of each relocation of ``section``."""
    elf = ELFFile(io.BytesIO(obj))
    symtab, sections = elf.get_section_by_name(".symtab"), list(elf.iter_sections())
    rela = elf.get_section_by_name(f".rela{section}")
    out = []
    for r in rela.iter_relocations() if rela is not None else ():
        sym = symtab.get_symbol(r["r_info_sym"])
        out.append((sym.name or sections[sym["st_shndx"]].name, r["r_addend"]))
    return out


def test_static_cpu_has_in_a_changed_function(source: KernelSource, target: TargetKernel, tmp_path: Path) -> None:
    diff, _, extraction = build(source, target, tmp_path, "fs/proc/cmdline.c", "\tseq_puts(m, saved_command_line);",
                                "\tif (static_cpu_has(X86_FEATURE_HYPERVISOR))\n\t\tseq_puts(m, \"guest \");\n"
                                "\tseq_puts(m, saved_command_line);")
    assert [c.name for c in diff.changed] == ["cmdline_proc_show"] and not diff.refused
    assert [(s.section, s.function) for s in diff.special] == [(".altinstructions", "cmdline_proc_show")]
    text = ".text.cmdline_proc_show"
    obj = extraction.object
    size = ELFFile(io.BytesIO(obj)).get_section_by_name(text)["sh_size"]
    # Each entry: the site in the update's copy of the function, and its replacement.
    entries = relocations(obj, ".altinstructions")
    assert entries and [name for name, _ in entries] == [text, ".altinstr_replacement"] * (len(entries) // 2)
    assert all(0 <= addend < size for name, addend in entries if name == text)
    # The run-time test reads the feature bit and jumps back into the copy; so does the replacement.
    aux = relocations(obj, ".altinstr_aux")
    assert {name for name, _ in aux} == {"boot_cpu_data", text}
    assert all(0 <= addend + 4 <= size for name, addend in aux if name == text)
    assert {name for name, _ in relocations(obj, ".altinstr_replacement")} <= {text}
    assert extraction.klp_placeholders.keys() == {KlpSymbol("saved_command_line").placeholder}


def test_alternatives_and_paravirt_sites_of_a_busy_unit(source: KernelSource, target: TargetKernel,
                                                       tmp_path: Path) -> None:
    """A static_cpu_has() added early in process_64.c moves every later function's alternatives:
    those functions are unchanged (__show_regs was refused for it). The changed function's paravirt
    sites (local_irq_save) travel with it."""
    old = "unsigned long x86_gsbase_read_cpu_inactive(void)\n{\n\tunsigned long gsbase;\n\n\tif (boot_cpu_has("
    diff, patched, extraction = build(source, target, tmp_path, "arch/x86/kernel/process_64.c", old,
                                      old.replace("boot_cpu_has(", "static_cpu_has("))
    changed = {c.name for c in diff.changed}
    assert "x86_gsbase_read_cpu_inactive" in changed and not diff.refused, diff.refused
    moved = {e.function for e in patched.tables[".altinstructions"]} - changed
    assert {"__show_regs", "__switch_to"} <= moved and moved <= set(diff.unchanged)
    para = relocations(extraction.object, ".parainstructions")
    assert {name for name, _ in para} <= {f".text.{name}" for name in changed}
    assert (".parainstructions", "x86_gsbase_read_cpu_inactive") in {(s.section, s.function) for s in diff.special}
    assert len(para) == sum(s.entries for s in diff.special if s.section == ".parainstructions")
