"""Patches written for kpatch-build and upstream klp-build, built unchanged against the target's
own tree: every macro kind of the compatibility headers, on kernel/exec_domain.c (the
personality syscall and /proc/execdomains)."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from dynamos.builder.patch import build_from_patch
from dynamos.errors import BuildError
from dynamos.target import cache_root
from dynamos.target.source import prepare_source

KPATCH_PATCH = Path(__file__).resolve().parents[2] / "lab" / "patches" / "kpatch-personality.patch"
REL = "kernel/exec_domain.c"
SYSCALL = "SYSCALL_DEFINE1(personality, unsigned int, personality)\n{\n\tunsigned int old = current->personality;\n"


def build(target, tmp_path: Path, name: str, head: str, replacements: list[tuple[str, str]]):
    """exec_domain.c with ``head`` after its includes and each (old, new) replaced, built."""
    tree = prepare_source(target).tree
    text = (tree / REL).read_text()
    after = text.replace("#include <linux/types.h>\n", "#include <linux/types.h>\n" + head, 1)
    for old, new in replacements:
        assert old in after, old
        after = after.replace(old, new, 1)
    patch = tmp_path / f"{name}.patch"
    patch.write_text("".join(difflib.unified_diff(text.splitlines(True), after.splitlines(True),
                                                  f"a/{REL}", f"b/{REL}")))
    return build_from_patch(patch, target, name=name)


def main_source(target, name: str) -> str:
    return (cache_root() / "builds" / f"patch-{name}-{target.release}" / f"{name.replace('-', '_')}_main.c").read_text()


def test_kpatch_callbacks_and_syscall_define(target) -> None:
    b = build_from_patch(KPATCH_PATCH, target, name="kpatch-personality-kb")
    (unit,) = b.units
    assert {c.name for c in unit.diff.changed} == {"__x64_sys_personality", "__ia32_sys_personality"}
    assert {c.name: c.reason for c in unit.diff.new} == {
        f"personality_{k}": f"{k} callback (KPATCH_/KLP_ macro)"
        for k in ("pre_patch", "post_patch", "pre_unpatch", "post_unpatch")}
    c = main_source(target, "kpatch-personality-kb")
    for kind in ("pre_patch", "post_patch", "pre_unpatch", "post_unpatch"):
        assert f".callbacks.{kind} = dynamos_{kind}_0," in c
        assert f"dynamos_edition__personality_{kind}(obj);" in c
    assert "extern int dynamos_edition__personality_pre_patch(struct klp_object *obj);" in c


def test_klp_build_helpers(target, tmp_path: Path) -> None:
    head = ('#include <linux/livepatch_helpers.h>\n\nstatic void on_post_patch(struct klp_object *obj)\n{\n'
            '\tpr_info("patched\\n");\n}\nKLP_POST_PATCH_CALLBACK(on_post_patch);\n')
    b = build(target, tmp_path, "klp-helpers-kb", head, [(SYSCALL, "KLP_" + SYSCALL + (
        "\n\tif (personality == 0x5a5a) {\n\t\tKLP_STATIC_CALL(might_resched)();\n\t\treturn 0x7e57;\n\t}\n"))])
    (unit,) = b.units
    assert {c.name for c in unit.diff.changed} == {"__x64_sys_personality", "__ia32_sys_personality"}
    assert unit.directives.callbacks == {"post_patch": "on_post_patch"}
    # The static call became an indirect call through its key: the kernel's own, found by livepatch.
    assert any(s.name == "__SCK__might_resched" and s.object == "vmlinux" for s in b.klp_symbols), b.klp_symbols
    assert "dynamos_edition__on_post_patch(obj);" in main_source(target, "klp-helpers-kb")


@pytest.mark.parametrize("marker", ["KPATCH_IGNORE_FUNCTION(execdomains_proc_show);",
                                    'KPATCH_IGNORE_SECTION(".text.execdomains_proc_show");'])
def test_kpatch_ignore_markers_and_shadow_variables(target, tmp_path: Path, marker: str) -> None:
    head = '#include "kpatch-macros.h"\n'
    b = build(target, tmp_path, "kpatch-ignore-kb", head, [
        ('seq_puts(m, "0-0\\tLinux           \\t[kernel]\\n");', 'seq_puts(m, "changed\\n");'),
        ("module_init(proc_execdomains_init);\n", "module_init(proc_execdomains_init);\n" + marker + "\n"),
        (SYSCALL, SYSCALL + "\tlong *calls = kpatch_shadow_alloc(current, \"personality-calls\", sizeof(*calls), "
                            "GFP_KERNEL);\n\n\tif (calls)\n\t\t++*calls;\n")])
    (unit,) = b.units
    assert {c.name for c in unit.diff.changed} == {"__x64_sys_personality", "__ia32_sys_personality"}
    assert "execdomains_proc_show" not in {c.name for c in unit.diff.new}
    assert any(line.startswith("  ignored   ") and "execdomains_proc_show" in line for line in b.explain())


def test_kpatch_force_unsafe_is_refused_with_what_to_do(target, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"KPATCH_FORCE_UNSAFE.*update.toml") as e:
        build(target, tmp_path, "kpatch-unsafe-kb", '#include "kpatch-macros.h"\n',
              [(SYSCALL, "KPATCH_FORCE_UNSAFE(__do_sys_personality);\n" + SYSCALL)])
    assert str(e.value.path) == REL and "static assertion failed" in str(e.value)
