"""The compatibility headers' directives, read back from objects gcc compiled like the kernel does
(a stand-in linux/ include directory: no kernel tree needed), and what the builder makes of them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dynamos.builder.cgen import generate_livepatch_source
from dynamos.builder.compat import (
    COMPAT_DIR,
    COMPAT_HEADERS,
    Directives,
    apply_directives,
    callback_hooks,
    read_directives,
    with_compat_headers,
)
from dynamos.builder.elf.sections import SECTION_RULES, Handling
from dynamos.builder.objdiff import diff_objects, read_object
from dynamos.errors import BuildError
from dynamos.update.model import FunctionSpec, UpdateSource
from tests.support.gcc import KERNEL_CFLAGS, SECTION_FLAGS

STAND_IN = {
    "linux/compiler.h": "#define __used __attribute__((__used__))\n"
                        "#define __section(s) __attribute__((__section__(s)))\n"
                        "#define ___PASTE(a, b) a##b\n#define __PASTE(a, b) ___PASTE(a, b)\n",
    "linux/gfp.h": "typedef unsigned int gfp_t;\ntypedef unsigned long size_t;\n",
    "linux/livepatch.h": "struct klp_object { const char *name; };\n"
                         "void *klp_shadow_get(void *obj, unsigned long id);\n"
                         "void *klp_shadow_get_or_alloc(void *obj, unsigned long id, size_t size, gfp_t gfp,"
                         " void *ctor, void *data);\n"
                         "void klp_shadow_free(void *obj, unsigned long id, void *dtor);\n",
}
ORIGINAL = "int helper(int x)\n{\n\treturn x + 1;\n}\n\nint other(int x)\n{\n\treturn x * 2;\n}\n"


def compile_with_compat(tmp_path: Path, name: str, text: str) -> bytes:
    for rel, content in STAND_IN.items():
        guard = rel.replace("/", "_").replace(".", "_").upper()
        (tmp_path / "inc" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "inc" / rel).write_text(f"#ifndef {guard}\n#define {guard}\n#define NULL ((void *)0)\n"
                                            f"{content}#endif\n")
    (tmp_path / f"{name}.c").write_bytes(with_compat_headers({"x.c": text.encode()})["x.c"])
    r = subprocess.run(["gcc", *KERNEL_CFLAGS, *SECTION_FLAGS, "-I", str(tmp_path / "inc"), "-c", f"{name}.c",
                        "-o", f"{name}.o"], cwd=tmp_path, capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(r.stderr)
    return (tmp_path / f"{name}.o").read_bytes()


def diffed(tmp_path: Path, patched_text: str):
    before = compile_with_compat(tmp_path, "original", ORIGINAL)
    after = compile_with_compat(tmp_path, "patched", patched_text)
    (tmp_path / "a.o").write_bytes(before)
    (tmp_path / "b.o").write_bytes(after)
    return diff_objects(read_object(tmp_path / "a.o"), read_object(tmp_path / "b.o")), after


PATCHED = """#include "kpatch-macros.h"

int helper(int x)
{
\treturn x + 2;
}

int other(int x)
{
\treturn x * 3 + !!kpatch_shadow_get(&x, "calls");
}

static int on_pre_patch(patch_object *obj)
{
\treturn obj->name ? 1 : 0;
}

static void on_post_unpatch(patch_object *obj)
{
\tkpatch_shadow_free(obj, "calls");
}

KPATCH_PRE_PATCH_CALLBACK(on_pre_patch);
KPATCH_POST_UNPATCH_CALLBACK(on_post_unpatch);
"""


def test_includes_of_the_compat_headers_point_at_dynamos_copies() -> None:
    text = b'#include <linux/kernel.h>\n#include "kpatch-macros.h"\n # include <kpatch-syscall.h>\n' \
           b'#include <linux/livepatch_helpers.h>\n#include "local.h"\n'
    out = with_compat_headers({"a.c": text})["a.c"].decode()
    lines = out.splitlines()
    assert len(lines) == 5 and lines[0] == "#include <linux/kernel.h>" and lines[4] == '#include "local.h"'
    assert lines[1] == f'#include "{COMPAT_DIR}/kpatch-macros.h"'
    assert lines[2] == f' # include "{COMPAT_DIR}/kpatch-syscall.h"'
    assert lines[3] == f'#include "{COMPAT_DIR}/linux/livepatch_helpers.h"'
    assert all((COMPAT_DIR / name).is_file() for name in COMPAT_HEADERS)


def test_directive_sections_are_rows_of_the_one_table() -> None:
    directives = {r.directive for r in SECTION_RULES if r.handling is Handling.DIRECTIVE}
    assert directives == {"pre_patch", "post_patch", "pre_unpatch", "post_unpatch", "ignore-function",
                          "ignore-section"}


def test_callbacks_are_read_and_carried_as_new_functions(tmp_path: Path) -> None:
    diff, patched = diffed(tmp_path, PATCHED)
    assert not diff.refused, diff.refused  # the .dynamos.* sections are read, never diffed
    found = apply_directives(diff, patched, "x.c")
    assert found.callbacks == {"pre_patch": "on_pre_patch", "post_unpatch": "on_post_unpatch"}
    assert [c.name for c in diff.changed] == ["helper", "other"]
    reasons = {c.name: c.reason for c in diff.new}
    assert reasons["on_pre_patch"].startswith("pre_patch callback") and "on_post_unpatch" in reasons


@pytest.mark.parametrize("directive", ["KPATCH_IGNORE_FUNCTION(other);", 'KPATCH_IGNORE_SECTION(".text.other");'])
def test_ignored_functions_and_sections_leave_the_update(tmp_path: Path, directive: str) -> None:
    diff, patched = diffed(tmp_path, PATCHED + directive + "\n")
    found = apply_directives(diff, patched, "x.c")
    assert [c.name for c in diff.changed] == ["helper"]
    assert found.ignored == ["other" if "FUNCTION" in directive else ".text.other"]


def test_force_unsafe_is_refused_with_what_to_do_instead(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"KPATCH_FORCE_UNSAFE\(other\) has no dynamos meaning.*update.toml"):
        compile_with_compat(tmp_path, "patched", PATCHED + "KPATCH_FORCE_UNSAFE(other);\n")


def test_two_callbacks_of_one_kind_are_refused(tmp_path: Path) -> None:
    text = PATCHED + "static int again(patch_object *obj)\n{\n\treturn 0;\n}\nKPATCH_PRE_PATCH_CALLBACK(again);\n"
    with pytest.raises(BuildError, match="2 pre_patch callbacks"):
        read_directives(compile_with_compat(tmp_path, "patched", text), "x.c")


def test_callback_hooks_are_the_editions_and_run_with_the_hook_object() -> None:
    d = Directives(callbacks={"pre_patch": "on_pre_patch"})
    editions = {"on_pre_patch": "dynamos_edition__on_pre_patch"}
    assert callback_hooks([("a.c", "vmlinux", d, editions)], ["vmlinux"]) == \
        {"pre_patch": "dynamos_edition__on_pre_patch"}
    with pytest.raises(BuildError, match="two pre_patch callbacks, in a.c and b.c"):
        callback_hooks([("a.c", "vmlinux", d, editions), ("b.c", "vmlinux", d, editions)], ["vmlinux"])
    with pytest.raises(BuildError, match="run with vmlinux"):
        callback_hooks([("m.c", "binfmt_misc", d, editions)], ["vmlinux", "binfmt_misc"])


def test_callbacks_that_take_the_object_are_called_with_it() -> None:
    f = FunctionSpec(name="cmdline_proc_show", edition="e1")
    src = UpdateSource(Path("."), "u", "", (f,), (), hooks=(("pre_patch", "cb"), ("post_unpatch", "cb2")),
                       hooks_take_object=True)
    c = generate_livepatch_source(src)
    assert "extern int cb(struct klp_object *obj);" in c and "err = cb(obj);" in c and "\tcb2(obj);" in c
    plain = generate_livepatch_source(UpdateSource(Path("."), "u", "", (f,), (), hooks=(("pre_patch", "cb"),)))
    assert "extern int cb(void);" in plain and "err = cb();" in plain
