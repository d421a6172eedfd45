"""Applying and reverting updates on a live kernel: ``LiveKernel``.

Every path that touches the kernel ends in one of two states the user is told about: the update
is fully applied, or it is reverted and unloaded (or was refused before loading). When the
kernel does not let dynamos get there in time, the error says exactly what remains.

All paths derive from ``root`` and all system calls go through ``syscalls``, so the same code
runs against the live kernel (``root=/``) and against a simulated one in unit tests. The checks
are in ``preflight``, the waiting and undoing in ``transition``, the reading in ``status``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dynamos.errors import DynamosError, OperationInterrupted, PackageError, RefusedError
from dynamos.kernel import editions
from dynamos.kernel import livepatch as lp
from dynamos.kernel.actionlog import ActionLog, default_log_path, now_iso
from dynamos.kernel.journal import Journal
from dynamos.kernel.modules import explain_load_error, last_kmsg_seq, loaded_modules, normalize_name
from dynamos.kernel.phases import reached
from dynamos.kernel.preflight import Preflight
from dynamos.kernel.refusals import REFUSALS, PreflightRefused, Refusal
from dynamos.kernel.results import ApplyResult, KernelStatus, RecoverResult, RevertResult
from dynamos.kernel.state import UpdateRecords
from dynamos.kernel.status import StatusReader
from dynamos.kernel.syscalls import LibcSyscalls, Syscalls
from dynamos.kernel.transition import BlockedTransition, ProgressCallback, Transitions, interrupted
from dynamos.kernel.trust import AcceptedPackages, TrustPolicy
from dynamos.update import package as packages
from dynamos.update.package import PackagedFunction, UpdatePackage
from dynamos.update.signature import VerifiedSigner

PHASES = ("verify", "preflight", "load", "transition", "switch", "unload")


def _function_json(f: PackagedFunction) -> dict[str, Any]:
    """A patched function as the result and dynamos' record show it."""
    data: dict[str, Any] = {"name": f.name, "object": f.object}
    if f.edition:
        data["edition"] = f.edition
    if f.sympos is not None:
        data["sympos"] = f.sympos
    return data


class LiveKernel:
    """A running kernel, seen through the files under ``root`` and the ``syscalls`` object."""

    def __init__(
        self,
        root: Path | str = Path("/"),
        syscalls: Syscalls | None = None,
        *,
        poll_interval: float = 0.1,
        unload_timeout: float = 10.0,
        log_path: Path | None = None,
        read_package: Callable[[Path], UpdatePackage] | None = None,
        lock_wait: float | None = None,
        trust: TrustPolicy | None = None,
    ):
        self.root = Path(root)
        self.sys: Syscalls = syscalls if syscalls is not None else LibcSyscalls()
        self.log = ActionLog(log_path if log_path is not None else default_log_path(self.root))
        self.records = UpdateRecords(self.root)
        self.trust = trust if trust is not None else TrustPolicy()
        self.accepted = AcceptedPackages(self.root)
        self._read_package = read_package if read_package is not None else packages.read_package
        self.checks = Preflight(self.root, self.sys, self.log)
        self.transitions = Transitions(self.root, self.sys, self.log, poll_interval=poll_interval,
                                       unload_timeout=unload_timeout)
        self.journal = Journal(self.root, self.log, lock_wait)
        self.reader = StatusReader(self.root, self.records, self.journal)

    @property
    def signalled(self) -> list[float]:
        """When the last transition waited for signalled its blockers (seconds into it)."""
        return self.transitions.signalled

    # -- checks and status ------------------------------------------------------------------

    def preflight(self, pkg: UpdatePackage) -> list[str]:
        """Check that ``pkg`` can be applied to this kernel without changing anything: notes,
        or PreflightRefused listing every reason it cannot."""
        return self.checks.check(pkg)

    def predicted_blockers(self, pkg: UpdatePackage) -> tuple[list[tuple[lp.Blocker, list[str]]], list[str]]:
        """Tasks that now have a function the update replaces on their stack, and a note on them."""
        return self.checks.predicted_blockers(pkg)

    def check(self, package_path: Path | str) -> dict[str, Any]:
        """What ``apply`` would do, without loading anything: verification, preflight, blockers."""
        pkg = self._read_package(Path(package_path))
        signer = self._verify(pkg)
        notes = self.preflight(pkg)
        found, _ = self.predicted_blockers(pkg)
        return {"update": pkg.name, "signer": signer.to_json(), "livepatch_name": pkg.livepatch_name,
                "kernel": pkg.kernel_release,
                "consistency": pkg.consistency, "notes": notes,
                "predicted_blockers": [{**b.to_json(), "functions": hits} for b, hits in found]}

    def _log_failure(self, action: str, name: str, start: float, details: dict[str, Any],
                     error: BaseException) -> None:
        """Log a failed operation; the result says where the kernel was left."""
        if isinstance(error, (RefusedError, PackageError)):
            result = "refused"  # nothing was changed
        elif isinstance(error, DynamosError):
            result = error.outcome if isinstance(error, BlockedTransition) else "failed"
        else:
            result = "interrupted"
        details["error"] = str(error) or type(error).__name__
        if isinstance(error, BlockedTransition):
            details["blockers"] = [b.to_json() for b in error.blockers]
        self.log.record(action, name, result, self.sys.monotonic() - start, details)

    # -- apply ------------------------------------------------------------------------------

    def apply(
        self,
        package_path: Path | str,
        timeout: float = 30.0,
        progress: ProgressCallback | None = None,
        *,
        revert_timeout: float | None = None,
        force: bool = False,
    ) -> ApplyResult:
        """Apply an update package under the operation lock, after recovering any operation the
        journal shows was interrupted (see ``_apply``)."""
        if self.sys.geteuid() != 0:  # refused before the lock, which only root may take
            return self._apply(package_path, timeout, progress, revert_timeout=revert_timeout, force=force)
        with self.journal.locked(str(package_path)):
            reached("apply", "locked")
            recovered = self._recover_notes(timeout)
            try:
                result = self._apply(package_path, timeout, progress, revert_timeout=revert_timeout, force=force)
            finally:
                self.journal.done()
        result.notes[:0] = recovered
        return result

    def _apply(
        self,
        package_path: Path | str,
        timeout: float = 30.0,
        progress: ProgressCallback | None = None,
        *,
        revert_timeout: float | None = None,
        force: bool = False,
    ) -> ApplyResult:
        """Apply an update package: verify, preflight, load, transition (reverting on timeout).

        ``timeout`` bounds the transition; ``revert_timeout`` (default: ``timeout``) bounds the
        reversal that follows a timeout. With ``force``, a transition still blocked at the
        timeout is forced instead (livepatch's ``force``): the tasks named in the notes may
        still run the old code, and the modules of updates this one replaces stay loaded.
        """
        revert_timeout = timeout if revert_timeout is None else revert_timeout
        phases = dict.fromkeys(PHASES, 0.0)
        start = self.sys.monotonic()
        label = str(package_path)
        details: dict[str, Any] = {"package": str(package_path), "phases": phases}

        def timed(phase: str, t0: float) -> float:
            now = self.sys.monotonic()
            phases[phase] = round(now - t0, 6)
            return now

        pkg: UpdatePackage | None = None
        loading = transitioned = False
        before: set[str] = set()
        notes: list[str] = []
        euid = self.sys.geteuid()
        if euid != 0:  # before reading the package: an unprivileged user may not even read it
            raise PreflightRefused(label, [Refusal.make("not-root", euid=euid)])
        try:
            t = self.sys.monotonic()
            pkg = self._read_package(Path(package_path))
            label = pkg.livepatch_name
            details["update"] = pkg.name
            signer = self._verify(pkg)
            details["signer"] = signer.to_json()
            t = timed("verify", t)
            reached("apply", "verified")
            notes = self.preflight(pkg)
            notes += self.predicted_blockers(pkg)[1]
            t = timed("preflight", t)
            reached("apply", "preflighted")
            before = set(lp.livepatch_names(self.root))
            functions = [_function_json(f) for f in pkg.patched_functions]
            self.journal.intent("apply", pkg.livepatch_name, {
                "update": pkg.name, "package": os.path.abspath(package_path), "consistency": pkg.consistency,
                "replacing": sorted(before - {pkg.livepatch_name}) if pkg.replace else []})
            reached("apply", "intent-logged")
            # Recorded before loading, so an update whose apply was killed midway is still
            # recognisable as dynamos' in status.
            self._record(pkg, package_path, functions, notes, signer)
            reached("apply", "recorded")
            loading = True
            self._load(pkg)
            t = timed("load", t)
            reached("apply", "loaded")
            self.transitions.complete(pkg.livepatch_name, timeout, revert_timeout, progress,
                                      force_notes=notes if force else None)
            notes += self.transitions.signal_notes()
            t = timed("transition", t)
            reached("apply", "transitioned")
            if pkg.consistency == "global":
                self.transitions.switch_globally(pkg.livepatch_name, True, timeout, revert_timeout, progress, notes)
                t = timed("switch", t)
                reached("apply", "switched")
            transitioned = True  # from here on the update is applied: failures only leave old modules
            replaced: list[str] = []
            if pkg.replace:
                replaced = self.transitions.unload_replaced(sorted(before - {pkg.livepatch_name}), notes)
            timed("unload", t)
            reached("apply", "replaced-unloaded")
        except BaseException as e:
            if pkg is not None and transitioned:
                raise self._cleanup_interrupted(pkg, sorted(before - {pkg.livepatch_name}), e, start,
                                                details, notes) from e
            error: BaseException = e
            if pkg is not None and loading and not isinstance(e, DynamosError) and self._is_loaded(pkg.livepatch_name):
                # Interrupted between init_module and the transition watch: undo the load too.
                error = self.transitions.undo_load(pkg.livepatch_name, revert_timeout, interrupted("load", e), None)
            if pkg is not None and not self._is_loaded(pkg.livepatch_name):
                self.records.remove(pkg.livepatch_name)
            self._log_failure("apply", label, start, details, error)
            if error is e:
                raise
            raise error from e

        for old in replaced:
            self.records.remove(old)
        try:
            self.accepted.remember(pkg, signer)
        except OSError as e:
            notes.append(f"could not record the package as accepted in {self.accepted.directory} "
                         f"(an older package of {pkg.name} would not be refused): {e.strerror or e}")
        result = ApplyResult(
            name=pkg.name,
            livepatch_name=pkg.livepatch_name,
            package=str(package_path),
            kernel=pkg.kernel_release,
            replace=bool(pkg.replace),
            functions=functions,
            replaced=replaced,
            notes=notes,
            phases=phases,
            seconds=round(self.sys.monotonic() - start, 6),
        )
        details.update(replaced=replaced, notes=notes)
        self.log.record("apply", pkg.livepatch_name, "ok", result.seconds, details)
        reached("apply", "result-logged")
        return result

    def _cleanup_interrupted(self, pkg: UpdatePackage, old: list[str], e: BaseException, start: float,
                             details: dict[str, Any], notes: list[str]) -> DynamosError:
        """The update's transition completed, then unloading the modules it replaced was stopped:
        the update stays applied (undoing it would be the wrong answer); say what is left."""
        still = [n for n in old if n in loaded_modules(self.root)]
        for name in old:
            if not self._is_loaded(name):
                self.records.remove(name)
        details.update(notes=notes, still_loaded=still, error=str(e) or type(e).__name__)
        self.log.record("apply", pkg.livepatch_name, "ok, cleanup interrupted", self.sys.monotonic() - start, details)
        left = (f"the replaced module(s) {', '.join(still)} are still loaded (inactive; "
                f"`dynamos revert NAME` unloads each)") if still else "no replaced module is left loaded"
        return DynamosError(f"{pkg.livepatch_name}: applied (every task runs the new code); "
                            f"{interrupted('unloading of the modules it replaced', e)}: {left}")

    def _verify(self, pkg: UpdatePackage) -> VerifiedSigner:
        """The package's signer (refused unless the trust store vouches for it), and no replay."""
        signer = self.trust.verify(pkg)
        live = self.records.read(pkg.livepatch_name) if self._is_loaded(pkg.livepatch_name) else None
        self.accepted.check(pkg, self.trust, (live or {}).get("created"))
        return signer

    def _record(self, pkg: UpdatePackage, package_path: Path | str, functions: list[dict[str, Any]],
                notes: list[str], signer: VerifiedSigner) -> None:
        record = {
            "update": pkg.name,
            "livepatch": pkg.livepatch_name,
            "package": os.path.abspath(package_path),
            "module_sha256": pkg.module_sha256,
            "kernel": pkg.kernel_release,
            "replace": bool(pkg.replace),
            "applied": now_iso(),
            "created": pkg.manifest["created"],
            "description": pkg.description,
            "version": pkg.version,
            "cves": list(pkg.cves),
            **({"debian": pkg.debian} if pkg.debian else {}),
            "signer": signer.to_json(),
            "functions": functions,
        }
        try:
            self.records.write(pkg.livepatch_name, record)
        except OSError as e:  # an update loaded without its record would not be dynamos' in status
            raise RefusedError(f"{pkg.livepatch_name}: refused, nothing was loaded: cannot write the record "
                               f"{self.records.path(pkg.livepatch_name)}: {e.strerror or e}") from e

    def _is_loaded(self, name: str) -> bool:
        """Whether module ``name`` is in the kernel (registered livepatch or plain module)."""
        return (lp.livepatch_root(self.root) / name).exists() or name in loaded_modules(self.root)

    def _load(self, pkg: UpdatePackage) -> None:
        name = pkg.livepatch_name
        since = last_kmsg_seq(self.root)  # so the error quotes only what this load logged
        try:
            self.sys.init_module(pkg.module, "")
        except OSError as e:
            raise RefusedError(
                f"{pkg.name}: the kernel refused module {name}; the update was never loaded: "
                f"{explain_load_error(e, name, self.root, since)}"
            ) from e
        if not (lp.livepatch_root(self.root) / name).is_dir():
            # Loaded, but it registered no livepatch: not what the package promised. Take it out.
            failure = self.transitions.unload(name)
            state = "it was unloaded" if failure is None else f"it could not be unloaded: {failure}"
            raise DynamosError(
                f"{pkg.name}: module {name} loaded but registered no livepatch "
                f"(/sys/kernel/livepatch/{name} missing); {state}"
            )

    # -- revert -----------------------------------------------------------------------------

    def revert(
        self,
        name: str,
        timeout: float = 30.0,
        progress: ProgressCallback | None = None,
        *,
        restore_timeout: float | None = None,
    ) -> RevertResult:
        """Revert under the operation lock, after recovering interrupted operations (``_revert``)."""
        if self.sys.geteuid() != 0:
            return self._revert(name, timeout, progress, restore_timeout=restore_timeout)
        with self.journal.locked(name):
            reached("revert", "locked")
            recovered = self._recover_notes(timeout)
            try:
                result = self._revert(name, timeout, progress, restore_timeout=restore_timeout)
            finally:
                self.journal.done()
        result.notes[:0] = recovered
        return result

    def _revert(
        self,
        name: str,
        timeout: float = 30.0,
        progress: ProgressCallback | None = None,
        *,
        restore_timeout: float | None = None,
    ) -> RevertResult:
        """Disable an update and unload its module.

        If the reversal does not finish within ``timeout``, it is itself reversed (the update is
        re-enabled, as it was) so the kernel is not left between the two; ``restore_timeout``
        (default ``timeout``) bounds that.
        """
        restore_timeout = timeout if restore_timeout is None else restore_timeout
        lp_name = normalize_name(name)
        start = self.sys.monotonic()
        phases = {"preflight": 0.0, "transition": 0.0, "unload": 0.0}
        details: dict[str, Any] = {"phases": phases}
        record = self.records.read(lp_name)
        notes: list[str] = []
        intent = False
        try:
            t = self.sys.monotonic()
            patch = self._revert_preflight(lp_name, notes)
            reached("revert", "preflighted")
            self.journal.intent("revert", lp_name, {"update": record.get("update") if record else None})
            intent = True
            reached("revert", "intent-logged")
            now = self.sys.monotonic()
            phases["preflight"], t = round(now - t, 6), now
            switched_off = False
            if patch is not None and (editions.global_switch_state(lp_name, self.root) or {}).get("state") == "new":
                self.transitions.switch_globally(lp_name, False, timeout, restore_timeout, progress, notes)
                switched_off = True
                reached("revert", "switched-back")
            if patch is not None:
                try:
                    self.transitions.disable(patch, timeout, restore_timeout, progress)
                except BlockedTransition as blocked:
                    if not (switched_off and blocked.outcome == "restored"):
                        raise
                    # Re-enabled, but every function still serves edition 0: put the editions back
                    # (the state before the revert), or say that the fix is not running.
                    raise self.transitions.restore_globally(lp_name, blocked, restore_timeout) from blocked
                notes += self.transitions.signal_notes()
                reached("revert", "disabled")
                self.transitions.wait_gone(lp_name, self.transitions.unload_timeout)
            now = self.sys.monotonic()
            phases["transition"], t = round(now - t, 6), now
            failure = self.transitions.unload(lp_name)
            if failure is not None:
                raise DynamosError(
                    f"{lp_name}: disabled (every task runs the original code), but its module "
                    f"could not be unloaded: {failure}"
                )
            phases["unload"] = round(self.sys.monotonic() - t, 6)
            reached("revert", "unloaded")
        except BaseException as e:
            if intent and not isinstance(e, DynamosError):
                raise self._finish_interrupted_revert(lp_name, e, restore_timeout, start, details) from e
            self._log_failure("revert", lp_name, start, details, e)
            raise
        if not self.records.remove(lp_name):
            notes.append(f"could not remove the record {self.records.path(lp_name)}")
        result = RevertResult(
            name=lp_name,
            update=record.get("update") if record else None,
            notes=notes,
            phases=phases,
            seconds=round(self.sys.monotonic() - start, 6),
        )
        details["notes"] = notes
        self.log.record("revert", lp_name, "ok", result.seconds, details)
        reached("revert", "result-logged")
        return result

    def _finish_interrupted_revert(self, lp_name: str, e: BaseException, timeout: float, start: float,
                                   details: dict[str, Any]) -> DynamosError:
        """A revert stopped between two of its steps (Ctrl-C, an unexpected error): finish it, or
        leave the update applied as it was, as ``recover`` would; the error says which."""
        from dynamos.kernel.recovery import finish_revert

        try:
            outcome, detail = finish_revert(self, lp_name, timeout)
        except DynamosError as failed:  # the intent stays open: status shows it, recover retries
            return DynamosError(f"{lp_name}: {interrupted('revert', e)}, and finishing it failed: {failed}; "
                                "run `dynamos recover`")
        self._log_failure("revert", lp_name, start, {**details, "outcome": outcome, "detail": detail}, e)
        cls = OperationInterrupted if isinstance(e, KeyboardInterrupt) else DynamosError
        return cls(f"{lp_name}: {interrupted('revert', e)}; {outcome}: {detail}")

    def _revert_preflight(self, lp_name: str, notes: list[str]) -> lp.Livepatch | None:
        """The patch to disable (None: only a leftover module to unload), or RefusedError."""
        euid = self.sys.geteuid()
        if euid != 0:
            raise RefusedError(f"{lp_name}: refused, nothing was changed: "
                               + REFUSALS["not-root"].format(euid=euid))
        patch = lp.read_livepatch(self.root, lp_name)
        if patch is None:
            module = loaded_modules(self.root).get(lp_name)
            if module is not None and module.is_livepatch:
                notes.append(f"livepatch {lp_name} was already disabled or replaced; unloading its module")
                return None
            loaded = lp.livepatch_names(self.root)
            listing = f"loaded livepatches: {', '.join(loaded)}" if loaded else "no livepatch is loaded"
            raise RefusedError(f"no livepatch named {lp_name} is loaded ({listing})")
        for other in lp.read_livepatches(self.root):
            if other.transition and other.name != lp_name:
                raise RefusedError(f"{lp_name}: refused, nothing was changed: "
                                   + REFUSALS["busy"].format(other=other.name))
        return patch

    # -- recovery ---------------------------------------------------------------------------

    def recover(self, timeout: float = 30.0) -> RecoverResult:
        """Finish or undo every operation the journal shows was interrupted (see ``recovery``)."""
        from dynamos.kernel.recovery import recover

        with self.journal.locked("recover"):
            return recover(self, timeout)

    def _recover_notes(self, timeout: float) -> list[str]:
        """Recover before a change, so it starts from a kernel every line of the log accounts for."""
        if not self.journal.pending():
            return []
        return [f"recovered first: {line}" for line in self.recover(timeout).lines()]

    # -- status -----------------------------------------------------------------------------

    def transition_blockers(self, name: str | None = None) -> dict[str, list[lp.Blocker]]:
        """Tasks not yet switched, per livepatch in transition (or just ``name``)."""
        return self.reader.transition_blockers(name)

    def blockers(self) -> list[lp.Blocker]:
        """Tasks holding up the transition in progress (only one runs at a time), with stacks."""
        return self.reader.blockers()

    def status(self, name: str | None = None) -> KernelStatus:
        """Every livepatch on the kernel (or just ``name``), enriched by dynamos' records."""
        return self.reader.status(self.sys.release(), name)
