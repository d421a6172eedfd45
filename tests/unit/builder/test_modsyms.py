"""Symbols of other modules that a patched module's new code uses: tied to the patched module, and
only when the target's modules.dep makes the patched module depend on the symbol's module."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynamos.builder.klp import KlpSymbol
from dynamos.builder.modsyms import OtherModules, defined_symbols, module_name, parse_modules_dep
from dynamos.errors import BuildError
from tests.support.gcc import compile_kernel_like

MODULES_DEP = """\
kernel/drivers/md/raid10.ko: kernel/drivers/md/md-mod.ko
kernel/drivers/md/md-mod.ko:
kernel/drivers/md/dm-raid.ko.xz: kernel/drivers/md/raid456.ko kernel/drivers/md/md-mod.ko
kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko
"""

MD_MOD = {  # md_mod's symbol table: (name, global)
    "md_mod": [("md_write_end", True), ("twin", False), ("twin", True), ("helper", False), ("helper", False),
               ("md_private", True)],
    "jbd2": [("md_private", True)],
}


def others(depends: str | None = MODULES_DEP) -> OtherModules:
    return OtherModules({"md_write_end": "md_mod", "printk": "vmlinux", "twin": "md_mod"},
                        parse_modules_dep(depends) if depends is not None else None, MD_MOD.__getitem__, "6.1-test")


def test_module_names_and_modules_dep() -> None:
    assert module_name("kernel/drivers/md/md-mod.ko") == "md_mod"
    assert module_name("kernel/drivers/md/dm-raid.ko.xz") == "dm_raid"
    deps = parse_modules_dep(MODULES_DEP)
    assert deps["raid10"] == {"md_mod"} and deps["md_mod"] == set()
    assert deps["dm_raid"] == {"raid456", "md_mod"}


def test_an_export_of_a_module_the_patched_module_depends_on_is_tied_to_the_patched_module() -> None:
    sym = others().symbol("drivers/md/raid10.c", "raid10", "md_write_end", "md_mod")
    assert sym == KlpSymbol("md_write_end", "md_mod", 0, patched="raid10")
    assert sym.klp_name == ".klp.sym.md_mod.md_write_end,0" and sym.rela_object == "raid10"


def test_a_module_the_patched_module_does_not_depend_on_is_refused_naming_both() -> None:
    with pytest.raises(BuildError, match=r"module ext4 uses md_write_end of module md_mod, but ext4 does not "
                                         r"depend on md_mod \(modules.dep of 6.1-test\)"):
        others().symbol("fs/ext4/inode.c", "ext4", "md_write_end", "md_mod")


def test_vmlinux_code_calling_into_a_module_is_refused() -> None:
    with pytest.raises(BuildError, match="changed vmlinux code would use md_write_end of module md_mod"):
        others().symbol("kernel/x.c", "vmlinux", "md_write_end", "md_mod")


def test_without_modules_dep_the_dependency_cannot_be_checked() -> None:
    with pytest.raises(BuildError, match="no modules.dep of kernel 6.1-test"):
        others(None).symbol("drivers/md/raid10.c", "raid10", "md_write_end", "md_mod")


def test_the_global_among_namesakes_gets_its_position() -> None:
    assert others().symbol("drivers/md/raid10.c", "raid10", "twin", "md_mod").sympos == 2
    with pytest.raises(BuildError, match="2 symbols of module md_mod are named helper"):
        others().symbol("drivers/md/raid10.c", "raid10", "helper", "md_mod")
    with pytest.raises(BuildError, match="module md_mod of kernel 6.1-test defines no gone"):
        others().symbol("drivers/md/raid10.c", "raid10", "gone", "md_mod")


def test_an_unexported_global_is_found_in_the_modules_depended_on() -> None:
    assert others().defined_by_dependency("drivers/md/raid10.c", "raid10", "md_private") == \
        KlpSymbol("md_private", "md_mod", 0, patched="raid10")
    assert others().defined_by_dependency("drivers/md/raid10.c", "raid10", "nowhere") is None
    assert others().defined_by_dependency("kernel/x.c", "vmlinux", "md_private") is None
    two = others(MODULES_DEP + "kernel/x/both.ko: kernel/drivers/md/md-mod.ko kernel/fs/jbd2/jbd2.ko\n")
    with pytest.raises(BuildError, match="md_private is defined by modules jbd2, md_mod"):
        two.defined_by_dependency("x/both.c", "both", "md_private")


def test_defined_symbols_of_a_compiled_module(tmp_path: Path) -> None:
    ko = compile_kernel_like(tmp_path, "m", "static int twin; int md_write_end(void) { return twin++; }\n"
                                            "extern int printk(const char *, ...);\n"
                                            "int caller(void) { return printk(\"x\"); }\n").read_bytes()
    names = defined_symbols(ko, "m.ko")
    assert ("md_write_end", True) in names and ("twin", False) in names
    assert all(name not in ("printk", "m.c") for name, _ in names)
