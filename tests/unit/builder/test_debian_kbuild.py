"""build --to's classification and tolerant build on the real prepared tree of the target: a set
of changes as a Debian revision could bring them, one of each kind, where the refused ones do not
stop the carried ones and the update is marked partial, claiming no CVE. The two headers are
decided by the types of their units' compiled objects: a struct that gains a member is refused
naming it, a static inline function's new body is carried."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynamos import cli
from dynamos.builder.debian import CARRIED, NOT_BUILT, REFUSED, Change, build_changes
from dynamos.builder.units import compile_original
from dynamos.target.debversion import parse_changelog
from dynamos.target.source import prepare_source
from dynamos.update.package import read_package

CHANGELOG = """linux (6.1.192-9) bookworm-security; urgency=high

  * proc: print the command line through seq_printf (CVE-2099-0001)

 -- Nobody <nobody@example.org>  Thu, 26 Nov 2026 18:12:56 +0100
"""

EDITS = {
    "fs/proc/cmdline.c": ("\tseq_puts(m, saved_command_line);", "\tseq_printf(m, \"%s\", saved_command_line);"),
    "fs/pipe.c": ("static unsigned int pipe_max_size = 1048576;", "static unsigned int pipe_max_size = 2097152;"),
    "fs/proc/Makefile": ("proc-y", "# a comment\nproc-y"),
    # a member added to a struct drivers/block/loop.c (module loop, the header's one unit) uses:
    # its original and patched objects' types differ, so that unit is left out naming the struct
    "include/uapi/linux/loop.h": ("\t__u64\t\t\t__reserved[8];\n",
                                  "\t__u32\t\t\tdynamos_new;\n\t__u64\t\t\t__reserved[8];\n"),
    # a static inline function's body in a local header (units fs/proc/base.c and fd.c): no type changes
    "fs/proc/fd.h": ("\treturn PROC_I(inode)->fd;\n", "\treturn PROC_I(inode)->fd & 0x7fffffff;\n"),
    "include/linux/kernel.h": ("#include <linux/stdarg.h>", "#include <linux/stdarg.h> /* reached by all */"),
    "fs/ext2/inode.c": ("#include <linux/time.h>", "#include <linux/time.h> /* not built */"),
    "Documentation/filesystems/proc.rst": ("/proc", "/proc (sic)"),
}


def edited(target, edits: dict[str, tuple[str, str]]) -> dict[str, bytes]:
    """Each file of the target's tree with its one edit (old text -> new text) made."""
    tree = prepare_source(target).tree
    texts: dict[str, bytes] = {}
    for rel, (old, new) in edits.items():
        text = (tree / rel).read_text()
        assert old in text, f"{rel}: {old!r} not found"
        texts[rel] = text.replace(old, new, 1).encode()
    return texts


def test_each_kind_of_change_classified_and_the_rest_carried(target, tmp_path: Path) -> None:
    texts = edited(target, EDITS)
    changes = [Change(rel, "modified") for rel in sorted(EDITS)] + [Change("fs/proc/new.c", "added")]
    entries = parse_changelog(CHANGELOG)
    result = build_changes(target, "6.1.192-2", "6.1.192-9", changes, texts.__getitem__, entries,
                           output=tmp_path, max_units=20)
    got = {f.path: (f.status, f.code) for f in result.files}
    assert got == {
        "fs/proc/cmdline.c": (CARRIED, ""),
        "fs/pipe.c": (REFUSED, "changed-initialiser"),
        "fs/proc/Makefile": (REFUSED, "build-file"),
        "include/uapi/linux/loop.h": (REFUSED, "changed-layout"),
        "fs/proc/fd.h": (CARRIED, ""),
        "include/linux/kernel.h": (REFUSED, "header-reach"),
        "fs/ext2/inode.c": (NOT_BUILT, "not-built"),
        "Documentation/filesystems/proc.rst": (NOT_BUILT, "not-kernel-code"),
        "fs/proc/new.c": (REFUSED, "added-file"),
    }, result.files
    layout = next(f for f in result.files if f.path == "include/uapi/linux/loop.h")
    assert layout.units == ["drivers/block/loop.c"], layout.units
    assert layout.reason.startswith("drivers/block/loop.c: include/uapi/linux/loop.h: struct loop_config changes "
                                    "layout: "), layout.reason
    assert "member dynamos_new added at offset 240" in layout.reason, layout.reason
    reach = next(f for f in result.files if f.path == "include/linux/kernel.h")
    assert "more than --max-units 20" in reach.reason
    assert result.partial and result.cves == [] and result.cves_mentioned == ["CVE-2099-0001"]
    assert result.package_path is not None
    pkg = read_package(result.package_path)
    assert pkg.replace and pkg.version == "6.1.192-9" and pkg.cves == ()
    # cmdline.c's change, and fd.c's three callers of the changed inline (base.c compiles to the same code)
    assert sorted((f.name, f.object) for f in pkg.patched_functions) == [
        ("cmdline_proc_show", "vmlinux"), ("proc_fd_link", "vmlinux"), ("seq_show", "vmlinux"),
        ("tid_fd_revalidate", "vmlinux")]
    assert pkg.debian == {"package": "linux-source-6.1", "from": "6.1.192-2", "to": "6.1.192-9", "partial": True,
                          "not_carried": sorted(p for p, (s, _c) in got.items() if s == REFUSED),
                          "changelog": [entries[0].to_text()], "cves_mentioned": ["CVE-2099-0001"]}


@pytest.mark.parametrize(("to", "words"), [
    ("6.1.192-1", "is older than the version the kernel runs"),
    ("7.0-1", "the archive has no linux-source-6.1 of that version; it has 6.1.192-3"),
])
def test_cli_refuses_a_bad_to_version_before_printing_anything_else(target, tmp_path: Path, to: str, words: str,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The refusal comes before the signer line (or any progress): it is all the user reads."""
    status = cli.main(["build", "--to", to, "--kernel", target.release, "-o", str(tmp_path)])
    out, err = capsys.readouterr()
    assert status == 5 and out == ""
    assert err.splitlines() == [err.splitlines()[0]] and err.startswith(f"dynamos: error: --to {to}") and words in err
    assert "Traceback" not in err and not list(tmp_path.iterdir())


def test_a_headers_candidates_are_confirmed_by_the_compilers_dependency_output(target, tmp_path: Path) -> None:
    """include/linux/toshiba.h: the static scan finds three units; neofb.c includes it only under
    CONFIG_TOSHIBA, which Debian's amd64 config leaves unset, so its original compile does not read
    it and its patched side is never compiled. toshiba_acpi.c really includes it and is compiled."""
    header, real, guarded = "include/linux/toshiba.h", "drivers/platform/x86/toshiba_acpi.c", \
        "drivers/video/fbdev/neofb.c"
    tree = prepare_source(target).tree
    text = (tree / header).read_text()
    said: list[str] = []
    result = build_changes(target, "6.1.192-2", "6.1.192-9", [Change(header, "modified")],
                           {header: text.replace("#include <uapi", "/* dynamos */\n#include <uapi").encode()
                            }.__getitem__, [], output=tmp_path, progress=said.append)
    (res,) = result.files
    assert set(res.units) >= {real, guarded}, res.units
    assert (res.status, res.code) == (NOT_BUILT, "no-code-change"), res  # a comment: no code changed
    assert "1 does not include it under this config" in res.reason and "the compiler confirmed" in res.reason
    assert f"{guarded}: does not include {header} under the target's config (the compiler's dependency " \
           "output): skipped" in result.explain
    assert f"compiling {real} (patched)" in said
    assert f"compiling {guarded} (patched)" not in said


def test_a_cached_original_keeps_its_dependency_list(target, tmp_path: Path) -> None:
    """The second build of a unit takes its original from the cache: the list comes with it."""
    source = prepare_source(target)
    first = compile_original(source, "drivers/platform/x86/toshiba_acpi.c", tmp_path / "a.o")
    again = compile_original(source, "drivers/platform/x86/toshiba_acpi.c", tmp_path / "b.o")
    assert again.cached and again.deps == first.deps
    assert again.deps is not None and "include/linux/toshiba.h" in again.deps
    assert "drivers/platform/x86/toshiba_acpi.c" in again.deps


BORROWING = {
    # a new inline helper in a header that reaches far more units than --max-units, and the one
    # .c change of the release that calls it: the .c cannot compile without the header's change
    "include/linux/seq_file.h": ("void seq_puts(struct seq_file *m, const char *s);\n",
                                 "void seq_puts(struct seq_file *m, const char *s);\n"
                                 "static inline void seq_put_line(struct seq_file *m, const char *s)\n"
                                 "{\n\tseq_printf(m, \"%s\\n\", s);\n}\n"),
    "fs/proc/cmdline.c": ("\tseq_puts(m, saved_command_line);\n\tseq_putc(m, '\\n');\n",
                          "\tseq_put_line(m, saved_command_line);\n"),
    # a change of the same release that the .c does not need, to a header it reads: not borrowed
    # (the compiler's error does not ask for it), so its layout change does not refuse the .c
    "include/linux/fs.h": ("struct file {\n\tunion {\n", "struct file {\n\tint dynamos_unrelated;\n\tunion {\n"),
    # a member added to a struct in a far-reaching header, used by the .c change: the .c is
    # compiled with it and then refused because the struct's layout changes
    "include/linux/pipe_fs_i.h": ("struct pipe_inode_info {\n\tstruct mutex mutex;\n",
                                  "struct pipe_inode_info {\n\tunsigned int dynamos_count;\n\tstruct mutex mutex;\n"),
    "fs/pipe.c": ("\tcase F_GETPIPE_SZ:\n\t\tret = pipe->max_usage * PAGE_SIZE;\n",
                  "\tcase F_GETPIPE_SZ:\n\t\tpipe->dynamos_count++;\n\t\tret = pipe->max_usage * PAGE_SIZE;\n"),
}


def test_a_change_that_needs_a_header_refused_for_its_reach_is_compiled_with_that_header(
        target, tmp_path: Path) -> None:
    """A header refused for its reach stays refused for its other units, but a unit whose patched
    compile needs its change borrows it: carried when no layout changes, else refused naming the
    type (an accepted refusal, not a failed build)."""
    texts = edited(target, BORROWING)
    said: list[str] = []
    result = build_changes(target, "6.1.192-2", "6.1.192-9", [Change(rel, "modified") for rel in sorted(BORROWING)],
                           texts.__getitem__, [], output=tmp_path, max_units=3, progress=said.append)
    got = {f.path: f for f in result.files}
    assert {p: (f.status, f.code) for p, f in got.items()} == {
        "include/linux/seq_file.h": (REFUSED, "header-reach"),
        "fs/proc/cmdline.c": (CARRIED, ""),
        "include/linux/pipe_fs_i.h": (REFUSED, "header-reach"),
        "fs/pipe.c": (REFUSED, "changed-layout"),
        "include/linux/fs.h": (REFUSED, "header-reach"),
    }, result.files
    assert "fs/proc/cmdline.c: the patched compile failed; again with the change to include/linux/seq_file.h, " \
           "which it reads" in said
    assert "compiled with the change to include/linux/seq_file.h, which it needs" in got["fs/proc/cmdline.c"].reason
    assert "its change is compiled into fs/proc/cmdline.c" in got["include/linux/seq_file.h"].reason
    assert "include/linux/pipe_fs_i.h: struct pipe_inode_info changes layout" in got["fs/pipe.c"].reason, \
        got["fs/pipe.c"].reason
    assert "  borrowed  include/linux/seq_file.h: its patched compile needs this change, which the header's " \
           "other units do not get" in result.explain
    pkg = read_package(result.package_path)
    assert [f.name for f in pkg.patched_functions] == ["cmdline_proc_show"]


def test_an_error_that_quotes_no_new_identifier_borrows_the_header_its_note_points_into(
        target, tmp_path: Path) -> None:
    """cmdline.c calls seq_setwidth with the parameter the release adds: the error (too many
    arguments to 'seq_setwidth') quotes no identifier a change adds, but its note says where
    seq_setwidth is declared, so seq_file.h is borrowed, not fs.h (an unrelated layout change the
    unit reads too), and the fix is carried."""
    texts = edited(target, {
        "include/linux/seq_file.h": ("static inline void seq_setwidth(struct seq_file *m, size_t size)\n{\n"
                                     "\tm->pad_until = m->count + size;",
                                     "static inline void seq_setwidth(struct seq_file *m, size_t size, size_t extra)"
                                     "\n{\n\tm->pad_until = m->count + size + extra;"),
        "fs/proc/cmdline.c": ("\tseq_puts(m, saved_command_line);\n",
                              "\tseq_setwidth(m, 0, 0);\n\tseq_puts(m, saved_command_line);\n"),
        "include/linux/fs.h": BORROWING["include/linux/fs.h"]})
    said: list[str] = []
    result = build_changes(target, "6.1.192-2", "6.1.192-9", [Change(rel, "modified") for rel in sorted(texts)],
                           texts.__getitem__, [], output=tmp_path, max_units=3, progress=said.append)
    got = {f.path: f for f in result.files}
    assert (got["fs/proc/cmdline.c"].status, got["fs/proc/cmdline.c"].code) == (CARRIED, ""), got
    assert "fs/proc/cmdline.c: the patched compile failed; again with the change to include/linux/seq_file.h, " \
           "which it reads" in said, said
    assert "compiled with the change to include/linux/seq_file.h, which it needs" in got["fs/proc/cmdline.c"].reason
    assert "include/linux/fs.h" not in got["fs/proc/cmdline.c"].reason
    pkg = read_package(result.package_path)
    assert [f.name for f in pkg.patched_functions] == ["cmdline_proc_show"]


def test_a_file_another_directorys_makefile_builds_gets_that_makefiles_flags_and_module(
        target, tmp_path: Path) -> None:
    """Kbuild never enters drivers/gpu/drm/amd/amdkfd/: amdgpu's Makefile includes its Makefile and
    builds its files as amdgpu/../amdkfd/x.o with amdgpu's include paths, into amdgpu.ko. Compiled
    as amdkfd/x.o, the original does not even compile (kgd_kfd_interface.h not found)."""
    rel = "drivers/gpu/drm/amd/amdkfd/kfd_topology.c"
    tree = prepare_source(target).tree
    text = (tree / rel).read_text()
    old = "int kfd_numa_node_to_apic_id(int numa_node_id)\n{\n\tif (numa_node_id == -1) {"
    assert old in text
    result = build_changes(target, "6.1.192-2", "6.1.192-9", [Change(rel, "modified")],
                           {rel: text.replace(old, old.replace("== -1", "< 0")).encode()}.__getitem__, [],
                           output=tmp_path)
    (res,) = result.files
    assert (res.status, res.code) == (CARRIED, ""), res
    pkg = read_package(result.package_path)
    assert [(f.name, f.object) for f in pkg.patched_functions] == [("kfd_numa_node_to_apic_id", "amdgpu")]


def test_a_new_export_is_not_carried_and_does_not_stop_the_fix(target, tmp_path: Path) -> None:
    """A stable release often exports a function a module fix needs: the export is left out (the
    kernel's modules were built without it; the update reaches the function through livepatch)."""
    rel = "fs/proc/cmdline.c"
    tree = prepare_source(target).tree
    text = (tree / rel).read_text()
    old = "static int cmdline_proc_show(struct seq_file *m, void *v)\n{\n\tseq_puts(m, saved_command_line);"
    new = ("unsigned int dynamos_cmdline_length(void)\n{\n\treturn strlen(saved_command_line);\n}\n"
           "EXPORT_SYMBOL_GPL(dynamos_cmdline_length);\n\n"
           "static int cmdline_proc_show(struct seq_file *m, void *v)\n{\n"
           "\tseq_printf(m, \"%u \", dynamos_cmdline_length());\n\tseq_puts(m, saved_command_line);")
    assert old in text
    result = build_changes(target, "6.1.192-2", "6.1.192-9", [Change(rel, "modified")],
                           {rel: text.replace(old, new).encode()}.__getitem__, [], output=tmp_path)
    (res,) = result.files
    assert (res.status, res.code) == (CARRIED, ""), res
    pkg = read_package(result.package_path)
    assert [f.name for f in pkg.patched_functions] == ["cmdline_proc_show"]


def test_a_borrowed_header_that_changes_a_functions_prototype_refuses_its_unit(target, tmp_path: Path) -> None:
    """kstrtobool gains a parameter in include/linux/kstrtox.h, refused for its reach: lib/kstrtox.c
    compiles only with it, but the kernel's other callers would pass the old arguments."""
    header, unit = "include/linux/kstrtox.h", "lib/kstrtox.c"
    tree = prepare_source(target).tree
    edits = {header: [("int __must_check kstrtobool(const char *s, bool *res);",
                       "int __must_check kstrtobool(const char *s, bool *res, int flags);"),
                      ("\treturn kstrtobool(s, res);", "\treturn kstrtobool(s, res, 0);")],
             unit: [("int kstrtobool(const char *s, bool *res)\n",
                     "int kstrtobool(const char *s, bool *res, int flags)\n"),
                    ("\treturn kstrtobool(buf, res);", "\treturn kstrtobool(buf, res, 0);")]}
    texts = {}
    for rel, pairs in edits.items():
        text = (tree / rel).read_text()
        for old, new in pairs:
            assert old in text, f"{rel}: {old!r} not found"
            text = text.replace(old, new, 1)
        texts[rel] = text.encode()
    result = build_changes(target, "6.1.192-2", "6.1.192-9", [Change(header, "modified"), Change(unit, "modified")],
                           texts.__getitem__, [], output=tmp_path, max_units=3)
    got = {f.path: f for f in result.files}
    assert (got[header].status, got[header].code) == (REFUSED, "header-reach")
    assert (got[unit].status, got[unit].code) == (REFUSED, "changed-layout"), got[unit]
    assert got[unit].reason == (f"{unit}: function kstrtobool changes prototype from int (const char *, bool *) "
                                "to int (const char *, bool *, int): the kernel's callers in other units would "
                                "call it with the old arguments"), got[unit].reason


def test_a_change_that_needs_a_header_whose_reach_cannot_be_told_borrows_it(target, tmp_path: Path) -> None:
    """u_eem.h's reach cannot be told (legacy/ether.c includes "u_eem.h" through an -I path), so it
    is refused; f_eem.c, whose change needs its new member, borrows it and is refused for the
    layout change, not as a failed build."""
    header, unit = "drivers/usb/gadget/function/u_eem.h", "drivers/usb/gadget/function/f_eem.c"
    texts = edited(target, {header: ("\tint\t\t\t\trefcnt;\n};",
                                     "\tint\t\t\t\trefcnt;\n\tint\t\t\t\tdynamos_binds;\n};"),
                            unit: ("\teem_opts->bind_count++;\n",
                                   "\teem_opts->bind_count++;\n\teem_opts->dynamos_binds++;\n")})
    result = build_changes(target, "6.1.192-2", "6.1.192-9", [Change(header, "modified"), Change(unit, "modified")],
                           texts.__getitem__, [], output=tmp_path)
    got = {f.path: f for f in result.files}
    assert (got[header].status, got[header].code) == (REFUSED, "other"), got[header]
    assert "through the compiler's include path" in got[header].reason
    assert (got[unit].status, got[unit].code) == (REFUSED, "changed-layout"), got[unit]
    assert f"{header}: struct f_eem_opts changes layout: member dynamos_binds added" in got[unit].reason
