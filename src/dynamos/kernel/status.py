"""Status: every livepatch on the kernel (dynamos' or not), and the tasks holding transitions up.

sysfs tells what is loaded and how far each transition got; dynamos' records add which update
and package it came from. A livepatch module still loaded after its patch was disabled or
replaced is listed too, since ``dynamos revert`` is what unloads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dynamos.abi import VMLINUX
from dynamos.errors import RefusedError
from dynamos.kernel import editions
from dynamos.kernel import livepatch as lp
from dynamos.kernel.journal import Journal, lock_holder
from dynamos.kernel.modules import LoadedModule, loaded_modules, normalize_name
from dynamos.kernel.results import FunctionStatus, KernelStatus, UpdateStatus
from dynamos.kernel.state import UpdateRecords


def _recorded_function(f: Mapping[str, Any]) -> tuple[str, str, int | None]:
    """(name, object, sympos) of a function in dynamos' record of an update."""
    sympos = f.get("sympos")
    return str(f.get("name")), str(f.get("object") or VMLINUX), int(sympos) if sympos else None


def kernel_shows(root: Path, name: str) -> str:
    """What the kernel shows of livepatch ``name`` now, in words (for interrupted operations)."""
    patch = lp.read_livepatch(root, name)
    if patch is None:
        if name in loaded_modules(root):
            return f"module {name} is loaded but registers no livepatch"
        return f"nothing named {name} is loaded"
    state = (editions.global_switch_state(name, root) or {}).get("state")
    shown = (f"livepatch {name} is loaded, {'enabled' if patch.enabled else 'disabled'}, "
             f"{'in transition' if patch.transition else 'transition finished'}")
    return shown + (f", global switch {state}" if state else "")


class StatusReader:
    """Reads the status of the kernel under ``root``."""

    def __init__(self, root: Path, records: UpdateRecords, journal: Journal | None = None):
        self.root = root
        self.records = records
        self.journal = journal

    def transition_blockers(self, name: str | None = None) -> dict[str, list[lp.Blocker]]:
        """Tasks not yet switched, per livepatch in transition (or just ``name``)."""
        out = {}
        for patch in lp.read_livepatches(self.root):
            if patch.transition and (name is None or patch.name == normalize_name(name)):
                out[patch.name] = lp.blockers(self.root, patch.target_state)
        return out

    def blockers(self) -> list[lp.Blocker]:
        """Tasks holding up the transition in progress (only one runs at a time), with stacks."""
        for patch in lp.read_livepatches(self.root):
            if patch.transition:
                return lp.blockers(self.root, patch.target_state)
        return []

    def status(self, release: str, name: str | None = None) -> KernelStatus:
        """Every livepatch on the kernel (or just ``name``), enriched by dynamos' records."""
        status = KernelStatus(
            kernel=release,
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
        if self.journal is not None:
            holder = lock_holder(self.root)
            status.interrupted = [
                {"action": e.get("action"), "update": e.get("name"), "pid": e.get("pid"), "time": e.get("time"),
                 "in_progress": holder is not None and holder == e.get("pid"),
                 "kernel": kernel_shows(self.root, str(e.get("name")))}
                for e in self.journal.pending()]
        if name is not None:
            wanted = normalize_name(name)
            status.updates = [u for u in status.updates if u.name == wanted]
            if not status.updates:
                raise RefusedError(f"no livepatch named {wanted} is loaded")
        return status

    def _update_status(self, patch: lp.Livepatch, modules: Mapping[str, LoadedModule]) -> UpdateStatus:
        record = self.records.read(patch.name)
        explicit: set[tuple[str, str]] = set()
        if record:
            for f in record.get("functions", []):
                fname, obj, sympos = _recorded_function(f)
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
            signer=record.get("signer") if record else None,
            description=record.get("description") if record else None,
            version=record.get("version") if record else None,
            cves=list(record.get("cves", [])) if record else [],
            debian=record.get("debian") if record else None,
            module_sha256=record.get("module_sha256") if record else None,
            editions=[f.to_json() for f in editions.functions_of(patch.name, self.root)],
            global_switch=(editions.global_switch_state(patch.name, self.root) or {}).get("state"),
        )

    def _leftover_status(self, name: str) -> UpdateStatus:
        record = self.records.read(name)
        functions = []
        if record:
            for f in record.get("functions", []):
                fname, obj, sympos = _recorded_function(f)
                functions.append(FunctionStatus(fname, obj, sympos, False))
        return UpdateStatus(
            name=name, enabled=False, transition=False, dynamos=record is not None,
            module_loaded=True, functions=functions,
            objects={o: False for o in dict.fromkeys(f.object for f in functions)},
            replace=bool(record.get("replace")) if record else None,
            update=record.get("update") if record else None,
            package=record.get("package") if record else None,
            applied=record.get("applied") if record else None,
            signer=record.get("signer") if record else None,
        )
