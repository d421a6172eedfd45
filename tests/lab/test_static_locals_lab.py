"""Static locals and compiler-named data through real patches, in the lab kernel.

A static variable of a function that gcc inlined into its callers keeps the running kernel's
value across the update (the update's code uses the kernel's copy, found by address whatever
gcc's number), ``__func__`` in a changed module function is the update's own constant, and a
static of size zero (the lock-class key of every mutex_init, absent from kallsyms with lockdep
off) travels with the update.
"""

from __future__ import annotations

import re
import sys

import pytest

from tests.lab.test_patches import applied, patch_package, tree  # noqa: F401  (fixtures)

pytestmark = pytest.mark.lab

# security/commoncap.c: warn_setuid_and_fcaps_mixed() is inlined into the bprm hook; its
# `static int warned` (warned.N in kallsyms, one of many) becomes a counter the patch prints.
WARNED_BEFORE = """static void warn_setuid_and_fcaps_mixed(const char *fname)
{
\tstatic int warned;
\tif (!warned) {
\t\tprintk(KERN_INFO "warning: `%s' has both setuid-root and"
\t\t\t" effective capabilities. Therefore not raising all"
\t\t\t" capabilities.\\n", fname);
\t\twarned = 1;
\t}"""
# A new helper with a static of its own comes first: gcc numbers warned otherwise than the kernel
# did (warned.3, which is another file's variable in the running kernel).
WARNED_AFTER = """static noinline unsigned int dynamos_count_call(void)
{
\tstatic unsigned int calls;

\treturn ++calls;
}

static void warn_setuid_and_fcaps_mixed(const char *fname)
{
\tstatic int warned;
\tunsigned int call = dynamos_count_call();

\tif (warned < 5) {
\t\tprintk(KERN_INFO "dynamos-warned %d: `%s' (call %u of the update)\\n", warned, fname, call);
\t\twarned++;
\t}"""

# Exec a setuid-root file with file capabilities as an unprivileged user: the mix the warning is about.
TRIGGER = r"""
import os, shutil, struct
path = "/tmp/suidcap"
if not os.path.exists(path):
    shutil.copy("/bin/true", path)
    os.chown(path, 0, 0)
    os.chmod(path, 0o4755)
    # VFS_CAP_REVISION_2 | effective; permitted: CAP_NET_RAW
    os.setxattr(path, "security.capability", struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0))
pid = os.fork()
if pid == 0:
    os.setgid(65534)
    os.setuid(65534)
    os.execv(path, [path])
os.waitpid(pid, 0)
"""


def trigger(guest) -> None:
    guest.run(sys.executable, "-c", TRIGGER)


def test_a_static_local_of_an_inlined_function_keeps_its_state(guest, patch_package):  # noqa: F811
    pkg = patch_package("fcaps-warned", {"security/commoncap.c": [(WARNED_BEFORE, WARNED_AFTER)]})
    guest.sh("dmesg -c > /dev/null")
    trigger(guest)  # the kernel's own code: warns once per boot and sets warned = 1
    trigger(guest)
    with applied(guest, pkg):
        trigger(guest)
        trigger(guest)
        lines = [line for line in guest.sh("dmesg").splitlines() if "dynamos-warned" in line]
        seen = [re.search(r"dynamos-warned (\d+): .* \(call (\d+) of the update\)", line) for line in lines]
        # warned continues from the running kernel's 1 (not a copy's 0, nor another file's
        # warned.3); calls, new with the update, starts from the update's own 0.
        got = [m.groups() if m else line for m, line in zip(seen, lines, strict=True)]
        assert got == [("1", "1"), ("2", "2")], lines


def test_func_in_a_changed_module_function(guest, patch_package, target):  # noqa: F811
    # loop.c has several __func__; the changed function prints its own name through __func__.
    pkg = patch_package("loop-func", {"drivers/block/loop.c": [
        ("\tif (rc)\n\t\tpr_warn(\"%s: partition scan of loop%d (%s) failed (rc=%d)\\n\",",
         "\tpr_warn(\"dynamos %s: partition scan of loop%d (%s) gave rc=%d\\n\",")]})
    guest.run("modprobe", "loop")
    try:
        with applied(guest, pkg) as r:
            assert {f["object"] for f in r["functions"]} == {"loop"}, r["functions"]
            guest.sh("dmesg -c > /dev/null; dd if=/dev/zero of=/tmp/loopimg bs=1k count=256 2>/dev/null; "
                     "losetup -P /dev/loop0 /tmp/loopimg; losetup -d /dev/loop0")
            lines = [line for line in guest.sh("dmesg").splitlines() if "dynamos " in line]
            assert lines and all("dynamos loop_reread_partitions: partition scan of loop0" in line
                                 for line in lines), lines
    finally:
        guest.run("modprobe", "-r", "loop", check=False)


# fs/pipe.c: alloc_pipe_info() initialises two wait queues and a mutex, each with a static
# `struct lock_class_key __key` of size zero that kallsyms does not list. The fix makes a new
# pipe hold one buffer less than its ring, which F_GETPIPE_SZ shows (max_usage pages).
PIPE_BEFORE = "\t\tpipe->max_usage = pipe_bufs;\n"
PIPE_AFTER = "\t\tpipe->max_usage = pipe_bufs > 1 ? pipe_bufs - 1 : pipe_bufs;\n"
PIPE_SIZE = "import fcntl, os; r, w = os.pipe(); print(fcntl.fcntl(w, fcntl.F_GETPIPE_SZ))"


def test_a_zero_size_lock_key_of_a_changed_function_travels_with_it(guest, patch_package):  # noqa: F811
    pkg = patch_package("pipe-keys", {"fs/pipe.c": [(PIPE_BEFORE, PIPE_AFTER)]})
    page = int(guest.sh("getconf PAGESIZE"))
    before = int(guest.run(sys.executable, "-c", PIPE_SIZE).stdout)
    with applied(guest, pkg) as r:
        assert [f["name"] for f in r["functions"]] == ["alloc_pipe_info"], r["functions"]
        assert int(guest.run(sys.executable, "-c", PIPE_SIZE).stdout) == before - page
        guest.sh("echo through the pipes of the update | cat | cat > /dev/null")  # its wait queues and mutex work
    assert int(guest.run(sys.executable, "-c", PIPE_SIZE).stdout) == before
