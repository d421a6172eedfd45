"""Which held-back header changes a unit's patched compile needs.

``build --to`` does not carry a header that reaches more units than ``--max-units`` into them, but
a ``.c`` fix often needs the release's change to such a header (a new helper, member or
constant): the unit borrows it (patch.py). It borrows only what the compiler's error asks for, so
an unrelated change of the same release (a member added to ``mm_struct``) does not refuse the fix:
the held-back headers the unit reads whose change adds an identifier the error quotes. When the
error quotes none (``incompatible pointer type`` for a callback whose prototype changed), it tries
every one it reads and then drops each the compile does not need, so the refusal, if any, names
the change the fix needs. Whether a borrowed change alters a layout is then decided by the types,
as for any header.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from dynamos.errors import BuildError

BORROW_ROUNDS = 5  # compiles with held-back header changes a unit may try after its patched compile fails

Made = TypeVar("Made")

_QUOTED = re.compile(r"['‘]([A-Za-z_][A-Za-z0-9_]*)['’]")
_ERROR = re.compile(r"\berror:")
_DIAGNOSTIC = re.compile(r": (?:error|note): ")


def quoted_identifiers(error: str) -> set[str]:
    """The identifiers the compiler's ``error:`` lines quote (``'sk_use_task_frag'``)."""
    return {w for line in error.splitlines() if _ERROR.search(line) for w in _QUOTED.findall(line)}


def needed_headers(error: str, held_back: dict[str, bytes], read: Iterable[str], tree: Path) -> list[str]:
    """The held-back headers among those the unit ``read`` whose change adds an identifier the
    error quotes; else those the error's notes point into (``include/linux/seq_file.h:102:20:
    note: declared here`` after "too many arguments to function 'seq_setwidth'"); else all it read."""
    readable = set(read)
    candidates = {p: text for p, text in held_back.items() if p in readable}
    words = quoted_identifiers(error)
    hits = []
    for path, new in sorted(candidates.items()):
        old = (tree / path).read_text(errors="replace")
        text = new.decode(errors="replace")
        if any(re.search(rf"\b{w}\b", text) and not re.search(rf"\b{w}\b", old) for w in words):
            hits.append(path)
    notes = "\n".join(line for line in error.splitlines() if _DIAGNOSTIC.search(line))  # not "included from"
    pointed = sorted(p for p in candidates if re.search(rf"(?<![\w/.-])(?:\./)?{re.escape(p)}:\d+", notes))
    return hits or pointed or sorted(candidates)


def compile_borrowing(compile_with: Callable[[list[str]], Made], error: BuildError, held_back: dict[str, bytes],
                      read: Iterable[str], tree: Path, say: Callable[[str], None],
                      rel: str) -> tuple[Made, list[str]]:
    """After the patched compile of ``rel`` failed with ``error``: compile it again
    (``compile_with(borrowed)``) with the held-back changes the error asks for, up to BORROW_ROUNDS
    rounds, then with as few of them as still compile. Raises ``error`` when borrowing does not
    make it compile: the first error says more than a later one."""
    last, borrowed = error, []
    for _ in range(BORROW_ROUNDS):  # each round's error may ask for another header's change
        needed = [h for h in needed_headers(str(last), held_back, read, tree) if h not in borrowed]
        if not needed:
            break
        borrowed += needed
        say(f"{rel}: the patched compile failed; again with the change to {', '.join(needed)}, which it reads")
        try:
            made = compile_with(borrowed)
        except BuildError as e:
            last = e
            continue
        return _fewest(compile_with, borrowed, made, say, rel)
    raise error


def _fewest(compile_with: Callable[[list[str]], Made], borrowed: list[str], made: Made,
            say: Callable[[str], None], rel: str) -> tuple[Made, list[str]]:
    """Leave out each group of borrowed changes the unit still compiles without, halves first,
    then single ones (usually one change is needed among many: a few compiles, not one each): an
    unrelated change of the release to a header it reads must not refuse the fix for its layout."""
    kept, current = list(borrowed), True
    size = len(kept) // 2
    while size >= 1 and len(kept) > 1:
        for start in range(0, len(kept), size):
            group = kept[start:start + size]
            trial = [h for h in kept if h not in group]
            if not trial or not group:
                continue  # borrowing nothing is the compile that failed
            try:
                made, current = compile_with(trial), True
            except BuildError:
                current = False  # the failed compile may have replaced the object: compile kept again
                continue
            kept = trial
            break  # the list changed: start over at this size
        else:
            size //= 2
    if not current:
        made = compile_with(kept)
    if len(kept) < len(borrowed):
        say(f"{rel}: compiles without the change to {', '.join(h for h in borrowed if h not in kept)}: "
            "not borrowed")
    return made, sorted(kept)
