"""Finding the functions an update source's C files declare and define, with their lines.

Validation needs to know whether each edition is defined once, with external linkage, before
Kbuild runs: a careful scan of the text answers that in milliseconds and can name the line,
where a compiler would answer much later and about the wrong file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

C_KEYWORDS = frozenset(
    """auto break case char const continue default do double else enum extern float for goto if
    inline int long register restrict return short signed sizeof static struct switch typedef union
    unsigned void volatile while _Alignas _Alignof _Atomic _Bool _Complex _Generic _Imaginary
    _Noreturn _Static_assert _Thread_local asm typeof""".split()
)


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
        if brace != 0 or paren != 0 or name in C_KEYWORDS or name == "__attribute__":
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
