"""apply: success, transition timeout (reverted and unloaded), load failure, replace, the real package."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest

from dynamos.errors import PackageError, RefusedError, TransitionError
from dynamos.kernel import BlockedTransition, LiveKernel, PreflightRefused, Progress
from tests.support.simulated import SimulatedKernel, SimulatedPackage, module_image

STUCK_STACK = ["[<0>] msleep+0x2d/0x40", "[<0>] cmdline_proc_show+0x1c/0x60", "[<0>] seq_read_iter+0x11f/0x4a0"]


class Harness:
    """A simulated kernel, a LiveKernel on it, and packages by file name."""

    def __init__(self, tmp_path: Path, **sim_args: Any):
        self.sim = SimulatedKernel(tmp_path / "root", **sim_args)
        for name in ("cmdline_proc_show", "do_sys_open", "vfs_read"):
            self.sim.add_symbol(name)
        self.packages: dict[str, Any] = {}
        self.log_path = tmp_path / "actions.log"
        self.kernel = LiveKernel(self.sim.root, self.sim, poll_interval=0.1, unload_timeout=2.0,
                                 log_path=self.log_path, read_package=self.read)

    def read(self, path: Path) -> Any:
        if str(path) not in self.packages:
            raise PackageError("module.ko sha256 mismatch: package was modified", path=path)
        return self.packages[str(path)]

    def add(self, name: str, *functions: str, replace: bool = False, **kw: Any) -> str:
        path = f"/pkgs/{name}.dynpkg"
        funcs = [{"name": f, "edition": f"{f}_v2", "object": "vmlinux", "sympos": None}
                 for f in functions or ("cmdline_proc_show",)]
        self.packages[path] = SimulatedPackage(name, funcs, replace=replace, **kw)
        return path

    def log(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]

    def syscalls(self, kind: str) -> list[tuple[Any, ...]]:
        return [c for c in self.sim.calls if c[0] == kind]


def test_apply_success(tmp_path: Path) -> None:
    h = Harness(tmp_path, transition_polls=3)
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
    record = json.loads((h.sim.root / "run/dynamos/updates/fix_x.json").read_text())
    assert record["update"] == "fix-x" and record["package"] == "/pkgs/fix-x.dynpkg"
    assert record["functions"] == result.functions
    (entry,) = h.log()
    assert (entry["action"], entry["name"], entry["result"]) == ("apply", "fix_x", "ok")
    assert entry["details"]["phases"] == result.phases
    assert json.dumps(result.to_json())  # JSON-serialisable


def test_apply_timeout_reverts_unloads_and_names_blockers(tmp_path: Path) -> None:
    h = Harness(tmp_path)
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
    assert not (h.sim.root / "run/dynamos/updates/fix_x.json").exists()
    (entry,) = h.log()
    assert (entry["action"], entry["result"]) == ("apply", "reverted and unloaded")
    assert entry["details"]["blockers"][0]["pid"] == 777
    assert err.exit_status == 6


def test_apply_timeout_when_the_reversal_is_stuck_too(tmp_path: Path) -> None:
    h = Harness(tmp_path)
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


def test_apply_interrupted_reverts(tmp_path: Path) -> None:
    h = Harness(tmp_path, transition_polls=5)

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
def test_load_failure_says_never_loaded(tmp_path: Path, code: int, expected: str) -> None:
    h = Harness(tmp_path, load_error=code, load_messages=["fix_x: Unknown symbol klp_x (err -2)"])
    h.sim.kmsg.append("livepatch: stale message from an earlier load")
    h.sim.render()
    with pytest.raises(RefusedError) as info:
        h.kernel.apply(h.add("fix-x"))
    msg = str(info.value)
    assert "the update was never loaded" in msg and expected in msg
    assert "fix_x: Unknown symbol klp_x (err -2)" in msg and "stale message" not in msg
    assert not h.syscalls("delete_module") and not (h.sim.root / "run/dynamos/updates/fix_x.json").exists()
    assert h.log()[0]["result"] == "refused"


def test_tampered_package_is_refused_before_anything(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    with pytest.raises(PackageError, match="sha256 mismatch"):
        h.kernel.apply("/pkgs/tampered.dynpkg")
    assert not h.sim.calls
    (entry,) = h.log()
    assert (entry["name"], entry["result"]) == ("/pkgs/tampered.dynpkg", "refused")


def test_preflight_refusal_loads_nothing(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    with pytest.raises(RefusedError, match="not found in vmlinux"):
        h.kernel.apply(h.add("fix-x", "missing_fn"))
    assert not h.syscalls("init_module")
    assert h.log()[0]["result"] == "refused"


def test_replace_unloads_the_replaced_livepatches(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.kernel.apply(h.add("old-a", "do_sys_open"))
    h.kernel.apply(h.add("old-b", "vfs_read"))
    result = h.kernel.apply(h.add("cumulative", "do_sys_open", "vfs_read", replace=True))
    assert result.replaced == ["old_a", "old_b"] and result.replace
    assert set(h.sim.modules) == {"cumulative"} and set(h.sim.patches) == {"cumulative"}
    assert [c[1] for c in h.syscalls("delete_module") if c[1] != "cumulative"][-2:] == ["old_a", "old_b"]
    assert sorted(p.name for p in (h.sim.root / "run/dynamos/updates").iterdir()) == ["cumulative.json"]
    actions = [(e["action"], e["name"]) for e in h.log()]
    assert ("unload-replaced", "old_a") in actions and actions[-1] == ("apply", "cumulative")


def test_apply_a_real_package_file(tmp_path: Path) -> None:
    from dynamos.update.model import FunctionSpec, UpdateSource
    from dynamos.update.package import write_package

    sim = SimulatedKernel(tmp_path / "root")
    sim.add_symbol("cmdline_proc_show")
    source = UpdateSource(directory=tmp_path, name="banner", description="d",
                          functions=(FunctionSpec("cmdline_proc_show", "cmdline_v2"),), c_files=())
    path = write_package(tmp_path, source=source, kernel_release=sim.kernel_release,
                         vermagic=f"{sim.kernel_release} SMP mod_unload ",
                         module=module_image("banner", [{"name": "cmdline_proc_show"}]))
    kernel = LiveKernel(sim.root, sim, poll_interval=0.01, log_path=tmp_path / "log")
    result = kernel.apply(path)
    assert result.livepatch_name == "banner" and "banner" in sim.modules
    record = json.loads((sim.root / "run/dynamos/updates/banner.json").read_text())
    assert record["module_sha256"] and record["package"] == str(path)


def test_failing_progress_callback_still_reverts(tmp_path: Path) -> None:
    h = Harness(tmp_path, transition_polls=5)

    def progress(p: Progress) -> None:
        raise ValueError("bar too wide")

    with pytest.raises(BlockedTransition) as info:
        h.kernel.apply(h.add("fix-x"), progress=progress)
    assert "error during the transition (ValueError: bar too wide); reverted and unloaded" in str(info.value)
    assert isinstance(info.value.__cause__, ValueError) and "fix_x" not in h.sim.modules


def test_interrupt_right_after_init_module_unloads(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    load = h.sim.init_module

    def init_module(image: bytes, params: str = "") -> None:
        load(image, params)
        raise KeyboardInterrupt  # Ctrl-C as the syscall returns

    h.sim.init_module = init_module  # type: ignore[method-assign]
    with pytest.raises(BlockedTransition, match="interrupted during the load; reverted and unloaded"):
        h.kernel.apply(h.add("fix-x"))
    assert "fix_x" not in h.sim.modules and not (h.sim.root / "run/dynamos/updates/fix_x.json").exists()
    assert h.log()[0]["result"] == "reverted and unloaded"


def test_stuck_reversal_keeps_the_record_and_blockers_lists_it(tmp_path: Path) -> None:
    h = Harness(tmp_path, transition_polls=None)  # no task ever switches
    h.sim.add_task(42, "kworker/0:1", ["[<0>] worker_thread+0x1/0x2"], blocked=True)
    load = h.sim.init_module

    def init_module(image: bytes, params: str = "") -> None:
        load(image, params)
        h.sim.tasks[-1].state = 1

    h.sim.init_module = init_module  # type: ignore[method-assign]
    with pytest.raises(BlockedTransition) as info:
        h.kernel.apply(h.add("fix-x"), timeout=0.3)
    assert info.value.outcome == "in transition"
    assert (h.sim.root / "run/dynamos/updates/fix_x.json").exists()  # still ours, still loaded
    assert [(b.pid, b.comm) for b in h.kernel.blockers()] == [(42, "kworker/0:1")]
    (update,) = h.kernel.status().to_json()["updates"]
    assert (update["dynamos"], update["enabled"], update["transition"]) == (True, False, True)
    assert update["tasks_pending"] == [{"pid": 42, "comm": "kworker/0:1"}]


def test_unwritable_action_log_does_not_fail_apply(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    (tmp_path / "blocker").write_text("")
    h.kernel.log.path = tmp_path / "blocker" / "actions.log"
    assert h.kernel.apply(h.add("fix-x")).livepatch_name == "fix_x"
    assert h.kernel.blockers() == []


# --- kernel threads whose main function is replaced -------------------------------------------

KTHREAD_STACK = ["[<0>] schedule+0x3c/0xa0", "[<0>] cmdline_proc_show+0x1c/0x60", "[<0>] kthread+0xe8/0x110",
                 "[<0>] ret_from_fork+0x1f/0x30"]


def test_thread_main_loop_is_refused_before_loading_unless_the_update_restarts_it(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.sim.add_task(42, "loopd", KTHREAD_STACK)
    with pytest.raises(PreflightRefused) as info:
        h.kernel.apply(h.add("fix-x"), timeout=2.0)
    assert [r.code for r in info.value.reasons] == ["kthread-loop"]
    assert "kernel thread loopd (pid 42) runs cmdline_proc_show as its main function" in str(info.value)
    assert h.syscalls("init_module") == []

    path = h.add("fix-y")
    h.packages[path].functions[0]["kthread"] = True
    found, notes = h.kernel.predicted_blockers(h.packages[path])
    assert [b.pid for b, _ in found] == [42]
    assert notes == ["1 kernel thread(s) run a replaced function as their main loop and will be restarted onto "
                     "the new edition by the update's hooks: loopd (pid 42) in cmdline_proc_show"]


def test_a_kernel_thread_merely_calling_a_replaced_function_is_a_blocker_not_a_loop(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.sim.add_task(43, "workerd", ["[<0>] cmdline_proc_show+0x1c/0x60", "[<0>] worker_main+0x40/0x90",
                                   "[<0>] kthread+0xe8/0x110", "[<0>] ret_from_fork+0x1f/0x30"])
    path = h.add("fix-x")
    found, notes = h.kernel.predicted_blockers(h.packages[path])
    assert found[0][0].thread_function == "worker_main"
    assert len(notes) == 1 and "workerd (pid 43) in cmdline_proc_show" in notes[0] and "hold up" in notes[0]


def test_tasks_still_to_switch_are_signalled_on_a_schedule(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.sim.add_task(778, "reader", STUCK_STACK, blocked=True, wakes_on_signal=True)
    result = h.kernel.apply(h.add("fix-x"), timeout=10)
    assert h.syscalls("signal") == [("signal", "fix_x")]
    assert "signalled the tasks still to switch at 1 s into the transition" in result.notes


def test_signals_follow_a_doubling_schedule_until_the_timeout(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.sim.add_task(777, "stuckd", STUCK_STACK, blocked=True)
    with pytest.raises(TransitionError):
        h.kernel.apply(h.add("fix-x"), timeout=8, revert_timeout=0.5)
    assert len(h.syscalls("signal")) == 3  # at 1, 3 and 7 s; not during the 0.5 s reversal


HELD_STACK = ["[<0>] schedule+0x3c/0xa0", "[<0>] loop_v2+0x10/0x40 [fix_x]",
              "[<0>] dynamos_kthread__cmdline_proc_show+0x1c/0x60 [fix_x]", "[<0>] kthread+0xe8/0x110",
              "[<0>] ret_from_fork+0x1f/0x30"]


def test_a_replacing_update_must_take_over_a_thread_an_earlier_update_restarted(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.kernel.apply(h.add("fix-x"))  # stands for an update that restarted loopd onto its copy
    h.sim.add_task(42, "loopd", HELD_STACK)
    with pytest.raises(PreflightRefused) as info:
        h.kernel.apply(h.add("fix-y", replace=True), timeout=2.0)
    assert [r.code for r in info.value.reasons] == ["kthread-held"]
    assert ("kernel thread loopd (pid 42) runs update fix_x's copy of cmdline_proc_show, and this update "
            "replaces fix_x without declaring a restart") in str(info.value)

    path = h.add("fix-z", replace=True)
    h.packages[path].functions[0]["kthread"] = True
    _, notes = h.kernel.predicted_blockers(h.packages[path])
    assert notes == ["kernel thread loopd (pid 42) runs update fix_x's copy of cmdline_proc_show: it will be "
                     "restarted onto this update's, and fix_x will let go of it"]
    # Stacked on top instead of replacing, the update leaves fix_x's thread alone.
    assert h.kernel.predicted_blockers(h.packages[h.add("fix-w")])[1] == []
