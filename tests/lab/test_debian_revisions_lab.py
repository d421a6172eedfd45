"""Debian's own security revisions of linux-source-6.1, each built by ``build --to`` from the two
versions' source packages and applied live on the kernel that runs the older revision, with
the changed module loaded before the update and loaded after it, a workload that calls the
changed code, and proof that the update's code ran: ftrace on the update's copy of the function
(``:mod:<update module>`` selects only that copy, never the original).

- 6.1.192-1 -> 6.1.192-2 (ext4 mballoc NULL folio fix) on 6.1.0-55-amd64, which runs 6.1.192-1:
  an ext4 file system on a loop device written, synced and read back.
- 6.1.192-2 -> 6.1.192-3 (nfsd SEQUENCE preflight) on 6.1.0-56-amd64, which runs 6.1.192-2: the
  guest's nfsd serves an NFSv4.1 mount of its own /tmp over loopback, set up through
  /proc/fs/nfsd and the kernel's export caches (no NFS userland, nothing on the host); every
  compound of a v4.1 client starts with SEQUENCE.

Each test boots its own lab of the release; its two vCPUs run on one QEMU thread because the function tracer
rewrites call sites, which QEMU's multi-threaded TCG hung on here (see
``bench/bench_two_vcpu_stalls.py``). Timings go to stderr (pytest -s shows them).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from dynamos.builder.debian import CARRIED, build_to
from dynamos.target import fetch_target
from tests.lab.conftest import uniprocessor_guest

pytestmark = pytest.mark.lab
EXT4_RELEASE = "6.1.0-55-amd64"  # linux-image-6.1.0-55-amd64 runs linux-source-6.1 6.1.192-1
# ext4_mb_get_buddy_page_lock, changed too, is inlined into ext4_mb_init_group.
EXT4_FUNCTIONS = {"ext4_mb_load_buddy_gfp", "ext4_mb_init_group"}
UPDATE_COPY = "dynamos_edition__"  # the name of a function's copy in the update's module

# An ext4 file system on a loop device in the guest's tmpfs, in two halves. WRITE: four copies of
# 8 MiB written in 64 KiB pieces and synced (each allocation loads a group's buddy bitmap).
# REUSE: the page cache dropped, the copies read back and deleted: freeing their blocks loads the
# buddy bitmaps again, now absent from the page cache. That is the bug the revision fixes:
# 6.1.192-1's ext4_mb_load_buddy_gfp takes the NULL that __filemap_get_folio returns for a page
# not in the cache for an error pointer and dereferences it.
EXT4_WRITE = r"""
set -e
dev=$(losetup -f --show /tmp/ext4.img)
mkdir -p /tmp/ext4mnt
mount -t ext4 "$dev" /tmp/ext4mnt
dd if=/dev/urandom of=/tmp/ext4.data bs=64k count=128 status=none
for i in 1 2 3 4; do dd if=/tmp/ext4.data of=/tmp/ext4mnt/f$i bs=64k conv=fsync status=none; done
sync
echo ok
"""
EXT4_REUSE = r"""
set -e
echo 3 > /proc/sys/vm/drop_caches
for i in 1 2 3 4; do cmp /tmp/ext4.data /tmp/ext4mnt/f$i; done
rm /tmp/ext4mnt/f1 /tmp/ext4mnt/f2 /tmp/ext4mnt/f3 /tmp/ext4mnt/f4
sync
umount /tmp/ext4mnt
losetup -D
echo ok
"""

# The guest's nfsd, v4.1 only (no rpcbind needed), exporting /tmp/export as the v4 root (fsid 0)
# to 127.0.0.1. The export caches are filled as mountd would (domain "lab"), never expiring.
NFSD_START = r"""
set -e
ip link set lo up
mountpoint -q /proc/fs/nfsd || mount -t nfsd nfsd /proc/fs/nfsd
mkdir -p /tmp/export /var/lib/nfs/v4recovery /tmp/nfsmnt
echo "-2 -3 +4 +4.1 -4.2" > /proc/fs/nfsd/versions
echo 10 > /proc/fs/nfsd/nfsv4gracetime
echo 10 > /proc/fs/nfsd/nfsv4leasetime
echo 2 > /proc/fs/nfsd/threads
never=2147483647
echo "nfsd 127.0.0.1 $never lab" > /proc/net/rpc/auth.unix.ip/channel
echo "lab /tmp/export $never 8194 65534 65534 0" > /proc/net/rpc/nfsd.export/channel
echo "lab 1 \\x00000000 $never /tmp/export" > /proc/net/rpc/nfsd.fh/channel
mount -t nfs4 -o vers=4.1,addr=127.0.0.1,clientaddr=127.0.0.1,sec=sys 127.0.0.1:/ /tmp/nfsmnt
echo ok
"""
# Through the mount: a file written by the server side read by the client, and one written by
# the client read on the server side; then the client and the server stopped.
NFSD_USE = r"""
set -e
echo "from the server $$" > /tmp/export/server
test "$(cat /tmp/nfsmnt/server)" = "from the server $$"
ls -la /tmp/nfsmnt > /dev/null
echo "from the client $$" > /tmp/nfsmnt/client
test "$(cat /tmp/export/client)" = "from the client $$"
rm /tmp/nfsmnt/client /tmp/export/server
echo ok
"""
NFSD_STOP = r"""
set -e
umount /tmp/nfsmnt
echo 0 > /proc/fs/nfsd/threads
umount /proc/fs/nfsd
echo ok
"""


def _say(message: str) -> None:
    print(f"debian revisions: {message}", file=sys.stderr, flush=True)


class Tracer:
    """The function tracer limited to functions of one module (``FUNCTION:mod:MODULE``): with an
    update's module, a line in the trace is a call of the update's code."""

    ROOT = "/sys/kernel/tracing"

    def __init__(self, guest, module: str, functions: str = "*"):
        self.guest, self.filter = guest, f"{functions}:mod:{module}"

    def __enter__(self) -> Tracer:
        t = self.ROOT
        self.guest.sh(f"echo 0 > {t}/tracing_on; echo > {t}/trace; "
                      f"echo '{self.filter}' > {t}/set_ftrace_filter; "
                      f"echo function > {t}/current_tracer; echo 1 > {t}/tracing_on")
        return self

    def calls(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for line in self.guest.read(f"{self.ROOT}/trace").splitlines():
            if line.startswith("#") or ": " not in line:
                continue
            name = line.rsplit(": ", 1)[1].split(" <-")[0].strip()
            counts[name] = counts.get(name, 0) + 1
        return counts

    def __exit__(self, *exc: object) -> None:
        t = self.ROOT
        self.guest.sh(f"echo 0 > {t}/tracing_on; echo nop > {t}/current_tracer; "
                      f"echo > {t}/set_ftrace_filter; echo > {t}/trace")


def _revision_package(workdir: Path, release: str, to: str, changed: str) -> tuple[Path, dict]:
    """``build --to``'s update from the version ``release`` runs to ``to``: one cumulative update
    carrying the revision's one changed file (it fails naming the archive's versions if one is gone)."""
    out = workdir / "debian-revisions"
    out.mkdir(exist_ok=True)
    t = time.monotonic()
    build = build_to(fetch_target(release), to, output=out)
    _say(f"build --to {to} for {release} in {time.monotonic() - t:.1f} s")
    assert [(f.path, f.status) for f in build.files] == [(changed, CARRIED)], build.files
    assert not build.partial and build.package_path is not None
    assert [e.version for e in build.changelog] == [to]
    return build.package_path, {"from": build.from_version, "cves": build.cves}


@pytest.fixture(scope="module")
def ext4_package(workdir) -> Path:
    pkg, built = _revision_package(workdir, EXT4_RELEASE, "6.1.192-2", "fs/ext4/mballoc.c")
    assert built["from"] == "6.1.192-1"
    return pkg


def _apply(g, pkg: Path) -> dict:
    result = json.loads(g.dynamos("apply", str(pkg), "--json").stdout)
    assert g.read(f"/sys/kernel/livepatch/{result['livepatch_name']}/transition").strip() == "0"
    return result


def _ext4(g, script: str) -> None:
    assert g.sh(script, timeout=300).strip() == "ok"


def test_debians_ext4_revision_applies_live_with_ext4_loaded_after_and_before(workdir, ext4_package):
    t0 = time.monotonic()
    with uniprocessor_guest(fetch_target(EXT4_RELEASE), workdir, "ext4-revision", cpus=2,
                            tcg_threads="single") as g:
        assert EXT4_RELEASE in g.read("/proc/version")
        g.sh("modprobe loop; dd if=/dev/zero of=/tmp/ext4.img bs=1M count=64 status=none; "
             "mkfs.ext4 -q -F /tmp/ext4.img")
        assert "ext4" not in g.modules()

        # Loaded after: the update goes live first; ext4 loads later and is patched as it loads.
        result = _apply(g, ext4_package)
        name = result["livepatch_name"]
        assert {(f["name"], f["object"]) for f in result["functions"]} == {(f, "ext4") for f in EXT4_FUNCTIONS}
        g.run("modprobe", "ext4")
        assert g.read(f"/sys/kernel/livepatch/{name}/ext4/patched").strip() == "1"
        with Tracer(g, name) as tracer:
            _ext4(g, EXT4_WRITE)
            _ext4(g, EXT4_REUSE)
            after = tracer.calls()
        _say(f"ext4 loaded after the update: update's functions called {after}")
        assert after.get(UPDATE_COPY + "ext4_mb_load_buddy_gfp", 0) > 0, after
        assert after.get(UPDATE_COPY + "ext4_mb_init_group", 0) > 0, after  # groups first used
        g.dynamos("revert", name)
        assert name not in g.livepatches()
        g.run("modprobe", "-r", "ext4")

        # Loaded first: ext4 in use (mounted, written) before the update; the update's code serves it
        # afterwards, through the part the running code would crash on.
        g.run("modprobe", "ext4")
        with Tracer(g, "ext4", "ext4_mb_load_buddy_gfp") as original:
            _ext4(g, EXT4_WRITE)
            assert original.calls().get("ext4_mb_load_buddy_gfp", 0) > 0  # the kernel's own, so far
        result = _apply(g, ext4_package)
        with Tracer(g, name) as tracer:
            _ext4(g, EXT4_REUSE)
            first = tracer.calls()
        _say(f"ext4 loaded before the update: update's functions called {first}")
        assert first.get(UPDATE_COPY + "ext4_mb_load_buddy_gfp", 0) > 0, first
        g.dynamos("revert", name)
        assert name not in g.modules() and g.livepatches() == []

        # What the update prevented: the same two halves on the kernel's own 6.1.192-1 code oops in
        # the function the revision fixes (the last thing this lab does).
        _ext4(g, EXT4_WRITE)
        crashed = g.lab.run(["sh", "-c", EXT4_REUSE], timeout=60)
        trouble = "\n".join(crashed.kernel_messages) + g.lab.console_text()
        assert "BUG: kernel NULL pointer dereference" in trouble, crashed.kernel_messages
        assert "ext4_mb_load_buddy_gfp" in trouble, crashed.kernel_messages
        _say(f"ext4 revision test in {time.monotonic() - t0:.1f} s")


NFSD_RELEASE = "6.1.0-56-amd64"  # linux-image-6.1.0-56-amd64 runs linux-source-6.1 6.1.192-2
NFSD_MODULES = ("nfsd", "nfsv4")


NFSD_TO = "6.1.192-3"


@pytest.fixture(scope="module")
def nfsd_package(workdir) -> tuple[Path, list[str]]:
    pkg, built = _revision_package(workdir, NFSD_RELEASE, NFSD_TO, "fs/nfsd/nfs4state.c")
    assert built["from"] == "6.1.192-2"
    return pkg, built["cves"]


def test_debians_nfsd_revision_serves_a_v41_mount_with_nfsd_loaded_after_and_before(workdir, nfsd_package):
    """Also what ``status`` says of the running code while the update is live: the effective
    Debian version, the CVEs of the changelog entries it carries, and nothing once reverted."""
    nfsd_package, cves = nfsd_package
    assert cves, "the 6.1.192-3 changelog names the CVE it fixes"
    t0 = time.monotonic()
    with uniprocessor_guest(fetch_target(NFSD_RELEASE), workdir, "nfsd-revision", cpus=2,
                            tcg_threads="single") as g:
        assert "nfsd" not in g.modules()

        # Loaded after: the update first, then nfsd, patched as it loads, serves the mount.
        result = _apply(g, nfsd_package)
        name = result["livepatch_name"]
        assert [(f["name"], f["object"]) for f in result["functions"]] == [("nfsd4_sequence", "nfsd")]
        g.run("modprobe", "-a", *NFSD_MODULES)
        assert g.read(f"/sys/kernel/livepatch/{name}/nfsd/patched").strip() == "1"
        with Tracer(g, name) as tracer:
            assert g.sh(NFSD_START, timeout=180).strip() == "ok"
            assert g.sh(NFSD_USE, timeout=180).strip() == "ok"
            after = tracer.calls()
        _say(f"nfsd loaded after the update: update's functions called {after}")
        assert after.get(UPDATE_COPY + "nfsd4_sequence", 0) > 0, after
        assert g.sh(NFSD_STOP, timeout=180).strip() == "ok"
        g.dynamos("revert", name)
        g.run("modprobe", "-r", "-a", *NFSD_MODULES)

        # Loaded first: the server running and mounted before the update; the update serves the
        # same client's next compounds, and reverting it leaves the mount working.
        g.run("modprobe", "-a", *NFSD_MODULES)
        assert g.sh(NFSD_START, timeout=180).strip() == "ok"
        result = _apply(g, nfsd_package)
        with Tracer(g, name) as tracer:
            assert g.sh(NFSD_USE, timeout=180).strip() == "ok"
            first = tracer.calls()
        _say(f"nfsd loaded before the update: update's functions called {first}")
        assert first.get(UPDATE_COPY + "nfsd4_sequence", 0) > 0, first
        status = json.loads(g.dynamos("status", "--json").stdout)
        assert status["effective_version"] == f"6.1.192-2, live-updated to {NFSD_TO}", status
        assert status["cves"] == cves
        [update] = [u for u in status["updates"] if u["name"] == name]
        assert update["replace"] is True and update["debian"]["partial"] is False
        text = g.dynamos("status").stdout.decode()
        assert f"effective version 6.1.192-2, live-updated to {NFSD_TO}" in text, text
        g.dynamos("revert", name)
        assert name not in g.modules() and g.livepatches() == []
        assert "effective_version" not in json.loads(g.dynamos("status", "--json").stdout)
        assert g.sh(NFSD_USE, timeout=180).strip() == "ok"
        assert g.sh(NFSD_STOP, timeout=180).strip() == "ok"
        _say(f"nfsd revision test in {time.monotonic() - t0:.1f} s")
