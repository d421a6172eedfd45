"""Transitions: moving every task onto an update's code or back, and what to do when they do not move.

Livepatch switches each task when it is not running a patched function; a task sleeping in one
holds the transition up. This module waits for transitions with progress reports, nudges the
tasks still to switch (livepatch's fake signal through the update module), undoes a transition
that cannot finish so the kernel is never left half updated, and runs the global switch of
updates with global consistency. Every error it raises says where the kernel was left.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dynamos.abi import GLOBAL_FILE, SIGNAL_BLOCKERS_PARAM
from dynamos.errors import RefusedError, TransitionError
from dynamos.kernel import editions
from dynamos.kernel import livepatch as lp
from dynamos.kernel.actionlog import ActionLog
from dynamos.kernel.modules import explain_unload_error, last_kmsg_seq, loaded_modules, unload_module
from dynamos.kernel.phases import reached
from dynamos.kernel.syscalls import Syscalls

PROGRESS_EVERY = 1.0  # seconds between progress reports while nothing changes
# Tasks still to switch are signalled (the update module's signal_blockers) this long into a
# transition, then again after twice as long each time: 1, 3, 7, 15 s... Livepatch itself waits 15 s.
SIGNAL_AFTER = 1.0


@dataclass
class Progress:
    """Reported on every poll of a transition, for progress bars."""

    phase: str  # "transition" (applying), "revert", "restore" (undoing a stuck revert), "switch" (global)
    name: str  # livepatch name
    pending: int  # tasks not yet switched to the target state
    elapsed: float
    timeout: float

    def __str__(self) -> str:
        """A progress line, so a callback that only prints strings works too."""
        if self.phase == "switch":
            return f"{self.name}: switching every function at one instant (all CPUs stopped)"
        doing = {"transition": "transition", "revert": "reverting", "restore": "restoring"}.get(
            self.phase, self.phase)
        return (f"{self.name}: {doing}, {self.pending} task(s) not switched yet "
                f"({self.elapsed:.1f} s of {self.timeout:g} s)")


ProgressCallback = Callable[[Progress], None]


class BlockedTransition(TransitionError):
    """A transition did not finish in time; ``outcome`` says where the kernel was left.

    outcome: "reverted and unloaded", "reverted" (module still loaded), "restored"
    (a revert was undone: the update stays applied), "restored, serving edition 0" (a global
    update's revert was undone but its functions could not be switched back to their editions:
    loaded and enabled, yet the fix is not running), or "in transition" (the kernel still moves
    tasks; nothing more dynamos could do in time).
    """

    def __init__(self, message: str, *, name: str, outcome: str, blockers: list[lp.Blocker]):
        self.name = name
        self.outcome = outcome
        self.blockers = blockers
        super().__init__(message)

    def details(self) -> dict:
        return {"update": self.name, "outcome": self.outcome, "blockers": [b.to_json() for b in self.blockers]}


def interrupted(phase: str, e: BaseException) -> str:
    """What stopped an operation midway, for the error that says where the kernel was left."""
    if isinstance(e, KeyboardInterrupt):
        return f"interrupted during the {phase}"
    return f"error during the {phase} ({type(e).__name__}: {e})"


def describe_blockers(blockers: list[lp.Blocker]) -> str:
    """The tasks an error names, one per line with its stack."""
    if not blockers:
        return "no blocking task could be identified (tasks may have exited meanwhile)"
    return "blocking tasks:\n" + "\n".join(f"  {b.describe()}" for b in blockers)


class Transitions:
    """Transitions of the kernel under ``root``, polled every ``poll_interval`` seconds."""

    def __init__(self, root: Path, syscalls: Syscalls, log: ActionLog, *, poll_interval: float,
                 unload_timeout: float):
        self.root = root
        self.sys = syscalls
        self.log = log
        self.poll_interval = poll_interval
        self.unload_timeout = unload_timeout
        self.signalled: list[float] = []  # when the last transition waited for signalled its blockers

    def wait(
        self, name: str, timeout: float, phase: str, progress: ProgressCallback | None
    ) -> bool:
        """Poll until ``name``'s transition ends (or the patch is gone); False on timeout.

        Tasks that have not switched are signalled on a schedule (``signalled`` records when)."""
        start = self.sys.monotonic()
        last: tuple[int, float] | None = None  # (pending, elapsed) last reported
        self.signalled = []
        next_signal, gap = SIGNAL_AFTER, SIGNAL_AFTER
        while True:
            patch = lp.read_livepatch(self.root, name)
            if patch is None or not patch.transition:
                return True
            elapsed = self.sys.monotonic() - start
            if elapsed >= next_signal:
                if self.signal_blockers(name):
                    self.signalled.append(round(elapsed, 1))
                gap *= 2
                next_signal += gap
            if progress is not None:
                # Reported when the count changes, and at least every PROGRESS_EVERY seconds.
                pending = len(lp.pending_tasks(self.root, patch.target_state))
                if last is None or pending != last[0] or elapsed - last[1] >= PROGRESS_EVERY:
                    progress(Progress(phase, name, pending, elapsed, timeout))
                    last = (pending, elapsed)
            if elapsed >= timeout:
                return False
            self.sys.sleep(self.poll_interval)

    def signal_blockers(self, name: str) -> bool:
        """Have update ``name``'s module signal the tasks still to switch (livepatch's fake
        signal); False when it cannot (a module built before dynamos had this)."""
        path = self.root / "sys/module" / name / "parameters" / SIGNAL_BLOCKERS_PARAM
        if not path.exists():
            return False
        try:
            self.sys.write_attribute(os.fspath(path), b"1")
        except OSError:
            return False
        return True

    def signal_notes(self) -> list[str]:
        """A note saying when the last transition's blockers were signalled, if they were."""
        if not self.signalled:
            return []
        return [f"signalled the tasks still to switch at {', '.join(f'{s:g}' for s in self.signalled)} s "
                "into the transition"]

    def wait_gone(self, name: str, timeout: float) -> bool:
        """Wait for a disabled/replaced patch's sysfs directory to be freed (done asynchronously)."""
        deadline = self.sys.monotonic() + timeout
        while (lp.livepatch_root(self.root) / name).exists():
            if self.sys.monotonic() >= deadline:
                return False
            self.sys.sleep(self.poll_interval)
        return True

    def unload(self, name: str) -> str | None:
        """delete_module with retries; the reason it failed, or None."""
        since = last_kmsg_seq(self.root)
        try:
            unload_module(self.sys, name, self.unload_timeout, self.poll_interval)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None  # already gone: the goal is reached
            return explain_unload_error(e, name, self.root, since)
        return None

    def undo_load(self, name: str, revert_timeout: float, cause: str,
                   progress: ProgressCallback | None) -> BlockedTransition:
        """Reverse a transition that did not finish, then unload; the error to raise says where
        the kernel was left."""
        blockers = lp.blockers(self.root, 1)
        try:
            lp.write_enabled(self.sys, self.root, name, False)
        except OSError as e:
            patch = lp.read_livepatch(self.root, name)
            if patch is None:
                reverse_done = True  # already disabled and freed
            elif not patch.enabled:  # already moving back (reversed by someone else)
                reverse_done = self.wait(name, revert_timeout, "revert", progress)
            else:
                return BlockedTransition(
                    f"{name}: {cause}, and reversing it failed ({lp.explain_enabled_error(e, name, False)}): "
                    f"livepatch {name} remains loaded and in transition to patched; "
                    f"{describe_blockers(blockers)}",
                    name=name, outcome="in transition", blockers=blockers,
                )
        else:
            reverse_done = self.wait(name, revert_timeout, "revert", progress)
        if not reverse_done:
            back = lp.blockers(self.root, 0)
            return BlockedTransition(
                f"{name}: {cause}; its reversal did not finish within {revert_timeout:g}s either: "
                f"livepatch {name} remains loaded, moving tasks back to the original code "
                f"(enabled=0, transition=1). The kernel keeps trying; once "
                f"/sys/kernel/livepatch/{name}/transition reads 0, run `dynamos revert {name}` "
                f"to unload it.\n{describe_blockers(back)}",
                name=name, outcome="in transition", blockers=back,
            )
        self.wait_gone(name, self.unload_timeout)
        failure = self.unload(name)
        if failure is not None:
            return BlockedTransition(
                f"{name}: {cause}; reverted (every task runs the original code), but its module "
                f"could not be unloaded: {failure}. Run `dynamos revert {name}` to retry.\n"
                f"{describe_blockers(blockers)}",
                name=name, outcome="reverted", blockers=blockers,
            )
        return BlockedTransition(
            f"{name}: {cause}; reverted and unloaded.\n{describe_blockers(blockers)}",
            name=name, outcome="reverted and unloaded", blockers=blockers,
        )

    def complete(
        self, name: str, timeout: float, revert_timeout: float, progress: ProgressCallback | None,
        force_notes: list[str] | None = None,
    ) -> None:
        """Wait for the forward transition; on timeout, interruption or any error, revert and
        unload (with ``force_notes``, force a timed-out transition and note who was forced)."""
        try:
            reached("apply", "transition-waiting")
            done = self.wait(name, timeout, "transition", progress)
            if not done and force_notes is not None:
                forced = lp.blockers(self.root, 1)
                lp.write_force(self.sys, self.root, name)
                done = self.wait(name, revert_timeout, "transition", progress)
                who = "; ".join(f"{b.comm} (pid {b.pid})" for b in forced) or "none left by then"
                force_notes.append(f"FORCED after {timeout:g}s: tasks switched without the stack check "
                                   f"may still run the replaced code: {who}; livepatch keeps the modules of "
                                   "updates this one replaced loaded for good")
        except BaseException as e:
            # Ctrl-C, or a failing progress callback: never leave the update half applied.
            # The callback is not called again: it may be what failed.
            raise self.undo_load(name, revert_timeout, interrupted("transition", e), None) from e
        if done and lp.read_livepatch(self.root, name) is None:
            failure = self.unload(name)
            raise TransitionError(
                f"{name}: the livepatch vanished during its transition (disabled by someone "
                f"else?); its module was {'unloaded' if failure is None else 'left loaded: ' + failure}"
            )
        if not done:
            raise self.undo_load(
                name, revert_timeout,
                f"transition did not finish within {timeout:g}s", progress,
            )

    def unload_replaced(self, names: list[str], notes: list[str]) -> list[str]:
        """Unload the modules of livepatches a ``replace`` update made obsolete."""
        modules = loaded_modules(self.root)
        unloaded = []
        for old in names:
            if not self.wait_gone(old, self.unload_timeout):
                notes.append(f"livepatch {old} was not released after the replace; left loaded")
                continue
            if old not in modules:
                continue
            t0 = self.sys.monotonic()
            failure = self.unload(old)
            self.log.record("unload-replaced", old, "ok" if failure is None else "failed",
                            self.sys.monotonic() - t0, {"error": failure} if failure else {})
            if failure is None:
                unloaded.append(old)
            else:
                notes.append(f"replaced livepatch {old} stays loaded (harmless, inactive): {failure}")
        return unloaded

    def switch_globally(self, name: str, to_new: bool, timeout: float, undo_timeout: float,
                         progress: ProgressCallback | None, notes: list[str]) -> None:
        """Move every function of a global update to its new editions (or back) at one instant.

        Forward, a failure reverts and unloads the update (every task ran the original code
        throughout); backward, it leaves the update applied as it was.
        """
        path = editions.control_root(name, self.root) / GLOBAL_FILE
        if progress:
            progress(Progress("switch", name, 0, 0.0, timeout))
        try:
            self.sys.write_attribute(os.fspath(path), f"{'new' if to_new else 'old'} {int(timeout * 1000)}".encode())
        except OSError as e:
            state = editions.global_switch_state(name, self.root) or {}
            names = [ed.name for f in editions.functions_of(name, self.root) for ed in f.editions()]
            who = "; ".join(f"{h['comm']} (pid {h['pid']}) in {h['stack'][0] if h['stack'] else '?'}"
                            for h in editions.tasks_in(names, self.root)) or "no task shows one on its stack now"
            why = (f"the global switch found calls in flight for {timeout:g}s "
                   f"({state.get('last_busy', os.strerror(e.errno or 0))}); tasks: {who}")
            if to_new:
                raise self.undo_load(name, undo_timeout, why, progress) from e
            raise RefusedError(f"{name}: revert refused, nothing was changed (the new editions still "
                               f"serve every call): {why}") from e
        stats = editions.global_switch_state(name, self.root) or {}
        notes.append(f"global switch to the {'new' if to_new else 'original'} editions: state "
                     f"{stats.get('state')}, longest all-CPU stop {int(stats.get('longest_stop_ns', '0')) / 1000:.0f} "
                     f"us after {stats.get('attempts', '?')} attempt(s)")

    def restore_globally(self, name: str, blocked: BlockedTransition, timeout: float) -> BlockedTransition:
        """After a global update's revert was undone (``blocked``), switch its functions back to
        their new editions; the error to raise says truthfully which editions now serve calls."""
        path = editions.control_root(name, self.root) / GLOBAL_FILE
        try:
            self.sys.write_attribute(os.fspath(path), f"new {int(timeout * 1000)}".encode())
        except OSError as e:
            state = editions.global_switch_state(name, self.root) or {}
            why = state.get("last_busy") or os.strerror(e.errno or 0)
            return BlockedTransition(
                f"{str(blocked).split('; restored')[0]}; the livepatch was re-enabled, but switching its "
                f"functions back to their new editions failed ({why}): update {name} is loaded and enabled "
                f"yet every function serves edition 0 (the kernel's original code), so the fix is NOT "
                f"running. Run `dynamos revert {name}` again to take it out, then apply it anew.",
                name=name, outcome="restored, serving edition 0", blockers=blocked.blockers)
        return BlockedTransition(
            f"{str(blocked).split('; restored')[0]}; restored: the update was re-enabled and its functions "
            f"switched back to their new editions: it stays applied.\n{describe_blockers(blocked.blockers)}",
            name=name, outcome="restored", blockers=blocked.blockers)

    def disable(self, patch: lp.Livepatch, timeout: float, restore_timeout: float,
                 progress: ProgressCallback | None) -> None:
        name = patch.name
        if patch.enabled:
            try:
                lp.write_enabled(self.sys, self.root, name, False)
            except OSError as e:
                raise RefusedError(f"{name}: cannot disable it, nothing was changed: "
                                   f"{lp.explain_enabled_error(e, name, False)}") from e
        # else: already moving back to the original code (a reversed transition); just wait.
        try:
            reached("revert", "disable-started")
            done = self.wait(name, timeout, "revert", progress)
        except BaseException as e:
            done, cause, progress = False, interrupted("revert", e), None
        else:
            cause = f"revert did not finish within {timeout:g}s"
        if done:
            return
        blockers = lp.blockers(self.root, 0)
        try:
            lp.write_enabled(self.sys, self.root, name, True)
        except OSError as e:
            now = lp.read_livepatch(self.root, name)
            if now is None or not (now.enabled or now.transition):
                return  # the revert finished after all (the kernel refuses to re-enable it)
            raise BlockedTransition(
                f"{name}: {cause}, and re-enabling it failed ({lp.explain_enabled_error(e, name, True)}): "
                f"livepatch {name} remains in transition to the original code.\n"
                f"{describe_blockers(blockers)}",
                name=name, outcome="in transition", blockers=blockers,
            ) from e
        if self.wait(name, restore_timeout, "restore", progress):
            raise BlockedTransition(
                f"{name}: {cause}; restored: the update was re-enabled and stays applied.\n"
                f"{describe_blockers(blockers)}",
                name=name, outcome="restored", blockers=blockers,
            )
        back = lp.blockers(self.root, 1)
        raise BlockedTransition(
            f"{name}: {cause}, and restoring it did not finish within {restore_timeout:g}s either: "
            f"livepatch {name} remains loaded and in transition back to patched (enabled=1, "
            f"transition=1); the kernel keeps trying.\n{describe_blockers(back)}",
            name=name, outcome="in transition", blockers=back,
        )
