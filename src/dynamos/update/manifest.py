"""Update sources: ``update.toml`` plus the C files holding new editions of kernel functions.

Validation is strict and every error points at a file and line: an author who mistypes a key
or forgets to define an edition should learn it here, in a second, not from Kbuild or from a
kernel that refuses the module. ``tomllib`` reports no line numbers for values, so
:class:`_TomlLines` finds them in the text.

Schema (``update.toml``)::

    [update]
    name = "cmdline-banner"     # required; livepatch (module) name with '-' -> '_'
    description = "..."         # required
    kernel = "6.1.0-56-amd64"   # optional: release the update is written for
    replace = true              # optional: atomic replace of earlier updates
    consistency = "global"      # optional: "per-task" (livepatch's, default) or "global"
    transfer = "convert_state"  # optional, global: void convert_state(bool to_new), all CPUs stopped

    [[function]]                # one or more
    name = "cmdline_proc_show"  # required: kernel function to replace
    edition = "cmdline_proc_show_v2"  # required: non-static C function in a *.c file
    object = "vmlinux"          # optional: "vmlinux" or a module name
    sympos = 1                  # optional: position among same-named symbols

    [[function]]                # several editions live at once, switched at run time
    name = "pipe_write"
    editions = ["pipe_write_v2", "pipe_write_v3"]  # editions 1, 2...; 0 is the kernel's original
    default = 1                 # optional: edition serving calls at load (1; 0 with no editions)
    policy = "pick_pipe_write"  # optional: adaptation handler, a C function returning the edition
    monitor = true              # optional: count calls and time them per edition

    [[kthread]]                 # a kernel thread whose main function (a [[function]]) never returns
    function = "kswapd"         # required: the [[function]] replacing the thread's main function
    object = "vmlinux"          # optional: to tell same-named [[function]]s apart
    stop = "stop_kswapds"       # required: int stop(void), stops the thread(s) at a safe point
    start = "start_kswapds"     # required: int start(int (*threadfn)(void *)), starts them on threadfn
    transfer = "carry_state"    # optional: int transfer(bool to_new), carries their state across
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynamos.abi import MAX_EDITIONS, VMLINUX, generated_name
from dynamos.errors import ManifestError

MANIFEST_NAME = "update.toml"



@dataclass(frozen=True)
class FunctionSpec:
    """One kernel function replaced by an edition written in the update source."""

    name: str  # function in the target kernel (vmlinux or a module)
    edition: str  # C function in the update source implementing it
    object: str = VMLINUX  # "vmlinux" or a module name as the kernel knows it ('-' -> '_')
    sympos: int | None = None  # position among same-named symbols, when ambiguous
    line: int | None = None  # line of the [[function]] table in update.toml
    editions: tuple[str, ...] = ()  # multi-edition function: editions 1.. (``edition`` is the dispatcher)
    policy: str | None = None  # adaptation handler: C function choosing the edition per call
    default_edition: int = 1  # edition serving calls when the update loads
    monitor: bool = False  # count and time calls per edition
    kthread: KthreadRestart | None = None  # the main function of a kernel thread, restarted on apply/revert

    @property
    def dispatched(self) -> bool:
        """Whether calls go through a dispatcher choosing among editions (0 = the original)."""
        return bool(self.editions) or self.monitor

    @property
    def control_name(self) -> str:
        """The function's directory under /sys/module/<update>/dynamos/ (livepatch's spelling)."""
        name = self.name if self.object == VMLINUX else f"{self.object}:{self.name}"
        return f"{name},{self.sympos}" if self.sympos else name

    @property
    def original(self) -> str:
        """For a multi-edition function: the C function that runs the kernel's own code."""
        return generated_name(self.name, self.object, self.sympos, role="original")

    @property
    def author_functions(self) -> tuple[str, ...]:
        """C functions the update source must define for this function."""
        if not self.dispatched:
            return (self.edition,)
        return self.editions + ((self.policy,) if self.policy else ())




@dataclass(frozen=True)
class KthreadRestart:
    """How to move a kernel thread whose main function an update replaces onto the new code.

    The thread never returns from its loop, so livepatch's per-task switch would wait for it
    forever; instead the update stops it at a safe point of its loop, carries its state across
    and starts it again running the other side's code (the author's three C hooks).
    """

    stop: str
    start: str
    transfer: str | None = None
    line: int | None = None  # header line of the [[kthread]] table
    index: int = 0  # which [[kthread]] table, for error lines

    @property
    def hooks(self) -> tuple[tuple[str, str], ...]:
        return (("stop", self.stop), ("start", self.start)) + ((("transfer", self.transfer),) if self.transfer else ())


@dataclass(frozen=True)
class SymbolSpec:
    """A non-exported kernel symbol the editions use, resolved by livepatch at load time.

    Needed in update.toml only when the symbol is not a unique vmlinux symbol: it says which
    module holds it, or which of several same-named symbols is meant.
    """

    name: str
    object: str = VMLINUX
    sympos: int | None = None
    line: int | None = None


@dataclass(frozen=True)
class UpdateSource:
    """A validated update source directory."""

    directory: Path
    name: str
    description: str
    functions: tuple[FunctionSpec, ...]
    c_files: tuple[Path, ...]
    kernel: str | None = None  # release it is written for; None means the target's release
    replace: bool = False  # atomic replace of earlier updates (cumulative)
    symbols: tuple[SymbolSpec, ...] = ()  # [[symbol]]: where non-exported symbols live
    consistency: str = "per-task"  # or "global": every function moves to its edition at one instant
    transfer: str | None = None  # global: C hook converting shared data at that instant
    hooks: tuple[tuple[str, str], ...] = ()  # (livepatch callback, C function): state transfer hooks
    states: tuple[tuple[int, int], ...] = ()  # (id, version): system states this update sets up (klp_state)

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST_NAME

    @property
    def livepatch_name(self) -> str:
        """Module and /sys/kernel/livepatch name: the kernel turns '-' into '_' in module names."""
        return self.name.replace("-", "_")

    @property
    def objects(self) -> tuple[str, ...]:
        """Patched objects in first-seen order."""
        return tuple(dict.fromkeys(f.object for f in self.functions))


# MODULE_NAME_LEN is 64 - sizeof(unsigned long) = 56 bytes including the NUL: 55 characters.
MAX_NAME_LEN = 55
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
_MODULE_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_C_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# KSYM_NAME_LEN (512 in 6.1) includes the NUL.
MAX_SYMBOL_LEN = 511
# A kernel release as uname -r prints it: "6.1.0-56-amd64", "6.8.0-rc3+", "5.15.0".
# struct new_utsname holds 65 bytes including the NUL.
_RELEASE_RE = re.compile(r"^[0-9]+\.[0-9]+(?:\.[0-9]+)*(?:[-+~_.][A-Za-z0-9+~_.-]*)?$")
MAX_RELEASE_LEN = 64

_C_KEYWORDS = frozenset(
    """auto break case char const continue default do double else enum extern float for goto if
    inline int long register restrict return short signed sizeof static struct switch typedef union
    unsigned void volatile while _Alignas _Alignof _Atomic _Bool _Complex _Generic _Imaginary
    _Noreturn _Static_assert _Thread_local asm typeof""".split()
)

UPDATE_KEYS = ("name", "description", "kernel", "replace", "consistency", "transfer")
CONSISTENCY_MODELS = ("per-task", "global")
FUNCTION_KEYS = ("name", "edition", "editions", "default", "policy", "monitor", "object", "sympos")
SYMBOL_KEYS = ("name", "object", "sympos")
KTHREAD_KEYS = ("function", "object", "stop", "start", "transfer")
TOP_LEVEL_KEYS = ("update", "function", "symbol", "hooks", "state", "kthread")
HOOK_KEYS = ("pre_patch", "post_patch", "pre_unpatch", "post_unpatch")
STATE_KEYS = ("id", "version")


# --- line numbers for TOML keys -------------------------------------------------------------

_HEADER_RE = re.compile(r"^\s*(\[\[?)\s*([^\[\]#,]+?)\s*(\]\]?)\s*(?:#.*)?$")
_KEY_PART = r"(?:[A-Za-z0-9_-]+|\"[^\"\n]*\"|'[^'\n]*')"
_KEY_RE = re.compile(rf"^\s*({_KEY_PART}(?:\s*\.\s*{_KEY_PART})*)\s*=")
_KEY_PART_RE = re.compile(_KEY_PART)
_TOML_ERROR_LINE_RE = re.compile(r"\(at line (\d+), column \d+\)")


def _split_key(text: str) -> tuple[str, ...]:
    return tuple(p.strip("\"'") for p in _KEY_PART_RE.findall(text))


@dataclass
class _TableLines:
    header: int | None  # line of the [table] / [[table]] header (None: implicit or inline)
    keys: dict[str, int] = field(default_factory=dict)


class _TomlLines:
    """Where tables and keys of an already-parsed TOML document are written.

    A line scanner, not a parser: tomllib has checked the syntax, so headers and ``key =`` lines
    are all that is needed. Multi-line strings are skipped so their contents are not mistaken
    for keys. Inline tables get the line of the key that holds them.
    """

    def __init__(self, text: str):
        self._tables: dict[tuple[tuple[str, ...], int], _TableLines] = {}
        self._array_counts: dict[tuple[str, ...], int] = {}
        self._scan(text)

    def _scan(self, text: str) -> None:
        current: tuple[tuple[str, ...], int] = ((), 0)
        self._tables[current] = _TableLines(header=None)
        in_string: str | None = None
        for lineno, line in enumerate(text.splitlines(), start=1):
            if in_string is not None:
                if line.count(in_string) % 2 == 1:
                    in_string = None
                continue
            header = _HEADER_RE.match(line)
            if header and len(header.group(1)) == len(header.group(3)):
                path = _split_key(header.group(2))
                if header.group(1) == "[[":
                    index = self._array_counts.get(path, 0)
                    self._array_counts[path] = index + 1
                else:
                    index = 0
                current = (path, index)
                self._tables.setdefault(current, _TableLines(header=None)).header = lineno
                continue
            key = _KEY_RE.match(line)
            if key is None:
                continue
            parts = _split_key(key.group(1))
            table, index = current
            path = table + parts[:-1]
            if path != table:  # dotted key: update.name = "x"
                index = 0
            info = self._tables.setdefault((path, index), _TableLines(header=lineno))
            info.keys.setdefault(parts[-1], lineno)
            # A key whose value opens a multi-line string: skip until it closes.
            value = line[key.end() :]
            for quote in ('"""', "'''"):
                if value.count(quote) % 2 == 1:
                    in_string = quote
                    break

    def table(self, path: tuple[str, ...], index: int = 0) -> int | None:
        """Line of a table's header; for a table given inline or by dotted keys, its first key."""
        info = self._tables.get((path, index))
        if info is not None and info.header is not None:
            return info.header
        if not path:
            return None  # the root table has no header
        parent = self._tables.get((path[:-1], 0))
        if parent is not None and path[-1] in parent.keys:
            return parent.keys[path[-1]]  # function = [{...}] or update = {...}
        return None

    def key(self, path: tuple[str, ...], index: int, key: str) -> int | None:
        """Line of ``key =`` (or of a ``[path.key]`` sub-table) in a table, else the table's line."""
        info = self._tables.get((path, index))
        if info is not None and key in info.keys:
            return info.keys[key]
        sub = self._tables.get((path + (key,), 0))
        if sub is not None and sub.header is not None:
            return sub.header
        return self.table(path, index)


# --- C editions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CDeclaration:
    """A file-scope function declaration or definition found in an update source's C file."""

    name: str
    path: Path
    line: int
    is_definition: bool
    is_static: bool


def _strip_c(text: str) -> str:
    """Blank out comments, string/char literals and preprocessor lines, keeping every newline.

    What remains is C code whose braces and parentheses can be counted and whose offsets map to
    the same lines as the original text.
    """
    out: list[str] = []
    i, n = 0, len(text)
    at_line_start = True
    while i < n:
        c = text[i]
        if c == "\n":
            out.append(c)
            at_line_start = True
            i += 1
            continue
        if at_line_start and c in " \t\f\v":
            out.append(c)
            i += 1
            continue
        if at_line_start and c == "#":
            # Preprocessor directive, with backslash continuations (macros may hold braces).
            while i < n and text[i] != "\n":
                if text[i] == "\\" and i + 1 < n and text[i + 1] == "\n":
                    out.append(" \n")
                    i += 2
                    continue
                if text.startswith("/*", i):
                    end = text.find("*/", i + 2)
                    end = n if end < 0 else end + 2
                    out.append(re.sub(r"[^\n]", " ", text[i:end]))
                    i = end
                    continue
                out.append(" ")
                i += 1
            continue
        at_line_start = False
        if text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            out.append(" " * (end - i))
            i = end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
            out.append(re.sub(r"[^\n]", " ", text[i:end]))
            i = end
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            closed = j < n and text[j] == c
            end = j + 1 if closed else min(j, n)
            body = text[i + 1 : end - 1] if closed else text[i + 1 : end]
            out.append(c + re.sub(r"[^\n]", " ", body) + (c if closed else ""))
            i = end
        else:
            out.append(c)
            i += 1
    return "".join(out)


_CALL_RE = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)\s*\(")
# Between ")" and "{" of a definition: attributes such as __cold or __attribute__((...)).
_ATTR_TOKEN_RE = re.compile(r"\s*(?:[A-Za-z_][A-Za-z0-9_]*)\s*")


def _matching_paren(code: str, open_pos: int) -> int | None:
    depth = 0
    for i in range(open_pos, len(code)):
        ch = code[i]
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i
    return None


def _after_declarator(code: str, pos: int) -> str:
    """The character ending a declarator: '{' (definition), ';' or ',' (declaration), or other."""
    n = len(code)
    while pos < n:
        m = _ATTR_TOKEN_RE.match(code, pos)
        if m:
            pos = m.end()
            if pos < n and code[pos] == "(":  # __attribute__((...)), __section(...)
                close = _matching_paren(code, pos)
                if close is None:
                    return ""
                pos = close + 1
            continue
        if code[pos].isspace():
            pos += 1
            continue
        return code[pos]
    return ""


def find_c_functions(path: Path, text: str | None = None) -> list[CDeclaration]:
    """File-scope function declarations and definitions in a C file, with their lines.

    A careful scan rather than a C parser: comments, literals and preprocessor lines are blanked,
    then every ``name(`` at brace and parenthesis depth 0 is classified by what follows its
    parameter list (``{`` for a definition, ``;`` for a prototype). ``static`` is looked for in
    the declaration specifiers since the previous ``;`` or ``}``.
    """
    if text is None:
        text = path.read_text(errors="replace")
    code = _strip_c(text)
    found: list[CDeclaration] = []
    brace = paren = 0
    scanned = 0
    for m in _CALL_RE.finditer(code):
        start = m.start(1)
        if start < scanned:
            continue
        for ch in code[scanned:start]:
            if ch == "{":
                brace += 1
            elif ch == "}":
                brace -= 1
            elif ch == "(":
                paren += 1
            elif ch == ")":
                paren -= 1
        scanned = start
        name = m.group(1)
        if brace != 0 or paren != 0 or name in _C_KEYWORDS or name == "__attribute__":
            continue
        close = _matching_paren(code, m.end() - 1)
        if close is None:
            continue
        ending = _after_declarator(code, close + 1)
        if ending not in ("{", ";", ","):
            continue
        prefix_start = max(code.rfind(";", 0, start), code.rfind("}", 0, start)) + 1
        prefix = code[prefix_start:start]
        if "=" in prefix:
            continue  # a call in an initializer, not a declarator
        if not re.search(r"[A-Za-z_*]", prefix):
            continue  # no return type: a macro invocation such as module_init(f);
        found.append(
            CDeclaration(
                name=name,
                path=path,
                line=code.count("\n", 0, start) + 1,
                is_definition=ending == "{",
                is_static=re.search(r"\bstatic\b", prefix) is not None,
            )
        )
    return found


# --- validation ------------------------------------------------------------------------------


class _Checker:
    """Holds the manifest text's line index so each check can say where it failed."""

    def __init__(self, path: Path, lines: _TomlLines):
        self.path = path
        self.lines = lines

    def fail(self, message: str, line: int | None) -> ManifestError:
        return ManifestError(message, path=self.path, line=line)

    def reject_unknown(
        self,
        table: Mapping[str, Any],
        allowed: tuple[str, ...],
        where: str,
        tpath: tuple[str, ...],
        index: int,
    ) -> None:
        for key in table:
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                if key == "function":
                    advice = "functions go in their own [[function]] tables"
                elif hint:
                    advice = f"did you mean {hint[0]!r}?"
                else:
                    advice = f"allowed keys: {', '.join(allowed)}"
                raise self.fail(f"{where}: unknown key {key!r} ({advice})", self.lines.key(tpath, index, key))

    def string(
        self,
        table: Mapping[str, Any],
        key: str,
        where: str,
        tpath: tuple[str, ...],
        index: int,
        *,
        required: bool,
    ) -> str | None:
        if key not in table:
            if required:
                raise self.fail(f"{where}: missing required key {key!r}", self.lines.table(tpath, index))
            return None
        value = table[key]
        if not isinstance(value, str):
            raise self.fail(
                f"{where}: {key} must be a string, got {_toml_type(value)} {value!r}",
                self.lines.key(tpath, index, key),
            )
        return value


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return type(value).__name__  # dates and times


def _check_name(name: str) -> str | None:
    """Why an update name is unusable as a livepatch module name, or None if it is fine."""
    if not name:
        return "must not be empty"
    if len(name) > MAX_NAME_LEN:
        return f"is {len(name)} characters; a module name holds at most {MAX_NAME_LEN}"
    if not name[0].isascii() or not name[0].islower():
        return "must start with a lowercase letter"
    if not _NAME_RE.match(name):
        bad = sorted({c for c in name if not re.match(r"[a-z0-9_-]", c)})
        return f"may only hold a-z, 0-9, '_' and '-' (found {''.join(bad)!r})"
    return None


def _check_symbol(value: str) -> str | None:
    if not _C_IDENT_RE.match(value):
        return "is not a C identifier"
    if value in _C_KEYWORDS:
        return "is a C keyword"
    if len(value) > MAX_SYMBOL_LEN:
        return f"is longer than {MAX_SYMBOL_LEN} characters (KSYM_NAME_LEN)"
    return None


def _toml_error_line(error: tomllib.TOMLDecodeError, text: str) -> int | None:
    m = _TOML_ERROR_LINE_RE.search(str(error))
    if m:
        return int(m.group(1))
    if "end of document" in str(error):
        return max(1, len(text.splitlines()))
    return None


def load_update_source(directory: Path | str) -> UpdateSource:
    """Read and validate an update source; raise ManifestError naming file and line."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ManifestError("update source is not a directory", path=directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST_NAME} in update source", path=directory)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise ManifestError(f"not UTF-8 text: {e.reason}", path=path, line=line) from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = _TOML_ERROR_LINE_RE.sub("", str(e)).strip()
        raise ManifestError(f"invalid TOML: {message}", path=path, line=_toml_error_line(e, text)) from e

    lines = _TomlLines(text)
    check = _Checker(path, lines)
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

    c_files = tuple(sorted(p for p in directory.glob("*.c") if p.is_file()))
    if not c_files and any(f.author_functions for f in functions):
        raise ManifestError(
            "no .c files in update source: the editions named in update.toml must be defined in C",
            path=directory,
        )
    _validate_editions(functions, c_files, check)
    hooks = _validate_hooks(data, check)
    states = _validate_states(data, check)
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
    )


def _validate_hooks(data: dict[str, Any], check: _Checker) -> tuple[tuple[str, str], ...]:
    """[hooks]: livepatch callbacks run with the update's first object (vmlinux when patched)."""
    table = data.get("hooks", {})
    if not isinstance(table, dict):
        raise check.fail("hooks must be a table ([hooks])", check.lines.key((), 0, "hooks"))
    check.reject_unknown(table, HOOK_KEYS, "[hooks]", ("hooks",), 0)
    out = []
    for key in HOOK_KEYS:
        function = check.string(table, key, "[hooks]", ("hooks",), 0, required=False)
        if function is not None:
            problem = _check_symbol(function)
            if problem:
                raise check.fail(f"[hooks] {key} {function!r} {problem}", check.lines.key(("hooks",), 0, key))
            out.append((key, function))
    return tuple(out)


def _validate_kthreads(data: dict[str, Any], functions: tuple[FunctionSpec, ...], consistency: str,
                       check: _Checker) -> tuple[FunctionSpec, ...]:
    """[[kthread]]: restart strategies, each attached to the [[function]] replacing a thread's main
    function. Such a function is served through a dispatcher: its edition 0 is the way back."""
    tpath = ("kthread",)
    out = list(functions)
    for index, table, where, header in _tables(data, "kthread", check):
        check.reject_unknown(table, KTHREAD_KEYS, where, tpath, index)
        name = _identifier(check, table, "function", where, tpath, index)
        obj_given = check.string(table, "object", where, tpath, index, required=False)
        obj = _check_object(obj_given, where, check.lines.key(tpath, index, "object"), check)
        hooks = {key: _identifier(check, table, key, where, tpath, index) for key in ("stop", "start")}
        transfer = None
        if "transfer" in table:
            transfer = _identifier(check, table, "transfer", where, tpath, index)
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


def _validate_states(data: dict[str, Any], check: _Checker) -> tuple[tuple[int, int], ...]:
    """[[state]]: system states (klp_state) this update sets up, each an id and a version."""
    out: dict[int, int] = {}
    for index, table, where, header in _tables(data, "state", check):
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


def _validate_consistency(upd: dict[str, Any], check: _Checker) -> tuple[str, str | None]:
    tpath = ("update",)
    consistency = check.string(upd, "consistency", "[update]", tpath, 0, required=False) or "per-task"
    if consistency not in CONSISTENCY_MODELS:
        raise check.fail(f"[update] consistency {consistency!r} is not one of {', '.join(CONSISTENCY_MODELS)}",
                         check.lines.key(tpath, 0, "consistency"))
    transfer = check.string(upd, "transfer", "[update]", tpath, 0, required=False)
    if transfer is not None:
        problem = _check_symbol(transfer)
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


def _validate_update(data: dict[str, Any], check: _Checker) -> tuple[str, str, str | None, bool]:
    lines = check.lines
    tpath = ("update",)
    if "update" not in data:
        raise check.fail("missing [update] table (it holds the update's name and description)", None)
    upd = data["update"]
    if not isinstance(upd, dict):
        raise check.fail(
            f"update must be a table ([update]), got {_toml_type(upd)}", lines.key((), 0, "update")
        )
    check.reject_unknown(upd, UPDATE_KEYS, "[update]", tpath, 0)

    name = check.string(upd, "name", "[update]", tpath, 0, required=True)
    assert name is not None
    problem = _check_name(name)
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
    if kernel is not None and (len(kernel) > MAX_RELEASE_LEN or not _RELEASE_RE.match(kernel)):
        raise check.fail(
            f"[update] kernel {kernel!r} does not look like a kernel release (as `uname -r` prints it, "
            "e.g. '6.1.0-56-amd64')",
            lines.key(tpath, 0, "kernel"),
        )

    replace = upd.get("replace", False)
    if not isinstance(replace, bool):
        raise check.fail(
            f"[update] replace must be a boolean (true or false), got {_toml_type(replace)} {replace!r}",
            lines.key(tpath, 0, "replace"),
        )
    return name, description, kernel, replace


def _check_object(obj: str | None, where: str, line: int | None, check: _Checker) -> str:
    """'vmlinux' or a module name, in the kernel's spelling ('-' -> '_')."""
    if obj is None:
        return VMLINUX
    if obj != VMLINUX and (not _MODULE_RE.match(obj) or len(obj) > MAX_NAME_LEN):
        raise check.fail(
            f"{where}: object {obj!r} must be 'vmlinux' or a module name ([A-Za-z0-9_-], "
            f"at most {MAX_NAME_LEN} characters)",
            line,
        )
    return obj.replace("-", "_")


def _check_sympos(table: dict[str, Any], where: str, line: int | None, check: _Checker) -> int | None:
    sympos = table.get("sympos")
    if sympos is not None and (not isinstance(sympos, int) or isinstance(sympos, bool) or sympos < 1):
        raise check.fail(
            f"{where}: sympos must be a positive integer (1 is the first of same-named symbols), "
            f"got {_toml_type(sympos)} {sympos!r}",
            line,
        )
    return sympos


def _tables(data: dict[str, Any], key: str, check: _Checker) -> list[tuple[int, dict[str, Any], str, int | None]]:
    """The ``[[key]]`` tables as (index, table, "[[key]] #n", header line), each checked to be a table."""
    tpath = (key,)
    tables = data.get(key, [])
    if isinstance(tables, dict):
        raise check.fail(f"{key} must be an array of tables: write [[{key}]], not [{key}]",
                         check.lines.table(tpath, 0))
    if not isinstance(tables, list):
        raise check.fail(f"{key} must be an array of tables ([[{key}]])", check.lines.key((), 0, key))
    out = []
    for index, table in enumerate(tables):
        where = f"[[{key}]] #{index + 1}"
        if not isinstance(table, dict):
            raise check.fail(f"{where} must be a table, got {_toml_type(table)}", check.lines.table(tpath, 0))
        out.append((index, table, where, check.lines.table(tpath, index)))
    return out


def _identifier(check: _Checker, table: dict[str, Any], key: str, where: str, tpath: tuple[str, ...],
                index: int) -> str:
    """A required key holding a C identifier (a kernel symbol or an edition)."""
    value = check.string(table, key, where, tpath, index, required=True)
    assert value is not None
    problem = _check_symbol(value)
    if problem:
        raise check.fail(f"{where}: {key} {value!r} {problem}", check.lines.key(tpath, index, key))
    return value


def _validate_symbols(data: dict[str, Any], check: _Checker) -> tuple[SymbolSpec, ...]:
    lines = check.lines
    tpath = ("symbol",)
    symbols: dict[str, SymbolSpec] = {}
    for index, table, where, header in _tables(data, "symbol", check):
        check.reject_unknown(table, SYMBOL_KEYS, where, tpath, index)
        name = _identifier(check, table, "name", where, tpath, index)
        obj = _check_object(check.string(table, "object", where, tpath, index, required=False), where,
                            lines.key(tpath, index, "object"), check)
        sympos = _check_sympos(table, where, lines.key(tpath, index, "sympos"), check)
        if name in symbols:
            raise check.fail(f"{where}: symbol {name!r} is already described at line {symbols[name].line}", header)
        symbols[name] = SymbolSpec(name=name, object=obj, sympos=sympos, line=header)
    return tuple(symbols.values())


def _validate_functions(data: dict[str, Any], check: _Checker) -> tuple[FunctionSpec, ...]:
    lines = check.lines
    tpath = ("function",)
    if "function" not in data:
        raise check.fail("no [[function]] table: an update must replace at least one function", None)
    tables = _tables(data, "function", check)
    if not tables:
        raise check.fail(
            "function must be a non-empty array of tables ([[function]])", lines.key((), 0, "function")
        )

    functions: list[FunctionSpec] = []
    seen_targets: dict[tuple[str, str, int], FunctionSpec] = {}
    seen_editions: dict[str, FunctionSpec] = {}
    for index, table, where, header in tables:
        check.reject_unknown(table, FUNCTION_KEYS, where, tpath, index)
        name = _identifier(check, table, "name", where, tpath, index)
        obj = _check_object(check.string(table, "object", where, tpath, index, required=False), where,
                            lines.key(tpath, index, "object"), check)
        sympos = _check_sympos(table, where, lines.key(tpath, index, "sympos"), check)
        if "editions" in table or table.get("monitor") is not None or "policy" in table or "default" in table:
            spec = _multi_edition_function(check, table, where, index, name, obj, sympos, header)
        else:
            edition = _identifier(check, table, "edition", where, tpath, index)
            spec = FunctionSpec(name=name, edition=edition, object=obj, sympos=sympos, line=header)

        # livepatch treats sympos 0 (unset) and 1 alike for a unique symbol, and refuses an
        # ambiguous symbol without sympos: either way the two entries would patch one function.
        target = (obj, name, sympos or 1)
        if target in seen_targets:
            first = seen_targets[target]
            pos = f" sympos {sympos}" if sympos else ""
            raise check.fail(
                f"{where}: {obj} function {name!r}{pos} is already patched by the [[function]] "
                f"at line {first.line}",
                header,
            )
        seen_targets[target] = spec
        key = "editions" if spec.editions else "edition"
        for edition in spec.author_functions if spec.dispatched else (spec.edition,):
            if edition in seen_editions:
                first = seen_editions[edition]
                raise check.fail(
                    f"{where}: edition {edition!r} is already used for {first.object} function "
                    f"{first.name!r} (line {first.line}); each function needs its own edition",
                    lines.key(tpath, index, key if edition in spec.editions or key == "edition" else "policy"),
                )
            seen_editions[edition] = spec
        functions.append(spec)
    return tuple(functions)


def _multi_edition_function(check: _Checker, table: dict[str, Any], where: str, index: int, name: str,
                            obj: str, sympos: int | None, header: int | None) -> FunctionSpec:
    """A [[function]] with ``editions`` (and/or ``monitor``): served through a dispatcher."""
    tpath = ("function",)
    lines = check.lines

    def fail(message: str, key: str) -> ManifestError:
        return check.fail(f"{where}: {message}", lines.key(tpath, index, key))

    if "edition" in table:
        raise fail("give either edition (one replacement) or editions (several, switched at run time), "
                   "not both", "edition")
    monitor = table.get("monitor", False)
    if not isinstance(monitor, bool):
        raise fail(f"monitor must be true or false, got {_toml_type(monitor)} {monitor!r}", "monitor")
    editions = table.get("editions", [])
    if not isinstance(editions, list) or not all(isinstance(e, str) for e in editions):
        raise fail(f"editions must be an array of C function names, got {editions!r}", "editions")
    if not editions and not monitor:
        raise fail("editions is empty: name at least one edition (edition 0 is the kernel's original), "
                   "or set monitor = true to only watch the original", "editions")
    if len(editions) > MAX_EDITIONS - 1:
        raise fail(f"{len(editions)} editions; at most {MAX_EDITIONS - 1} besides the original", "editions")
    for edition in editions:
        problem = _check_symbol(edition)
        if problem:
            raise fail(f"edition {edition!r} {problem}", "editions")
    duplicates = sorted({e for e in editions if editions.count(e) > 1})
    if duplicates:
        raise fail(f"editions lists {', '.join(duplicates)} more than once", "editions")

    policy = check.string(table, "policy", where, tpath, index, required=False)
    if policy == "default":
        policy = None
    elif policy is not None:
        problem = _check_symbol(policy)
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
    functions: tuple[FunctionSpec, ...], c_files: tuple[Path, ...], check: _Checker
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
                      by_name: dict[str, list[CDeclaration]], searched: str, check: _Checker,
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
        raise ManifestError(
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
