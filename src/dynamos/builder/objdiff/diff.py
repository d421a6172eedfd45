"""The diff proper: what an update must carry from the patched object, and what it cannot.

Works on the normalised objects of ``normalise.py``; which sections are boot-only or per-function
tables is the one special-section table (``elf/sections.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from dynamos.builder.elf import CARRIED_WRITABLE_SECTIONS, DEFAULT_RULE, Handling, section_rule
from dynamos.builder.objdiff.align import align_statics
from dynamos.builder.objdiff.normalise import DataItem, Function, ObjectInfo, TableEntry
from dynamos.builder.refusals import CHANGED_INITIALISER, CHANGED_LAYOUT, INIT_EXIT, NOTRACE, OTHER


@dataclass
class Change:
    kind: str  # "changed", "new" or "removed"
    name: str
    reason: str


@dataclass
class DiffRefusal:
    """A function, data object or section the update cannot carry, and why."""

    name: str
    reason: str
    code: str = OTHER  # why, in the vocabulary of builder/refusals.py


@dataclass
class SpecialUse:
    """Entries of a per-function special table that a changed or new function brings along."""

    section: str
    function: str
    entries: int


@dataclass
class DiffResult:
    """What the update must carry, and what it cannot. A refused function is in no other list."""

    changed: list[Change] = field(default_factory=list)  # replace the kernel's function (livepatch redirects it)
    new: list[Change] = field(default_factory=list)  # include in the update, not redirected (incl. notrace copies)
    removed: list[Change] = field(default_factory=list)  # functions and data gone from the patched file
    refused: list[DiffRefusal] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    new_data: list[Change] = field(default_factory=list)  # new objects and changed local constants to carry
    special: list[SpecialUse] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.refused


def diff_objects(original: ObjectInfo, patched: ObjectInfo) -> DiffResult:
    """Compare two compiled translation units function by function (see module docstring)."""
    patched = align_statics(original, patched)  # a static whose key changed is still the same variable
    result = DiffResult()
    units_o, units_p = original.units(), patched.units()
    changed: dict[str, str] = {}
    for name in sorted(units_o.keys() | units_p.keys()):
        if name not in units_p:
            result.removed.append(Change("removed", name, "function no longer in the patched file"))
        elif name not in units_o:
            result.new.append(Change("new", name, "function added by the patch"))
        else:
            reason = _unit_difference(units_o[name], units_p[name])
            if reason:
                changed[name] = reason

    refused: dict[str, DiffRefusal] = {}
    carried_data = _diff_data(original, patched, result, changed, refused)
    _settle_untraceable(original, patched, result, changed, refused, carried_data)
    for change in list(result.new):
        rule = section_rule(patched.functions[change.name].section)
        if rule is not None and rule.handling is Handling.BOOT_ONLY:
            refused[change.name] = DiffRefusal(change.name, f"{rule.why}; an update cannot add {change.name}",
                                               INIT_EXIT)
            result.new.remove(change)
    result.changed = [Change("changed", name, changed[name]) for name in sorted(changed)]
    result.new.sort(key=lambda c: c.name)
    carried = set(changed) | {c.name for c in result.new}
    result.unchanged = sorted(n for n in units_o.keys() & units_p.keys() if n not in carried and n not in refused)
    _diff_tables(original, patched, result, carried, refused)
    _diff_opaque(original, patched, refused)
    result.refused = [refused[name] for name in sorted(refused)]
    return result


def _unit_difference(before: list[Function], after: list[Function]) -> str:
    """Why a function (with its .cold parts) differs, or "" when it does not."""
    parts_o = {fn.name: fn for fn in before}
    parts_p = {fn.name: fn for fn in after}
    reasons = []
    for part in sorted(parts_o.keys() | parts_p.keys()):
        prefix = "" if part == after[0].name else f"in {part}: "
        if part not in parts_p:
            reasons.append(f"{prefix}part removed")
        elif part not in parts_o:
            reasons.append(f"{prefix}part added")
        else:
            why = _function_difference(parts_o[part], parts_p[part])
            if why:
                reasons.append(prefix + why)
    return "; ".join(reasons)


def _function_difference(a: Function, b: Function) -> str:
    reasons = []
    if a.code != b.code:
        reasons.append("code changed")
    if a.relocs != b.relocs:
        added = sorted({r.symbol for r in b.relocs} - {r.symbol for r in a.relocs})
        dropped = sorted({r.symbol for r in a.relocs} - {r.symbol for r in b.relocs})
        if added:
            reasons.append("now references " + ", ".join(_describe(s) for s in added))
        if dropped:
            reasons.append("no longer references " + ", ".join(_describe(s) for s in dropped))
        if not added and not dropped and a.code == b.code:
            first = next((y for x, y in zip(a.relocs, b.relocs, strict=False) if x != y), b.relocs[-1])
            reasons.append(f"reference to {_describe(first.symbol)} changed")
    return "; ".join(reasons)


def _describe(symbol: str) -> str:
    if symbol.startswith(".rodata.str:"):
        return f"string {symbol.removeprefix('.rodata.str:')!r}"
    return symbol


def _settle_untraceable(original: ObjectInfo, patched: ObjectInfo, result: DiffResult, changed: dict[str, str],
                        refused: dict[str, DiffRefusal], carried_data: set[str]) -> None:
    """Check that livepatch can redirect each changed function (the original is what it redirects).

    __init/__exit code refuses. A changed function without an fentry site refuses too, unless it is
    file-static (typically an out-of-line ``static inline``, which the kernel marks notrace) and no
    existing data points to it: then the update carries its own copy as a new function and replaces
    every caller instead, repeating for callers that are themselves untraceable statics.
    """
    users = _merge(_users(original), _users(patched))
    units_o, units_p = original.units(), patched.units()
    work = sorted(changed)
    while work:
        name = work.pop(0)
        head = units_o[name][0]
        rule = section_rule(head.section)
        if rule is not None and rule.handling is Handling.BOOT_ONLY:
            refused[name] = DiffRefusal(name, f"{rule.why}; {name} is in {head.section}", INIT_EXIT)
            del changed[name]
            continue
        if head.traceable or name in original.mcount_sites:
            continue
        why_changed = changed.pop(name)
        pinned = sorted(original.data[u].symbol for u in users.get(name, ())
                        if u in original.data and u not in carried_data)
        if head.binding != "local" or pinned:
            where = "it is global, so code elsewhere calls it" if head.binding != "local" else \
                f"data points to it: {', '.join(pinned)}"
            refused[name] = DiffRefusal(name, f"not traceable (notrace): {name} has no __fentry__ call at its "
                                        f"start, so livepatch cannot redirect it, and {where}", NOTRACE)
            continue
        result.new.append(Change("new", name, f"{why_changed}; not traceable (notrace), so the update carries its "
                                 "own copy and replaces its callers"))
        for caller in sorted(users.get(name, ())):
            if caller in units_o and caller in units_p and caller not in changed and caller not in refused \
                    and all(c.name != caller for c in result.new):
                changed[caller] = f"calls {name}, which changed but cannot be patched in place (notrace)"
                work.append(caller)


def _data_kind(item: DataItem) -> str:
    scope = "static" if item.binding == "local" else "global"
    return f"{scope} {'variable' if item.writable else 'constant'} {item.symbol}"


def _carriable(item: DataItem) -> bool:
    """A file-local object only this file's functions can reach: a changed copy can travel with them."""
    if item.binding != "local":
        return False
    return not item.writable or item.section in CARRIED_WRITABLE_SECTIONS


def _diff_data(original: ObjectInfo, patched: ObjectInfo, result: DiffResult, changed: dict[str, str],
               refused: dict[str, DiffRefusal]) -> set[str]:
    """New data is carried; changed data is refused, except file-local constants (and descriptors
    such as pr_debug's), which travel as new copies together with every function that uses them.

    Data is reported by ELF symbol name (what the extractor and the kernel know); keys only match
    objects between the two files. Returns the keys of the data the update carries.
    """
    users = _merge(_users(original), _users(patched))
    refused_keys: set[str] = set()

    def refuse(key: str, reason: str, code: str) -> None:
        refused[patched.data[key].symbol] = DiffRefusal(patched.data[key].symbol, reason, code)
        refused_keys.add(key)

    new_keys = set(patched.data) - set(original.data)
    for key in sorted(set(original.data) - set(patched.data)):
        result.removed.append(Change("removed", original.data[key].symbol, "data object no longer defined"))
    for key in sorted(new_keys):
        item = patched.data[key]
        rule = section_rule(item.section)
        if rule is not None and rule.handling is Handling.BOOT_ONLY:
            refuse(key, f"{rule.why}; an update cannot add {_data_kind(item)}", INIT_EXIT)
        else:
            result.new_data.append(Change("new", item.symbol, f"new {_data_kind(item)} in {item.section}"))
    differing = {k for k in set(original.data) & set(patched.data) if not original.data[k].same_value(patched.data[k])}
    carried: dict[str, str] = {}
    work = sorted(differing)
    while work:
        key = work.pop(0)
        before, after = original.data[key], patched.data[key]
        rule = section_rule(after.section)
        if rule is not None and rule.handling is Handling.BOOT_ONLY:
            refuse(key, f"{rule.why}; {_data_kind(after)} changed", INIT_EXIT)
            continue
        if not _carriable(after):
            refuse(key, f"data changed: {_data_kind(after)} {_value_change(before, after)}",
                   _value_code(before, after))
            continue
        blockers = []
        for user in sorted(users.get(key, ())):
            if user in patched.data and user not in new_keys and user not in carried and user != key:
                if _carriable(patched.data[user]):
                    carried.setdefault(user, f"{_data_kind(patched.data[user])} points to changed {after.symbol}")
                    work.append(user)
                else:
                    blockers.append(patched.data[user].symbol)
        if blockers:
            refuse(key, f"data changed: {_data_kind(after)} {_value_change(before, after)}, and data that "
                        f"cannot change uses it: {', '.join(blockers)}", _value_code(before, after))
            continue
        carried.setdefault(key, f"{_data_kind(after)} {_value_change(before, after)}; carried with its users")
    for key in sorted(carried):
        if key in refused_keys:
            continue
        result.new_data.append(Change("new", patched.data[key].symbol, carried[key]))
        for user in sorted(users.get(key, ())):
            if user in original.functions and user in patched.functions and user not in changed:
                changed[user] = f"uses changed {_data_kind(patched.data[key])}"
    result.new_data.sort(key=lambda c: c.name)
    return (set(carried) - refused_keys) | new_keys


def _users(info: ObjectInfo) -> dict[str, set[str]]:
    """Data key or function (by unit) -> the functions (by unit) and data objects that reference it."""
    users: dict[str, set[str]] = {}

    def add(target: str, user: str) -> None:
        if target in info.functions:
            target = info.unit_of(target)
        elif target not in info.data:
            return
        if target != user:
            users.setdefault(target, set()).add(user)

    for fn in info.functions.values():
        for r in fn.relocs:
            add(r.symbol, info.unit_of(fn.name))
    for item in info.data.values():
        for r in item.relocs:
            add(r.symbol, item.name)
    return users


def _merge(a: dict[str, set[str]], b: dict[str, set[str]]) -> dict[str, set[str]]:
    return {k: a.get(k, set()) | b.get(k, set()) for k in a.keys() | b.keys()}


def _value_change(before: DataItem, after: DataItem) -> str:
    if before.size != after.size:
        return f"changes size from {before.size} to {after.size} bytes"
    return "has a different initial value"


def _value_code(before: DataItem, after: DataItem) -> str:
    return CHANGED_LAYOUT if before.size != after.size else CHANGED_INITIALISER


def _diff_tables(original: ObjectInfo, patched: ObjectInfo, result: DiffResult, carried: set[str],
                 refused: dict[str, DiffRefusal]) -> None:
    """Entries of per-function tables travel with changed/new functions; a difference in the entries
    of a function the update does not replace cannot be applied in place, so it refuses."""
    for section in sorted(original.tables.keys() | patched.tables.keys()):
        before = _group(original.tables.get(section, ()))
        after = _group(patched.tables.get(section, ()))
        for owner in sorted(before.keys() | after.keys(), key=lambda o: (o is None, o or "")):
            if owner in carried:
                if after.get(owner):
                    result.special.append(SpecialUse(section, owner, len(after[owner])))
            elif owner is None:
                if before.get(None) != after.get(None):
                    refused[section] = DiffRefusal(section, f"{section} entries that point into no known "
                                                            "function changed")
            elif owner in refused or owner not in patched.functions:
                continue
            elif before.get(owner) != after.get(owner):
                refused[owner] = DiffRefusal(owner, f"{section} entries of {owner} changed although its code "
                                                    "did not")


def _group(entries: Iterable[TableEntry]) -> dict[str | None, tuple[TableEntry, ...]]:
    groups: dict[str | None, list[TableEntry]] = {}
    for entry in entries:
        groups.setdefault(entry.function, []).append(entry)
    return {k: tuple(v) for k, v in groups.items()}


def _diff_opaque(original: ObjectInfo, patched: ObjectInfo, refused: dict[str, DiffRefusal]) -> None:
    for section in sorted(original.opaque.keys() | patched.opaque.keys()):
        if original.opaque.get(section) != patched.opaque.get(section):
            rule = section_rule(section) or DEFAULT_RULE
            refused[section] = DiffRefusal(section, f"special section {section} changed ({rule.why}); dynamos "
                                                    "does not handle it yet")
