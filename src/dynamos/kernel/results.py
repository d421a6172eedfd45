"""What the kernel layer's operations return: apply and revert results, and the kernel's status.

Each has ``describe()`` or a stable ``to_json()``, so the CLI only chooses between them and the
JSON a script reads does not depend on how the operations are written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dynamos.abi import VMLINUX
from dynamos.kernel import livepatch as lp


@dataclass
class ApplyResult:
    name: str  # update name
    livepatch_name: str
    package: str
    kernel: str
    replace: bool
    functions: list[dict[str, Any]]
    replaced: list[str] = field(default_factory=list)  # livepatches this one replaced and unloaded
    notes: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase
    seconds: float = 0.0

    def describe(self) -> str:
        funcs = ", ".join(f["name"] + ("" if f["object"] == VMLINUX else f" [{f['object']}]")
                          for f in self.functions)
        lines = [f"applied {self.name} (livepatch {self.livepatch_name}) to {self.kernel} "
                 f"in {self.seconds:.2f} s: {funcs}"]
        if self.replaced:
            lines.append(f"  replaced and unloaded: {', '.join(self.replaced)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "livepatch_name": self.livepatch_name,
            "package": self.package,
            "kernel": self.kernel,
            "replace": self.replace,
            "functions": self.functions,
            "replaced": self.replaced,
            "notes": self.notes,
            "phases": self.phases,
            "seconds": self.seconds,
        }


@dataclass
class RecoverResult:
    """What ``recover`` found in the journal and did: one item per interrupted operation.

    outcome: "completed" (the operation's effect stands and is recorded), "reverted" (the
    update was taken out), "not applied" (killed before loading: nothing to undo), "left
    applied" (a revert that had not taken effect), "closed" (switch/retire: nothing to undo),
    or a transition outcome when the kernel did not let it finish ("in transition", ...).
    """

    items: list[dict[str, Any]] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [f"{i['action']} of {i['name']} (pid {i.get('pid')}, {i.get('time')}): {i['outcome']}: {i['detail']}"
                for i in self.items]

    def describe(self) -> str:
        if not self.items:
            return "nothing to recover: every operation in the action log has a result"
        return "\n".join(self.lines())

    def to_json(self) -> dict[str, Any]:
        return {"recovered": self.items}


@dataclass
class RevertResult:
    name: str  # livepatch name
    update: str | None  # dynamos update name, when dynamos applied it
    notes: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def describe(self) -> str:
        what = self.name if self.update is None else f"{self.update} (livepatch {self.name})"
        lines = [f"reverted {what} in {self.seconds:.2f} s"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "update": self.update,
            "notes": self.notes,
            "phases": self.phases,
            "seconds": self.seconds,
        }


@dataclass
class FunctionStatus:
    name: str
    object: str
    sympos: int | None
    patched: bool

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "object": self.object}
        if self.sympos is not None:
            data["sympos"] = self.sympos
        data["patched"] = self.patched
        return data


@dataclass
class UpdateStatus:
    """One livepatch on the kernel (dynamos' or not)."""

    name: str  # livepatch (and module) name
    enabled: bool
    transition: bool
    dynamos: bool  # applied by dynamos (recorded in the state dir)
    module_loaded: bool
    objects: dict[str, bool] = field(default_factory=dict)
    functions: list[FunctionStatus] = field(default_factory=list)
    tasks_pending: list[lp.Task] = field(default_factory=list)
    replace: bool | None = None
    update: str | None = None  # dynamos update name
    package: str | None = None
    applied: str | None = None  # ISO time dynamos applied it
    signer: dict[str, str] | None = None  # who signed its package: name, fingerprint ("" if unsigned)
    description: str | None = None
    version: str | None = None  # the update's own version ([update] version)
    cves: list[str] = field(default_factory=list)  # what it fixes ([update] cves)
    debian: dict[str, Any] | None = None  # build --to: Debian versions from/to, files not carried
    module_sha256: str | None = None
    editions: list[dict[str, Any]] = field(default_factory=list)  # multi-edition functions' controls
    global_switch: str | None = None  # global consistency: "new" (its editions serve) or "old" (edition 0)

    @property
    def serving(self) -> bool:
        """Whether the update's code is what runs: enabled, transition over, not held on edition 0."""
        return self.enabled and not self.transition and self.warning is None

    @property
    def warning(self) -> str | None:
        """What the enabled/transition flags alone would hide: a global update serving edition 0."""
        if self.global_switch == "old" and self.enabled and not self.transition:
            return "loaded and enabled, but every function serves edition 0 (the original code): the fix is not running"
        return None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "enabled": self.enabled,
            "transition": self.transition,
            "dynamos": self.dynamos,
            "module_loaded": self.module_loaded,
        }
        if self.replace is not None:
            data["replace"] = self.replace
        data["objects"] = [{"name": o, "patched": p} for o, p in self.objects.items()]
        data["functions"] = [f.to_json() for f in self.functions]
        data["tasks_pending"] = [t.to_json() for t in self.tasks_pending]
        for key, value in (("update", self.update), ("package", self.package), ("applied", self.applied),
                           ("signer", self.signer), ("description", self.description), ("version", self.version),
                           ("module_sha256", self.module_sha256)):
            if value is not None:
                data[key] = value
        if self.cves:
            data["cves"] = self.cves
        if self.debian:
            data["debian"] = self.debian
        if self.editions:
            data["editions"] = self.editions
        if self.global_switch is not None:
            data["global_switch"] = self.global_switch
        if self.warning:
            data["warning"] = self.warning
        return data


@dataclass
class KernelStatus:
    """Status of the kernel's livepatches.

    ``to_json()`` shape (stable; keys marked ? appear only when known)::

        {"kernel": "6.1.0-56-amd64", "livepatch": true,
         "updates": [{"name": "fix_x", "enabled": true, "transition": false, "dynamos": true,
                      "module_loaded": true, "replace"?: false,
                      "objects": [{"name": "vmlinux", "patched": true}],
                      "functions": [{"name": "f", "object": "vmlinux", "sympos"?: 2, "patched": true}],
                      "tasks_pending": [{"pid": 1, "comm": "init", "tid"?: 2}],
                      "update"?: "fix-x", "package"?: "/path/fix-x_6.1.0-56-amd64.dynpkg", "applied"?: "ISO time",
                      "signer"?: {"name": "Example Fixes", "fingerprint": "D745..."},
                      "editions"?: [{"function": "pipe_write", "route": ["default 1"],
                                     "editions": [{"index": 0, "name": "pipe_write", "calls": 7,
                                                   "in_flight": 0, "live": true}],
                                     "latency"?: [{"edition": 0, "calls": 7, "total_ns": 900, ...}]}]}]}

    ``sympos`` appears when the update named one or sysfs shows a position other than 1.
    An entry with ``enabled`` false and ``module_loaded`` true is a disabled or replaced
    livepatch whose module is still loaded (``dynamos revert`` unloads it).
    """

    kernel: str
    livepatch: bool
    updates: list[UpdateStatus] = field(default_factory=list)
    # Operations with an intent and no result in the journal: {"action", "update", "pid", "time",
    # "in_progress" (its process still holds the lock), "kernel" (what the kernel shows now)}.
    interrupted: list[dict[str, Any]] = field(default_factory=list)

    @property
    def effective_kernel(self) -> str:
        """The release plus the dynamos updates whose code runs, each with its version
        ("6.1.0-56-amd64+fix-x=1.2+cmdline-banner"): what the kernel effectively is, in one word."""
        parts = [self.kernel]
        for u in self.updates:
            if u.dynamos and u.serving:
                parts.append(f"{u.update or u.name}={u.version}" if u.version else (u.update or u.name))
        return "+".join(parts)

    @property
    def effective_version(self) -> str | None:
        """The Debian version the running code corresponds to, when a ``build --to`` update serves
        ("6.1.192-2, live-updated to 6.1.192-3; 1 file not carried: fs/x.c"); None otherwise."""
        debian = [u.debian for u in self.updates if u.dynamos and u.serving and u.debian]
        if not debian:
            return None
        last = debian[-1]  # replace = true: the last one applied is the one that serves
        text = f"{last.get('from')}, live-updated to {last.get('to')}"
        missing = list(last.get("not_carried") or [])
        if missing:
            text += f"; {len(missing)} file{'s' if len(missing) != 1 else ''} not carried: {', '.join(missing)}"
        return text

    @property
    def fixes(self) -> list[str]:
        """CVEs the running code carries: those of the dynamos updates that serve calls."""
        return sorted({c for u in self.updates if u.dynamos and u.serving for c in u.cves})

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "kernel": self.kernel,
            "effective_kernel": self.effective_kernel,
            **({"effective_version": self.effective_version} if self.effective_version else {}),
            "cves": self.fixes,
            "livepatch": self.livepatch,
            "updates": [u.to_json() for u in self.updates],
        }
        if self.interrupted:
            data["interrupted"] = self.interrupted
        return data
