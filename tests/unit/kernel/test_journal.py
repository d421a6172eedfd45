"""The operation lock, the intent/result journal, status after a killed operation, and recover."""

from __future__ import annotations

import os

import pytest

from dynamos.errors import RefusedError
from dynamos.kernel.journal import OperationLock, lock_holder
from tests.support.harness import KernelHarness

FUNCS = [{"name": "cmdline_proc_show", "object": "vmlinux", "sympos": None}]


def _killed_apply(h: KernelHarness, polls: int = 3) -> None:
    """What `kill -9` leaves after init_module: an intent with no result, a livepatch loaded."""
    h.kernel.journal.intent("apply", "fix_x", {"update": "fix-x", "package": "/p/fix-x.dynpkg", "replacing": []})
    h.kernel.journal.done()
    h.load_foreign("fix_x", FUNCS, polls=polls)


def test_every_change_writes_an_intent_before_and_a_result_after(harness: KernelHarness) -> None:
    h = harness
    h.apply("fix-x")
    h.kernel.revert("fix-x")
    entries = h.log(intents=True)
    assert [(e["action"], e["result"]) for e in entries] == [
        ("apply", "intent"), ("apply", "ok"), ("revert", "intent"), ("revert", "ok")]
    assert entries[0]["pid"] == os.getpid() and entries[0]["details"]["update"] == "fix-x"
    assert entries[0]["op"] == entries[1]["op"] != entries[2]["op"] == entries[3]["op"]
    assert h.kernel.journal.pending() == [] and lock_holder(h.sim.root) is None


def test_a_held_lock_refuses_with_the_holder_pid_and_changes_nothing(harness: KernelHarness) -> None:
    h = harness
    other = OperationLock(h.sim.root)
    other.acquire("test")
    try:
        with pytest.raises(RefusedError, match=f"another dynamos \\(pid {os.getpid()}\\).*--wait"):
            h.apply("fix-x")
        assert not h.syscalls("init_module") and not h.log_path.exists()
        h.kernel.journal.wait = 0.3
        with pytest.raises(RefusedError, match="waited 0.3 s"):
            h.apply("fix-x")
    finally:
        other.release()
    assert h.apply("fix-x").livepatch_name == "fix_x"


def test_the_lock_is_never_followed_through_a_symlink(harness: KernelHarness, tmp_path) -> None:
    h = harness
    lock = h.sim.root / "run/dynamos/lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RefusedError, match="symbolic link"):
        h.apply("fix-x")
    assert not (tmp_path / "elsewhere").exists() and not h.syscalls("init_module")


def test_status_shows_a_killed_apply_and_recover_completes_it(harness: KernelHarness) -> None:
    h = harness
    _killed_apply(h)
    (item,) = h.kernel.status().to_json()["interrupted"]
    assert (item["action"], item["update"], item["in_progress"]) == ("apply", "fix_x", False)
    assert item["kernel"] == "livepatch fix_x is loaded, enabled, transition finished"
    result = h.kernel.recover()
    (done,) = result.items
    assert done["outcome"] == "completed" and "applied and recorded" in done["detail"]
    assert h.record("fix_x").exists() and h.sim.patches["fix_x"].enabled
    assert "interrupted" not in h.kernel.status().to_json() and h.kernel.recover().items == []
    assert h.log()[-2]["result"] == "recovered: completed"


def test_recover_reverts_a_killed_apply_still_in_transition(harness: KernelHarness) -> None:
    h = harness
    h.sim.add_task(900, "stuck", ["[<0>] cmdline_proc_show+0x1/0x2"], blocked=True)
    _killed_apply(h, polls=0)
    assert "in transition" in h.kernel.status().to_json()["interrupted"][0]["kernel"]
    (done,) = h.kernel.recover(timeout=1).items
    assert done["outcome"] == "reverted and unloaded"
    assert not h.sim.patches and "fix_x" not in h.sim.modules and not h.record("fix_x").exists()


def test_the_next_change_recovers_first_and_says_so(harness: KernelHarness) -> None:
    h = harness
    h.kernel.journal.intent("apply", "fix_y", {"update": "fix-y"})  # killed before loading
    h.kernel.journal.done()
    result = h.apply("fix-x")
    assert result.notes[0].startswith("recovered first: apply of fix_y") and "not applied" in result.notes[0]
    assert h.kernel.journal.pending() == []


def test_switch_and_retire_are_journaled_and_locked(harness: KernelHarness) -> None:
    from dynamos.kernel import editions

    h = harness
    other = OperationLock(h.sim.root)
    other.acquire("test")
    try:
        with pytest.raises(RefusedError, match="another dynamos"):
            editions.switch("fix-x", "f", 1, root=h.sim.root)
    finally:
        other.release()
    os.environ["DYNAMOS_LOG"] = str(h.log_path)
    try:
        with pytest.raises(RefusedError, match="no update named fix_x"):
            editions.switch("fix-x", "f", 1, root=h.sim.root)
    finally:
        del os.environ["DYNAMOS_LOG"]
    assert [(e["action"], e["result"]) for e in h.log(intents=True)] == [("switch", "intent"), ("switch", "refused")]


def test_unwritable_log_refuses_revert_and_switch_with_nothing_changed(harness: KernelHarness, tmp_path) -> None:
    from dynamos.kernel import editions

    h = harness
    h.apply("fix-x")
    (tmp_path / "blocker").write_text("")
    h.kernel.log.path = tmp_path / "blocker" / "actions.log"
    with pytest.raises(RefusedError, match="nothing was changed: cannot write the action log"):
        h.kernel.revert("fix-x")
    assert h.sim.patches["fix_x"].enabled and not h.syscalls("write-enabled") and h.record("fix_x").exists()
    os.environ["DYNAMOS_LOG"] = str(h.kernel.log.path)
    try:
        with pytest.raises(RefusedError, match="cannot write the action log"):
            editions.switch("fix-x", "f", 1, root=h.sim.root)
    finally:
        del os.environ["DYNAMOS_LOG"]


def test_status_tells_an_operation_in_progress_from_an_interrupted_one(harness: KernelHarness) -> None:
    h = harness
    with h.kernel.journal.locked("test"):
        h.kernel.journal.intent("apply", "fix_x", {})
        (op,) = h.kernel.status().to_json()["interrupted"]
        assert op["in_progress"] is True and op["kernel"] == "nothing named fix_x is loaded"
    h.kernel.journal.done()
    assert h.kernel.status().to_json()["interrupted"][0]["in_progress"] is False
