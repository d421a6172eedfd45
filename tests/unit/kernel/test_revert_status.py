"""revert (incl. a stuck revert, restored) and status (the documented JSON shape)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from dynamos.errors import DynamosError, RefusedError
from dynamos.kernel import BlockedTransition, LiveKernel
from tests.support.simulated import SimulatedKernel, SimulatedPackage


def setup(tmp_path: Path, **sim_args: Any) -> tuple[SimulatedKernel, LiveKernel, dict[str, Any]]:
    sim = SimulatedKernel(tmp_path / "root", **sim_args)
    for name in ("cmdline_proc_show", "do_sys_open"):
        sim.add_symbol(name)
    sim.add_symbol("show_map")
    sim.add_symbol("show_map")
    packages: dict[str, Any] = {}
    kernel = LiveKernel(sim.root, sim, poll_interval=0.1, unload_timeout=2.0,
                        log_path=tmp_path / "actions.log", read_package=lambda p: packages[str(p)])
    return sim, kernel, packages


def apply(kernel: LiveKernel, packages: dict[str, Any], name: str, *functions: dict[str, Any],
          replace: bool = False) -> None:
    path = f"/pkgs/{name}.dynpkg"
    packages[path] = SimulatedPackage(name, list(functions) or [
        {"name": "cmdline_proc_show", "edition": "v2", "object": "vmlinux", "sympos": None}], replace=replace)
    kernel.apply(path)


def load_foreign(sim: SimulatedKernel, name: str, functions: list[dict[str, Any]], polls: int = 3) -> None:
    """A livepatch loaded by someone else (kpatch, insmod): no dynamos record."""
    sim.init_module(SimulatedPackage(name, functions).module)
    for _ in range(polls):
        sim.sleep(0.01)


def log(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "actions.log").read_text().splitlines()]


# -- revert ----------------------------------------------------------------------------------


def test_revert_by_update_name(tmp_path: Path) -> None:
    sim, kernel, packages = setup(tmp_path)
    apply(kernel, packages, "fix-x")
    result = kernel.revert("fix-x", timeout=5.0)
    assert (result.name, result.update) == ("fix_x", "fix-x")
    assert result.describe().startswith("reverted fix-x (livepatch fix_x) in ")
    assert set(result.phases) == {"preflight", "transition", "unload"}
    assert ("write-enabled", "fix_x", 0) in sim.calls
    assert sim.calls[-1] == ("delete_module", "fix_x")
    assert "fix_x" not in sim.modules and not (sim.root / "sys/kernel/livepatch/fix_x").exists()
    assert not (sim.root / "run/dynamos/updates/fix_x.json").exists()
    entry = log(tmp_path)[-1]
    assert (entry["action"], entry["name"], entry["result"]) == ("revert", "fix_x", "ok")
    assert json.dumps(result.to_json())


def test_revert_unknown_name(tmp_path: Path) -> None:
    sim, kernel, packages = setup(tmp_path)
    with pytest.raises(RefusedError, match=r"no livepatch named nope is loaded \(no livepatch is loaded\)"):
        kernel.revert("nope")
    apply(kernel, packages, "fix-x")
    with pytest.raises(RefusedError, match=r"\(loaded livepatches: fix_x\)"):
        kernel.revert("nope")
    assert log(tmp_path)[-1]["result"] == "refused"


def test_revert_not_root(tmp_path: Path) -> None:
    sim, kernel, packages = setup(tmp_path)
    apply(kernel, packages, "fix-x")
    sim.euid = 1000
    with pytest.raises(RefusedError, match="must run as root"):
        kernel.revert("fix_x")
    assert "fix_x" in sim.modules


def test_revert_refused_while_another_transition_runs(tmp_path: Path) -> None:
    sim, kernel, packages = setup(tmp_path)
    apply(kernel, packages, "fix-x")
    sim.transition_polls = None
    load_foreign(sim, "other", [{"name": "do_sys_open"}], polls=0)
    with pytest.raises(RefusedError, match="livepatch other is in transition"):
        kernel.revert("fix-x")
    assert not any(c[0] == "write-enabled" for c in sim.calls)


def test_revert_unloads_a_leftover_module(tmp_path: Path) -> None:
    sim, kernel, _ = setup(tmp_path)
    sim.add_module("old_fix", livepatch=True)  # disabled or replaced, module still loaded
    result = kernel.revert("old-fix")
    assert result.notes == ["livepatch old_fix was already disabled or replaced; unloading its module"]
    assert "old_fix" not in sim.modules


def test_revert_stuck_is_restored_and_names_blockers(tmp_path: Path) -> None:
    sim, kernel, packages = setup(tmp_path)
    apply(kernel, packages, "fix-x")
    sim.add_task(900, "worker", ["[<0>] schedule+0x1/0x2", "[<0>] livepatch_cmdline_proc_show+0x9/0x20"],
                 blocked=True)  # sleeps inside the new edition: cannot move back to the original
    with pytest.raises(BlockedTransition) as info:
        kernel.revert("fix-x", timeout=1.0)
    err = info.value
    assert err.outcome == "restored" and [b.pid for b in err.blockers] == [900]
    msg = str(err)
    assert "revert did not finish within 1s; restored: the update was re-enabled and stays applied" in msg
    assert "pid 900 worker" in msg and "livepatch_cmdline_proc_show+0x9/0x20" in msg
    assert [c for c in sim.calls if c[0] == "write-enabled"] == [
        ("write-enabled", "fix_x", 0), ("write-enabled", "fix_x", 1)]
    assert sim.patches["fix_x"].enabled and not sim.patches["fix_x"].transition
    assert (sim.root / "run/dynamos/updates/fix_x.json").exists()
    assert log(tmp_path)[-1]["result"] == "restored"


# -- status ----------------------------------------------------------------------------------


def test_status_without_livepatches(tmp_path: Path) -> None:
    sim, kernel, _ = setup(tmp_path)
    assert kernel.status().to_json() == {"kernel": "6.1.0-56-amd64", "livepatch": True, "updates": []}
    shutil.rmtree(sim.root / "sys/kernel/livepatch")
    assert kernel.status().to_json()["livepatch"] is False


def test_status_shape_of_a_dynamos_update(tmp_path: Path) -> None:
    sim, kernel, packages = setup(tmp_path)
    apply(kernel, packages, "fix-x",
          {"name": "cmdline_proc_show", "edition": "v2", "object": "vmlinux", "sympos": None},
          {"name": "show_map", "edition": "v3", "object": "vmlinux", "sympos": 1})
    data = kernel.status().to_json()
    (update,) = data["updates"]
    applied = update.pop("applied")
    assert applied.endswith("+00:00")
    assert data == {
        "kernel": "6.1.0-56-amd64",
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
            "package": "/pkgs/fix-x.dynpkg",
        }],
    }


def test_status_of_a_foreign_livepatch_in_transition(tmp_path: Path) -> None:
    sim, kernel, _ = setup(tmp_path, transition_polls=None)
    load_foreign(sim, "kpatch_fix", [{"name": "show_map", "sympos": 2},
                                     {"name": "nf_hook", "object": "nf_tables"}], polls=1)
    (update,) = kernel.status().to_json()["updates"]
    assert update == {
        "name": "kpatch_fix",
        "enabled": True,
        "transition": True,
        "dynamos": False,
        "module_loaded": True,
        "objects": [{"name": "nf_tables", "patched": False}, {"name": "vmlinux", "patched": True}],
        "functions": [
            {"name": "nf_hook", "object": "nf_tables", "patched": False},
            {"name": "show_map", "object": "vmlinux", "sympos": 2, "patched": True},
        ],
        "tasks_pending": [
            {"pid": 1, "comm": "systemd"},
            {"pid": 500, "comm": "sshd"},
            {"pid": 500, "comm": "sshd-worker", "tid": 501},
        ],
    }


def test_status_lists_leftover_modules_and_filters_by_name(tmp_path: Path) -> None:
    sim, kernel, packages = setup(tmp_path)
    apply(kernel, packages, "fix-x")
    sim.add_module("old_fix", livepatch=True)
    sim.add_module("ext4")  # not a livepatch: not listed
    names = [(u["name"], u["enabled"], u["module_loaded"]) for u in kernel.status().to_json()["updates"]]
    assert names == [("fix_x", True, True), ("old_fix", False, True)]
    assert [u.name for u in kernel.status("fix-x").updates] == ["fix_x"]
    with pytest.raises(DynamosError, match="no livepatch named nope is loaded"):
        kernel.status("nope")


def test_status_after_replace_keeps_replace_flag(tmp_path: Path) -> None:
    sim, kernel, packages = setup(tmp_path)
    apply(kernel, packages, "old")
    apply(kernel, packages, "new", {"name": "do_sys_open"}, replace=True)
    updates = kernel.status().to_json()["updates"]
    assert [(u["name"], u.get("replace")) for u in updates] == [("new", True)]
