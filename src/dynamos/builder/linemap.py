"""Keep the line numbers of code a patch did not touch.

``__LINE__`` ends up in code and tables (WARN/BUG sites, pr_debug descriptors, printk text), so a
patch that adds one line near the top of a file would otherwise change every function below it.
Rather than guess which differences are "only line numbers", the patched file is given ``#line``
directives so that each unchanged line keeps its original number, and the object diff then sees
the untouched functions as byte-identical.

A directive is placed before the first line of every unchanged run that follows a hunk, but
only where the preprocessor reads a new line as a new line: not inside a multi-line macro
definition (backslash continuation), a comment or string spanning lines, or a parenthesised
expression (a macro invocation's arguments). When a hunk ends in such a place, the directive goes
on the next safe unchanged line. Lines in a conditional group that is skipped still count, but a
``#line`` inside it does not act; so after the ``#else``, ``#elif`` or ``#endif`` of a group that
holds an inserted directive, the numbering is set again.
"""

from __future__ import annotations

import difflib
import re

_CONDITIONAL_RE = re.compile(r"^\s*#\s*(?P<word>ifdef|ifndef|if|elifdef|elifndef|elif|else|endif)\b")


def stabilise_lines(original: str, patched: str) -> str:
    """The patched text with ``#line`` directives so unchanged lines keep their original numbers.

    Changed and added lines are numbered on from the line before them; they never shift what
    follows, because the next unchanged line is numbered again.
    """
    old_lines = split_lines(original)
    new_lines = split_lines(patched)
    origin = _origins(old_lines, new_lines)
    safe = safe_line_starts(new_lines)
    newline = "\r\n" if new_lines and new_lines[0].endswith("\r\n") else "\n"

    out: list[str] = []
    current = 1  # the number the preprocessor gives new_lines[j], if every inserted directive acts
    groups: list[bool] = []  # open conditional groups: does one hold a directive we inserted?
    resync = False  # a group holding a directive ended or switched branch: number the next line again
    for j, line in enumerate(new_lines):
        wanted = origin[j]
        if wanted is not None and safe[j] and (wanted != current or resync):
            out.append(f"#line {wanted}{newline}")
            current, resync = wanted, False
            groups = [True] * len(groups)
        out.append(line)
        current += 1
        conditional = _CONDITIONAL_RE.match(line) if safe[j] else None
        if conditional is None:
            continue
        if conditional["word"].startswith("if"):
            groups.append(False)
        elif groups:
            resync = resync or groups[-1]
            if conditional["word"] == "endif":
                groups.pop()
    return "".join(out)


def split_lines(text: str) -> list[str]:
    """Lines as the C preprocessor counts them: split at newlines only (kernel sources hold form
    feeds, which ``str.splitlines`` would also split at)."""
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    return lines + [parts[-1]] if parts[-1] else lines


def _origins(old_lines: list[str], new_lines: list[str]) -> list[int | None]:
    """For each patched line, its 1-based line number in the original, or None if the patch made it."""
    origin: list[int | None] = [None] * len(new_lines)
    matcher = difflib.SequenceMatcher(None, old_lines, new_lines, autojunk=False)
    for i, j, size in matcher.get_matching_blocks():
        for k in range(size):
            origin[j + k] = i + k + 1
    return origin


def safe_line_starts(lines: list[str]) -> list[bool]:
    """Whether a directive may be inserted before each line.

    A small C lexer: tracks block comments, string and character literals, backslash
    continuations and parenthesis depth outside preprocessor directives. It is deliberately
    conservative; a line it is unsure about is not safe, and the directive moves further down.
    """
    safe: list[bool] = []
    in_comment = False
    continued = False  # the previous line ended with a backslash
    in_directive = False
    quote = ""  # the open literal's quote character, carried only across continuations
    line_comment = False  # a // comment, carried only across continuations
    depth = 0
    for line in lines:
        body = line.rstrip("\r\n")
        safe.append(not in_comment and not continued and depth == 0)
        if not continued and not in_comment:
            in_directive = body.lstrip().startswith("#")
        i = 0
        while i < len(body):
            ch = body[i]
            pair = body[i:i + 2]
            if in_comment:
                if pair == "*/":
                    in_comment = False
                    i += 1
            elif quote:
                if ch == "\\":
                    i += 1
                elif ch == quote:
                    quote = ""
            elif line_comment:
                break
            elif pair == "/*":
                in_comment = True
                i += 1
            elif pair == "//":
                line_comment = True
                break
            elif ch in "\"'":
                quote = ch
            elif not in_directive and ch in "([":
                depth += 1
            elif not in_directive and ch in ")]":
                depth = max(depth - 1, 0)
            i += 1
        continued = body.endswith("\\")
        if not continued:
            quote = ""  # an unterminated literal ends with its line (e.g. an apostrophe in #error text)
            line_comment = False
            in_directive = False
    return safe
