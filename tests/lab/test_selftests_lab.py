"""The kernel's own livepatch selftests, run in the lab on the target kernel, and dynamos' status
beside a foreign livepatch that replaces a dynamos update.

Debian does not build the selftests' modules (CONFIG_TEST_LIVEPATCH is not set), so they are
compiled here, once per session, from the target's cached source tree (``lib/livepatch``) as
external modules against the target's headers, then installed where modprobe finds them in the
guest (``/lib/modules/<release>/extra``, writable there over the read-only cache) with the
index depmod gives them (written on the host: see ``dynamos.lab.modules.stage_modules``).
The scripts run from the source tree with bash, as the kselftest runner runs them: exit 0
passes, 4 is a skip (a failure here: these tests are never skipped), anything else fails.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dynamos.lab.modules import stage_modules
from dynamos.target.make import MAKE_JOBS, error_lines, make_env, stream_make
from dynamos.target.source import prepare_source, tree_lock

from .conftest import EXAMPLES, Guest

pytestmark = pytest.mark.lab

SELFTESTS_DIR = "tools/testing/selftests/livepatch"
MODULES_SRC = "lib/livepatch"
# The scripts of tools/testing/selftests/livepatch/Makefile (TEST_PROGS), in its order.
SELFTESTS = ("test-livepatch.sh", "test-callbacks.sh", "test-shadow-vars.sh", "test-state.sh",
             "test-ftrace.sh", "test-sysfs.sh")
KSFT_SKIP = 4
INSTALL_DIR = "extra/klp-selftests"
SAVED_INDEX = "/tmp/klp-selftests-index"  # the guest's module index as found (guest tmpfs)


@pytest.fixture(scope="session")
def kernel_source(target):
    return prepare_source(target)


@pytest.fixture(scope="session")
def klp_test_modules(target, workdir, kernel_source) -> Path:
    """The selftests' modules, built on the host from the cached source tree (the sources are
    copied into a scratch Kbuild directory, never into this repository)."""
    out = workdir / "klp-selftest-modules"
    out.mkdir()
    with tree_lock(target.release, shared=True):
        sources = sorted((kernel_source.tree / MODULES_SRC).glob("test_klp_*.c"))
        for src in sources:
            shutil.copy(src, out)
    assert len(sources) >= 10, f"expected the livepatch test modules in {kernel_source.tree / MODULES_SRC}"
    (out / "Kbuild").write_text("obj-m := " + " ".join(s.with_suffix(".o").name for s in sources) + "\n")
    cmd = ["make", "-C", str(target.headers_dir), f"M={out}", f"-j{MAKE_JOBS}", "modules"]
    status, log = stream_make(cmd, make_env(), lambda _line: None)
    if status != 0:
        pytest.fail("building the livepatch selftest modules failed:\n" + "\n".join(error_lines(log) or [log[-3000:]]))
    return out


@pytest.fixture(scope="module")
def installed_klp_modules(guest: Guest, klp_test_modules: Path, target, workdir) -> None:
    """The test modules in the guest's /lib/modules/<release>/extra, with the index depmod would
    write there (staged on the host); afterwards removed and the index put back as it was."""
    staged = stage_modules(target, sorted(klp_test_modules.glob("*.ko")), workdir / "klp-stage", INSTALL_DIR)
    moddir = f"/lib/modules/{target.release}"
    guest.sh(f"mkdir -p {SAVED_INDEX} && cp -p {moddir}/modules.* {SAVED_INDEX}/\n" + staged.install_script())
    yield
    guest.sh(f"rm -r {moddir}/{INSTALL_DIR} && cp -p {SAVED_INDEX}/modules.* {moddir}/ && rm -r {SAVED_INDEX}")


# Runs each script with its output and exit status kept apart, in one guest command (one Python
# start-up in the guest, not one per script).
_RUNNER = """
cd "$1"; out="$2"; shift 2
for t in "$@"; do
    start=$(cut -d' ' -f1 /proc/uptime)
    bash "./$t" > "$out/$t.log" 2>&1
    echo $? $start $(cut -d' ' -f1 /proc/uptime) > "$out/$t.status"
done
"""

# After a failed script: what it left (its own cleanup runs only on success), so that the
# scripts after it and the tests after this module start from a clean kernel.
_CLEANUP = """
for p in /sys/kernel/livepatch/test_klp_*; do [ -e "$p/enabled" ] && echo 0 > "$p/enabled"; done
i=0; while ls -d /sys/kernel/livepatch/test_klp_* >/dev/null 2>&1 && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
for pass in 1 2 3; do
    for m in $(awk '/^test_klp/ {print $1}' /proc/modules); do rmmod "$m" 2>/dev/null; done
done
awk '/^test_klp/ {print $1}' /proc/modules
"""


@pytest.fixture(scope="module")
def selftest_results(guest: Guest, installed_klp_modules, kernel_source, workdir) -> dict[str, tuple[int, str]]:
    """Every selftest script's exit status and output, from one run in the guest with no other
    livepatch loaded (the scripts compare the kernel log exactly)."""
    assert guest.livepatches() == [], "the selftests need a kernel with no livepatch loaded"
    before = guest.modules()
    out = workdir / "klp-selftests"
    out.mkdir()
    guest.run("bash", "-c", _RUNNER, "selftests", str(kernel_source.tree / SELFTESTS_DIR), str(out), *SELFTESTS,
              timeout=900)
    left = guest.sh(_CLEANUP, timeout=120).split()
    results = {}
    for script in SELFTESTS:
        status_file, log = out / f"{script}.status", out / f"{script}.log"
        status, start, end = status_file.read_text().split() if status_file.exists() else ("-1", "0", "0")
        print(f"{script}: exit {status} in {float(end) - float(start):.1f} s (guest time)")
        results[script] = (int(status), log.read_text(errors="replace") if log.exists() else "")
    assert left == [], f"test modules still loaded after the selftests and their cleanup: {left}"
    assert guest.modules() == before, "the selftests left modules loaded or unloaded"
    return results


@pytest.mark.parametrize("script", SELFTESTS)
def test_kernel_livepatch_selftest(selftest_results, script):
    status, output = selftest_results[script]
    verdict = "skipped (a failure: selftests are never skipped here)" if status == KSFT_SKIP else f"exited {status}"
    assert status == 0, f"{SELFTESTS_DIR}/{script} {verdict}:\n{output}"
    tests = [line for line in output.splitlines() if line.startswith("TEST: ")]
    assert tests and all(line.endswith(" ... ok") for line in tests), output


def _wait(guest: Guest, condition: str, what: str) -> None:
    r = guest.run("sh", "-c", f"i=0; until {condition}; do [ $i -ge 300 ] && exit 1; sleep 0.1; i=$((i+1)); done",
                  check=False, timeout=60)
    assert r.status == 0, f"timed out waiting for {what}"


def test_status_tells_the_truth_when_a_foreign_patch_replaces_a_dynamos_update(guest, build, installed_klp_modules):
    """A foreign atomic-replace livepatch takes over every patched function, dynamos' included:
    the kernel drops the dynamos update's livepatch, its module stays loaded, and ``status``
    must say so rather than report it live."""
    foreign = "test_klp_atomic_replace"
    sysfs = f"/sys/kernel/livepatch/{foreign}"
    pkg = build(EXAMPLES / "cmdline-banner")
    original = guest.read("/proc/cmdline")
    guest.dynamos("apply", str(pkg))
    try:
        assert original != guest.read("/proc/cmdline")
        guest.run("modprobe", foreign, "replace=1")
        _wait(guest, f"grep -q '^0$' {sysfs}/transition", "the foreign patch's transition")
        assert guest.livepatches() == [foreign]  # what the kernel says: the dynamos update is gone
        assert guest.read("/proc/cmdline") == original
        assert guest.read("/proc/meminfo").strip() == f"{foreign}: this has been live patched"
        updates = {u["name"]: u for u in guest.status()["updates"]}
        assert set(updates) == {foreign, "cmdline_banner"}, updates
        theirs, ours = updates[foreign], updates["cmdline_banner"]
        assert (theirs["dynamos"], theirs["enabled"], theirs["transition"]) == (False, True, False), theirs
        assert [(f["name"], f["patched"]) for f in theirs["functions"]] == [("meminfo_proc_show", True)], theirs
        assert (ours["dynamos"], ours["enabled"], ours["module_loaded"]) == (True, False, True), ours
        assert not any(f["patched"] for f in ours["functions"]), ours
        assert {n for n, u in updates.items() if u["enabled"]} == set(guest.livepatches())
    finally:
        guest.run("sh", "-c", f"[ ! -e {sysfs} ] || echo 0 > {sysfs}/enabled", check=False)
        _wait(guest, f"[ ! -e {sysfs} ]", "the foreign patch to be disabled")
        guest.run("sh", "-c", f"! grep -q '^{foreign} ' /proc/modules || rmmod {foreign}", check=False)
        guest.dynamos("revert", "cmdline_banner", check=False)
    assert guest.read("/proc/cmdline") == original
    assert foreign not in guest.modules() and "cmdline_banner" not in guest.modules()
    assert guest.livepatches() == []
