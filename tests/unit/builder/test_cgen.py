"""C generation: the livepatch glue's text structure, and one real compile against the target's headers."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from dynamos.builder.cgen import c_string, generate_kbuild, generate_livepatch_source, klp_object_name
from dynamos.builder.kbuild import read_modinfo
from dynamos.update.model import FunctionSpec, UpdateSource

TRICKY_DESCRIPTION = 'Say "hi" \\ to C:\\path\nsecond line\ttab ??= trigraph, caf\u00e9 \x01'


def make_source(
    *functions: FunctionSpec,
    name: str = "net-fix",
    description: str = "Fix things",
    replace: bool = False,
    directory: Path = Path("/src/net-fix"),
) -> UpdateSource:
    return UpdateSource(
        directory=directory,
        name=name,
        description=description,
        functions=functions,
        c_files=(directory / "edit.c",),
        replace=replace,
    )


def func_array(text: str, obj: str) -> str:
    """The body of the klp_func array generated for ``obj``."""
    match = re.search(rf"static struct klp_func (\w+_{obj})\[\] = \{{\n(.*?)\n\}};", text, re.S)
    assert match, f"no klp_func array for {obj} in:\n{text}"
    return match.group(2)


def test_functions_are_grouped_per_patched_object() -> None:
    text = generate_livepatch_source(
        make_source(
            FunctionSpec("cmdline_proc_show", "cmdline_v2"),
            FunctionSpec("ext4_sync_fs", "ext4_sync_v2", object="ext4"),
            FunctionSpec("meminfo_proc_show", "meminfo_v2"),
            FunctionSpec("nft_do_chain", "chain_v2", object="nf-tables"),
        )
    )
    vmlinux = func_array(text, "vmlinux")
    assert '"cmdline_proc_show"' in vmlinux and '"meminfo_proc_show"' in vmlinux
    assert "ext4_sync_fs" not in vmlinux
    assert '.old_name = "ext4_sync_fs"' in func_array(text, "ext4")
    assert ".new_func = (void *)chain_v2" in func_array(text, "nf_tables")

    objects = re.search(r"static struct klp_object dynamos_objects\[\] = \{\n(.*?)\n\};", text, re.S)
    assert objects
    names = re.findall(r"\.name = (NULL|\"[^\"]*\")", objects.group(1))
    assert names == ["NULL", '"ext4"', '"nf_tables"']  # first-seen order, '-' as the kernel spells it
    assert objects.group(1).rstrip().endswith("{ }")


def test_editions_are_declared_once_and_cast_for_new_func() -> None:
    text = generate_livepatch_source(
        make_source(
            FunctionSpec("a_show", "shared_v2"),
            FunctionSpec("b_show", "shared_v2"),
        )
    )
    assert text.count("extern void shared_v2(void);") == 1
    assert text.count(".new_func = (void *)shared_v2,") == 2


def test_sympos_only_where_given() -> None:
    text = generate_livepatch_source(
        make_source(
            FunctionSpec("dup_name", "dup_v2", sympos=2),
            FunctionSpec("unique_name", "unique_v2"),
        )
    )
    body = func_array(text, "vmlinux")
    dup, unique = body.split("},\n", 1)
    assert ".old_sympos = 2," in dup
    assert "old_sympos" not in unique


@pytest.mark.parametrize("replace", [True, False])
def test_replace_sets_atomic_replace(replace: bool) -> None:
    text = generate_livepatch_source(make_source(FunctionSpec("f", "f_v2"), replace=replace))
    patch = re.search(r"static struct klp_patch dynamos_patch = \{\n(.*?)\n\};", text, re.S)
    assert patch
    assert ("\t.replace = true," in patch.group(1)) is replace
    assert "\t.mod = THIS_MODULE," in patch.group(1)


def test_module_boilerplate() -> None:
    text = generate_livepatch_source(make_source(FunctionSpec("f", "f_v2")))
    assert "#include <linux/livepatch.h>" in text
    assert "return klp_enable_patch(&dynamos_patch);" in text
    assert re.search(r"static void __exit (\w+)\(void\)\n\{\n\}", text)
    for line in [
        'MODULE_LICENSE("GPL");',
        'MODULE_INFO(livepatch, "Y");',
        'MODULE_INFO(dynamos, "net-fix");',
        'MODULE_DESCRIPTION("Fix things");',
        "module_init(",
        "module_exit(",
    ]:
        assert line in text


def test_namespaces_the_code_uses_are_imported() -> None:
    text = generate_livepatch_source(make_source(FunctionSpec("f", "f_v2")), import_namespaces=["CXL", "IOMMUFD"])
    assert "MODULE_IMPORT_NS(CXL);\nMODULE_IMPORT_NS(IOMMUFD);" in text
    assert "MODULE_IMPORT_NS" not in generate_livepatch_source(make_source(FunctionSpec("f", "f_v2")))
    with pytest.raises(ValueError, match="not a C identifier"):
        generate_livepatch_source(make_source(FunctionSpec("f", "f_v2")), import_namespaces=["CXL); evil("])


def test_description_is_escaped() -> None:
    text = generate_livepatch_source(make_source(FunctionSpec("f", "f_v2"), description=TRICKY_DESCRIPTION))
    line = next(x for x in text.splitlines() if x.startswith("MODULE_DESCRIPTION("))
    assert line == (
        'MODULE_DESCRIPTION("Say \\"hi\\" \\\\ to C:\\\\path\\nsecond line\\ttab ?\\?= trigraph, '
        'caf\\303\\251 \\001");'
    )


def test_c_string_octal_escapes_do_not_swallow_digits() -> None:
    assert c_string("\x01" + "23") == '"\\00123"'  # \001 then "23": octal escapes stop at 3 digits
    assert c_string("") == '""'


def test_empty_description_falls_back_to_update_name() -> None:
    text = generate_livepatch_source(make_source(FunctionSpec("f", "f_v2"), description=""))
    assert 'MODULE_DESCRIPTION("dynamos update net-fix");' in text


def test_klp_object_name() -> None:
    assert klp_object_name("vmlinux") is None
    assert klp_object_name("nf-tables") == "nf_tables"


def test_kbuild_lists_main_and_author_objects() -> None:
    text = generate_kbuild(make_source(FunctionSpec("f", "f_v2")), "net_fix_main.o", ["src/a.o", "src/b.o"])
    lines = [x for x in text.splitlines() if not x.startswith("#")]
    assert lines == ["obj-m := net_fix.o", "net_fix-y := net_fix_main.o src/a.o src/b.o", "ccflags-y += -I$(src)"]


@pytest.mark.parametrize("objects", [["net_fix.o"], ["src/a.c"], ["src/a.o", "src/a.o"]])
def test_kbuild_refuses_bad_object_lists(objects: list[str]) -> None:
    with pytest.raises(ValueError):
        generate_kbuild(make_source(FunctionSpec("f", "f_v2")), "net_fix_main.o", objects)


def test_generated_c_compiles_into_a_livepatch_module(tmp_path: Path, target) -> None:
    """The glue plus a tiny author file, built by the target's Kbuild tree as dynamos will do it."""
    source = make_source(
        FunctionSpec("cmdline_proc_show", "my_show"),
        FunctionSpec("nfs_show_options", "my_show", object="nfs"),
        FunctionSpec("version_proc_show", "my_show", sympos=1),
        directory=tmp_path,
        description=TRICKY_DESCRIPTION,
        replace=True,
    )
    (tmp_path / "edit.c").write_text(
        "#include <linux/seq_file.h>\n"
        "int my_show(struct seq_file *m, void *v)\n"
        "{\n"
        '\tseq_printf(m, "%s\\n", "dynamos");\n'
        "\treturn 0;\n"
        "}\n"
    )
    (tmp_path / "net_fix_main.c").write_text(generate_livepatch_source(source))
    (tmp_path / "Kbuild").write_text(generate_kbuild(source, "net_fix_main.o", ["edit.o"]))
    # As dynamos builds: modpost only warns about symbols livepatch resolves at load time.
    r = subprocess.run(
        ["make", "-C", str(target.headers_dir), f"M={tmp_path}", "-j2", "modules"],
        capture_output=True,
        text=True,
        env={**os.environ, "KBUILD_MODPOST_WARN": "1"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    warnings = [line for line in (r.stdout + r.stderr).splitlines() if "warning:" in line]
    # the glue itself compiles cleanly; the blocker signal uses the unexported wake_up_state
    assert all('"wake_up_state" [' in line and "undefined" in line for line in warnings), warnings

    info = read_modinfo((tmp_path / "net_fix.ko").read_bytes())
    assert info["livepatch"] == "Y"
    assert info["license"] == "GPL"
    assert info["dynamos"] == "net-fix"
    assert info["name"] == "net_fix"
    assert info["description"] == TRICKY_DESCRIPTION  # the escaping round-trips through the compiler
    assert info["vermagic"].split()[0] == target.release
