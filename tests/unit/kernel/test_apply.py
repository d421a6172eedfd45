"""apply: success, transition timeout (reverted and unloaded), load failure, replace, the real package."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from dynamos.errors import PackageError, RefusedError, TransitionError
from dynamos.kernel import BlockedTransition, PreflightRefused, Progress
from dynamos.update.package import read_package
from tests.support.harness import KernelHarness, fn
from tests.support.simulated import IMAGE_MAGIC

STUCK_STACK = ["[<0>] msleep+0x2d/0x40", "[<0>] cmdline_proc_show+0x1c/0x60", "[<0>] seq_read_iter+0x11f/0x4a0"]


def test_apply_success(harness: KernelHarness) -> None:
    h = harness
    h.sim.configure(transition_polls=3)
    seen: list[Progress] = []
    result = h.kernel.apply(h.add("fix-x"), timeout=5.0, progress=seen.append)

    assert (result.name, result.livepatch_name, result.kernel) == ("fix-x", "fix_x", "6.1.0-56-amd64")
    assert result.functions == [{"name": "cmdline_proc_show", "object": "vmlinux",
                                 "edition": "cmdline_proc_show_v2"}]
    assert set(result.phases) == {"verify", "preflight", "load", "transition", "switch", "unload"}
    assert result.phases["transition"] == pytest.approx(0.3)
    assert result.seconds >= result.phases["transition"]
    # progress: every task starts unpatched, then they all switch; reported once (no change)
    assert [(p.phase, p.pending, p.elapsed) for p in seen] == [("transition", 3, 0.0)]
    assert str(seen[0]) == "fix_x: transition, 3 task(s) not switched yet (0.0 s of 5 s)"
    assert result.describe().startswith("applied fix-x (livepatch fix_x) to 6.1.0-56-amd64 in ")
    # the kernel: enabled, transition over, module loaded once
    lp = h.sim.root / "sys/kernel/livepatch/fix_x"
    assert (lp / "enabled").read_text() == "1\n" and (lp / "transition").read_text() == "0\n"
    assert len(h.syscalls("init_module")) == 1 and not h.syscalls("delete_module")
    # dynamos' record and the action log
    record = json.loads(h.record("fix_x").read_text())
    assert record["update"] == "fix-x" and record["package"] == str(h.packages / "fix-x.dynpkg")
    assert record["functions"] == result.functions
    assert record["module_sha256"] == read_package(h.packages / "fix-x.dynpkg").module_sha256
    (entry,) = h.log()
    assert (entry["action"], entry["name"], entry["result"]) == ("apply", "fix_x", "ok")
    assert entry["details"]["phases"] == result.phases
    assert json.dumps(result.to_json())  # JSON-serialisable


def test_apply_timeout_reverts_unloads_and_names_blockers(harness: KernelHarness) -> None:
    h = harness
    h.sim.add_task(777, "stuckd", STUCK_STACK, blocked=True)
    seen: list[Progress] = []
    with pytest.raises(TransitionError) as info:
        h.kernel.apply(h.add("fix-x"), timeout=2.5, progress=seen.append)
    # reported on change (4 -> 1 pending) and every second while stuck, then the reversal
    assert [(p.phase, p.pending, round(p.elapsed, 1)) for p in seen] == [
        ("transition", 4, 0.0), ("transition", 1, 0.2), ("transition", 1, 1.2), ("transition", 1, 2.2),
        ("revert", 3, 0.0)]
    err = info.value
    assert isinstance(err, BlockedTransition) and err.outcome == "reverted and unloaded"
    msg = str(err)
    assert "transition did not finish within 2.5s; reverted and unloaded" in msg
    assert "pid 777 stuckd" in msg and "cmdline_proc_show+0x1c/0x60" in msg
    assert [(b.pid, b.comm, b.stack[1]) for b in err.blockers] == [
        (777, "stuckd", "[<0>] cmdline_proc_show+0x1c/0x60")]
    # enabled was written 0, the reverse transition finished, the module was deleted
    assert h.syscalls("write-enabled") == [("write-enabled", "fix_x", 0)]
    assert h.syscalls("delete_module")[-1] == ("delete_module", "fix_x")
    assert "fix_x" not in h.sim.modules and "fix_x" not in h.sim.patches
    assert not (h.sim.root / "sys/kernel/livepatch/fix_x").exists()
    assert not h.record("fix_x").exists()
    (entry,) = h.log()
    assert (entry["action"], entry["result"]) == ("apply", "reverted and unloaded")
    assert entry["details"]["blockers"][0]["pid"] == 777
    assert err.exit_status == 6


def test_apply_timeout_when_the_reversal_is_stuck_too(harness: KernelHarness) -> None:
    h = harness
    h.sim.add_task(777, "stuckd", STUCK_STACK, blocked=True)
    back = h.sim.add_task(778, "inside-new", ["[<0>] livepatch_cmdline_proc_show+0x5/0x9"], blocked=True)
    load = h.sim.init_module

    def init_module(image: bytes, params: str = "") -> None:
        load(image, params)
        back.state = 1  # already runs the new code and sleeps there: cannot go back

    h.sim.init_module = init_module  # type: ignore[method-assign]
    with pytest.raises(BlockedTransition) as info:
        h.kernel.apply(h.add("fix-x"), timeout=1.0, revert_timeout=0.5)
    err = info.value
    assert err.outcome == "in transition"
    msg = str(err)
    assert "reversal did not finish within 0.5s either" in msg and "remains loaded" in msg
    assert "dynamos revert fix_x" in msg and "pid 778 inside-new" in msg
    assert not h.syscalls("delete_module") and "fix_x" in h.sim.modules
    assert h.log()[0]["result"] == "in transition"


def test_apply_interrupted_reverts(harness: KernelHarness) -> None:
    h = harness
    h.sim.configure(transition_polls=5)

    def progress(p: Progress) -> None:
        if p.phase == "transition":
            raise KeyboardInterrupt

    with pytest.raises(BlockedTransition) as info:
        h.kernel.apply(h.add("fix-x"), progress=progress)
    assert "interrupted during the transition; reverted and unloaded" in str(info.value)
    assert "fix_x" not in h.sim.modules


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.ENOENT, "unknown symbol"),
        (errno.EKEYREJECTED, "signature required"),
        (errno.ENOEXEC, "invalid module format"),
        (errno.EINVAL, "see dmesg"),
    ],
)
def test_load_failure_says_never_loaded(harness: KernelHarness, code: int, expected: str) -> None:
    h = harness
    h.sim.kmsg.append("livepatch: stale message from an earlier load")
    h.sim.configure(load_error=code, load_messages=["fix_x: Unknown symbol klp_x (err -2)"])
    with pytest.raises(RefusedError) as info:
        h.kernel.apply(h.add("fix-x"))
    msg = str(info.value)
    assert "the update was never loaded" in msg and expected in msg
    assert "fix_x: Unknown symbol klp_x (err -2)" in msg and "stale message" not in msg
    assert not h.syscalls("delete_module") and not h.record("fix_x").exists()
    assert h.log()[0]["result"] == "refused"


def test_tampered_package_is_refused_before_anything(harness: KernelHarness) -> None:
    h = harness
    path = h.add("fix-x")
    data = path.read_bytes()
    at = data.index(IMAGE_MAGIC) + len(IMAGE_MAGIC)
    path.write_bytes(data[:at] + b" " + data[at + 1:])  # one byte of module.ko changed
    with pytest.raises(PackageError, match="module.ko sha256 mismatch"):
        h.kernel.apply(path)
    assert not h.sim.calls
    (entry,) = h.log()
    assert (entry["name"], entry["result"]) == (str(path), "refused")


def test_preflight_refusal_loads_nothing(harness: KernelHarness) -> None:
    h = harness
    with pytest.raises(RefusedError, match="not found in vmlinux"):
        h.kernel.apply(h.add("fix-x", "missing_fn"))
    assert not h.syscalls("init_module")
    assert h.log()[0]["result"] == "refused"


def test_replace_unloads_the_replaced_livepatches(harness: KernelHarness) -> None:
    h = harness
    h.kernel.apply(h.add("old-a", "do_sys_open"))
    h.kernel.apply(h.add("old-b", "vfs_read"))
    result = h.kernel.apply(h.add("cumulative", "do_sys_open", "vfs_read", replace=True))
    assert result.replaced == ["old_a", "old_b"] and result.replace
    assert set(h.sim.patches) == {"cumulative"} and not {"old_a", "old_b"} & set(h.sim.modules)
    assert [c[1] for c in h.syscalls("delete_module") if c[1] != "cumulative"][-2:] == ["old_a", "old_b"]
    assert sorted(p.name for p in (h.sim.root / "run/dynamos/updates").iterdir()) == ["cumulative.json"]
    actions = [(e["action"], e["name"]) for e in h.log()]
    assert ("unload-replaced", "old_a") in actions and actions[-1] == ("apply", "cumulative")


def test_a_package_with_klp_symbols_is_checked_and_applied(harness: KernelHarness) -> None:
    h = harness
    path = h.add("banner", klp_symbols=[{"name": "show_map", "object": "vmlinux", "sympos": 3}])
    result = h.kernel.apply(path)
    assert result.livepatch_name == "banner" and "banner" in h.sim.modules
    with pytest.raises(PreflightRefused, match="symbol show_map used by the update is ambiguous"):
        h.kernel.apply(h.add("other", "vfs_read", klp_symbols=[{"name": "show_map", "object": "vmlinux",
                                                                  "sympos": 0}]))


def test_failing_progress_callback_still_reverts(harness: KernelHarness) -> None:
    h = harness
    h.sim.configure(transition_polls=5)

    def progress(p: Progress) -> None:
        raise ValueError("bar too wide")

    with pytest.raises(BlockedTransition) as info:
        h.kernel.apply(h.add("fix-x"), progress=progress)
    assert "error during the transition (ValueError: bar too wide); reverted and unloaded" in str(info.value)
    assert isinstance(info.value.__cause__, ValueError) and "fix_x" not in h.sim.modules


def test_interrupt_right_after_init_module_unloads(harness: KernelHarness) -> None:
    h = harness
    load = h.sim.init_module

    def init_module(image: bytes, params: str = "") -> None:
        load(image, params)
        raise KeyboardInterrupt  # Ctrl-C as the syscall returns

    h.sim.init_module = init_module  # type: ignore[method-assign]
    with pytest.raises(BlockedTransition, match="interrupted during the load; reverted and unloaded"):
        h.kernel.apply(h.add("fix-x"))
    assert "fix_x" not in h.sim.modules and not h.record("fix_x").exists()
    assert h.log()[0]["result"] == "reverted and unloaded"


def test_stuck_reversal_keeps_the_record_and_blockers_lists_it(harness: KernelHarness) -> None:
    h = harness
    h.sim.configure(transition_polls=None)  # no task ever switches
    h.sim.add_task(42, "kworker/0:1", ["[<0>] worker_thread+0x1/0x2"], blocked=True)
    load = h.sim.init_module

    def init_module(image: bytes, params: str = "") -> None:
        load(image, params)
        h.sim.tasks[-1].state = 1

    h.sim.init_module = init_module  # type: ignore[method-assign]
    with pytest.raises(BlockedTransition) as info:
        h.kernel.apply(h.add("fix-x"), timeout=0.3)
    assert info.value.outcome == "in transition"
    assert h.record("fix_x").exists()  # still ours, still loaded
    assert [(b.pid, b.comm) for b in h.kernel.blockers()] == [(42, "kworker/0:1")]
    (update,) = h.kernel.status().to_json()["updates"]
    assert (update["dynamos"], update["enabled"], update["transition"]) == (True, False, True)
    assert update["tasks_pending"] == [{"pid": 42, "comm": "kworker/0:1"}]


def test_unwritable_action_log_refuses_apply_with_nothing_changed(harness: KernelHarness, tmp_path: Path) -> None:
    h = harness
    (tmp_path / "blocker").write_text("")
    h.kernel.log.path = tmp_path / "blocker" / "actions.log"
    with pytest.raises(RefusedError, match="nothing was changed: cannot write the action log"):
        h.kernel.apply(h.add("fix-x"))
    assert not h.syscalls("init_module") and not h.sim.patches and not h.record("fix_x").exists()


# --- kernel threads whose main function is replaced -------------------------------------------

KTHREAD_STACK = ["[<0>] schedule+0x3c/0xa0", "[<0>] cmdline_proc_show+0x1c/0x60", "[<0>] kthread+0xe8/0x110",
                 "[<0>] ret_from_fork+0x1f/0x30"]


def test_thread_main_loop_is_refused_before_loading_unless_the_update_restarts_it(harness: KernelHarness) -> None:
    h = harness
    h.sim.add_task(42, "loopd", KTHREAD_STACK)
    with pytest.raises(PreflightRefused) as info:
        h.kernel.apply(h.add("fix-x"), timeout=2.0)
    assert [r.code for r in info.value.reasons] == ["kthread-loop"]
    assert "kernel thread loopd (pid 42) runs cmdline_proc_show as its main function" in str(info.value)
    assert h.syscalls("init_module") == []

    found, notes = h.kernel.predicted_blockers(h.package("fix-y", fn("cmdline_proc_show", kthread=True)))
    assert [b.pid for b, _ in found] == [42]
    assert notes == ["1 kernel thread(s) run a replaced function as their main loop and will be restarted onto "
                     "the new edition by the update's hooks: loopd (pid 42) in cmdline_proc_show"]


def test_a_kernel_thread_merely_calling_a_replaced_function_is_a_blocker_not_a_loop(harness: KernelHarness) -> None:
    h = harness
    h.sim.add_task(43, "workerd", ["[<0>] cmdline_proc_show+0x1c/0x60", "[<0>] worker_main+0x40/0x90",
                                   "[<0>] kthread+0xe8/0x110", "[<0>] ret_from_fork+0x1f/0x30"])
    found, notes = h.kernel.predicted_blockers(h.package("fix-x"))
    assert found[0][0].thread_function == "worker_main"
    assert len(notes) == 1 and "workerd (pid 43) in cmdline_proc_show" in notes[0] and "hold up" in notes[0]


def test_tasks_still_to_switch_are_signalled_on_a_schedule(harness: KernelHarness) -> None:
    h = harness
    h.sim.add_task(778, "reader", STUCK_STACK, blocked=True, wakes_on_signal=True)
    result = h.kernel.apply(h.add("fix-x"), timeout=10)
    assert h.syscalls("signal") == [("signal", "fix_x")]
    assert "signalled the tasks still to switch at 1 s into the transition" in result.notes


def test_signals_follow_a_doubling_schedule_until_the_timeout(harness: KernelHarness) -> None:
    h = harness
    h.sim.add_task(777, "stuckd", STUCK_STACK, blocked=True)
    with pytest.raises(TransitionError):
        h.kernel.apply(h.add("fix-x"), timeout=8, revert_timeout=0.5)
    assert len(h.syscalls("signal")) == 3  # at 1, 3 and 7 s; not during the 0.5 s reversal


HELD_STACK = ["[<0>] schedule+0x3c/0xa0", "[<0>] loop_v2+0x10/0x40 [fix_x]",
              "[<0>] dynamos_kthread__cmdline_proc_show+0x1c/0x60 [fix_x]", "[<0>] kthread+0xe8/0x110",
              "[<0>] ret_from_fork+0x1f/0x30"]


def test_a_replacing_update_must_take_over_a_thread_an_earlier_update_restarted(harness: KernelHarness) -> None:
    h = harness
    h.kernel.apply(h.add("fix-x"))  # stands for an update that restarted loopd onto its copy
    h.sim.add_task(42, "loopd", HELD_STACK)
    with pytest.raises(PreflightRefused) as info:
        h.kernel.apply(h.add("fix-y", replace=True), timeout=2.0)
    assert [r.code for r in info.value.reasons] == ["kthread-held"]
    assert ("kernel thread loopd (pid 42) runs update fix_x's copy of cmdline_proc_show, and this update "
            "replaces fix_x without declaring a restart") in str(info.value)

    _, notes = h.kernel.predicted_blockers(h.package("fix-z", fn("cmdline_proc_show", kthread=True), replace=True))
    assert notes == ["kernel thread loopd (pid 42) runs update fix_x's copy of cmdline_proc_show: it will be "
                     "restarted onto this update's, and fix_x will let go of it"]
    # Stacked on top instead of replacing, the update leaves fix_x's thread alone.
    assert h.kernel.predicted_blockers(h.package("fix-w"))[1] == []
