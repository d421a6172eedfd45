"""Operations on a live kernel: preflight, apply, revert, status.

Every path that touches the kernel ends in one of two states the user is told about: the update
is fully applied, or it is reverted and unloaded (or was refused before loading). When the
kernel does not let dynamos get there in time, the error says exactly what remains.

All paths derive from ``root`` and all system calls go through ``syscalls``, so the same code
runs against the live kernel (``root=/``) and against a simulated one in unit tests.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynamos.abi import generated_name
from dynamos.errors import DynamosError, PackageError, RefusedError, TransitionError
from dynamos.kernel import editions
from dynamos.kernel import livepatch as lp
from dynamos.kernel.actionlog import ActionLog, default_log_path, now_iso
from dynamos.kernel.modules import (
    explain_load_error,
    explain_unload_error,
    last_kmsg_seq,
    loaded_modules,
    lockdown_mode,
    normalize_name,
    unload_module,
)
from dynamos.kernel.state import UpdateRecords
from dynamos.kernel.symbols import (
    TEXT_TYPES,
    VMLINUX,
    Kallsyms,
    TraceableFunctions,
    Tracefs,
    find_tracefs,
    parse_enabled_functions,
)
from dynamos.kernel.syscalls import LibcSyscalls, Syscalls
from dynamos.update.package import read_package

# ---------------------------------------------------------------------------------------------
# Refusals: one row per reason, so messages stay uniform and callers can match on codes.

REFUSALS: dict[str, str] = {
    "not-root": "dynamos must run as root to change the kernel (effective uid is {euid})",
    "no-livepatch": "this kernel has no livepatch support: {path} is missing (CONFIG_LIVEPATCH)",
    "lockdown": "kernel lockdown is active ({mode}): the kernel loads only signed modules, "
                "and the update's module is unsigned",
    "sig-enforced": "the kernel enforces module signatures (module.sig_enforce=1), "
                    "and the update's module is unsigned",
    "release": "the package is for kernel {package}, but the running kernel is {running}",
    "vermagic": "the module's vermagic is for kernel {vermagic}, but the running kernel is {running}",
    "already-loaded": "a livepatch named {name} is already loaded "
                      "(revert it first, or build the new update with replace = true)",
    "module-loaded": "a module named {name} is already loaded",
    "busy": "livepatch {other} is in transition and only one transition runs at a time: "
            "retry when it ends",
    "no-kallsyms": "cannot read the kernel's symbols ({path}): {error}",
    "no-ftrace": "cannot tell which functions ftrace can redirect: {problem}",
    "unknown-function": "function {function} not found in {object}{hint}",
    "ambiguous": "function {function} is ambiguous in {object}: {count} symbols have that name{which}; "
                 "set sympos (1..{count}) for it in update.toml to choose one",
    "sympos-range": "sympos {sympos} of {function} is out of range: {object} has {count} symbol(s) "
                    "named {function}",
    "sympos-not-function": "sympos {sympos} of {function} in {object} designates a data symbol "
                           "(type {kind}), not a function{which}",
    "not-traceable": "function {function} in {object} is not traceable (absent from ftrace's "
                     "available_filter_functions: notrace, inlined or __init code), "
                     "so livepatch cannot redirect it",
    "klp-unknown-symbol": "symbol {symbol} used by the update is not in {object} "
                          "(it is resolved through kallsyms when the update loads)",
    "klp-ambiguous": "symbol {symbol} used by the update is ambiguous in {object}: {count} symbols have "
                     "that name; add [[symbol]] name = \"{symbol}\" with sympos (1..{count}) to update.toml",
    "klp-sympos-range": "symbol {symbol} has sympos {sympos}, but {object} has {count} symbol(s) of that name",
    "kthread-loop": "kernel thread {comm} (pid {pid}) runs {function} as its main function, a loop it never "
                    "leaves, so the transition would wait for it for ever; declare how to restart it "
                    "([[kthread]] function = \"{function}\" with stop and start hooks in update.toml)",
    "kthread-held": "kernel thread {comm} (pid {pid}) runs update {holder}'s copy of {function}, and this update "
                    "replaces {holder} without declaring a restart for {function}: the thread would keep running "
                    "the replaced update's code and pin its module; declare [[kthread]] function = "
                    "\"{function}\" or revert {holder} first",
    "ipmodify": "function {function} in {object} is already redirected by an ftrace user that is not "
                "a livepatch (kretprobe or another patching tool); loading would fail with EBUSY",
}


@dataclass(frozen=True)
class Refusal:
    """One reason preflight refuses an update."""

    code: str
    message: str

    @classmethod
    def make(cls, code: str, **fields: Any) -> Refusal:
        return cls(code, REFUSALS[code].format(**fields))


class PreflightRefused(RefusedError):
    """Preflight found reasons not to load the update; ``reasons`` lists them all."""

    def __init__(self, update: str, reasons: list[Refusal]):
        self.reasons = reasons
        if len(reasons) == 1:
            text = f"{update}: refused, nothing was changed: {reasons[0].message}"
        else:
            text = f"{update}: refused, nothing was changed:\n" + "\n".join(
                f"  - {r.message}" for r in reasons
            )
        super().__init__(text)


class BlockedTransition(TransitionError):
    """A transition did not finish in time; ``outcome`` says where the kernel was left.

    outcome: "reverted and unloaded", "reverted" (module still loaded), "restored"
    (a revert was undone: the update stays applied), or "in transition" (the kernel still moves
    tasks; nothing more dynamos could do in time).
    """

    def __init__(self, message: str, *, name: str, outcome: str, blockers: list[lp.Blocker]):
        self.name = name
        self.outcome = outcome
        self.blockers = blockers
        super().__init__(message)


# ---------------------------------------------------------------------------------------------
# Results


PHASES = ("verify", "preflight", "load", "transition", "switch", "unload")
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
    editions: list[dict[str, Any]] = field(default_factory=list)  # multi-edition functions' controls

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
        for key in ("update", "package", "applied"):
            value = getattr(self, key)
            if value is not None:
                data[key] = value
        if self.editions:
            data["editions"] = self.editions
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

    def to_json(self) -> dict[str, Any]:
        return {
            "kernel": self.kernel,
            "livepatch": self.livepatch,
            "updates": [u.to_json() for u in self.updates],
        }


# ---------------------------------------------------------------------------------------------


def _function_fields(f: Any) -> tuple[str, str, int | None]:
    """(name, object, sympos) of a package function entry (a dict, or an object with attributes)."""
    get = f.get if isinstance(f, Mapping) else lambda k, d=None: getattr(f, k, d)
    sympos = get("sympos")
    return str(get("name")), str(get("object") or VMLINUX), int(sympos) if sympos else None


def _function_json(f: Any) -> dict[str, Any]:
    name, obj, sympos = _function_fields(f)
    data: dict[str, Any] = {"name": name, "object": obj}
    if isinstance(f, Mapping) and f.get("edition"):
        data["edition"] = f["edition"]
    if sympos is not None:
        data["sympos"] = sympos
    return data


def _interrupted(phase: str, e: BaseException) -> str:
    if isinstance(e, KeyboardInterrupt):
        return f"interrupted during the {phase}"
    return f"error during the {phase} ({type(e).__name__}: {e})"


def _default_reader(path: Path) -> Any:

    return read_package(path)


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
        read_package: Callable[[Path], Any] | None = None,
    ):
        self.root = Path(root)
        self.sys: Syscalls = syscalls if syscalls is not None else LibcSyscalls()
        self.poll_interval = poll_interval
        self.unload_timeout = unload_timeout
        self.log = ActionLog(log_path if log_path is not None else default_log_path(self.root))
        self.records = UpdateRecords(self.root)
        self._read_package = read_package or _default_reader
        self.signalled: list[float] = []  # when the last transition waited for signalled its blockers

    # -- checks -----------------------------------------------------------------------------

    def _sig_enforced(self) -> bool:
        try:
            value = (self.root / "sys/module/module/parameters/sig_enforce").read_text().strip()
        except OSError:
            return False
        return value in ("Y", "1")

    def _tracefs(self, may_mount: bool) -> Tracefs:
        t0 = self.sys.monotonic()
        found = find_tracefs(self.root, self.sys.mount if may_mount else None)
        if found.mounted is not None:
            self.log.record(
                "mount-tracefs", "tracefs", "ok" if found.path else "failed",
                self.sys.monotonic() - t0, {"note": found.note, "problem": found.problem},
            )
        return found

    def predicted_blockers(self, pkg: Any) -> tuple[list[tuple[lp.Blocker, list[str]]], list[str]]:
        """Tasks that now have a function the update replaces on their stack, and a note on them.

        Kernel threads whose main function is replaced never leave it: the update restarts those
        it declares ([[kthread]]), and is refused (PreflightRefused) for any other.
        """
        names = {_function_fields(f)[0] for f in pkg.functions}
        restarted = {_function_fields(f)[0] for f in pkg.functions if isinstance(f, Mapping) and f.get("kthread")}
        stacks = lp.task_stacks(self.root)  # read once: for blockers, and for threads on other updates' code
        found = lp.tasks_in_functions(self.root, names, stacks)
        notes: list[str] = []
        loops: list[tuple[lp.Blocker, str]] = []
        waiting = []
        for blocker, hits in found:
            main = blocker.thread_function
            if main in names:
                loops.append((blocker, main))
            else:
                waiting.append((blocker, hits))
        refusals = [Refusal.make("kthread-loop", comm=b.comm, pid=b.pid, function=main)
                    for b, main in loops if main not in restarted]
        copies = {generated_name(*_function_fields(f), role="kthread"): _function_fields(f)[0]
                  for f in pkg.functions if isinstance(f, Mapping) and f.get("kthread")}
        live = {patch.name: patch for patch in lp.read_livepatches(self.root) if patch.name != pkg.livepatch_name}
        for b, copy, holder in lp.threads_on_update_code(stacks):
            if holder not in live:
                continue
            if copy in copies:
                notes.append(f"kernel thread {b.comm} (pid {b.pid}) runs update {holder}'s copy of {copies[copy]}: "
                             f"it will be restarted onto this update's, and {holder} will let go of it")
            elif getattr(pkg, "replace", False):
                function = next((f.name for f in live[holder].functions if copy in (
                    generated_name(f.name, f.object, None, role="kthread"),
                    generated_name(f.name, f.object, f.sympos, role="kthread"))), copy)
                refusals.append(Refusal.make("kthread-held", comm=b.comm, pid=b.pid, holder=holder,
                                             function=function))
        if refusals:
            raise PreflightRefused(pkg.name, refusals)
        if loops:
            who = "; ".join(f"{b.comm} (pid {b.pid}) in {main}" for b, main in loops)
            notes.append(f"{len(loops)} kernel thread(s) run a replaced function as their main loop and will be "
                         f"restarted onto the new edition by the update's hooks: {who}")
        if waiting:
            who = "; ".join(f"{b.comm} (pid {b.pid}) in {', '.join(hits)}" for b, hits in waiting[:5])
            more = f" and {len(waiting) - 5} more" if len(waiting) > 5 else ""
            notes.append(f"{len(waiting)} task(s) have a function of the update on their stack now and will hold "
                         f"up the transition until they leave it: {who}{more}")
        return found, notes

    def check(self, package_path: Path | str) -> dict[str, Any]:
        """What ``apply`` would do, without loading anything: verification, preflight, blockers."""
        pkg = self._read_package(Path(package_path))
        notes = self.preflight(pkg)
        found, _ = self.predicted_blockers(pkg)
        return {"update": pkg.name, "livepatch_name": pkg.livepatch_name, "kernel": pkg.kernel_release,
                "consistency": getattr(pkg, "consistency", "per-task"), "notes": notes,
                "predicted_blockers": [{**b.to_json(), "functions": hits} for b, hits in found]}

    def transition_blockers(self, name: str | None = None) -> dict[str, list[lp.Blocker]]:
        """Tasks not yet switched, per livepatch in transition (or just ``name``)."""
        out = {}
        for patch in lp.read_livepatches(self.root):
            if patch.transition and (name is None or patch.name == normalize_name(name)):
                out[patch.name] = lp.blockers(self.root, patch.target_state)
        return out

    def preflight(self, pkg: Any) -> list[str]:
        """Check that ``pkg`` can be applied to this kernel without changing anything.

        Returns notes worth telling the user; raises PreflightRefused listing every reason the
        update cannot be loaded (all of them at once, so one round of fixes suffices).
        """
        notes: list[str] = []
        reasons: list[Refusal] = []
        name = pkg.livepatch_name
        euid = self.sys.geteuid()
        if euid != 0:
            reasons.append(Refusal.make("not-root", euid=euid))
        lp_root = lp.livepatch_root(self.root)
        if not lp_root.is_dir():
            reasons.append(Refusal.make("no-livepatch", path=lp_root))
        mode = lockdown_mode(self.root)
        if mode not in (None, "none"):
            reasons.append(Refusal.make("lockdown", mode=mode))
        elif self._sig_enforced():
            reasons.append(Refusal.make("sig-enforced"))
        running = self.sys.release()
        if pkg.kernel_release != running:
            reasons.append(Refusal.make("release", package=pkg.kernel_release, running=running))
        else:
            vermagic = (getattr(pkg, "vermagic", "") or "").split()
            if vermagic and vermagic[0] != running:
                reasons.append(Refusal.make("vermagic", vermagic=vermagic[0], running=running))

        patches = lp.read_livepatches(self.root)
        modules = loaded_modules(self.root)
        if (lp_root / name).exists():
            reasons.append(Refusal.make("already-loaded", name=name))
        elif name in modules:
            reasons.append(Refusal.make("module-loaded", name=name))
        for other in patches:
            if other.transition and other.name != name:
                reasons.append(Refusal.make("busy", other=other.name))

        reasons += self._check_functions(pkg, patches, modules, notes, may_mount=euid == 0)
        if reasons:
            raise PreflightRefused(pkg.name, reasons)
        return notes

    def _check_functions(
        self,
        pkg: Any,
        patches: list[lp.Livepatch],
        modules: Mapping[str, Any],
        notes: list[str],
        may_mount: bool,
    ) -> list[Refusal]:
        reasons: list[Refusal] = []
        klp_symbols = list(getattr(pkg, "klp_symbols", []))
        wanted = {f["name"] for f in pkg.functions} | {s["name"] for s in klp_symbols}
        try:
            kallsyms = Kallsyms.read(self.root, wanted)
        except OSError as e:
            return [Refusal.make("no-kallsyms", path=self.root / "proc/kallsyms", error=e.strerror or e)]
        tracefs = self._tracefs(may_mount)
        if tracefs.note:
            notes.append(tracefs.note)
        if tracefs.path is None:
            reasons.append(Refusal.make("no-ftrace", problem=tracefs.problem))
        traceable = TraceableFunctions.parse(tracefs.read_lines("available_filter_functions", wanted))
        hooked = {
            (u.name, u.object)
            for u in parse_enabled_functions(tracefs.read_lines("enabled_functions"))
            if u.ipmodify
        }
        livepatched: dict[tuple[str, str], list[str]] = {}
        for p in patches:
            for f in p.functions:
                livepatched.setdefault((f.name, f.object), []).append(p.name)

        for entry in pkg.functions:
            fname, obj, sympos = _function_fields(entry)
            ident = {"function": fname, "object": obj}
            if obj != VMLINUX and obj not in modules and not kallsyms.has_object(obj):
                notes.append(f"module {obj} is not loaded: {fname} will be patched when it loads")
                continue
            total = kallsyms.count_all(fname, obj)
            text = kallsyms.count(fname, obj)
            kinds = kallsyms.entries.get((obj, fname), [])
            positions = [i + 1 for i, k in enumerate(kinds) if k in TEXT_TYPES]
            which = f" (functions at {', '.join(map(str, positions))})" if 0 < text < total else ""
            if text == 0:
                if total:
                    hint = " (only a data symbol has that name)"
                else:
                    variants = kallsyms.variants(fname, obj)
                    hint = (f" (the compiler renamed it: {', '.join(variants[:4])};"
                            " patch the caller or that symbol)") if variants else ""
                reasons.append(Refusal.make("unknown-function", hint=hint, **ident))
                continue
            if sympos is None and total > 1:
                reasons.append(Refusal.make("ambiguous", count=total, which=which, **ident))
                continue
            if sympos is not None:
                kind = kallsyms.kind_at(fname, obj, sympos)
                if kind is None:
                    reasons.append(Refusal.make("sympos-range", sympos=sympos, count=total, **ident))
                    continue
                if kind not in TEXT_TYPES:
                    reasons.append(Refusal.make("sympos-not-function", sympos=sympos, kind=kind,
                                                which=which, **ident))
                    continue
            if tracefs.path is not None and (fname, obj) not in traceable:
                reasons.append(Refusal.make("not-traceable", **ident))
                continue
            owners = livepatched.get((fname, obj))
            if owners:
                notes.append(f"{fname} ({obj}) is already patched by {', '.join(owners)}; "
                             f"this update takes over while it is loaded")
            elif (fname, obj) in hooked:
                reasons.append(Refusal.make("ipmodify", **ident))
        reasons += self._check_klp_symbols(klp_symbols, kallsyms, modules, notes)
        return reasons

    def _check_klp_symbols(self, symbols: list[dict[str, Any]], kallsyms: Kallsyms,
                           modules: Mapping[str, Any], notes: list[str]) -> list[Refusal]:
        """Livepatch resolves these by name and position when the update loads; a missing or
        ambiguous one would fail the load with a bare EINVAL, so say it now."""
        reasons = []
        for sym in symbols:
            name, obj, sympos = sym["name"], sym.get("object", VMLINUX), sym.get("sympos") or 0
            ident = {"symbol": name, "object": obj}
            if obj != VMLINUX and obj not in modules and not kallsyms.has_object(obj):
                notes.append(f"module {obj} is not loaded: symbol {name} will be resolved when it loads")
                continue
            count = kallsyms.count_all(name, obj)
            if count == 0:
                reasons.append(Refusal.make("klp-unknown-symbol", **ident))
            elif sympos == 0 and count > 1:
                reasons.append(Refusal.make("klp-ambiguous", count=count, **ident))
            elif sympos > count:
                reasons.append(Refusal.make("klp-sympos-range", sympos=sympos, count=count, **ident))
        return reasons

    # -- transitions ------------------------------------------------------------------------

    def _wait_transition(
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
                if self._signal_blockers(name):
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

    def _signal_blockers(self, name: str) -> bool:
        """Have update ``name``'s module signal the tasks still to switch (livepatch's fake
        signal); False when it cannot (a module built before dynamos had this)."""
        path = self.root / "sys/module" / name / "parameters/signal_blockers"
        if not path.exists():
            return False
        try:
            self.sys.write_attribute(os.fspath(path), b"1")
        except OSError:
            return False
        return True

    def _signal_notes(self) -> list[str]:
        if not self.signalled:
            return []
        return [f"signalled the tasks still to switch at {', '.join(f'{s:g}' for s in self.signalled)} s "
                "into the transition"]

    def _wait_gone(self, name: str, timeout: float) -> bool:
        """Wait for a disabled/replaced patch's sysfs directory to be freed (done asynchronously)."""
        deadline = self.sys.monotonic() + timeout
        while (lp.livepatch_root(self.root) / name).exists():
            if self.sys.monotonic() >= deadline:
                return False
            self.sys.sleep(self.poll_interval)
        return True

    @staticmethod
    def _describe_blockers(blockers: list[lp.Blocker]) -> str:
        if not blockers:
            return "no blocking task could be identified (tasks may have exited meanwhile)"
        return "blocking tasks:\n" + "\n".join(f"  {b.describe()}" for b in blockers)

    def _unload(self, name: str) -> str | None:
        """delete_module with retries; the reason it failed, or None."""
        since = last_kmsg_seq(self.root)
        try:
            unload_module(self.sys, name, self.unload_timeout, self.poll_interval)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None  # already gone: the goal is reached
            return explain_unload_error(e, name, self.root, since)
        return None

    def _undo_load(self, name: str, revert_timeout: float, cause: str,
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
                reverse_done = self._wait_transition(name, revert_timeout, "revert", progress)
            else:
                return BlockedTransition(
                    f"{name}: {cause}, and reversing it failed ({lp.explain_enabled_error(e, name, False)}): "
                    f"livepatch {name} remains loaded and in transition to patched; "
                    f"{self._describe_blockers(blockers)}",
                    name=name, outcome="in transition", blockers=blockers,
                )
        else:
            reverse_done = self._wait_transition(name, revert_timeout, "revert", progress)
        if not reverse_done:
            back = lp.blockers(self.root, 0)
            return BlockedTransition(
                f"{name}: {cause}; its reversal did not finish within {revert_timeout:g}s either: "
                f"livepatch {name} remains loaded, moving tasks back to the original code "
                f"(enabled=0, transition=1). The kernel keeps trying; once "
                f"/sys/kernel/livepatch/{name}/transition reads 0, run `dynamos revert {name}` "
                f"to unload it.\n{self._describe_blockers(back)}",
                name=name, outcome="in transition", blockers=back,
            )
        self._wait_gone(name, self.unload_timeout)
        failure = self._unload(name)
        if failure is not None:
            return BlockedTransition(
                f"{name}: {cause}; reverted (every task runs the original code), but its module "
                f"could not be unloaded: {failure}. Run `dynamos revert {name}` to retry.\n"
                f"{self._describe_blockers(blockers)}",
                name=name, outcome="reverted", blockers=blockers,
            )
        return BlockedTransition(
            f"{name}: {cause}; reverted and unloaded.\n{self._describe_blockers(blockers)}",
            name=name, outcome="reverted and unloaded", blockers=blockers,
        )

    def _log_failure(self, action: str, name: str, start: float, details: dict[str, Any],
                     error: BaseException) -> None:
        """Log a failed operation; the result says where the kernel was left."""
        if isinstance(error, (RefusedError, PackageError)):
            result = "refused"  # nothing was changed
        elif isinstance(error, DynamosError):
            result = getattr(error, "outcome", "failed")
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

        pkg: Any = None
        loading = False
        euid = self.sys.geteuid()
        if euid != 0:  # before reading the package: an unprivileged user may not even read it
            raise PreflightRefused(label, [Refusal.make("not-root", euid=euid)])
        try:
            t = self.sys.monotonic()
            pkg = self._read_package(Path(package_path))
            t = timed("verify", t)
            label = pkg.livepatch_name
            details["update"] = pkg.name
            notes = self.preflight(pkg)
            notes += self.predicted_blockers(pkg)[1]
            t = timed("preflight", t)
            before = set(lp.livepatch_names(self.root))
            functions = [_function_json(f) for f in pkg.functions]
            # Recorded before loading, so an update whose apply was killed midway is still
            # recognisable as dynamos' in status.
            self._record(pkg, package_path, functions, notes)
            loading = True
            self._load(pkg)
            t = timed("load", t)
            self._complete_transition(pkg.livepatch_name, timeout, revert_timeout, progress,
                                      force_notes=notes if force else None)
            notes += self._signal_notes()
            t = timed("transition", t)
            if getattr(pkg, "consistency", "per-task") == "global":
                self._switch_globally(pkg.livepatch_name, True, timeout, revert_timeout, progress, notes)
                t = timed("switch", t)
            replaced: list[str] = []
            if pkg.replace:
                replaced = self._unload_replaced(sorted(before - {pkg.livepatch_name}), notes)
            timed("unload", t)
        except BaseException as e:
            error: BaseException = e
            if loading and not isinstance(e, DynamosError) and self._is_loaded(pkg.livepatch_name):
                # Interrupted between init_module and the transition watch: undo the load too.
                error = self._undo_load(pkg.livepatch_name, revert_timeout, _interrupted("load", e), None)
            if pkg is not None and not self._is_loaded(pkg.livepatch_name):
                self.records.remove(pkg.livepatch_name)
            self._log_failure("apply", label, start, details, error)
            if error is e:
                raise
            raise error from e

        for old in replaced:
            self.records.remove(old)
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
        return result

    def _record(self, pkg: Any, package_path: Path | str, functions: list[dict[str, Any]],
                notes: list[str]) -> None:
        record = {
            "update": pkg.name,
            "livepatch": pkg.livepatch_name,
            "package": os.path.abspath(package_path),
            "module_sha256": getattr(pkg, "module_sha256", None),
            "kernel": pkg.kernel_release,
            "replace": bool(pkg.replace),
            "applied": now_iso(),
            "functions": functions,
        }
        try:
            self.records.write(pkg.livepatch_name, record)
        except OSError as e:
            notes.append(f"could not record the update in {self.records.directory}: {e.strerror or e}")

    def _is_loaded(self, name: str) -> bool:
        """Whether module ``name`` is in the kernel (registered livepatch or plain module)."""
        return (lp.livepatch_root(self.root) / name).exists() or name in loaded_modules(self.root)

    def _load(self, pkg: Any) -> None:
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
            failure = self._unload(name)
            state = "it was unloaded" if failure is None else f"it could not be unloaded: {failure}"
            raise DynamosError(
                f"{pkg.name}: module {name} loaded but registered no livepatch "
                f"(/sys/kernel/livepatch/{name} missing); {state}"
            )

    def _complete_transition(
        self, name: str, timeout: float, revert_timeout: float, progress: ProgressCallback | None,
        force_notes: list[str] | None = None,
    ) -> None:
        """Wait for the forward transition; on timeout, interruption or any error, revert and
        unload (with ``force_notes``, force a timed-out transition and note who was forced)."""
        try:
            done = self._wait_transition(name, timeout, "transition", progress)
            if not done and force_notes is not None:
                forced = lp.blockers(self.root, 1)
                lp.write_force(self.sys, self.root, name)
                done = self._wait_transition(name, revert_timeout, "transition", progress)
                who = "; ".join(f"{b.comm} (pid {b.pid})" for b in forced) or "none left by then"
                force_notes.append(f"FORCED after {timeout:g}s: tasks switched without the stack check "
                                   f"may still run the replaced code: {who}; livepatch keeps the modules of "
                                   "updates this one replaced loaded for good")
        except BaseException as e:
            # Ctrl-C, or a failing progress callback: never leave the update half applied.
            # The callback is not called again: it may be what failed.
            raise self._undo_load(name, revert_timeout, _interrupted("transition", e), None) from e
        if done and lp.read_livepatch(self.root, name) is None:
            failure = self._unload(name)
            raise TransitionError(
                f"{name}: the livepatch vanished during its transition (disabled by someone "
                f"else?); its module was {'unloaded' if failure is None else 'left loaded: ' + failure}"
            )
        if not done:
            raise self._undo_load(
                name, revert_timeout,
                f"transition did not finish within {timeout:g}s", progress,
            )

    def _unload_replaced(self, names: list[str], notes: list[str]) -> list[str]:
        """Unload the modules of livepatches a ``replace`` update made obsolete."""
        modules = loaded_modules(self.root)
        unloaded = []
        for old in names:
            if not self._wait_gone(old, self.unload_timeout):
                notes.append(f"livepatch {old} was not released after the replace; left loaded")
                continue
            if old not in modules:
                continue
            t0 = self.sys.monotonic()
            failure = self._unload(old)
            self.log.record("unload-replaced", old, "ok" if failure is None else "failed",
                            self.sys.monotonic() - t0, {"error": failure} if failure else {})
            if failure is None:
                unloaded.append(old)
            else:
                notes.append(f"replaced livepatch {old} stays loaded (harmless, inactive): {failure}")
        return unloaded

    # -- revert -----------------------------------------------------------------------------

    def revert(
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
        try:
            t = self.sys.monotonic()
            patch = self._revert_preflight(lp_name, notes)
            now = self.sys.monotonic()
            phases["preflight"], t = round(now - t, 6), now
            if patch is not None and (editions.global_switch_state(lp_name, self.root) or {}).get("state") == "new":
                self._switch_globally(lp_name, False, timeout, restore_timeout, progress, notes)
            if patch is not None:
                self._disable(patch, timeout, restore_timeout, progress)
                notes += self._signal_notes()
                self._wait_gone(lp_name, self.unload_timeout)
            now = self.sys.monotonic()
            phases["transition"], t = round(now - t, 6), now
            failure = self._unload(lp_name)
            if failure is not None:
                raise DynamosError(
                    f"{lp_name}: disabled (every task runs the original code), but its module "
                    f"could not be unloaded: {failure}"
                )
            phases["unload"] = round(self.sys.monotonic() - t, 6)
        except BaseException as e:
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
        return result

    def _switch_globally(self, name: str, to_new: bool, timeout: float, undo_timeout: float,
                         progress: ProgressCallback | None, notes: list[str]) -> None:
        """Move every function of a global update to its new editions (or back) at one instant.

        Forward, a failure reverts and unloads the update (every task ran the original code
        throughout); backward, it leaves the update applied as it was.
        """
        path = editions.control_root(name, self.root) / "global"
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
                raise self._undo_load(name, undo_timeout, why, progress) from e
            raise RefusedError(f"{name}: revert refused, nothing was changed (the new editions still "
                               f"serve every call): {why}") from e
        stats = editions.global_switch_state(name, self.root) or {}
        notes.append(f"global switch to the {'new' if to_new else 'original'} editions: state "
                     f"{stats.get('state')}, longest all-CPU stop {int(stats.get('longest_stop_ns', '0')) / 1000:.0f} "
                     f"us after {stats.get('attempts', '?')} attempt(s)")

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

    def _disable(self, patch: lp.Livepatch, timeout: float, restore_timeout: float,
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
            done = self._wait_transition(name, timeout, "revert", progress)
        except BaseException as e:
            done, cause, progress = False, _interrupted("revert", e), None
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
                f"{self._describe_blockers(blockers)}",
                name=name, outcome="in transition", blockers=blockers,
            ) from e
        if self._wait_transition(name, restore_timeout, "restore", progress):
            raise BlockedTransition(
                f"{name}: {cause}; restored: the update was re-enabled and stays applied.\n"
                f"{self._describe_blockers(blockers)}",
                name=name, outcome="restored", blockers=blockers,
            )
        back = lp.blockers(self.root, 1)
        raise BlockedTransition(
            f"{name}: {cause}, and restoring it did not finish within {restore_timeout:g}s either: "
            f"livepatch {name} remains loaded and in transition back to patched (enabled=1, "
            f"transition=1); the kernel keeps trying.\n{self._describe_blockers(back)}",
            name=name, outcome="in transition", blockers=back,
        )

    # -- status -----------------------------------------------------------------------------

    def blockers(self) -> list[lp.Blocker]:
        """Tasks holding up the transition in progress (only one runs at a time), with stacks."""
        for patch in lp.read_livepatches(self.root):
            if patch.transition:
                return lp.blockers(self.root, patch.target_state)
        return []

    def status(self, name: str | None = None) -> KernelStatus:
        """Every livepatch on the kernel (or just ``name``), enriched by dynamos' records."""
        status = KernelStatus(
            kernel=self.sys.release(),
            livepatch=lp.livepatch_root(self.root).is_dir(),
        )
        modules = loaded_modules(self.root)
        seen = set()
        for patch in lp.read_livepatches(self.root):
            seen.add(patch.name)
            status.updates.append(self._update_status(patch, modules))
        for module in modules.values():
            if module.is_livepatch and module.name not in seen:
                status.updates.append(self._leftover_status(module.name))
        if name is not None:
            wanted = normalize_name(name)
            status.updates = [u for u in status.updates if u.name == wanted]
            if not status.updates:
                raise DynamosError(f"no livepatch named {wanted} is loaded")
        return status

    def _update_status(self, patch: lp.Livepatch, modules: Mapping[str, Any]) -> UpdateStatus:
        record = self.records.read(patch.name)
        explicit: set[tuple[str, str]] = set()
        if record:
            for f in record.get("functions", []):
                fname, obj, sympos = _function_fields(f)
                if sympos is not None:
                    explicit.add((fname, obj))
        functions = [
            FunctionStatus(
                f.name, f.object,
                f.sympos if f.sympos != 1 or (f.name, f.object) in explicit else None,
                f.patched,
            )
            for f in patch.functions
        ]
        replace = patch.replace
        if replace is None and record is not None:
            replace = bool(record.get("replace"))
        tasks = lp.pending_tasks(self.root, patch.target_state) if patch.transition else []
        return UpdateStatus(
            name=patch.name,
            enabled=patch.enabled,
            transition=patch.transition,
            dynamos=record is not None,
            module_loaded=True,  # a registered livepatch always has its module loaded
            objects=dict(patch.objects),
            functions=functions,
            tasks_pending=tasks,
            replace=replace,
            update=record.get("update") if record else None,
            package=record.get("package") if record else None,
            applied=record.get("applied") if record else None,
            editions=[f.to_json() for f in editions.functions_of(patch.name, self.root)],
        )

    def _leftover_status(self, name: str) -> UpdateStatus:
        record = self.records.read(name)
        functions = []
        if record:
            for f in record.get("functions", []):
                fname, obj, sympos = _function_fields(f)
                functions.append(FunctionStatus(fname, obj, sympos, False))
        return UpdateStatus(
            name=name, enabled=False, transition=False, dynamos=record is not None,
            module_loaded=True, functions=functions,
            objects={o: False for o in dict.fromkeys(f.object for f in functions)},
            replace=bool(record.get("replace")) if record else None,
            update=record.get("update") if record else None,
            package=record.get("package") if record else None,
            applied=record.get("applied") if record else None,
        )

