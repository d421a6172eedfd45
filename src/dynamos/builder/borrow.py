"""Which held-back header changes a unit's patched compile needs.

``build --to`` does not carry a header that reaches more units than ``--max-units`` into them, but
a ``.c`` fix often needs the release's change to such a header (a new helper, member or
constant): the unit borrows it (patch.py). It borrows only what the compiler's error asks for, so
an unrelated change of the same release (a member added to ``mm_struct``) does not refuse the fix:
the held-back headers the unit reads whose change adds an identifier the error quotes. Whether a
borrowed change alters a layout is then decided by the types, as for any header.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

_QUOTED = re.compile(r"['‘]([A-Za-z_][A-Za-z0-9_]*)['’]")
_ERROR = re.compile(r"\berror:")


def quoted_identifiers(error: str) -> set[str]:
    """The identifiers the compiler's ``error:`` lines quote (``'sk_use_task_frag'``)."""
    return {w for line in error.splitlines() if _ERROR.search(line) for w in _QUOTED.findall(line)}


def needed_headers(error: str, held_back: dict[str, bytes], read: Iterable[str], tree: Path) -> list[str]:
    """The held-back headers among those the unit ``read`` whose change adds an identifier the
    error quotes; all it read when the error quotes none that one of them adds."""
    readable = set(read)
    candidates = {p: text for p, text in held_back.items() if p in readable}
    words = quoted_identifiers(error)
    hits = []
    for path, new in sorted(candidates.items()):
        old = (tree / path).read_text(errors="replace")
        text = new.decode(errors="replace")
        if any(re.search(rf"\b{w}\b", text) and not re.search(rf"\b{w}\b", old) for w in words):
            hits.append(path)
    return hits or sorted(candidates)
