"""The rules single values of an update source obey, and the checker that reports a broken one.

Each rule says why a value is unusable (or None), in words an author can act on; the
:class:`Checker` turns that into an error naming the file and, where the source was TOML text,
the line. The rules mirror kernel limits (module and symbol name lengths, ``uname -r``) so a bad
value is refused here rather than by Kbuild or by a kernel that refuses the module.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dynamos.abi import VMLINUX
from dynamos.errors import UpdateSourceError
from dynamos.update.cscan import C_KEYWORDS
from dynamos.update.model import MAX_NAME_LEN
from dynamos.update.tomllines import NoLines, TomlLines

_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
_MODULE_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_C_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A function's name in an object: a C identifier, or a gcc clone of one (foo.constprop.0, foo.isra.0).
_KERNEL_SYMBOL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*$")
# KSYM_NAME_LEN (512 in 6.1) includes the NUL.
MAX_SYMBOL_LEN = 511
# A kernel release as uname -r prints it: "6.1.0-56-amd64", "6.8.0-rc3+", "5.15.0".
# struct new_utsname holds 65 bytes including the NUL.
_RELEASE_RE = re.compile(r"^[0-9]+\.[0-9]+(?:\.[0-9]+)*(?:[-+~_.][A-Za-z0-9+~_.-]*)?$")
MAX_RELEASE_LEN = 64


def toml_type(value: Any) -> str:
    """The TOML word for a value's type, as an author wrote it."""
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


def name_problem(name: str) -> str | None:
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


def module_name_problem(name: str) -> str | None:
    """Why a name is unusable as a module name at all (the rule for names no author chose)."""
    if not name:
        return "must not be empty"
    if len(name) > MAX_NAME_LEN:
        return f"is {len(name)} characters; a module name holds at most {MAX_NAME_LEN}"
    if not _MODULE_RE.match(name):
        bad = sorted({c for c in name if not _MODULE_RE.match(c)})
        return f"may only hold A-Z, a-z, 0-9, '_' and '-' (found {''.join(bad)!r})"
    return None


def symbol_problem(value: str) -> str | None:
    """Why a value cannot name a C function (an edition, a hook, a kernel function), or None."""
    if not _C_IDENT_RE.match(value):
        return "is not a C identifier"
    if value in C_KEYWORDS:
        return "is a C keyword"
    if len(value) > MAX_SYMBOL_LEN:
        return f"is longer than {MAX_SYMBOL_LEN} characters (KSYM_NAME_LEN)"
    return None


def kernel_symbol_problem(value: str) -> str | None:
    """Why a value cannot be a function's symbol in a compiled object, or None."""
    if not _KERNEL_SYMBOL_RE.match(value):
        return "is not a kernel symbol name"
    if len(value) > MAX_SYMBOL_LEN:
        return f"is longer than {MAX_SYMBOL_LEN} characters (KSYM_NAME_LEN)"
    return None


def release_problem(kernel: str) -> str | None:
    """Why a value is not a kernel release as ``uname -r`` prints it, or None."""
    if len(kernel) > MAX_RELEASE_LEN or not _RELEASE_RE.match(kernel):
        return "does not look like a kernel release (as `uname -r` prints it, e.g. '6.1.0-56-amd64')"
    return None


_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+~:-]{0,63}$")
CVE_RE = re.compile(r"^CVE-[0-9]{4}-[0-9]{4,7}$")


def version_problem(version: str) -> str | None:
    """Why a value is not an update version (Debian's version characters, at most 64), or None."""
    if not _VERSION_RE.match(version):
        return "is not a version (letters, digits and .+~:-, starting with a letter or digit, at most 64)"
    return None


class Checker:
    """Knows the file being validated and where its tables are written, so each check can say
    where it failed.

    ``compiled``: the tables were made in code from compiled objects (the patch front end), not
    written by an author; :func:`dynamos.update.validate.compiled_update_source` says what differs.
    """

    def __init__(self, path: Path, lines: TomlLines | NoLines, *, compiled: bool = False):
        self.path = path
        self.lines = lines
        self.compiled = compiled

    def fail(self, message: str, line: int | None) -> UpdateSourceError:
        return UpdateSourceError(message, path=self.path, line=line)

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
                f"{where}: {key} must be a string, got {toml_type(value)} {value!r}",
                self.lines.key(tpath, index, key),
            )
        return value

    def identifier(self, table: Mapping[str, Any], key: str, where: str, tpath: tuple[str, ...],
                   index: int, *, kernel_symbol: bool = False) -> str:
        """A required key holding a C identifier (a kernel symbol or an edition); with
        ``kernel_symbol``, a function's symbol as compiled (gcc clones too)."""
        value = self.string(table, key, where, tpath, index, required=True)
        assert value is not None
        problem = kernel_symbol_problem(value) if kernel_symbol else symbol_problem(value)
        if problem:
            raise self.fail(f"{where}: {key} {value!r} {problem}", self.lines.key(tpath, index, key))
        return value

    def object(self, obj: str | None, where: str, line: int | None) -> str:
        """'vmlinux' or a module name, in the kernel's spelling ('-' -> '_')."""
        if obj is None:
            return VMLINUX
        if obj != VMLINUX and (not _MODULE_RE.match(obj) or len(obj) > MAX_NAME_LEN):
            raise self.fail(
                f"{where}: object {obj!r} must be 'vmlinux' or a module name ([A-Za-z0-9_-], "
                f"at most {MAX_NAME_LEN} characters)",
                line,
            )
        return obj.replace("-", "_")

    def sympos(self, table: Mapping[str, Any], where: str, line: int | None) -> int | None:
        sympos = table.get("sympos")
        if sympos is not None and (not isinstance(sympos, int) or isinstance(sympos, bool) or sympos < 1):
            raise self.fail(
                f"{where}: sympos must be a positive integer (1 is the first of same-named symbols), "
                f"got {toml_type(sympos)} {sympos!r}",
                line,
            )
        return sympos

    def tables(self, data: Mapping[str, Any], key: str) -> list[tuple[int, dict[str, Any], str, int | None]]:
        """The ``[[key]]`` tables as (index, table, "[[key]] #n", header line), each checked to be a table."""
        tpath = (key,)
        tables = data.get(key, [])
        if isinstance(tables, dict):
            raise self.fail(f"{key} must be an array of tables: write [[{key}]], not [{key}]",
                            self.lines.table(tpath, 0))
        if not isinstance(tables, list):
            raise self.fail(f"{key} must be an array of tables ([[{key}]])", self.lines.key((), 0, key))
        out = []
        for index, table in enumerate(tables):
            where = f"[[{key}]] #{index + 1}"
            if not isinstance(table, dict):
                raise self.fail(f"{where} must be a table, got {toml_type(table)}", self.lines.table(tpath, 0))
            out.append((index, table, where, self.lines.table(tpath, index)))
        return out
