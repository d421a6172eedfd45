"""The source-diff builder on real patches against Debian's 6.1 source: each good patch is built
on the host (only the touched files compiled), applied in the lab, checked by behaviour and
reverted; each refused patch is refused with its reason before anything is built into a module."""

from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path

import pytest

from dynamos.builder.elf import STT_SECTION, RelocatableElf
from dynamos.builder.patch import build_from_patch
from dynamos.errors import BuildError
from dynamos.target.source import prepare_source
from dynamos.update.package import read_package

pytestmark = pytest.mark.lab


@pytest.fixture(scope="session")
def tree(target):
    return prepare_source(target).tree


def make_patch(tree: Path, out: Path, edits: dict[str, list[tuple[str, str]]]) -> Path:
    """A unified diff (-p1) replacing each old snippet by the new one in the target's source."""
    chunks = []
    for rel, replacements in edits.items():
        before = (tree / rel).read_text() if (tree / rel).exists() else ""
        after = before
        for old, new in replacements:
            assert old in after, f"{rel}: snippet not found: {old!r}"
            after = after.replace(old, new, 1)
        chunks += difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                       f"a/{rel}", f"b/{rel}")
    out.write_text("".join(chunks))
    return out


@pytest.fixture(scope="session")
def patch_package(tree, target, workdir):
    def build(name: str, edits: dict[str, list[tuple[str, str]]]) -> Path:
        patch = make_patch(tree, workdir / f"{name}.patch", edits)
        out = workdir / "patch-packages"
        out.mkdir(exist_ok=True)
        return build_from_patch(patch, target, output=out, name=name).package_path
    return build


def applied(guest, pkg: Path):
    """Context: the update applied in the guest for the duration of the block."""
    class _Applied:
        def __enter__(self):
            self.result = json.loads(guest.dynamos("apply", str(pkg), "--json").stdout)
            return self.result

        def __exit__(self, *exc):
            guest.dynamos("revert", self.result["name"])
    return _Applied()


def test_string_change_in_a_proc_show_function(guest, patch_package):
    pkg = patch_package("cmdline-string", {"fs/proc/cmdline.c": [
        ("\tseq_puts(m, saved_command_line);", '\tseq_puts(m, "patched: ");\n\tseq_puts(m, saved_command_line);')]})
    original = guest.read("/proc/cmdline")
    with applied(guest, pkg) as r:
        assert [f["name"] for f in r["functions"]] == ["cmdline_proc_show"]
        assert guest.read("/proc/cmdline") == "patched: " + original
    assert guest.read("/proc/cmdline") == original


def test_a_fix_that_adds_an_export_runs_without_it(guest, patch_package):
    """The new function travels with the update and its caller uses it; the export is left out."""
    pkg = patch_package("cmdline-export", {"fs/proc/cmdline.c": [
        ("static int cmdline_proc_show(struct seq_file *m, void *v)\n{\n\tseq_puts(m, saved_command_line);",
         "unsigned int dynamos_cmdline_length(void)\n{\n\treturn strlen(saved_command_line);\n}\n"
         "EXPORT_SYMBOL_GPL(dynamos_cmdline_length);\n\n"
         "static int cmdline_proc_show(struct seq_file *m, void *v)\n{\n"
         "\tseq_printf(m, \"%u \", dynamos_cmdline_length());\n\tseq_puts(m, saved_command_line);")]})
    original = guest.read("/proc/cmdline")
    with applied(guest, pkg):
        assert guest.read("/proc/cmdline") == f"{len(original) - 1} {original}"
    assert guest.read("/proc/cmdline") == original


def test_a_fix_whose_helper_another_file_adds_calls_it_inside_the_update(guest, patch_package):
    """One file of the fix adds a global function and another calls it (as a stable release adds
    a helper to the driver core for a driver's fix): the kernel has no such function, the update does."""
    pkg = patch_package("cmdline-helper-elsewhere", {
        "fs/proc/version.c": [("static int version_proc_show(",
                               "unsigned int dynamos_line_length(const char *s)\n{\n\treturn strlen(s);\n}\n\n"
                               "static int version_proc_show(")],
        "fs/proc/cmdline.c": [("static int cmdline_proc_show(struct seq_file *m, void *v)\n{\n",
                               "unsigned int dynamos_line_length(const char *s);\n\n"
                               "static int cmdline_proc_show(struct seq_file *m, void *v)\n{\n"
                               "\tseq_printf(m, \"%u \", dynamos_line_length(saved_command_line));\n")]})
    original, version = guest.read("/proc/cmdline"), guest.read("/proc/version")
    with applied(guest, pkg) as r:
        assert [f["name"] for f in r["functions"]] == ["cmdline_proc_show"]
        assert guest.read("/proc/cmdline") == f"{len(original) - 1} {original}"
        assert guest.read("/proc/version") == version
    assert guest.read("/proc/cmdline") == original


def test_one_line_logic_fix_using_non_exported_state(guest, patch_package):
    # loadavg_proc_show reads nr_threads and calls nr_running(), neither exported: the cut-out
    # function reaches the kernel's own through livepatch relocations.
    pkg = patch_package("loadavg-fix", {"fs/proc/loadavg.c": [
        ("idr_get_cursor(&task_active_pid_ns(current)->idr) - 1);",
         "idr_get_cursor(&task_active_pid_ns(current)->idr) + 1000000);")]})
    before = int(guest.read("/proc/loadavg").split()[-1])
    with applied(guest, pkg):
        out = guest.sh("cat /proc/loadavg; ls -d /proc/[0-9]*/task/* | wc -l").split("\n")
        fields = out[0].split()
        assert int(fields[-1]) >= 1000000 + before
        assert abs(int(fields[3].split("/")[1]) - int(out[1])) <= 3  # the real nr_threads
    assert int(guest.read("/proc/loadavg").split()[-1]) < 1000000


def test_new_helper_function(guest, patch_package):
    pkg = patch_package("version-helper", {"fs/proc/version.c": [
        ("static int version_proc_show(",
         'static noinline void dynamos_tag(struct seq_file *m)\n{\n\tseq_puts(m, "[tagged] ");\n}\n\n'
         "static int version_proc_show("),
        ("\tseq_printf(m, linux_proc_banner,", "\tdynamos_tag(m);\n\tseq_printf(m, linux_proc_banner,")]})
    original = guest.read("/proc/version")
    with applied(guest, pkg):
        assert guest.read("/proc/version") == "[tagged] " + original
    assert guest.read("/proc/version") == original


def test_new_static_local_variable(guest, patch_package):
    pkg = patch_package("cmdline-counter", {"fs/proc/cmdline.c": [
        ("\tseq_puts(m, saved_command_line);",
         '\tstatic int reads;\n\n\tseq_printf(m, "%d ", ++reads);\n\tseq_puts(m, saved_command_line);')]})
    with applied(guest, pkg):
        first = guest.read("/proc/cmdline").split()[0]
        second = guest.read("/proc/cmdline").split()[0]
        assert (int(first) + 1) == int(second)


def test_syscall_change(guest, patch_package):
    pkg = patch_package("uname-machine", {"kernel/sys.c": [
        ("\tup_read(&uts_sem);\n\tif (copy_to_user(name, &tmp, sizeof(tmp)))",
         '\tup_read(&uts_sem);\n\tstrscpy(tmp.machine, "dynamos", sizeof(tmp.machine));\n'
         "\tif (copy_to_user(name, &tmp, sizeof(tmp)))")]})
    assert guest.sh("uname -m").strip() == "x86_64"
    with applied(guest, pkg) as r:
        assert guest.sh("uname -m").strip() == "dynamos"
        # getrusage() below the change has a WARN whose __LINE__ moved: it must not be included.
        assert "getrusage" not in [f["name"] for f in r["functions"]]
    assert guest.sh("uname -m").strip() == "x86_64"


def test_static_inline_helper_used_by_several_callers(guest, patch_package):
    pkg = patch_package("task-state", {"fs/proc/array.c": [
        ("\treturn task_state_array[task_state_index(tsk)];",
         '\tif (task_state_index(tsk) == 0)\n\t\treturn "P (patched)";\n'
         "\treturn task_state_array[task_state_index(tsk)];")]})
    with applied(guest, pkg) as r:
        names = {f["name"] for f in r["functions"]}
        assert {"proc_pid_status", "do_task_stat"} <= names, names  # both callers of the inlined helper
        assert "State:\tP (patched)" in guest.read("/proc/self/status")
        assert guest.read("/proc/self/stat").split()[2] == "P"
    assert "State:\tR (running)" in guest.read("/proc/self/status")


def test_new_global_variable(guest, patch_package):
    pkg = patch_package("cmdline-global", {"fs/proc/cmdline.c": [
        ("static int cmdline_proc_show(", "int dynamos_cmdline_reads;\n\nstatic int cmdline_proc_show("),
        ("\tseq_puts(m, saved_command_line);",
         '\tseq_printf(m, "%d ", ++dynamos_cmdline_reads);\n\tseq_puts(m, saved_command_line);')]})
    with applied(guest, pkg):
        counts = [int(guest.read("/proc/cmdline").split()[0]) for _ in range(3)]
        assert counts == [counts[0], counts[0] + 1, counts[0] + 2]


def test_patch_touching_two_files(guest, patch_package):
    pkg = patch_package("two-files", {
        "fs/proc/cmdline.c": [("\tseq_puts(m, saved_command_line);",
                               '\tseq_puts(m, "one: ");\n\tseq_puts(m, saved_command_line);')],
        "fs/proc/version.c": [("\tseq_printf(m, linux_proc_banner,", '\tseq_puts(m, "two: ");\n'
                               "\tseq_printf(m, linux_proc_banner,")]})
    with applied(guest, pkg) as r:
        assert sorted(f["name"] for f in r["functions"]) == ["cmdline_proc_show", "version_proc_show"]
        assert guest.read("/proc/cmdline").startswith("one: ")
        assert guest.read("/proc/version").startswith("two: Linux version")


def test_static_function_with_same_named_twins(guest, patch_package):
    # Three static functions are named c_start in this kernel; the fidelity check finds which one
    # arch/x86/kernel/cpu/proc.c's is, and the update patches that one only.
    pkg = patch_package("cpuinfo-first", {"arch/x86/kernel/cpu/proc.c": [
        ("static void *c_start(struct seq_file *m, loff_t *pos)\n{\n",
         "static void *c_start(struct seq_file *m, loff_t *pos)\n{\n\tif (*pos > 0)\n\t\treturn NULL;\n")]})
    assert guest.read("/proc/cpuinfo").count("processor\t:") == 2
    with applied(guest, pkg) as r:
        (func,) = r["functions"]
        assert func["name"] == "c_start" and func["sympos"] in (1, 2, 3), func
        assert guest.read("/proc/cpuinfo").count("processor\t:") == 1
    assert guest.read("/proc/cpuinfo").count("processor\t:") == 2


def test_static_key_user(guest, patch_package):
    # prctl inlines mmap_lock tracepoints: its jump-label entries (exported static keys)
    # travel with it and the kernel patches them in the update's copy as it loads.
    pkg = patch_package("prctl-timerslack", {"kernel/sys.c": [
        ("\t\t\terror = current->timer_slack_ns;\n\t\tbreak;\n\tcase PR_SET_TIMERSLACK:",
         "\t\t\terror = current->timer_slack_ns + 1;\n\t\tbreak;\n\tcase PR_SET_TIMERSLACK:")]})
    read = [sys.executable, "-c", "import ctypes; print(ctypes.CDLL(None).prctl(30, 0, 0, 0, 0))"]
    before = int(guest.run(*read).stdout)
    with applied(guest, pkg) as r:
        assert "__x64_sys_prctl" in [f["name"] for f in r["functions"]]  # __do_sys_prctl is inlined there
        assert int(guest.run(*read).stdout) == before + 1
        assert guest.sh("cat /proc/self/status >/dev/null && echo ok").strip() == "ok"  # mmap_lock users run
    assert int(guest.run(*read).stdout) == before


def test_module_function_with_a_same_named_twin_in_the_same_module(guest, patch_package, target):
    # md-mod.ko links md.c and md-bitmap.c, and each has a static metadata_show: the sysfs files
    # md/metadata_version and md/bitmap/metadata. The fidelity check, run against the shipped
    # md-mod.ko, tells which one is md.c's, and only that one is replaced.
    pkg = patch_package("md-metadata", {"drivers/md/md.c": [
        ('mddev->metadata_type);\n\telse\n\t\treturn sprintf(page, "none\\n");',
         'mddev->metadata_type);\n\telse\n\t\treturn sprintf(page, "none (patched)\\n");')]})
    md = "/sys/block/md9/md"
    guest.load_module(str(target.module_path("md_mod")))
    try:
        guest.sh("echo md9 > /sys/module/md_mod/parameters/new_array")
        assert guest.read(f"{md}/metadata_version").strip() == "none"
        assert guest.read(f"{md}/bitmap/metadata").strip() == "internal"
        with applied(guest, pkg) as r:
            (func,) = r["functions"]
            assert (func["name"], func["object"]) == ("metadata_show", "md_mod") and func["sympos"] in (1, 2), func
            assert guest.read(f"{md}/metadata_version").strip() == "none (patched)"
            assert guest.read(f"{md}/bitmap/metadata").strip() == "internal"  # the twin is untouched
        assert guest.read(f"{md}/metadata_version").strip() == "none"
    finally:
        guest.unload_module("md_mod")


def test_patch_to_a_file_compiled_by_including_it(guest, patch_package):
    # 6.1 builds kernel/sched/debug.c as part of build_utility.c (#include "debug.c"): that unit
    # is compiled, with the patched debug.c, and the new line shifts no other function into the
    # update. proc_sched_show_task also reads sched_schedstats through a jump label.
    line = "dynamos: a line from kernel/sched/debug.c"
    pkg = patch_package("sched-debug", {"kernel/sched/debug.c": [
        ("\tP(se.nr_migrations);\n", f'\tP(se.nr_migrations);\n\tSEQ_printf(m, "{line}\\n");\n')]})
    assert line not in guest.read("/proc/self/sched")
    with applied(guest, pkg) as r:
        assert [f["name"] for f in r["functions"]] == ["proc_sched_show_task"]
        assert line in guest.read("/proc/self/sched")
    assert line not in guest.read("/proc/self/sched")


def test_patch_to_a_local_header_and_its_user(guest, patch_package):
    # fs/proc/fd.h is included by base.c and fd.c: both units are compiled, and the helper added
    # to the header (shifting everything below it) changes fd.c's seq_show only.
    pkg = patch_package("fdinfo-origin", {
        "fs/proc/fd.h": [("#include <linux/fs.h>\n",
                          "#include <linux/fs.h>\n\nstatic inline void proc_fdinfo_show_origin(struct seq_file *m)\n"
                          "{\n\tseq_puts(m, \"origin:\\tdynamos\\n\");\n}\n")],
        "fs/proc/fd.c": [("\t\t   file_inode(file)->i_ino);\n",
                          "\t\t   file_inode(file)->i_ino);\n\tproc_fdinfo_show_origin(m);\n")]})
    assert "origin:" not in guest.read("/proc/self/fdinfo/0")
    with applied(guest, pkg) as r:
        (func,) = r["functions"]
        assert func["name"] == "seq_show" and func["sympos"], func  # one of several seq_show
        assert "origin:\tdynamos\n" in guest.read("/proc/self/fdinfo/0")
        assert "pos:" in guest.read("/proc/self/fdinfo/0")
    assert "origin:" not in guest.read("/proc/self/fdinfo/0")


def test_jump_label_on_a_non_exported_static_key(guest, patch_package):
    # sysctl_schedstats reads sched_schedstats, a static key vmlinux does not export, through a
    # jump label. The update's copy must be registered with that key as it loads, or turning the
    # key on would leave the copy's branch where it was: the sysctl would keep reading 0.
    pkg = patch_package("schedstats-seven", {"kernel/sched/core.c": [
        ("\tint state = static_branch_likely(&sched_schedstats);\n",
         "\tint state = static_branch_likely(&sched_schedstats) ? 7 : 0;\n")]})
    assert "sched_schedstats" in [s["name"] for s in read_package(pkg).klp_symbols]  # not linked by the loader
    sysctl = "/proc/sys/kernel/sched_schedstats"
    assert guest.read(sysctl).strip() == "0"
    try:
        with applied(guest, pkg) as r:
            assert [f["name"] for f in r["functions"]] == ["sysctl_schedstats"]
            assert guest.read(sysctl).strip() == "0"
            guest.sh(f"echo 1 > {sysctl}")  # static_branch_enable: the kernel repatches every site
            assert guest.read(sysctl).strip() == "7"
            guest.sh(f"echo 0 > {sysctl}")
            assert guest.read(sysctl).strip() == "0"
            guest.sh(f"echo 1 > {sysctl}")  # left on across the revert: the key outlives the update
        assert guest.read(sysctl).strip() == "1"
    finally:
        guest.sh(f"echo 0 > {sysctl}")


# Reads code of the running kernel through /proc/kcore: argv is a symbol, then offsets in it and a
# length; prints the symbol's address and the bytes at each offset (hex).
READ_CODE = """
import struct, sys
name, length = sys.argv[1], int(sys.argv[2])
addr = next(int(f[0], 16) for f in (line.split() for line in open("/proc/kallsyms")) if f[2] == name)
out = [str(addr)]
with open("/proc/kcore", "rb") as core:
    head = core.read(64)
    phoff, = struct.unpack_from("<Q", head, 32)
    size, count = struct.unpack_from("<HH", head, 54)
    core.seek(phoff)
    table = core.read(size * count)
    for site in map(int, sys.argv[3:]):
        for i in range(count):
            kind, _, offset, vaddr, _, _, memsz, _ = struct.unpack_from("<IIQQQQQQ", table, i * size)
            if kind == 1 and vaddr <= addr + site < vaddr + memsz:
                core.seek(offset + addr + site - vaddr)
                out.append(core.read(length).hex())
                break
print(" ".join(out))
"""
X86_FEATURE_HYPERVISOR, X86_FEATURE_AVX512F = 4 * 32 + 31, 9 * 32 + 16


def alternative_sites(module: bytes, section: str) -> dict[int, list[int]]:
    """cpuid -> the offsets in ``section`` of the module's alternatives on that feature; checks
    that every entry, replacement and run-time test of the module is about that section (the
    update's copy of the function), as ``readelf -r`` would show."""
    obj = RelocatableElf.parse(module)
    relocs = obj.relocations_by_target()
    index = {sec.name: i for i, sec in enumerate(obj.sections)}
    text = index[section]
    for name in (".altinstr_aux", ".altinstr_replacement"):
        code = {obj.symbol_section(r.sym) for r in relocs[index[name]] if obj.symbols[r.sym].type == STT_SECTION}
        assert code == {text}, (name, code)  # section symbols: the jumps back into the copy
    table = obj.sections[index[".altinstructions"]].data
    sites: dict[int, list[int]] = {}
    for r in relocs[index[".altinstructions"]]:
        if r.offset % 12 == 0:
            assert obj.symbol_section(r.sym) == text and table[r.offset + 10] == 5  # instrlen: a jmp rel32
            cpuid = int.from_bytes(table[r.offset + 8:r.offset + 10], "little")
            sites.setdefault(cpuid, []).append(obj.symbols[r.sym].value + r.addend)
    return sites


def test_static_cpu_has_in_a_changed_function(guest, patch_package):
    """The update's own alternatives: the module loader applies them to the update's copy of the
    function as it loads (module_finalize), and the run-time tests they replace jump back into it."""
    pkg = patch_package("cmdline-cpu-features", {"fs/proc/cmdline.c": [
        ("\tseq_puts(m, saved_command_line);",
         '\tseq_printf(m, "[hypervisor %d avx512f %d] ", static_cpu_has(X86_FEATURE_HYPERVISOR) ? 1 : 0,\n'
         "\t\t   static_cpu_has(X86_FEATURE_AVX512F) ? 1 : 0);\n\tseq_puts(m, saved_command_line);")]})
    package = read_package(pkg)
    sites = alternative_sites(package.module, ".text.cmdline_proc_show")
    assert set(sites) >= {X86_FEATURE_HYPERVISOR, X86_FEATURE_AVX512F}, sites
    flags = next(line for line in guest.read("/proc/cpuinfo").splitlines() if line.startswith("flags")).split()
    has = {X86_FEATURE_HYPERVISOR: "hypervisor" in flags, X86_FEATURE_AVX512F: "avx512f" in flags}
    original = guest.read("/proc/cmdline")
    with applied(guest, pkg) as r:
        (func,) = r["functions"]
        assert func["name"] == "cmdline_proc_show"
        expected = f"[hypervisor {int(has[X86_FEATURE_HYPERVISOR])} avx512f {int(has[X86_FEATURE_AVX512F])}] "
        assert guest.read("/proc/cmdline") == expected + original
        # The site each feature test left in the copy: NOPs (fall through to "yes") or a jump to
        # "no" inside the copy; never, as compiled, a jump out to the run-time test.
        offsets = [site for feature in has for site in sites[feature]]
        edition = next(f["edition"] for f in package.manifest["functions"])
        start, *code = guest.run(sys.executable, "-c", READ_CODE, edition, "5",
                                 *map(str, offsets)).stdout.decode().split()
        size = next(sym.size for sym in RelocatableElf.parse(package.module).symbols if sym.name == edition)
        for offset, hexed in zip(offsets, code, strict=True):
            feature = next(f for f in has if offset in sites[f])
            insn = bytes.fromhex(hexed)
            if insn[0] == 0xE9:
                target = offset + 5 + int.from_bytes(insn[1:5], "little", signed=True)
            elif insn[0] == 0xEB:
                target = offset + 2 + int.from_bytes(insn[1:2], "little", signed=True)
            else:
                target = offset + 5  # NOPs
            assert 0 < target < size, (feature, hexed, hex(int(start)))  # inside the update's copy
            assert (target == offset + 5) == has[feature], (feature, hexed)
    assert guest.read("/proc/cmdline") == original


GS_BASE = """
import ctypes
libc, base = ctypes.CDLL(None, use_errno=True), ctypes.c_ulong()
assert libc.syscall(158, 0x1001, ctypes.c_ulong(0x10000)) == 0  # arch_prctl(ARCH_SET_GS)
assert libc.syscall(158, 0x1004, ctypes.byref(base)) == 0  # arch_prctl(ARCH_GET_GS)
print(hex(base.value))
"""


def test_paravirt_sites_of_a_changed_function(guest, patch_package):
    """x86_gsbase_read_cpu_inactive() saves and restores the interrupt flag, and may read an MSR,
    through paravirt calls: its .parainstructions entries travel with it and the loader patches them
    in the update's copy (apply_paravirt), so no site is left calling through pv_ops."""
    pkg = patch_package("gsbase-odd", {"arch/x86/kernel/process_64.c": [
        ("\t\trdmsrl(MSR_KERNEL_GS_BASE, gsbase);\n\t}\n\n\treturn gsbase;",
         "\t\trdmsrl(MSR_KERNEL_GS_BASE, gsbase);\n\t}\n\n\treturn gsbase | 1;")]})
    package = read_package(pkg)
    obj = RelocatableElf.parse(package.module)
    index = {sec.name: i for i, sec in enumerate(obj.sections)}
    text = index[".text.x86_gsbase_read_cpu_inactive"]
    para = [r for r in obj.relocations_by_target()[index[".parainstructions"]] if obj.symbol_section(r.sym) == text]
    assert len(para) >= 3, para  # irq save, irq restore, and more
    assert guest.run(sys.executable, "-c", GS_BASE).stdout.decode().strip() == "0x10000"
    with applied(guest, pkg) as r:
        assert "x86_gsbase_read_cpu_inactive" in [f["name"] for f in r["functions"]]
        assert guest.run(sys.executable, "-c", GS_BASE).stdout.decode().strip() == "0x10001"
        edition = next(f["edition"] for f in package.manifest["functions"]
                       if f["name"] == "x86_gsbase_read_cpu_inactive")
        _, *code = guest.run(sys.executable, "-c", READ_CODE, edition, "2",
                             *(str(obj.symbols[r.sym].value + r.addend) for r in para)).stdout.decode().split()
        assert len(code) == len(para) and "ff15" not in code, code  # call *pv_ops+...(%rip): unpatched
    assert guest.run(sys.executable, "-c", GS_BASE).stdout.decode().strip() == "0x10000"


def test_jump_label_on_a_module_static_key_becomes_a_test_of_the_key(tree, target, workdir):
    """A key defined in a loadable module is resolved only when livepatch patches that module,
    after the kernel has read the update's jump table: its site in the update becomes a jump to a
    test of the key (builder/modkeys.py), and the jump-table entry is dropped. test_module_keys_lab
    runs such an update; this one checks the build says so for dm-bufio's own key."""
    # dm-bufio's lock helpers test no_sleep_enabled, a static key of dm-bufio.ko itself.
    patch = make_patch(tree, workdir / "module-key.patch", {"drivers/md/dm-bufio.c": [
        ("\t\treturn mutex_trylock(&c->lock);", "\t\treturn !dm_bufio_in_request() && mutex_trylock(&c->lock);")]})
    build = build_from_patch(patch, target, output=workdir, name="module-key")
    keys = [line for line in build.explain() if line.strip().startswith("key ")]
    assert keys and all("no_sleep_enabled of module dm_bufio (__jump_table)" in k for k in keys), keys
    assert all("test of the key" in k for k in keys), keys


@pytest.mark.parametrize("name, edits, reason", [
    ("init-change", {"fs/proc/cmdline.c": [
        ('proc_create_single("cmdline", 0,', 'proc_create_single("cmdline", 0444,')]}, "__init"),
    ("data-change", {"kernel/exit.c": [("static unsigned int oops_limit = 10000;",
                                        "static unsigned int oops_limit = 20000;")]}, "oops_limit"),
    # tsc.c is built without -pg: nothing in it has an fentry site for livepatch to use.
    ("notrace-change", {"arch/x86/kernel/tsc.c": [
        ("\t\treturn cycles_2_ns(tsc_now);", "\t\treturn cycles_2_ns(tsc_now) + 1;")]}, "not traceable"),
    ("asm-change", {"arch/x86/lib/memcpy_64.S": [
        ("SYM_FUNC_START_LOCAL(memcpy_orig)", "SYM_FUNC_START_LOCAL(memcpy_orig)\n\tnop")]}, "assembly"),
    ("header-change", {"include/linux/seq_file.h": [("#define _LINUX_SEQ_FILE_H", "#define _LINUX_SEQ_FILE_H\n")]},
     "header"),
    ("vdso-change", {"arch/x86/entry/vdso/vclock_gettime.c": [
        ("#include <linux/time.h>", "#include <linux/types.h>\n#include <linux/time.h>")]}, "vDSO"),
])
def test_refused_patches(tree, target, workdir, name, edits, reason):
    patch = make_patch(tree, workdir / f"{name}.patch", edits)
    with pytest.raises(BuildError) as info:
        build_from_patch(patch, target, output=workdir, name=name)
    assert reason in str(info.value), str(info.value)
    assert not (workdir / f"{name}_{target.release}.dynpkg").exists()


def test_cli_explain(tree, workdir):
    patch = make_patch(tree, workdir / "explain.patch", {"fs/proc/cmdline.c": [
        ("\tseq_puts(m, saved_command_line);", '\tseq_puts(m, "x");\n\tseq_puts(m, saved_command_line);')]})
    import subprocess

    from .conftest import REPO

    r = subprocess.run([sys.executable, "-m", "dynamos", "build", "--patch", str(patch), "--kernel",
                        "6.1.0-56-amd64", "-o", str(workdir), "--explain"], capture_output=True, text=True,
                       cwd=REPO, env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"})
    assert r.returncode == 0, r.stderr
    assert "changed   cmdline_proc_show" in r.stdout and "unchanged" in r.stdout
    checked = next(line for line in r.stdout.splitlines() if line.startswith("  checked   "))
    assert "against kernel 6.1.0-56-amd64:" in checked and " 0 mismatch" in checked, checked


@pytest.mark.parametrize("order", ["module-first", "update-first"])
def test_change_in_a_loadable_module(guest, patch_package, target, order):
    """binfmt_misc is a module in Debian's kernel: the update patches it whether it is loaded
    before the update is applied or only after (livepatch patches it as it loads)."""
    pkg = patch_package("binfmt-status", {"fs/binfmt_misc.c": [
        ('char *s = enabled ? "enabled\\n" : "disabled\\n";',
         'char *s = enabled ? "enabled (patched)\\n" : "disabled\\n";')]})
    module = str(target.module_path("binfmt_misc"))
    status = "mkdir -p /tmp/bm && mount -t binfmt_misc none /tmp/bm && cat /tmp/bm/status; umount /tmp/bm"
    if order == "module-first":
        guest.load_module(module)
    try:
        with applied(guest, pkg) as r:
            assert [(f["name"], f["object"]) for f in r["functions"]] == [("bm_status_read", "binfmt_misc")]
            if order == "update-first":
                assert any("binfmt_misc is not loaded" in n for n in r["notes"]), r["notes"]
                guest.load_module(module)
            assert guest.sh(status).strip() == "enabled (patched)"
        assert guest.sh(status).strip() == "enabled"
    finally:
        guest.unload_module("binfmt_misc")


RAID10 = "drivers/md/raid10.c"
RAID10_WRITE = ("\tif (!md_write_start(mddev, bio))\n\t\treturn false;\n",
                "\tif (!md_write_start(mddev, bio))\n\t\treturn false;\n"
                '\tpr_info("md/raid10:%s: dynamos write of %d sectors\\n", mdname(mddev), sectors);\n')


def md_array(name: str, work: str) -> str:
    """A script: a two-disk raid10 (near=2) called ``name`` on loop devices through md's sysfs (no
    mdadm: no superblock, no resync), ``work`` done on it ($M its md directory, $L0 $L1 its disks),
    then stopped."""
    return f"""set -e
modprobe loop
truncate -s 32M /tmp/d0 /tmp/d1
L0=$(losetup -f --show /tmp/d0); L1=$(losetup -f --show /tmp/d1)
echo {name} > /sys/module/md_mod/parameters/new_array
M=/sys/block/{name}/md
echo none > $M/metadata_version; echo raid10 > $M/level; echo 65536 > $M/chunk_size
echo 258 > $M/layout; echo 2 > $M/raid_disks
for L in $L0 $L1; do echo $(cat /sys/block/${{L#/dev/}}/dev) > $M/new_dev; done
echo 0 > $M/dev-${{L0#/dev/}}/slot; echo 1 > $M/dev-${{L1#/dev/}}/slot
echo 30000 > $M/component_size; echo none > $M/resync_start
echo active > $M/array_state
{work}
echo clear > $M/array_state
losetup -d $L0 $L1
"""


MD_ARRAY = md_array("md7", "dd if=/dev/zero of=/dev/md7 bs=4k count=2 oflag=direct 2>/dev/null")


def test_module_fix_using_another_modules_exports_applied_before_either_loads(guest, patch_package):
    """raid10's fix calls md_mod's exports md_write_start/md_write_end: the update loads with
    neither module loaded (their relocations are raid10's, written when raid10 loads after md_mod),
    raid10 gets patched when modprobe loads it, and writes to a raid10 array run the new code."""
    pkg = patch_package("raid10-writes", {RAID10: [RAID10_WRITE]})
    lsmod = "for m in raid10 md_mod; do test -d /sys/module/$m && echo $m; done; true"
    assert guest.sh(lsmod).split() == []
    patched = "/sys/kernel/livepatch/raid10_writes/raid10/patched"
    try:
        with applied(guest, pkg) as r:
            assert {f["object"] for f in r["functions"]} == {"raid10"}
            assert any("raid10 is not loaded" in n for n in r["notes"]), r["notes"]
            assert guest.read(patched).strip() == "0"
            guest.sh("modprobe raid10")
            assert guest.sh(lsmod).split() == ["raid10", "md_mod"]
            assert guest.read(patched).strip() == "1"
            guest.sh(MD_ARRAY)
            log = guest.sh("dmesg")
            assert "md/raid10:md7: dynamos write of 8 sectors" in log, log[-3000:]
            assert "livepatch: symbol" not in log, log[-3000:]
        assert not guest.sh("ls /sys/kernel/livepatch").split()
    finally:
        guest.run("modprobe", "-r", "raid10", "md_mod", "loop", check=False)
