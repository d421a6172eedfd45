"""The ELF rewriter and livepatch relocation conversion, on objects compiled here by gcc."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from dynamos.builder.elf import RelocatableElf
from dynamos.builder.klp import (
    SHF_RELA_LIVEPATCH,
    SHN_LIVEPATCH,
    KlpSymbol,
    convert_to_klp,
    export_namespaces,
    exported_symbols,
    exporters,
    klp_symbols_needed,
    namespaces_used,
)
from dynamos.errors import BuildError

C_SOURCE = """
extern int hidden_counter;          /* not exported: must become a livepatch symbol */
extern int exported_helper(int);    /* exported: the module loader links it */
extern int module_private(void);    /* lives in a module */
int edition(int x) { return exported_helper(x) + hidden_counter + module_private(); }
int other(void) { return hidden_counter; }
"""


@pytest.fixture()
def obj(tmp_path: Path) -> bytes:
    (tmp_path / "e.c").write_text(C_SOURCE)
    subprocess.run(["gcc", "-O2", "-c", "-fno-pic", "-g", "-o", str(tmp_path / "e.o"), str(tmp_path / "e.c")],
                   check=True)
    return (tmp_path / "e.o").read_bytes()


def _elf(data: bytes) -> ELFFile:
    return ELFFile(io.BytesIO(data))


def test_rewriting_unchanged_object_keeps_every_section(obj: bytes):
    again = RelocatableElf.parse(obj).to_bytes()
    a, b = _elf(obj), _elf(again)
    assert [s.name for s in a.iter_sections()] == [s.name for s in b.iter_sections()]
    for sa, sb in zip(a.iter_sections(), b.iter_sections(), strict=True):
        assert sa.data() == sb.data() or sa.name in (".strtab", ".shstrtab", ".symtab"), sa.name
    names = lambda e: sorted(s.name for s in e.get_section_by_name(".symtab").iter_symbols())  # noqa: E731
    assert names(a) == names(b)


def test_needed_symbols_exclude_exports_and_honour_declarations(obj: bytes):
    needed = klp_symbols_needed(obj, {"exported_helper"}, {"module_private": KlpSymbol("module_private", "ext4", 2)})
    assert sorted(needed, key=lambda s: s.name) == [
        KlpSymbol("hidden_counter"), KlpSymbol("module_private", "ext4", 2)]


def test_conversion_moves_relocations_into_klp_sections(obj: bytes):
    out = convert_to_klp(obj, [KlpSymbol("hidden_counter"), KlpSymbol("module_private", "ext4", 2)])
    elf = _elf(out)
    symtab = elf.get_section_by_name(".symtab")
    syms = {s.name: s for s in symtab.iter_symbols()}
    assert syms[".klp.sym.vmlinux.hidden_counter,0"]["st_shndx"] == SHN_LIVEPATCH
    assert syms[".klp.sym.ext4.module_private,2"]["st_shndx"] == SHN_LIVEPATCH
    assert syms["exported_helper"]["st_shndx"] == "SHN_UNDEF"

    def targets(section):
        return sorted(symtab.get_symbol(r["r_info_sym"]).name for r in section.iter_relocations())

    vmlinux = elf.get_section_by_name(".klp.rela.vmlinux..text")
    ext4 = elf.get_section_by_name(".klp.rela.ext4..text")
    assert vmlinux["sh_flags"] & SHF_RELA_LIVEPATCH and ext4["sh_flags"] & SHF_RELA_LIVEPATCH
    assert elf.get_section(vmlinux["sh_info"]).name == ".text"
    assert set(targets(vmlinux)) == {".klp.sym.vmlinux.hidden_counter,0"} and len(targets(vmlinux)) == 2
    assert targets(ext4) == [".klp.sym.ext4.module_private,2"]
    # The loader's own relocations no longer mention livepatch symbols, but keep the exported one.
    normal = targets(elf.get_section_by_name(".rela.text"))
    assert "exported_helper" in normal and not any(n.startswith(".klp.sym") for n in normal)
    # Debug info may not keep relocations against symbols the loader will not resolve.
    for section in elf.iter_sections():
        if section.name.startswith(".rela.debug"):
            assert not any(t.startswith(".klp.sym") for t in targets(section))


def test_converting_nothing_returns_the_module_unchanged(obj: bytes):
    assert convert_to_klp(obj, []) is obj


def test_symbol_not_in_module_is_an_error(obj: bytes):
    with pytest.raises(BuildError, match="not referenced by the module: nope"):
        convert_to_klp(obj, [KlpSymbol("nope")])


def test_not_an_elf_object():
    with pytest.raises(BuildError, match="not an ELF file"):
        RelocatableElf.parse(b"hello", "x.ko")


def test_exported_symbols_from_symvers(tmp_path: Path):
    (tmp_path / "Module.symvers").write_text("0x1\tprintk\tvmlinux\tEXPORT_SYMBOL\t\n"
                                             "0x2\text4_foo\tfs/ext4/ext4\tEXPORT_SYMBOL_GPL\t\n")
    assert exported_symbols(tmp_path / "Module.symvers") == {"printk", "ext4_foo"}


def test_exporters_name_the_module_by_its_kernel_name(tmp_path: Path):
    (tmp_path / "Module.symvers").write_text("0x1\tprintk\tvmlinux\tEXPORT_SYMBOL\t\n"
                                             "0x2\tmd_write_end\tdrivers/md/md-mod\tEXPORT_SYMBOL\t\n")
    assert exporters(tmp_path / "Module.symvers") == {"printk": "vmlinux", "md_write_end": "md_mod"}


def test_a_symbol_of_another_module_is_relocated_with_the_patched_module(obj: bytes):
    """raid10's new code calling md_mod's md_write_end: livepatch writes the relocation when raid10
    loads (after md_mod, which it depends on), so it goes in raid10's section, naming md_mod's symbol."""
    sym = KlpSymbol("module_private", "md_mod", 0, patched="raid10")
    assert sym.placeholder != KlpSymbol("module_private", "md_mod").placeholder
    out = convert_to_klp(obj, [KlpSymbol("hidden_counter"), sym])
    elf = _elf(out)
    symtab = elf.get_section_by_name(".symtab")
    rela = elf.get_section_by_name(".klp.rela.raid10..text")
    assert rela is not None and rela["sh_flags"] & SHF_RELA_LIVEPATCH
    assert elf.get_section_by_name(".klp.rela.md_mod..text") is None
    assert [symtab.get_symbol(r["r_info_sym"]).name for r in rela.iter_relocations()] == \
        [".klp.sym.md_mod.module_private,0"]
    vmlinux = elf.get_section_by_name(".klp.rela.vmlinux..text")
    assert {symtab.get_symbol(r["r_info_sym"]).name for r in vmlinux.iter_relocations()} == \
        {".klp.sym.vmlinux.hidden_counter,0"}


def test_a_vmlinux_symbol_cannot_be_tied_to_a_module(obj: bytes):
    # klp_resolve_symbols refuses a vmlinux symbol in a module's relocation section.
    with pytest.raises(BuildError, match="of vmlinux cannot be tied to module raid10"):
        convert_to_klp(obj, [KlpSymbol("hidden_counter", patched="raid10")])


def test_namespaces_of_the_exports_an_object_leaves_to_the_loader(obj: bytes, tmp_path: Path):
    """An export in a symbol namespace (Module.symvers' fifth column) needs MODULE_IMPORT_NS in
    the module that calls it; plain exports and names the object does not use need nothing."""
    symvers = tmp_path / "Module.symvers"
    symvers.write_text("0x1\texported_helper\tdrivers/cxl/core/cxl_core\tEXPORT_SYMBOL_NS_GPL\tCXL\n"
                       "0x2\tmodule_private\tvmlinux\tEXPORT_SYMBOL\t\n"
                       "0x3\tunused_one\tvmlinux\tEXPORT_SYMBOL_NS\tIOMMUFD\n"
                       "0x4\tshort_line\tvmlinux\tEXPORT_SYMBOL\n")
    namespaces = export_namespaces(symvers)
    assert namespaces == {"exported_helper": "CXL", "unused_one": "IOMMUFD"}
    assert namespaces_used([RelocatableElf.parse(obj)], namespaces) == ["CXL"]
    assert namespaces_used([RelocatableElf.parse(obj)], {"unused_one": "IOMMUFD"}) == []
