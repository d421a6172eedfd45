"""The kernel layer: operations on a live kernel, run on the target as root.

Library entry points (the CLI is a thin shell over them)::

    from dynamos import kernel
    notes = kernel.preflight(pkg)                    # checks only; raises PreflightRefused
    result = kernel.apply("fix.dynpkg", timeout=30)  # ApplyResult, or TransitionError (reverted)
    kernel.revert("fix-x")                           # RevertResult
    kernel.status().to_json()                        # {"kernel", "livepatch", "updates": [...]}
    kernel.install("fix.dynpkg"); kernel.load_all()  # kept across reboots (see ``installed``)

``progress`` callbacks receive ``Progress`` records whose ``str()`` is a ready-made progress line.

Each function acts on the running kernel (root ``/``, real syscalls). Use ``LiveKernel`` to point
at another root or substitute the syscalls (unit tests, simulations).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dynamos.kernel.actionlog import ActionLog, default_log_path
from dynamos.kernel.installed import Installer, PersistenceResult
from dynamos.kernel.live import LiveKernel
from dynamos.kernel.livepatch import Blocker, Livepatch, PatchedFunction, Task
from dynamos.kernel.modules import normalize_name
from dynamos.kernel.refusals import REFUSALS, PreflightRefused, Refusal
from dynamos.kernel.results import (
    ApplyResult,
    FunctionStatus,
    KernelStatus,
    RecoverResult,
    RevertResult,
    UpdateStatus,
)
from dynamos.kernel.symbols import Kallsyms, TraceableFunctions
from dynamos.kernel.syscalls import LibcSyscalls, Syscalls
from dynamos.kernel.transition import BlockedTransition, Progress
from dynamos.kernel.trust import TrustPolicy
from dynamos.update.package import UpdatePackage

__all__ = [
    "REFUSALS",
    "ActionLog",
    "ApplyResult",
    "BlockedTransition",
    "Blocker",
    "FunctionStatus",
    "Installer",
    "Kallsyms",
    "KernelStatus",
    "LibcSyscalls",
    "LiveKernel",
    "Livepatch",
    "PatchedFunction",
    "PersistenceResult",
    "PreflightRefused",
    "Progress",
    "RecoverResult",
    "Refusal",
    "RevertResult",
    "Syscalls",
    "Task",
    "TraceableFunctions",
    "UpdateStatus",
    "apply",
    "default_log_path",
    "gc",
    "install",
    "load_all",
    "normalize_name",
    "preflight",
    "recover",
    "revert",
    "status",
    "uninstall",
]


def preflight(pkg: UpdatePackage) -> list[str]:
    """Check an update package against the running kernel; notes, or PreflightRefused."""
    return LiveKernel().preflight(pkg)


def apply(
    package_path: Path | str, timeout: float = 30.0, progress: Callable[[Progress], None] | None = None,
    force: bool = False, wait: float | None = None, trust: TrustPolicy | None = None,
) -> ApplyResult:
    """Apply an update package to the running kernel (``force``: see LiveKernel.apply; ``wait``:
    seconds to wait for another dynamos' operation lock, else refused at once; ``trust``: which
    signers are accepted, default the trust store)."""
    return LiveKernel(lock_wait=wait, trust=trust).apply(package_path, timeout=timeout, progress=progress, force=force)


def revert(
    name: str, timeout: float = 30.0, progress: Callable[[Progress], None] | None = None,
    wait: float | None = None,
) -> RevertResult:
    """Revert an update (by update or livepatch name) and unload its module."""
    return LiveKernel(lock_wait=wait).revert(name, timeout=timeout, progress=progress)


def recover(timeout: float = 30.0, wait: float | None = None) -> RecoverResult:
    """Finish or undo the operations the action log shows were interrupted."""
    return LiveKernel(lock_wait=wait).recover(timeout)


def status(name: str | None = None) -> KernelStatus:
    """The running kernel's livepatches."""
    return LiveKernel().status(name)



def install(package_path: Path | str, apply: bool = True, timeout: float = 30.0,
            progress: Callable[[Progress], None] | None = None, wait: float | None = None,
            trust: TrustPolicy | None = None) -> PersistenceResult:
    """Verify a package, keep it under /var/lib/dynamos/<release>/ for every boot, apply it now
    (when it is for the running kernel and ``apply``)."""
    return Installer(LiveKernel(lock_wait=wait, trust=trust)).install(package_path, apply=apply, timeout=timeout,
                                                                      progress=progress)


def uninstall(name: str, release: str | None = None, timeout: float = 30.0,
              progress: Callable[[Progress], None] | None = None, wait: float | None = None) -> PersistenceResult:
    """Revert an installed update if it is live and remove it from the store."""
    return Installer(LiveKernel(lock_wait=wait)).uninstall(name, release=release, timeout=timeout, progress=progress)


def load_all(timeout: float = 30.0, progress: Callable[[Progress], None] | None = None,
             wait: float | None = None, trust: TrustPolicy | None = None) -> PersistenceResult:
    """What boot runs: every update installed for the running kernel, in install order."""
    return Installer(LiveKernel(lock_wait=wait, trust=trust)).load_all(timeout=timeout, progress=progress)


def gc(wait: float | None = None) -> PersistenceResult:
    """Remove installed packages of kernel releases no longer installed."""
    return Installer(LiveKernel(lock_wait=wait)).gc()
