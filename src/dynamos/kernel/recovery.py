"""Recovery: finish or undo what the journal says was in flight when dynamos was killed.

An intent line with no result is a change nobody accounted for. The kernel, not the log, says
how far it got: an apply whose transition finished is completed (recorded, replaced modules
unloaded), one still moving or disabled is reverted; a revert that had disabled the patch is
finished, one that had not is left applied. Each outcome is written as the operation's result.
"""

from __future__ import annotations

import os
import time
from typing import Any

from dynamos.errors import DynamosError
from dynamos.kernel import editions
from dynamos.kernel import livepatch as lp
from dynamos.kernel.actionlog import now_iso
from dynamos.kernel.modules import loaded_modules
from dynamos.kernel.results import RecoverResult
from dynamos.kernel.status import kernel_shows
from dynamos.kernel.transition import BlockedTransition

LiveKernel = Any  # dynamos.kernel.live.LiveKernel (not imported: live imports this module)


def recover(k: LiveKernel, timeout: float) -> RecoverResult:
    """Resolve every interrupted operation (the caller holds the operation lock)."""
    result = RecoverResult()
    pending = k.journal.pending()
    if not pending:
        return result
    start = time.monotonic()
    k.journal.intent("recover", "journal", {"operations": [e.get("op") for e in pending]})
    try:
        for e in pending:
            name = str(e.get("name"))
            try:
                outcome, detail = _resolve(k, e, timeout)
            except DynamosError as err:
                outcome, detail = "failed", f"{err}; now: {kernel_shows(k.root, name)}"
            item = {"action": e.get("action"), "name": name, "pid": e.get("pid"), "time": e.get("time"),
                    "outcome": outcome, "detail": detail}
            result.items.append(item)
            if outcome != "failed":  # a failed recovery stays pending: status keeps showing it
                k.log.write({"action": e.get("action"), "name": name, "op": e.get("op"),
                             "result": f"recovered: {outcome}", "details": {"detail": detail, "by": os.getpid()}})
        k.log.record("recover", "journal", "ok", time.monotonic() - start, {"recovered": result.items})
    finally:
        k.journal.done()
    return result


def _resolve(k: LiveKernel, e: dict[str, Any], timeout: float) -> tuple[str, str]:
    action, name = e.get("action"), str(e.get("name"))
    if action == "apply":
        return _finish_apply(k, name, e.get("details") or {}, timeout)
    if action == "revert":
        return finish_revert(k, name, timeout)
    return "closed", f"interrupted; nothing to undo; now: {kernel_shows(k.root, name)}"


def _take_out(k: LiveKernel, name: str, timeout: float, what: str) -> tuple[str, str]:
    """Wait for a disabled patch to finish going back, then unload it."""
    if lp.read_livepatch(k.root, name) is not None and not k.transitions.wait(name, timeout, "revert", None):
        return "in transition", f"{what}; still moving tasks back to the original code after {timeout:g}s"
    k.transitions.wait_gone(name, k.transitions.unload_timeout)
    failure = k.transitions.unload(name)
    if failure is not None:
        return "reverted", f"{what}; every task runs the original code, but its module stays loaded: {failure}"
    k.records.remove(name)
    return "reverted", f"{what}; reverted and unloaded, record removed"


def _finish_apply(k: LiveKernel, name: str, details: dict[str, Any], timeout: float) -> tuple[str, str]:
    patch = lp.read_livepatch(k.root, name)
    if patch is None:
        if name in loaded_modules(k.root):
            return _take_out(k, name, timeout, "its module was loaded without a livepatch")
        k.records.remove(name)
        return "not applied", "killed before its module loaded: nothing to undo, record removed"
    if patch.enabled and patch.transition and not k.transitions.wait(name, timeout, "transition", None):
        err = k.transitions.undo_load(name, timeout, f"its transition had not finished {timeout:g}s later", None)
        if not k._is_loaded(name):
            k.records.remove(name)
        return err.outcome, str(err).split("\n")[0]
    patch = lp.read_livepatch(k.root, name)
    if patch is None or not patch.enabled:
        return _take_out(k, name, timeout, "it was disabled (its apply was being undone)")
    notes: list[str] = []
    if (editions.global_switch_state(name, k.root) or {}).get("state") == "old":
        try:
            k.transitions.switch_globally(name, True, timeout, timeout, None, notes)
        except BlockedTransition as b:
            if not k._is_loaded(name):
                k.records.remove(name)
            return b.outcome, str(b).split("\n")[0]
    if k.records.read(name) is None:
        try:
            k.records.write(name, {"update": details.get("update"), "livepatch": name,
                                   "package": details.get("package"), "applied": now_iso(), "recovered": True,
                                   "functions": []})
        except OSError as e:
            notes.append(f"could not write its record {k.records.path(name)}: {e.strerror or e}")
    replaced = k.transitions.unload_replaced([n for n in details.get("replacing", []) if n != name], notes)
    for old in replaced:
        k.records.remove(old)
    extra = f"; unloaded the modules it replaced: {', '.join(replaced)}" if replaced else ""
    return "completed", (f"its transition had finished: the update is applied and recorded{extra}"
                         + "".join(f"; {n}" for n in notes))


def finish_revert(k: LiveKernel, name: str, timeout: float) -> tuple[str, str]:
    """Finish a revert that was stopped (or leave the update applied, if it had not taken effect)."""
    patch = lp.read_livepatch(k.root, name)
    if patch is None:
        if name not in loaded_modules(k.root):
            k.records.remove(name)
            return "completed", "the revert had finished: nothing of it is loaded, record removed"
        return _take_out(k, name, timeout, "it had been disabled")
    if not patch.enabled:
        return _take_out(k, name, timeout, "it had been disabled")
    if patch.transition:
        k.transitions.wait(name, timeout, "restore", None)
    if (editions.global_switch_state(name, k.root) or {}).get("state") == "old":
        try:
            k.transitions.switch_globally(name, True, timeout, timeout, None, [])
        except BlockedTransition as b:
            return b.outcome, str(b).split("\n")[0]
    return "left applied", ("the revert had not taken effect (or had been undone): the update stays applied; "
                            f"run `dynamos revert {name}` again to take it out")
