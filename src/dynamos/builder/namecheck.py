"""Checking an update source's kernel names against the target before building, so a typo fails
at build time with its update.toml line, not on a production host at apply time.

vmlinux names are checked against the target's symbol table when one is cached (a lab boot reads
it once, see ``lab/kallsyms.py``); module names against the module file the target ships. When
neither is at hand the check is skipped with a warning: ``apply``'s preflight still checks on the
host, with the kernel's own kallsyms.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from pathlib import Path

from dynamos.abi import TEXT_TYPES, VMLINUX
from dynamos.errors import TargetError, UpdateSourceError
from dynamos.target import TargetKernel
from dynamos.target.modimage import module_image
from dynamos.target.symtab import SymbolTable, kallsyms_path
from dynamos.update.model import UpdateSource


def _module_file(obj: str, target: TargetKernel, module_dirs: Sequence[Path]) -> Path:
    """The module's file: an out-of-tree one given with --module-dir first, else the target's."""
    for d in module_dirs:
        for cand in (obj, obj.replace("_", "-")):
            if (Path(d) / f"{cand}.ko").is_file():
                return Path(d) / f"{cand}.ko"
    return target.module_path(obj)


def _tables(source: UpdateSource, target: TargetKernel,
            module_dirs: Sequence[Path]) -> tuple[dict[str, SymbolTable], list[str]]:
    """Symbol tables of the objects the update names, and why any could not be had."""
    tables: dict[str, SymbolTable] = {}
    missing: list[str] = []
    objects = dict.fromkeys([*(f.object for f in source.functions), *(s.object for s in source.symbols)])
    for obj in objects:
        if obj == VMLINUX:
            path = kallsyms_path(target)
            if path.is_file():
                tables[obj] = SymbolTable.read(path)
            else:
                missing.append(f"vmlinux (no symbol table of {target.release} cached yet; "
                               "one lab boot caches it: dynamos lab run --kernel REL -- true)")
            continue
        try:
            ko = _module_file(obj, target, module_dirs)
        except TargetError as e:
            missing.append(f"{obj} ({e})")
            continue
        if ko.suffix != ".ko":
            missing.append(f"{obj} ({ko.name} is compressed)")
            continue
        tables[obj] = module_image(ko.read_bytes(), obj)[0]
    return tables, missing


def _hint(name: str, table: SymbolTable, text_only: bool) -> str:
    names = {s.name for s in table.symbols if s.name[:3] == name[:3] and (not text_only or s.is_text)}
    close = difflib.get_close_matches(name, sorted(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_names(source: UpdateSource, target: TargetKernel, warn: Callable[[str], None],
                module_dirs: Sequence[Path] = ()) -> None:
    """UpdateSourceError (file and line) for a [[function]] or [[symbol]] the target lacks, or
    whose ``sympos`` is out of range; a warning when the target's tables are not at hand."""
    tables, missing = _tables(source, target, module_dirs)
    if missing:
        warn(f"names not checked against {target.release} for: {'; '.join(missing)}")
    wanted = [(f.name, f.object, f.sympos, f.line, "[[function]]", True) for f in source.functions]
    wanted += [(s.name, s.object, s.sympos, s.line, "[[symbol]]", False) for s in source.symbols]
    for name, obj, sympos, line, where, text_only in wanted:
        table = tables.get(obj)
        if table is None:
            continue
        same = table.lookup(name)  # one table per object (a module's own is object-less); any type counts
        found = [s for s in same if not text_only or s.type in TEXT_TYPES]
        what = "function" if text_only else "symbol"
        if not found:
            raise UpdateSourceError(f"{where}: {what} {name!r} is not in {obj} of kernel {target.release}"
                                    f"{_hint(name, table, text_only)}", path=source.toml_path, line=line)
        if sympos is not None and sympos > len(same):
            raise UpdateSourceError(f"{where}: sympos {sympos} of {name!r} is out of range: {obj} of kernel "
                                    f"{target.release} has {len(same)} symbol(s) of that name",
                                    path=source.toml_path, line=line)
