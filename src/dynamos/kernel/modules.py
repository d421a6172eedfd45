"""Kernel modules: what is loaded, loading and unloading, and why the kernel said no.

``init_module(2)`` and ``delete_module(2)`` answer with a bare errno; the kernel prints the
real reason to its log. This module turns both into one message a user can act on.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from dynamos.kernel.syscalls import Syscalls
from dynamos.update.names import checked_name

# Taint flag the kernel sets on a livepatch module (TAINT_LIVEPATCH).
LIVEPATCH_TAINT = "K"


@dataclass(frozen=True)
class LoadedModule:
    """One line of ``/proc/modules``."""

    name: str
    size: int
    refcount: int
    state: str  # Live, Loading, Unloading
    taints: str  # e.g. "OEK"

    @property
    def is_livepatch(self) -> bool:
        return LIVEPATCH_TAINT in self.taints


def normalize_name(update: str, origin: str = "the caller") -> str:
    """Module (and livepatch) name of an update: the kernel turns '-' into '_' in module names.

    The name becomes a sysfs and /run path component, so it is checked here, where every
    kernel-layer entry point passes it: a refusal names it and ``origin``.
    """
    return checked_name(update, "update name", origin).replace("-", "_")


def loaded_modules(root: Path) -> dict[str, LoadedModule]:
    """Parse ``/proc/modules`` (``name size refs deps state addr [(taints)]``); empty if absent."""
    try:
        text = (root / "proc/modules").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    modules = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5:
            continue
        taints = parts[6].strip("()") if len(parts) > 6 and parts[6].startswith("(") else ""
        try:
            size, refs = int(parts[1]), int(parts[2])
        except ValueError:
            size, refs = 0, 0
        modules[parts[0]] = LoadedModule(parts[0], size, refs, parts[4], taints)
    return modules


def read_kmsg(root: Path) -> list[tuple[int, str]]:
    """Kernel log records ``(sequence number, message)`` from ``/dev/kmsg``, never blocking."""
    try:
        fd = os.open(root / "dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return []
    records: list[tuple[int, str]] = []
    try:
        while True:
            try:
                # /dev/kmsg returns one record per read; a plain file (tests) returns chunks.
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EPIPE:  # record overwritten while reading: keep going
                    continue
                break
            if not chunk:
                break
            for record in chunk.decode(errors="replace").splitlines():
                if record.startswith(" ") or ";" not in record:
                    continue  # key=value continuation lines
                prefix, message = record.split(";", 1)
                fields = prefix.split(",")
                try:
                    seq = int(fields[1])
                except (IndexError, ValueError):
                    seq = -1
                records.append((seq, message.strip()))
    finally:
        os.close(fd)
    return records


def last_kmsg_seq(root: Path) -> int:
    """Sequence number of the newest kernel log record (-1 if none): a bookmark before acting."""
    records = read_kmsg(root)
    return records[-1][0] if records else -1


def kernel_messages(root: Path, name: str, since: int = -1, limit: int = 8) -> list[str]:
    """The last ``limit`` kernel log messages after ``since`` about module ``name`` (dynamos'
    runtime prefixes its own with the update module's name, saying why a callback failed) or
    livepatch.

    The kernel logs why it refused a module (unknown symbol, bad vermagic, ambiguous livepatch
    symbol; livepatch's own messages do not name the module); quoting those lines saves the
    user a trip to dmesg.
    """
    found = [msg for seq, msg in read_kmsg(root)
             if seq > since and (name in msg or msg.startswith("livepatch:"))]
    return found[-limit:]


def lockdown_mode(root: Path) -> str | None:
    """Active kernel lockdown mode ("none", "integrity", "confidentiality"), None if unknown."""
    try:
        text = (root / "sys/kernel/security/lockdown").read_text()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def _flag(root: Path, rel: str) -> bool:
    try:
        return (root / rel).read_text().strip() in ("1", "Y", "y")
    except OSError:
        return False


def explain_load_error(err: OSError, name: str, root: Path, since: int = -1) -> str:
    """A user-facing reason for a failed ``init_module`` of module ``name``."""
    code = err.errno or 0
    if code == errno.EEXIST:
        reason = f"a module named {name} is already loaded"
    elif code == errno.ENOEXEC:
        reason = "invalid module format (vermagic/ELF mismatch: was it built for this kernel?)"
    elif code == errno.EKEYREJECTED:
        reason = "signature required: the kernel rejects unsigned or badly signed modules (module.sig_enforce)"
    elif code == errno.EPERM:
        lockdown = lockdown_mode(root)
        if lockdown not in (None, "none"):
            reason = f"signature required: kernel lockdown ({lockdown}) only loads signed modules"
        elif _flag(root, "proc/sys/kernel/modules_disabled"):
            reason = "module loading is disabled (kernel.modules_disabled=1)"
        else:
            reason = "operation not permitted (loading modules needs root with CAP_SYS_MODULE)"
    elif code == errno.ENOENT:
        reason = "unknown symbol: the module needs a symbol this kernel does not have (see dmesg)"
    elif code == errno.EBUSY:
        reason = ("kernel busy: another livepatch is in transition, or another ftrace user "
                  "(kretprobe, other patching tool) holds one of the functions (see dmesg)")
    elif code == errno.EINVAL:
        reason = ("invalid argument: livepatch rejected the update (missing or ambiguous symbol, "
                  "incompatible with loaded livepatches...; see dmesg)")
    elif code == errno.ENODEV:
        reason = "livepatch is not initialised in this kernel"
    elif code == errno.ENOSYS:
        reason = "this kernel does not support loading modules (CONFIG_MODULES not set)"
    else:
        reason = os.strerror(code) if code else str(err)
    return _with_dmesg(reason, name, root, since)


def explain_unload_error(err: OSError, name: str, root: Path, since: int = -1) -> str:
    """A user-facing reason for a failed ``delete_module`` of module ``name``."""
    code = err.errno or 0
    if code == errno.ENOENT:
        reason = f"no module named {name} is loaded"
    elif code in (errno.EAGAIN, errno.EBUSY):
        reason = f"module {name} is still in use (livepatch has not released it yet, or it was forced)"
    elif code == errno.EPERM:
        reason = "operation not permitted (needs root with CAP_SYS_MODULE; kernel.modules_disabled?)"
    else:
        reason = os.strerror(code) if code else str(err)
    return _with_dmesg(reason, name, root, since)


def _with_dmesg(reason: str, name: str, root: Path, since: int) -> str:
    lines = kernel_messages(root, name, since)
    if not lines:
        return reason
    return reason + "\n  kernel log:\n" + "\n".join(f"    {line}" for line in lines)


def unload_module(syscalls: Syscalls, name: str, timeout: float, poll: float) -> None:
    """``delete_module`` that retries while the module is still referenced.

    Livepatch drops its reference to a disabled or replaced patch module from a workqueue, a
    moment after the transition ends; until then the kernel answers EAGAIN/EBUSY. Raises the
    last OSError once ``timeout`` seconds have passed.
    """
    deadline = syscalls.monotonic() + timeout
    while True:
        try:
            syscalls.delete_module(name, os.O_NONBLOCK)
            return
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EBUSY) or syscalls.monotonic() >= deadline:
                raise
        syscalls.sleep(poll)
