"""Matching: which kernel symbol is each function of the unit, learning addresses as matches settle.

Ksplice's run-pre matching: an address is known when its name is unique in the symbol table, or
learnt from what already matched (a matched item places its section, and its linked fields tell
where the file's static functions and data went).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from dynamos.builder.fidelity.compare import ItemCheck, check_item
from dynamos.builder.fidelity.report import CandidateCheck, FidelityReport, FunctionCheck, Status
from dynamos.builder.fidelity.unit import ObjectItem, ObjectUnit, read_object_unit
from dynamos.errors import BuildError
from dynamos.target import TargetKernel
from dynamos.target.images import KernelText, kernel_text
from dynamos.target.symtab import SymbolTable


class _Addresses:
    """Kernel addresses of the unit's anchors: unique names in the symbol table, then what
    matched functions and data reveal (their own place, and where their fields point)."""

    def __init__(self, unit: ObjectUnit, symtab: SymbolTable):
        self.unit = unit
        self.symtab = symtab
        self.learnt: dict[str, int] = {}
        self.conflicts: set[str] = set()

    def known(self, anchor: str) -> int | None:
        if anchor in self.conflicts:
            return None
        if anchor in self.learnt:
            return self.learnt[anchor]
        kind, _, key = anchor.partition(":")
        if kind == "sym":
            return self._unique(key)
        index = int(key)
        if index in self.unit.merged:
            return None
        for name, value in self.unit.placement.get(index, ()):
            addr = self.learnt.get(f"sym:{name}") or self._unique(name)
            if addr is not None:
                return addr - value
        return None

    def _unique(self, name: str) -> int | None:
        return None if name in self.unit.numbered else self.symtab.unique_address(name)

    def data_addresses(self) -> dict[str, int]:
        """Kernel addresses of the unit's named data (not functions) that are known."""
        out = {}
        for index, names in self.unit.placement.items():
            section = self.known(f"sec:{index}")
            for name, value in names:
                if name in self.unit.functions:
                    continue
                addr = self.learnt.get(f"sym:{name}")
                addr = addr if addr is not None else None if section is None else section + value
                if addr is not None:
                    out[name] = addr
        return out

    def own_address(self, item: ObjectItem) -> int | None:
        """Where this file's copy of ``item`` is, when known (a weak name may be someone else's)."""
        if not item.weak:
            addr = self.known(f"sym:{item.name}")
            if addr is not None:
                return addr
        section = self.known(f"sec:{item.section_index}")
        return None if section is None else section + item.offset

    def learn(self, anchor: str, addr: int) -> bool:
        """Record an anchor's address; a contradiction makes it unknown. True if anything changed."""
        if anchor in self.conflicts or (anchor.startswith("sec:") and int(anchor[4:]) in self.unit.merged):
            return False
        have = self.known(anchor)
        if have is None:
            self.learnt[anchor] = addr
            return True
        if have != addr:
            self.conflicts.add(anchor)
            self.learnt.pop(anchor, None)
            return True
        return False

    def learn_from(self, item: ObjectItem, addr: int, kernel: bytes, check: ItemCheck) -> bool:
        """A matched item places itself, its section, and what its masked fields point to."""
        new = self.learn(f"sym:{item.name}", addr) if not item.weak else False
        new |= self.learn(f"sec:{item.section_index}", addr - item.offset)
        for r, here in check.fields:
            symbol = r.kind.symbol(kernel[here:here + r.kind.width], r.addend, addr + here)
            if symbol is not None:
                new |= self.learn(r.anchor, symbol)
        return new


def check_fidelity(original_object: Path | bytes, target: TargetKernel, symtab: SymbolTable,
                   functions: Iterable[str] | None = None, *, text: KernelText | None = None,
                   against: str | None = None) -> FidelityReport:
    """Compare every function of a compiled original with the target's text (see module docstring).

    ``functions`` limits the report to those names (every function and data object of the unit
    still helps to resolve the others). ``text`` saves reopening vmlinux for each object, or is a
    module's image (``modimage``) with ``symtab`` its table; ``against`` names it in messages.
    """
    if isinstance(original_object, bytes):
        data, unit_name = original_object, "object"
    else:
        data, unit_name = Path(original_object).read_bytes(), Path(original_object).name
    unit = read_object_unit(data, unit_name)
    wanted = list(unit.functions) if functions is None else list(functions)
    missing = [n for n in wanted if n not in unit.functions]
    if missing:
        raise BuildError(f"{unit_name} defines no function {', '.join(missing)}")
    matcher = _Matcher(unit, symtab, text or kernel_text(target))
    report = FidelityReport(unit_name, against or f"kernel {target.release}")
    report.passes = matcher.learn()
    report.learnt = len(matcher.addresses.learnt)
    report.data_addresses = matcher.addresses.data_addresses()
    for name in wanted:
        func = unit.functions[name]
        checks = tuple(c for c, _ in matcher.evaluate(func))
        report.functions[name] = FunctionCheck(name, len(func.data), func.section, _status(func, checks), checks)
    return report


class _Matcher:
    """Compares the unit's items with the kernel's candidates while learning where things are."""

    def __init__(self, unit: ObjectUnit, symtab: SymbolTable, text: KernelText):
        self.unit = unit
        self.symtab = symtab
        self.text = text
        self.addresses = _Addresses(unit, symtab)
        self.candidates = {name: [s for s in symtab.lookup(name) if s.is_text] for name in unit.functions}

    def evaluate(self, func: ObjectItem) -> list[tuple[CandidateCheck, ItemCheck]]:
        own = self.addresses.own_address(func)
        out = []
        for sym in self.candidates[func.name]:
            c = check_item(func, sym.addr, self.text.peek(sym.addr, len(func.data)), self.addresses.known,
                           self.text.peek)
            out.append((CandidateCheck(sym.addr, self.symtab.sympos(sym), sym.type, c.comparison, c.verified,
                                       c.wrong, c.relaxed, c.wrong_constants,
                                       elsewhere=own is not None and own != sym.addr), c))
        return out

    def settle_data(self, item: ObjectItem) -> bool:
        """Learn from a data object once its place is known and its bytes match there."""
        addr = self.addresses.own_address(item)
        if addr is None or self.text.section_at(addr) is None:
            return False
        kernel = self.text.read(addr, len(item.data))
        check = check_item(item, addr, kernel, self.addresses.known, self.text.peek)
        if not check.equal:
            return False
        self.addresses.learn_from(item, addr, kernel, check)
        return True

    def learn(self) -> int:
        """Settle what matches exactly one place and learn from it, until nothing new is learnt.

        Returns the number of passes. Each pass can only add addresses or turn contradicted ones
        unknown, so the loop ends.
        """
        pending_code, pending_data = dict(self.unit.functions), list(self.unit.data)
        passes, progress = 0, True
        while progress:
            passes += 1
            progress = False
            for name, func in list(pending_code.items()):
                hits = [(c, check) for c, check in self.evaluate(func) if c.equal]
                if len(hits) == 1:
                    del pending_code[name]
                    c, check = hits[0]
                    kernel = self.text.peek(c.addr, len(func.data))
                    progress |= self.addresses.learn_from(func, c.addr, kernel, check)
            still = [item for item in pending_data if not self.settle_data(item)]
            progress |= len(still) != len(pending_data)
            pending_data = still
        return passes


def _status(func: ObjectItem, checks: tuple[CandidateCheck, ...]) -> Status:
    hits = sum(1 for c in checks if c.equal)
    if not checks:
        return Status.ABSENT
    if hits:
        return Status.MATCHED if hits == 1 else Status.AMBIGUOUS
    if func.weak and not any(c.type in "wW" for c in checks):
        return Status.OVERRIDDEN  # only strong symbols of that name: the weak copy lost the link
    return Status.MISMATCH
