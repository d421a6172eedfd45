"""Where tables and keys are written in a TOML text, so errors can name a line.

``tomllib`` parses but reports no positions for values; an author told "[[function]] #3: edition
'x' is not defined" without a line has to count tables. These helpers recover the lines from the
text itself, after ``tomllib`` has accepted it.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field

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


class TomlLines:
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


def toml_error(error: tomllib.TOMLDecodeError, text: str) -> tuple[str, int | None]:
    """tomllib's message without its "(at line N, column M)", and that line (or the last line,
    for an error at the end of the document)."""
    message = _TOML_ERROR_LINE_RE.sub("", str(error)).strip()
    m = _TOML_ERROR_LINE_RE.search(str(error))
    if m:
        return message, int(m.group(1))
    if "end of document" in str(error):
        return message, max(1, len(text.splitlines()))
    return message, None



class NoLines:
    """Where the tables of an update made in code are written: nowhere, so errors name no line."""

    def table(self, path: tuple[str, ...], index: int = 0) -> int | None:
        return None

    def key(self, path: tuple[str, ...], index: int, key: str) -> int | None:
        return None
