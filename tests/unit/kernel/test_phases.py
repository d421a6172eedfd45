"""The phase registry of apply, revert and switch: every phase is reached by a normal operation, in
order, and every call names a registered phase; Ctrl-C at each phase leaves a kernel that status
describes truly and nothing for recover to fix (kill -9 at each phase is the lab's job:
tests/lab/test_faults_lab.py)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Any

import pytest

from dynamos.abi import CONTROL_DIR, EDITIONS_FILE, ROUTE_FILE
from dynamos.errors import DynamosError
from dynamos.kernel import editions, phases
from dynamos.kernel.phases import FAULT_ENV, GLOBAL_ONLY, PHASES, FaultSpecError
from tests.support.harness import KernelHarness

SRC = Path(phases.__file__).resolve().parents[1]


def _with_editions(h: KernelHarness, update: str = "fix_x") -> Path:
    """Give a loaded update the control files of one multi-edition function (cmdline_proc_show)."""
    d = h.sim.root / "sys/module" / update / CONTROL_DIR / "cmdline_proc_show"
    d.mkdir(parents=True)
    (d / EDITIONS_FILE).write_text("0 cmdline_proc_show 0 0 live\n1 tag_one 0 0 live\n2 tag_two 0 0 live\n")
    (d / ROUTE_FILE).write_text("default 0\n")
    return d


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every ``reached`` call, in order, from every module that calls it."""
    calls: list[tuple[str, str]] = []

    def record(operation: str, phase: str) -> None:
        calls.append((operation, phase))

    users = [m for name, m in sys.modules.items()
             if name.startswith("dynamos.") and getattr(m, "reached", None) is phases.reached]
    assert {m.__name__ for m in users} >= {"dynamos.kernel.live", "dynamos.kernel.transition",
                                           "dynamos.kernel.editions"}
    for m in users:
        monkeypatch.setattr(m, "reached", record)
    return calls


def _run(h: KernelHarness, operation: str, consistency: str) -> None:
    """One normal ``operation`` on the simulated kernel (its precondition set up first)."""
    if operation == "apply":
        h.kernel.apply(h.add("fix-x", consistency=consistency))
        return
    h.kernel.apply(h.add("fix-x", consistency=consistency))
    if operation == "revert":
        h.kernel.revert("fix-x")
    else:
        _with_editions(h)
        editions.switch("fix-x", "cmdline_proc_show", 2, root=h.sim.root)


@pytest.mark.parametrize("operation", sorted(PHASES))
def test_every_registered_phase_is_reached_in_order(harness: KernelHarness, recorded, operation: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    h = harness
    monkeypatch.setenv("DYNAMOS_LOG", str(h.log_path))  # switch writes the log from the environment
    seen: set[str] = set()
    for consistency in ("per-task", "global") if operation != "switch" else ("per-task",):
        h = KernelHarness(h.packages.parent / consistency) if consistency == "global" else h
        monkeypatch.setenv("DYNAMOS_LOG", str(h.log_path))
        recorded.clear()
        _run(h, operation, consistency)
        mine = [p for op, p in recorded if op == operation]
        assert all(op in PHASES and p in PHASES[op] for op, p in recorded), recorded
        expected = [p for p in PHASES[operation]
                    if consistency == "global" or p not in GLOBAL_ONLY.get(operation, ())]
        assert mine == expected, (consistency, mine)
        seen |= set(mine)
    assert seen == set(PHASES[operation])


def _literal_calls() -> list[tuple[Path, tuple[str, ...]]]:
    calls = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "reached"
                    and all(isinstance(a, ast.Constant) for a in node.args)):
                calls.append((path, tuple(a.value for a in node.args)))
    return calls


def test_every_call_in_the_source_names_a_registered_phase() -> None:
    calls = _literal_calls()
    named: set[tuple[str, str]] = set()
    for path, args in calls:
        if len(args) == 2:  # reached(operation, phase)
            assert args[1] in PHASES.get(args[0], ()), f"{path}: reached{args} is not registered"
            named.add(args)
        else:  # Journal.operation's reached(phase), bound to switch
            assert path.name == "journal.py" and args[0] in PHASES["switch"], (path, args)
            named.add(("switch", args[0]))
    assert named == {(op, p) for op, ps in PHASES.items() for p in ps}


def test_a_fault_naming_no_registered_phase_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("apply:loded:KILL", "aply:loaded:KILL", "apply:loaded:TERM", "apply:loaded"):
        monkeypatch.setenv(FAULT_ENV, bad)
        with pytest.raises(FaultSpecError):
            phases.reached("apply", "locked")
    monkeypatch.setenv(FAULT_ENV, "revert:unloaded:KILL")
    phases.reached("apply", "locked")  # another phase: nothing happens
    with pytest.raises(FaultSpecError, match="not registered"):
        phases.reached("apply", "unheard-of")


def _kernel_truth(h: KernelHarness) -> dict[str, Any]:
    """What the simulated kernel holds, to compare status with."""
    return {"patches": {n: (p.enabled, p.transition) for n, p in h.sim.patches.items() if p.free_in is None},
            "modules": {n for n, m in h.sim.modules.items() if m.livepatch}}


def _check_status_is_true(h: KernelHarness) -> dict[str, Any]:
    status = h.kernel.status().to_json()
    truth = _kernel_truth(h)
    listed = {u["name"]: u for u in status["updates"]}
    assert set(listed) == truth["modules"], (listed, truth)
    for name, (enabled, transition) in truth["patches"].items():
        assert (listed[name]["enabled"], listed[name]["transition"]) == (enabled, transition)
    return status


CASES = [(op, phase, consistency) for op in sorted(PHASES) for phase in PHASES[op]
         for consistency in (("per-task", "global") if op != "switch" else ("per-task",))
         if consistency == "global" or phase not in GLOBAL_ONLY.get(op, ())]


@pytest.mark.parametrize(("operation", "phase", "consistency"), CASES)
def test_ctrl_c_at_every_phase_leaves_a_true_status_and_nothing_to_recover(
        harness: KernelHarness, monkeypatch: pytest.MonkeyPatch, operation: str, phase: str,
        consistency: str) -> None:
    h = harness
    monkeypatch.setenv("DYNAMOS_LOG", str(h.log_path))
    pkg = h.add("fix-x", consistency=consistency)
    if operation != "apply":
        h.kernel.apply(pkg)
    if operation == "switch":
        route = _with_editions(h) / ROUTE_FILE
    monkeypatch.setenv(FAULT_ENV, f"{operation}:{phase}:INT")
    with pytest.raises((KeyboardInterrupt, DynamosError)) as info:
        if operation == "apply":
            h.kernel.apply(pkg)
        elif operation == "revert":
            h.kernel.revert("fix-x")
        else:
            editions.switch("fix-x", "cmdline_proc_show", 2, root=h.sim.root)
    monkeypatch.delenv(FAULT_ENV)
    assert isinstance(info.value, KeyboardInterrupt) or "interrupted" in str(info.value), info.value
    for _ in range(5):  # let disabled patches be freed, as the real kernel does asynchronously
        h.sim.sleep(0.1)
    status = _check_status_is_true(h)
    assert "interrupted" not in status, status["interrupted"]  # Ctrl-C accounts for itself
    assert h.kernel.recover().items == []
    assert set(h.sim.patches) == {n for n, m in h.sim.modules.items() if m.livepatch}  # none half-loaded
    patch = h.sim.patches.get("fix_x")
    if patch is not None and patch.enabled:
        assert not patch.transition and h.record("fix_x").exists()
        if consistency == "global":  # applied means serving the new editions
            assert h.sim.global_state["fix_x"] == "new"
    if operation == "switch":  # the route is the old one or the new one, whatever the log says
        assert route.read_text() in ("default 0\n", "default 2")
