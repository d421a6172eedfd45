"""kallsyms, available_filter_functions, enabled_functions and finding tracefs."""

from __future__ import annotations

import errno
from pathlib import Path

from dynamos.kernel.symbols import (
    Kallsyms,
    TraceableFunctions,
    find_tracefs,
    parse_enabled_functions,
)

KALLSYMS = """\
ffffffff81000000 T _stext
ffffffff81001000 t cmdline_proc_show
ffffffff81002000 T do_sys_open
ffffffff81003000 t show_map
ffffffff81004000 d show_map
ffffffff81005000 t show_map
ffffffff81006000 W arch_weak_func
ffffffff81007000 t helper.isra.0
ffffffff81008000 t helper.constprop.0
0000000000000000 t nf_hook	[nf_tables]
0000000000000000 t show_map	[ext4]
0000000000000000 t show_map	[ext4]
0000000000000000 d data_only	[ext4]
ffffffffc0201000 t ftrace_trampoline	[__builtin__ftrace]
garbage
"""


def test_kallsyms_counts_text_symbols_of_vmlinux_and_modules() -> None:
    syms = Kallsyms.parse(KALLSYMS.splitlines())
    assert syms.count("cmdline_proc_show") == 1
    assert syms.count("cmdline_proc_show", "ext4") == 0
    assert syms.count("nf_hook", "nf_tables") == 1
    assert syms.count("nf_hook") == 0  # a module symbol is not vmlinux's
    assert syms.count("arch_weak_func") == 1  # weak definitions are code too
    assert syms.count("missing") == 0
    assert syms.count("data_only", "ext4") == 0


def test_kallsyms_duplicates_keep_table_order_like_sympos() -> None:
    syms = Kallsyms.parse(KALLSYMS.splitlines())
    assert syms.count("show_map") == 2  # two functions...
    assert syms.count_all("show_map") == 3  # ...but livepatch counts the data symbol as well
    assert [syms.kind_at("show_map", "vmlinux", i) for i in (1, 2, 3, 4)] == ["t", "d", "t", None]
    assert syms.count("show_map", "ext4") == 2
    assert syms.kind_at("show_map", "ext4", 0) is None


def test_kallsyms_objects_and_variants() -> None:
    syms = Kallsyms.parse(KALLSYMS.splitlines())
    assert syms.has_object("vmlinux") and syms.has_object("ext4") and not syms.has_object("xfs")
    assert syms.variants("helper") == ["helper.constprop.0", "helper.isra.0"]
    assert syms.variants("helper", "ext4") == []


def test_kallsyms_read_from_root(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/kallsyms").write_text(KALLSYMS)
    assert Kallsyms.read(tmp_path).count("do_sys_open") == 1


def test_available_filter_functions_with_modules_and_duplicates() -> None:
    text = "do_sys_open\nshow_map\nshow_map\nnf_hook [nf_tables]\n\n"
    traceable = TraceableFunctions.parse(text.splitlines())
    assert ("do_sys_open", "vmlinux") in traceable
    assert traceable.count("show_map") == 2
    assert ("nf_hook", "nf_tables") in traceable
    assert ("nf_hook", "vmlinux") not in traceable
    assert ("cmdline_proc_show", "vmlinux") not in traceable


def test_enabled_functions_ipmodify_flag() -> None:
    text = (
        "cmdline_proc_show (1) R I   \t->klp_ftrace_handler+0x0/0x160\n"
        "vfs_read (1)           \t->function_trace_call+0x0/0x1c0\n"
        "nf_hook [nf_tables] (2) R I   \ttramp: 0xffffffffc0 (kretprobe_trampoline+0x0/0x50)\n"
    )
    users = {(u.name, u.object): u.ipmodify for u in parse_enabled_functions(text.splitlines())}
    assert users == {
        ("cmdline_proc_show", "vmlinux"): True,
        ("vfs_read", "vmlinux"): False,
        ("nf_hook", "nf_tables"): True,
    }


def _no_mount(*args: object) -> None:
    raise AssertionError("must not mount when tracefs is there")


def test_find_tracefs_prefers_sys_kernel_tracing(tmp_path: Path) -> None:
    for d in ("sys/kernel/tracing", "sys/kernel/debug/tracing"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "available_filter_functions").write_text("f\n")
    found = find_tracefs(tmp_path, _no_mount)
    assert found.path == tmp_path / "sys/kernel/tracing" and found.mounted is None


def test_find_tracefs_falls_back_to_debugfs(tmp_path: Path) -> None:
    (tmp_path / "sys/kernel/tracing").mkdir(parents=True)
    (tmp_path / "sys/kernel/debug/tracing").mkdir(parents=True)
    (tmp_path / "sys/kernel/debug/tracing/available_filter_functions").write_text("f\n")
    assert find_tracefs(tmp_path, _no_mount).path == tmp_path / "sys/kernel/debug/tracing"


def test_find_tracefs_mounts_when_not_mounted(tmp_path: Path) -> None:
    mountpoint = tmp_path / "sys/kernel/tracing"
    mountpoint.mkdir(parents=True)
    calls = []

    def mount(source: str, target: str, fstype: str, flags: int, data: object) -> None:
        calls.append((source, target, fstype))
        (Path(target) / "available_filter_functions").write_text("f\n")

    found = find_tracefs(tmp_path, mount)
    assert calls == [("tracefs", str(mountpoint), "tracefs")]
    assert found.path == mountpoint and found.mounted is True
    assert found.note == f"mounted tracefs at {mountpoint}"
    assert found.read_lines("available_filter_functions") == ["f"]


def test_find_tracefs_mount_failure_is_a_problem_not_an_exception(tmp_path: Path) -> None:
    (tmp_path / "sys/kernel/tracing").mkdir(parents=True)

    def mount(*args: object) -> None:
        raise OSError(errno.EPERM, "mount")

    found = find_tracefs(tmp_path, mount)
    assert found.path is None and found.mounted is False
    assert "mounting it on" in str(found.problem) and "Operation not permitted" in str(found.problem)
    assert found.read_lines("available_filter_functions") == []


def test_find_tracefs_without_permission_to_mount(tmp_path: Path) -> None:
    (tmp_path / "sys/kernel/tracing").mkdir(parents=True)
    found = find_tracefs(tmp_path, None)
    assert found.path is None and found.mounted is None and "only root may mount" in str(found.problem)
    assert "does not exist" in str(find_tracefs(tmp_path / "nothing", None).problem)


def test_lines_mentioning_picks_exact_lines_in_order():
    from dynamos.kernel.symbols import lines_mentioning

    data = b"a t foo\nb t foobar\nc T bar\nd t foo.isra.0\ne t foo\t[mod]\n"
    assert lines_mentioning(data, [b" foo"]) == ["a t foo", "b t foobar", "d t foo.isra.0", "e t foo\t[mod]"]
    assert lines_mentioning(b"\n" + b"foo\nbar [m]\nfoo\n", [b"\nbar"]) == ["bar [m]"]
    assert lines_mentioning(data, [b" nothing"]) == []


def test_filtered_kallsyms_keeps_sympos_order(tmp_path):
    from dynamos.kernel.symbols import Kallsyms

    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/kallsyms").write_text(
        "1 t show\n2 T other\n3 t show\n4 d show\n5 t show\t[ext4]\n6 t show.isra.0\n")
    ks = Kallsyms.read(tmp_path, {"show"})
    assert ks.count("show") == 2 and ks.count_all("show") == 3 and ks.kind_at("show", "vmlinux", 3) == "d"
    assert ks.count("show", "ext4") == 1 and ks.variants("show") == ["show.isra.0"]
    assert ks.count("other") == 0  # not asked for
