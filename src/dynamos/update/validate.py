"""Validating an update source: from ``update.toml`` and its C files to an :class:`UpdateSource`.

Validation is strict and every error points at a file and line: an author who mistypes a key
or forgets to define an edition should learn it here, in a second, not from Kbuild or from a
kernel that refuses the module. The schema is described in :mod:`dynamos.update.model`.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from pathlib import Path
from typing import Any

from dynamos.abi import MAX_EDITIONS, generated_name
from dynamos.errors import UpdateSourceError
from dynamos.update.cscan import CDeclaration, find_c_functions
from dynamos.update.model import (
    CONSISTENCY_MODELS,
    UPDATE_TOML,
    FunctionSpec,
    KthreadRestart,
    SymbolSpec,
    UpdateSource,
)
from dynamos.update.rules import (
    CVE_RE,
    Checker,
    module_name_problem,
    name_problem,
    release_problem,
    symbol_problem,
    toml_type,
    version_problem,
)
from dynamos.update.tomllines import NoLines, TomlLines, toml_error

UPDATE_KEYS = ("name", "description", "kernel", "replace", "consistency", "transfer", "version", "cves")
FUNCTION_KEYS = ("name", "edition", "editions", "default", "policy", "monitor", "object", "sympos")
SYMBOL_KEYS = ("name", "object", "sympos")
KTHREAD_KEYS = ("function", "object", "stop", "start", "transfer")
TOP_LEVEL_KEYS = ("update", "function", "symbol", "hooks", "state", "kthread")
HOOK_KEYS = ("pre_patch", "post_patch", "pre_unpatch", "post_unpatch")
STATE_KEYS = ("id", "version")


def load_update_source(directory: Path | str) -> UpdateSource:
    """Read and validate an update source; raise UpdateSourceError naming file and line."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UpdateSourceError("update source is not a directory", path=directory)
    path = directory / UPDATE_TOML
    if not path.is_file():
        raise UpdateSourceError(f"no {UPDATE_TOML} in update source", path=directory)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise UpdateSourceError(f"not UTF-8 text: {e.reason}", path=path, line=line) from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message, line = toml_error(e, text)
        raise UpdateSourceError(f"invalid TOML: {message}", path=path, line=line) from e

    c_files = tuple(sorted(p for p in directory.glob("*.c") if p.is_file()))
    return _validate(data, Checker(path, TomlLines(text)), directory, c_files)


def compiled_update_source(data: dict[str, Any], directory: Path, *, origin: Path) -> UpdateSource:
    """Validate an update whose editions were cut out of compiled objects (the patch front end).

    ``data`` holds the tables ``update.toml`` would ([update], [[function]]...), made in code, and
    passes the same checks, so C generation can trust every :class:`UpdateSource`. Three things
    differ, because no author wrote them: function names are the kernel's symbols as compiled,
    gcc clones (``foo.constprop.0``) included; the name may be any module name (it comes from a
    patch's file name or ``--name``); and there are no C files to find editions in. Errors name
    ``origin``, without lines.
    """
    return _validate(data, Checker(origin, NoLines(), compiled=True), directory, ())


def _validate(data: dict[str, Any], check: Checker, directory: Path, c_files: tuple[Path, ...]) -> UpdateSource:
    """The tables of an update, checked in the order an author reads them, as an UpdateSource."""
    lines = check.lines
    for key in data:
        if key in TOP_LEVEL_KEYS:
            continue
        hint = difflib.get_close_matches(key, TOP_LEVEL_KEYS, n=1)
        if key in UPDATE_KEYS or key in FUNCTION_KEYS:
            advice = "keys before the first table belong to no table: move it under [update] or [[function]]"
        elif hint:
            advice = f"did you mean {hint[0]!r}?"
        else:
            advice = "expected only [update], [[function]], [[symbol]], [hooks], [[state]] and [[kthread]] tables"
        raise check.fail(f"unknown top-level key {key!r} ({advice})", lines.key((), 0, key))

    name, description, kernel, replace = _validate_update(data, check)
    consistency, transfer = _validate_consistency(data["update"], check)
    functions = _validate_functions(data, check)
    functions = _validate_kthreads(data, functions, consistency, check)
    if consistency == "global":
        functions = tuple(_dispatched(f) for f in functions)
    symbols = _validate_symbols(data, check)
    version, cves = _validate_fixes(data["update"], check)

    if not check.compiled:
        if not c_files and any(f.author_functions for f in functions):
            raise UpdateSourceError(
                "no .c files in update source: the editions named in update.toml must be defined in C",
                path=directory,
            )
        _validate_editions(functions, c_files, check)
    hooks = _validate_hooks(data, check)
    states = _validate_states(data, check)
    if not check.compiled:
        _validate_hook_definitions(functions, transfer, hooks, c_files, check)

    return UpdateSource(
        directory=directory,
        name=name,
        description=description,
        functions=functions,
        c_files=c_files,
        kernel=kernel,
        replace=replace,
        symbols=symbols,
        consistency=consistency,
        transfer=transfer,
        hooks=hooks,
        states=states,
        version=version,
        cves=cves,
    )


def _validate_fixes(upd: dict[str, Any], check: Checker) -> tuple[str | None, tuple[str, ...]]:
    """[update] version and cves: what the update is and what it fixes, for status and info."""
    tpath = ("update",)
    version = check.string(upd, "version", "[update]", tpath, 0, required=False)
    problem = version_problem(version) if version is not None else None
    if problem:
        raise check.fail(f"[update] version {version!r} {problem}", check.lines.key(tpath, 0, "version"))
    cves = upd.get("cves", [])
    line = check.lines.key(tpath, 0, "cves")
    if not isinstance(cves, list) or not all(isinstance(c, str) for c in cves):
        raise check.fail(f"[update] cves must be a list of strings like \"CVE-2024-1086\", got {cves!r}", line)
    bad = [c for c in cves if not CVE_RE.match(c)]
    if bad:
        raise check.fail(f"[update] cves: {bad[0]!r} is not a CVE id (CVE-YYYY-NNNN)", line)
    if len(set(cves)) != len(cves):
        raise check.fail("[update] cves: an id is listed twice", line)
    return version, tuple(cves)


def _validate_hook_definitions(functions: tuple[FunctionSpec, ...], transfer: str | None,
                               hooks: tuple[tuple[str, str], ...], c_files: tuple[Path, ...], check: Checker) -> None:
    """The transfer, [hooks] and [[kthread]] hooks must be defined in the C files, like editions."""
    by_name = _c_functions_by_name(c_files)
    searched = ", ".join(p.name for p in c_files)
    if transfer is not None:
        hook = FunctionSpec(name="[update] transfer", edition=transfer)
        _validate_edition(hook, transfer, 0, "transfer", by_name, searched, check, table=("update",))
    for key, function in hooks:
        _validate_edition(FunctionSpec(name=f"[hooks] {key}", edition=function), function, 0, key, by_name,
                          searched, check, table=("hooks",))
    for f in functions:
        if f.kthread is not None:
            for key, function in f.kthread.hooks:
                _validate_edition(FunctionSpec(name=f"[[kthread]] {f.name} {key}", edition=function), function,
                                  f.kthread.index, key, by_name, searched, check, table=("kthread",))


def _validate_hooks(data: dict[str, Any], check: Checker) -> tuple[tuple[str, str], ...]:
    """[hooks]: livepatch callbacks run with the update's first object (vmlinux when patched)."""
    table = data.get("hooks", {})
    if not isinstance(table, dict):
        raise check.fail("hooks must be a table ([hooks])", check.lines.key((), 0, "hooks"))
    check.reject_unknown(table, HOOK_KEYS, "[hooks]", ("hooks",), 0)
    out = []
    for key in HOOK_KEYS:
        function = check.string(table, key, "[hooks]", ("hooks",), 0, required=False)
        if function is not None:
            problem = symbol_problem(function)
            if problem:
                raise check.fail(f"[hooks] {key} {function!r} {problem}", check.lines.key(("hooks",), 0, key))
            out.append((key, function))
    return tuple(out)


def _validate_kthreads(data: dict[str, Any], functions: tuple[FunctionSpec, ...], consistency: str,
                       check: Checker) -> tuple[FunctionSpec, ...]:
    """[[kthread]]: restart strategies, each attached to the [[function]] replacing a thread's main
    function. Such a function is served through a dispatcher: its edition 0 is the way back."""
    tpath = ("kthread",)
    out = list(functions)
    for index, table, where, header in check.tables(data, "kthread"):
        check.reject_unknown(table, KTHREAD_KEYS, where, tpath, index)
        name = check.identifier(table, "function", where, tpath, index)
        obj_given = check.string(table, "object", where, tpath, index, required=False)
        obj = check.object(obj_given, where, check.lines.key(tpath, index, "object"))
        hooks = {key: check.identifier(table, key, where, tpath, index) for key in ("stop", "start")}
        transfer = None
        if "transfer" in table:
            transfer = check.identifier(table, "transfer", where, tpath, index)
        matches = [i for i, f in enumerate(out) if f.name == name and (obj_given is None or f.object == obj)]
        if not matches:
            raise check.fail(f"{where}: function {name!r} is not replaced by any [[function]] of this update; "
                             "a thread's main function is restarted onto its new edition, so it must have one",
                             check.lines.key(tpath, index, "function"))
        if len(matches) > 1:
            raise check.fail(f"{where}: several [[function]]s replace {name!r}: add object = ... to say which",
                             check.lines.key(tpath, index, "function"))
        f = out[matches[0]]
        if f.kthread is not None:
            raise check.fail(f"{where}: {f.object} function {name!r} already has a [[kthread]] at line "
                             f"{f.kthread.line}", header)
        if consistency == "global":
            raise check.fail(f"{where}: a restarted thread stays inside its main function for good, so a global "
                             "switch (which waits until no call is in flight) could never happen: use "
                             "consistency = \"per-task\"", header)
        if f.monitor or f.policy:
            raise check.fail(f"{where}: {name!r} runs once per thread, for ever: monitor and policy make no "
                             "sense for it", header)
        restart = KthreadRestart(stop=hooks["stop"], start=hooks["start"], transfer=transfer, line=header,
                                 index=index)
        out[matches[0]] = dataclasses.replace(_dispatched(f), kthread=restart)
    return tuple(out)


def _validate_states(data: dict[str, Any], check: Checker) -> tuple[tuple[int, int], ...]:
    """[[state]]: system states (klp_state) this update sets up, each an id and a version."""
    out: dict[int, int] = {}
    for index, table, where, header in check.tables(data, "state"):
        check.reject_unknown(table, STATE_KEYS, where, ("state",), index)
        values = []
        for key in STATE_KEYS:
            value = table.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "id" else 1):
                raise check.fail(f"{where}: {key} must be a {'non-negative' if key == 'id' else 'positive'} "
                                 f"integer, got {value!r}", check.lines.key(("state",), index, key) or header)
            values.append(value)
        if values[0] in out:
            raise check.fail(f"{where}: state id {values[0]} is given twice", header)
        out[values[0]] = values[1]
    return tuple(out.items())


def _validate_consistency(upd: dict[str, Any], check: Checker) -> tuple[str, str | None]:
    tpath = ("update",)
    consistency = check.string(upd, "consistency", "[update]", tpath, 0, required=False) or "per-task"
    if consistency not in CONSISTENCY_MODELS:
        raise check.fail(f"[update] consistency {consistency!r} is not one of {', '.join(CONSISTENCY_MODELS)}",
                         check.lines.key(tpath, 0, "consistency"))
    transfer = check.string(upd, "transfer", "[update]", tpath, 0, required=False)
    if transfer is not None:
        problem = symbol_problem(transfer)
        if problem:
            raise check.fail(f"[update] transfer {transfer!r} {problem}", check.lines.key(tpath, 0, "transfer"))
        if consistency != "global":
            raise check.fail("[update] transfer runs at the global switch: it needs consistency = \"global\"",
                             check.lines.key(tpath, 0, "transfer"))
    return consistency, transfer


def _dispatched(f: FunctionSpec) -> FunctionSpec:
    """Under global consistency every function goes through a dispatcher, single editions too; so does
    a thread's main function, whose edition 0 is the way back on revert."""
    if f.dispatched:
        return f
    return dataclasses.replace(f, editions=(f.edition,), edition=generated_name(f.name, f.object, f.sympos))


def _validate_update(data: dict[str, Any], check: Checker) -> tuple[str, str, str | None, bool]:
    lines = check.lines
    tpath = ("update",)
    if "update" not in data:
        raise check.fail("missing [update] table (it holds the update's name and description)", None)
    upd = data["update"]
    if not isinstance(upd, dict):
        raise check.fail(
            f"update must be a table ([update]), got {toml_type(upd)}", lines.key((), 0, "update")
        )
    check.reject_unknown(upd, UPDATE_KEYS, "[update]", tpath, 0)

    name = check.string(upd, "name", "[update]", tpath, 0, required=True)
    assert name is not None
    problem = module_name_problem(name) if check.compiled else name_problem(name)
    if problem:
        raise check.fail(f"[update] name {name!r} {problem}", lines.key(tpath, 0, "name"))

    description = check.string(upd, "description", "[update]", tpath, 0, required=True)
    assert description is not None
    if not description.strip():
        raise check.fail("[update] description must not be empty", lines.key(tpath, 0, "description"))
    if "\0" in description:  # it becomes MODULE_DESCRIPTION(), a C string
        raise check.fail(
            "[update] description must not contain NUL characters", lines.key(tpath, 0, "description")
        )

    kernel = check.string(upd, "kernel", "[update]", tpath, 0, required=False)
    problem = release_problem(kernel) if kernel is not None else None
    if problem:
        raise check.fail(f"[update] kernel {kernel!r} {problem}", lines.key(tpath, 0, "kernel"))

    replace = upd.get("replace", False)
    if not isinstance(replace, bool):
        raise check.fail(
            f"[update] replace must be a boolean (true or false), got {toml_type(replace)} {replace!r}",
            lines.key(tpath, 0, "replace"),
        )
    return name, description, kernel, replace


def _validate_symbols(data: dict[str, Any], check: Checker) -> tuple[SymbolSpec, ...]:
    lines = check.lines
    tpath = ("symbol",)
    symbols: dict[str, SymbolSpec] = {}
    for index, table, where, header in check.tables(data, "symbol"):
        check.reject_unknown(table, SYMBOL_KEYS, where, tpath, index)
        name = check.identifier(table, "name", where, tpath, index)
        obj = check.object(check.string(table, "object", where, tpath, index, required=False), where,
                           lines.key(tpath, index, "object"))
        sympos = check.sympos(table, where, lines.key(tpath, index, "sympos"))
        if name in symbols:
            raise check.fail(f"{where}: symbol {name!r} is already described at line {symbols[name].line}", header)
        symbols[name] = SymbolSpec(name=name, object=obj, sympos=sympos, line=header)
    return tuple(symbols.values())


def _validate_functions(data: dict[str, Any], check: Checker) -> tuple[FunctionSpec, ...]:
    lines = check.lines
    tpath = ("function",)
    if "function" not in data:
        raise check.fail("no [[function]] table: an update must replace at least one function", None)
    tables = check.tables(data, "function")
    if not tables and check.compiled:
        raise check.fail("the update replaces no function (add a [[function]] table)", None)
    if not tables:
        raise check.fail(
            "function must be a non-empty array of tables ([[function]])", lines.key((), 0, "function")
        )

    functions: list[FunctionSpec] = []
    seen_targets: dict[tuple[str, str, int], int] = {}  # -> index in functions
    seen_editions: dict[str, int] = {}
    for index, table, where, header in tables:
        check.reject_unknown(table, FUNCTION_KEYS, where, tpath, index)
        name = check.identifier(table, "name", where, tpath, index, kernel_symbol=check.compiled)
        obj = check.object(check.string(table, "object", where, tpath, index, required=False), where,
                           lines.key(tpath, index, "object"))
        sympos = check.sympos(table, where, lines.key(tpath, index, "sympos"))
        if "editions" in table or table.get("monitor") is not None or "policy" in table or "default" in table:
            spec = _multi_edition_function(check, table, where, index, name, obj, sympos, header)
        else:
            edition = check.identifier(table, "edition", where, tpath, index)
            spec = FunctionSpec(name=name, edition=edition, object=obj, sympos=sympos, line=header)

        # livepatch treats sympos 0 (unset) and 1 alike for a unique symbol, and refuses an
        # ambiguous symbol without sympos: either way the two entries would patch one function.
        target = (obj, name, sympos or 1)
        if target in seen_targets:
            first = seen_targets[target]
            pos = f" sympos {sympos}" if sympos else ""
            at = f"the [[function]] at line {functions[first].line}" if functions[first].line is not None \
                else f"[[function]] #{first + 1}"
            raise check.fail(f"{where}: {obj} function {name!r}{pos} is already patched by {at}", header)
        seen_targets[target] = index
        key = "editions" if spec.editions else "edition"
        for edition in spec.author_functions if spec.dispatched else (spec.edition,):
            if edition in seen_editions:
                first = seen_editions[edition]
                other = functions[first]
                at = f"line {other.line}" if other.line is not None else f"[[function]] #{first + 1}"
                raise check.fail(
                    f"{where}: edition {edition!r} is already used for {other.object} function "
                    f"{other.name!r} ({at}); each function needs its own edition",
                    lines.key(tpath, index, key if edition in spec.editions or key == "edition" else "policy"),
                )
            seen_editions[edition] = index
        functions.append(spec)
    return tuple(functions)


def _multi_edition_function(check: Checker, table: dict[str, Any], where: str, index: int, name: str,
                            obj: str, sympos: int | None, header: int | None) -> FunctionSpec:
    """A [[function]] with ``editions`` (and/or ``monitor``): served through a dispatcher."""
    tpath = ("function",)
    lines = check.lines

    def fail(message: str, key: str) -> UpdateSourceError:
        return check.fail(f"{where}: {message}", lines.key(tpath, index, key))

    if "edition" in table:
        raise fail("give either edition (one replacement) or editions (several, switched at run time), "
                   "not both", "edition")
    monitor = table.get("monitor", False)
    if not isinstance(monitor, bool):
        raise fail(f"monitor must be true or false, got {toml_type(monitor)} {monitor!r}", "monitor")
    editions = table.get("editions", [])
    if not isinstance(editions, list) or not all(isinstance(e, str) for e in editions):
        raise fail(f"editions must be an array of C function names, got {editions!r}", "editions")
    if not editions and not monitor:
        raise fail("editions is empty: name at least one edition (edition 0 is the kernel's original), "
                   "or set monitor = true to only watch the original", "editions")
    if len(editions) > MAX_EDITIONS - 1:
        raise fail(f"{len(editions)} editions; at most {MAX_EDITIONS - 1} besides the original", "editions")
    for edition in editions:
        problem = symbol_problem(edition)
        if problem:
            raise fail(f"edition {edition!r} {problem}", "editions")
    duplicates = sorted({e for e in editions if editions.count(e) > 1})
    if duplicates:
        raise fail(f"editions lists {', '.join(duplicates)} more than once", "editions")

    policy = check.string(table, "policy", where, tpath, index, required=False)
    if policy == "default":
        policy = None
    elif policy is not None:
        problem = symbol_problem(policy)
        if problem:
            raise fail(f"policy {policy!r} {problem} (use \"default\" or the name of a C adaptation "
                       "handler returning the edition)", "policy")
        if policy in editions:
            raise fail(f"policy {policy!r} is also listed as an edition", "policy")

    default = table.get("default", 1 if editions else 0)
    if not isinstance(default, int) or isinstance(default, bool) or not 0 <= default <= len(editions):
        raise fail(f"default must be an edition number from 0 (the original) to {len(editions)}, "
                   f"got {default!r}", "default")
    return FunctionSpec(name=name, edition=generated_name(name, obj, sympos), object=obj, sympos=sympos,
                        line=header, editions=tuple(editions), policy=policy, default_edition=default,
                        monitor=monitor)


def _validate_editions(
    functions: tuple[FunctionSpec, ...], c_files: tuple[Path, ...], check: Checker
) -> None:
    """Every edition must be defined once, with external linkage, in the update source's C files.

    The generated livepatch code refers to editions from its own translation unit, so a
    ``static`` edition (or one declared static anywhere in its file) would not link.
    """
    by_name = _c_functions_by_name(c_files)
    searched = ", ".join(p.name for p in c_files)
    for index, spec in enumerate(functions):
        for edition in spec.author_functions:
            key = "policy" if edition == spec.policy else "editions" if spec.dispatched else "edition"
            _validate_edition(spec, edition, index, key, by_name, searched, check)


def _c_functions_by_name(c_files: tuple[Path, ...]) -> dict[str, list[CDeclaration]]:
    by_name: dict[str, list[CDeclaration]] = {}
    for c_file in c_files:
        for decl in find_c_functions(c_file):
            by_name.setdefault(decl.name, []).append(decl)
    return by_name


def _validate_edition(spec: FunctionSpec, edition: str, index: int, key: str,
                      by_name: dict[str, list[CDeclaration]], searched: str, check: Checker,
                      table: tuple[str, ...] = ("function",)) -> None:
    """One C function the update names must be defined once in its C files, with external linkage."""
    where = f"[[{table[0]}]] #{index + 1}" if table in (("function",), ("kthread",)) else f"[{table[0]}]"
    role = {"policy": "adaptation handler", "transfer": "transfer hook"}.get(key, "edition")
    if table in (("hooks",), ("kthread",)):
        role = f"{key} hook"
    line = check.lines.key(table, index, key)
    decls = by_name.get(edition, [])
    # Linkage is per file: one 'static' declaration makes every later one in that file static.
    static_in = {d.path: d for d in reversed(decls) if d.is_static}
    definitions = [d for d in decls if d.is_definition]
    linkable = [d for d in definitions if d.path not in static_in]
    if len(linkable) > 1:
        places = ", ".join(f"{d.path.name}:{d.line}" for d in linkable)
        raise check.fail(f"{where}: {role} {edition!r} is defined more than once: {places}", line)
    if linkable:
        return
    if definitions:
        static = static_in[definitions[0].path]
        what = "defined" if static.is_definition else "declared"
        raise UpdateSourceError(
            f"{role} {edition!r} (for {spec.object} function {spec.name!r}, update.toml line "
            f"{line}) is {what} static; remove 'static' so the livepatch code can link to it",
            path=static.path,
            line=static.line,
        )
    declared = f" (only declared, at {decls[0].path.name}:{decls[0].line})" if decls else ""
    raise check.fail(
        f"{where}: {role} {edition!r} is not defined in any .c file{declared} "
        f"(searched: {searched})",
        line,
    )
