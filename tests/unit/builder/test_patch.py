"""Which kernel symbol a name the changed code uses stands for (object and livepatch sympos)."""

from __future__ import annotations

import pytest

from dynamos.builder.klp import KlpSymbol
from dynamos.builder.modsyms import OtherModules, parse_modules_dep
from dynamos.builder.objdiff import DiffResult
from dynamos.builder.patch import UnitReport, translation_units_of
from dynamos.builder.resolution import Added, SymbolPositions, resolver, stranded
from dynamos.errors import BuildError
from dynamos.target.symtab import SymbolTable

KALLSYMS = """\
ffffffff81000000 t state_show
ffffffff81000100 T state_show
ffffffff81000200 t twin
ffffffff81000300 t twin
ffffffff81000400 T printk
ffffffff81000500 D nr_threads
"""


def sympos(path: str = "kernel/x.c", resolved: dict[str, int] | None = None, module: str = "vmlinux",
           module_symbols: list[str] | None = None) -> SymbolPositions:
    unit = UnitReport(path, DiffResult(), resolved=resolved or {}, object=module)
    return SymbolPositions(unit, SymbolTable.parse(KALLSYMS), module_symbols)


def test_a_global_with_file_local_namesakes_elsewhere_is_the_global() -> None:
    assert sympos().position("state_show", local=False) == 2


def test_a_file_local_twin_needs_the_fidelity_checks_answer() -> None:
    assert sympos(resolved={"twin": 2}).position("twin", local=True) == 2
    with pytest.raises(BuildError, match="2 kernel symbols are named twin"):
        sympos().position("twin", local=True)


def test_a_name_the_kernel_lacks_is_refused_at_build_time() -> None:
    with pytest.raises(BuildError, match="kernel/x.c: gone is used by the changed code but the kernel has no"):
        sympos().position("gone", local=False)


def test_module_twins_resolve_through_the_fidelity_check() -> None:
    names = ["metadata_show", "metadata_store", "metadata_show"]
    found = sympos("drivers/md/md.c", {"metadata_show": 1}, "md_mod", names)
    assert found.object_of("metadata_show", local=True) == "md_mod"
    assert found.position("metadata_show", local=True) == 1
    assert found.position("metadata_store", local=True) == 0  # unique in its module
    with pytest.raises(BuildError, match="2 symbols of module md_mod are named metadata_show"):
        sympos("drivers/md/md.c", {}, "md_mod", names).position("metadata_show", local=True)


def test_a_name_the_module_lacks_is_refused_at_build_time_not_when_the_module_loads() -> None:
    found = sympos("drivers/md/md.c", {}, "md_mod", ["metadata_show"])
    with pytest.raises(BuildError, match="drivers/md/md.c: gone.3 is used by the changed code but module md_mod "
                                         "has no such symbol"):
        found.position("gone.3", local=True)


def test_a_btf_id_renumbered_by_a_header_change_is_the_modules_one_named_alike() -> None:
    """BTF_ID(struct, nf_conn) is __BTF_ID__struct__nf_conn__<__COUNTER__><__LINE__>: a patched
    header with more counter uses renumbers it, and the module's has the shipped number."""
    names = ["__BTF_ID__struct__nf_conn__760189", "__BTF_ID__struct__nf_conn___init__761190"]
    resolve = resolver("net/netfilter/nf_conntrack_bpf.c", modules(),
                       sympos("net/netfilter/nf_conntrack_bpf.c", module="nf_conntrack", module_symbols=names))
    assert resolve("__BTF_ID__struct__nf_conn__768189", True) == \
        KlpSymbol("__BTF_ID__struct__nf_conn__760189", "nf_conntrack", 0)
    assert resolve("__BTF_ID__struct__nf_conn___init__769190", True) == \
        KlpSymbol("__BTF_ID__struct__nf_conn___init__761190", "nf_conntrack", 0)
    twice = sympos("x.c", module="m", module_symbols=["__BTF_ID__func__f__11", "__BTF_ID__func__f__12"])
    with pytest.raises(BuildError, match="__BTF_ID__func__f__13 is used by the changed code but module m has no"):
        resolver("x.c", modules(), twice)("__BTF_ID__func__f__13", True)


def test_exported_names_are_left_to_the_loader_and_the_rest_become_livepatch_symbols() -> None:
    resolve = resolver("kernel/x.c", modules(), sympos())
    assert resolve("printk", False) is None
    assert resolve("__x86_return_thunk", False) is None
    assert resolve("nr_threads", False) == KlpSymbol("nr_threads", "vmlinux", 0)
    assert resolve("state_show", False) == KlpSymbol("state_show", "vmlinux", 2)


def modules() -> OtherModules:
    return OtherModules({"printk": "vmlinux", "md_write_end": "md_mod"},
                        parse_modules_dep("kernel/drivers/md/raid10.ko: kernel/drivers/md/md-mod.ko\n"),
                        lambda m: [("md_write_end", True)] if m == "md_mod" else [])


def test_an_export_of_another_module_is_a_livepatch_symbol_of_the_patched_module() -> None:
    """Not left to the loader, which would refuse the update unless md_mod were loaded."""
    resolve = resolver("drivers/md/raid10.c", modules(),
                        sympos("drivers/md/raid10.c", module="raid10", module_symbols=["raid10_write_end"]))
    assert resolve("md_write_end", False) == KlpSymbol("md_write_end", "md_mod", 0, patched="raid10")
    assert resolve("printk", False) is None
    assert resolve("nr_threads", False) == KlpSymbol("nr_threads", "vmlinux", 0)
    assert resolve("raid10_write_end", False) == KlpSymbol("raid10_write_end", "raid10", 0)


def test_vmlinux_code_using_an_export_of_a_module_is_refused() -> None:
    with pytest.raises(BuildError, match="the changed vmlinux code would use md_write_end of module md_mod"):
        resolver("kernel/x.c", modules(), sympos())("md_write_end", False)


ADDED = {"dev_reap": Added("drivers/base/core.c", "vmlinux", "dynamos_edition1__dev_reap"),
         "raid_helper": Added("drivers/md/raid1.c", "raid1", "dynamos_edition2__raid_helper")}


def test_a_function_another_unit_of_the_update_adds_is_linked_inside_the_update() -> None:
    """Called by its edition's name (extraction renames what it cuts out), recorded as used."""
    used: set[str] = set()
    resolve = resolver("drivers/cxl/core/hdm.c", modules(),
                       sympos("drivers/cxl/core/hdm.c", module="cxl_core", module_symbols=["cxl_decoder_reset"]),
                       ADDED, used)
    assert resolve("dev_reap", False) == "dynamos_edition1__dev_reap"
    assert used == {"dev_reap"}
    assert resolve("printk", False) is None
    with pytest.raises(BuildError, match="kernel/x.c: dev_gone is used by the changed code but the kernel has no"):
        resolver("kernel/x.c", modules(), sympos(), ADDED, set())("dev_gone", False)


def test_a_function_the_update_adds_to_another_module_is_refused() -> None:
    with pytest.raises(BuildError, match=r"kernel/x.c: its changed code calls raid_helper, which this update adds "
                                         r"to module raid1 \(drivers/md/raid1.c\): vmlinux could run it while "
                                         r"raid1 is not loaded"):
        resolver("kernel/x.c", modules(), sympos(), ADDED, set())("raid_helper", False)


def test_a_caller_whose_helpers_file_is_not_carried_is_left_out_too() -> None:
    """hdm.c calls what core.c adds; core.c is not carried, so hdm.c would not link; and a.c,
    calling what hdm.c adds, goes with it."""
    added = {**ADDED, "hdm_new": Added("drivers/cxl/core/hdm.c", "vmlinux", "dynamos_edition3__hdm_new")}
    uses = {"drivers/cxl/core/hdm.c": {"dev_reap"}, "a.c": {"hdm_new"}, "b.c": {"dev_reap"}}
    assert stranded(uses, added, {"drivers/cxl/core/hdm.c", "a.c"}) == {
        "drivers/cxl/core/hdm.c": "drivers/cxl/core/hdm.c: calls dev_reap, which drivers/base/core.c adds, "
                                  "and that file is not carried",
        "a.c": "a.c: calls hdm_new, which drivers/cxl/core/hdm.c adds, and that file is not carried"}
    assert stranded(uses, added, {"drivers/base/core.c", "drivers/cxl/core/hdm.c", "a.c"}) == {}


def write_tree(root, files: dict[str, str]) -> None:
    """A made-up source tree: path -> content."""
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_a_file_included_by_others_is_compiled_through_them(tmp_path) -> None:
    write_tree(tmp_path, {
        "kernel/sched/debug.c": "int x;\n",
        "kernel/sched/build_utility.c": '#include "sched.h"\n# include "debug.c"\n',
        "kernel/sched/build_policy.c": '#include "idle.c"\n/* #include "debug.c" in a comment */\n',
        "kernel/sched/core.c": "int y;\n"})
    assert translation_units_of(tmp_path, "kernel/sched/debug.c") == ["kernel/sched/build_utility.c"]
    assert translation_units_of(tmp_path, "kernel/sched/core.c") == ["kernel/sched/core.c"]


def test_a_local_header_reaches_the_units_of_every_file_including_it(tmp_path) -> None:
    write_tree(tmp_path, {
        "fs/proc/fd.h": "static inline int f(void) { return 1; }\n",
        "fs/proc/fd.c": '#include <linux/fs.h>\n#include "fd.h"\n',
        "fs/proc/base.c": '#include "internal.h"\n',
        "fs/proc/internal.h": '#include "fd.h"\n',
        "fs/other.c": '#include "proc/fd.h"\n',
        "fs/unrelated.c": '#include "fd.h"  /* fs/fd.h, its own */\n',
        "fs/fd.h": "\n"})
    assert translation_units_of(tmp_path, "fs/proc/fd.h") == ["fs/other.c", "fs/proc/base.c", "fs/proc/fd.c"]
    # through an -I path, "fpga/fd.h" and "../fpga/fd.h" can be no fs/proc/fd.h
    write_tree(tmp_path, {"drivers/y.c": '#include "fpga/fd.h"\n#include "../fpga/fd.h"\n'})
    assert translation_units_of(tmp_path, "fs/proc/fd.h") == ["fs/other.c", "fs/proc/base.c", "fs/proc/fd.c"]
    write_tree(tmp_path, {"drivers/x.c": '#include "fd.h"\n'})  # no drivers/fd.h: an -I path
    with pytest.raises(BuildError, match='drivers/x.c includes "fd.h" through the compiler\'s include path'):
        translation_units_of(tmp_path, "fs/proc/fd.h")
