"""A changed module function with tracepoints of its own module, in the lab kernel.

ext4_sync_file() (fs/ext4/fsync.c, module ext4) calls trace_ext4_sync_file_enter/exit: jump labels
on ``__tracepoint_ext4_sync_file_*.key`` and static calls through ``__SCK__tp_func_ext4_sync_file_*``,
all defined in ext4, which livepatch resolves only when ext4 is patched (builder/modkeys.py). The fix
passes ``datasync + 40`` to the enter event: a line saying ``datasync 40`` in the trace can only come
from the update's code.
"""

from __future__ import annotations

import sys

import pytest

from tests.lab.test_patches import RAID10, applied, md_array, patch_package, tree  # noqa: F401  (fixtures)

pytestmark = pytest.mark.lab

FSYNC = "fs/ext4/fsync.c"
EDIT = ("\ttrace_ext4_sync_file_enter(file, datasync);", "\ttrace_ext4_sync_file_enter(file, datasync + 40);")
EVENT = "/sys/kernel/tracing/events/ext4/ext4_sync_file_enter/enable"
MOUNT = "mke2fs -q -t ext4 -F /tmp/ext4.img 8M && mkdir -p /tmp/e4 && mount -o loop /tmp/ext4.img /tmp/e4"
SYNC = ("import os\nfd = os.open('/tmp/e4/f', os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')\n"
        "os.fsync(fd)\nos.write(fd, b'y')\nos.fdatasync(fd)\nos.close(fd)\n")


def synced(guest) -> list[str]:
    """The datasync values the enter event recorded for one fsync() and one fdatasync()."""
    guest.sh("echo > /sys/kernel/tracing/trace")
    guest.run(sys.executable, "-c", SYNC)
    return [line.split("datasync ")[1].split()[0] for line in guest.read("/sys/kernel/tracing/trace").splitlines()
            if "ext4_sync_file_enter:" in line]


def test_a_tracepoint_of_the_module_fires_from_the_update(guest, patch_package):  # noqa: F811
    pkg = patch_package("ext4-trace", {FSYNC: [EDIT]})
    guest.sh("dmesg -c > /dev/null")
    assert "ext4" not in guest.modules()
    patched = "/sys/kernel/livepatch/ext4_trace/ext4/patched"
    try:
        with applied(guest, pkg) as r:  # before ext4 loads: its relocations wait for ext4
            assert [(f["name"], f["object"]) for f in r["functions"]] == [("ext4_sync_file", "ext4")]
            assert guest.read(patched).strip() == "0"
            guest.sh("modprobe ext4 && modprobe loop && " + MOUNT)
            assert guest.read(patched).strip() == "1"
            assert synced(guest) == []  # event off: the always-taken branch finds no probe
            guest.sh(f"echo 1 > {EVENT}")
            assert synced(guest) == ["40", "41"]
        assert synced(guest) == ["0", "1"]  # reverted: ext4's own code, its own jump label
        with applied(guest, pkg):  # ext4 already loaded
            assert guest.read(patched).strip() == "1"
            assert synced(guest) == ["40", "41"]
            guest.sh(f"echo 0 > {EVENT}")
            assert synced(guest) == []
        log = guest.sh("dmesg")  # oops, WARN and BUG lines fail every guest command (conftest)
        assert "livepatch: symbol" not in log, log[-3000:]
    finally:
        guest.sh(f"echo 0 > {EVENT} 2>/dev/null; umount /tmp/e4 2>/dev/null; losetup -D; true", check=False)
        guest.run("modprobe", "-r", "ext4", "loop", check=False)


# dm.c's alloc_io(), inlined into dm_submit_bio(), records the start of an I/O for dm statistics behind
# static_branch_unlikely(&stats_enabled): a key of dm_mod, enabled for good by the first @stats_create.
# gcc gives that site (and zoned_enabled's) 5 bytes: each becomes a jump to a test of the key.
DM = "drivers/md/dm.c"
DM_EDIT = ("\tif (static_branch_unlikely(&stats_enabled))\n\t\tdm_stats_record_start(&md->stats, &io->stats_aux);\n",
           "\tif (static_branch_unlikely(&stats_enabled)) {\n\t\tdm_stats_record_start(&md->stats, &io->stats_aux);\n"
           "\t\tpr_info_ratelimited(\"dynamos: dm stats start of %u sectors\\n\", bio_sectors(bio));\n\t}\n")
DM_SETUP = ("modprobe dm_mod && modprobe loop && dd if=/dev/zero of=/tmp/dm.img bs=1M count=2 2>/dev/null && "
            "losetup /dev/loop7 /tmp/dm.img && dmsetup create dynkey --table '0 4096 linear /dev/loop7 0'")
# No udev in the lab: the kernel's own node (devtmpfs), named by dmsetup.
WRITE = ("dd if=/dev/zero of=/dev/$(dmsetup info -c --noheadings -o blkdevname dynkey) bs=4k count=1 "
         "oflag=direct status=none")


def started(guest) -> list[str]:
    """The update's lines for one 4 KiB direct write through the device."""
    guest.sh("dmesg -c > /dev/null; " + WRITE)
    return [line.split("dynamos: ")[1] for line in guest.sh("dmesg").splitlines() if "dynamos: dm stats" in line]


def test_a_plain_static_key_of_the_module_is_tested_by_the_update(guest, patch_package):  # noqa: F811
    pkg = patch_package("dm-stats-key", {DM: [DM_EDIT]})
    try:
        guest.sh(DM_SETUP)
        with applied(guest, pkg) as r:
            assert [(f["name"], f["object"]) for f in r["functions"]] == [("dm_submit_bio", "dm_mod")]
            assert started(guest) == []  # the key is off: the test falls through
            guest.sh("dmsetup message dynkey 0 @stats_create - /1")  # static_branch_enable(&stats_enabled)
            assert started(guest) == ["dm stats start of 8 sectors"]
            counters = guest.sh("dmsetup message dynkey 0 @stats_print 0").split()
            # region, then reads, merged, sectors, ms; writes, merged, sectors: dm_mod's accounting still runs
            assert (counters[5], counters[7]) == ("1", "8"), counters
        assert started(guest) == []  # reverted: dm_mod's own code, no line
        log = guest.sh("dmesg")
        assert "livepatch: symbol" not in log, log[-3000:]
    finally:
        guest.sh("dmsetup remove dynkey; losetup -d /dev/loop7; true", check=False)
        guest.run("modprobe", "-r", "dm_mod", "loop", check=False)


PRINT_CONF = ("\t\tif (rdev)\n\t\t\tpr_debug(\" disk %d, wo:%d, o:%d, dev:%pg\\n\",",
              "\t\tif (rdev && rdev->bdev)\n\t\t\tpr_debug(\" disk %d, wo:%d, o:%d, dev:%pg\\n\",")
# Failing and removing a disk makes raid10_remove_disk print the configuration (print_conf).
DEGRADE = "echo faulty > $M/dev-${L1#/dev/}/state\necho remove > $M/dev-${L1#/dev/}/state"


def test_a_pr_debug_of_the_changed_module_function_prints_from_the_update(guest, patch_package):  # noqa: F811
    """print_conf's pr_debug sites are 2-byte jump labels on descriptors of raid10, too short for a
    test of raid10's key: the update carries its own descriptors, switched on by ``module <update>``.
    Only the update's descriptors are enabled, so a printed line comes from the update's code."""
    pkg = patch_package("raid10-debug", {RAID10: [PRINT_CONF]})
    control = "/proc/dynamic_debug/control"
    try:
        with applied(guest, pkg):
            guest.sh("modprobe raid10 && dmesg -c > /dev/null")
            ours = [line for line in guest.read(control).splitlines() if "[raid10_debug]" in line]
            assert any("print_conf" in line and "disk %d" in line for line in ours), ours
            assert not any("[raid10_debug]" in line for line in guest.read(control).splitlines() if "=p" in line)
            guest.sh("echo 'module raid10_debug +p' > " + control)
            guest.sh(md_array("md8", DEGRADE))
            log = guest.sh("dmesg")
            assert "RAID10 conf printout:" in log and " disk 0, wo:0, o:1, dev:loop" in log, log[-3000:]
            guest.sh("echo 'module raid10_debug -p' > " + control + " && dmesg -c > /dev/null")
            guest.sh(md_array("md9", DEGRADE))
            assert "RAID10 conf printout:" not in guest.sh("dmesg"), "printed with its descriptors off"
        assert "[raid10_debug]" not in guest.read(control)
    finally:
        guest.run("modprobe", "-r", "raid10", "md_mod", "loop", check=False)
