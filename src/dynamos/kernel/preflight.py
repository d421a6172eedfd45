"""Preflight: everything that can be checked before an update's module touches the kernel.

An update that cannot load, or would load and never finish its transition, is refused here with
every reason at once (``PreflightRefused``), so one round of fixes suffices; what is worth
knowing but not fatal comes back as notes. Nothing here changes the kernel, except mounting
tracefs when it is missing (logged).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from dynamos.abi import generated_name
from dynamos.kernel import livepatch as lp
from dynamos.kernel.actionlog import ActionLog
from dynamos.kernel.modident import identity_problem
from dynamos.kernel.modules import LoadedModule, loaded_modules
from dynamos.kernel.refusals import PreflightRefused, Refusal
from dynamos.kernel.symbols import (
    TEXT_TYPES,
    VMLINUX,
    Kallsyms,
    TraceableFunctions,
    Tracefs,
    find_tracefs,
    parse_enabled_functions,
)
from dynamos.kernel.syscalls import Syscalls
from dynamos.kernel.trust import module_signature_refusals
from dynamos.update.package import PackagedSymbol, UpdatePackage


class Preflight:
    """Checks of update packages against the kernel under ``root``."""

    def __init__(self, root: Path, syscalls: Syscalls, log: ActionLog):
        self.root = root
        self.sys = syscalls
        self.log = log

    def _tracefs(self, may_mount: bool) -> Tracefs:
        t0 = self.sys.monotonic()
        found = find_tracefs(self.root, self.sys.mount if may_mount else None)
        if found.mounted is not None:
            self.log.record(
                "mount-tracefs", "tracefs", "ok" if found.path else "failed",
                self.sys.monotonic() - t0, {"note": found.note, "problem": found.problem},
            )
        return found

    def predicted_blockers(self, pkg: UpdatePackage) -> tuple[list[tuple[lp.Blocker, list[str]]], list[str]]:
        """Tasks that now have a function the update replaces on their stack, and a note on them.

        Kernel threads whose main function is replaced never leave it: the update restarts those
        it declares ([[kthread]]), and is refused (PreflightRefused) for any other.
        """
        functions = pkg.patched_functions
        names = {f.name for f in functions}
        restarted = {f.name for f in functions if f.kthread}
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
        copies = {generated_name(f.name, f.object, f.sympos, role="kthread"): f.name
                  for f in functions if f.kthread}
        live = {patch.name: patch for patch in lp.read_livepatches(self.root) if patch.name != pkg.livepatch_name}
        for b, copy, holder in lp.threads_on_update_code(stacks):
            if holder not in live:
                continue
            if copy in copies:
                notes.append(f"kernel thread {b.comm} (pid {b.pid}) runs update {holder}'s copy of {copies[copy]}: "
                             f"it will be restarted onto this update's, and {holder} will let go of it")
            elif pkg.replace:
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

    def check(self, pkg: UpdatePackage) -> list[str]:
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
        reasons += module_signature_refusals(self.root, pkg, notes)
        running = self.sys.release()
        if pkg.kernel_release != running:
            reasons.append(Refusal.make("release", package=pkg.kernel_release, running=running))
        else:
            vermagic = pkg.vermagic.split()
            if vermagic and vermagic[0] != running:
                reasons.append(Refusal.make("vermagic", vermagic=vermagic[0], running=running))

        problem = identity_problem(pkg.module, name)
        if problem is not None:
            reasons.append(Refusal.make("module-identity", name=name, problem=problem))

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
        pkg: UpdatePackage,
        patches: list[lp.Livepatch],
        modules: Mapping[str, LoadedModule],
        notes: list[str],
        may_mount: bool,
    ) -> list[Refusal]:
        reasons: list[Refusal] = []
        klp_symbols = pkg.klp_symbol_refs
        wanted = {f.name for f in pkg.patched_functions} | {s.name for s in klp_symbols}
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

        for entry in pkg.patched_functions:
            fname, obj, sympos = entry.name, entry.object, entry.sympos
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

    def _check_klp_symbols(self, symbols: tuple[PackagedSymbol, ...], kallsyms: Kallsyms,
                           modules: Mapping[str, LoadedModule], notes: list[str]) -> list[Refusal]:
        """Livepatch resolves these by name and position when the update loads; a missing or
        ambiguous one would fail the load with a bare EINVAL, so say it now."""
        reasons = []
        for sym in symbols:
            name, obj, sympos = sym.name, sym.object, sym.sympos
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
