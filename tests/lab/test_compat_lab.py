"""A patch written for kpatch-build, built unchanged by ``dynamos build --patch`` and applied in
the lab: its KPATCH_*_CALLBACK macros become the update's livepatch callbacks and its
KPATCH_SYSCALL_DEFINE1 body replaces the running syscall, until the update is reverted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.lab

KPATCH_PATCH = Path(__file__).resolve().parent / "patches" / "kpatch-personality.patch"
# personality(0x5a5a): the kernel sets that personality and returns the old one (0); the patched
# body answers 0x7e57 and changes nothing.
ASK = [sys.executable, "-c", "import ctypes; print(ctypes.CDLL(None).personality(0x5a5a))"]


def callback_lines(guest) -> list[str]:
    return [line.split("kpatch-personality: ", 1)[1] for line in guest.sh("dmesg").splitlines()
            if "kpatch-personality: " in line]


def test_kpatch_patch_with_callbacks_and_a_syscall_builds_unchanged_and_applies(guest, target, workdir):
    out = workdir / "kpatch-compat"
    out.mkdir(exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "dynamos", "build", "--patch", str(KPATCH_PATCH), "--kernel",
                        target.release, "-o", str(out), "--explain"], capture_output=True, text=True, cwd=REPO,
                       env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"})
    assert r.returncode == 0, r.stderr
    assert "changed   __x64_sys_personality" in r.stdout, r.stdout
    assert "new       personality_post_unpatch: post_unpatch callback" in r.stdout, r.stdout
    (pkg,) = out.glob("kpatch-personality*.dynpkg")

    guest.sh("dmesg -c > /dev/null")
    assert int(guest.run(*ASK).stdout) == 0
    name = None
    try:
        applied = guest.dynamos("apply", str(pkg), "--json")
        name = "kpatch-personality"
        assert "__x64_sys_personality" in applied.stdout.decode()
        assert callback_lines(guest) == ["pre_patch vmlinux", "post_patch vmlinux"]
        assert [int(guest.run(*ASK).stdout) for _ in range(2)] == [0x7E57, 0x7E57]
        assert int(guest.run(sys.executable, "-c", "import ctypes; print(ctypes.CDLL(None).personality(8))"
                             ).stdout) == 0  # other requests still reach the kernel's code
    finally:
        if name:
            guest.dynamos("revert", name)
    assert callback_lines(guest) == ["pre_patch vmlinux", "post_patch vmlinux", "pre_unpatch vmlinux",
                                     "post_unpatch vmlinux"]
    assert int(guest.run(*ASK).stdout) == 0
    assert "kpatch_personality" not in guest.livepatches()
