"""revert (incl. a stuck revert, restored) and status (the documented JSON shape)."""

from __future__ import annotations

import json
import shutil

import pytest

from dynamos.errors import DynamosError, RefusedError
from dynamos.kernel import BlockedTransition
from dynamos.update.package import read_package
from tests.support.harness import KernelHarness, fn

# -- revert ----------------------------------------------------------------------------------


def test_revert_by_update_name(harness: KernelHarness) -> None:
    h = harness
    h.apply("fix-x")
    result = h.kernel.revert("fix-x", timeout=5.0)
    assert (result.name, result.update) == ("fix_x", "fix-x")
    assert result.describe().startswith("reverted fix-x (livepatch fix_x) in ")
    assert set(result.phases) == {"preflight", "transition", "unload"}
    assert ("write-enabled", "fix_x", 0) in h.sim.calls
    assert h.sim.calls[-1] == ("delete_module", "fix_x")
    assert "fix_x" not in h.sim.modules and not (h.sim.root / "sys/kernel/livepatch/fix_x").exists()
    assert not h.record("fix_x").exists()
    entry = h.log()[-1]
    assert (entry["action"], entry["name"], entry["result"]) == ("revert", "fix_x", "ok")
    assert json.dumps(result.to_json())


def test_revert_unknown_name(harness: KernelHarness) -> None:
    h = harness
    with pytest.raises(RefusedError, match=r"no livepatch named nope is loaded \(no livepatch is loaded\)"):
        h.kernel.revert("nope")
    h.apply("fix-x")
    with pytest.raises(RefusedError, match=r"\(loaded livepatches: fix_x\)"):
        h.kernel.revert("nope")
    assert h.log()[-1]["result"] == "refused"


def test_revert_not_root(harness: KernelHarness) -> None:
    h = harness
    h.apply("fix-x")
    h.sim.euid = 1000
    with pytest.raises(RefusedError, match="must run as root"):
        h.kernel.revert("fix_x")
    assert "fix_x" in h.sim.modules


def test_revert_refused_while_another_transition_runs(harness: KernelHarness) -> None:
    h = harness
    h.apply("fix-x")
    h.sim.transition_polls = None
    h.load_foreign("other", [{"name": "do_sys_open"}], polls=0)
    with pytest.raises(RefusedError, match="livepatch other is in transition"):
        h.kernel.revert("fix-x")
    assert not any(c[0] == "write-enabled" for c in h.sim.calls)


def test_revert_unloads_a_leftover_module(harness: KernelHarness) -> None:
    h = harness
    h.sim.add_module("old_fix", livepatch=True)  # disabled or replaced, module still loaded
    result = h.kernel.revert("old-fix")
    assert result.notes == ["livepatch old_fix was already disabled or replaced; unloading its module"]
    assert "old_fix" not in h.sim.modules


def test_revert_stuck_is_restored_and_names_blockers(harness: KernelHarness) -> None:
    h = harness
    h.apply("fix-x")
    h.sim.add_task(900, "worker", ["[<0>] schedule+0x1/0x2", "[<0>] livepatch_cmdline_proc_show+0x9/0x20"],
                 blocked=True)  # sleeps inside the new edition: cannot move back to the original
    with pytest.raises(BlockedTransition) as info:
        h.kernel.revert("fix-x", timeout=1.0)
    err = info.value
    assert err.outcome == "restored" and [b.pid for b in err.blockers] == [900]
    msg = str(err)
    assert "revert did not finish within 1s; restored: the update was re-enabled and stays applied" in msg
    assert "pid 900 worker" in msg and "livepatch_cmdline_proc_show+0x9/0x20" in msg
    assert [c for c in h.sim.calls if c[0] == "write-enabled"] == [
        ("write-enabled", "fix_x", 0), ("write-enabled", "fix_x", 1)]
    assert h.sim.patches["fix_x"].enabled and not h.sim.patches["fix_x"].transition
    assert h.record("fix_x").exists()
    assert h.log()[-1]["result"] == "restored"


# -- status ----------------------------------------------------------------------------------


def test_status_without_livepatches(harness: KernelHarness) -> None:
    h = harness
    assert h.kernel.status().to_json() == {"kernel": "6.1.0-56-amd64", "effective_kernel": "6.1.0-56-amd64",
                                           "cves": [], "livepatch": True, "updates": []}
    shutil.rmtree(h.sim.root / "sys/kernel/livepatch")
    assert h.kernel.status().to_json()["livepatch"] is False


def test_status_shape_of_a_dynamos_update(harness: KernelHarness) -> None:
    h = harness
    h.apply("fix-x", "cmdline_proc_show", fn("show_map", sympos=1))
    data = h.kernel.status().to_json()
    (update,) = data["updates"]
    applied = update.pop("applied")
    assert applied.endswith("+00:00")
    assert update.pop("signer") == {"name": "unsigned (allowed by --allow-unsigned)", "fingerprint": ""}
    assert update.pop("module_sha256") == read_package(h.packages / "fix-x.dynpkg").module_sha256
    assert data == {
        "kernel": "6.1.0-56-amd64",
        "effective_kernel": "6.1.0-56-amd64+fix-x",
        "cves": [],
        "livepatch": True,
        "updates": [{
            "name": "fix_x",
            "enabled": True,
            "transition": False,
            "dynamos": True,
            "module_loaded": True,
            "replace": False,
            "objects": [{"name": "vmlinux", "patched": True}],
            "functions": [
                {"name": "cmdline_proc_show", "object": "vmlinux", "patched": True},
                {"name": "show_map", "object": "vmlinux", "sympos": 1, "patched": True},
            ],
            "tasks_pending": [],
            "update": "fix-x",
            "package": str(h.packages / "fix-x.dynpkg"),
            "description": "fix-x (simulated)",
        }],
    }


def test_status_of_a_foreign_livepatch_in_transition(harness: KernelHarness) -> None:
    h = harness
    h.sim.configure(transition_polls=None)
    h.load_foreign("kpatch_fix", [{"name": "show_map", "sympos": 2},
                                     {"name": "xfs_thing", "object": "xfs"}], polls=1)
    (update,) = h.kernel.status().to_json()["updates"]
    assert update == {
        "name": "kpatch_fix",
        "enabled": True,
        "transition": True,
        "dynamos": False,
        "module_loaded": True,
        "objects": [{"name": "vmlinux", "patched": True}, {"name": "xfs", "patched": False}],
        "functions": [
            {"name": "show_map", "object": "vmlinux", "sympos": 2, "patched": True},
            {"name": "xfs_thing", "object": "xfs", "patched": False},
        ],
        "tasks_pending": [
            {"pid": 1, "comm": "systemd"},
            {"pid": 500, "comm": "sshd"},
            {"pid": 500, "comm": "sshd-worker", "tid": 501},
        ],
    }


def test_status_lists_leftover_modules_and_filters_by_name(harness: KernelHarness) -> None:
    h = harness
    h.apply("fix-x")
    h.sim.add_module("old_fix", livepatch=True)
    h.sim.add_module("ext4")  # not a livepatch: not listed
    names = [(u["name"], u["enabled"], u["module_loaded"]) for u in h.kernel.status().to_json()["updates"]]
    assert names == [("fix_x", True, True), ("old_fix", False, True)]
    assert [u.name for u in h.kernel.status("fix-x").updates] == ["fix_x"]
    with pytest.raises(DynamosError, match="no livepatch named nope is loaded"):
        h.kernel.status("nope")


def test_status_after_replace_keeps_replace_flag(harness: KernelHarness) -> None:
    h = harness
    h.apply("old")
    h.apply("new", "do_sys_open", replace=True)
    updates = h.kernel.status().to_json()["updates"]
    assert [(u["name"], u.get("replace")) for u in updates] == [("new", True)]


def test_effective_kernel_counts_only_updates_whose_code_runs(harness: KernelHarness) -> None:
    h = harness
    h.kernel.apply(h.add("fix-x", version="1.2", cves=("CVE-2024-1086", "CVE-2023-0001")))
    h.kernel.apply(h.add("fix-y", "vfs_read"))
    status = h.kernel.status()
    assert status.effective_kernel == "6.1.0-56-amd64+fix-x=1.2+fix-y"
    assert status.fixes == ["CVE-2023-0001", "CVE-2024-1086"]
    update = status.to_json()["updates"][0]
    assert (update["version"], update["cves"]) == ("1.2", ["CVE-2024-1086", "CVE-2023-0001"])
    h.kernel.apply(h.add("fix-z", "do_sys_open", cves=("CVE-2022-2222",)))
    h.sim.patches["fix_z"].transition = True  # as while being reverted: its code is not (all) running
    h.sim.render()
    status = h.kernel.status()
    assert "fix-z" not in status.effective_kernel and "CVE-2022-2222" not in status.fixes
